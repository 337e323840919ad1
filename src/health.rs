//! What the gRPC health service (`grpc.health.v1.Health`) reports, by service name:
//! - readiness, `""` and [`READINESS`]: SERVING from start until shutdown begins (a draining
//!   replica takes no new calls), then NOT_SERVING. The gateway's reachability is not part of
//!   it: with a shared gateway down, every replica would leave the Service, and callers would
//!   get connection refused instead of GATEWAY_UNREACHABLE with RetryInfo.
//! - [`LIVENESS`]: SERVING as long as the process serves, draining included, so that Kubernetes
//!   never restarts a replica that is finishing its calls.
//! - [`GATEWAY`]: the CC-Gateway's damped reachability (`GatewayHealth`), for alerts and
//!   dashboards; NOT_SERVING until the first probe has reached it.
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic_health::{server::HealthReporter, ServingStatus};

use crate::{
    api::{CallControlApi, CallControlServer},
    gateway::{GatewayClient, Reachability},
    lifecycle::Lifecycle,
};

/// The service's own name: readiness, together with `""` (the whole server).
pub const READINESS: &str = "ccgw.callcontrol.v1.CallControl";
/// The process serves.
pub const LIVENESS: &str = "liveness";
/// The CC-Gateway is reachable.
pub const GATEWAY: &str = "ccgw.gateway";

/// Reports every name's starting status and starts following the gateway: probes it every
/// `probe_every` and mirrors its reachability into [`GATEWAY`], until shutdown.
pub(crate) async fn start(
    reporter: &HealthReporter,
    gateway: &GatewayClient,
    probe_every: Duration,
    lifecycle: &Lifecycle,
) {
    reporter
        .set_serving::<CallControlServer<CallControlApi>>()
        .await;
    reporter
        .set_service_status(LIVENESS, ServingStatus::Serving)
        .await;
    reporter
        .set_service_status(GATEWAY, gateway_status(gateway.health().state()))
        .await;
    let stop = lifecycle.shutdown().child_token();
    lifecycle.tasks().spawn({
        let (gateway, stop) = (gateway.clone(), stop.clone());
        async move { gateway.probe_until(probe_every, stop).await }
    });
    lifecycle.tasks().spawn(report_gateway(
        reporter.clone(),
        gateway.health().subscribe(),
        stop,
    ));
}

/// Shutdown began: not ready any more; still alive.
pub(crate) async fn draining(reporter: &HealthReporter) {
    reporter
        .set_not_serving::<CallControlServer<CallControlApi>>()
        .await;
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
}

fn gateway_status(state: Reachability) -> ServingStatus {
    match state {
        Reachability::Up => ServingStatus::Serving,
        Reachability::Down | Reachability::Unknown => ServingStatus::NotServing,
    }
}

async fn report_gateway(
    reporter: HealthReporter,
    mut states: watch::Receiver<Reachability>,
    stop: CancellationToken,
) {
    loop {
        let state = *states.borrow_and_update();
        reporter
            .set_service_status(GATEWAY, gateway_status(state))
            .await;
        tokio::select! {
            () = stop.cancelled() => return,
            changed = states.changed() => if changed.is_err() { return },
        }
    }
}
