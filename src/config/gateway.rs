//! The CC-Gateway: where it is, how it is trusted, the client's timeouts and caps.
use std::{path::PathBuf, time::Duration};

use clap::Args;

use crate::{
    domain::{DEFAULT_MAX_AGENT_ID, MAX_AGENT_ID_LIMIT, MIN_AGENT_ID},
    gateway::{GatewaySettings, PemFile, SettingsError},
};

/// Flags of the gateway client: the gateway's URL and TLS, the agent id range, timeouts,
/// answer size, request caps and the reachability probe.
#[derive(Debug, Clone, Args)]
pub(crate) struct GatewayFlags {
    /// CC-Gateway base URL, e.g. `https://ccgw.example:8043` (the /agentgateway/resource prefix
    /// is added). Not needed with --simulate.
    #[arg(long, env = "CCGW_GATEWAY_URL", required_unless_present = "simulate")]
    pub(crate) gateway_url: Option<String>,

    /// PEM file with the CA certificate(s) that issued the gateway's TLS certificate.
    #[arg(long, env = "CCGW_GATEWAY_CA_BUNDLE")]
    pub(crate) gateway_ca_bundle: Option<PathBuf>,

    /// PEM certificate chain the facade presents to the gateway (mutual TLS); needs
    /// --gateway-client-key. Re-read with its key every --reload-secs: new connections use a
    /// rotated certificate, no restart.
    #[arg(
        long,
        env = "CCGW_GATEWAY_CLIENT_CERT",
        requires = "gateway_client_key"
    )]
    pub(crate) gateway_client_cert: Option<PathBuf>,

    /// PEM private key of --gateway-client-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(
        long,
        env = "CCGW_GATEWAY_CLIENT_KEY",
        requires = "gateway_client_cert"
    )]
    pub(crate) gateway_client_key: Option<PathBuf>,

    /// Accept any certificate from the gateway: no chain, no host name check. For lab gateways
    /// with self-signed certificates only; anyone on the path can then read and change the
    /// agents' sessions. Logged as a warning at startup and hourly while connections are made.
    /// Refused with --gateway-ca-bundle (trust that CA instead).
    #[arg(
        long,
        env = "CCGW_GATEWAY_INSECURE_SKIP_VERIFY",
        conflicts_with = "gateway_ca_bundle"
    )]
    pub(crate) gateway_insecure_skip_verify: bool,

    /// Release the current call with the legacy DELETE .../voicecall/{agentid} (old gateways).
    #[arg(long, env = "CCGW_LEGACY_RELEASE_PATH")]
    pub(crate) legacy_release_path: bool,

    /// Largest agent id accepted (the gateway's range is 101..59999 or, on newer versions, 999999).
    #[arg(long, env = "CCGW_MAX_AGENT_ID", default_value_t = DEFAULT_MAX_AGENT_ID,
          value_parser = clap::value_parser!(u32).range(MIN_AGENT_ID as i64..=MAX_AGENT_ID_LIMIT as i64))]
    pub(crate) max_agent_id: u32,

    /// Connect timeout towards the gateway, in milliseconds.
    #[arg(long, env = "CCGW_CONNECT_TIMEOUT_MS", default_value_t = 3_000,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub(crate) connect_timeout_ms: u64,

    /// Largest gateway answer read, in bytes; a larger one is an error (INTERNAL,
    /// GATEWAY_ANSWER_TOO_LARGE), never buffered.
    #[arg(long, env = "CCGW_MAX_ANSWER_BYTES", default_value_t = 64 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..=16 * 1024 * 1024))]
    pub(crate) max_answer_bytes: u32,

    /// How often the gateway's reachability is probed, in seconds: a TCP connect (and TLS
    /// handshake for https) with nothing sent. Health service `ccgw.gateway` goes NOT_SERVING
    /// after 3 failures in a row (probes or requests that could not connect) and SERVING after
    /// 2 successes in a row.
    #[arg(long, env = "CCGW_GATEWAY_PROBE_SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub(crate) gateway_probe_secs: u64,

    /// Gateway requests other than event polls (releases, dropcalls, sign-ins) in flight at
    /// once; more wait their turn (event polls have their own cap, --max-polled-agents).
    #[arg(long, env = "CCGW_MAX_GATEWAY_REQUESTS", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub(crate) max_gateway_requests: u32,

    /// Gateway requests waiting for their turn under --max-gateway-requests; one more, or one
    /// whose deadline comes while it waits, is refused (RESOURCE_EXHAUSTED GATEWAY_BUSY, with
    /// RetryInfo: nothing was sent).
    #[arg(long, env = "CCGW_MAX_GATEWAY_QUEUE", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub(crate) max_gateway_queue: u32,
}

impl GatewayFlags {
    /// The client's settings for the gateway at `base_url` (the configured one, or the
    /// simulator's), with `max_queue_per_caller` requests of one caller waiting at most; reads
    /// the TLS files.
    pub(super) fn settings(
        &self,
        base_url: String,
        max_queue_per_caller: usize,
    ) -> Result<GatewaySettings, SettingsError> {
        let read = |flag, path: &Option<PathBuf>| {
            path.as_deref()
                .map(|path| PemFile::read(flag, path))
                .transpose()
        };
        let client_cert = read("--gateway-client-cert", &self.gateway_client_cert)?;
        let client_key = read("--gateway-client-key", &self.gateway_client_key)?;
        Ok(GatewaySettings {
            base_url,
            ca_bundle: read("--gateway-ca-bundle", &self.gateway_ca_bundle)?,
            client_identity: client_cert.zip(client_key),
            insecure_skip_verify: self.gateway_insecure_skip_verify,
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            max_answer_bytes: self.max_answer_bytes as usize,
            legacy_release_path: self.legacy_release_path,
            max_requests: self.max_gateway_requests as usize,
            max_queue: self.max_gateway_queue as usize,
            max_queue_per_caller,
        })
    }
}
