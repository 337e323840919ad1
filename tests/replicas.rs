//! Replicas sharing state through NATS JetStream (`--nats-url`): real nats-server processes,
//! the simulator, and facade processes on loopback ports.
mod common;

use ccgw_callcontrol::proto::ReleaseOutcome;
use common::{
    client_of, desktop_sign_in, handing_over, nats::NatsServer, release_req, sim_config,
    spawn_service, spawn_sim,
};

/// A facade with --nats-url connects, creates what it needs and serves: a release with a
/// handed-over session goes through.
#[tokio::test]
async fn a_replica_connects_to_nats_and_serves() {
    let Some(nats) = NatsServer::start().await else {
        return;
    };
    let (_sim, sim_addr, _stop_sim) = spawn_sim(sim_config(), None).await;
    let gateway = format!("http://{sim_addr}");
    let (_replica, addr) =
        spawn_service(&["--gateway-url", &gateway, "--nats-url", &nats.url()], &[]).await;
    let desktop = desktop_sign_in(sim_addr, "101", false).await;
    let answer = client_of(&addr)
        .await
        .release_call(handing_over(release_req("101"), &desktop.guid))
        .await
        .expect("released")
        .into_inner();
    assert_eq!(answer.outcome(), ReleaseOutcome::NoActiveCall);
}

/// Without NATS the replica refuses to start, naming what it could not reach.
#[tokio::test]
async fn a_replica_without_nats_does_not_start() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_ccgw-callcontrol"))
        .args(["--gateway-url", "http://127.0.0.1:9", "--no-caller-auth"])
        .args(["--nats-url", &format!("nats://127.0.0.1:{port}")])
        .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(30), output)
        .await
        .expect("the process exits")
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot connect to NATS"), "{stderr}");
}
