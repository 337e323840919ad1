//! Builds the application from its configuration, and the `--simulate` demo (only with the
//! `simulator` feature; without it `--simulate` is refused).
use std::future::Future;

use tokio::net::TcpListener;

use crate::{
    api::CallControlApi,
    config::Config,
    events::EventHub,
    gateway::GatewayClient,
    lifecycle::Lifecycle,
    release::ReleaseService,
    server,
    sessions::{SessionRegistry, Sessions},
};

#[cfg(feature = "simulator")]
mod demo;
#[cfg(feature = "simulator")]
pub use demo::{DEMO_AGENTS, DEMO_CALLER};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("gateway settings: {0}")]
    Gateway(#[from] crate::gateway::SettingsError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Server(#[from] server::ServerError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("demo setup: {0}")]
    Demo(String),
    #[error(
        "--simulate: this build has no simulator (it was built without the `simulator` feature)"
    )]
    NoSimulator,
}

pub fn build_api(config: &Config, gateway_url: String) -> Result<CallControlApi, StartupError> {
    config.validate().map_err(StartupError::Config)?;
    let gateway = GatewayClient::new(&config.gateway(gateway_url)?)?;
    let sessions = Sessions::new(SessionRegistry::new(config.session_limits()), gateway);
    let lifecycle = Lifecycle::new();
    let events = EventHub::new(sessions.clone(), config.events(), &lifecycle);
    let release = ReleaseService::new(
        sessions,
        events.clone(),
        config.release_policy(),
        &lifecycle,
    );
    Ok(CallControlApi::new(
        release,
        events,
        config.api(),
        lifecycle,
    ))
}

/// Runs the service on `listener` until `shutdown` resolves; with `--simulate`, first starts
/// the embedded simulator and prepares the demo.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartupError> {
    let api = match &config.gateway_url {
        Some(url) if !config.simulate => build_api(&config, url.clone())?,
        #[cfg(feature = "simulator")]
        _ => demo::start(&config, &listener).await?,
        #[cfg(not(feature = "simulator"))]
        _ => return Err(StartupError::NoSimulator),
    };
    tracing::info!(listen = %listener.local_addr()?, "serving gRPC");
    server::run(listener, api, config.server(), shutdown).await?;
    Ok(())
}
