use std::process::ExitCode;

use ccgw_callcontrol::{config::Config, shutdown_signal, startup, telemetry};
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    telemetry::init(config.log_format);
    ccgw_callcontrol::install_crypto_provider();
    let listen = config.listen_addr();
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%listen, %error, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    match startup::run(config, listener, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "ccgw-callcontrol stopped");
            ExitCode::FAILURE
        }
    }
}
