//! TLS on the gRPC port (rustls), certificates re-read and swapped in for new
//! connections without a restart, mutual TLS with client certificates that identify callers,
//! handshakes that cannot hold up the accept loop.
use crate::common;

use std::time::Duration;

use ccgw_callcontrol::proto::{call_control_client::CallControlClient, ReleaseOutcome};
use common::{
    error_metadata, expect_status, metric,
    pki::{served_certificate, tls_channel, Ca, Files, Leaf},
    release_req, serving, sim_config, spawn_app_with, TestApp, WAIT,
};
use tonic::Code;

/// The facade serving `leaf` (from `files`) with `flags` more.
async fn spawn_tls(files: &Files, leaf: &Leaf, flags: &[&str]) -> TestApp {
    let (cert, key) = files.write_server(leaf);
    let mut args = vec!["--tls-cert", &cert, "--tls-key", &key];
    args.extend_from_slice(flags);
    spawn_app_with(sim_config(), &args).await
}

/// [`spawn_tls`] requiring client certificates of `client_ca`, whose names identify the callers
/// of `callers` (a callers file's text); agent 101 signed in.
async fn spawn_mtls(files: &Files, server: &Leaf, client_ca: &Ca, callers: &str) -> TestApp {
    let client_ca_file = files.write("client-ca.crt", &client_ca.pem);
    let callers = files.write("callers.toml", callers);
    let app = spawn_tls(
        files,
        server,
        &["--tls-client-ca", &client_ca_file, "--callers", &callers],
    )
    .await;
    app.sign_in("101").await;
    app
}

#[tokio::test]
async fn tls_is_served_and_plaintext_is_refused() {
    let (ca, files) = (Ca::new("test CA"), Files::new());
    let app = spawn_tls(&files, &ca.server(1), &[]).await;
    let channel = tls_channel(app.grpc_addr, &ca, None).await.unwrap();
    serving(channel.clone()).await.unwrap();
    app.sign_in("101").await;
    let released = CallControlClient::new(channel)
        .release_call(release_req("101"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.outcome(), ReleaseOutcome::NoActiveCall);
    assert_eq!(app.deletes().len(), 1);
    // Plaintext HTTP/2 on the TLS port gets nowhere.
    let plaintext = tokio::time::timeout(WAIT, async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", app.grpc_addr))
            .unwrap()
            .connect()
            .await?;
        serving(channel).await.map_err(Into::into)
    })
    .await
    .expect("the plaintext attempt ended within the wait bound");
    let error: Box<dyn std::error::Error> = plaintext.unwrap_err();
    assert!(!error.to_string().is_empty());
    assert_eq!(app.deletes().len(), 1);
}

/// cert-manager renews the certificate: new connections get the new one without a restart,
/// open connections carry on.
#[tokio::test]
async fn a_rotated_certificate_is_served_to_new_connections() {
    let (old_ca, new_ca, files) = (Ca::new("old CA"), Ca::new("new CA"), Files::new());
    let (old, new) = (old_ca.server(1), new_ca.server(2));
    let app = spawn_tls(&files, &old, &["--reload-secs", "1"]).await;
    let open = tls_channel(app.grpc_addr, &old_ca, None).await.unwrap();
    assert_eq!(
        served_certificate(app.grpc_addr, &[&old_ca, &new_ca]).await,
        old.der
    );
    files.write_server(&new);
    let rotated = tokio::time::timeout(WAIT, async {
        while served_certificate(app.grpc_addr, &[&old_ca, &new_ca]).await != new.der {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        rotated.is_ok(),
        "the new certificate was not served within {WAIT:?}"
    );
    serving(open)
        .await
        .expect("an open connection keeps working");
    serving(tls_channel(app.grpc_addr, &new_ca, None).await.unwrap())
        .await
        .unwrap();
}

/// A connection that never sends its ClientHello holds a handshake slot for at most the
/// handshake timeout, and nobody waits behind it.
#[tokio::test]
async fn a_stalled_handshake_does_not_hold_up_other_clients() {
    let (ca, files) = (Ca::new("test CA"), Files::new());
    let app = spawn_tls(&files, &ca.server(1), &[]).await;
    let mut stalled = Vec::new();
    for _ in 0..8 {
        stalled.push(tokio::net::TcpStream::connect(app.grpc_addr).await.unwrap());
    }
    serving(tls_channel(app.grpc_addr, &ca, None).await.unwrap())
        .await
        .unwrap();
}

const CALLERS: &str = r#"
[[caller]]
name = "billing"
agents = ["101-199"]
verbs = ["release"]
certificate_names = ["dns:billing.prod.svc.cluster.local"]

[[caller]]
name = "wallboard"
agents = ["*"]
verbs = ["watch"]
certificate_names = ["uri:spiffe://prod/wallboard"]
"#;

/// mTLS: a client needs a certificate from the client CA; its names say which caller it is.
#[tokio::test]
async fn client_certificates_are_required_verified_and_identify_callers() {
    let (server_ca, client_ca, other_ca) = (
        Ca::new("server CA"),
        Ca::new("client CA"),
        Ca::new("other CA"),
    );
    let files = Files::new();
    let app = spawn_mtls(&files, &server_ca.server(1), &client_ca, CALLERS).await;
    // No certificate, or one from another CA: the connection is refused.
    let billing_elsewhere = other_ca.issue("billing", &["billing.prod.svc.cluster.local"], 7);
    for identity in [None, Some(&billing_elsewhere)] {
        let refused = match tls_channel(app.grpc_addr, &server_ca, identity).await {
            Err(_) => true,
            Ok(channel) => serving(channel).await.is_err(),
        };
        assert!(
            refused,
            "a client without a certificate of the client CA was served"
        );
    }
    // The CA's certificate with a DNS SAN of billing: billing, granted 101-199 and release.
    let billing = client_ca.issue("billing-7d9f", &["billing.prod.svc.cluster.local"], 8);
    let channel = tls_channel(app.grpc_addr, &server_ca, Some(&billing))
        .await
        .unwrap();
    serving(channel.clone()).await.unwrap();
    let mut client = CallControlClient::new(channel);
    let released = client
        .release_call(release_req("101"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.outcome(), ReleaseOutcome::NoActiveCall);
    let denied = client.release_call(release_req("500")).await.unwrap_err();
    expect_status(&denied, Code::PermissionDenied, "PERMISSION_DENIED");
    // A URI SAN (SPIFFE id) identifies the wallboard, which may watch but not release.
    let wallboard = client_ca.issue("wallboard", &["spiffe://prod/wallboard"], 9);
    let channel = tls_channel(app.grpc_addr, &server_ca, Some(&wallboard))
        .await
        .unwrap();
    let denied = CallControlClient::new(channel)
        .release_call(release_req("101"))
        .await
        .unwrap_err();
    expect_status(&denied, Code::PermissionDenied, "PERMISSION_DENIED");
    // A certificate of the CA whose names the callers file does not list identifies nobody.
    let stranger = client_ca.issue("stranger", &["stranger.prod.svc"], 10);
    let channel = tls_channel(app.grpc_addr, &server_ca, Some(&stranger))
        .await
        .unwrap();
    serving(channel.clone())
        .await
        .expect("health needs no caller");
    let refused = CallControlClient::new(channel)
        .release_call(release_req("101"))
        .await
        .unwrap_err();
    expect_status(&refused, Code::Unauthenticated, "UNAUTHENTICATED");
    assert_eq!(
        app.deletes().len(),
        1,
        "only billing's release reached the gateway"
    );
}

/// RFC 6125: the subject CN of a certificate with SANs is no name of it, and a name counts only
/// as the type the callers file gives it. A certificate with CN `billing.prod.svc` and SAN
/// `DNS:evil.svc` is evil, not billing; billing's `cn:` entry matches only a certificate
/// without SANs, and evil's `dns:` entry no CN.
#[tokio::test]
async fn a_certificate_with_sans_is_not_named_by_its_cn() {
    const TYPED: &str = r#"
[[caller]]
name = "billing"
agents = ["101-199"]
verbs = ["release"]
certificate_names = ["cn:billing.prod.svc", "dns:billing.prod.svc"]

[[caller]]
name = "evil"
agents = ["101-199"]
verbs = ["watch"]
certificate_names = ["dns:evil.svc"]
"#;
    let (server_ca, client_ca) = (Ca::new("server CA"), Ca::new("client CA"));
    let files = Files::new();
    let app = spawn_mtls(&files, &server_ca.server(1), &client_ca, TYPED).await;
    let release_as = |leaf: Leaf| {
        let server_ca = &server_ca;
        async move {
            let channel = tls_channel(app.grpc_addr, server_ca, Some(&leaf))
                .await
                .unwrap();
            CallControlClient::new(channel)
                .release_call(release_req("101"))
                .await
        }
    };
    // CN billing, SAN evil: evil, which may not release.
    let disguised = release_as(client_ca.issue("billing.prod.svc", &["evil.svc"], 20))
        .await
        .unwrap_err();
    expect_status(&disguised, Code::PermissionDenied, "PERMISSION_DENIED");
    assert_eq!(error_metadata(&disguised)["verb"], "release");
    // A CN matches a `cn:` entry only on a certificate without SANs, and a `dns:` entry never.
    let cn_only = release_as(client_ca.issue("billing.prod.svc", &[], 21))
        .await
        .unwrap();
    assert_eq!(cn_only.into_inner().outcome(), ReleaseOutcome::NoActiveCall);
    let evil_cn = release_as(client_ca.issue("evil.svc", &[], 22))
        .await
        .unwrap_err();
    expect_status(&evil_cn, Code::Unauthenticated, "UNAUTHENTICATED");
    // The DNS SAN of billing, in any case, is billing.
    let billing = release_as(client_ca.issue("anything", &["Billing.Prod.Svc"], 23))
        .await
        .unwrap();
    assert_eq!(billing.into_inner().outcome(), ReleaseOutcome::NoActiveCall);
    assert_eq!(app.deletes().len(), 2, "only billing's releases were sent");
}

/// The reload metrics of a real process (only the gRPC port's files: no gateway client
/// certificate here): a certificate and key that do not match are tried at every reload and
/// counted each time, and the time of the last load stays put; once fixed, they are applied and
/// the counting stops.
#[tokio::test]
async fn tls_reload_failures_are_counted_until_the_files_are_fixed() {
    ccgw_callcontrol::install_crypto_provider();
    let (ca, files) = (Ca::new("test CA"), Files::new());
    let (first, second) = (ca.server(1), ca.server(2));
    let (cert, key) = files.write_server(&first);
    let (_service, metrics, _logs) =
        common::spawn_demo_reloading(&["--tls-cert", &cert, "--tls-key", &key]).await;
    // The server's TLS files are on the metrics from the start.
    let scrape = || async {
        let failures = metric(&metrics, "ccgw_tls_reload_failures_total").await;
        let loaded_at = metric(&metrics, "ccgw_tls_loaded_timestamp_seconds").await;
        (
            failures.expect("TLS reload failures"),
            loaded_at.expect("TLS files loaded"),
        )
    };
    let (failures, loaded_at) = scrape().await;
    assert_eq!(failures, 0.0);
    assert!(loaded_at > 1.7e9, "{loaded_at}");
    // A new certificate beside the old key: a Secret updated in two steps.
    files.write("tls.crt", &second.cert_pem);
    let failing = common::read_until("failures counted at two reloads or more", scrape, |now| {
        now.0 >= 2.0
    })
    .await;
    assert_eq!(failing.1, loaded_at, "nothing was applied");
    files.write_server(&second);
    common::read_until("the fixed files were applied", scrape, |now| {
        now.1 > loaded_at
    })
    .await;
    let applied = scrape().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(scrape().await.0, applied.0, "still counting");
}
