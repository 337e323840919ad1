//! WatchReleaseEvents end to end: simulator and facade on loopback, real tonic clients.
//!
//! Every wait is bounded (`common::WAIT`); nothing asserts on durations. Tests that need
//! seconds to pass (grace period, heartbeat) run on tokio's paused clock, which auto-advances
//! whenever every task is idle (loopback I/O is ready at once, so that is only when everybody
//! waits on a timer).
use crate::common;

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use ccgw_callcontrol::proto::{ReleaseCallRequest, ReleaseConfirmation, ReleaseOutcome};
use ccgw_sim::{Fault, FaultRule, SimConfig};
use common::{
    agent_id, assert_ordered, expect_status, handing_over, hang, hangup_pair, kinds_and_calls,
    release_req, resume_req, sim_config, spawn_app, spawn_app_with, violated_fields, wait_until,
    watch_on, watch_req, Item, OpenStream, ReleaseEvent, ReleaseKind, TestApp,
    WatchReleaseEventsRequest, CALLER,
};
use serde_json::json;
use tonic::Code;

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Asserts everything the contract says about the two events of a customer hang-up.
fn assert_hangup_events(events: &[ReleaseEvent], agent: &str, call_id: &str, caller: &str) {
    assert_eq!(kinds_and_calls(events), hangup_pair(call_id), "{events:?}");
    let (customer, call) = (&events[0], &events[1]);
    assert_eq!(customer.raw_event_type, "AgentEvent_Customer_Release");
    assert_eq!(call.raw_event_type, "AgentEvent_Call_Release");
    assert_eq!(customer.customer_number, caller);
    assert_eq!(
        call.customer_number, "",
        "customer_number on a CALL_RELEASE"
    );
    for e in events {
        assert_eq!(e.agent_id, agent, "{e:?}");
        // The simulator stamps eventGenTime with its clock, the facade its receipt: both now.
        for (name, time) in [
            ("event_time", &e.event_time),
            ("observed_time", &e.observed_time),
        ] {
            let time = time
                .as_ref()
                .unwrap_or_else(|| panic!("{name} unset: {e:?}"));
            assert!(
                (time.seconds - now_secs()).abs() < 600,
                "{name} is not the present: {e:?}"
            );
        }
    }
    assert_ordered(events);
}

fn kinds(kinds: &[ReleaseKind]) -> Vec<i32> {
    kinds.iter().map(|k| *k as i32).collect()
}

/// A stream of agent 101 on a Channel of its own with tiny HTTP/2 receive windows: as long as
/// the test does not read it, flow control stops the server after about a kilobyte.
async fn stalled_watch(app: &TestApp) -> OpenStream {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", app.grpc_addr))
        .unwrap()
        .initial_stream_window_size(1024)
        .initial_connection_window_size(1024)
        .connect()
        .await
        .unwrap();
    let client = ccgw_callcontrol::proto::call_control_client::CallControlClient::new(channel);
    watch_on(client, watch_req(&["101"])).await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. One poll loop per agent
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn five_streams_share_one_poll_loop() {
    let app = spawn_app_with(sim_config(), &["--poll-pause-ms", "10"]).await;
    app.sign_in("101").await;
    let mut watches = Vec::new();
    for _ in 0..5 {
        watches.push(app.watch(watch_req(&["101"])).await);
    }
    // Several long polls (300 ms each) while five streams are open.
    wait_until("four polls of agent 101", || app.polls_of("101") >= 4).await;
    let call_id = app.hang_up("101", CALLER);
    for watch in &mut watches {
        assert_eq!(
            kinds_and_calls(&watch.events_of(2).await),
            hangup_pair(&call_id)
        );
    }
    let view = app.sim.agent("101").unwrap();
    assert_eq!(
        view.max_polls_in_flight, 1,
        "two pollers of one agent steal each other's events"
    );
    assert_eq!(app.polling_agents(), ["101"]);
    assert_eq!(app.api.events().watchers(), 5);
}

/// A poll loop asks the gateway for a new connection every 30 polls (`Connection: close`):
/// hyper's per-connection request channel takes a second block of 32 slots at its 33rd
/// request and keeps it. No connection carries more than 30 of the agent's polls, and the polls
/// in between share one connection.
#[tokio::test]
async fn a_poll_loop_moves_to_a_new_connection_every_thirty_polls() {
    const PER_CONNECTION: usize = 30;
    let sim = SimConfig {
        poll_wait: Duration::from_millis(20),
        ..sim_config()
    };
    let app = spawn_app_with(sim, &["--poll-pause-ms", "10"]).await;
    app.sign_in("101").await;
    let _watch = app.watch(watch_req(&["101"])).await;
    wait_until("95 polls of agent 101", || app.polls_of("101") >= 95).await;
    let mut per_connection: HashMap<SocketAddr, usize> = HashMap::new();
    let polls = app
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.path == "/agentgateway/resource/agentevent/101");
    for poll in polls {
        let connection = poll
            .peer
            .expect("the simulator names each request's connection");
        *per_connection.entry(connection).or_default() += 1;
    }
    let polls: usize = per_connection.values().sum();
    assert!(
        per_connection.values().all(|n| *n <= PER_CONNECTION),
        "{per_connection:?}"
    );
    assert!(
        per_connection.len() <= polls.div_ceil(PER_CONNECTION) + 1,
        "{polls} polls on {} connections",
        per_connection.len()
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Fan-out, fields, order, skipping
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_hang_up_reaches_every_watcher_once_in_order() {
    let app = spawn_app().await;
    app.sign_in("101").await;
    let mut watches = Vec::new();
    for _ in 0..3 {
        watches.push(app.watch(watch_req(&["101"])).await);
    }
    // Ringing, Talking (place_call), a queued Talking, then the hang-up's four events.
    let first = app.sim.place_call("101", CALLER).unwrap();
    app.sim
        .queue_event(
            "101",
            json!({"eventType": "AgentEvent_Talking", "workNo": "101",
                   "content": {"caller": CALLER, "called": "88001", "callid": first,
                               "type": "main", "feature": "0", "mediaAbility": "1"}}),
        )
        .unwrap();
    assert_eq!(app.sim.customer_hangup("101").unwrap(), first);
    // A second call: if anything of the first were delivered twice (or a skipped event
    // delivered), it would show up before these.
    let second = app.hang_up("101", "70094");

    let mut seen = Vec::new();
    for watch in &mut watches {
        let events = watch.events_of(4).await;
        assert_hangup_events(&events[..2], "101", &first, CALLER);
        assert_hangup_events(&events[2..], "101", &second, "70094");
        assert_ordered(&events);
        seen.push(events);
    }
    // One observed event, fanned out: identical in every stream.
    assert_eq!(seen[0], seen[1]);
    assert_eq!(seen[0], seen[2]);

    // 4 release events; skipped: Ringing, Talking, Talking, PhoneRelease, Ready (first call),
    // Ringing, Talking, PhoneRelease, Ready (second call).
    wait_until("every queued event polled", || {
        app.sim.agent("101").unwrap().queued_events == 0
            && app.api.events().stats().skipped_events >= 9
    })
    .await;
    let stats = app.api.events().stats();
    assert_eq!(stats.release_events, 4);
    assert_eq!(stats.skipped_events, 9);
    assert_eq!(stats.malformed_events, 0);
    assert_eq!(stats.dropped_fields, 0);
}

// ---------------------------------------------------------------------------------------------
// 3. Guid rotation
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_rotated_guid_keeps_the_stream_alive_and_is_used_for_releases() {
    // The superseded Guid is refused at once: a loop that ignored Set-GUID would fail.
    let app = spawn_app_with(
        SimConfig {
            // Polls must carry the load balancer's cookie from the sign-in too.
            require_sticky_cookie: true,
            ..common::sim_refusing_rotated_guids()
        },
        &[],
    )
    .await;
    let old = app.sign_in("101").await;
    let mut watch = app.watch(watch_req(&["101"])).await;
    app.sim.rotate_guid("101").unwrap();
    wait_until("the poll loop absorbed the new Guid", || {
        app.guid_of("101").is_some_and(|g| g != old)
    })
    .await;
    let new = app.guid_of("101").unwrap();

    watch.sees_hang_up(&app, "101").await;

    let call_id = app.sim.place_call("101", CALLER).unwrap();
    let answer = app.release(release_req("101")).await.unwrap();
    assert_eq!(answer.outcome(), ReleaseOutcome::Released);
    let delete = app
        .deletes()
        .into_iter()
        .next()
        .expect("the release reached the gateway");
    assert_eq!(delete.guid.as_deref(), Some(new.as_str()));
    // A release by the agent: the gateway sends Call_Release first.
    assert_eq!(
        kinds_and_calls(&watch.events_of(2).await),
        [
            (ReleaseKind::CallRelease, call_id.clone()),
            (ReleaseKind::CustomerRelease, call_id)
        ]
    );
    // Every poll after the rotation presented the new Guid... apart from the ones sent before
    // the rotating answer came back, which carried the old one.
    let polls = app.event_polls();
    let first_new = polls
        .iter()
        .position(|r| r.guid.as_deref() == Some(new.as_str()))
        .expect("a poll with the new Guid");
    assert!(
        polls[first_new..]
            .iter()
            .all(|r| r.guid.as_deref() == Some(new.as_str())),
        "the old Guid was used again after the new one"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Sessions ending
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_signed_out_agent_ends_its_single_agent_stream() {
    let app = spawn_app().await;
    let mut watch = app.signed_in_watch("101").await;
    // An event first, so the facade has something of 101 to keep for resuming watchers.
    let call_id = app.hang_up("101", CALLER);
    assert_hangup_events(&watch.events_of(2).await, "101", &call_id, CALLER);
    app.sim.force_signout("101").unwrap();
    let (events, status) = watch.until_error().await;
    assert!(events.is_empty(), "{events:?}");
    let details = expect_status(&status, Code::FailedPrecondition, "AGENT_NOT_SIGNED_IN");
    let metadata = &details.error_info().unwrap().metadata;
    assert_eq!(metadata["agent_id"], "101");
    assert_eq!(metadata["retcode"], "100-006");
    wait_until("the loop of 101 stopped", || {
        app.polling_agents().is_empty()
    })
    .await;

    // Signed in again, the agent can be watched again.
    let mut watch = app.signed_in_watch("101").await;
    let call_id = app.hang_up("101", CALLER);
    assert_hangup_events(&watch.events_of(2).await, "101", &call_id, CALLER);
}

#[tokio::test]
async fn in_a_two_agent_stream_a_signed_out_agent_leaves_and_the_other_goes_on() {
    let app = spawn_app().await;
    app.sign_in("101").await;
    app.sign_in("102").await;
    let mut watch = app.watch(watch_req(&["101", "102"])).await;
    wait_until("both agents polled", || {
        app.polls_of("101") >= 1 && app.polls_of("102") >= 1
    })
    .await;

    app.sim.force_signout("102").unwrap();
    match watch.item().await {
        Item::SessionEnded(ended) => {
            assert_eq!(ended.agent_id, "102");
            assert_eq!(ended.reason, "AGENT_NOT_SIGNED_IN");
            assert_eq!(ended.retcode, "100-006");
        }
        other => panic!("expected session_ended of 102, got {other:?}"),
    }
    wait_until("only 101 is polled", || app.polling_agents() == ["101"]).await;

    let call_id = app.hang_up("101", CALLER);
    let events = watch.events_of(2).await;
    assert_hangup_events(&events, "101", &call_id, CALLER);

    // Now 101 is the only agent left: its session ending ends the stream.
    app.sim.force_signout("101").unwrap();
    let (events, status) = watch.until_error().await;
    assert!(events.is_empty(), "{events:?}");
    let details = expect_status(&status, Code::FailedPrecondition, "AGENT_NOT_SIGNED_IN");
    assert_eq!(details.error_info().unwrap().metadata["agent_id"], "101");
}

// ---------------------------------------------------------------------------------------------
// 5. and 6. Resuming
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn resuming_replays_exactly_the_missed_events_then_goes_live() {
    let app = spawn_app().await;
    let mut watch = app.signed_in_watch("101").await;
    let call1 = app.hang_up("101", CALLER);
    let first = watch.event().await;
    assert_eq!(
        (first.kind(), first.call_id.as_str()),
        (ReleaseKind::CustomerRelease, call1.as_str())
    );
    drop(watch);

    // Nobody watches; within the grace period the loop keeps polling.
    let call2 = app.hang_up("101", CALLER);
    let call3 = app.hang_up("101", CALLER);
    app.until_observed("101", 6).await;

    let mut resumed = app.watch(resume_req(&["101"], &first.resume_token)).await;
    let replayed = resumed.events_of(5).await;
    let mut expected = vec![(ReleaseKind::CallRelease, call1)];
    expected.extend(hangup_pair(&call2));
    expected.extend(hangup_pair(&call3));
    assert_eq!(kinds_and_calls(&replayed), expected);
    assert!(replayed[0].sequence > first.sequence);

    let call4 = app.hang_up("101", CALLER);
    let live = resumed.events_of(2).await;
    assert_eq!(kinds_and_calls(&live), hangup_pair(&call4));
    let all: Vec<_> = replayed.into_iter().chain(live).collect();
    assert_ordered(&all);
}

#[tokio::test]
async fn a_two_agent_stream_resumes_both_agents_in_sequence_order() {
    let app = spawn_app().await;
    app.sign_in("101").await;
    app.sign_in("102").await;
    let mut watch = app.watch(watch_req(&["101", "102"])).await;
    let first = app.hang_up("101", CALLER);
    let read = watch.events_of(2).await;
    assert_eq!(kinds_and_calls(&read), hangup_pair(&first));
    drop(watch);

    // Interleaved hang-ups of both agents while nobody watches.
    let a = app.hang_up("102", "70001");
    app.until_observed("102", 4).await;
    let b = app.hang_up("101", "70002");
    app.until_observed("101", 6).await;
    let c = app.hang_up("102", "70003");
    app.until_observed("102", 8).await;

    let mut resumed = app
        .watch(resume_req(&["101", "102"], &read[1].resume_token))
        .await;
    let replayed = resumed.events_of(6).await;
    let expected: Vec<_> = [&a, &b, &c]
        .into_iter()
        .flat_map(|c| hangup_pair(c))
        .collect();
    assert_eq!(kinds_and_calls(&replayed), expected);
    let agents: Vec<_> = replayed.iter().map(|e| e.agent_id.as_str()).collect();
    assert_eq!(agents, ["102", "102", "101", "101", "102", "102"]);
    assert_ordered(&replayed);
    resumed.sees_hang_up(&app, "101").await;
}

#[tokio::test]
async fn a_token_whose_successors_left_the_ring_starts_with_a_gap() {
    let app = spawn_app_with(sim_config(), &["--replay-events", "2"]).await;
    let mut watch = app.signed_in_watch("101").await;
    let call1 = app.hang_up("101", CALLER);
    let read = watch.events_of(2).await;
    assert_eq!(kinds_and_calls(&read), hangup_pair(&call1));
    drop(watch);

    // Six release events while nobody watches; the ring keeps the last two.
    app.hang_up("101", CALLER);
    app.hang_up("101", CALLER);
    let call4 = app.hang_up("101", CALLER);
    app.until_observed("101", 8).await;

    let mut resumed = app.watch(resume_req(&["101"], &read[1].resume_token)).await;
    match resumed.item().await {
        Item::Gap(gap) => {
            assert_eq!(gap.agent_ids, ["101"]);
            assert!(!gap.reason.is_empty());
        }
        other => panic!("expected a Gap first, got {other:?}"),
    }
    let call5 = app.hang_up("101", CALLER);
    // After the Gap, what the ring still holds (call 4) is replayed, then the stream continues
    // live: nothing older, nothing twice.
    let events = resumed.events_of(4).await;
    let mut expected = hangup_pair(&call4);
    expected.extend(hangup_pair(&call5));
    assert_eq!(kinds_and_calls(&events), expected);
}

#[tokio::test(start_paused = true)]
async fn a_token_whose_successors_aged_out_starts_with_a_gap_and_a_current_one_does_not() {
    let app = spawn_app_with(sim_config(), &["--replay-age-secs", "1"]).await;
    let mut watch = app.signed_in_watch("101").await;
    let call1 = app.hang_up("101", CALLER);
    let read = watch.events_of(2).await;
    assert_eq!(kinds_and_calls(&read), hangup_pair(&call1));
    drop(watch);

    app.hang_up("101", CALLER);
    app.until_observed("101", 4).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut resumed = app.watch(resume_req(&["101"], &read[1].resume_token)).await;
    match resumed.item().await {
        Item::Gap(gap) => assert_eq!(gap.agent_ids, ["101"]),
        other => panic!("expected a Gap first, got {other:?}"),
    }
    let call3 = app.hang_up("101", CALLER);
    let live = resumed.events_of(2).await;
    assert_eq!(kinds_and_calls(&live), hangup_pair(&call3));
    drop(resumed);

    // Nothing came after this token: however old, it misses nothing, so no Gap.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut current = app.watch(resume_req(&["101"], &live[1].resume_token)).await;
    current.sees_hang_up(&app, "101").await;
}

#[tokio::test]
async fn a_token_of_another_facade_starts_with_a_gap() {
    let other = spawn_app().await;
    other.sign_in("101").await;
    let mut watch = other.watch(watch_req(&["101"])).await;
    other.hang_up("101", CALLER);
    let foreign = watch.event().await.resume_token;

    let app = spawn_app().await;
    app.sign_in("101").await;
    let mut resumed = app.watch(resume_req(&["101"], &foreign)).await;
    match resumed.item().await {
        Item::Gap(gap) => {
            assert_eq!(gap.agent_ids, ["101"]);
            assert!(!gap.reason.is_empty());
        }
        other => panic!("expected a Gap first, got {other:?}"),
    }
    resumed.sees_hang_up(&app, "101").await;
}

#[tokio::test]
async fn a_garbage_token_is_an_invalid_argument() {
    let app = spawn_app().await;
    app.sign_in("101").await;
    let status = app.watch_refused(resume_req(&["101"], "xyz")).await;
    expect_status(&status, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert_eq!(violated_fields(&status), ["resume_token"]);
    assert!(app.event_polls().is_empty(), "a refused stream polled");
}

// ---------------------------------------------------------------------------------------------
// 7. Slow consumer
// ---------------------------------------------------------------------------------------------

/// `calls` customer hang-ups of agent 101, which `fast` must read completely and in order;
/// returns their events.
async fn hang_ups_read_by(app: &TestApp, fast: &mut OpenStream, calls: usize) -> Vec<ReleaseEvent> {
    let calls: Vec<String> = (0..calls).map(|_| app.hang_up("101", CALLER)).collect();
    let expected: Vec<_> = calls.iter().flat_map(|c| hangup_pair(c)).collect();
    let all = fast.events_of(expected.len()).await;
    assert_eq!(
        kinds_and_calls(&all),
        expected,
        "the fast reader missed events"
    );
    assert_ordered(&all);
    all
}

/// A stream of agent 101 that was cut off while its client did not read, read at last: what
/// the server had queued for it (a prefix of `all`, the events it was sent, short of their
/// end), then WATCHER_TOO_SLOW, whose token resumes with exactly the rest: no gap, no repeat.
async fn assert_cut_off_then_resumes(
    app: &TestApp,
    stalled: &mut OpenStream,
    all: &[ReleaseEvent],
) {
    let (buffered, status) = stalled.until_error().await;
    let details = expect_status(&status, Code::ResourceExhausted, "WATCHER_TOO_SLOW");
    let token = details.error_info().unwrap().metadata["resume_token"].clone();
    assert!(!token.is_empty());
    let got = buffered.len();
    assert!(got < all.len(), "never cut off");
    assert_eq!(
        buffered,
        all[..got],
        "the stalled reader's events are not a prefix"
    );

    let mut resumed = app.watch(resume_req(&["101"], &token)).await;
    let rest = resumed.events_of(all.len() - got).await;
    assert_eq!(kinds_and_calls(&rest), kinds_and_calls(&all[got..]));
    resumed.sees_hang_up(app, "101").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_is_cut_off_while_a_fast_one_gets_everything() {
    let app = spawn_app_with(
        sim_config(),
        &["--watch-buffer-events", "16", "--replay-events", "4096"],
    )
    .await;
    app.sign_in("101").await;
    let mut fast = app.watch(watch_req(&["101"])).await;
    let mut stalled = stalled_watch(&app).await;
    let all = hang_ups_read_by(&app, &mut fast, 400).await;
    assert_cut_off_then_resumes(&app, &mut stalled, &all).await;
}

/// A stream that stops reading is cut off in bounded time. Before, a
/// client that never read (its HTTP/2 windows full, its keepalive answered) kept its watcher,
/// permit and feed membership included, as long as its connection lived, and with every
/// `--max-watchers` permit held that way, wait_for_release_event was refused for everybody.
/// Now a release waits for its event while every stream permit is taken, and once the stalled
/// stream could not send for `--stream-send-timeout-secs` its permit is back and agent 101's
/// feed no longer holds it; its client, reading at last, gets what was queued, then
/// WATCHER_TOO_SLOW whose token resumes exactly. `--watch-buffer-events` stays far above the
/// events sent, so falling that far behind cannot be what cuts it off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_stops_reading_is_cut_off_and_frees_its_permit_in_bounded_time() {
    let app = spawn_app_with(
        sim_config(),
        &["--max-watchers", "2", "--stream-send-timeout-secs", "1"],
    )
    .await;
    let events = app.api.events();
    app.sign_in("101").await;
    let mut fast = app.watch(watch_req(&["101"])).await;
    let mut stalled = stalled_watch(&app).await;
    let status = app.watch_refused(watch_req(&["101"])).await;
    expect_status(&status, Code::ResourceExhausted, "TOO_MANY_WATCHERS");

    let call_id = app.sim.place_call("101", CALLER).unwrap();
    let answer = app
        .release(ReleaseCallRequest {
            wait_for_release_event: true,
            ..release_req("101")
        })
        .await
        .expect("a release waits for its event while every stream permit is taken");
    assert_eq!(
        answer.release_event.expect("release_event set").call_id,
        call_id
    );
    assert_eq!(events.release_waiters(), 0);
    // Two events cannot fill the stalled stream's windows: it still holds its permit.
    assert_eq!(events.watchers(), 2);

    let mut all = fast.events_of(2).await;
    // About 30 events fill its windows and queue; a stream falls behind only past 1024.
    all.extend(hang_ups_read_by(&app, &mut fast, 100).await);
    wait_until("the stalled stream's watcher is freed", || {
        events.watchers() == 1 && events.watchers_of(agent_id("101")) == 1
    })
    .await;
    assert_cut_off_then_resumes(&app, &mut stalled, &all).await;
}

// ---------------------------------------------------------------------------------------------
// 8. Cancellation and the grace period
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_dropped_stream_frees_its_watcher_and_polling_stops_after_the_grace_period() {
    let app = spawn_app_with(sim_config(), &["--watch-grace-secs", "2"]).await;
    let mut watch = app.signed_in_watch("101").await;
    watch.sees_hang_up(&app, "101").await;
    assert_eq!(app.api.events().watchers(), 1);
    assert_eq!(app.polling_agents(), ["101"]);

    drop(watch);
    wait_until("the watcher is gone", || app.api.events().watchers() == 0).await;
    wait_until("polling of 101 stopped", || {
        app.polling_agents().is_empty() && app.sim.agent("101").unwrap().polls_in_flight == 0
    })
    .await;
    let polls = app.polls_of("101");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(app.polls_of("101"), polls, "polled after the grace period");

    // A new watcher starts a new loop.
    let mut watch = app.watch(watch_req(&["101"])).await;
    watch.sees_hang_up(&app, "101").await;
}

// ---------------------------------------------------------------------------------------------
// 9. Heartbeats
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn an_idle_stream_gets_heartbeats_whose_token_resumes_exactly() {
    let app = spawn_app_with(sim_config(), &["--heartbeat-secs", "1"]).await;
    let mut watch = app.signed_in_watch("101").await;
    watch.sees_hang_up(&app, "101").await;
    let token = match watch.item().await {
        Item::Heartbeat(heartbeat) => heartbeat.resume_token,
        other => panic!("expected a heartbeat on an idle stream, got {other:?}"),
    };
    assert!(!token.is_empty());
    drop(watch);

    let call1 = app.hang_up("101", CALLER);
    app.until_observed("101", 4).await;
    let mut resumed = app.watch(resume_req(&["101"], &token)).await;
    let events = resumed.events_of(2).await;
    assert_eq!(kinds_and_calls(&events), hangup_pair(&call1));
    // Nothing more to replay: the next thing is a heartbeat, not a repeat.
    match resumed.item().await {
        Item::Heartbeat(heartbeat) => assert!(!heartbeat.resume_token.is_empty()),
        other => panic!("expected a heartbeat after the replay, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// 10. Kinds filter
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_kinds_filter_delivers_only_those_kinds() {
    let app = spawn_app().await;
    app.sign_in("101").await;
    let mut watch = app
        .watch(WatchReleaseEventsRequest {
            kinds: kinds(&[ReleaseKind::CustomerRelease]),
            ..watch_req(&["101"])
        })
        .await;
    let call1 = app.hang_up("101", CALLER);
    let call2 = app.hang_up("101", CALLER);
    let events = watch.events_of(2).await;
    assert_eq!(
        kinds_and_calls(&events),
        [
            (ReleaseKind::CustomerRelease, call1),
            (ReleaseKind::CustomerRelease, call2)
        ]
    );
    assert_ordered(&events);
}

// ---------------------------------------------------------------------------------------------
// 11. Validation and limits
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn bad_requests_are_refused_before_anything_is_polled() {
    let app = spawn_app_with(sim_config(), &["--max-watch-agents", "3"]).await;
    for agent in ["101", "102", "103", "104"] {
        app.sign_in(agent).await;
    }
    let cases: &[(WatchReleaseEventsRequest, &str)] = &[
        (watch_req(&[]), "agent_ids"),
        (watch_req(&["42"]), "agent_ids"),
        (watch_req(&["abc"]), "agent_ids"),
        (watch_req(&["101", "101"]), "agent_ids"),
        (watch_req(&["101", "102", "103", "104"]), "agent_ids"),
        (
            WatchReleaseEventsRequest {
                kinds: vec![0],
                ..watch_req(&["101"])
            },
            "kinds",
        ),
        (
            WatchReleaseEventsRequest {
                kinds: vec![ReleaseKind::CallRelease as i32, 99],
                ..watch_req(&["101"])
            },
            "kinds",
        ),
    ];
    for (request, field) in cases {
        let status = app.watch_refused(request.clone()).await;
        expect_status(&status, Code::InvalidArgument, "INVALID_ARGUMENT");
        let fields = violated_fields(&status);
        assert!(
            !fields.is_empty()
                && fields
                    .iter()
                    .all(|f| f == field || f.starts_with(&format!("{field}["))),
            "{request:?}: {fields:?}"
        );
    }

    // A handed-over session is for single-agent streams only.
    let mut two = tonic::Request::new(watch_req(&["101", "102"]));
    two.metadata_mut()
        .insert("x-ccgw-guid", app.guid_of("101").unwrap().parse().unwrap());
    let status = app.watch_refused(two).await;
    expect_status(&status, Code::InvalidArgument, "INVALID_ARGUMENT");

    // An agent without a session (alone, or next to one with a session).
    for agents in [&["555"][..], &["101", "555"][..]] {
        let status = app.watch_refused(watch_req(agents)).await;
        let details = expect_status(&status, Code::FailedPrecondition, "NO_SESSION");
        // Which agent lacks a session: `agent_id`, or `agent_ids` for a stream's list.
        let metadata = &details.error_info().unwrap().metadata;
        let named = metadata
            .get("agent_id")
            .or_else(|| metadata.get("agent_ids"))
            .unwrap_or_else(|| panic!("no agent in the ErrorInfo: {status:?}"));
        assert_eq!(named.split(',').map(str::trim).collect::<Vec<_>>(), ["555"]);
    }

    assert!(app.event_polls().is_empty(), "a refused stream polled");
    assert!(app.polling_agents().is_empty());
    assert_eq!(app.api.events().watchers(), 0);

    // The limit is "more than": exactly --max-watch-agents is fine.
    let mut watch = app.watch(watch_req(&["101", "102", "103"])).await;
    watch.sees_hang_up(&app, "103").await;
}

/// What a status costs a client's metadata limit, as it came over the wire: its trailer fields
/// (`grpc-status`, `grpc-message`, `grpc-status-details-bin`), each counted as HTTP/2 does.
fn trailer_bytes(status: &tonic::Status) -> usize {
    let mut trailers = tonic::codegen::http::HeaderMap::new();
    status.add_header(&mut trailers).unwrap();
    trailers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum()
}

/// A 15 KB request of 15,000 invalid kinds once got one violation per kind: ~2 MB of trailers,
/// far over the 8 KiB of metadata grpc-go, grpc-java and grpcio accept. It now gets one
/// violation, refused before any kind is looked at; 5,000 bad agent ids (as many as a request
/// within the facade's 16 KiB message limit holds) get ten violations and a count of the rest.
/// Both fit in 8 KiB.
#[tokio::test]
async fn huge_bad_requests_get_small_statuses() {
    let app = spawn_app_with(sim_config(), &["--max-watch-agents", "10000"]).await;
    app.sign_in("101").await;
    let kinds = WatchReleaseEventsRequest {
        kinds: vec![7; 15_000],
        ..watch_req(&["101"])
    };
    let status = app.watch_refused(kinds).await;
    expect_status(&status, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert_eq!(violated_fields(&status), ["kinds"]);
    assert!(
        status.message().contains("holds 15000 kinds; at most 2"),
        "{}",
        status.message()
    );
    assert!(trailer_bytes(&status) < 1024, "{}", trailer_bytes(&status));

    let agents = WatchReleaseEventsRequest {
        agent_ids: vec!["x".to_owned(); 5_000],
        ..Default::default()
    };
    let status = app.watch_refused(agents).await;
    let details = expect_status(&status, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert_eq!(violated_fields(&status), ["agent_ids"; 10]);
    assert_eq!(
        details.error_info().unwrap().metadata["unlisted_violations"],
        "4990"
    );
    assert!(
        status.message().ends_with("; and 4990 more"),
        "{}",
        status.message()
    );
    assert!(
        trailer_bytes(&status) < 8 * 1024,
        "{}",
        trailer_bytes(&status)
    );
    assert!(app.event_polls().is_empty(), "a refused stream polled");
}

/// Streams and releases waiting for their event have limits of their own: each is refused at
/// its own limit (a release before anything is sent) while the other still gets in.
#[tokio::test]
async fn streams_and_waiting_releases_are_refused_beyond_limits_of_their_own() {
    let app = spawn_app_with(
        sim_config(),
        &[
            "--max-watchers",
            "2",
            "--max-release-waiters",
            "1",
            // Not the caller's share: the process's limit is what this is about.
            "--max-release-waiters-per-caller",
            "2",
            // The release that holds the waiters' permit waits until the test cancels it.
            "--request-timeout-ms",
            "600000",
        ],
    )
    .await;
    let events = app.api.events();
    app.sign_in("101").await;
    app.sign_in("102").await;
    let first = app.watch(watch_req(&["101"])).await;
    let _second = app.watch(watch_req(&["101"])).await;
    let status = app.watch_refused(watch_req(&["101"])).await;
    // The reason is the failure table's (docs/api.md).
    expect_status(&status, Code::ResourceExhausted, "TOO_MANY_WATCHERS");
    assert_eq!(events.watchers(), 2);

    // A release of 102 waits for an event that never comes: its polls hang.
    app.sim.push_fault(FaultRule {
        path_contains: Some("/agentevent/102".into()),
        ..poll_fault(Fault::Latency { ms: 600_000 }, 1_000)
    });
    app.sim.place_call("102", CALLER).unwrap();
    let mut request = tonic::Request::new(ReleaseCallRequest {
        wait_for_release_event: true,
        ..release_req("102")
    });
    request.set_timeout(Duration::from_secs(600));
    let mut client = app.client.clone();
    let waiting = tokio::spawn(async move { client.release_call(request).await });
    wait_until("the release of 102 waits for its event", || {
        events.release_waiters() == 1
    })
    .await;

    // The next one is refused before its release.
    let call_id = app.sim.place_call("101", CALLER).unwrap();
    let status = app
        .release(ReleaseCallRequest {
            wait_for_release_event: true,
            ..release_req("101")
        })
        .await
        .unwrap_err();
    expect_status(&status, Code::ResourceExhausted, "TOO_MANY_WATCHERS");
    assert_eq!(app.sim.agent("101").unwrap().call_id, Some(call_id.clone()));
    assert!(app
        .upstream()
        .iter()
        .all(|r| !(r.method == "DELETE" && r.path.contains("/101"))));
    app.sim.customer_hangup("101").unwrap();
    app.until_observed("101", 2).await;

    // A stream gets in as soon as a stream leaves, the waiters' pool full or not.
    drop(first);
    wait_until("the first watcher is gone", || events.watchers() == 1).await;
    let mut third = app.watch(watch_req(&["101"])).await;
    third.sees_hang_up(&app, "101").await;
    assert_eq!(events.release_waiters(), 1);

    // A release whose caller gave up waiting frees its permit.
    waiting.abort();
    wait_until("the cancelled release's waiter is gone", || {
        events.release_waiters() == 0
    })
    .await;
}

/// A refusal by --max-polled-agents: the table's reason, RetryInfo (watching changed nothing),
/// the agents that would need a poll loop, and a message naming the flag and how many are
/// polled.
fn assert_polled_agents_refused(status: &tonic::Status, polled: usize, agents: &str) {
    let details = expect_status(status, Code::ResourceExhausted, "TOO_MANY_POLLED_AGENTS");
    assert!(details.retry_info().is_some(), "no RetryInfo: {status:?}");
    assert_eq!(
        details.error_info().unwrap().metadata["agent_ids"],
        agents,
        "{status:?}"
    );
    let message = status.message();
    assert!(
        message.contains("--max-polled-agents")
            && message.contains(&format!("already polls {polled} agents")),
        "{message}"
    );
}

/// --max-polled-agents: every polled agent holds a connection to the gateway. At the limit a
/// stream for an agent nobody polls is refused before anything reaches the gateway (and so is
/// a release that would wait for that agent's event), streams of polled agents still open, and
/// the places come back once the first agents' watchers left and their grace period is over.
#[tokio::test(start_paused = true)]
async fn a_stream_needing_a_poll_loop_beyond_max_polled_agents_is_refused_until_one_frees_up() {
    let app = spawn_app_with(
        sim_config(),
        &["--max-polled-agents", "2", "--watch-grace-secs", "5"],
    )
    .await;
    let events = app.api.events();
    for agent in ["101", "102", "103"] {
        app.sign_in(agent).await;
    }
    let mut first = app.watch(watch_req(&["101"])).await;
    let second = app.watch(watch_req(&["102"])).await;
    assert_eq!(events.polled_agents_in_use(), 2);

    let status = app.watch_refused(watch_req(&["103"])).await;
    assert_polled_agents_refused(&status, 2, "103");
    let status = app
        .release(ReleaseCallRequest {
            wait_for_release_event: true,
            ..release_req("103")
        })
        .await
        .unwrap_err();
    assert_polled_agents_refused(&status, 2, "103");
    assert_eq!(app.polls_of("103"), 0);
    assert!(
        app.upstream().iter().all(|r| !r.path.contains("/103")),
        "{:?}",
        app.upstream()
    );
    assert_eq!((events.watchers(), events.polled_agents_in_use()), (2, 2));

    // An agent already polled still gets streams, and they all see its events.
    let mut again = app.watch(watch_req(&["101"])).await;
    let call_id = app.hang_up("101", CALLER);
    for watch in [&mut first, &mut again] {
        assert_eq!(
            kinds_and_calls(&watch.events_of(2).await),
            hangup_pair(&call_id)
        );
    }

    // The watchers of 101 and 102 leave: within the grace period both are still polled.
    drop((first, second, again));
    wait_until("the watchers are gone", || events.watchers() == 0).await;
    let status = app.watch_refused(watch_req(&["103"])).await;
    assert_polled_agents_refused(&status, 2, "103");
    assert_eq!(app.polls_of("103"), 0);

    // After it their places are free (101's feed, kept for replay, holds none).
    wait_until("101 and 102 are not polled any more", || {
        events.polled_agents_in_use() == 0
    })
    .await;
    let mut third = app.watch(watch_req(&["103"])).await;
    third.sees_hang_up(&app, "103").await;
    assert_eq!(events.polled_agents_in_use(), 1);
}

/// A stream of several agents takes places for all its new agents or for none.
#[tokio::test]
async fn a_stream_needing_more_new_poll_loops_than_are_left_takes_none() {
    let app = spawn_app_with(sim_config(), &["--max-polled-agents", "3"]).await;
    let events = app.api.events();
    for agent in ["101", "102", "103", "104"] {
        app.sign_in(agent).await;
    }
    let _first = app.watch(watch_req(&["101", "102"])).await;
    assert_eq!(events.polled_agents_in_use(), 2);

    // 101 is polled; 103 and 104 would need two places, one is left.
    let status = app.watch_refused(watch_req(&["101", "103", "104"])).await;
    assert_polled_agents_refused(&status, 2, "103,104");
    assert_eq!(events.polled_agents_in_use(), 2);
    assert_eq!((app.polls_of("103"), app.polls_of("104")), (0, 0));

    // The place left is still there: 103 takes it, and then 104 finds none.
    let mut third = app.watch(watch_req(&["101", "103"])).await;
    third.sees_hang_up(&app, "103").await;
    assert_eq!(events.polled_agents_in_use(), 3);
    let status = app.watch_refused(watch_req(&["104"])).await;
    assert_polled_agents_refused(&status, 3, "104");
    assert_eq!(app.polls_of("104"), 0);
}

/// The limit is exact: streams for distinct new agents arriving at once get exactly as many
/// places as there are, whatever their interleaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_streams_never_poll_more_agents_than_max_polled_agents() {
    const AGENTS: [&str; 8] = ["101", "102", "103", "104", "105", "106", "107", "108"];
    let app = spawn_app_with(sim_config(), &["--max-polled-agents", "3"]).await;
    for agent in AGENTS {
        app.sign_in(agent).await;
    }
    let attempts = AGENTS.map(|agent| {
        let client = app.client.clone();
        tokio::spawn(async move { watch_on(client, watch_req(&[agent])).await })
    });
    let mut open = Vec::new();
    let mut refused = 0;
    for attempt in attempts {
        match attempt.await.unwrap() {
            Ok(watch) => open.push(watch),
            Err(status) => {
                expect_status(&status, Code::ResourceExhausted, "TOO_MANY_POLLED_AGENTS");
                refused += 1;
            }
        }
    }
    assert_eq!((open.len(), refused), (3, 5));
    let events = app.api.events();
    assert_eq!((events.polled_agents_in_use(), events.watchers()), (3, 3));
    assert_eq!(app.polling_agents().len(), 3);
    let polled: std::collections::HashSet<String> =
        app.event_polls().into_iter().map(|r| r.path).collect();
    assert!(polled.len() <= 3, "{polled:?}");
}

#[tokio::test]
async fn a_session_handed_over_in_metadata_opens_a_single_agent_stream() {
    let app = spawn_app().await;
    // An agent desktop signs in by itself; the facade learns the session from the watcher.
    let guid = app.desktop_sign_in("103", false).await.guid;
    assert!(app.guid_of("103").is_none());
    let request = handing_over(watch_req(&["103"]), &guid);
    let mut watch = app.watch(request).await;
    let call_id = app.hang_up("103", CALLER);
    assert_hangup_events(&watch.events_of(2).await, "103", &call_id, CALLER);
    assert_eq!(app.guid_of("103").as_deref(), Some(guid.as_str()));
}

/// A caller still holding a Guid the gateway no longer accepts neither
/// displaces the agent's session nor fails: the session the facade holds goes first.
#[tokio::test]
async fn an_outdated_guid_handed_over_never_displaces_the_agents_session() {
    let app = spawn_app().await;
    let mut watch = app.signed_in_watch("101").await;
    let learned = app.guid_of("101").unwrap();
    let call_id = app.sim.place_call("101", CALLER).unwrap();

    let mut request = tonic::Request::new(release_req("101"));
    request.metadata_mut().insert(
        "x-ccgw-guid",
        "279fe21d-0000-4437-84c3-ab9e9dae20f5.AgentGateway0"
            .parse()
            .unwrap(),
    );
    let released = app.release_with(request).await.unwrap();
    assert_eq!(released.outcome(), ReleaseOutcome::Released);
    let deletes: Vec<_> = app.deletes();
    assert_eq!(deletes.len(), 1, "the outdated Guid was tried too");
    assert_eq!(deletes[0].guid.as_deref(), Some(learned.as_str()));
    assert_eq!(app.guid_of("101").as_deref(), Some(learned.as_str()));
    let events = watch.events_of(2).await;
    assert_eq!(
        kinds_and_calls(&events),
        [
            (ReleaseKind::CallRelease, call_id.clone()),
            (ReleaseKind::CustomerRelease, call_id)
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// 12. Shutdown
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_open_stream_ends_unavailable_when_the_facade_shuts_down() {
    let app = spawn_app().await;
    let mut watch = app.signed_in_watch("101").await;
    watch.sees_hang_up(&app, "101").await;

    let shutdown = tokio::spawn(app.shutdown());
    let (events, status) = watch.until_error().await;
    assert!(events.is_empty(), "{events:?}");
    let details = expect_status(&status, Code::Unavailable, "SHUTTING_DOWN");
    assert!(!details.error_info().unwrap().metadata["resume_token"].is_empty());
    tokio::time::timeout(common::WAIT, shutdown)
        .await
        .expect("shutdown finished")
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// 13. ReleaseCall.wait_for_release_event
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn release_can_wait_for_its_release_event() {
    let app = spawn_app().await;
    app.sign_in("101").await;
    // Nobody watches agent 101: the facade must observe the event on its own.
    let call_id = app.sim.place_call("101", CALLER).unwrap();
    let answer = app
        .release(ReleaseCallRequest {
            wait_for_release_event: true,
            ..release_req("101")
        })
        .await
        .unwrap();
    assert_eq!(answer.outcome(), ReleaseOutcome::Released);
    assert_eq!(answer.confirmation(), ReleaseConfirmation::Confirmed);
    let event = answer.release_event.expect("release_event set");
    assert_eq!(event.kind(), ReleaseKind::CallRelease);
    assert_eq!(event.call_id, call_id);
    assert_eq!(event.agent_id, "101");
    assert_eq!(event.raw_event_type, "AgentEvent_Call_Release");
    assert!(!event.resume_token.is_empty());

    // With call_id: the event of that call.
    let call_id = app.sim.place_call("101", CALLER).unwrap();
    let answer = app
        .release(ReleaseCallRequest {
            wait_for_release_event: true,
            call_id: call_id.clone(),
            ..release_req("101")
        })
        .await
        .unwrap();
    assert_eq!(answer.outcome(), ReleaseOutcome::Released);
    assert_eq!(
        answer.release_event.expect("release_event set").call_id,
        call_id
    );

    // No call: nothing to wait for.
    let answer = app
        .release(ReleaseCallRequest {
            wait_for_release_event: true,
            ..release_req("101")
        })
        .await
        .unwrap();
    assert_eq!(answer.outcome(), ReleaseOutcome::NoActiveCall);
    assert!(answer.release_event.is_none());
    assert_eq!(answer.confirmation(), ReleaseConfirmation::Unspecified);
}

#[tokio::test]
async fn a_repeated_request_id_is_replayed_without_waiting_or_polling() {
    let app = spawn_app().await;
    app.sign_in("102").await;
    app.sim.place_call("102", CALLER).unwrap();
    let first = ReleaseCallRequest {
        request_id: "9b2d6c1e-release-102".into(),
        ..release_req("102")
    };
    let answer = app.release(first.clone()).await.unwrap();
    assert_eq!(answer.outcome(), ReleaseOutcome::Released);
    let repeated = app
        .release(ReleaseCallRequest {
            wait_for_release_event: true,
            ..first
        })
        .await;
    // The fingerprint excludes the wait: same release, answered from the cache.
    let repeated = repeated.unwrap();
    assert!(repeated.replayed && repeated.release_event.is_none());
    assert!(
        app.polling_agents().is_empty(),
        "a replayed answer started polling the agent"
    );
}

/// A release that happened is a success even when its event never comes;
/// the answer says why the event is missing. The deadline is the facade's own
/// (--request-timeout-ms), far inside the client's, so tonic's CANCELLED cannot race it.
#[tokio::test]
async fn a_release_event_that_never_comes_is_released_not_observed() {
    let app = spawn_app_with(sim_config(), &["--request-timeout-ms", "2000"]).await;
    app.sign_in("101").await;
    app.sim.place_call("101", CALLER).unwrap();
    app.sim.push_fault(hang("/agentevent/"));
    let answer = app
        .release(ReleaseCallRequest {
            wait_for_release_event: true,
            ..release_req("101")
        })
        .await
        .unwrap();
    assert_eq!(answer.outcome(), ReleaseOutcome::Released);
    assert_eq!(answer.confirmation(), ReleaseConfirmation::NotObserved);
    assert!(answer.release_event.is_none());
    assert_eq!(app.sim.agent("101").unwrap().call_id, None);
    assert_eq!(app.deletes().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// 14. Malformed events
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_events_are_counted_and_the_stream_goes_on() {
    let app = spawn_app().await;
    let mut watch = app.signed_in_watch("101").await;
    app.sim
        .queue_event(
            "101",
            json!({"eventType": "AgentEvent_Call_Release", "workNo": "101",
                   "content": {"not": "a string"}}),
        )
        .unwrap();
    app.sim.queue_event("101", json!([1, 2])).unwrap();
    let call_id = app.hang_up("101", CALLER);
    assert_hangup_events(&watch.events_of(2).await, "101", &call_id, CALLER);
    // The gateway answers in order: both malformed answers were read before the hang-up's.
    assert_eq!(app.api.events().stats().malformed_events, 2);
}

/// A customer release whose `number` fails validation (not a
/// string, or 200 characters) reaches the watcher anyway, with an empty customer_number; the
/// facade counts the dropped field and does not count the event as malformed.
#[tokio::test]
async fn a_customer_release_with_an_invalid_number_is_delivered_without_it() {
    let app = spawn_app().await;
    let mut watch = app.signed_in_watch("101").await;
    let bad_numbers = [json!({}), json!("7".repeat(200))];
    for (n, number) in bad_numbers.iter().enumerate() {
        app.sim
            .queue_event(
                "101",
                json!({"eventType": "AgentEvent_Customer_Release", "workNo": "101",
                       "content": {"callid": format!("1700000000-{n}"), "number": number}}),
            )
            .unwrap();
    }
    let events = watch.events_of(bad_numbers.len()).await;
    for (n, event) in events.iter().enumerate() {
        assert_eq!(event.kind, ReleaseKind::CustomerRelease as i32, "{event:?}");
        assert_eq!(event.call_id, format!("1700000000-{n}"), "{event:?}");
        assert_eq!(event.customer_number, "", "{event:?}");
        assert_eq!(event.raw_event_type, "AgentEvent_Customer_Release");
    }
    // Counted before the events were handed to the watchers.
    let stats = app.api.events().stats();
    assert_eq!(stats.dropped_fields, 2, "{stats:?}");
    assert_eq!(stats.malformed_events, 0, "{stats:?}");
    // A valid number still arrives as it was sent.
    let call_id = app.hang_up("101", CALLER);
    assert_hangup_events(&watch.events_of(2).await, "101", &call_id, CALLER);
    assert_eq!(app.api.events().stats().dropped_fields, 2);
}

/// An `eventGenTime` past protobuf Timestamp's range (u64::MAX ms; the year 10000) would give
/// strict JSON clients an event_time they refuse: such a release is delivered without it, and
/// the dropped field counted. The latest representable time (9999-12-31T23:59:59.999Z) is kept.
/// The events go in verbatim through the simulator's control API.
#[tokio::test]
async fn a_release_with_an_event_time_out_of_range_is_delivered_without_it() {
    let app = spawn_app().await;
    let mut watch = app.signed_in_watch("101").await;
    let inject = reqwest::Client::new();
    let times = [
        json!(u64::MAX),
        json!(253_402_300_800_000u64),
        json!(253_402_300_799_999u64),
    ];
    for (n, time) in times.iter().enumerate() {
        let event = json!({"eventType": "AgentEvent_Call_Release", "workNo": "101",
                           "content": format!("1700000000-{n}"), "eventGenTime": time});
        let answer = inject
            .post(format!("http://{}/sim/agents/101/events", app.sim_addr))
            .json(&event)
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success(), "{answer:?}");
    }
    let events = watch.events_of(times.len()).await;
    let read: Vec<_> = events
        .iter()
        .map(|e| {
            (
                e.call_id.as_str(),
                e.event_time.map(|t| (t.seconds, t.nanos)),
            )
        })
        .collect();
    assert_eq!(
        read,
        [
            ("1700000000-0", None),
            ("1700000000-1", None),
            ("1700000000-2", Some((253_402_300_799, 999_000_000))),
        ]
    );
    let stats = app.api.events().stats();
    assert_eq!(
        (stats.dropped_fields, stats.malformed_events),
        (2, 0),
        "{stats:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Poll failures: transient ones are retried, a refused Guid ends the stream
// ---------------------------------------------------------------------------------------------

fn poll_fault(fault: Fault, count: u32) -> FaultRule {
    FaultRule {
        fault,
        count,
        method: None,
        path_contains: Some("/agentevent/".into()),
    }
}

#[tokio::test]
async fn transient_poll_failures_are_retried_without_ending_the_stream() {
    let app = spawn_app_with(sim_config(), &["--poll-backoff-max-ms", "200"]).await;
    let mut watch = app.signed_in_watch("101").await;
    wait_until("a poll of agent 101", || app.polls_of("101") >= 1).await;
    app.sim
        .push_fault(poll_fault(Fault::HttpStatus { status: 502 }, 2));
    app.sim.push_fault(poll_fault(Fault::Drop, 2));
    let polls = app.polls_of("101");
    // The four faulted polls, then at least one good one.
    wait_until("the loop got past the faults", || {
        app.polls_of("101") >= polls + 5
    })
    .await;
    let call_id = app.hang_up("101", CALLER);
    assert_hangup_events(&watch.events_of(2).await, "101", &call_id, CALLER);
    assert_eq!(app.polling_agents(), ["101"]);
}

#[tokio::test(start_paused = true)]
async fn a_hung_poll_is_given_up_at_the_poll_timeout() {
    // Paused clock: the facade's 11 s poll timeout passes well within the 20 s wait bound,
    // the hung gateway's 1000 s never.
    let app = spawn_app_with(
        sim_config(),
        &["--poll-timeout-ms", "11000", "--poll-backoff-max-ms", "200"],
    )
    .await;
    app.sign_in("101").await;
    app.sim
        .push_fault(poll_fault(Fault::Latency { ms: 1_000_000 }, 1));
    let mut watch = app.watch(watch_req(&["101"])).await;
    wait_until("the hung poll arrived", || app.polls_of("101") >= 1).await;
    let call_id = app.hang_up("101", CALLER);
    assert_hangup_events(&watch.events_of(2).await, "101", &call_id, CALLER);
}

/// Poll answers that end an agent's event delivery, and how a single-agent stream ends.
const ENDING_RETCODES: &[(&str, Code, &str)] = &[
    ("100-006", Code::FailedPrecondition, "AGENT_NOT_SIGNED_IN"),
    ("000-003", Code::Unauthenticated, "GATEWAY_NO_RIGHT"),
    ("000-001", Code::FailedPrecondition, "WRONG_EVENT_METHOD"),
];

#[tokio::test]
async fn a_refused_poll_ends_a_single_agent_stream_with_the_tables_status() {
    let app = spawn_app().await;
    for (i, &(retcode, code, reason)) in ENDING_RETCODES.iter().enumerate() {
        let agent = (101 + i).to_string();
        app.sign_in(&agent).await;
        let mut watch = app.watch(watch_req(&[agent.as_str()])).await;
        app.sim.push_fault(FaultRule {
            path_contains: Some(format!("/agentevent/{agent}")),
            ..poll_fault(
                Fault::Retcode {
                    retcode: retcode.into(),
                    message: format!("simulated {retcode}"),
                },
                1,
            )
        });
        let (events, status) = watch.until_error().await;
        assert!(events.is_empty(), "{retcode}: {events:?}");
        let details = expect_status(&status, code, reason);
        let metadata = &details.error_info().unwrap().metadata;
        assert_eq!(metadata["retcode"], retcode);
        assert_eq!(metadata["agent_id"], agent);
        wait_until(
            &format!("polling of {agent} stopped after {retcode}"),
            || !app.polling_agents().contains(&agent),
        )
        .await;
    }
}

#[tokio::test]
async fn heartbeats_name_agents_whose_polls_fail() {
    let app = spawn_app_with(
        sim_config(),
        &["--heartbeat-secs", "1", "--poll-backoff-max-ms", "200"],
    )
    .await;
    app.sign_in("101").await;
    app.sign_in("102").await;
    let mut watch = app.watch(watch_req(&["101", "102"])).await;
    app.sim.push_fault(FaultRule {
        path_contains: Some("/agentevent/102".into()),
        ..poll_fault(Fault::HttpStatus { status: 502 }, 1_000_000)
    });
    let failing = |item: Item| match item {
        Item::Heartbeat(heartbeat) => {
            assert!(!heartbeat.resume_token.is_empty());
            heartbeat.failing_agent_ids
        }
        other => panic!("expected only heartbeats, got {other:?}"),
    };
    let mut heartbeats = 0;
    while failing(watch.item().await) != ["102"] {
        heartbeats += 1;
        assert!(heartbeats < 10, "no heartbeat named failing agent 102");
    }
    // 101 is unaffected meanwhile.
    let call_id = app.hang_up("101", CALLER);
    assert_hangup_events(&watch.events_of(2).await, "101", &call_id, CALLER);

    app.sim.clear_faults();
    let call_id = app.hang_up("102", CALLER);
    assert_hangup_events(&watch.events_of(2).await, "102", &call_id, CALLER);
    assert!(
        failing(watch.item().await).is_empty(),
        "102 recovered but is still named failing"
    );
}
