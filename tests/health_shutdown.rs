//! Health reporting and graceful, bounded shutdown.
mod common;

use std::time::Duration;

use ccgw_callcontrol::proto::ReleaseOutcome;
use ccgw_sim::{Fault, FaultRule};
use common::{release_req, sim_config, spawn_app, spawn_app_with};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

async fn health(addr: std::net::SocketAddr, service: &str) -> ServingStatus {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let answer = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    answer.status()
}

fn latency(ms: u64) -> FaultRule {
    FaultRule {
        fault: Fault::Latency { ms },
        count: 1,
        method: None,
        path_contains: Some("/voicecall/".into()),
    }
}

/// Waits (bounded) until the simulator has received `n` release requests.
async fn until_upstream(app: &common::TestApp, n: usize) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while app.upstream().len() < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("request reached the simulator");
}

#[tokio::test]
async fn health_reports_the_server_and_the_service() {
    let app = spawn_app().await;
    assert_eq!(health(app.grpc_addr, "").await, ServingStatus::Serving);
    assert_eq!(
        health(app.grpc_addr, "ccgw.callcontrol.v1.CallControl").await,
        ServingStatus::Serving
    );
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_release_finish() {
    let app = spawn_app().await;
    app.sign_in("101").await;
    app.sim.place_call("101", "70093").unwrap();
    app.sim.push_fault(latency(300));
    let mut client = app.client.clone();
    let in_flight = tokio::spawn(async move { client.release_call(release_req("101")).await });
    until_upstream(&app, 1).await;
    let addr = app.grpc_addr;
    app.shutdown().await;
    let answer = in_flight
        .await
        .unwrap()
        .expect("in-flight call finished")
        .into_inner();
    assert_eq!(answer.outcome(), ReleaseOutcome::Released);
    assert!(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .is_err(),
        "still accepting connections after shutdown"
    );
}

#[tokio::test]
async fn shutdown_does_not_wait_forever_for_a_hung_call() {
    let app = spawn_app_with(
        sim_config(),
        &[
            "--drain-timeout-secs",
            "1",
            "--request-timeout-ms",
            "120000",
        ],
    )
    .await;
    app.sign_in("101").await;
    app.sim.push_fault(latency(120_000));
    let mut client = app.client.clone();
    let hung = tokio::spawn(async move { client.release_call(release_req("101")).await });
    until_upstream(&app, 1).await;
    let started = std::time::Instant::now();
    app.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "drain took {:?}",
        started.elapsed()
    );
    let result = tokio::time::timeout(Duration::from_secs(10), hung)
        .await
        .expect("hung call ended")
        .unwrap();
    assert!(
        result.is_err(),
        "a call that never got its answer cannot have succeeded"
    );
}
