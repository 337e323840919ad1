//! The HTTPS listener: rustls (ring) handshakes in front of the same router as the plain
//! listener, so a client's TLS settings (trusted CAs, host name, client certificate) can be
//! tested against a gateway that really speaks TLS.

use std::{io, sync::Arc, time::Duration};

use axum::{extract::ConnectInfo, Extension};
use hyper_util::{rt::TokioIo, server::graceful::GracefulShutdown, service::TowerToHyperService};
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// A handshake that has not finished by then is dropped: a client that connects and sends
/// nothing must not hold a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a TLS server configuration could not be built. Names what was wrong, never the key.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("server certificate: {0}")]
    Certificate(String),
    #[error("server private key: {0}")]
    PrivateKey(String),
    #[error("client CA bundle: {0}")]
    ClientCa(String),
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A server configuration (ring provider) from PEM: the certificate chain, its private key and,
/// when given, the CAs whose client certificates are required (a client without one is refused
/// during the handshake).
pub fn server_config(
    cert_chain_pem: &[u8],
    private_key_pem: &[u8],
    client_ca_pem: Option<&[u8]>,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let chain = certificates(cert_chain_pem).map_err(TlsConfigError::Certificate)?;
    let key = PrivateKeyDer::from_pem_slice(private_key_pem)
        .map_err(|e| TlsConfigError::PrivateKey(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = RootCertStore::empty();
            for ca in certificates(pem).map_err(TlsConfigError::ClientCa)? {
                roots.add(ca)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsConfigError::ClientCa(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no certificate in the PEM".into());
    }
    Ok(certs)
}

/// Accepts TLS connections on `listener` and serves `router` on each until `stop` is cancelled;
/// then stops accepting and lets open connections finish their requests (the caller bounds
/// how long).
pub(crate) async fn accept_loop(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    router: axum::Router,
    stop: CancellationToken,
) -> io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let connections = GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => accepted?,
            () = stop.cancelled() => break,
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
        let watcher = connections.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "sim: TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = TowerToHyperService::new(router.layer(Extension(ConnectInfo(peer))));
            // HTTP/1.1 only, as the plain listener and a real gateway speak.
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service);
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(%peer, %error, "sim: TLS connection ended with an error");
            }
        });
    }
    connections.shutdown().await;
    Ok(())
}
