//! Startup warnings where secrets would cross the network in clear: a plaintext gRPC port that
//! other machines can reach (session handovers carry gateway Guids), and NATS servers on other
//! machines reached without TLS (the sessions bucket holds Guids and cookies).
use crate::common;

use tokio::io::{AsyncBufReadExt, BufReader};

/// The warnings (their messages) the real binary logs before it would serve, given `args`.
async fn startup_warnings(args: &[&str], until: usize) -> Vec<serde_json::Value> {
    let mut service = tokio::process::Command::new(env!("CARGO_BIN_EXE_ccgw-callcontrol"))
        .args([
            "--gateway-url",
            "http://127.0.0.1:9",
            "--no-caller-auth",
            "--log-format",
            "json",
        ])
        .args(args)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the service binary starts");
    let mut logs = BufReader::new(service.stderr.take().unwrap()).lines();
    let mut warnings = Vec::new();
    let mut seen = Vec::new();
    let read = tokio::time::timeout(common::WAIT, async {
        while let Some(line) = logs.next_line().await.unwrap() {
            seen.push(line.clone());
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let serving = entry["message"] == "serving gRPC";
            if entry["level"] == "WARN" {
                warnings.push(entry);
            }
            if warnings.len() == until || serving {
                return;
            }
        }
    })
    .await;
    service.kill().await.unwrap();
    assert!(read.is_ok(), "no {until} warnings in:\n{}", seen.join("\n"));
    for line in &seen {
        assert!(!line.contains("secret-pw"), "{line}");
    }
    warnings
}

fn message(entry: &serde_json::Value) -> String {
    entry["message"].as_str().unwrap_or_default().to_owned()
}

/// On every interface without TLS, with NATS on another machine over nats://: both warnings,
/// naming the NATS host and never the URL's password.
#[tokio::test]
async fn plaintext_grpc_and_nats_off_the_machine_are_warned_about() {
    let warnings = startup_warnings(
        &[
            "--listen",
            "0.0.0.0:0",
            "--nats-url",
            "nats://ccgw:secret-pw@192.0.2.1:4222",
        ],
        2,
    )
    .await;
    let grpc = warnings
        .iter()
        .find(|w| message(w).contains("gRPC port speaks plaintext"))
        .unwrap_or_else(|| panic!("{warnings:?}"));
    assert!(message(grpc).contains("x-ccgw-guid"), "{grpc}");
    let nats = warnings
        .iter()
        .find(|w| message(w).contains("without TLS"))
        .unwrap_or_else(|| panic!("{warnings:?}"));
    assert_eq!(nats["hosts"], "192.0.2.1", "{nats}");
}

/// On loopback, the same process serves without either warning.
#[tokio::test]
async fn loopback_is_not_warned_about() {
    let warnings = startup_warnings(&["--listen", "127.0.0.1:0"], usize::MAX).await;
    assert!(
        !warnings.iter().any(|w| message(w).contains("in clear")),
        "{warnings:?}"
    );
}

/// The NATS client would connect without the URL's user and password: the binary refuses such
/// a URL at start, names what to use instead, and repeats neither.
#[tokio::test]
async fn a_nats_url_with_a_password_is_refused_at_start_without_repeating_it() {
    let exited = tokio::process::Command::new(env!("CARGO_BIN_EXE_ccgw-callcontrol"))
        .args([
            "--gateway-url",
            "http://127.0.0.1:9",
            "--no-caller-auth",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--nats-url",
            "tls://nats-0.nats:4222,tls://ccgw:secret-pw@nats-1.nats:4222",
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(common::WAIT, exited)
        .await
        .expect("the binary exits at once")
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--nats-url holds a user or password") && stderr.contains("--nats-creds"),
        "{stderr}"
    );
    assert!(!stderr.contains("secret-pw"), "{stderr}");
}
