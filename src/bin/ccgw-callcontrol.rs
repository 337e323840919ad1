use std::process::ExitCode;

use ccgw_callcontrol::{config::Config, shutdown_signal, startup, telemetry};
use clap::Parser;

#[cfg(unix)]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc returns freed pages to the system from a background thread, a second after they
/// were last used, instead of waiting for the next allocation in the same arena.
#[cfg(unix)]
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    let logs = telemetry::init(config.telemetry.log_format);
    ccgw_callcontrol::install_crypto_provider();
    let listen = config.listen_addr();
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%listen, %error, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    match startup::run(
        config,
        listener,
        Some(logs.dropped_lines()),
        shutdown_signal(),
    )
    .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "ccgw-callcontrol stopped");
            ExitCode::FAILURE
        }
    }
}
