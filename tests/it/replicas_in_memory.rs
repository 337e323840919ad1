//! Replicas in one process sharing their state in its memory (`SharedMemory`), as replicas on
//! NATS share it: one poller per agent, resuming on another replica, request ids across
//! replicas, takeovers, and a replica cut off from the shared state. The same scenarios on
//! NATS are in the replicas* test files; these run without nats-server, in seconds.
use crate::common;

use ccgw_callcontrol::proto::ReleaseOutcome;
use common::{
    eventually, expect_shared_state_unavailable, expect_status, hangup_pair, health,
    health_becomes, kinds_and_calls,
    memory::{spawn_replicas_in_memory, MemoryReplicas},
    release_req, release_with_id,
    replicas::Leases,
    resume_req, wait_until, watch_req, CALLER, WAIT,
};
use tokio::time::Instant;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// The replicas' shard leases: renewed every second, taken over after 15 s.
const LEASES: Leases = Leases::fast();

async fn until_polled(set: &MemoryReplicas, agent: &str) {
    wait_until("the agent is polled", || {
        set.sim.agent(agent).is_ok_and(|a| a.polls_in_flight >= 1)
    })
    .await;
}

/// Two agents, one polled by each replica, watched on both: each agent has one poll in flight
/// at a time, by the replica the spread gives it, and every stream gets its agent's events.
#[tokio::test]
async fn one_replica_polls_an_agent_watched_on_both() {
    let set = spawn_replicas_in_memory(2, LEASES).await;
    for poller in 0..2 {
        let agent = set.agent_polled_by(poller, 2);
        set.replica(0).sign_in(&agent).await;
        let mut streams = Vec::new();
        for i in 0..2 {
            streams.push(set.replica(i).watch(watch_req(&[&agent])).await);
        }
        until_polled(&set, &agent).await;
        assert_eq!(set.poller_of(&agent), Some(poller));
        let call = set.replica(0).hang_up(&agent, CALLER);
        for stream in &mut streams {
            assert_eq!(
                kinds_and_calls(&stream.events_of(2).await),
                hangup_pair(&call)
            );
        }
        assert_eq!(set.max_polls_in_flight(&agent), 1, "agent {agent}");
    }
}

/// A token from replica A resumes exactly on replica B once A stopped: B was never watching
/// the agent, so the events come from the shared log; no Gap, nothing repeated, then new
/// events live (B polls the agent now).
#[tokio::test]
async fn a_token_of_a_stopped_replica_resumes_exactly_on_another() {
    let mut set = spawn_replicas_in_memory(2, LEASES).await;
    let agent = "101";
    set.replica(0).sign_in(agent).await;
    let mut stream = set.replica(0).watch(watch_req(&[agent])).await;
    let first = set.replica(0).hang_up(agent, CALLER);
    let events = stream.events_of(2).await;
    assert_eq!(kinds_and_calls(&events), hangup_pair(&first));
    let token = events[1].resume_token.clone();
    let second = set.replica(0).hang_up(agent, CALLER);
    assert_eq!(
        kinds_and_calls(&stream.events_of(2).await),
        hangup_pair(&second)
    );
    drop(stream);
    set.stop(0).await;

    let mut resumed = set.replica(1).watch(resume_req(&[agent], &token)).await;
    assert_eq!(
        kinds_and_calls(&resumed.events_of(2).await),
        hangup_pair(&second)
    );
    let third = set.replica(1).hang_up(agent, CALLER);
    assert_eq!(
        kinds_and_calls(&resumed.events_of(2).await),
        hangup_pair(&third)
    );
    assert_eq!(set.max_polls_in_flight(agent), 1);
}

/// A request_id answered on A is answered alike on B without a second DELETE; the id with
/// other parameters is refused on either.
#[tokio::test]
async fn a_request_id_repeated_on_another_replica_is_answered_once() {
    let set = spawn_replicas_in_memory(2, LEASES).await;
    set.replica(0).sign_in("101").await;
    set.sim.place_call("101", CALLER).unwrap();
    let first = set
        .replica(0)
        .release(release_with_id("101", "hang-up-1"))
        .await
        .expect("released");
    assert_eq!(first.outcome(), ReleaseOutcome::Released, "{first:?}");
    let repeat = set
        .replica(1)
        .release(release_with_id("101", "hang-up-1"))
        .await
        .expect("the repeat answers");
    assert_eq!(repeat.outcome(), ReleaseOutcome::Released, "{repeat:?}");
    for i in 0..2 {
        let status = set
            .replica(i)
            .release(release_with_id("102", "hang-up-1"))
            .await
            .unwrap_err();
        expect_status(&status, Code::InvalidArgument, "REQUEST_ID_REUSED");
    }
    assert_eq!(set.deletes(), 1);
}

/// The poller stopped (a rolling update): it hands its leases back, and the replica whose
/// client watches the agent polls it at once, well within the TTL.
#[tokio::test]
async fn a_stopped_pollers_agents_are_polled_by_another_at_once() {
    let mut set = spawn_replicas_in_memory(2, LEASES).await;
    let agent = set.agent_polled_by(0, 2);
    set.replica(0).sign_in(&agent).await;
    // Watched on replica 1 only: replica 0 polls it for that remote interest.
    let mut stream = set.replica(1).watch(watch_req(&[&agent])).await;
    until_polled(&set, &agent).await;
    assert_eq!(set.poller_of(&agent), Some(0));
    let call = set.replica(1).hang_up(&agent, CALLER);
    assert_eq!(
        kinds_and_calls(&stream.events_of(2).await),
        hangup_pair(&call)
    );

    let stopped_at = Instant::now();
    set.stop(0).await;
    wait_until("replica 1 holds the agent's shard", || {
        set.poller_of(&agent) == Some(1)
    })
    .await;
    assert!(stopped_at.elapsed() < LEASES.ttl(), "handed back at once");
    let call = set.replica(1).hang_up(&agent, CALLER);
    assert_eq!(
        kinds_and_calls(&stream.events_of(2).await),
        hangup_pair(&call)
    );
    assert_eq!(set.max_polls_in_flight(&agent), 1);
}

/// The poller is cut off from the shared state (a partition): it is not ready, its fence stops
/// its polls, and the other replica takes its shard over once the lease stood still for the
/// TTL, never polling while the cut-off one still does. Brought back, it learns it lost the
/// lease, takes its share back, and its watcher receives what was polled meanwhile.
#[tokio::test]
async fn a_cut_off_pollers_agents_are_taken_over_after_the_lease_ttl() {
    let set = spawn_replicas_in_memory(2, LEASES).await;
    let agent = set.agent_polled_by(1, 2);
    set.replica(0).sign_in(&agent).await;
    let mut streams = Vec::new();
    for i in 0..2 {
        streams.push(set.replica(i).watch(watch_req(&[&agent])).await);
    }
    until_polled(&set, &agent).await;
    assert_eq!(set.poller_of(&agent), Some(1));

    set.shared.cut_off(1, true);
    let cut_at = Instant::now();
    let cut_off_addr = set.replica(1).grpc_addr.to_string();
    health_becomes(&cut_off_addr, "", ServingStatus::NotServing, WAIT).await;
    eventually("replica 0 took the shard over", 3 * LEASES.ttl(), || {
        std::future::ready(set.poller_of(&agent) == Some(0))
    })
    .await;
    assert!(
        cut_at.elapsed() >= LEASES.ttl() - LEASES.renew(),
        "taken over {:?} after the cut, before the lease stood still for the TTL",
        cut_at.elapsed()
    );
    let during = set.replica(0).hang_up(&agent, CALLER);
    assert_eq!(
        kinds_and_calls(&streams[0].events_of(2).await),
        hangup_pair(&during)
    );
    assert_eq!(set.max_polls_in_flight(&agent), 1);

    set.shared.cut_off(1, false);
    health_becomes(&cut_off_addr, "", ServingStatus::Serving, WAIT).await;
    wait_until("replica 1 holds its shard again", || {
        set.poller_of(&agent) == Some(1)
    })
    .await;
    let after = set.replica(0).hang_up(&agent, CALLER);
    let mut both = hangup_pair(&during);
    both.extend(hangup_pair(&after));
    assert_eq!(kinds_and_calls(&streams[1].events_of(4).await), both);
    assert_eq!(
        kinds_and_calls(&streams[0].events_of(2).await),
        hangup_pair(&after)
    );
    assert_eq!(set.max_polls_in_flight(&agent), 1);
}

/// A replica cut off from the shared state is not ready (alive still), and refuses releases
/// and new streams with SHARED_STATE_UNAVAILABLE, sending nothing; back, it is ready and
/// releases again.
#[tokio::test]
async fn a_replica_cut_off_is_not_ready_and_sends_nothing() {
    let set = spawn_replicas_in_memory(2, LEASES).await;
    set.replica(0).sign_in("101").await;
    common::wait_until("replica 1 knows the session", || {
        set.replica(1).guid_of("101").is_some()
    })
    .await;
    set.sim.place_call("101", CALLER).unwrap();
    set.sim.clear_requests();

    set.shared.cut_off(1, true);
    let addr = set.replica(1).grpc_addr.to_string();
    health_becomes(&addr, "", ServingStatus::NotServing, WAIT).await;
    assert_eq!(
        health(&addr, "liveness").await,
        Some(ServingStatus::Serving)
    );
    for request in [release_req("101"), release_with_id("101", "during-cut")] {
        let status = set.replica(1).release(request).await.unwrap_err();
        expect_shared_state_unavailable(&status);
    }
    let status = set.replica(1).watch_refused(watch_req(&["101"])).await;
    expect_shared_state_unavailable(&status);
    assert!(set.sim.requests().is_empty(), "sent while cut off");
    health_becomes(
        &set.replica(0).grpc_addr.to_string(),
        "",
        ServingStatus::Serving,
        WAIT,
    )
    .await;

    set.shared.cut_off(1, false);
    health_becomes(&addr, "", ServingStatus::Serving, WAIT).await;
    let answer = set
        .replica(1)
        .release(release_with_id("101", "during-cut"))
        .await
        .expect("released once back");
    assert_eq!(answer.outcome(), ReleaseOutcome::Released, "{answer:?}");
    assert_eq!(set.deletes(), 1);
}
