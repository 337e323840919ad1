//! Replicas share the agents' sessions through NATS: a real nats-server,
//! the simulator, and facades in this process or as processes. The bucket is read directly
//! (`ccgw-sessions`: agent id -> JSON) to see what the replicas wrote.
use crate::common;

use std::{collections::HashMap, time::Duration};

use async_nats::jetstream::kv;
use ccgw_callcontrol::{
    gateway::{Cookies, Guid, Session, SessionOperation},
    proto::ReleaseOutcome,
    sessions::SharedSession,
};
use ccgw_sim::SimConfig;
use common::{
    agent_id, deadline, eventually, handing_over, nats::NatsServer, release_req,
    replicas::ReplicaSet, sim_config, spawn_facade, spawn_sim, wait_until, watch_req, TestApp,
    WAIT,
};
use futures_util::StreamExt;

async fn sessions_bucket(nats: &NatsServer) -> kv::Store {
    let client = async_nats::connect(nats.url())
        .await
        .expect("NATS connects");
    async_nats::jetstream::new(client)
        .get_key_value("ccgw-sessions")
        .await
        .expect("the replicas made the sessions bucket")
}

/// The gateway rotates `agent`'s Guid and `app` polls once, as a poll loop does (with or
/// without NATS): the answer brings the new Guid, which is returned.
async fn rotated_by_a_poll(app: &TestApp, agent: &str) -> String {
    app.sim.rotate_guid(agent).expect("rotates");
    let poll = SessionOperation::PollEvents {
        retire_connection: false,
    };
    let (answer, _) = app
        .api
        .sessions()
        .send(agent_id(agent), &poll, deadline(), None, None)
        .await
        .expect("the poll answers");
    assert!(answer.is_ok(), "{answer:?}");
    app.guid_of(agent).unwrap()
}

/// The current Guid the bucket holds for `agent`.
async fn stored_guid(bucket: &kv::Store, agent: &str) -> Option<String> {
    let value = bucket.get(agent).await.expect("the bucket answers")?;
    let entry: serde_json::Value = serde_json::from_slice(&value).expect("JSON");
    Some(
        entry["current"]["guid"]
            .as_str()
            .expect("a Guid")
            .to_owned(),
    )
}

/// The candidate Guid of every entry the bucket holds, by agent.
async fn stored_candidates(bucket: &kv::Store) -> HashMap<String, Option<String>> {
    let mut candidates = HashMap::new();
    let mut entries = bucket.watch_with_history(">").await.expect("a watch");
    while let Some(entry) = entries.next().await {
        let entry = entry.expect("an entry");
        let value: serde_json::Value = serde_json::from_slice(&entry.value).expect("JSON");
        let candidate = value["candidate"]["guid"].as_str().map(str::to_owned);
        candidates.insert(entry.key, candidate);
        if entry.delta == 0 {
            break;
        }
    }
    candidates
}

/// Keys are agent ids, never a Guid.
async fn assert_keys_are_agent_ids(bucket: &kv::Store, guids: &[&str]) {
    let keys: Vec<String> = bucket
        .keys()
        .await
        .expect("keys")
        .map(|k| k.expect("a key"))
        .collect()
        .await;
    assert!(!keys.is_empty());
    for key in keys {
        assert!(key.parse::<u32>().is_ok(), "{key:?} is not an agent id");
        for guid in guids {
            assert!(!key.contains(guid), "a key holds a Guid");
        }
    }
}

/// Two facades in this process on one simulator and one NATS: `a` owns the simulator.
async fn two_replicas(nats: &NatsServer, sim: SimConfig) -> (TestApp, TestApp) {
    let (sim, sim_addr, stop_sim) = spawn_sim(sim, None).await;
    let url = format!("http://{sim_addr}");
    let nats_url = nats.url();
    let flags = ["--nats-url", nats_url.as_str()];
    let a = spawn_facade(sim.clone(), sim_addr, &url, &flags, Some(stop_sim)).await;
    let b = spawn_facade(sim, sim_addr, &url, &flags, None).await;
    (a, b)
}

/// The Guid of the latest event poll of `agent` the simulator received.
fn last_polled_guid(app: &TestApp, agent: &str) -> Option<String> {
    let path = format!("/agentgateway/resource/agentevent/{agent}");
    app.sim
        .requests()
        .into_iter()
        .rfind(|r| r.path == path)
        .and_then(|r| r.guid)
}

/// A session handed over on replica A, then rotated by the gateway on A's poll, is used by
/// replica B's ReleaseCall with no handover, in its newest Guid: the gateway rejects the old
/// one at once here.
#[tokio::test]
async fn a_guid_rotated_through_one_replica_is_used_by_another() {
    let Some(nats) = NatsServer::start().await else {
        return;
    };
    let (a, b) = two_replicas(&nats, common::sim_refusing_rotated_guids()).await;
    let desktop = a.desktop_sign_in("101", false).await;
    let _watch = a
        .watch(handing_over(watch_req(&["101"]), &desktop.guid))
        .await;
    wait_until("A polls in the handed-over session", || {
        last_polled_guid(&a, "101").as_deref() == Some(desktop.guid.as_str())
    })
    .await;
    a.sim.rotate_guid("101").expect("rotates");
    wait_until("A polls in the rotated Guid", || {
        last_polled_guid(&a, "101").is_some_and(|g| g != desktop.guid)
    })
    .await;
    let rotated = last_polled_guid(&a, "101").unwrap();
    wait_until("B's copy holds the rotated Guid", || {
        b.guid_of("101").as_deref() == Some(rotated.as_str())
    })
    .await;
    let requests_before = a.sim.requests().len();
    a.sim.place_call("101", "70093").expect("a call");
    let answer = b.release(release_req("101")).await.expect("released");
    assert_eq!(answer.outcome(), ReleaseOutcome::Released);
    let by_b: Vec<_> = a.sim.requests()[requests_before..]
        .iter()
        .filter(|r| !r.path.contains("/agentevent/"))
        .cloned()
        .collect();
    assert!(by_b.iter().any(|r| r.method == "DELETE"), "{by_b:?}");
    assert!(
        by_b.iter()
            .all(|r| r.guid.as_deref() == Some(rotated.as_str())),
        "B sent only in the rotated Guid"
    );
    let bucket = sessions_bucket(&nats).await;
    assert_eq!(
        stored_guid(&bucket, "101").await.as_deref(),
        Some(rotated.as_str())
    );
    assert_keys_are_agent_ids(&bucket, &[&desktop.guid, &rotated]).await;
}

/// Every replica stops, new ones start: the session is still there, and a release through a
/// new replica goes out in it without any handover.
#[tokio::test]
async fn sessions_survive_a_restart_of_every_replica() {
    let Some(set) = ReplicaSet::builder().start().await else {
        return;
    };
    let mut a = set.spawn(&[]).await;
    let mut b = set.spawn(&[]).await;
    let desktop = set.sign_in_and_hand_over("101", &[&a]).await;
    let bucket = sessions_bucket(&set.nats[0]).await;
    eventually("A shared the session it adopted", WAIT, || async {
        stored_guid(&bucket, "101").await.as_deref() == Some(desktop.guid.as_str())
    })
    .await;
    tokio::join!(a.stop(), b.stop());

    let c = set.spawn(&[]).await;
    set.sim.place_call("101", "70093").expect("a call");
    let requests_before = set.sim.requests().len();
    let answer = c
        .release(release_req("101"))
        .await
        .expect("released without a handover");
    assert_eq!(answer.outcome(), ReleaseOutcome::Released);
    let requests = set.sim.requests();
    let release = requests[requests_before..]
        .iter()
        .find(|r| r.method == "DELETE")
        .expect("a DELETE");
    assert_eq!(release.guid.as_deref(), Some(desktop.guid.as_str()));
}

/// A replica whose change is based on an old revision (it had not seen the other's rotation)
/// cannot overwrite the newer Guid, neither with the old one nor by deleting it (its refusal
/// of the old Guid): the bucket and both local copies keep the newest.
#[tokio::test]
async fn a_replica_with_an_old_view_never_overwrites_a_newer_guid() {
    let Some(nats) = NatsServer::start().await else {
        return;
    };
    let (a, b) = two_replicas(&nats, sim_config()).await;
    let agent = agent_id("101");
    let first = a.sign_in("101").await;
    wait_until("B learns the session", || {
        b.guid_of("101").as_deref() == Some(first.as_str())
    })
    .await;
    let old_revision = b.api.sessions().registry().revision(agent).unwrap();
    let rotated = rotated_by_a_poll(&a, "101").await;
    assert_ne!(rotated, first, "the poll answer rotated the Guid");
    let bucket = sessions_bucket(&nats).await;
    eventually("A wrote the rotation", WAIT, || async {
        stored_guid(&bucket, "101").await.as_deref() == Some(rotated.as_str())
    })
    .await;

    let b_registry = b.api.sessions().registry();
    let store = b_registry.store().expect("B shares its sessions");
    let old = SharedSession {
        current: Session {
            guid: Guid::parse("guid", &first).unwrap(),
            cookies: Cookies::default(),
        },
        confirmed: true,
        candidate: None,
    };
    store.changed(agent, old_revision, Some(old));
    wait_until("B's old write conflicts", || {
        b_registry.store_counters().conflicts() == 1
    })
    .await;
    store.changed(agent, old_revision, None);
    wait_until("B's old deletion conflicts", || {
        b_registry.store_counters().conflicts() == 2
    })
    .await;

    assert_eq!(
        stored_guid(&bucket, "101").await.as_deref(),
        Some(rotated.as_str())
    );
    assert_eq!(a.guid_of("101").as_deref(), Some(rotated.as_str()));
    assert_eq!(b.guid_of("101").as_deref(), Some(rotated.as_str()));
    assert_eq!(b_registry.store_counters().failed_writes(), 0);
    assert_keys_are_agent_ids(&bucket, &[&first, &rotated]).await;
}

/// NATS stops: each replica's local copy keeps working, and a rotation written meanwhile is
/// retried until NATS is back; then the other replica's watch resumes and brings it.
#[tokio::test]
async fn a_change_made_while_nats_is_down_is_shared_once_it_is_back() {
    let Some(mut nats) = NatsServer::start().await else {
        return;
    };
    let (a, b) = two_replicas(&nats, sim_config()).await;
    let first = a.sign_in("101").await;
    wait_until("B learns the session", || {
        b.guid_of("101").as_deref() == Some(first.as_str())
    })
    .await;
    nats.kill().await;
    let rotated = rotated_by_a_poll(&a, "101").await;
    assert_ne!(rotated, first);
    let a_counters = a.api.sessions().registry().store_counters();
    wait_until("A's write fails", || a_counters.failed_writes() > 0).await;
    assert_eq!(b.guid_of("101").as_deref(), Some(first.as_str()));

    nats.restart().await;
    // Reconnecting, the writer's and the watch's backoff (at most 5 s each) and a JetStream
    // timeout (5 s) bound it well below a minute.
    let shared = tokio::time::timeout(Duration::from_secs(60), async {
        while b.guid_of("101").as_deref() != Some(rotated.as_str()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        shared.is_ok(),
        "B never learnt the rotation made without NATS"
    );
    let bucket = sessions_bucket(&nats).await;
    assert_eq!(
        stored_guid(&bucket, "101").await.as_deref(),
        Some(rotated.as_str())
    );
}

/// A burst of changes far beyond what the writer takes meanwhile (10 000 agents' sessions
/// handed over on replica A, then a candidate for each, with no await in between) reaches
/// replica B and the bucket whole: every agent's latest change, none dropped.
#[tokio::test]
async fn a_burst_of_session_changes_reaches_the_other_replica_whole() {
    let Some(nats) = NatsServer::start().await else {
        return;
    };
    let (a, b) = two_replicas(&nats, sim_config()).await;
    const AGENTS: usize = 10_000;
    let agents = 101..101 + AGENTS as u32;
    let guid = |n: u32, which: &str| format!("{which}-{n}.AgentGateway0");
    let session = |guid: &str| Session {
        guid: Guid::parse("guid", guid).unwrap(),
        cookies: Cookies::default(),
    };
    let a_registry = a.api.sessions().registry();
    for n in agents.clone() {
        let agent = agent_id(&n.to_string());
        a_registry
            .offer(agent, session(&guid(n, "current")))
            .expect("room");
        a_registry
            .offer(agent, session(&guid(n, "candidate")))
            .expect("room");
    }
    let a_counters = a_registry.store_counters();
    assert_eq!(a_counters.dropped_changes(), 0, "A queued every change");
    let b_registry = b.api.sessions().registry();
    // One compare-and-set after another, in a debug build on one thread: well within a minute.
    eventually("B holds every agent", Duration::from_secs(60), || async {
        b_registry.len() == AGENTS
    })
    .await;
    for n in agents.clone() {
        assert_eq!(
            b.guid_of(&n.to_string()),
            Some(guid(n, "current")),
            "agent {n}"
        );
    }
    let bucket = sessions_bucket(&nats).await;
    let candidates = stored_candidates(&bucket).await;
    assert_eq!(candidates.len(), AGENTS);
    for n in agents {
        assert_eq!(
            candidates.get(&n.to_string()),
            Some(&Some(guid(n, "candidate"))),
            "agent {n}: its latest change"
        );
    }
    assert_eq!(a_counters.dropped_changes(), 0);
    assert_eq!(a_counters.conflicts(), 0);
    assert_eq!(a_counters.failed_writes(), 0);
}
