//! One poller per agent across replicas: real nats-server, the simulator, three facade
//! processes with short (valid) lease settings. Who holds a shard is read from the leases
//! bucket itself; the simulator counts the polls of an agent in flight at once.
use crate::common;

use std::{collections::BTreeSet, time::Duration};

use async_nats::jetstream::{self, kv};
use ccgw_callcontrol::{
    nats::{desired_owner, shard_of, SHARDS},
    proto::{watch_release_events_response::Item, ReleaseEvent},
};
use ccgw_sim::SimConfig;
use common::{
    agent_id, client_of, desktop_sign_in, eventually, handing_over,
    nats::NatsLink,
    replicas::{Leases, Replica, ReplicaSet},
    sim_config, watch_on, watch_req, DesktopSession, OpenStream, SERVING,
};
use futures_util::StreamExt;
use tokio::time::Instant;

/// Short but valid: poll timeout + renew + margin (2 s) < TTL.
const LEASES: Leases = Leases::fast().ttl_secs(16);
const TTL: Duration = LEASES.ttl();
const POLL_TIMEOUT: Duration = LEASES.poll_timeout();
const AGENT: &str = "101";
/// Bound of waits for leases to settle (joins, hand-backs) on a loaded machine.
const SETTLE: Duration = Duration::from_secs(60);

/// A replica and its id among the replicas (its `member.<id>` key).
struct Member {
    replica: Replica,
    id: String,
}

/// Replicas whose shard leases the tests read from the leases bucket.
struct LeasedReplicas {
    set: ReplicaSet,
    jetstream: jetstream::Context,
    /// Opened once the first replica created it.
    leases: Option<kv::Store>,
    replicas: Vec<Member>,
}

impl LeasedReplicas {
    /// NATS, the simulator (answering an empty poll after 4 s, so a poll is in flight most of
    /// the time, and rotating no Guid: each replica polls with the one handed over to it) and
    /// `n` replicas, once every shard is held by its desired owner. `None`: no nats-server.
    async fn start(n: usize) -> Option<Self> {
        Self::start_with(n, Duration::from_secs(4), LEASES).await
    }

    /// [`start`](Self::start) with the simulator's long-poll wait `poll_wait` and `leases`.
    async fn start_with(n: usize, poll_wait: Duration, leases: Leases) -> Option<Self> {
        let set = ReplicaSet::builder()
            .sim(SimConfig {
                poll_wait,
                guid_interval: Duration::from_secs(3600),
                ..sim_config()
            })
            .leases(leases)
            .flags(&["--watch-grace-secs", "2"])
            .start()
            .await?;
        let client = async_nats::connect(set.nats_url()).await.unwrap();
        let mut replicas = Self {
            set,
            jetstream: jetstream::new(client),
            leases: None,
            replicas: Vec::new(),
        };
        for _ in 0..n {
            replicas.add().await;
        }
        replicas.settled().await;
        Some(replicas)
    }

    /// Starts one more replica and learns its id from the leases bucket.
    async fn add(&mut self) {
        let nats_url = self.set.nats_url().to_owned();
        self.add_via(&nats_url).await;
    }

    /// [`add`](Self::add), the replica reaching NATS at `nats_url`.
    async fn add_via(&mut self, nats_url: &str) {
        let before = self.members().await;
        let gateway = self.set.gateway_url();
        let replica = self.set.spawn_on(&gateway, nats_url, &[], SERVING).await;
        if self.leases.is_none() {
            let store = self.jetstream.get_key_value("ccgw-leases").await;
            self.leases = Some(store.expect("the first replica created the leases bucket"));
        }
        let known = &*self;
        let id = tokio::time::timeout(SETTLE, async {
            loop {
                if let Some(id) = known.members().await.difference(&before).next() {
                    return id.clone();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the new replica's heartbeat is in the bucket");
        self.replicas.push(Member { replica, id });
    }

    /// The replica ids with a key in the leases bucket (live or not).
    async fn members(&self) -> BTreeSet<String> {
        let Some(leases) = &self.leases else {
            return BTreeSet::new();
        };
        let Ok(keys) = leases.keys().await else {
            return BTreeSet::new();
        };
        keys.filter_map(|key| async move { key.ok()?.strip_prefix("member.").map(str::to_owned) })
            .collect()
            .await
    }

    async fn holder(&self, shard: u16) -> Option<String> {
        let leases = self.leases.as_ref()?;
        let value = leases.get(format!("shard.{shard}")).await.ok()??;
        Some(String::from_utf8(value.to_vec()).unwrap())
    }

    async fn holders(&self) -> Vec<Option<String>> {
        let mut holders = Vec::with_capacity(usize::from(SHARDS));
        for shard in 0..SHARDS {
            holders.push(self.holder(shard).await);
        }
        holders
    }

    /// Waits until every shard is held by its desired owner among `live` (indices).
    async fn settled_on(&self, live: &[usize]) {
        let ids: Vec<&str> = live.iter().map(|i| self.replicas[*i].id.as_str()).collect();
        eventually(
            "every shard is held by its desired owner",
            SETTLE,
            || async {
                let holders = self.holders().await;
                (0..SHARDS).all(|shard| {
                    holders[usize::from(shard)].as_deref() == desired_owner(shard, &ids)
                })
            },
        )
        .await;
    }

    async fn settled(&self) {
        let all: Vec<usize> = (0..self.replicas.len()).collect();
        self.settled_on(&all).await;
    }

    /// The index of the replica holding `agent`'s shard.
    async fn owner_of(&self, agent: &str) -> usize {
        let holder = self.holder(shard_of(agent_id(agent))).await.expect("held");
        self.replicas
            .iter()
            .position(|r| r.id == holder)
            .expect("a replica of this test")
    }

    fn agent(&self) -> ccgw_sim::AgentView {
        self.set.sim.agent(AGENT).unwrap()
    }

    fn polls_of_agent(&self) -> usize {
        let path = format!("/agentgateway/resource/agentevent/{AGENT}");
        self.set
            .sim
            .requests()
            .iter()
            .filter(|r| r.path == path)
            .count()
    }

    /// The agent signed in by its desktop, the session handed over to the replica that holds
    /// its shard: the session and that replica's index.
    async fn signed_in_on_owner(&self) -> (DesktopSession, usize) {
        let desktop = desktop_sign_in(self.set.sim_addr, AGENT, false).await;
        let owner = self.owner_of(AGENT).await;
        self.replicas[owner]
            .replica
            .hand_over(AGENT, &desktop.guid)
            .await;
        (desktop, owner)
    }

    /// A watcher of the agent on replica `i`, handing over the desktop's session.
    async fn watch_on(&self, i: usize, guid: &str) -> OpenStream {
        let client = self.replicas[i].replica.client().await;
        watch_on(client, handing_over(watch_req(&[AGENT]), guid))
            .await
            .expect("watching")
    }

    /// The customer hangs up a call: two release events queued for the agent.
    fn hang_up(&self) -> String {
        self.set.hang_up(AGENT)
    }

    async fn until_answered(&self) {
        eventually("the agent's events were polled", SETTLE, || async {
            self.agent().queued_events == 0
        })
        .await;
    }

    async fn until_polled(&self) {
        eventually("a poll of the agent is in flight", SETTLE, || async {
            self.agent().polls_in_flight >= 1
        })
        .await;
    }
}

/// A watcher on each replica: exactly one polls (the simulator never sees two polls of the
/// agent in flight while events keep being answered), its watcher gets the events, and the
/// shards are spread over the three.
#[tokio::test]
async fn one_replica_polls_an_agent_watched_on_all_three_and_shards_spread() {
    let Some(cluster) = LeasedReplicas::start(3).await else {
        return;
    };
    let holders = cluster.holders().await;
    for replica in &cluster.replicas {
        let held = holders
            .iter()
            .filter(|h| h.as_deref() == Some(&replica.id))
            .count();
        assert!(held > 0, "every replica holds some of the shards: {held}");
        let gauge = replica.replica.metric("ccgw_nats_shards_held").await;
        let gauge = gauge.expect("a replica's shards held");
        assert_eq!(
            gauge as usize, held,
            "the metric says what the bucket holds"
        );
    }

    let desktop = desktop_sign_in(cluster.set.sim_addr, AGENT, false).await;
    let mut streams = Vec::new();
    for i in 0..3 {
        streams.push(cluster.watch_on(i, &desktop.guid).await);
    }
    let owner = cluster.owner_of(AGENT).await;
    cluster.until_polled().await;
    for _ in 0..5 {
        let call = cluster.hang_up();
        cluster.until_answered().await;
        let events = streams[owner].events_of(2).await;
        assert!(events.iter().all(|e| e.call_id == call), "{events:?}");
    }
    assert_eq!(
        cluster.agent().max_polls_in_flight,
        1,
        "one poller at a time"
    );
    for (i, member) in cluster.replicas.iter().enumerate() {
        let observed = member.replica.metric("ccgw_release_events_observed_total");
        let observed = observed.await.expect("a replica's release events observed");
        let expected = if i == owner { 10.0 } else { 0.0 };
        assert_eq!(
            observed, expected,
            "replica {i} (owner {owner}) read the events"
        );
    }
}

/// `kill -9` of the owner: another replica takes the shard over and polls within the TTL and
/// one poll; its watcher gets the next events.
#[tokio::test]
async fn another_replica_polls_within_the_ttl_when_the_owner_is_killed() {
    let Some(mut cluster) = LeasedReplicas::start(3).await else {
        return;
    };
    let desktop = desktop_sign_in(cluster.set.sim_addr, AGENT, false).await;
    let mut streams = Vec::new();
    for i in 0..3 {
        streams.push(cluster.watch_on(i, &desktop.guid).await);
    }
    let owner = cluster.owner_of(AGENT).await;
    cluster.until_polled().await;
    let polls_before = cluster.polls_of_agent();
    let killed_at = Instant::now();
    cluster.replicas[owner].replica.kill().await;

    let shard = shard_of(agent_id(AGENT));
    let killed_id = cluster.replicas[owner].id.clone();
    let bound = TTL + POLL_TIMEOUT + Duration::from_secs(10);
    eventually("another replica polls the agent", bound, || async {
        cluster.holder(shard).await.is_some_and(|h| h != killed_id)
            && cluster.polls_of_agent() > polls_before
            && cluster.agent().polls_in_flight >= 1
    })
    .await;
    let took = killed_at.elapsed();
    // The lease last moved up to one renew interval (1 s) before the kill.
    let earliest = TTL - Duration::from_secs(1);
    assert!(took >= earliest, "taken over before the TTL: {took:?}");
    let survivors: Vec<usize> = (0..3).filter(|i| *i != owner).collect();
    let new_owner = cluster.owner_of(AGENT).await;
    assert!(survivors.contains(&new_owner));
    let call = cluster.hang_up();
    let events = streams[new_owner].events_of(2).await;
    assert!(events.iter().all(|e| e.call_id == call), "{events:?}");
    assert!(cluster.agent().max_polls_in_flight <= 2);
    cluster.settled_on(&survivors).await;
}

/// `kill -STOP` of the owner for twice the TTL: another replica takes over; after `kill -CONT`
/// the paused one finds its lease lost and sends no poll for it: the simulator never sees
/// more polls in flight than before the resume (at most the one allowed overlap).
#[tokio::test]
async fn a_paused_owner_sends_no_poll_for_the_shard_it_lost() {
    let Some(cluster) = LeasedReplicas::start(3).await else {
        return;
    };
    let desktop = desktop_sign_in(cluster.set.sim_addr, AGENT, false).await;
    let mut streams = Vec::new();
    for i in 0..3 {
        streams.push(cluster.watch_on(i, &desktop.guid).await);
    }
    let owner = cluster.owner_of(AGENT).await;
    cluster.until_polled().await;
    let paused = &cluster.replicas[owner];
    paused.replica.pause().await;
    let paused_at = Instant::now();

    let shard = shard_of(agent_id(AGENT));
    eventually("another replica took the shard over", 3 * TTL, || async {
        cluster.holder(shard).await.is_some_and(|h| h != paused.id)
    })
    .await;
    let new_owner = cluster.owner_of(AGENT).await;
    let call = cluster.hang_up();
    let events = streams[new_owner].events_of(2).await;
    assert!(events.iter().all(|e| e.call_id == call), "{events:?}");

    tokio::time::sleep_until(paused_at + 2 * TTL).await;
    let before_resume = cluster.agent().max_polls_in_flight;
    assert_eq!(
        before_resume, 1,
        "the paused owner's poll ended before the takeover"
    );
    // The new owner's long poll is in flight: a poll of the paused one would overlap it.
    cluster.until_polled().await;
    paused.replica.resume().await;
    eventually(
        "the resumed replica found its lease lost",
        SETTLE,
        || async {
            let lost = paused.replica.metric("ccgw_nats_shard_leases_lost_total");
            lost.await.expect("a replica's leases lost") >= 1.0
        },
    )
    .await;
    cluster.settled().await;
    cluster.until_polled().await;
    assert_eq!(
        cluster.agent().max_polls_in_flight,
        before_resume,
        "no poll of the lost shard after the resume"
    );
}

/// The only watcher is on a replica that does not own the agent's shard: the owner polls for
/// it (and reads the events), and stops once the watcher left and the grace period passed.
#[tokio::test]
async fn the_owner_polls_an_agent_only_another_replica_watches() {
    let Some(cluster) = LeasedReplicas::start(3).await else {
        return;
    };
    let (desktop, owner) = cluster.signed_in_on_owner().await;
    let watching = (owner + 1) % 3;
    let stream = cluster.watch_on(watching, &desktop.guid).await;
    cluster.until_polled().await;
    cluster.hang_up();
    cluster.until_answered().await;
    let owner_replica = &cluster.replicas[owner].replica;
    assert_eq!(
        owner_replica
            .metric("ccgw_release_events_observed_total")
            .await,
        Some(2.0)
    );
    for i in (0..3).filter(|i| *i != owner) {
        let observed = cluster.replicas[i]
            .replica
            .metric("ccgw_release_events_observed_total");
        assert_eq!(observed.await, Some(0.0), "replica {i} does not poll");
    }
    assert_eq!(cluster.agent().max_polls_in_flight, 1);

    drop(stream);
    eventually("the owner stopped polling", SETTLE, || async {
        let polled = owner_replica.metric("ccgw_polled_agents");
        polled.await.expect("a replica's polled agents") == 0.0
    })
    .await;
    eventually("nobody polls the agent", SETTLE, || async {
        cluster.agent().polls_in_flight == 0
    })
    .await;
}

/// NATS stopped: renewals fail, the owner's fence closes and nobody polls the agent; NATS
/// started again: the owner renews the lease it still holds (nobody takes anything over) and
/// polls again, and the events queued meanwhile reach its watcher.
#[tokio::test]
async fn polls_stop_while_nats_is_down_and_resume_when_it_returns() {
    let Some(mut cluster) = LeasedReplicas::start(3).await else {
        return;
    };
    let desktop = desktop_sign_in(cluster.set.sim_addr, AGENT, false).await;
    let mut streams = Vec::new();
    for i in 0..3 {
        streams.push(cluster.watch_on(i, &desktop.guid).await);
    }
    let owner = cluster.owner_of(AGENT).await;
    cluster.until_polled().await;
    cluster.set.nats[0].kill().await;
    let killed_at = Instant::now();

    // The owner's last renewal was sent before the kill: its fence closed by TTL - margin
    // (2 s) after it, and the last poll it started before answered within the simulator's
    // long-poll wait (4 s). From then on nobody may poll; a loop still polling would poll again
    // within its 300 ms pause, so a window of a few seconds shows it.
    tokio::time::sleep_until(killed_at + TTL + Duration::from_secs(4)).await;
    let failed = cluster.replicas[owner]
        .replica
        .metric("ccgw_nats_lease_renewals_failed_total")
        .await;
    assert!(
        failed.expect("a replica's renewals failed") >= 1.0,
        "renewals failed"
    );
    assert_eq!(cluster.agent().polls_in_flight, 0, "nobody polls the agent");
    let polls = cluster.polls_of_agent();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(cluster.polls_of_agent(), polls, "no poll while fenced");
    let call = cluster.hang_up();

    cluster.set.nats[0].restart().await;
    cluster.until_answered().await;
    let events = streams[owner].events_of(2).await;
    assert!(events.iter().all(|e| e.call_id == call), "{events:?}");
    assert_eq!(cluster.agent().max_polls_in_flight, 1);
    // Every replica was cut off alike: the owner kept its lease (nobody took anything over).
    assert_eq!(cluster.owner_of(AGENT).await, owner);
    for member in &cluster.replicas {
        let lost = member.replica.metric("ccgw_nats_shard_leases_lost_total");
        assert_eq!(lost.await, Some(0.0));
    }
}

/// A replica stopped with SIGTERM (a rolling update) hands its leases back and withdraws its
/// membership: the others hold its shards long before a takeover could (the TTL).
#[tokio::test]
async fn a_replica_that_shuts_down_hands_its_shards_back_at_once() {
    let Some(mut cluster) = LeasedReplicas::start(3).await else {
        return;
    };
    let stopped_at = Instant::now();
    cluster.replicas.remove(0).replica.stop().await;
    cluster.settled().await;
    let took = stopped_at.elapsed();
    assert!(
        took < TTL - Duration::from_secs(2),
        "handed back in {took:?}"
    );
}

/// A replica stopping while its poll of an agent waits at the gateway lets the gateway answer
/// that poll before it hands the shard back, and the next owner polls only then. Cut, the
/// gateway would still hold it while the next owner polls the agent: two pollers, and an event
/// handed to a connection that is gone.
#[tokio::test]
async fn a_stopping_replica_lets_its_waiting_poll_end_before_another_polls_the_agent() {
    let Some(mut cluster) = LeasedReplicas::start(2).await else {
        return;
    };
    let (desktop, owner) = cluster.signed_in_on_owner().await;
    let _streams = [
        cluster.watch_on(0, &desktop.guid).await,
        cluster.watch_on(1, &desktop.guid).await,
    ];
    cluster.until_polled().await;
    // Right after a poll went out, so it waits most of the simulator's 4 s.
    let polls = cluster.polls_of_agent();
    eventually("the owner's next poll", SETTLE, || async {
        cluster.polls_of_agent() > polls
    })
    .await;
    cluster.replicas.remove(owner).replica.stop().await;
    eventually("the other replica polls the agent", SETTLE, || async {
        cluster.agent().polls_in_flight == 1 && cluster.polls_of_agent() > polls + 1
    })
    .await;
    let agent = cluster.agent();
    assert_eq!(agent.polls_abandoned, 0, "a waiting poll was cut");
    assert_eq!(agent.max_polls_in_flight, 1);
}

/// Shards move as soon as a replica joins or leaves, not at the next lease renewal: with
/// renewals a minute apart, a joining replica gets its share, and the shards of one that shuts
/// down are held by the other, within seconds. (Waiting for the renewal would leave a leaving
/// replica's agents unpolled for up to a renew interval.)
#[tokio::test]
async fn shards_move_when_a_replica_joins_or_leaves_not_at_the_next_renewal() {
    const SLOW_RENEWALS: Leases = Leases::fast().renew_secs(60).ttl_secs(80);
    const WELL_BEFORE_A_RENEWAL: Duration = Duration::from_secs(20);
    let Some(mut cluster) =
        LeasedReplicas::start_with(1, Duration::from_secs(4), SLOW_RENEWALS).await
    else {
        return;
    };
    let joining = Instant::now();
    cluster.add().await;
    cluster.settled().await;
    let took = joining.elapsed();
    assert!(
        took < WELL_BEFORE_A_RENEWAL,
        "the joining replica got its share in {took:?}"
    );

    let leaving = Instant::now();
    cluster.replicas.remove(0).replica.stop().await;
    cluster.settled().await;
    let took = leaving.elapsed();
    assert!(
        took < WELL_BEFORE_A_RENEWAL,
        "the other took the shards over in {took:?}"
    );
}

/// The watched bucket's interest keys: one per shard and replica, naming the agents; and, while
/// a member of an older version (an empty heartbeat) is live, one per agent too, which that
/// version reads. They go once the older member does.
#[tokio::test]
async fn interest_is_one_key_per_shard_and_per_agent_only_while_an_older_replica_is_live() {
    let Some(cluster) = LeasedReplicas::start(2).await else {
        return;
    };
    let (desktop, owner) = cluster.signed_in_on_owner().await;
    let watching = 1 - owner;
    let _stream = cluster.watch_on(watching, &desktop.guid).await;
    let watched = cluster
        .jetstream
        .get_key_value("ccgw-watched")
        .await
        .expect("the watched bucket");
    let id = &cluster.replicas[watching].id;
    let shard_key = format!("shard.{}.{id}", shard_of(agent_id(AGENT)));
    let agent_key = format!("{AGENT}.{id}");
    let keys = || async {
        let keys = watched.keys().await.expect("listing the watched bucket");
        keys.filter_map(|key| async move { key.ok() })
            .collect::<BTreeSet<String>>()
            .await
    };
    eventually(
        "the shard's interest key names the agent",
        SETTLE,
        || async {
            let value = watched.get(&shard_key).await.ok().flatten();
            value.is_some_and(|value| value.as_ref() == AGENT.as_bytes())
        },
    )
    .await;
    assert_eq!(keys().await, BTreeSet::from([shard_key.clone()]));

    let leases = cluster.leases.as_ref().expect("the leases bucket");
    let older = "0ddba11";
    let heartbeats = async {
        loop {
            leases
                .put(format!("member.{older}"), bytes::Bytes::new())
                .await
                .expect("an older member's heartbeat");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    let per_agent_key = async {
        eventually("a per-agent key for the older member", SETTLE, || async {
            keys().await.contains(&agent_key)
        })
        .await;
    };
    tokio::select! {
        () = heartbeats => unreachable!(),
        () = per_agent_key => {}
    }
    leases
        .delete(format!("member.{older}"))
        .await
        .expect("the older member leaves");
    eventually(
        "only the shard key once the older member left",
        SETTLE,
        || async { keys().await == BTreeSet::from([shard_key.clone()]) },
    )
    .await;
}

/// The next `n` release events of `stream` (heartbeats skipped), or the status it ended with
/// first.
async fn first_events(
    stream: &mut OpenStream,
    n: usize,
) -> Result<Vec<ReleaseEvent>, tonic::Status> {
    let mut events = Vec::with_capacity(n);
    while events.len() < n {
        match stream.next_item().await? {
            Some(Item::Event(event)) => events.push(event),
            Some(Item::Heartbeat(_)) => {}
            other => panic!("expected release events, got {other:?}"),
        }
    }
    Ok(events)
}

/// Agents signed in for the handover test: enough that the owner learning of a watcher before
/// its session (they reach it through two buckets, in either order) happens many times over.
const HANDED_OVER_AGENTS: usize = 24;

/// Freshly signed-in agents (no replica knows their sessions), one stream each, all opened at
/// once with the desktop's session handed over on a replica that does NOT own the agent's
/// shard. The owner learns of the watcher (the watched bucket) and of the session (the
/// sessions bucket) in either order; its loop, started without a session, waits for it
/// instead of ending the agent's session for every watcher. Every stream receives its agent's
/// release events; none ends with NO_SESSION.
#[tokio::test]
async fn a_handover_on_a_replica_that_does_not_poll_the_agent_reaches_the_one_that_does() {
    let Some(cluster) = LeasedReplicas::start(3).await else {
        return;
    };
    let ids: Vec<&str> = cluster.replicas.iter().map(|r| r.id.as_str()).collect();
    let mut opening = Vec::new();
    for n in 0..HANDED_OVER_AGENTS {
        let agent = (201 + n).to_string();
        let owner = desired_owner(shard_of(agent_id(&agent)), &ids).unwrap();
        let owner = ids.iter().position(|id| *id == owner).unwrap();
        // Never the owner; the two others in turn.
        let watching = (owner + 1 + n % 2) % 3;
        let desktop = desktop_sign_in(cluster.set.sim_addr, &agent, false).await;
        let addr = cluster.replicas[watching].replica.addr().to_owned();
        opening.push(async move {
            let request = handing_over(watch_req(&[&agent]), &desktop.guid);
            let stream = watch_on(client_of(&addr).await, request).await;
            (agent, stream.expect("watching"))
        });
    }
    let streams = futures_util::future::join_all(opening).await;
    let reading = streams.into_iter().map(|(agent, mut stream)| {
        let call = cluster.set.hang_up(&agent);
        async move {
            let seen = first_events(&mut stream, 2).await;
            (agent, call, seen)
        }
    });
    let failed: Vec<String> = futures_util::future::join_all(reading)
        .await
        .into_iter()
        .filter_map(|(agent, call, seen)| match seen {
            Ok(events) if events.iter().all(|e| e.call_id == call) => None,
            Ok(events) => Some(format!("{agent}: {events:?}")),
            Err(status) => Some(format!("{agent}: {:?} {}", status.code(), status.message())),
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {HANDED_OVER_AGENTS} streams did not get their release events: {failed:#?}",
        failed.len()
    );
}

/// A replica cut off from NATS (its link holds every byte with the sockets open, as a
/// partition does) keeps running and polling until its fence closes; another replica takes
/// its shards over once their leases stood still for the TTL. The fence closes the poll
/// timeout before TTL - margin after the last renewal was sent, so the cut-off replica's last
/// poll has ended when the new owner's first starts: the gateway never has two polls of the
/// agent in flight. A paused replica (SIGSTOP) cannot show this, since a stopped process
/// starts no poll; a running one that cannot renew does.
#[tokio::test]
async fn a_replica_cut_off_from_nats_has_stopped_polling_when_another_takes_over() {
    // An empty poll is held for 10 s, nearly the 11 s poll timeout.
    let Some(mut cluster) = LeasedReplicas::start_with(2, Duration::from_secs(10), LEASES).await
    else {
        return;
    };
    let link = NatsLink::start(cluster.set.nats[0].port).await;
    cluster.add_via(&link.url()).await;
    cluster.settled().await;
    let cut_off = 2;
    let ids: Vec<&str> = cluster.replicas.iter().map(|r| r.id.as_str()).collect();
    let agent = (101..)
        .map(|n: u32| n.to_string())
        .find(|a| desired_owner(shard_of(agent_id(a)), &ids) == Some(ids[cut_off]))
        .unwrap();
    let shard = shard_of(agent_id(&agent));
    let desktop = desktop_sign_in(cluster.set.sim_addr, &agent, false).await;
    // A watcher on the cut-off replica keeps it polling (another replica's interest would fade
    // there once it cannot see it refreshed); one on replica 0 has the new owner poll.
    let mut streams = Vec::new();
    for i in [0, cut_off] {
        let request = handing_over(watch_req(&[&agent]), &desktop.guid);
        let client = cluster.replicas[i].replica.client().await;
        let stream = watch_on(client, request).await;
        streams.push(stream.expect("watching"));
    }
    eventually("the agent is polled", SETTLE, || async {
        cluster.set.sim.agent(&agent).unwrap().polls_in_flight >= 1
    })
    .await;
    assert_eq!(cluster.owner_of(&agent).await, cut_off);

    // Cut just after a renewal of the shard's lease: it is never renewed again.
    let leases = cluster.leases.as_ref().unwrap();
    let mut renewals = leases.watch(format!("shard.{shard}")).await.unwrap();
    let renewal = tokio::time::timeout(SETTLE, renewals.next()).await;
    renewal.expect("the lease is renewed").unwrap().unwrap();
    link.cut();
    let renewed = Instant::now();

    // Late in the window TTL - margin after the renewal, an event answers the poll in flight:
    // a replica whose fence still let it poll would start a 10 s long poll here, still in
    // flight when the new owner polls after the TTL.
    tokio::time::sleep_until(renewed + TTL - Duration::from_secs(5)).await;
    let event =
        serde_json::json!({"eventType": "AgentState_Work", "workNo": agent, "content": null});
    cluster.set.sim.queue_event(&agent, event).unwrap();

    let cut_off_id = cluster.replicas[cut_off].id.clone();
    eventually("another replica took the shard over", 3 * TTL, || async {
        cluster.holder(shard).await.is_some_and(|h| h != cut_off_id)
    })
    .await;
    let call = cluster.set.hang_up(&agent);
    let events = streams[0].events_of(2).await;
    assert!(events.iter().all(|e| e.call_id == call), "{events:?}");
    assert_eq!(
        cluster.set.sim.agent(&agent).unwrap().max_polls_in_flight,
        1,
        "the cut-off replica's last poll overlapped the new owner's"
    );
}
