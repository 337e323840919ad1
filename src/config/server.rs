//! The gRPC port and its side ports: where they listen, TLS, connection caps and lifetimes, the
//! drain.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use clap::Args;

use crate::{
    connections::ConnectionLimits,
    server::{ServerSettings, TlsFiles},
};

/// Flags of the gRPC server: its listeners, TLS, connection caps and lifetimes, the drain.
#[derive(Debug, Clone, Args)]
pub(crate) struct ServerFlags {
    /// Address the gRPC server listens on [default: 0.0.0.0:50051, or 127.0.0.1:50051 with
    /// --simulate].
    #[arg(long, env = "CCGW_LISTEN")]
    pub(crate) listen: Option<SocketAddr>,

    /// Address of a plaintext port serving only the gRPC health service
    /// (`grpc.health.v1.Health`), e.g. `0.0.0.0:8081`, for probes that speak no TLS (the
    /// kubelet's gRPC probes) when the gRPC port has --tls-cert. It answers until the drain
    /// ends. Off unless set; health is always served on the gRPC port too.
    #[arg(long, env = "CCGW_HEALTH_LISTEN")]
    pub(crate) health_listen: Option<SocketAddr>,

    /// How long in-flight calls may finish after SIGTERM, in seconds (event streams use up to
    /// 2 s of it to deliver their poll loops' last answers and their resume tokens).
    #[arg(long, env = "CCGW_DRAIN_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(0..=3_600))]
    pub(crate) drain_timeout_secs: u64,

    /// PEM certificate chain the gRPC port serves TLS with (needs --tls-key). Re-read every
    /// --reload-secs: new connections get a changed certificate, no restart. Without it the
    /// port speaks plaintext.
    #[arg(long, env = "CCGW_TLS_CERT", requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1), re-read with it.
    #[arg(long, env = "CCGW_TLS_KEY", requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,

    /// PEM CA certificate(s) for mutual TLS: every client must present a certificate they
    /// issued, and its names (DNS and URI SANs; the subject CN only without SANs) can identify
    /// it as a caller of --callers. Re-read every --reload-secs. Needs --tls-cert.
    #[arg(long, env = "CCGW_TLS_CLIENT_CA", requires = "tls_cert")]
    pub(crate) tls_client_ca: Option<PathBuf>,

    /// How often the TLS files (--tls-cert, --tls-key, --tls-client-ca, --gateway-client-cert,
    /// --gateway-client-key) and the callers files are checked for changes, in seconds.
    #[arg(long, env = "CCGW_RELOAD_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub(crate) reload_secs: u64,

    /// After this long a client connection is asked to go away (HTTP/2 GOAWAY: running calls
    /// finish, new ones go to a new connection, perhaps another replica), in seconds, so that
    /// long-lived connections spread over the replicas after a scale-up.
    #[arg(long, env = "CCGW_MAX_CONNECTION_AGE_SECS", default_value_t = 900,
          value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub(crate) max_connection_age_secs: u64,

    /// How long a connection asked to go away may still carry its calls, in seconds; then it
    /// is closed, and WatchReleaseEvents streams still on it end (their clients resume from
    /// the last resume_token they got). At least --request-timeout-ms, so that no ReleaseCall
    /// is cut off [default: 30, or --request-timeout-ms when that is longer].
    #[arg(long, env = "CCGW_MAX_CONNECTION_AGE_GRACE_SECS",
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub(crate) max_connection_age_grace_secs: Option<u64>,

    /// HTTP/2 keepalive: a client connection silent for this long is pinged, and closed when
    /// the ping is not answered within 10 s (or this interval, if shorter), in seconds.
    #[arg(long, env = "CCGW_HTTP2_KEEPALIVE_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub(crate) http2_keepalive_secs: u64,

    /// Client connections the gRPC port holds at once, those in their handshake included; one
    /// more is reset at once (so nothing waits behind silent sockets in the listen backlog).
    #[arg(long, env = "CCGW_MAX_CONNECTIONS", default_value_t = 4_096,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(crate) max_connections: u32,

    /// Of --max-connections, those one source IP address may hold. High enough for many
    /// clients behind one node's address (NAT, a node-local proxy).
    #[arg(long, env = "CCGW_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = 1_024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(crate) max_connections_per_address: u32,

    /// Connections of the gRPC port still in their handshake (TLS handshake, HTTP/2
    /// connection preface) at once; one more is reset at once.
    #[arg(long, env = "CCGW_MAX_HANDSHAKES", default_value_t = 1_024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(crate) max_handshakes: u32,

    /// Of --max-handshakes, those from one source IP address (a reconnect storm from behind
    /// one NAT fits).
    #[arg(long, env = "CCGW_MAX_HANDSHAKES_PER_ADDRESS", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(crate) max_handshakes_per_address: u32,

    /// How long a new connection to the gRPC, health or metrics port may take to get through
    /// its handshake, in milliseconds: the TLS handshake and the HTTP/2 connection preface
    /// (gRPC and health ports), or a complete HTTP/1 request head (metrics port, where it also
    /// bounds the idle time between requests). Then the connection is closed.
    #[arg(long, env = "CCGW_HANDSHAKE_TIMEOUT_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub(crate) handshake_timeout_ms: u64,
}

/// The real service's default: reachable from the other services it is made for.
const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 50051);
/// The `--simulate` demo's default: it has no authentication and hangs up calls for anyone who
/// reaches it, so only this machine may, unless `--listen` says otherwise.
const DEFAULT_SIMULATE_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 50051);

/// Long enough for any ReleaseCall under the default --request-timeout-ms (10 s), short enough
/// that a replica's streams move within a minute of their connection's GOAWAY.
const DEFAULT_CONNECTION_AGE_GRACE: Duration = Duration::from_secs(30);

impl ServerFlags {
    /// Where the gRPC server listens: `--listen`, else the default of the mode.
    pub(super) fn listen_addr(&self, simulate: bool) -> SocketAddr {
        match self.listen {
            Some(addr) => addr,
            None if simulate => DEFAULT_SIMULATE_LISTEN,
            None => DEFAULT_LISTEN,
        }
    }

    /// `--max-connection-age-grace-secs`, else 30 s or `request_timeout` if that is longer.
    fn max_connection_age_grace(&self, request_timeout: Duration) -> Duration {
        self.max_connection_age_grace_secs.map_or_else(
            || DEFAULT_CONNECTION_AGE_GRACE.max(request_timeout),
            Duration::from_secs,
        )
    }

    /// The server's settings, with the gateway's reachability probed every `gateway_probe`
    /// and ReleaseCalls that run up to `request_timeout`.
    pub(super) fn settings(
        &self,
        gateway_probe: Duration,
        request_timeout: Duration,
    ) -> ServerSettings {
        ServerSettings {
            drain_timeout: Duration::from_secs(self.drain_timeout_secs),
            max_request_bytes: 16 * 1024,
            max_concurrent_streams: 256,
            tls: self
                .tls_cert
                .clone()
                .zip(self.tls_key.clone())
                .map(|(cert, key)| TlsFiles {
                    cert,
                    key,
                    client_ca: self.tls_client_ca.clone(),
                }),
            reload_interval: Duration::from_secs(self.reload_secs),
            tls_reloads: Arc::default(),
            gateway_probe,
            http2_keepalive: Duration::from_secs(self.http2_keepalive_secs),
            max_connection_age: Duration::from_secs(self.max_connection_age_secs),
            max_connection_age_grace: self.max_connection_age_grace(request_timeout),
            connections: ConnectionLimits {
                max_open: self.max_connections as usize,
                max_open_per_address: self.max_connections_per_address as usize,
                max_handshakes: self.max_handshakes as usize,
                max_handshakes_per_address: self.max_handshakes_per_address as usize,
                handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
            },
        }
    }
}
