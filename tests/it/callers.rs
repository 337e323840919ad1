//! Callers identified by bearer tokens, each granted agent ranges and
//! verbs; refusals before anything reaches a session or the gateway; request_ids namespaced by
//! caller; files reloaded without a restart; a stream cap per caller.
use crate::common;

use std::{process::Stdio, time::Duration};

use ccgw_callcontrol::proto::{ReleaseCallRequest, ReleaseOutcome};
use common::{
    error_metadata, expect_status, handing_over, pki::Files, release_req, resume_req, sample,
    sim_config, spawn_app_with, watch_req, TestApp, CALLER, WAIT,
};
use tonic::{Code, Request};
use tonic_types::StatusExt;

const CALLERS: &str = r#"
[[caller]]
name = "billing"
agents = ["101-199"]
verbs = ["release"]

[[caller]]
name = "supervisor"
agents = ["101-199", "500"]
verbs = ["release", "watch", "handover"]

[[caller]]
name = "wallboard"
agents = ["*"]
verbs = ["watch"]
"#;

const BILLING: &str = "billing-token-0123456789";
const SUPERVISOR: &str = "supervisor-token-0123456789";
const WALLBOARD: &str = "wallboard-token-0123456789";

fn tokens() -> String {
    format!("billing {BILLING}\nsupervisor {SUPERVISOR}\nwallboard {WALLBOARD}\n")
}

/// The facade with the callers above and their tokens; `flags` are more flags.
async fn spawn_with_callers(files: &Files, tokens: &str, flags: &[&str]) -> TestApp {
    let callers = files.write("callers.toml", CALLERS);
    let tokens = files.write("tokens", tokens);
    let mut args = vec!["--callers", &callers, "--caller-tokens", &tokens];
    args.extend_from_slice(flags);
    spawn_app_with(sim_config(), &args).await
}

fn with_token<T>(mut request: Request<T>, token: &str) -> Request<T> {
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn as_caller<T>(message: T, token: &str) -> Request<T> {
    with_token(Request::new(message), token)
}

#[tokio::test]
async fn missing_malformed_or_unknown_credentials_are_unauthenticated() {
    let files = Files::new();
    let app = spawn_with_callers(&files, &tokens(), &[]).await;
    app.sign_in("101").await;
    let mut refusals = vec![
        app.release(release_req("101")).await.unwrap_err(),
        app.release_with(as_caller(release_req("101"), "not-a-token-of-anyone"))
            .await
            .unwrap_err(),
        app.watch_refused(Request::new(watch_req(&["101"]))).await,
    ];
    let mut basic = Request::new(release_req("101"));
    basic
        .metadata_mut()
        .insert("authorization", format!("Basic {BILLING}").parse().unwrap());
    refusals.push(app.release_with(basic).await.unwrap_err());
    for status in &refusals {
        let details = expect_status(status, Code::Unauthenticated, "UNAUTHENTICATED");
        assert!(details.retry_info().is_none(), "{status:?}");
    }
    assert!(refusals[1].message().contains("not one of the tokens file"));
    assert!(app.upstream().is_empty(), "{:?}", app.upstream());
    assert!(app.polling_agents().is_empty());
    // The token is right: the same request goes through.
    let released = app
        .release_with(as_caller(release_req("101"), BILLING))
        .await
        .unwrap();
    assert_eq!(released.outcome(), ReleaseOutcome::NoActiveCall);
    assert_eq!(app.deletes().len(), 1);
}

#[tokio::test]
async fn requests_outside_the_grant_are_denied_before_anything_is_sent() {
    let files = Files::new();
    let app = spawn_with_callers(&files, &tokens(), &[]).await;
    let guid = app.sign_in("101").await;
    app.sign_in("500").await;
    let denied = |status: &tonic::Status, key: &str, value: &str| {
        expect_status(status, Code::PermissionDenied, "PERMISSION_DENIED");
        assert_eq!(error_metadata(status)[key], value, "{status:?}");
        assert!(status.get_error_details().retry_info().is_none());
    };
    // An agent outside the range: the same answer whether or not it has a session.
    let signed_in = app
        .release_with(as_caller(release_req("500"), BILLING))
        .await
        .unwrap_err();
    let unknown = app
        .release_with(as_caller(release_req("600"), BILLING))
        .await
        .unwrap_err();
    denied(&signed_in, "denied_agent_id", "500");
    denied(&unknown, "denied_agent_id", "600");
    assert_eq!(
        signed_in.message().replace("500", "N"),
        unknown.message().replace("600", "N")
    );
    // A verb it lacks: watching, handing a session over, waiting for the release event.
    let watch = app
        .watch_refused(as_caller(watch_req(&["101"]), BILLING))
        .await;
    denied(&watch, "verb", "watch");
    let handover = app
        .release_with(with_token(handing_over(release_req("101"), &guid), BILLING))
        .await
        .unwrap_err();
    denied(&handover, "verb", "handover");
    let waiting = ReleaseCallRequest {
        wait_for_release_event: true,
        ..release_req("101")
    };
    let wait = app
        .release_with(as_caller(waiting, BILLING))
        .await
        .unwrap_err();
    denied(&wait, "verb", "watch");
    // One agent of a stream outside the grant refuses the stream.
    let stream = app
        .watch_refused(as_caller(watch_req(&["101", "600"]), SUPERVISOR))
        .await;
    denied(&stream, "denied_agent_id", "600");
    assert!(app.upstream().is_empty(), "{:?}", app.upstream());
    assert!(app.polling_agents().is_empty());
    assert_eq!(app.api.events().watchers(), 0);
    // Within its grant, the supervisor may do all of it.
    let handed = app
        .release_with(with_token(
            handing_over(release_req("101"), &guid),
            SUPERVISOR,
        ))
        .await
        .unwrap();
    assert_eq!(handed.outcome(), ReleaseOutcome::NoActiveCall);
}

/// Two services that happen to pick the same request_id each get their own release: neither
/// is handed the other's answer. A repeat within one caller is still replayed.
#[tokio::test]
async fn two_callers_with_one_request_id_each_get_their_own_release() {
    let files = Files::new();
    let app = spawn_with_callers(&files, &tokens(), &[]).await;
    app.sign_in("101").await;
    let request = || ReleaseCallRequest {
        request_id: "shared-id-1".into(),
        ..release_req("101")
    };
    app.sim.place_call("101", CALLER).unwrap();
    let first = app
        .release_with(as_caller(request(), BILLING))
        .await
        .unwrap();
    assert_eq!(first.outcome(), ReleaseOutcome::Released);
    let second = app
        .release_with(as_caller(request(), SUPERVISOR))
        .await
        .unwrap();
    assert!(!second.replayed, "the supervisor got billing's answer");
    assert_eq!(second.outcome(), ReleaseOutcome::NoActiveCall);
    assert_eq!(app.deletes().len(), 2);
    let repeat = app
        .release_with(as_caller(request(), BILLING))
        .await
        .unwrap();
    assert!(repeat.replayed);
    assert_eq!(repeat.outcome(), ReleaseOutcome::Released);
    assert_eq!(app.deletes().len(), 2);
}

/// A probe that touches nothing: INVALID_ARGUMENT once authenticated, else UNAUTHENTICATED.
async fn authenticates(app: &TestApp, token: &str) -> bool {
    let status = app
        .release_with(as_caller(release_req(""), token))
        .await
        .unwrap_err();
    match status.code() {
        Code::InvalidArgument => true,
        Code::Unauthenticated => false,
        _ => panic!("unexpected answer: {status:?}"),
    }
}

#[tokio::test]
async fn a_changed_tokens_file_adds_and_revokes_tokens_without_a_restart() {
    let files = Files::new();
    let app = spawn_with_callers(&files, &tokens(), &["--reload-secs", "1"]).await;
    let rotated = "billing-token-rotated-987654321";
    assert!(authenticates(&app, BILLING).await);
    assert!(!authenticates(&app, rotated).await);
    // Rotation: the new token next to the old one, then the old one gone.
    files.write("tokens", &format!("{}billing {rotated}\n", tokens()));
    wait_for(&app, rotated, true).await;
    assert!(authenticates(&app, BILLING).await);
    files.write("tokens", &format!("billing {rotated}\n"));
    wait_for(&app, BILLING, false).await;
    assert!(authenticates(&app, rotated).await);
    assert!(!authenticates(&app, SUPERVISOR).await);
}

/// Polls (bounded) until `token` authenticates, or stops authenticating.
async fn wait_for(app: &TestApp, token: &str, accepted: bool) {
    let reloaded = tokio::time::timeout(WAIT, async {
        while authenticates(app, token).await != accepted {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        reloaded.is_ok(),
        "the tokens file was not reloaded within {WAIT:?}"
    );
}

#[tokio::test]
async fn health_and_reflection_need_no_credentials() {
    use tokio_stream::StreamExt;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, ServerReflectionRequest,
    };
    let files = Files::new();
    let app = spawn_with_callers(&files, &tokens(), &[]).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", app.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "ccgw.callcontrol.v1.CallControl".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, 1, "SERVING");
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }]))
        .await
        .unwrap()
        .into_inner();
    let answer = tokio::time::timeout(WAIT, answers.next())
        .await
        .unwrap()
        .expect("an answer")
        .unwrap();
    assert!(format!("{answer:?}").contains("ccgw.callcontrol.v1.CallControl"));
}

#[tokio::test]
async fn each_caller_has_its_own_stream_cap() {
    let files = Files::new();
    let app = spawn_with_callers(&files, &tokens(), &["--max-streams-per-caller", "2"]).await;
    app.sign_in("101").await;
    let first = app.watch(as_caller(watch_req(&["101"]), SUPERVISOR)).await;
    let _second = app.watch(as_caller(watch_req(&["101"]), SUPERVISOR)).await;
    let refused = app
        .watch_refused(as_caller(watch_req(&["101"]), SUPERVISOR))
        .await;
    let details = expect_status(&refused, Code::ResourceExhausted, "TOO_MANY_CALLER_STREAMS");
    assert!(
        details.retry_info().is_some(),
        "nothing was opened: safe to retry"
    );
    assert_eq!(
        app.api.events().watchers(),
        2,
        "the refused stream opened nothing"
    );
    // Another caller is not held back by the supervisor's streams.
    let mut wallboard = app.watch(as_caller(watch_req(&["101"]), WALLBOARD)).await;
    // A stream that ends gives its slot back.
    drop(first);
    let _again = tokio::time::timeout(WAIT, async {
        loop {
            match app
                .try_watch(as_caller(watch_req(&["101"]), SUPERVISOR))
                .await
            {
                Ok(stream) => return stream,
                Err(status) => {
                    expect_status(&status, Code::ResourceExhausted, "TOO_MANY_CALLER_STREAMS");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    })
    .await
    .expect("the cancelled stream's slot came back");
    wallboard.sees_hang_up(&app, "101").await;
}

/// A real process: without --callers or --no-caller-auth (and not --simulate) the service
/// does not start, and says which flags would make it; nor with an invalid callers file, nor
/// with certificate names without their type.
#[tokio::test]
async fn the_service_refuses_to_start_without_caller_authorization() {
    let files = Files::new();
    let bad_callers = files.write(
        "callers.toml",
        "[[caller]]\nname = \"x\"\nagents = [\"9-1\"]\nverbs = []\n",
    );
    let untyped = files.write(
        "untyped.toml",
        "[[caller]]\nname = \"billing\"\nagents = []\nverbs = []\ncertificate_names = [\"billing.prod.svc\"]\n",
    );
    let tokens = files.write("tokens", "");
    for (extra, expected) in [
        (vec![], vec!["--callers", "--no-caller-auth"]),
        (
            vec!["--callers", &bad_callers, "--caller-tokens", &tokens],
            vec!["callers file", "ends before it starts"],
        ),
        // Certificate names before they were typed: refused, naming the entry and its spelling.
        (
            vec!["--callers", &untyped, "--caller-tokens", &tokens],
            vec!["billing", "has no type", "dns:billing.prod.svc"],
        ),
    ] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_ccgw-callcontrol"))
            .args([
                "--gateway-url",
                "http://127.0.0.1:9",
                "--listen",
                "127.0.0.1:0",
            ])
            .args(&extra)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(WAIT, output)
            .await
            .expect("the service exits at once")
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        for word in expected {
            assert!(stderr.contains(word), "{word:?} not in: {stderr}");
        }
    }
}

/// Removing a caller from the callers file (the ConfigMap) revokes it although its token line
/// is still in the tokens file (the Secret): the line is left out, the rest applies.
#[tokio::test]
async fn removing_a_caller_revokes_its_token_though_its_line_stays_in_the_secret() {
    let files = Files::new();
    let app = spawn_with_callers(&files, &tokens(), &["--reload-secs", "1"]).await;
    assert!(authenticates(&app, BILLING).await);
    let without_billing = CALLERS.replacen(
        "[[caller]]\nname = \"billing\"\nagents = [\"101-199\"]\nverbs = [\"release\"]\n",
        "",
        1,
    );
    assert_ne!(without_billing, CALLERS);
    files.write("callers.toml", &without_billing);
    wait_for(&app, BILLING, false).await;
    assert!(authenticates(&app, SUPERVISOR).await);
    // Back in the callers file: its token, still in the Secret, applies again.
    files.write("callers.toml", CALLERS);
    wait_for(&app, BILLING, true).await;
    // A bad line of the tokens file is left out; the other lines apply.
    files.write(
        "tokens",
        &format!("billing short\nsupervisor {SUPERVISOR}\n"),
    );
    wait_for(&app, BILLING, false).await;
    assert!(authenticates(&app, SUPERVISOR).await);
}

/// A stream of a caller whose token is revoked ends within two reload periods, UNAUTHENTICATED
/// with its resume token; once the token is back, resuming delivers what happened meanwhile.
#[tokio::test]
async fn a_stream_whose_token_is_revoked_ends_and_resumes_without_a_gap_once_it_is_back() {
    const RELOAD_SECS: u64 = 5;
    let files = Files::new();
    let reload = RELOAD_SECS.to_string();
    let app = spawn_with_callers(&files, &tokens(), &["--reload-secs", &reload]).await;
    app.sign_in("101").await;
    let mut stream = app.watch(as_caller(watch_req(&["101"]), WALLBOARD)).await;
    let before = stream.sees_hang_up(&app, "101").await;
    let revoked_at = tokio::time::Instant::now();
    files.write(
        "tokens",
        &format!("billing {BILLING}\nsupervisor {SUPERVISOR}\n"),
    );
    let (events, status) = stream.until_error().await;
    assert!(
        revoked_at.elapsed() <= Duration::from_secs(2 * RELOAD_SECS),
        "the stream ended {:?} after the token was revoked",
        revoked_at.elapsed()
    );
    assert!(events.is_empty(), "{events:?}");
    expect_status(&status, Code::Unauthenticated, "UNAUTHENTICATED");
    assert!(status.get_error_details().retry_info().is_none());
    assert!(
        status.message().contains("not one of the tokens file"),
        "{status:?}"
    );
    let resume = error_metadata(&status)["resume_token"].clone();
    assert!(!resume.is_empty());
    // Meanwhile a call ends; the revoked token opens nothing.
    let meanwhile = app.hang_up("101", CALLER);
    let refused = app
        .watch_refused(as_caller(resume_req(&["101"], &resume), WALLBOARD))
        .await;
    expect_status(&refused, Code::Unauthenticated, "UNAUTHENTICATED");
    // The token is back: the stream resumes with the call that ended meanwhile, no gap.
    files.write("tokens", &tokens());
    let mut resumed = tokio::time::timeout(WAIT + Duration::from_secs(RELOAD_SECS), async {
        loop {
            match app
                .try_watch(as_caller(resume_req(&["101"], &resume), WALLBOARD))
                .await
            {
                Ok(stream) => return stream,
                Err(status) => {
                    expect_status(&status, Code::Unauthenticated, "UNAUTHENTICATED");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
    .await
    .expect("the token was accepted again");
    let events = resumed.events_of(2).await;
    assert_eq!(
        common::kinds_and_calls(&events),
        common::hangup_pair(&meanwhile)
    );
    assert_ne!(before, meanwhile);
}

/// A stream whose caller loses the grant of its agent ends PERMISSION_DENIED, naming the agent,
/// with its resume token; a stream of another agent the caller keeps goes on.
#[tokio::test]
async fn a_stream_whose_grant_is_narrowed_ends_permission_denied() {
    let files = Files::new();
    let app = spawn_with_callers(&files, &tokens(), &["--reload-secs", "1"]).await;
    app.sign_in("101").await;
    app.sign_in("500").await;
    let mut narrowed = app.watch(as_caller(watch_req(&["500"]), SUPERVISOR)).await;
    let mut kept = app.watch(as_caller(watch_req(&["101"]), SUPERVISOR)).await;
    let event = narrowed.sees_hang_up(&app, "500").await;
    assert!(!event.is_empty());
    files.write(
        "callers.toml",
        &CALLERS.replace("agents = [\"101-199\", \"500\"]", "agents = [\"101-199\"]"),
    );
    let (events, status) = narrowed.until_error().await;
    assert!(events.is_empty(), "{events:?}");
    expect_status(&status, Code::PermissionDenied, "PERMISSION_DENIED");
    let metadata = error_metadata(&status);
    assert_eq!(metadata["denied_agent_id"], "500");
    assert!(!metadata["resume_token"].is_empty());
    kept.sees_hang_up(&app, "101").await;
}

/// The reload metrics of a real process: a callers file that cannot be used is tried at every
/// reload and counted each time, and the time of its last full load stays put; once fixed, it
/// is applied and the counting stops. Its logs name the bad line, never the token in it.
#[tokio::test]
async fn reload_failures_are_counted_until_the_file_is_fixed() {
    ccgw_callcontrol::install_crypto_provider();
    let files = Files::new();
    let callers = files.write("callers.toml", CALLERS);
    let tokens_file = files.write("tokens", &tokens());
    let (_service, metrics, logs) =
        common::spawn_demo_reloading(&["--callers", &callers, "--caller-tokens", &tokens_file])
            .await;
    let scrape = || async {
        let text = common::scrape(&metrics).await;
        let value = |series: &str| -> f64 {
            sample(&text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        };
        (
            value("ccgw_caller_files_reload_failures_total{file=\"callers\"}"),
            value("ccgw_caller_files_reload_failures_total{file=\"tokens\"}"),
            value("ccgw_caller_files_loaded_timestamp_seconds{file=\"callers\"}"),
            value("ccgw_caller_files_loaded_timestamp_seconds{file=\"tokens\"}"),
        )
    };
    let (callers_failures, tokens_failures, loaded_at, tokens_loaded_at) = scrape().await;
    assert_eq!((callers_failures, tokens_failures), (0.0, 0.0));
    assert!(loaded_at > 1.7e9, "{loaded_at}");
    let secret = "a-secret-token-in-a-bad-line";
    files.write("callers.toml", "[[caller]]\nname = \"broken\"\n");
    files.write("tokens", &format!("{}billing {secret} extra\n", tokens()));
    let failing = common::read_until("failures counted at two reloads or more", scrape, |now| {
        now.0 >= 2.0 && now.1 >= 2.0
    })
    .await;
    assert_eq!(
        (failing.2, failing.3),
        (loaded_at, tokens_loaded_at),
        "neither file was applied in full"
    );
    files.write("callers.toml", CALLERS);
    files.write("tokens", &tokens());
    common::read_until("the fixed files were applied", scrape, |now| {
        now.2 > loaded_at && now.3 > tokens_loaded_at
    })
    .await;
    // Applied in full: no reload counts a failure any more.
    let applied = scrape().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let later = scrape().await;
    assert_eq!((later.0, later.1), (applied.0, applied.1), "still counting");
    let logs = logs.lock().unwrap().clone();
    assert!(logs.contains("tokens file line 4"), "{logs}");
    assert!(!logs.contains(secret), "a token in the log");
}
