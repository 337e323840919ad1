//! ccgw-callcontrol: a gRPC facade over Huawei CC-Gateway's agent REST interface.
//!
//! Rooms: `api` (gRPC only), `gateway` (REST client, sessions), `release` (hang-up policy),
//! `events` (poll loops, fan-out, replay and resume), `server` (composition), `config`,
//! `telemetry`. The CC-Gateway simulator is a crate of its own, `ccgw-sim`, which `startup`
//! embeds for `--simulate` when the `simulator` feature (on by default) is.

pub mod api;
pub mod config;
pub mod domain;
pub mod events;
pub mod gateway;
pub mod release;
pub mod server;
pub mod startup;
pub mod telemetry;

pub mod proto {
    #![allow(clippy::all)]
    tonic::include_proto!("ccgw.callcontrol.v1");
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("callcontrol_descriptor");
    /// `google/rpc/error_details.proto` (with `google/protobuf/duration.proto`, which it
    /// imports): the types of the status details every failure carries. Served by reflection so
    /// that grpcurl can print ErrorInfo, RetryInfo, BadRequest and RequestInfo instead of
    /// their raw bytes.
    pub const ERROR_DETAILS_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("error_details_descriptor");
}

/// Installs ring as the process-wide rustls crypto provider. reqwest is built without a provider
/// of its own so that one process never mixes two; every client constructor calls this, so a
/// library user cannot hit rustls' "no process-level CryptoProvider" panic. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Locks a mutex of plain data. Poisoning only means another thread panicked mid-update; the
/// data is still usable, and refusing it would turn one panic into many.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Resolves on Ctrl-C or SIGTERM (what Kubernetes sends before killing a pod).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
