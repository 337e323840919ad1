//! Handed-over sessions are safe by construction, and what callers
//! can make the facade hold is bounded by configuration.
use crate::common;

use ccgw_callcontrol::proto::ReleaseOutcome;
use common::{
    expect_status, handing_over, hang, junk_guid, release_req, sim_config, spawn_app_with,
    wait_until, watch_req, CALLER,
};
use tonic::Code;

/// A caller that always sends the sign-in Guid (as docs/api.md's example does) keeps
/// working after any number of rotations: the rotated session the facade learned goes first,
/// and the stale Guid is never installed.
#[tokio::test]
async fn the_sign_in_guid_handed_over_after_20_rotations_releases_with_the_newest() {
    // A release with the rotated-away Guid would fail.
    let app = spawn_app_with(common::sim_refusing_rotated_guids(), &[]).await;
    let sign_in = app.sign_in("101").await;
    let _watch = app.watch(watch_req(&["101"])).await;
    let mut newest = sign_in.clone();
    for rotation in 1..=20 {
        app.sim.rotate_guid("101").unwrap();
        wait_until(&format!("rotation {rotation} reaches the facade"), || {
            app.guid_of("101").is_some_and(|g| g != newest)
        })
        .await;
        newest = app.guid_of("101").unwrap();
    }
    app.sim.place_call("101", CALLER).unwrap();
    let answer = app
        .release_with(handing_over(release_req("101"), &sign_in))
        .await
        .unwrap();
    assert_eq!(answer.outcome(), ReleaseOutcome::Released);
    let deletes: Vec<_> = app.deletes();
    assert_eq!(deletes.len(), 1, "the stale Guid was tried");
    assert_eq!(deletes[0].guid.as_deref(), Some(newest.as_str()));
    assert_eq!(app.guid_of("101").as_deref(), Some(newest.as_str()));
}

/// A desktop that signed in again (forcelogin ends the old session) hands its new Guid
/// over: the gateway refuses the facade's, accepts the handed-over one, which is adopted.
#[tokio::test]
async fn a_forcelogin_guid_handed_over_is_adopted_once_the_gateway_accepts_it() {
    let app = spawn_app_with(sim_config(), &[]).await;
    let first = app.sign_in("101").await;
    let fresh = app.desktop_sign_in("101", true).await.guid;
    assert_ne!(first, fresh);
    app.sim.place_call("101", CALLER).unwrap();
    let answer = app
        .release_with(handing_over(release_req("101"), &fresh))
        .await
        .unwrap();
    assert_eq!(answer.outcome(), ReleaseOutcome::Released);
    let deletes: Vec<_> = app
        .deletes()
        .into_iter()
        .map(|r| r.guid.unwrap_or_default())
        .collect();
    // The refusal of the old one changed nothing, so the second attempt was safe.
    assert_eq!(deletes, [first, fresh.clone()]);
    assert_eq!(app.guid_of("101").as_deref(), Some(fresh.as_str()));

    // Kept: the next release needs no handover.
    app.sim.place_call("101", CALLER).unwrap();
    let answer = app.release(release_req("101")).await.unwrap();
    assert_eq!(answer.outcome(), ReleaseOutcome::Released);
}

/// A handed-over Guid the gateway refuses is not kept, and ends nothing.
#[tokio::test]
async fn a_refused_handover_is_not_kept() {
    let app = spawn_app_with(sim_config(), &[]).await;
    let junk = "279fe21d-0000-4437-84c3-ab9e9dae20f5.AgentGateway0";
    let status = app
        .release_with(handing_over(release_req("101"), junk))
        .await
        .unwrap_err();
    expect_status(&status, Code::FailedPrecondition, "AGENT_NOT_SIGNED_IN");
    assert_eq!(app.api.sessions().registry().len(), 0);
}

/// Handovers that do go on to the gateway are capped by --max-sessions; one beyond
/// it is refused with nothing polled.
#[tokio::test]
async fn handed_over_sessions_are_capped() {
    let app = spawn_app_with(sim_config(), &["--max-sessions", "50"]).await;
    // Polls hang, so every offered session stays held (a refused one would be dropped).
    app.sim.push_fault(hang("/agentevent/"));
    let mut streams = Vec::new();
    for n in 0..50 {
        let agent = (5000 + n).to_string();
        streams.push(
            app.watch(handing_over(watch_req(&[&agent]), &junk_guid(n)))
                .await,
        );
    }
    assert_eq!(app.api.sessions().registry().len(), 50);
    let status = app
        .watch_refused(handing_over(watch_req(&["5050"]), &junk_guid(50)))
        .await;
    expect_status(&status, Code::ResourceExhausted, "TOO_MANY_SESSIONS");
    assert_eq!(app.api.sessions().registry().len(), 50);
    assert!(!app.polling_agents().contains(&"5050".to_owned()));
}
