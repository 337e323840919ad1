//! `ccgw-sim`: runs the CC-Gateway simulator (gateway routes + `/sim` control API) until
//! Ctrl-C or SIGTERM. The library's documentation (`ccgw_sim`) describes the behaviour and the
//! control API.

use std::{path::PathBuf, time::Duration};

use std::sync::Arc;

use ccgw_sim::{AuthMode, SimConfig, Simulator};
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Auth {
    /// AUTHMODE=1: the sign-in Guid stays valid.
    Static,
    /// AUTHMODE=2: the Guid rotates on poll answers.
    Dynamic,
}

#[derive(Parser, Debug)]
#[command(
    name = "ccgw-sim",
    about = "Huawei CC-Gateway agent interface simulator"
)]
struct Args {
    /// Address to listen on (plain HTTP, or HTTPS with --tls-cert and --tls-key).
    #[arg(long, env = "CCGW_SIM_LISTEN", default_value = "127.0.0.1:8043")]
    listen: String,
    #[arg(
        long,
        env = "CCGW_SIM_AUTH_MODE",
        value_enum,
        default_value = "dynamic"
    )]
    auth_mode: Auth,
    /// Rotate the Guid on a poll answer this long after issue.
    #[arg(long, env = "CCGW_SIM_GUID_INTERVAL_SECS", default_value_t = 60)]
    guid_interval_secs: u64,
    /// How long the previous Guid stays valid after a rotation.
    #[arg(long, env = "CCGW_SIM_GUID_TIMEOUT_SECS", default_value_t = 120)]
    guid_timeout_secs: u64,
    /// Long-poll wait when no event is queued.
    #[arg(long, env = "CCGW_SIM_POLL_WAIT_MS", default_value_t = 10_000)]
    poll_wait_ms: u64,
    /// Sign an agent out after no poll for this long (0 = never).
    #[arg(long, env = "CCGW_SIM_SIGNOUT_AFTER_SECS", default_value_t = 120)]
    signout_after_secs: u64,
    #[arg(long, env = "CCGW_SIM_MAX_AGENT_ID", default_value_t = 999_999)]
    max_agent_id: u32,
    /// Answer 100-006 to requests without the sign-in's sticky cookie.
    #[arg(long, env = "CCGW_SIM_REQUIRE_STICKY_COOKIE")]
    require_sticky_cookie: bool,
    /// Only this password signs in (default: any non-empty password).
    #[arg(long, env = "CCGW_SIM_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// PEM certificate chain: serve HTTPS instead of plain HTTP (needs --tls-key).
    #[arg(long, env = "CCGW_SIM_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "CCGW_SIM_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA bundle: require client certificates issued by these CAs (needs --tls-cert).
    #[arg(long, env = "CCGW_SIM_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
}

impl Args {
    /// The TLS configuration the flags ask for, if any; errors name the file, never its
    /// contents.
    fn tls(&self) -> Result<Option<Arc<rustls::ServerConfig>>, String> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let client_ca = self.tls_client_ca.as_ref().map(read).transpose()?;
        ccgw_sim::tls::server_config(&read(cert)?, &read(key)?, client_ca.as_deref())
            .map(Some)
            .map_err(|e| {
                format!(
                    "{e} (--tls-cert {}, --tls-key {})",
                    cert.display(),
                    key.display()
                )
            })
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let tls = args.tls().map_err(std::io::Error::other)?;
    let config = SimConfig {
        auth_mode: match args.auth_mode {
            Auth::Static => AuthMode::Static,
            Auth::Dynamic => AuthMode::Dynamic,
        },
        guid_interval: Duration::from_secs(args.guid_interval_secs),
        guid_timeout: Duration::from_secs(args.guid_timeout_secs),
        poll_wait: Duration::from_millis(args.poll_wait_ms),
        signout_after: (args.signout_after_secs > 0)
            .then(|| Duration::from_secs(args.signout_after_secs)),
        max_agent_id: args.max_agent_id,
        require_sticky_cookie: args.require_sticky_cookie,
        password: args.password,
        ..SimConfig::default()
    };
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!(
        "ccgw-sim listening on {scheme}://{addr} (gateway: /agentgateway/resource, control: /sim)"
    );
    tracing::info!(%addr, auth_mode = ?args.auth_mode, scheme, "ccgw-sim started");
    let simulator = Simulator::new(config);
    match tls {
        None => simulator.serve(listener, shutdown_signal()).await,
        Some(tls) => simulator.serve_tls(listener, tls, shutdown_signal()).await,
    }
}

/// Resolves on Ctrl-C, or on SIGTERM (what a container runtime sends before killing it).
async fn shutdown_signal() {
    #[cfg(unix)]
    let sigterm = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => drop(sigterm.recv().await),
            // Without a SIGTERM handler only Ctrl-C stops the simulator.
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let sigterm = std::future::pending::<()>();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = sigterm => {}
    }
    tracing::info!("ccgw-sim shutting down");
}
