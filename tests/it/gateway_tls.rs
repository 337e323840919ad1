//! TLS to the gateway, against the simulator's HTTPS listener: the CA bundle, host name
//! verification, client certificates and the lab-only way out of verification, each through a
//! real handshake on a real socket.
use crate::common;

use ccgw_callcontrol::proto::{ReleaseKind, ReleaseOutcome};
use common::{
    error_metadata, expect_status, handing_over, junk_guid,
    pki::{pem_file, self_signed, Ca, Leaf},
    release_req,
    tls::sim_tls,
    watch_req, TestApp,
};
use tonic::Code;

/// `--gateway-ca-bundle` with `ca`'s certificate.
fn trusting(ca: &Ca) -> Vec<String> {
    let bundle = pem_file("ca.pem", &ca.pem);
    vec!["--gateway-ca-bundle".into(), bundle.display().to_string()]
}

/// `--gateway-client-cert` and `--gateway-client-key` with `client`'s files.
fn presenting(client: &Leaf) -> Vec<String> {
    let cert = pem_file("client.pem", &client.cert_pem);
    let key = pem_file("client-key.pem", &client.key_pem);
    vec![
        "--gateway-client-cert".into(),
        cert.display().to_string(),
        "--gateway-client-key".into(),
        key.display().to_string(),
    ]
}

async fn app(tls: std::sync::Arc<rustls::ServerConfig>, flags: &[String]) -> TestApp {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    common::spawn_app_tls(tls, "localhost", &flags).await
}

/// Signs agent 101 in, puts it in a call and releases it: every step crosses the TLS link.
async fn release_works(app: &TestApp) {
    app.sign_in("101").await;
    app.sim.place_call("101", "70093").unwrap();
    let answer = app.release(release_req("101")).await.expect("released");
    assert_eq!(answer.outcome(), ReleaseOutcome::Released);
}

/// A ReleaseCall whose handshake fails: the table's connect failure (UNAVAILABLE,
/// GATEWAY_UNREACHABLE, RetryInfo: nothing was sent, so repeating it is safe), and the
/// simulator saw no request at all.
async fn refused_before_sending(app: &TestApp) {
    let request = handing_over(release_req("101"), &junk_guid(1));
    let status = app.release_with(request).await.unwrap_err();
    let details = expect_status(&status, Code::Unavailable, "GATEWAY_UNREACHABLE");
    assert!(details.retry_info().is_some(), "{status:?}");
    assert!(status.message().contains("nothing was sent"), "{status:?}");
    assert_ne!(
        error_metadata(&status)
            .get("may_have_released")
            .map(String::as_str),
        Some("true"),
        "{status:?}"
    );
    assert!(
        app.sim.requests().is_empty(),
        "nothing may reach the gateway: {:?}",
        app.sim.requests()
    );
}

/// The success path: the gateway's certificate is issued for its name by the CA in
/// `--gateway-ca-bundle`; a release is carried out and the watched agent's event arrives.
#[tokio::test]
async fn releases_and_watches_over_https_with_the_ca_bundle() {
    let ca = Ca::new("gateway CA");
    let app = app(sim_tls(&ca.issue_for(&["localhost"]), None), &trusting(&ca)).await;
    app.sign_in("101").await;
    let mut stream = app.watch(watch_req(&["101"])).await;
    let call_id = app.sim.place_call("101", "70093").unwrap();
    let answer = app.release(release_req("101")).await.expect("released");
    assert_eq!(answer.outcome(), ReleaseOutcome::Released);
    let event = stream.event().await;
    assert_eq!(event.kind(), ReleaseKind::CallRelease);
    assert_eq!(event.call_id, call_id);
}

/// A certificate from a CA the facade does not trust is refused during the handshake.
#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_before_anything_is_sent() {
    let trusted = Ca::new("trusted CA");
    let other = Ca::new("other CA");
    let app = app(
        sim_tls(&other.issue_for(&["localhost"]), None),
        &trusting(&trusted),
    )
    .await;
    refused_before_sending(&app).await;
}

/// A certificate from the trusted CA, but for another name, is refused: host names are
/// verified.
#[tokio::test]
async fn a_certificate_for_another_host_name_is_refused() {
    let ca = Ca::new("gateway CA");
    let tls = sim_tls(&ca.issue_for(&["gateway.other.example"]), None);
    let app = app(tls, &trusting(&ca)).await;
    refused_before_sending(&app).await;
}

/// A gateway that requires client certificates: without `--gateway-client-cert` nothing gets
/// through; with a certificate from the CA it trusts, releases work.
#[tokio::test]
async fn a_gateway_requiring_client_certificates_gets_the_configured_one() {
    let ca = Ca::new("gateway CA");
    let clients = Ca::new("client CA");
    let server = ca.issue_for(&["localhost"]);

    let without = app(sim_tls(&server, Some(&clients)), &trusting(&ca)).await;
    // Under TLS 1.3 the gateway refuses the missing certificate only after the facade's side
    // of the handshake is over, with the request on its way; still a connect failure, since
    // the gateway never reads it.
    refused_before_sending(&without).await;

    let mut flags = trusting(&ca);
    flags.extend(presenting(&clients.issue_for(&["ccgw-callcontrol"])));
    let with = app(sim_tls(&server, Some(&clients)), &flags).await;
    release_works(&with).await;
}

/// `--gateway-insecure-skip-verify` accepts a self-signed certificate that is refused
/// without it.
#[tokio::test]
async fn skip_verify_accepts_a_self_signed_certificate() {
    let server = self_signed(&["localhost"]);
    let verified = app(sim_tls(&server, None), &[]).await;
    refused_before_sending(&verified).await;
    let lab = app(
        sim_tls(&server, None),
        &["--gateway-insecure-skip-verify".to_owned()],
    )
    .await;
    release_works(&lab).await;
}

/// A rotated client certificate is used without a restart: the facade starts with one the
/// gateway does not trust (its requests are refused, nothing sent); once the files hold one the
/// gateway trusts, it is re-read (`--reload-secs`) and requests get through.
#[tokio::test]
async fn a_rotated_client_certificate_is_used_without_a_restart() {
    let ca = Ca::new("gateway CA");
    let clients = Ca::new("client CA");
    let server = ca.issue_for(&["localhost"]);
    let files = common::pki::Files::new();
    let untrusted = Ca::new("another CA").issue_for(&["ccgw-callcontrol"]);
    let cert = files.write("client.pem", &untrusted.cert_pem);
    let key = files.write("client-key.pem", &untrusted.key_pem);
    let mut flags = trusting(&ca);
    flags.extend(
        [
            "--gateway-client-cert",
            &cert,
            "--gateway-client-key",
            &key,
            "--reload-secs",
            "1",
        ]
        .map(String::from),
    );
    let app = app(sim_tls(&server, Some(&clients)), &flags).await;
    refused_before_sending(&app).await;

    let trusted = clients.issue_for(&["ccgw-callcontrol"]);
    files.write("client.pem", &trusted.cert_pem);
    files.write("client-key.pem", &trusted.key_pem);
    // Sign-ins refused at the handshake send nothing; the first one after the reload gets
    // through.
    tokio::time::timeout(common::WAIT, async {
        loop {
            let answer = app
                .api
                .sessions()
                .sign_in(
                    common::agent_id("101"),
                    "secret",
                    "88001",
                    false,
                    common::deadline(),
                )
                .await;
            match answer {
                Ok(answer) if answer.is_ok() => return,
                Ok(refused) => panic!("the gateway refused the sign-in: {refused:?}"),
                Err(ccgw_callcontrol::gateway::GatewayError::Connect(_)) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await
                }
                Err(error) => panic!("not a refused handshake: {error:?}"),
            }
        }
    })
    .await
    .expect("the rotated certificate is used within the wait bound");
    app.sim.place_call("101", "70093").unwrap();
    let answer = app.release(release_req("101")).await.expect("released");
    assert_eq!(answer.outcome(), ReleaseOutcome::Released);
}
