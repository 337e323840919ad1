//! Guids, cookies, bearer tokens and TLS private keys are credentials: they must not reach
//! logs (at any level, ours or our dependencies'), status messages or error details. Alone in
//! its binary: the tracing subscriber it installs is the whole process's, and would capture
//! (and slow) every other test's logs.
#[path = "it/common/mod.rs"]
mod common;

use std::{
    io::Write,
    sync::{Arc, Mutex, OnceLock},
};

use ccgw_sim::{Fault, FaultRule, SimConfig};
use common::{agent_id, release_req, sim_config, spawn_app_with, wait_until, watch_req};
use tonic_types::StatusExt;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// Everything logged in this process, at every level (one subscriber for all the tests).
fn captured_logs() -> Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Captured::default();
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        logs
    })
    .clone()
}

/// Asserts that no secret shows in the logs or in any status (message or details).
fn assert_nowhere(secrets: &[String], logs: &str, statuses: &[tonic::Status]) {
    for secret in secrets {
        assert!(
            !logs.contains(secret.as_str()),
            "a credential reached the logs"
        );
        for status in statuses {
            let shown = format!("{status:?} {:?}", status.get_error_details());
            assert!(
                !shown.contains(secret.as_str()),
                "a credential reached a status: {shown}"
            );
        }
    }
}

#[tokio::test]
async fn guids_and_cookies_never_reach_logs_or_statuses() {
    let logs = captured_logs();

    let app = spawn_app_with(
        SimConfig {
            require_sticky_cookie: true,
            ..sim_config()
        },
        // The latency fault below ends at the facade's deadline, not the client's.
        &["--request-timeout-ms", "500"],
    )
    .await;
    let mut secrets = vec![app.sign_in("101").await];
    let session = app.api.sessions().registry().get(agent_id("101")).unwrap();
    let cookie = session
        .cookies
        .header_value()
        .expect("the gateway set a sticky cookie");
    secrets.push(cookie.split_once('=').unwrap().1.to_owned());

    let mut statuses = Vec::new();
    // A watcher keeps the facade polling 101 with its Guid throughout.
    let mut watch = app.watch(watch_req(&["101"])).await;
    app.sim.place_call("101", "70093").unwrap();
    // Handed over in metadata, released, rotated, then failures of every kind.
    let mut request = tonic::Request::new(release_req("101"));
    request
        .metadata_mut()
        .insert("x-ccgw-guid", secrets[0].parse().unwrap());
    request
        .metadata_mut()
        .insert("x-ccgw-cookie", cookie.parse().unwrap());
    app.release_with(request).await.unwrap();
    // The poll loop picks up a rotation, and rides out failing polls.
    app.sim.rotate_guid("101").unwrap();
    wait_until("the rotated Guid is learned", || {
        app.guid_of("101").as_ref() != Some(&secrets[0])
    })
    .await;
    secrets.push(app.guid_of("101").unwrap());
    for fault in [
        Fault::Malformed,
        Fault::Drop,
        Fault::HttpStatus { status: 503 },
    ] {
        app.sim.push_fault(FaultRule {
            fault,
            count: 1,
            method: None,
            path_contains: Some("/agentevent/".into()),
        });
    }
    wait_until("the failing polls were made", || {
        app.api.events().stats().poll_failures >= 3
    })
    .await;
    // A caller with an outdated Guid: the live session goes first and is accepted.
    let outdated = "0ld-6u1d-never-issued.AgentGateway0";
    secrets.push(outdated.to_owned());
    let mut request = tonic::Request::new(release_req("101"));
    request
        .metadata_mut()
        .insert("x-ccgw-guid", outdated.parse().unwrap());
    app.release_with(request).await.unwrap();
    for fault in [
        Fault::Malformed,
        Fault::Drop,
        Fault::HttpStatus { status: 503 },
        Fault::Latency { ms: 5_000 },
    ] {
        app.sim.push_fault(FaultRule {
            fault,
            count: 1,
            method: None,
            path_contains: Some("/voicecall/".into()),
        });
        statuses.push(app.release(release_req("101")).await.unwrap_err());
    }
    let bad_guid = "SECRET-BAD-GUID;x";
    secrets.push(bad_guid.to_owned());
    let mut request = tonic::Request::new(release_req("101"));
    request
        .metadata_mut()
        .insert("x-ccgw-guid", bad_guid.parse().unwrap());
    statuses.push(app.release_with(request).await.unwrap_err());
    // The desktop signs in again and hands the new Guid over: the facade's is refused, the
    // handed-over one tried and adopted.
    let fresh = app.desktop_sign_in("101", true).await;
    let fresh_cookie = fresh.cookie.expect("a sticky cookie");
    secrets.push(fresh.guid.clone());
    secrets.push(fresh_cookie.split_once('=').unwrap().1.to_owned());
    let mut request = common::handing_over(release_req("101"), &fresh.guid);
    request
        .metadata_mut()
        .insert("x-ccgw-cookie", fresh_cookie.parse().unwrap());
    app.release_with(request).await.unwrap();
    app.sim.force_signout("101").unwrap();
    // The stream ends with the sign-out; then ReleaseCall finds no session.
    statuses.push(watch.until_error().await.1);
    statuses.push(app.release(release_req("101")).await.unwrap_err());

    let logs = logs.text();
    assert!(
        logs.contains("ReleaseCall")
            && logs.contains("CallControl/ReleaseCall")
            && logs.contains("CallControl/WatchReleaseEvents")
            && logs.contains("gateway issued a new Guid")
            && logs.contains("poll failed")
            && logs.contains("it is the agent's session now"),
        "capture works"
    );
    assert_nowhere(&secrets, &logs, &statuses);
}

/// Bearer tokens (good, unknown, in broken tokens files) and TLS private keys
/// (loaded, rotated in, broken) never reach logs or statuses.
#[tokio::test]
async fn bearer_tokens_and_tls_keys_never_reach_logs_or_statuses() {
    use ccgw_callcontrol::proto::call_control_client::CallControlClient;
    use common::pki::{served_certificate, tls_channel, Ca, Files};

    let logs = captured_logs();
    let (ca, files) = (Ca::new("secrets CA"), Files::new());
    let (first, second) = (ca.server(1), ca.server(2));
    let (cert, key) = files.write_server(&first);
    let good = "billing-very-secret-token-1";
    let callers = files.write(
        "callers.toml",
        "[[caller]]\nname = \"billing\"\nagents = [\"101-199\"]\nverbs = [\"release\"]\n",
    );
    let tokens = files.write("tokens", &format!("billing {good}\n"));
    let flags = [
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--callers",
        &callers,
        "--caller-tokens",
        &tokens,
        "--reload-secs",
        "1",
    ];
    let app = spawn_app_with(sim_config(), &flags).await;
    app.sign_in("101").await;
    let mut client = CallControlClient::new(tls_channel(app.grpc_addr, &ca, None).await.unwrap());
    let unknown = "unknown-very-secret-token-2";
    let in_bad_file = "nobody-very-secret-token-3";
    let as_caller = |agent: &str, authorization: String| {
        let mut request = tonic::Request::new(release_req(agent));
        request
            .metadata_mut()
            .insert("authorization", authorization.parse().unwrap());
        request
    };
    client
        .release_call(as_caller("101", format!("Bearer {good}")))
        .await
        .unwrap();
    let statuses = vec![
        client
            .release_call(as_caller("500", format!("Bearer {good}")))
            .await
            .unwrap_err(),
        client
            .release_call(as_caller("101", format!("Bearer {unknown}")))
            .await
            .unwrap_err(),
        client
            .release_call(as_caller("101", format!("Token {unknown}")))
            .await
            .unwrap_err(),
    ];
    // A tokens line naming an unknown caller is left out, a broken key refused; both logged.
    files.write("tokens", &format!("billing {good}\nnobody {in_bad_file}\n"));
    let broken_key = first
        .key_pem
        .replacen("PRIVATE KEY-----\n", "PRIVATE KEY-----\nAAAA", 1);
    files.write("tls.key", &broken_key);
    wait_until("both broken files were refused", || {
        let text = logs.text();
        text.contains("its caller is not in the callers file")
            && text
                .contains("the TLS certificate, key and client CA files changed but cannot be used")
    })
    .await;
    // Both are kept as they were: the first certificate, the good token.
    assert_eq!(served_certificate(app.grpc_addr, &[&ca]).await, first.der);
    client
        .release_call(as_caller("101", format!("Bearer {good}")))
        .await
        .expect("the token in force before the broken file still is");
    // A rotated key is loaded.
    files.write_server(&second);
    let rotated = tokio::time::timeout(common::WAIT, async {
        while served_certificate(app.grpc_addr, &[&ca]).await != second.der {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(rotated.is_ok(), "the rotated certificate was not served");

    let key_lines = |pem: &str| -> Vec<String> {
        pem.lines()
            .filter(|l| !l.starts_with("-----") && l.len() > 8)
            .map(str::to_owned)
            .collect()
    };
    let mut secrets: Vec<String> = [good, unknown, in_bad_file].map(str::to_owned).to_vec();
    secrets.extend(key_lines(&first.key_pem));
    secrets.extend(key_lines(&second.key_pem));
    secrets.extend(key_lines(&broken_key));
    let text = logs.text();
    assert!(
        text.contains("call refused: unauthenticated"),
        "capture works"
    );
    // The refused calls' own lines say from where they came, and nothing secret.
    let refused_from_the_client = text.lines().any(|line| {
        line.contains(" rpc ")
            && line.contains("Unauthenticated")
            && line.contains("peer=\"127.0.0.1:")
    });
    assert!(refused_from_the_client, "{text}");
    assert_nowhere(&secrets, &text, &statuses);
}
