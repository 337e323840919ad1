//! Guids and cookies are credentials: they must not reach logs (at any level, ours or our
//! dependencies'), status messages or error details.
mod common;

use std::{
    io::Write,
    sync::{Arc, Mutex},
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

#[tokio::test]
async fn guids_and_cookies_never_reach_logs_or_statuses() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

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

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("ReleaseCall")
            && logs.contains("CallControl/ReleaseCall")
            && logs.contains("CallControl/WatchReleaseEvents")
            && logs.contains("gateway issued a new Guid")
            && logs.contains("poll failed")
            && logs.contains("it is the agent's session now"),
        "capture works"
    );
    for secret in &secrets {
        assert!(
            !logs.contains(secret.as_str()),
            "a credential reached the logs"
        );
        for status in &statuses {
            let shown = format!("{status:?} {:?}", status.get_error_details());
            assert!(
                !shown.contains(secret.as_str()),
                "a credential reached a status: {shown}"
            );
        }
    }
}
