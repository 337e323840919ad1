//! The metrics endpoint: the registry, the state it reads at each scrape, and its server, which
//! runs beside the gRPC server and stops after it (scrapes during the drain still see it).
use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use futures_util::StreamExt;

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder, registry::Registry};
use tokio::net::TcpListener;

use super::StartupError;
use crate::{
    app::App,
    config::Config,
    connections::{self, Admission, ConnectionLimits, LimitedConnection},
    lifecycle::SideServer,
    reload::ReloadStats,
    server::ServerSettings,
    shared_state::SharedState,
    telemetry::{
        endpoint, ConnectionClosed, DroppedLogLines, Listener, Metrics, ScrapeTimeMetrics,
    },
};

/// The running metrics endpoint.
pub(super) struct MetricsEndpoint {
    pub(super) addr: SocketAddr,
    server: SideServer<std::io::Error>,
}

impl MetricsEndpoint {
    /// Binds `--metrics-listen` and serves `registry` there, with the service's state added,
    /// under the side ports' connection caps with `handshake_timeout` (counted in `metrics`).
    pub(super) async fn start(
        addr: SocketAddr,
        mut registry: Registry,
        readings: ScrapeTimeMetrics,
        metrics: &Metrics,
        handshake_timeout: Duration,
    ) -> Result<Self, StartupError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartupError::MetricsListen { addr, source })?;
        let addr = listener.local_addr()?;
        readings.register(&mut registry);
        #[cfg(target_os = "linux")]
        crate::telemetry::process::register(&mut registry);
        let registry = Arc::new(registry);
        let limits = ConnectionLimits::side_port(handshake_timeout);
        let admission = Admission::new(limits, metrics.listener(Listener::Metrics).clone());
        let incoming = connections::accept(listener, admission)
            .map(|(tcp, _, admitted)| LimitedConnection::timed_by_protocol(tcp, admitted));
        let header_timeouts = metrics
            .listener(Listener::Metrics)
            .closed(ConnectionClosed::RequestHeadTimeout)
            .clone();
        let server = SideServer::spawn("the metrics endpoint", |stop| {
            endpoint::serve(incoming, registry, handshake_timeout, header_timeouts, stop)
        });
        Ok(Self { addr, server })
    }

    /// Stops serving; a scrape under way gets a second to finish.
    pub(super) async fn stop(self) {
        self.server.stop().await;
    }
}

/// The service's state for the metrics endpoint, which serves before the service is built (a
/// replica may wait for NATS): until then only `ccgw_nats_connected`, 0.
#[derive(Clone, Default)]
pub(super) struct ServiceState {
    built: Arc<OnceLock<ScrapeTimeMetrics>>,
    shared_state: Arc<OnceLock<SharedState>>,
}

impl ServiceState {
    /// The readings known from the start; adds those of the built service to `registry`.
    pub(super) fn readings(&self, config: &Config, registry: &mut Registry) -> ScrapeTimeMetrics {
        registry.register_collector(Box::new(self.clone()));
        let mut readings = ScrapeTimeMetrics::default();
        // Only replicas have a NATS to reach: an alert on it cannot fire for a single process.
        if config.nats().is_some() {
            let shared_state = self.shared_state.clone();
            readings.gauge(
                "ccgw_nats_connected",
                "1 while this replica reaches NATS and NATS takes its writes (its lease heartbeat and renewals); 0 while it waits for NATS at startup",
                move || i64::from(shared_state.get().is_some_and(SharedState::takes_writes)),
            );
        }
        readings
    }

    /// The service is built: its state is read from now on.
    pub(super) fn built(
        &self,
        app: &App,
        config: &Config,
        server: &ServerSettings,
        dropped_log_lines: Option<DroppedLogLines>,
    ) {
        let _ = self.shared_state.set(app.shared_state.clone());
        let _ = self
            .built
            .set(service_state(app, config, server, dropped_log_lines));
    }
}

impl std::fmt::Debug for ServiceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceState")
            .field("built", &self.built.get().is_some())
            .finish()
    }
}

impl Collector for ServiceState {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        match self.built.get() {
            Some(readings) => readings.encode(encoder),
            None => Ok(()),
        }
    }
}

/// The service's state, read at each scrape: one line per metric.
fn service_state(
    app: &App,
    config: &Config,
    server: &ServerSettings,
    dropped_log_lines: Option<DroppedLogLines>,
) -> ScrapeTimeMetrics {
    let mut state = ScrapeTimeMetrics::default();
    let events = app.api.events().clone();
    let sessions = app.api.sessions().clone();
    let limits = config.events();
    let read = |f: fn(&crate::events::EventHub) -> usize| reading(&events, move |e| gauge(f(e)));
    state
        .gauge(
            "ccgw_poll_loops_running",
            "Poll loops running (one per polled agent)",
            read(|e| e.poll_loops_running()),
        )
        .gauge(
            "ccgw_event_polls_in_flight",
            "Event polls sent to the gateway and not answered yet (with replicas: the agents \
             this replica polls now)",
            read(|e| e.polls_in_flight()),
        )
        .gauge(
            "ccgw_poll_loops_failing",
            "Poll loops whose last poll failed (retrying with backoff)",
            read(|e| e.failing_poll_loops()),
        )
        .counter(
            "ccgw_poll_failures",
            "Event polls that failed (transport, HTTP, unexpected retcode)",
            reading(&events, |e| e.stats().poll_failures),
        )
        .counter(
            "ccgw_release_events_observed",
            "Release events read from the gateway",
            reading(&events, |e| e.stats().release_events),
        )
        .counter(
            "ccgw_malformed_events",
            "Gateway events that could not be read (dropped)",
            reading(&events, |e| e.stats().malformed_events),
        )
        .counter(
            "ccgw_event_fields_dropped",
            "Optional fields left out of release events because they failed validation (a \
             customer number, an eventGenTime out of range)",
            reading(&events, |e| e.stats().dropped_fields),
        )
        .counter(
            "ccgw_event_log_appends_retried",
            "Appends to the shared event log (--nats-url) that failed and were retried",
            reading(&events, |e| e.stats().log.appends_retried),
        )
        .counter(
            "ccgw_event_log_appends_lost",
            "Release events given up at shutdown because the shared event log was unreachable",
            reading(&events, |e| e.stats().log.appends_lost),
        )
        .gauge(
            "ccgw_event_log_follower_lag",
            "Records in the shared event log this replica had not delivered yet, when it last received one",
            reading(&events, |e| i64::try_from(e.stats().log.follower_lag).unwrap_or(i64::MAX)),
        )
        .gauge(
            "ccgw_nats_shards_held",
            "Shards whose poll lease this replica holds (0 without --nats-url)",
            reading(&events, |e| gauge(e.ownership_stats().shards_held)),
        )
        .counter(
            "ccgw_nats_lease_renewals_failed",
            "Heartbeats and shard lease renewals that failed (NATS unreachable or slow)",
            reading(&events, |e| e.ownership_stats().renewals_failed),
        )
        .counter(
            "ccgw_nats_shard_leases_lost",
            "Shard leases another replica took over while this one held them (it had stopped \
             renewing: paused, cut off)",
            reading(&events, |e| e.ownership_stats().leases_lost),
        )
        .gauge(
            "ccgw_streams_open",
            "WatchReleaseEvents streams open (watcher permits in use)",
            read(|e| e.watchers()),
        )
        .gauge(
            "ccgw_streams_max",
            "--max-watchers: streams allowed at once",
            constant(limits.max_watchers),
        )
        .gauge(
            "ccgw_release_waiters",
            "ReleaseCalls waiting for their release event (release-waiter permits in use)",
            read(|e| e.release_waiters()),
        )
        .gauge(
            "ccgw_release_waiters_max",
            "--max-release-waiters",
            constant(limits.max_release_waiters),
        )
        .gauge(
            "ccgw_polled_agents",
            "Agents counted against --max-polled-agents",
            read(|e| e.polled_agents_in_use()),
        )
        .gauge(
            "ccgw_polled_agents_max",
            "--max-polled-agents",
            constant(limits.max_polled_agents),
        )
        .gauge(
            "ccgw_sessions_held",
            "Agents whose gateway session the facade holds",
            reading(&sessions, |s| gauge(s.registry().len())),
        )
        .gauge(
            "ccgw_sessions_max",
            "--max-sessions",
            constant(config.session_limits().max_sessions),
        )
        .counter(
            "ccgw_guid_rotations",
            "Guids the gateway rotated (Set-GUID) in held sessions",
            reading(&sessions, |s| s.registry().guid_rotations()),
        )
        .counter(
            "ccgw_session_store_failed_writes",
            "Session changes NATS did not take (unreachable, timed out); each is retried",
            reading(&sessions, |s| s.registry().store_counters().failed_writes()),
        )
        .counter(
            "ccgw_session_store_conflicts",
            "Session changes based on a revision another replica had moved past; the newer session was kept",
            reading(&sessions, |s| s.registry().store_counters().conflicts()),
        )
        .counter(
            "ccgw_session_store_dropped_changes",
            "Session changes not shared because changes of twice --max-sessions agents were already waiting for NATS (the agent's next change carries its whole session)",
            reading(&sessions, |s| s.registry().store_counters().dropped_changes()),
        )
        .counter(
            "ccgw_gateway_unreadable_set_guid",
            "Set-GUID headers without a readable Guid (ignored)",
            reading(&sessions, |s| s.gateway().stats().unreadable_set_guid),
        )
        .gauge(
            "ccgw_gateway_up",
            "1 while the gateway is reachable (health ccgw.gateway: down after 3 failed probes or connects in a row, up after 2 successes)",
            reading(&sessions, |s| i64::from(s.gateway().health().is_up())),
        )
        .counter(
            "ccgw_gateway_reachability_changes",
            "Times the gateway's reachability changed (a flapping gateway moves this often)",
            reading(&sessions, |s| s.gateway().health().transitions()),
        )
        .gauge(
            "ccgw_gateway_requests_in_flight",
            "Gateway requests other than event polls being sent (at most --max-gateway-requests)",
            reading(&sessions, |s| gauge(s.gateway().admission().in_flight())),
        )
        .gauge(
            "ccgw_gateway_requests_waiting",
            "Gateway requests waiting for their turn (at most --max-gateway-queue, then GATEWAY_BUSY)",
            reading(&sessions, |s| gauge(s.gateway().admission().waiting())),
        )
        .gauge(
            "ccgw_gateway_requests_max",
            "--max-gateway-requests",
            constant(config.gateway.max_gateway_requests as usize),
        )
        .gauge(
            "ccgw_idempotency_entries",
            "request_ids whose answers are remembered",
            reading(&app.shared_state, |s| gauge(s.request_ids().entries())),
        )
        .gauge(
            "ccgw_idempotency_capacity",
            "--idempotency-capacity",
            constant(config.release_policy().idempotency_capacity),
        );
    if let Some(callers) = &app.callers {
        state
            .counter_by(
                "ccgw_caller_files_reload_failures",
                "Reloads of the callers or tokens file that failed (unreadable, invalid, or a \
                 tokens file line left out as unusable); tried again at every reload until fixed",
                "file",
                reading(callers, |c| c.reload_failures()),
            )
            .gauge_by(
                "ccgw_caller_files_loaded_timestamp_seconds",
                "When the callers or tokens file's contents were last applied in full (Unix time)",
                "file",
                reading(callers, |c| c.loaded_at()),
            );
    }
    let tls_files: Vec<(&'static str, Arc<ReloadStats>)> = [
        server
            .tls
            .as_ref()
            .map(|_| ("server", server.tls_reloads.clone())),
        app.gateway
            .tls_reload_stats()
            .map(|stats| ("gateway_client", stats)),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !tls_files.is_empty() {
        let tls_files = Arc::new(tls_files);
        state
            .counter_by(
                "ccgw_tls_reload_failures",
                "Reloads of the TLS files that failed (server: the gRPC port's certificate, key \
                 and client CA; gateway_client: the gateway client certificate and key): \
                 unreadable, invalid, a key that does not match; tried again at every reload \
                 until fixed",
                "files",
                per_files(&tls_files, ReloadStats::failures),
            )
            .gauge_by(
                "ccgw_tls_loaded_timestamp_seconds",
                "When the TLS files' contents were last applied (Unix time; startup included)",
                "files",
                per_files(&tls_files, ReloadStats::loaded_at),
            );
    }
    if let Some(dropped) = dropped_log_lines {
        state.counter(
            "ccgw_log_lines_dropped",
            "Log lines dropped because the log writer's queue was full",
            move || dropped.dropped_lines() as u64,
        );
    }
    state
}

/// `read` of each named set of files' reload stats at each scrape, by name.
fn per_files<T>(
    files: &Arc<Vec<(&'static str, Arc<ReloadStats>)>>,
    read: fn(&ReloadStats) -> T,
) -> impl Fn() -> Vec<(String, T)> + Send + Sync + 'static
where
    T: 'static,
{
    reading(files, move |files| {
        files
            .iter()
            .map(|(name, stats)| ((*name).to_owned(), read(stats)))
            .collect()
    })
}

/// A reading of `state` at each scrape: `read` of a clone of it.
fn reading<S, T>(
    state: &S,
    read: impl Fn(&S) -> T + Send + Sync + 'static,
) -> impl Fn() -> T + Send + Sync + 'static
where
    S: Clone + Send + Sync + 'static,
{
    let state = state.clone();
    move || read(&state)
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn constant(n: usize) -> impl Fn() -> i64 + Send + Sync + 'static {
    let value = gauge(n);
    move || value
}
