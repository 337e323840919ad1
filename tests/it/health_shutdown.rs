//! Health reporting and graceful, bounded shutdown.
use crate::common;

use std::time::Duration;

use ccgw_callcontrol::{health as health_names, proto::ReleaseOutcome};
use ccgw_sim::{Fault, FaultRule, Simulator};
use common::{release_req, sim_config, spawn_app, spawn_app_with};
use tokio::{net::TcpListener, sync::oneshot};
use tonic::transport::Channel;
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
    assert_eq!(
        health(app.grpc_addr, "liveness").await,
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

/// The readiness names (the server's and the service's) and liveness.
const ALWAYS_SERVING: [&str; 3] = ["", health_names::READINESS, health_names::LIVENESS];

/// Waits (bounded) until `ccgw.gateway` reports `wanted`; at every look, readiness and
/// liveness must report SERVING.
async fn until_gateway_health(client: &mut HealthClient<Channel>, wanted: ServingStatus) {
    let checked = tokio::time::timeout(common::WAIT, async {
        loop {
            for service in ALWAYS_SERVING {
                assert_eq!(
                    check(client, service).await,
                    ServingStatus::Serving,
                    "{service:?} while the gateway health moves to {wanted:?}"
                );
            }
            if check(client, health_names::GATEWAY).await == wanted {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(checked.is_ok(), "ccgw.gateway never became {wanted:?}");
}

async fn check(client: &mut HealthClient<Channel>, service: &str) -> ServingStatus {
    client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap_or_else(|status| panic!("health of {service:?}: {status:?}"))
        .into_inner()
        .status()
}

async fn health_client(addr: std::net::SocketAddr) -> HealthClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
}

/// The simulator serving on `listener` until the returned sender fires.
fn serve_sim(
    sim: &Simulator,
    listener: TcpListener,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = tokio::spawn(sim.clone().serve(listener, async {
        let _ = stopped.await;
    }));
    (stop, serving)
}

/// The gateway stops and comes back on the same port. `ccgw.gateway`
/// follows (NOT_SERVING, then SERVING again); readiness and liveness stay SERVING throughout,
/// and a release during the outage is refused GATEWAY_UNREACHABLE with RetryInfo.
#[tokio::test]
async fn gateway_health_follows_the_gateway_and_readiness_does_not() {
    let sim = Simulator::new(sim_config());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim_addr = listener.local_addr().unwrap();
    let (stop_sim, sim_serving) = serve_sim(&sim, listener);
    let url = format!("http://{sim_addr}");
    let app = common::spawn_facade(
        sim.clone(),
        sim_addr,
        &url,
        &["--gateway-probe-secs", "1"],
        None,
    )
    .await;
    let gateway_health = app.api.sessions().gateway().health().clone();
    let mut client = health_client(app.grpc_addr).await;
    until_gateway_health(&mut client, ServingStatus::Serving).await;
    app.sign_in("101").await;

    stop_sim.send(()).unwrap();
    tokio::time::timeout(common::WAIT, sim_serving)
        .await
        .expect("the simulator stops")
        .unwrap()
        .unwrap();
    until_gateway_health(&mut client, ServingStatus::NotServing).await;
    assert!(!gateway_health.is_up());
    let refused = app.release(release_req("101")).await.unwrap_err();
    let details = common::expect_status(&refused, tonic::Code::Unavailable, "GATEWAY_UNREACHABLE");
    assert!(details.retry_info().is_some(), "{refused:?}");

    // tokio's listener sets SO_REUSEADDR: the port is free again at once.
    let listener = TcpListener::bind(sim_addr).await.expect("the port is free");
    let (_stop_sim, _sim_serving) = serve_sim(&sim, listener);
    until_gateway_health(&mut client, ServingStatus::Serving).await;
    assert!(gateway_health.is_up());
    assert_eq!(gateway_health.transitions(), 3, "up, down, up");
}

/// While a replica drains, it is not ready (readiness NOT_SERVING) but
/// alive (liveness SERVING), so Kubernetes takes it out of the Service without restarting it.
#[tokio::test]
async fn a_draining_replica_is_not_ready_but_alive() {
    let app = spawn_app_with(sim_config(), &["--drain-timeout-secs", "1"]).await;
    let client = health_client(app.grpc_addr).await;
    let mut watches = Vec::new();
    for service in ALWAYS_SERVING {
        let mut watch = client
            .clone()
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(next_status(&mut watch).await, Some(ServingStatus::Serving));
        watches.push(watch);
    }
    let [mut server, mut service, mut liveness] = watches.try_into().ok().unwrap();
    // The open watches keep the drain busy until its timeout.
    let shutdown = tokio::spawn(app.shutdown());
    assert_eq!(
        next_status(&mut server).await,
        Some(ServingStatus::NotServing)
    );
    assert_eq!(
        next_status(&mut service).await,
        Some(ServingStatus::NotServing)
    );
    tokio::time::timeout(common::WAIT, shutdown)
        .await
        .expect("the server stops")
        .unwrap();
    // Liveness said nothing new during the whole drain: an answer would be here by now.
    let during_drain = tokio::time::timeout(Duration::from_millis(200), liveness.message()).await;
    assert!(
        !matches!(&during_drain, Ok(Ok(Some(update))) if update.status() != ServingStatus::Serving),
        "liveness changed while draining: {during_drain:?}"
    );
}

/// The next status a health watch reports (`None` when it ended), within the wait bound.
async fn next_status(
    watch: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
) -> Option<ServingStatus> {
    tokio::time::timeout(common::WAIT, watch.message())
        .await
        .expect("a health update within the wait bound")
        .expect("the watch runs")
        .map(|answer| answer.status())
}

/// The kubelet's view of a draining replica, through the plaintext health port of a real
/// process: after SIGTERM, while a ReleaseCall still holds the drain open, a new connection to
/// the health port is answered: not ready, still alive. (The gRPC port stops accepting at once.)
#[tokio::test]
async fn the_health_port_answers_a_draining_replica_not_ready_but_alive() {
    let (sim, sim_addr, _stop_sim) = common::spawn_sim(sim_config(), None).await;
    let gateway_url = format!("http://{sim_addr}");
    let (facade, serving) = common::spawn_service_logging(
        &[
            "--gateway-url",
            &gateway_url,
            "--health-listen",
            "127.0.0.1:0",
            // The held release, not a timeout, keeps the drain open, however slow the machine.
            "--request-timeout-ms",
            "300000",
            "--drain-timeout-secs",
            "300",
            "--max-connection-age-grace-secs",
            "300",
        ],
        &[],
    )
    .await;
    let grpc = serving["listen"].as_str().unwrap().to_owned();
    let health_port: std::net::SocketAddr = serving["health"].as_str().unwrap().parse().unwrap();
    assert_eq!(health(health_port, "").await, ServingStatus::Serving);
    assert_eq!(
        health(health_port, health_names::LIVENESS).await,
        ServingStatus::Serving
    );

    // A release held at the simulator keeps the drain from ending.
    let guid = common::desktop_sign_in(sim_addr, "101", false).await.guid;
    sim.place_call("101", "70093").unwrap();
    sim.push_fault(common::hang("/voicecall/"));
    let mut client = ccgw_callcontrol::proto::call_control_client::CallControlClient::connect(
        format!("http://{grpc}"),
    )
    .await
    .unwrap();
    let held = tokio::spawn(async move {
        client
            .release_call(common::handing_over(release_req("101"), &guid))
            .await
    });
    common::wait_until("the release reaches the simulator", || {
        sim.requests().iter().any(|r| r.method == "DELETE")
    })
    .await;

    common::signal(&facade, common::Signal::Term).await;
    tokio::time::timeout(common::WAIT, async {
        while health(health_port, health_names::READINESS).await != ServingStatus::NotServing {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("readiness turns NOT_SERVING on the health port");
    assert_eq!(health(health_port, "").await, ServingStatus::NotServing);
    assert_eq!(
        health(health_port, health_names::LIVENESS).await,
        ServingStatus::Serving
    );
    assert!(!held.is_finished(), "the drain was still open");
    held.abort();
}
