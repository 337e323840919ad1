//! What all callers share (the request_id cache, the gateway queue, the release waiters) is
//! shared out: one caller at its share is refused, RESOURCE_EXHAUSTED CALLER_LIMIT_REACHED
//! naming the flag, with nothing sent, and the other callers go on as if it were not there.
use crate::common;

use ccgw_callcontrol::proto::{ReleaseCallRequest, ReleaseOutcome};
use common::{
    error_metadata, expect_status, hang, pki::Files, release_req, release_with_id, sim_config,
    spawn_app_with, wait_until, TestApp, WAIT,
};
use tonic::{Code, Request};

const CALLERS: &str = r#"
[[caller]]
name = "alpha"
agents = ["101-199"]
verbs = ["release", "watch"]

[[caller]]
name = "beta"
agents = ["101-199"]
verbs = ["release", "watch"]
"#;

const ALPHA: &str = "alpha-token-0123456789";
const BETA: &str = "beta-token-0123456789";

/// The facade with the two callers above and their tokens; `flags` are more flags.
async fn spawn_with_two_callers(files: &Files, flags: &[&str]) -> TestApp {
    let callers = files.write("callers.toml", CALLERS);
    let tokens = files.write("tokens", &format!("alpha {ALPHA}\nbeta {BETA}\n"));
    let mut args = vec!["--callers", &callers, "--caller-tokens", &tokens];
    args.extend_from_slice(flags);
    spawn_app_with(sim_config(), &args).await
}

fn as_caller<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn waiting_for_the_event(agent: &str) -> ReleaseCallRequest {
    ReleaseCallRequest {
        wait_for_release_event: true,
        ..release_req(agent)
    }
}

/// A refusal for the caller's `flag`, safe to retry: nothing was sent.
fn at_caller_limit(status: &tonic::Status, flag: &str) {
    let details = expect_status(status, Code::ResourceExhausted, "CALLER_LIMIT_REACHED");
    assert!(details.retry_info().is_some(), "no RetryInfo: {status:?}");
    let metadata = error_metadata(status);
    assert_eq!(metadata["caller_limit"], flag, "{status:?}");
    assert!(!metadata.contains_key("may_have_released"), "{status:?}");
    assert!(status.message().contains(flag), "{status:?}");
}

/// With a cache of 20, one caller sends 40 request_ids for an idle agent: each answer
/// (NO_ACTIVE_CALL) is kept for its window, but only a quarter of the cache is the caller's;
/// the other caller's release with a request_id still goes through.
#[tokio::test]
async fn one_callers_kept_answers_do_not_lock_another_caller_out_of_the_request_id_cache() {
    let files = Files::new();
    let app = spawn_with_two_callers(&files, &["--idempotency-capacity", "20"]).await;
    app.sign_in("101").await;
    let mut answered = Vec::new();
    for n in 0..40 {
        let request = as_caller(release_with_id("101", &format!("idle-{n}")), ALPHA);
        match app.release_with(request).await {
            Ok(response) => {
                assert_eq!(response.outcome(), ReleaseOutcome::NoActiveCall);
                answered.push(n);
            }
            Err(status) => at_caller_limit(&status, "--max-request-ids-per-caller"),
        }
    }
    assert_eq!(answered, (0..5).collect::<Vec<_>>(), "a quarter of 20");
    assert_eq!(app.releases_of("101"), 5, "a refused release was sent");
    // An id alpha was answered for is still replayed, over its share or not.
    let repeat = app
        .release_with(as_caller(release_with_id("101", "idle-0"), ALPHA))
        .await
        .expect("the kept answer");
    assert!(repeat.replayed, "{repeat:?}");
    assert_eq!(app.releases_of("101"), 5);

    app.sign_in("102").await;
    app.sim.place_call("102", "70001").unwrap();
    let released = app
        .release_with(as_caller(release_with_id("102", "beta-1"), BETA))
        .await
        .expect("beta's release goes through");
    assert_eq!(released.outcome(), ReleaseOutcome::Released);
    assert_eq!(app.releases_of("102"), 1);
}

/// One caller's releases hold the only turn and its place in the line; its next one is refused
/// at once, while the other caller's still gets a place and is sent when the turn comes.
#[tokio::test]
async fn one_caller_cannot_fill_the_gateway_queue_for_another() {
    let files = Files::new();
    let app = spawn_with_two_callers(
        &files,
        &[
            "--max-gateway-requests",
            "1",
            "--max-gateway-queue-per-caller",
            "1",
            // The release that holds the turn holds it until the test cancels it.
            "--request-timeout-ms",
            "600000",
        ],
    )
    .await;
    for agent in ["101", "102", "103", "104"] {
        app.sign_in(agent).await;
    }
    let admission = app.api.sessions().gateway().admission().clone();
    app.sim.push_fault(hang("/voicecall/101/"));
    let holding = app.release_in_background(as_caller(release_req("101"), ALPHA));
    wait_until("alpha's first release reached the gateway", || {
        app.releases_of("101") == 1
    })
    .await;
    let queued = app.release_in_background(as_caller(release_req("102"), ALPHA));
    wait_until("alpha's second release waits its turn", || {
        admission.waiting() == 1
    })
    .await;

    let refused = app
        .release_with(as_caller(release_req("103"), ALPHA))
        .await
        .unwrap_err();
    at_caller_limit(&refused, "--max-gateway-queue-per-caller");
    assert_eq!(app.releases_of("103"), 0, "the refused release was sent");

    let other = app.release_in_background(as_caller(release_req("104"), BETA));
    wait_until("beta's release waits its turn beside alpha's", || {
        admission.waiting() == 2
    })
    .await;
    // Alpha's first caller goes away: its gateway request is dropped, the turn passes on.
    holding.abort();
    for waiting in [queued, other] {
        let outcome = tokio::time::timeout(WAIT, waiting)
            .await
            .expect("a queued release answers")
            .unwrap()
            .expect("a queued release is sent");
        assert_eq!(outcome, ReleaseOutcome::NoActiveCall);
    }
    assert_eq!(app.releases_of("104"), 1);
    assert_eq!(admission.waiting(), 0);
}

/// One caller's ReleaseCall waits for its release event (its release hangs at the gateway):
/// with one waiter per caller, its next waiting ReleaseCall is refused before anything is
/// sent, while the other caller's is released and sees its event.
#[tokio::test]
async fn one_caller_cannot_take_the_release_waiters_of_another() {
    let files = Files::new();
    let app = spawn_with_two_callers(
        &files,
        &[
            "--max-release-waiters-per-caller",
            "1",
            // The release that holds the waiter's share holds it as long as the test runs.
            "--request-timeout-ms",
            "600000",
        ],
    )
    .await;
    for agent in ["101", "102", "103"] {
        app.sign_in(agent).await;
    }
    app.sim.push_fault(hang("/voicecall/101/"));
    let _waiting = app.release_in_background(as_caller(waiting_for_the_event("101"), ALPHA));
    wait_until("alpha's waiting release reached the gateway", || {
        app.releases_of("101") == 1
    })
    .await;

    app.sim.place_call("102", "70002").unwrap();
    let refused = app
        .release_with(as_caller(waiting_for_the_event("102"), ALPHA))
        .await
        .unwrap_err();
    at_caller_limit(&refused, "--max-release-waiters-per-caller");
    assert_eq!(app.releases_of("102"), 0, "the refused release was sent");
    assert_eq!(app.polls_of("102"), 0, "the refused wait polled the agent");

    app.sim.place_call("103", "70003").unwrap();
    let released = app
        .release_with(as_caller(waiting_for_the_event("103"), BETA))
        .await
        .expect("beta's release goes through");
    assert_eq!(released.outcome(), ReleaseOutcome::Released);
    assert!(released.release_event.is_some(), "{released:?}");
}
