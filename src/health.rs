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
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic_health::{server::HealthReporter, ServingStatus};

use crate::{
    gateway::{GatewayClient, Reachability},
    lifecycle::Lifecycle,
    shared_state::SharedState,
};

/// The service's own name: readiness, together with `""` (the whole server).
pub const READINESS: &str = "ccgw.callcontrol.v1.CallControl";
/// The process serves.
pub const LIVENESS: &str = "liveness";
/// The CC-Gateway is reachable.
pub const GATEWAY: &str = "ccgw.gateway";

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
/// mirrors its reachability into [`GATEWAY`], until shutdown. Readiness follows
/// `shared_state` (see the module's documentation; a process alone is ready at once).
pub(crate) async fn start(
    reporter: &HealthReporter,
    gateway: &GatewayClient,
    shared_state: SharedState,
    probe_every: Duration,
    lifecycle: &Lifecycle,
) {
    reporter
        .set_service_status(GATEWAY, gateway_status(gateway.health().state()))
        .await;
    let stop = lifecycle.shutdown().child_token();
    lifecycle.tasks().spawn({
        let (gateway, stop) = (gateway.clone(), stop.clone());
        async move { gateway.probe_until(probe_every, stop).await }
    });
    // The first reading is reported before the server serves, so that a process alone is
    // ready from its first call on.
    let ready = shared_state.ready();
    if ready {
        set_readiness(reporter, ServingStatus::Serving).await;
    }
    lifecycle.tasks().spawn(follow_shared_state(
        reporter.clone(),
        shared_state,
        ready,
        stop.clone(),
    ));
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
    shared_state: SharedState,
    mut was_ready: bool,
    stop: CancellationToken,
) {
    loop {
        let now_ready = shared_state.ready();
        if now_ready != was_ready {
            if now_ready {
                tracing::info!(
                    "the shared state takes this replica's writes and it holds its share of the shards: ready"
                );
                set_readiness(&reporter, ServingStatus::Serving).await;
            } else {
                tracing::warn!("the shared state (NATS) is unreachable or refuses this replica's writes: not ready until they succeed again");
                set_readiness(&reporter, ServingStatus::NotServing).await;
            }
            was_ready = now_ready;
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
