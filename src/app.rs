//! The built service, as the server runs it: the gRPC API and what is driven beside it (its
//! lifecycle, the callers files, the gateway's probes and files, the shared state's readiness,
//! the metrics the server's layers count into).
use crate::{
    api::CallControlApi, callers::Callers, gateway::GatewayClient, lifecycle::Lifecycle,
    shared_state::SharedState, telemetry::Metrics,
};

/// Cheap to clone; every clone is the same service.
#[derive(Debug, Clone)]
pub struct App {
    /// The CallControl handlers.
    pub api: CallControlApi,
    /// The service's shutdown, hard stop and tasks, which the server drives.
    pub(crate) lifecycle: Lifecycle,
    /// The callers files, re-read by the server; None when caller authorization is off.
    pub(crate) callers: Option<Callers>,
    /// What the service counts with; the server's layers count into it too.
    pub(crate) metrics: Metrics,
    /// What the replicas share (this process's own, alone): readiness follows it.
    pub(crate) shared_state: SharedState,
    /// The gateway, probed for the health service, its TLS files re-read.
    pub(crate) gateway: GatewayClient,
}
