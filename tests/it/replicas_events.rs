//! One release event log for every replica (`--nats-url`): a real nats-server, the simulator,
//! and facade processes on loopback ports. Tokens resume exactly on any replica and across
//! restarts; a Gap only when retention really dropped events; a replica that does not poll an
//! agent still delivers its events live, through its follower of the stream.
use crate::common;

use ccgw_sim::{AuthMode, SimConfig};
use common::{
    client_of, desktop_sign_in, handing_over, hangup_pair, kinds_and_calls,
    replicas::{Replica, ReplicaSet, ReplicaSetBuilder},
    resume_req, sim_config, watch_on, watch_req, Item, OpenStream, CALLER,
};

const AGENT: &str = "101";

/// Replicas on a simulator with a Guid that never rotates: each replica is handed the sign-in
/// Guid (the sessions are not shared in this test's scope).
fn static_sim() -> ReplicaSetBuilder {
    ReplicaSet::builder().sim(SimConfig {
        auth_mode: AuthMode::Static,
        ..sim_config()
    })
}

/// A stream of the agent on the replica at `addr`, handing it the session, from `token`.
async fn watch(addr: &str, guid: &str, token: Option<&str>) -> OpenStream {
    let request = match token {
        Some(token) => resume_req(&[AGENT], token),
        None => watch_req(&[AGENT]),
    };
    watch_on(client_of(addr).await, handing_over(request, guid))
        .await
        .expect("WatchReleaseEvents accepted")
}

/// Asserts the stream's next events are exactly those of `calls`' hang-ups, in order (a Gap or
/// anything but a heartbeat first fails); returns the last one's resume token.
async fn sees_exactly(stream: &mut OpenStream, calls: &[&str]) -> String {
    let events = stream.events_of(2 * calls.len()).await;
    let expected: Vec<_> = calls.iter().flat_map(|call| hangup_pair(call)).collect();
    assert_eq!(kinds_and_calls(&events), expected);
    events.last().unwrap().resume_token.clone()
}

/// Watchers on the first replica see two hang-ups (the token after the first is kept), the
/// replica is stopped, and the second resumes from that token on `next`: exactly the second
/// hang-up, no Gap, then new hang-ups live without a duplicate.
async fn resumes_after_the_replica_stops(
    set: &ReplicaSet,
    mut first: Replica,
    next: impl std::future::Future<Output = Replica>,
) {
    let desktop = desktop_sign_in(set.sim_addr, AGENT, false).await;
    let mut stream = watch(first.addr(), &desktop.guid, None).await;
    let token = sees_exactly(&mut stream, &[&set.hang_up(AGENT)]).await;
    let second = set.hang_up(AGENT);
    sees_exactly(&mut stream, &[&second]).await;
    drop(stream);
    first.stop().await;

    let mut next = next.await;
    let mut resumed = watch(next.addr(), &desktop.guid, Some(&token)).await;
    sees_exactly(&mut resumed, &[&second]).await;
    let third = set.hang_up(AGENT);
    sees_exactly(&mut resumed, &[&third]).await;
    // Stopped cleanly, it hands its shard leases back: a replica started next polls at once
    // (killed, it would leave them to expire first).
    drop(resumed);
    next.stop().await;
}

/// (1) A token of replica A resumes on replica B, started after A stopped.
#[tokio::test]
async fn a_token_of_a_stopped_replica_resumes_exactly_on_another() {
    let Some(set) = static_sim().start().await else {
        return;
    };
    let a = set.spawn(&[]).await;
    let b = set.spawn(&[]);
    resumes_after_the_replica_stops(&set, a, b).await;
}

/// (2) A token from before a restart of the only replica resumes exactly; a token beyond the
/// stream's end is refused as not issued.
#[tokio::test]
async fn a_token_from_before_a_restart_resumes_exactly() {
    let Some(set) = static_sim().start().await else {
        return;
    };
    let before = set.spawn(&[]).await;
    resumes_after_the_replica_stops(&set, before, set.spawn(&[])).await;

    let again = set.spawn(&[]).await;
    let desktop = desktop_sign_in(set.sim_addr, "102", false).await;
    let mut stream = watch_on(
        again.client().await,
        handing_over(watch_req(&["102"]), &desktop.guid),
    )
    .await
    .unwrap();
    set.sim.place_call("102", CALLER).unwrap();
    set.sim.customer_hangup("102").unwrap();
    let token = stream.events_of(2).await.pop().unwrap().resume_token;
    let (epoch, sequence) = token.rsplit_once('.').unwrap();
    let ahead = format!(
        "{epoch}.{:x}",
        u64::from_str_radix(sequence, 16).unwrap() + 100
    );
    let refused = watch_on(
        again.client().await,
        handing_over(resume_req(&["102"], &ahead), &desktop.guid),
    )
    .await;
    let status = match refused {
        Err(status) => status,
        Ok(mut stream) => stream.next_item().await.expect_err("refused"),
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
}

/// (3) With --replay-events 2, a token followed by four events of its agent resumes with a Gap
/// naming the agent, then the two the stream kept.
#[tokio::test]
async fn a_token_whose_events_retention_dropped_resumes_after_a_gap() {
    let Some(set) = static_sim().start().await else {
        return;
    };
    let a = set.spawn(&["--replay-events", "2"]).await;
    let desktop = desktop_sign_in(set.sim_addr, AGENT, false).await;
    let mut stream = watch(a.addr(), &desktop.guid, None).await;
    let token = sees_exactly(&mut stream, &[&set.hang_up(AGENT)]).await;
    let (second, third) = (set.hang_up(AGENT), set.hang_up(AGENT));
    sees_exactly(&mut stream, &[&second, &third]).await;

    let mut resumed = watch(a.addr(), &desktop.guid, Some(&token)).await;
    match resumed.item().await {
        Item::Gap(gap) => assert_eq!(gap.agent_ids, [AGENT]),
        other => panic!("expected a Gap first, got {other:?}"),
    }
    sees_exactly(&mut resumed, &[&third]).await;
}

/// `series` on each of `replicas`, in order (0 where it has no sample).
async fn each_metric(replicas: &[Replica], series: &str) -> Vec<f64> {
    let mut values = Vec::with_capacity(replicas.len());
    for replica in replicas {
        values.push(replica.metric(series).await.unwrap_or_default());
    }
    values
}

/// (4) A replica that does not poll the agent (the other one holds the agent's shard, so only
/// its poll loop reads the agent's events) delivers them live through its follower, and
/// resumes a token of the other replica from the stream.
#[tokio::test]
async fn a_replica_that_does_not_poll_delivers_the_agents_events_live() {
    let Some(set) = static_sim().start().await else {
        return;
    };
    let replicas = [set.spawn(&[]).await, set.spawn(&[]).await];
    common::eventually("the shards spread over both", common::WAIT, || async {
        let held = each_metric(&replicas, "ccgw_nats_shards_held").await;
        held.iter().sum::<f64>() == 256.0 && held.iter().all(|&n| n > 0.0)
    })
    .await;
    let desktop = desktop_sign_in(set.sim_addr, AGENT, false).await;
    let mut streams = Vec::new();
    for replica in &replicas {
        streams.push(watch(replica.addr(), &desktop.guid, None).await);
    }
    // Which one polls follows from the replicas' ids (the agent's shard's desired owner): it
    // is the one with the poll in flight, once the shards have settled.
    let polls = || each_metric(&replicas, "ccgw_event_polls_in_flight");
    common::eventually("one replica polls the agent", common::WAIT, || async {
        let polls = polls().await;
        polls.iter().sum::<f64>() == 1.0 && set.sim.agent(AGENT).unwrap().polls_in_flight == 1
    })
    .await;
    let poller = polls()
        .await
        .iter()
        .position(|&n| n == 1.0)
        .expect("a poller");
    let follower = 1 - poller;
    let mut followed = streams.remove(follower);
    let mut polled = streams.remove(0);

    let first = set.hang_up(AGENT);
    let token = sees_exactly(&mut polled, &[&first]).await;
    assert_eq!(sees_exactly(&mut followed, &[&first]).await, token);

    let second = set.hang_up(AGENT);
    sees_exactly(&mut polled, &[&second]).await;
    let resumed_at = replicas[follower].addr();
    let mut resumed = watch(resumed_at, &desktop.guid, Some(&token)).await;
    sees_exactly(&mut resumed, &[&second]).await;
    sees_exactly(&mut followed, &[&second]).await;
    // Never two polls of the agent in flight at once.
    assert_eq!(set.sim.agent(AGENT).unwrap().max_polls_in_flight, 1);
}

/// (5) NATS stopped while an event is polled: the append waits for it (the agent is not polled
/// further meanwhile) and the watcher gets the events, in order and once, when NATS is back.
#[tokio::test]
async fn events_polled_while_nats_is_down_are_delivered_once_it_returns() {
    let Some(mut set) = static_sim().start().await else {
        return;
    };
    let a = set.spawn(&[]).await;
    let desktop = desktop_sign_in(set.sim_addr, AGENT, false).await;
    let mut stream = watch(a.addr(), &desktop.guid, None).await;
    sees_exactly(&mut stream, &[&set.hang_up(AGENT)]).await;

    set.nats[0].kill().await;
    let during = set.hang_up(AGENT);
    // Ringing, Talking, Customer_Release, Call_Release, PhoneRelease, Ready: the customer
    // release was dequeued once three are left.
    common::wait_until("the facade polled the customer release", || {
        set.sim.agent(AGENT).expect("agent view").queued_events <= 3
    })
    .await;
    set.nats[0].restart().await;
    sees_exactly(&mut stream, &[&during]).await;
    sees_exactly(&mut stream, &[&set.hang_up(AGENT)]).await;
}

/// (6) The stream replicated on a 3-node JetStream cluster: with the node that leads it killed,
/// events polled afterwards still reach the watcher, in order and once.
#[tokio::test]
async fn events_flow_on_with_one_node_of_three_killed() {
    let Some(mut set) = static_sim().cluster().start().await else {
        return;
    };
    let a = set.spawn(&["--nats-replicas", "3"]).await;
    let desktop = desktop_sign_in(set.sim_addr, AGENT, false).await;
    let mut stream = watch(a.addr(), &desktop.guid, None).await;
    sees_exactly(&mut stream, &[&set.hang_up(AGENT)]).await;
    let leader = stream_leader(set.nats_url()).await;
    set.nats[leader].kill().await;
    sees_exactly(&mut stream, &[&set.hang_up(AGENT)]).await;
    sees_exactly(&mut stream, &[&set.hang_up(AGENT)]).await;
}

/// The index of the cluster node (named `n<index>-<unique>`) that leads the event stream.
async fn stream_leader(urls: &str) -> usize {
    let servers: Vec<&str> = urls.split(',').collect();
    let client = async_nats::connect(servers)
        .await
        .expect("connects to NATS");
    let mut events = async_nats::jetstream::new(client)
        .get_stream("ccgw-events")
        .await
        .expect("the event stream exists");
    let info = events.info().await.expect("stream info");
    let leader = info.cluster.as_ref().and_then(|c| c.leader.clone());
    leader
        .as_deref()
        .and_then(|name| name.strip_prefix('n')?.split('-').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a leader named n<index>: {leader:?}"))
}
