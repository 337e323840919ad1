//! TLS on the gRPC port: the certificate, key and client CA files (reloaded when they change:
//! a new connection gets the new certificate, open ones keep theirs), and the incoming
//! connections, whose handshakes run beside the accept loop: the loop accepts, admits under the
//! port's caps (`connections`) and goes on, so that a client that never finishes its handshake
//! holds up nobody.
use std::{
    io,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::StreamExt;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{
    rustls::{
        self,
        pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
        server::WebPkiClientVerifier,
        RootCertStore, ServerConfig,
    },
    server::TlsStream,
    TlsAcceptor,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::{
    callers::{self, Peer},
    connections::{self, Admission, Admitted, LimitedConnection},
    reload::{ReloadStats, Reloading},
    telemetry::ConnectionClosed,
};

/// Handshaken connections waiting for the server to take them.
const HANDSHAKEN_QUEUE: usize = 64;

/// Where the server's TLS material is.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// With it, every client must present a certificate issued by one of these CAs (mTLS).
    pub client_ca: Option<PathBuf>,
}

/// The server's TLS configuration, reloaded by [`ServerTls::reload`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ServerTls(Reloading<ServerConfig>);

impl ServerTls {
    /// Loads the files; an error names the file and what is wrong with it (never its contents).
    /// `stats` counts this load and the reloads.
    pub(crate) fn load(files: &TlsFiles, stats: Arc<ReloadStats>) -> Result<Self, String> {
        crate::install_crypto_provider();
        let paths = [&files.cert, &files.key]
            .into_iter()
            .chain(&files.client_ca)
            .cloned()
            .collect();
        let what = "the TLS certificate, key and client CA files";
        Ok(Self(Reloading::load(what, paths, server_config, stats)?))
    }

    pub fn reload(&self) {
        self.0.reload();
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.0.current())
    }
}

/// Certificate chain, key, and optionally client CAs, as PEM, in that order.
fn server_config(files: &[Vec<u8>]) -> Result<ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates(&files[0], "--tls-cert")?;
    // The PEM parser's error could quote what it read: say only what is wrong.
    let key = PrivateKeyDer::from_pem_slice(&files[1]).map_err(|_| {
        "--tls-key: no private key found (expected PEM: PKCS#8, PKCS#1 or SEC1)".to_owned()
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match files.get(2) {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = RootCertStore::empty();
            for ca in certificates(pem, "--tls-client-ca")? {
                roots.add(ca).map_err(|e| format!("--tls-client-ca: {e}"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("--tls-client-ca: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("--tls-cert and --tls-key: {e}"))?;
    // gRPC is HTTP/2; clients (tonic's among them) insist on negotiating it.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn certificates(pem: &[u8], flag: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{flag}: not PEM certificates ({e})"))?;
    if certificates.is_empty() {
        return Err(format!("{flag}: no certificate in the file"));
    }
    Ok(certificates)
}

/// The connections of `listener` that `admission` admits, handshaken with the configuration
/// `tls` holds when each arrives, each ended `lifetime` after it was accepted. Accepting stops
/// when the server drops the stream.
pub(crate) fn incoming(
    listener: TcpListener,
    tls: ServerTls,
    admission: Admission,
    lifetime: Duration,
) -> ReceiverStream<io::Result<LimitedConnection<TlsConnection>>> {
    let (handshaken, incoming) = mpsc::channel(HANDSHAKEN_QUEUE);
    tokio::spawn(async move {
        let accepted = connections::accept(listener, admission);
        tokio::pin!(accepted);
        loop {
            let next = tokio::select! {
                () = handshaken.closed() => return,
                next = accepted.next() => next,
            };
            let Some((tcp, remote, admitted)) = next else {
                return;
            };
            let handshake = handshake(tls.acceptor(), tcp, remote, admitted, lifetime);
            let handshaken = handshaken.clone();
            tokio::spawn(async move {
                if let Some(connection) = handshake.await {
                    let _ = handshaken.send(Ok(connection)).await;
                }
            });
        }
    });
    ReceiverStream::new(incoming)
}

/// `tcp`'s TLS handshake, which must end by the admission's deadline; the connection is then
/// still in its handshake until its HTTP/2 preface, by the same deadline.
async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
    admitted: Admitted,
    lifetime: Duration,
) -> Option<LimitedConnection<TlsConnection>> {
    match tokio::time::timeout_at(admitted.deadline(), acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => {
            let connection = TlsConnection::new(stream, remote);
            return Some(LimitedConnection::http2(connection, admitted, lifetime));
        }
        Ok(Err(error)) => {
            tracing::debug!(%remote, %error, "TLS handshake failed");
            admitted.closed(ConnectionClosed::TlsHandshakeFailed);
        }
        Err(_) => {
            tracing::debug!(%remote, "TLS handshake timed out");
            admitted.closed(ConnectionClosed::TlsHandshakeTimeout);
        }
    }
    None
}

/// A handshaken TLS connection and what it says about its client.
pub(crate) struct TlsConnection {
    stream: TlsStream<TcpStream>,
    peer: Peer,
}

impl TlsConnection {
    fn new(stream: TlsStream<TcpStream>, remote: SocketAddr) -> Self {
        let names = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|leaf| callers::certificate_names(leaf))
            .unwrap_or_default();
        Self {
            stream,
            peer: Peer {
                remote_addr: Some(remote),
                certificate_names: names.into(),
            },
        }
    }
}

impl Connected for TlsConnection {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    use super::*;

    fn certificate(cn: &str, sans: Vec<SanType>) -> (rcgen::Certificate, KeyPair) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        (params.self_signed(&key).unwrap(), key)
    }

    #[test]
    fn unusable_tls_files_are_refused_without_showing_the_key() {
        crate::install_crypto_provider();
        let (cert, key) = certificate("localhost", Vec::new());
        let (_, other_key) = certificate("localhost", Vec::new());
        let (cert_pem, key_pem) = (cert.pem().into_bytes(), key.serialize_pem().into_bytes());
        assert!(server_config(&[cert_pem.clone(), key_pem.clone()]).is_ok());
        let garbled = key
            .serialize_pem()
            .replacen("KEY-----\n", "KEY-----\n@@", 1);
        for (files, expected) in [
            (
                vec![cert_pem.clone(), garbled.clone().into_bytes()],
                "--tls-key: no private key",
            ),
            (
                vec![b"no PEM here".to_vec(), key_pem.clone()],
                "--tls-cert: no certificate",
            ),
            (
                vec![cert_pem.clone(), other_key.serialize_pem().into_bytes()],
                "--tls-cert and --tls-key",
            ),
            (
                vec![cert_pem.clone(), key_pem.clone(), Vec::new()],
                "--tls-client-ca: no certificate",
            ),
        ] {
            let error = server_config(&files).unwrap_err();
            assert!(error.contains(expected), "{error}");
            let key_body = garbled.lines().nth(1).unwrap();
            assert!(!error.contains(&key_body[2..20]), "{error}");
        }
    }
}
