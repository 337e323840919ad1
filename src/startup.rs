//! Builds the application from its configuration, makes room for its file descriptors (the
//! open-file limit), and the `--simulate` demo (only with the `simulator` feature; without it
//! `--simulate` is refused).
use std::future::Future;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use tokio_util::sync::CancellationToken;

use self::metrics::{MetricsEndpoint, ServiceState};

use crate::{
    api::CallControlApi,
    app::App,
    callers::{Callers, StreamSlots},
    config::{Config, ConfigError},
    connections::SIDE_PORT_CONNECTIONS,
    events::EventHub,
    gateway::GatewayClient,
    lifecycle::Lifecycle,
    nats,
    release::ReleaseService,
    server::{self, HealthEndpoint},
    sessions::Sessions,
    shared_state::{SharedMemory, SharedState},
    telemetry::{DroppedLogLines, Metrics},
};

mod cleartext;
#[cfg(feature = "simulator")]
mod demo;
mod metrics;
#[cfg(feature = "simulator")]
pub use demo::{DEMO_AGENTS, DEMO_CALLER};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("gateway settings: {0}")]
    Gateway(#[from] crate::gateway::SettingsError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("--health-listen {addr}: {source}")]
    HealthListen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("--metrics-listen {addr}: {source}")]
    MetricsListen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Server(#[from] server::ServerError),
    #[error(transparent)]
    Nats(#[from] crate::nats::NatsError),
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("demo setup: {0}")]
    Demo(String),
    #[error(
        "--simulate: this build has no simulator (it was built without the `simulator` feature)"
    )]
    NoSimulator,
}

/// The service on the gateway at `gateway_url`, counting into `metrics`.
pub async fn build_app(
    config: &Config,
    gateway_url: String,
    metrics: &Metrics,
) -> Result<App, StartupError> {
    config.validate()?;
    // The gateway's settings are checked before the wait for NATS, which may be long.
    let gateway = GatewayClient::new(&config.gateway(gateway_url)?)?.counted_in(metrics);
    let lifecycle = Lifecycle::new();
    let policy = config.release_policy();
    let shared_state = match config.nats() {
        Some(settings) => {
            let layout = nats::Layout {
                events: config.events(),
                idempotency_window: policy.idempotency_window,
                idempotency_capacity: policy.idempotency_capacity,
            };
            nats::shared_state(settings, &layout, config.session_limits(), &lifecycle).await?
        }
        None => SharedState::in_process(
            config.session_limits(),
            policy.idempotency_window,
            policy.idempotency_capacity,
        ),
    };
    assemble(config, gateway, metrics, lifecycle, shared_state)
}

/// State that several facades in this process share as replicas, with `config`'s poll
/// leases, event retention and request-id window (tests of replication without NATS).
pub fn shared_memory(config: &Config) -> SharedMemory {
    let policy = config.release_policy();
    SharedMemory::new(
        config.lease_settings(),
        &config.events(),
        policy.idempotency_window,
        policy.idempotency_capacity,
    )
}

/// The service on the gateway at `gateway_url`, counting into `metrics`, as one more member of
/// the state `shared` keeps for several facades in this process (its own NATS, as it were):
/// `config`'s NATS settings are not used.
pub async fn build_app_on(
    config: &Config,
    gateway_url: String,
    metrics: &Metrics,
    shared: &SharedMemory,
) -> Result<App, StartupError> {
    config.validate()?;
    config.validate_leases()?;
    let gateway = GatewayClient::new(&config.gateway(gateway_url)?)?.counted_in(metrics);
    let lifecycle = Lifecycle::new();
    let shared_state = shared.member(config.session_limits(), &lifecycle);
    assemble(config, gateway, metrics, lifecycle, shared_state)
}

/// The service on `gateway` and `shared_state` (whose tasks run in `lifecycle`), counting
/// into `metrics`.
fn assemble(
    config: &Config,
    gateway: GatewayClient,
    metrics: &Metrics,
    lifecycle: Lifecycle,
    shared_state: SharedState,
) -> Result<App, StartupError> {
    let policy = config.release_policy();
    let sessions = Sessions::new(shared_state.sessions(), gateway.clone());
    let stream_slots = StreamSlots::new(config.api().max_streams_per_caller);
    let callers = config
        .callers_files()
        .map(|(callers, tokens)| Callers::load(callers, tokens))
        .transpose()
        .map_err(ConfigError::CallersFiles)?
        .map(|callers| callers.checking_streams(stream_slots.clone()));
    if callers.is_none() {
        tracing::warn!("caller authorization is off: anyone who reaches the gRPC port may release and watch any agent's calls");
    }
    let events = EventHub::new(
        sessions.clone(),
        config.events(),
        &lifecycle,
        shared_state.ownership(),
        shared_state.event_log(),
    );
    let release = ReleaseService::new(
        sessions,
        events.clone(),
        policy,
        shared_state.request_ids(),
        shared_state.reachability(),
        &lifecycle,
    );
    let api = CallControlApi {
        release,
        events,
        settings: config.api(),
        callers: callers.clone(),
        stream_slots,
        shared_state: shared_state.clone(),
        metrics: metrics.clone(),
    };
    Ok(App {
        api,
        lifecycle,
        callers,
        metrics: metrics.clone(),
        shared_state,
        gateway,
    })
}

/// Runs the service on `listener` until `shutdown` resolves, with the metrics endpoint on
/// `--metrics-listen` if set (counting `dropped_log_lines` too); with `--simulate`, first
/// starts the embedded simulator and prepares the demo. The health port and the metrics
/// endpoint serve while the service is built (a replica may wait for NATS): alive, not ready;
/// the gRPC port once it is built. A shutdown meanwhile ends the wait at once.
pub async fn run(
    config: Config,
    listener: TcpListener,
    dropped_log_lines: Option<DroppedLogLines>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartupError> {
    check_open_file_limit(&config);
    cleartext::warn(&config, listener.local_addr()?);
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let server = config.server();
    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown.await;
            stop.cancel();
        }
    });
    let health_listener = match config.server.health_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartupError::HealthListen { addr, source })?,
        ),
        None => None,
    };
    let health_addr = health_listener
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;
    let health = HealthEndpoint::start(health_listener, &server, &metrics).await;
    let service_state = ServiceState::default();
    let endpoint = match config.telemetry.metrics_listen {
        Some(addr) => {
            let handshake_timeout = server.connections.handshake_timeout;
            let readings = service_state.readings(&config, &mut registry);
            Some(
                MetricsEndpoint::start(addr, registry, readings, &metrics, handshake_timeout)
                    .await?,
            )
        }
        None => None,
    };
    tracing::info!(
        metrics = endpoint.as_ref().map(|e| tracing::field::display(e.addr)),
        health = health_addr.map(tracing::field::display),
        "starting: alive, not ready"
    );
    let built = async {
        match &config.gateway.gateway_url {
            Some(url) if !config.demo.simulate => build_app(&config, url.clone(), &metrics).await,
            #[cfg(feature = "simulator")]
            _ => demo::start(&config, &listener, &metrics).await,
            #[cfg(not(feature = "simulator"))]
            _ => Err(StartupError::NoSimulator),
        }
    };
    let built = tokio::select! {
        built = built => built.map(Some),
        () = stop.cancelled() => {
            tracing::info!("shutdown before the service was built");
            Ok(None)
        }
    };
    let served = match built {
        Ok(Some(app)) => {
            service_state.built(&app, &config, &server, dropped_log_lines);
            let health = health.serving(&app, &server).await;
            tracing::info!(
                listen = %listener.local_addr()?,
                metrics = endpoint.as_ref().map(|e| tracing::field::display(e.addr)),
                health = health_addr.map(tracing::field::display),
                "serving gRPC"
            );
            server::run(listener, health, app, server, stop.cancelled_owned())
                .await
                .map_err(StartupError::from)
        }
        Ok(None) => {
            health.stop().await;
            Ok(())
        }
        Err(error) => {
            health.stop().await;
            Err(error)
        }
    };
    if let Some(endpoint) = endpoint {
        endpoint.stop().await;
    }
    served
}

/// File descriptors kept beside the event polls and the connections the caps allow: listeners,
/// NATS, the files re-read, the gateway probe.
const FD_RESERVE: u64 = 256;

/// What a process may hold open at once when every cap is reached: one long-poll connection
/// per polled agent, the gRPC port's connections, the health and metrics ports' connections,
/// the gateway connections of releases, and [`FD_RESERVE`].
fn descriptors_needed(config: &Config) -> u64 {
    u64::from(config.events.max_polled_agents)
        + u64::from(config.server.max_connections)
        + 2 * SIDE_PORT_CONNECTIONS as u64
        + u64::from(config.gateway.max_gateway_requests)
        + FD_RESERVE
}

/// Raises the soft open-file limit to the hard one (as Go's runtime does) and warns, without
/// failing, when it is still below what the caps may need ([`descriptors_needed`]).
fn check_open_file_limit(config: &Config) {
    let Some(limit) = raise_open_file_limit() else {
        return;
    };
    let needed = descriptors_needed(config);
    if limit < needed {
        tracing::warn!(
            max_polled_agents = config.events.max_polled_agents,
            max_connections = config.server.max_connections,
            needed,
            open_file_limit = limit,
            "the open-file limit (RLIMIT_NOFILE: {limit}, even raised to its hard limit) is \
             below what --max-polled-agents, --max-connections and --max-gateway-requests \
             may hold open, with the health and metrics ports and {FD_RESERVE} for listeners \
             and files ({needed}): at those caps, sockets will fail; raise the hard limit \
             (ulimit -Hn, systemd LimitNOFILE=, the container's nofile ulimit) or lower \
             --max-polled-agents or --max-connections"
        );
    }
}

/// Sets the soft open-file limit to the hard one; returns the soft limit then in force
/// (`None`: unlimited, or unknown on this platform).
#[cfg(unix)]
fn raise_open_file_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let before = getrlimit(Resource::Nofile);
    if before.current != before.maximum {
        let raised = Rlimit {
            current: before.maximum,
            maximum: before.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => tracing::info!(
                from = before.current,
                to = before.maximum,
                "raised the open-file limit (RLIMIT_NOFILE) to its hard limit"
            ),
            Err(error) => tracing::info!(
                %error,
                soft = before.current,
                hard = before.maximum,
                "could not raise the open-file limit (RLIMIT_NOFILE) to its hard limit"
            ),
        }
    }
    getrlimit(Resource::Nofile).current
}

/// Unknown here: nothing to raise, nothing to warn about.
#[cfg(not(unix))]
fn raise_open_file_limit() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn every_cap_counts_towards_the_descriptors_needed() {
        let config = |more: &[&str]| {
            let base = [
                "x",
                "--no-caller-auth",
                "--gateway-url",
                "http://127.0.0.1:8043",
            ];
            Config::try_parse_from(base.iter().chain(more)).expect("valid flags")
        };
        // 10 000 polls, 4 096 gRPC connections, 2 x 256 on the side ports, 64 releases, 256.
        assert_eq!(descriptors_needed(&config(&[])), 14_928);
        let smaller = config(&["--max-polled-agents", "100", "--max-connections", "100"]);
        assert_eq!(descriptors_needed(&smaller), 100 + 100 + 512 + 64 + 256);
    }

    /// Raising the test process's soft limit to its hard limit changes nothing it relies on.
    #[cfg(unix)]
    #[test]
    fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
        use rustix::process::{getrlimit, Resource};
        let soft = raise_open_file_limit();
        let now = getrlimit(Resource::Nofile);
        assert_eq!(soft, now.current);
        // A hard limit of "unlimited" may be refused as a soft one (macOS); a finite one not.
        if now.maximum.is_some() {
            assert_eq!(now.current, now.maximum);
        }
    }
}
