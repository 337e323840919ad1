//! Once a release of the current call may have reached the gateway, no path
//! (handler, drain, hard stop, replay) answers anything that invites a retry: never
//! UNAVAILABLE, ABORTED or RESOURCE_EXHAUSTED, never RetryInfo.
use crate::common;

use ccgw_callcontrol::proto::{
    call_control_client::CallControlClient, ReleaseCallRequest, ReleaseConfirmation, ReleaseOutcome,
};
use ccgw_sim::Simulator;
use common::{
    expect_status, handing_over, hang, release_req, sim_config, spawn_app_with, wait_until, CALLER,
    WAIT,
};
use tokio::net::TcpListener;
use tonic::Code;

/// A real SIGTERM to a real process holding a ReleaseCall that released the call and waits for
/// its event: the answer is OK RELEASED, confirmation SHUTTING_DOWN (before: UNAVAILABLE with
/// RetryInfo, which a retry policy would act on), and the process exits cleanly.
#[tokio::test]
async fn sigterm_while_waiting_for_the_release_event_answers_released() {
    let sim = Simulator::new(sim_config());
    let sim_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim_addr = sim_listener.local_addr().unwrap();
    tokio::spawn(sim.clone().serve(sim_listener, std::future::pending()));
    let gateway_url = format!("http://{sim_addr}");
    let (facade, addr) = common::spawn_service(
        &[
            "--gateway-url",
            &gateway_url,
            // No deadline may end the wait before the SIGTERM does, however slow the machine.
            "--request-timeout-ms",
            "300000",
        ],
        &[],
    )
    .await;

    // An agent desktop signed in; its event polls will hang, so the event never comes.
    let desktop_guid = common::desktop_sign_in(sim_addr, "101", false).await.guid;
    sim.place_call("101", CALLER).unwrap();
    sim.push_fault(hang("/agentevent/"));
    let mut client = CallControlClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let request = handing_over(
        ReleaseCallRequest {
            wait_for_release_event: true,
            ..release_req("101")
        },
        &desktop_guid,
    );
    let waiting = tokio::spawn(async move { client.release_call(request).await });
    // Released, and the wait for its event is on (the poll loop polls).
    let polled = || {
        sim.requests()
            .iter()
            .any(|r| r.path.ends_with("/agentevent/101"))
    };
    wait_until("the call is released and its event awaited", || {
        sim.agent("101").unwrap().call_id.is_none() && polled()
    })
    .await;

    common::signal(&facade, common::Signal::Term).await;
    let answer = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the waiting ReleaseCall is answered")
        .unwrap()
        .expect("a release that happened is a success")
        .into_inner();
    assert_eq!(answer.outcome(), ReleaseOutcome::Released);
    assert_eq!(answer.confirmation(), ReleaseConfirmation::ShuttingDown);
    assert!(answer.release_event.is_none());
    common::exits_cleanly(facade).await;
}

/// The hard stop (here at once: --drain-timeout-secs 0) with the DELETE held at the
/// simulator: the release of the current call answers UNKNOWN / RELEASE_OUTCOME_UNKNOWN with
/// no RetryInfo (before: a bare UNAVAILABLE), while a dropcall caught the same way may be
/// retried (it names its call).
#[tokio::test]
async fn a_hard_stop_with_the_delete_at_the_gateway_answers_outcome_unknown() {
    let app = spawn_app_with(sim_config(), &["--drain-timeout-secs", "0"]).await;
    for agent in ["101", "102", "103"] {
        app.sign_in(agent).await;
        app.sim.place_call(agent, CALLER).unwrap();
    }
    let call = app.sim.agent("102").unwrap().call_id.unwrap();
    app.sim.push_fault(hang("/voicecall/"));
    let send = |request: ReleaseCallRequest| {
        let mut client = app.client.clone();
        tokio::spawn(async move { client.release_call(request).await })
    };
    // With a request_id the release runs on a task of its own; without, in the handler.
    let with_id = send(ReleaseCallRequest {
        request_id: "hard-stop-1".into(),
        ..release_req("101")
    });
    let dropcall = send(ReleaseCallRequest {
        call_id: call,
        ..release_req("102")
    });
    let without_id = send(release_req("103"));
    wait_until("the three releases are at the gateway", || {
        app.upstream().len() == 3
    })
    .await;
    app.shutdown().await;

    for (answer, agent) in [(with_id, "101"), (without_id, "103")] {
        let status = answer.await.unwrap().unwrap_err();
        let details = expect_status(&status, Code::Unknown, "RELEASE_OUTCOME_UNKNOWN");
        let metadata = &details.error_info().unwrap().metadata;
        assert_eq!(metadata["may_have_released"], "true");
        assert_eq!(metadata["cause"], "SHUTTING_DOWN");
        assert_eq!(metadata["agent_id"], agent);
        assert!(details.retry_info().is_none(), "{status:?}");
        if agent == "101" {
            assert_eq!(details.request_info().unwrap().request_id, "hard-stop-1");
        }
    }

    let status = dropcall.await.unwrap().unwrap_err();
    let details = expect_status(&status, Code::Unavailable, "SHUTTING_DOWN");
    assert!(details.retry_info().is_some());
}
