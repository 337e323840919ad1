//! What the gRPC health service (`grpc.health.v1.Health`) reports, by service name:
//! - readiness, `""` and [`READINESS`]: NOT_SERVING until the service is built (a replica
//!   waits for NATS first), then SERVING until shutdown begins (a draining replica takes no new
//!   calls), then NOT_SERVING. The gateway's reachability is not part of
//!   it: with a shared gateway down, every replica would leave the Service, and callers would
//!   get connection refused instead of GATEWAY_UNREACHABLE with RetryInfo. Replicated
//!   (`--nats-url`), it is also NOT_SERVING until this replica has taken its share of the
//!   shards, and while it cannot reach NATS or NATS refuses its writes (its lease heartbeat and
//!   renewals), and SERVING again once they succeed: a replica cut off from the shared state
//!   refuses releases (or uses stale sessions) and polls nothing, so the Service should send
//!   calls to the others. If NATS is down for every replica, all of them leave the Service:
//!   that is the point of the signal. Having taken its share is latched: a replica does not
//!   leave the Service while the shards of a replica that died wait for their TTL.
//! - [`LIVENESS`]: SERVING as long as the process serves, draining included, so that Kubernetes
//!   never restarts a replica that is finishing its calls.
//! - [`GATEWAY`]: the CC-Gateway's damped reachability (`GatewayHealth`), for alerts and
//!   dashboards; NOT_SERVING until the first probe has reached it.
use std::{sync::Arc, time::Duration};

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

/// Whether the state the replicas share can be reached now (replicated mode only).
pub(crate) type SharedStateCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// How often readiness looks at the shared state's reachability (a flag read, no request).
const SHARED_STATE_CHECK_EVERY: Duration = Duration::from_millis(250);

/// Before the service is built: alive, not ready, the gateway not reached yet.
pub(crate) async fn starting(reporter: &HealthReporter) {
    set_readiness(reporter, ServingStatus::NotServing).await;
    reporter
        .set_service_status(LIVENESS, ServingStatus::Serving)
        .await;
    reporter
        .set_service_status(GATEWAY, ServingStatus::NotServing)
        .await;
}

/// Reports readiness and starts following the gateway: probes it every `probe_every` and
/// mirrors its reachability into [`GATEWAY`], until shutdown. With `shared_state`, readiness
/// follows it (NOT_SERVING until it holds).
pub(crate) async fn start(
    reporter: &HealthReporter,
    gateway: &GatewayClient,
    shared_state: Option<SharedStateCheck>,
    probe_every: Duration,
    lifecycle: &Lifecycle,
) {
    if shared_state.is_none() {
        reporter
            .set_serving::<CallControlServer<CallControlApi>>()
            .await;
        reporter
            .set_service_status("", ServingStatus::Serving)
            .await;
    }
    reporter
        .set_service_status(GATEWAY, gateway_status(gateway.health().state()))
        .await;
    let stop = lifecycle.shutdown().child_token();
    lifecycle.tasks().spawn({
        let (gateway, stop) = (gateway.clone(), stop.clone());
        async move { gateway.probe_until(probe_every, stop).await }
    });
    if let Some(reachable) = shared_state {
        lifecycle.tasks().spawn(follow_shared_state(
            reporter.clone(),
            reachable,
            stop.clone(),
        ));
    }
    lifecycle.tasks().spawn(report_gateway(
        reporter.clone(),
        gateway.health().subscribe(),
        stop,
    ));
}

/// Shutdown began: not ready any more; still alive.
pub(crate) async fn draining(reporter: &HealthReporter) {
    set_readiness(reporter, ServingStatus::NotServing).await;
}

async fn set_readiness(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status(READINESS, status).await;
    reporter.set_service_status("", status).await;
}

/// Readiness while serving: SERVING while the shared state holds (see the module's
/// documentation). Stops at shutdown, which owns readiness from then on.
async fn follow_shared_state(
    reporter: HealthReporter,
    reachable: SharedStateCheck,
    stop: CancellationToken,
) {
    // starting() reported NOT_SERVING.
    let mut was_reachable = false;
    loop {
        let now_reachable = reachable();
        if now_reachable != was_reachable {
            if now_reachable {
                tracing::info!(
                    "NATS takes this replica's writes and it holds its share of the shards: ready"
                );
                set_readiness(&reporter, ServingStatus::Serving).await;
            } else {
                tracing::warn!("NATS is unreachable or refuses this replica's writes: not ready until they succeed again");
                set_readiness(&reporter, ServingStatus::NotServing).await;
            }
            was_reachable = now_reachable;
            // Shutdown may have reported NOT_SERVING between the check and this report.
            if stop.is_cancelled() {
                draining(&reporter).await;
                return;
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(SHARED_STATE_CHECK_EVERY) => {}
        }
    }
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
