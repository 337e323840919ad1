//! Flags and environment variables of the service binary.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

use crate::{
    api::ApiSettings,
    connections::ConnectionLimits,
    domain::{DEFAULT_MAX_AGENT_ID, MAX_AGENT_ID_LIMIT, MIN_AGENT_ID},
    events::{EventSettings, LeaseSettings},
    gateway::{GatewaySettings, PemFile, SettingsError},
    nats::{NatsSettings, CLAIM_OUTLIVES_REQUEST},
    release::{CallerShareLimits, ReleasePolicy},
    server::{ServerSettings, TlsFiles},
    sessions::SessionLimits,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// JSON when stderr is not a terminal (a container's log collector), text when it is.
    Auto,
    Text,
    Json,
}

impl LogFormat {
    /// The format to write: `Auto` decided by whether stderr is a terminal.
    pub fn resolve(self, stderr_is_terminal: bool) -> Self {
        match self {
            Self::Auto if stderr_is_terminal => Self::Text,
            Self::Auto => Self::Json,
            other => other,
        }
    }
}

/// gRPC facade over Huawei CC-Gateway: hang up contact-center calls, watch calls end.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
pub struct Config {
    /// Address the gRPC server listens on [default: 0.0.0.0:50051, or 127.0.0.1:50051 with
    /// --simulate].
    #[arg(long, env = "CCGW_LISTEN")]
    pub(crate) listen: Option<SocketAddr>,

    /// Address of the Prometheus endpoint (`GET /metrics`), e.g. `0.0.0.0:9464`. Off unless
    /// set: it is a second port, without authentication, that a deployment opens on purpose
    /// (and that a NetworkPolicy then restricts to the scraper).
    #[arg(long, env = "CCGW_METRICS_LISTEN")]
    pub(crate) metrics_listen: Option<SocketAddr>,

    /// Address of a plaintext port serving only the gRPC health service
    /// (`grpc.health.v1.Health`), e.g. `0.0.0.0:8081`, for probes that speak no TLS (the
    /// kubelet's gRPC probes) when the gRPC port has --tls-cert. It answers until the drain
    /// ends. Off unless set; health is always served on the gRPC port too.
    #[arg(long, env = "CCGW_HEALTH_LISTEN")]
    pub(crate) health_listen: Option<SocketAddr>,

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

    /// Upper bound of one ReleaseCall, in milliseconds; a shorter gRPC deadline wins.
    #[arg(long, env = "CCGW_REQUEST_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub(crate) request_timeout_ms: u64,

    /// Largest gateway answer read, in bytes; a larger one is an error (INTERNAL,
    /// GATEWAY_ANSWER_TOO_LARGE), never buffered.
    #[arg(long, env = "CCGW_MAX_ANSWER_BYTES", default_value_t = 64 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..=16 * 1024 * 1024))]
    pub(crate) max_answer_bytes: u32,

    /// How long a request_id's answer is remembered, in seconds; at least the request timeout
    /// (with --nats-url, 10 s more: a claim must outlive its answer).
    #[arg(long, env = "CCGW_IDEMPOTENCY_WINDOW_SECS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub(crate) idempotency_window_secs: u64,

    /// How many request_ids are remembered at most. The oldest dropcall answers are forgotten
    /// first; a pending id or an answer to a release of the current call never is (new ids are
    /// refused instead: RESOURCE_EXHAUSTED, TOO_MANY_PENDING_RELEASES).
    #[arg(long, env = "CCGW_IDEMPOTENCY_CAPACITY", default_value_t = 100_000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub(crate) idempotency_capacity: u32,

    /// Agents whose gateway session the facade holds at most; a handover for one more is
    /// refused (RESOURCE_EXHAUSTED) unless a session has been idle for --session-idle-secs.
    #[arg(long, env = "CCGW_MAX_SESSIONS", default_value_t = 50_000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub(crate) max_sessions: u32,

    /// A session no release and no poll used for this long is forgotten, in seconds (the
    /// gateway signs an agent out after 2 minutes without a poll anyway). At least 600, so a
    /// polled agent's session, used every poll, never is.
    #[arg(long, env = "CCGW_SESSION_IDLE_SECS", default_value_t = 3_600,
          value_parser = clap::value_parser!(u64).range(600..=604_800))]
    pub(crate) session_idle_secs: u64,

    /// Pause after an empty event-poll answer, in milliseconds (after an event the next poll
    /// goes out at once).
    #[arg(long, env = "CCGW_POLL_PAUSE_MS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub(crate) poll_pause_ms: u64,

    /// HTTP timeout of one event poll, in milliseconds; must outlast the gateway's long-poll
    /// wait (about 10 s).
    #[arg(long, env = "CCGW_POLL_TIMEOUT_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(11_000..=300_000))]
    pub(crate) poll_timeout_ms: u64,

    /// Longest pause between event polls after consecutive failures, in milliseconds.
    #[arg(long, env = "CCGW_POLL_BACKOFF_MAX_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(200..=60_000))]
    pub(crate) poll_backoff_max_ms: u64,

    /// How long an agent is still polled after its last watcher left, in seconds (a
    /// reconnecting watcher misses nothing; the gateway signs out agents after 2 min without a
    /// poll).
    #[arg(long, env = "CCGW_WATCH_GRACE_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(0..=3_600))]
    pub(crate) watch_grace_secs: u64,

    /// Release events kept per agent for resuming watchers.
    #[arg(long, env = "CCGW_REPLAY_EVENTS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub(crate) replay_events: u32,

    /// How long release events are kept for resuming watchers, in seconds.
    #[arg(long, env = "CCGW_REPLAY_AGE_SECS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub(crate) replay_age_secs: u64,

    /// How many events a watcher may fall behind before its stream is cut off
    /// (RESOURCE_EXHAUSTED, with a token to resume from).
    #[arg(long, env = "CCGW_WATCH_BUFFER_EVENTS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(crate) watch_buffer_events: u32,

    /// A WatchReleaseEvents stream that sent nothing for this long gets a heartbeat, in seconds.
    #[arg(long, env = "CCGW_HEARTBEAT_SECS", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub(crate) heartbeat_secs: u64,

    /// Agents one WatchReleaseEvents stream may watch.
    #[arg(long, env = "CCGW_MAX_WATCH_AGENTS", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) max_watch_agents: u32,

    /// Open WatchReleaseEvents streams in the process.
    #[arg(long, env = "CCGW_MAX_WATCHERS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(crate) max_watchers: u32,

    /// ReleaseCalls waiting for their release event in the process (wait_for_release_event);
    /// apart from --max-watchers, so that streams and releases cannot crowd each other out.
    #[arg(long, env = "CCGW_MAX_RELEASE_WAITERS", default_value_t = 1_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(crate) max_release_waiters: u32,

    /// Agents polled at once in the process: watched (by streams or by ReleaseCalls waiting for
    /// their release event), or in their grace period. Each polled agent holds one long-poll
    /// connection, one file descriptor, to the gateway: keep the process's open-file limit
    /// (RLIMIT_NOFILE, raised to its hard limit at startup) above this plus the gRPC
    /// connections. A stream that needs one more is refused (RESOURCE_EXHAUSTED).
    #[arg(long, env = "CCGW_MAX_POLLED_AGENTS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(crate) max_polled_agents: u32,

    /// A WatchReleaseEvents stream that could not send anything for this long (its client
    /// stopped reading) is cut off with a token to resume from and its watcher freed, in
    /// seconds.
    #[arg(long, env = "CCGW_STREAM_SEND_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub(crate) stream_send_timeout_secs: u64,

    /// How long in-flight calls may finish after SIGTERM, in seconds (event streams use up to
    /// 2 s of it to deliver their poll loops' last answers and their resume tokens).
    #[arg(long, env = "CCGW_DRAIN_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(0..=3_600))]
    pub(crate) drain_timeout_secs: u64,

    /// Log format: `json` (one object a line, for log collectors), `text`, or `auto`: JSON
    /// when stderr is not a terminal (a container), text when it is.
    #[arg(long, env = "CCGW_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,

    /// Run on an embedded CC-Gateway simulator with demo agents 101, 102 and 103 signed in.
    // Kept in builds without the simulator so that asking for it gets a clear refusal rather
    // than clap's "unexpected argument".
    #[arg(long, hide = cfg!(not(feature = "simulator")))]
    pub(crate) simulate: bool,

    /// Where the embedded simulator listens (gateway interface and /sim control API).
    #[arg(long, env = "CCGW_SIM_LISTEN", default_value = "127.0.0.1:8043",
          hide = cfg!(not(feature = "simulator")))]
    pub(crate) sim_listen: SocketAddr,

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

    /// Callers file (TOML, e.g. from a ConfigMap): each caller's name, the agent id ranges and
    /// verbs (release, watch, handover) it is granted, and the client-certificate names that
    /// identify it. Re-read every --reload-secs. Without --simulate, this or --no-caller-auth
    /// is required.
    #[arg(long, env = "CCGW_CALLERS", conflicts_with = "no_caller_auth")]
    pub(crate) callers: Option<PathBuf>,

    /// Caller tokens file (e.g. from a Secret): one `NAME TOKEN` per line, NAME a caller of
    /// --callers, several lines per name for rotation; `#` starts a comment line. Callers send
    /// `authorization: Bearer TOKEN`. Re-read every --reload-secs.
    #[arg(
        long,
        env = "CCGW_CALLER_TOKENS",
        requires = "callers",
        conflicts_with = "no_caller_auth"
    )]
    pub(crate) caller_tokens: Option<PathBuf>,

    /// No caller authorization: anyone who reaches the port may release and watch any agent's
    /// calls. Only for a port nothing untrusted can reach.
    #[arg(long, env = "CCGW_NO_CALLER_AUTH")]
    pub(crate) no_caller_auth: bool,

    /// How often the TLS files (--tls-cert, --tls-key, --tls-client-ca, --gateway-client-cert,
    /// --gateway-client-key) and the callers files are checked for changes, in seconds.
    #[arg(long, env = "CCGW_RELOAD_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub(crate) reload_secs: u64,

    /// Open WatchReleaseEvents streams one caller may hold (RESOURCE_EXHAUSTED beyond), so that
    /// one caller cannot take all of --max-watchers. Without caller authorization, all
    /// clients are one caller.
    #[arg(long, env = "CCGW_MAX_STREAMS_PER_CALLER", default_value_t = 1_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(crate) max_streams_per_caller: u32,

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

    /// After this long a client connection is asked to go away (HTTP/2 GOAWAY: running calls
    /// finish, new ones go to a new connection, perhaps another replica), in seconds, so that
    /// long-lived connections spread over the replicas after a scale-up.
    #[arg(long, env = "CCGW_MAX_CONNECTION_AGE_SECS", default_value_t = 900,
          value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub(crate) max_connection_age_secs: u64,

    /// request_ids one caller may have remembered at once (releases under way, and answers
    /// the store keeps for the window), so that one caller cannot fill
    /// --idempotency-capacity for all (RESOURCE_EXHAUSTED CALLER_LIMIT_REACHED beyond; a
    /// request_id already answered is still replayed). Counted by each replica for the
    /// requests it serves [default: a quarter of --idempotency-capacity]
    #[arg(long, env = "CCGW_MAX_REQUEST_IDS_PER_CALLER",
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub(crate) max_request_ids_per_caller: Option<u32>,

    /// Releases with a request_id one caller may have under way at once (RESOURCE_EXHAUSTED
    /// CALLER_LIMIT_REACHED beyond) [default: a quarter of --max-gateway-requests plus
    /// --max-gateway-queue]
    #[arg(long, env = "CCGW_MAX_PENDING_REQUEST_IDS_PER_CALLER",
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub(crate) max_pending_request_ids_per_caller: Option<u32>,

    /// Gateway requests made for one caller that may wait for their turn at once, so that one
    /// caller cannot fill --max-gateway-queue for all (RESOURCE_EXHAUSTED CALLER_LIMIT_REACHED
    /// beyond, nothing sent) [default: a quarter of --max-gateway-queue]
    #[arg(long, env = "CCGW_MAX_GATEWAY_QUEUE_PER_CALLER",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(crate) max_gateway_queue_per_caller: Option<u32>,

    /// ReleaseCalls of one caller that may wait for their release event at once, so that one
    /// caller cannot take all of --max-release-waiters (RESOURCE_EXHAUSTED
    /// CALLER_LIMIT_REACHED beyond, nothing sent) [default: a quarter of
    /// --max-release-waiters]
    #[arg(long, env = "CCGW_MAX_RELEASE_WAITERS_PER_CALLER",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(crate) max_release_waiters_per_caller: Option<u32>,

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

    /// NATS server(s) with JetStream, e.g. `tls://nats-0.nats:4222,tls://nats-1.nats:4222`:
    /// switches replication on. Every replica of one install shares agents' sessions, the poll
    /// ownership, the release event log and request_ids through it (see docs/replicas.md).
    /// Without it the process keeps everything in memory and must run alone.
    #[arg(long, env = "CCGW_NATS_URL")]
    pub(crate) nats_url: Option<String>,

    /// NATS credentials file (a user JWT and its NKey seed, `nsc generate creds`).
    #[arg(long, env = "CCGW_NATS_CREDS", requires = "nats_url")]
    pub(crate) nats_creds: Option<PathBuf>,

    /// PEM CA certificate(s) the NATS servers' certificates are verified with (system roots
    /// otherwise); also turns TLS on for `nats://` URLs.
    #[arg(long, env = "CCGW_NATS_TLS_CA", requires = "nats_url")]
    pub(crate) nats_tls_ca: Option<PathBuf>,

    /// PEM client certificate presented to NATS servers that require one (needs
    /// --nats-tls-key).
    #[arg(long, env = "CCGW_NATS_TLS_CERT", requires_all = ["nats_url", "nats_tls_key"])]
    pub(crate) nats_tls_cert: Option<PathBuf>,

    /// PEM private key of --nats-tls-cert.
    #[arg(long, env = "CCGW_NATS_TLS_KEY", requires_all = ["nats_url", "nats_tls_cert"])]
    pub(crate) nats_tls_key: Option<PathBuf>,

    /// Prefix of the NATS buckets, stream and subjects this install uses, so that two installs
    /// can share one NATS.
    #[arg(long, env = "CCGW_NATS_PREFIX", default_value = "ccgw", value_parser = nats_prefix)]
    pub(crate) nats_prefix: String,

    /// Copies JetStream keeps of each bucket and of the event stream (the NATS cluster's
    /// size, at most 5); 3 survives the loss of one NATS server.
    #[arg(long, env = "CCGW_NATS_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=5))]
    pub(crate) nats_replicas: u8,

    /// A replica that holds a shard's poll lease renews it this often, in seconds.
    #[arg(long, env = "CCGW_LEASE_RENEW_SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=600))]
    pub(crate) lease_renew_secs: u64,

    /// A shard's poll lease not renewed for this long (on the taker's own clock) may be taken
    /// over by another replica, in seconds. Must exceed --poll-timeout-ms plus
    /// --lease-renew-secs plus a 2 s margin: a replica stops starting polls once its last
    /// renewal is older than this minus the margin and the poll timeout, so a paused or cut-off
    /// replica's polls have ended before another takes over.
    #[arg(long, env = "CCGW_LEASE_TTL_SECS", default_value_t = 45,
          value_parser = clap::value_parser!(u64).range(3..=3_600))]
    pub(crate) lease_ttl_secs: u64,

    /// While NATS is unreachable, ReleaseCall still sends releases with the sessions this
    /// replica last knew (a session rotated meanwhile on another replica is refused by the
    /// gateway, which changes nothing). Without it such a ReleaseCall answers UNAVAILABLE
    /// with nothing sent.
    #[arg(long, env = "CCGW_RELEASE_WITHOUT_NATS", requires = "nats_url")]
    pub(crate) release_without_nats: bool,
}

/// A prefix NATS accepts in bucket, stream and subject names alike.
fn nats_prefix(raw: &str) -> Result<String, String> {
    let ok = !raw.is_empty()
        && raw.len() <= 32
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(raw.to_owned())
    } else {
        Err("1 to 32 of A-Z, a-z, 0-9, '-' and '_'".to_owned())
    }
}

/// Whether the server address `server` (`[scheme://][user[:password]@]host[:port]`) names a user.
fn holds_user_info(server: &str) -> bool {
    let server = server.trim();
    let authority = server.split_once("://").map_or(server, |(_, rest)| rest);
    authority
        .split('/')
        .next()
        .unwrap_or_default()
        .contains('@')
}

/// How long before its lease could be taken over a replica stops starting polls: covers the
/// clock drift between replicas over one TTL and the time a poll takes to leave.
pub(crate) const LEASE_MARGIN_SECS: u64 = 2;

/// Long enough for any ReleaseCall under the default --request-timeout-ms (10 s), short enough
/// that a replica's streams move within a minute of their connection's GOAWAY.
const DEFAULT_CONNECTION_AGE_GRACE: Duration = Duration::from_secs(30);

/// The part of a shared capacity one caller may hold when its flag is not given: a quarter,
/// so that a caller who takes all of its share leaves three quarters to the others, and at
/// least four callers fill the capacity only together.
const DEFAULT_CALLER_SHARE_DIVISOR: u32 = 4;

/// A caller's share: `flag` when given, else a quarter of `shared` (at least one).
fn caller_share(flag: Option<u32>, shared: u32) -> usize {
    flag.unwrap_or_else(|| shared.div_ceil(DEFAULT_CALLER_SHARE_DIVISOR).max(1)) as usize
}

/// The real service's default: reachable from the other services it is made for.
const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 50051);
/// The `--simulate` demo's default: it has no authentication and hangs up calls for anyone who
/// reaches it, so only this machine may, unless `--listen` says otherwise.
const DEFAULT_SIMULATE_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 50051);

impl Config {
    /// Who may call must be said: a production facade that silently let anyone hang up any
    /// call would be found out too late.
    fn validate_caller_auth(&self) -> Result<(), String> {
        if !self.simulate && self.callers.is_none() && !self.no_caller_auth {
            return Err(
                "caller authorization is not configured: give --callers FILE \
                 (CCGW_CALLERS) to say who may call, or --no-caller-auth (CCGW_NO_CALLER_AUTH) \
                 to let anyone who reaches the port release and watch any agent's calls"
                    .to_owned(),
            );
        }
        if self.callers.is_some() && self.caller_tokens.is_none() && self.tls_client_ca.is_none() {
            return Err(
                "--callers: no caller could identify itself: give --caller-tokens \
                 FILE (bearer tokens) or --tls-client-ca FILE (client certificates)"
                    .to_owned(),
            );
        }
        Ok(())
    }

    /// Where the gRPC server listens: `--listen` / `CCGW_LISTEN`, else the default of the mode.
    pub fn listen_addr(&self) -> SocketAddr {
        match self.listen {
            Some(addr) => addr,
            None if self.simulate => DEFAULT_SIMULATE_LISTEN,
            None => DEFAULT_LISTEN,
        }
    }

    /// Checks what one flag's range cannot: a request id must be remembered at least as long
    /// as its request may run, or a duplicate could act while the first is still waiting.
    pub(crate) fn validate(&self) -> Result<(), String> {
        self.validate_caller_auth()?;
        if self.idempotency_window_secs * 1000 < self.request_timeout_ms {
            return Err(format!(
                "--idempotency-window-secs ({}) must cover --request-timeout-ms ({})",
                self.idempotency_window_secs, self.request_timeout_ms
            ));
        }
        if let Some(url) = &self.nats_url {
            if url.split(',').any(holds_user_info) {
                // The NATS client ignores a URL's user and password: the server would see an
                // anonymous client. The URL is not repeated: it holds a password.
                return Err(
                    "--nats-url holds a user or password, which the NATS client does \
                            not send: authenticate with --nats-creds or a client certificate \
                            (--nats-tls-cert and --nats-tls-key)"
                        .to_owned(),
                );
            }
            let outlives_ms = CLAIM_OUTLIVES_REQUEST.as_millis() as u64;
            if self.idempotency_window_secs * 1000 < self.request_timeout_ms + outlives_ms {
                return Err(format!(
                    "--idempotency-window-secs ({}) must exceed --request-timeout-ms ({} ms) by \
                     at least {} s with --nats-url: a request_id's claim must outlive its \
                     answer, or a repeat finds the id free and releases again",
                    self.idempotency_window_secs,
                    self.request_timeout_ms,
                    CLAIM_OUTLIVES_REQUEST.as_secs()
                ));
            }
            self.validate_leases()?;
        }
        // A ReleaseCall cut off with its connection would leave its caller guessing whether the
        // call was hung up.
        if let Some(grace) = self.max_connection_age_grace_secs {
            if grace * 1000 < self.request_timeout_ms {
                return Err(format!(
                    "--max-connection-age-grace-secs ({grace}) must cover --request-timeout-ms ({})",
                    self.request_timeout_ms
                ));
            }
        }
        Ok(())
    }

    /// The poll leases fence a replica in time: its last poll has ended before another may
    /// take its shards over.
    pub(crate) fn validate_leases(&self) -> Result<(), String> {
        let fenced_ms = self.poll_timeout_ms + (self.lease_renew_secs + LEASE_MARGIN_SECS) * 1000;
        if fenced_ms >= self.lease_ttl_secs * 1000 {
            return Err(format!(
                "--lease-ttl-secs ({}) must exceed --poll-timeout-ms ({} ms) plus \
                 --lease-renew-secs ({}) plus a {LEASE_MARGIN_SECS} s margin: a paused \
                 replica could still be polling when another takes its shards over",
                self.lease_ttl_secs, self.poll_timeout_ms, self.lease_renew_secs
            ));
        }
        Ok(())
    }

    /// Gateway settings for `base_url` (the configured one, or the simulator's).
    pub(crate) fn gateway(&self, base_url: String) -> Result<GatewaySettings, SettingsError> {
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
            max_queue_per_caller: caller_share(
                self.max_gateway_queue_per_caller,
                self.max_gateway_queue,
            ),
        })
    }

    pub(crate) fn session_limits(&self) -> SessionLimits {
        SessionLimits {
            max_sessions: self.max_sessions as usize,
            idle: Duration::from_secs(self.session_idle_secs),
        }
    }

    pub(crate) fn release_policy(&self) -> ReleasePolicy {
        ReleasePolicy {
            idempotency_window: Duration::from_secs(self.idempotency_window_secs),
            idempotency_capacity: self.idempotency_capacity as usize,
            caller_shares: CallerShareLimits {
                request_ids: caller_share(
                    self.max_request_ids_per_caller,
                    self.idempotency_capacity,
                ),
                pending_request_ids: caller_share(
                    self.max_pending_request_ids_per_caller,
                    self.max_gateway_requests
                        .saturating_add(self.max_gateway_queue),
                ),
                release_waiters: caller_share(
                    self.max_release_waiters_per_caller,
                    self.max_release_waiters,
                ),
            },
            release_while_unreachable: self.release_without_nats,
            ..ReleasePolicy::default()
        }
    }

    /// The callers and tokens files, when caller authorization is on.
    pub(crate) fn callers_files(&self) -> Option<(PathBuf, Option<PathBuf>)> {
        self.callers
            .clone()
            .map(|callers| (callers, self.caller_tokens.clone()))
    }

    pub(crate) fn api(&self) -> ApiSettings {
        ApiSettings {
            max_agent_id: self.max_agent_id,
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            max_watch_agents: self.max_watch_agents as usize,
            stream_send_timeout: Duration::from_secs(self.stream_send_timeout_secs),
            max_streams_per_caller: self.max_streams_per_caller as usize,
        }
    }

    pub(crate) fn events(&self) -> EventSettings {
        EventSettings {
            poll_pause: Duration::from_millis(self.poll_pause_ms),
            poll_timeout: Duration::from_millis(self.poll_timeout_ms),
            backoff_max: Duration::from_millis(self.poll_backoff_max_ms),
            grace: Duration::from_secs(self.watch_grace_secs),
            replay_events: self.replay_events as usize,
            replay_age: Duration::from_secs(self.replay_age_secs),
            watcher_buffer: self.watch_buffer_events as usize,
            heartbeat: Duration::from_secs(self.heartbeat_secs),
            max_watchers: self.max_watchers as usize,
            max_release_waiters: self.max_release_waiters as usize,
            max_polled_agents: self.max_polled_agents as usize,
        }
    }

    /// How replicas share state, when `--nats-url` is given.
    pub(crate) fn nats(&self) -> Option<NatsSettings> {
        let leases = self.lease_settings();
        Some(NatsSettings {
            url: self.nats_url.clone()?,
            creds: self.nats_creds.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_client: self.nats_tls_cert.clone().zip(self.nats_tls_key.clone()),
            prefix: self.nats_prefix.clone(),
            replicas: usize::from(self.nats_replicas),
            lease_renew: leases.renew,
            lease_ttl: leases.ttl,
            lease_margin: leases.margin,
            poll_timeout: leases.poll_timeout,
            release_without_nats: self.release_without_nats,
        })
    }

    /// The poll leases' terms, on whatever shares them (NATS, or facades sharing one process).
    pub(crate) fn lease_settings(&self) -> LeaseSettings {
        LeaseSettings {
            renew: Duration::from_secs(self.lease_renew_secs),
            ttl: Duration::from_secs(self.lease_ttl_secs),
            margin: Duration::from_secs(LEASE_MARGIN_SECS),
            poll_timeout: Duration::from_millis(self.poll_timeout_ms),
        }
    }

    /// `--max-connection-age-grace-secs`, else 30 s or the request timeout if that is longer.
    fn max_connection_age_grace(&self) -> Duration {
        self.max_connection_age_grace_secs.map_or_else(
            || DEFAULT_CONNECTION_AGE_GRACE.max(Duration::from_millis(self.request_timeout_ms)),
            Duration::from_secs,
        )
    }

    pub fn server(&self) -> ServerSettings {
        ServerSettings {
            drain_timeout: Duration::from_secs(self.drain_timeout_secs),
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
            gateway_probe: Duration::from_secs(self.gateway_probe_secs),
            http2_keepalive: Duration::from_secs(self.http2_keepalive_secs),
            max_connection_age: Duration::from_secs(self.max_connection_age_secs),
            max_connection_age_grace: self.max_connection_age_grace(),
            connections: ConnectionLimits {
                max_open: self.max_connections as usize,
                max_open_per_address: self.max_connections_per_address as usize,
                max_handshakes: self.max_handshakes as usize,
                max_handshakes_per_address: self.max_handshakes_per_address as usize,
                handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
            },
            ..ServerSettings::default()
        }
    }
}

/// Environment variables read outside the flags.
const OTHER_ENV: &[(&str, &str)] = &[
    (
        "RUST_LOG",
        "Log filter, e.g. `info,ccgw_callcontrol::events=debug` [default: info].",
    ),
    (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTLP/HTTP collector, e.g. `http://otel-collector:4318`: spans are exported there \
         [default: no export; a caller's traceparent still reaches the gateway].",
    ),
    (
        "OTEL_SERVICE_NAME",
        "`service.name` of exported spans [default: ccgw-callcontrol]; the other `OTEL_*` \
         variables work as the OpenTelemetry SDK defines them.",
    ),
];

/// Every flag and environment variable, as the Markdown table in docs/operating.md: built from
/// the flags' own definitions, so that a test can hold the documentation to them.
pub fn markdown_flags_table() -> String {
    use clap::CommandFactory;
    let mut out = String::from("| flag | env | default | meaning |\n|---|---|---|---|\n");
    let command = Config::command();
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        let env = arg
            .get_env()
            .map(|e| format!("`{}`", e.to_string_lossy()))
            .unwrap_or_default();
        let defaults: Vec<_> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let default = match defaults.as_slice() {
            [] => String::new(),
            values => format!("`{}`", values.join(",")),
        };
        let help = arg.get_long_help().or(arg.get_help()).map(one_line);
        out.push_str(&format!(
            "| `--{long}` | {env} | {default} | {} |\n",
            help.unwrap_or_default()
        ));
    }
    for (env, meaning) in OTHER_ENV {
        out.push_str(&format!("| | `{env}` | | {meaning} |\n"));
    }
    out
}

/// A help text on one table line: its lines joined, table pipes escaped.
fn one_line(help: &clap::builder::StyledStr) -> String {
    help.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A production facade must be told who may call; --simulate needs nothing.
    #[test]
    fn caller_authorization_must_be_configured_unless_simulating() {
        let validate = |args: &[&str]| {
            Config::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
                .map_err(|e| e.to_string())?
                .validate_caller_auth()
        };
        let gateway = ["--gateway-url", "https://gw:8043"];
        let error = validate(&gateway).unwrap_err();
        assert!(
            error.contains("--callers") && error.contains("--no-caller-auth"),
            "{error}"
        );
        assert!(validate(&[&gateway[..], &["--no-caller-auth"]].concat()).is_ok());
        assert!(validate(&["--simulate"]).is_ok());
        let with_callers = [&gateway[..], &["--callers", "c.toml"]].concat();
        assert!(validate(&with_callers)
            .unwrap_err()
            .contains("--caller-tokens"));
        assert!(validate(&[&with_callers[..], &["--caller-tokens", "t"]].concat()).is_ok());
        assert!(validate(&[&with_callers[..], &["--no-caller-auth"]].concat()).is_err());
        assert!(
            validate(&[&gateway[..], &["--no-caller-auth", "--caller-tokens", "t"]].concat())
                .is_err()
        );
        assert!(
            validate(&[&gateway[..], &["--no-caller-auth", "--tls-cert", "c"]].concat()).is_err(),
            "--tls-cert needs --tls-key"
        );
    }

    #[test]
    fn gateway_url_is_required_unless_simulating() {
        assert!(Config::try_parse_from(["x"]).is_err());
        assert!(Config::try_parse_from(["x", "--simulate"]).is_ok());
        assert!(Config::try_parse_from(["x", "--simulate", "--max-agent-id", "1000000"]).is_err());
        assert!(Config::try_parse_from(["x", "--simulate", "--request-timeout-ms", "0"]).is_err());
        for flag in [
            "--stream-send-timeout-secs",
            "--max-release-waiters",
            "--max-polled-agents",
        ] {
            assert!(Config::try_parse_from(["x", "--simulate", flag, "0"]).is_err());
            assert!(Config::try_parse_from(["x", "--simulate", flag, "1"]).is_ok());
        }
        assert!(
            Config::try_parse_from(["x", "--simulate", "--max-polled-agents", "1000001"]).is_err()
        );
        let default = Config::try_parse_from(["x", "--simulate"]).unwrap();
        assert_eq!(default.events().max_polled_agents, 10_000);
        let short = Config::try_parse_from([
            "x",
            "--simulate",
            "--idempotency-window-secs",
            "5",
            "--request-timeout-ms",
            "6000",
        ])
        .unwrap();
        assert!(short.validate().is_err());
        let cut_short = Config::try_parse_from([
            "x",
            "--simulate",
            "--max-connection-age-grace-secs",
            "5",
            "--request-timeout-ms",
            "6000",
        ])
        .unwrap();
        assert!(cut_short.validate().is_err());
        let long_calls =
            Config::try_parse_from(["x", "--simulate", "--request-timeout-ms", "120000"]).unwrap();
        assert!(long_calls.validate().is_ok());
        assert_eq!(
            long_calls.server().max_connection_age_grace,
            Duration::from_secs(120)
        );
        let default = Config::try_parse_from(["x", "--simulate"]).unwrap();
        assert_eq!(
            default.server().max_connection_age_grace,
            Duration::from_secs(30)
        );
    }

    /// The NATS client would drop a URL's user and password and connect anonymously: such a
    /// URL is refused at start, and the refusal does not repeat the user or password.
    #[test]
    fn a_nats_url_with_a_user_or_password_is_refused_without_repeating_it() {
        let validate = |urls: &str| {
            Config::try_parse_from(["x", "--simulate", &format!("--nats-url={urls}")])
                .unwrap()
                .validate()
        };
        proptest::proptest!(|(
            user in "[A-Za-z0-9._~-]{1,12}",
            password in proptest::option::of("[A-Za-z0-9._~!$&'()*+;=-]{1,16}"),
            scheme in proptest::option::of("(nats|tls|ws|wss)://"),
            before in proptest::bool::ANY,
        )| {
            let user_info = match &password {
                Some(password) => format!("{user}:{password}"),
                None => user.clone(),
            };
            let scheme = scheme.unwrap_or_default();
            let with = format!("{scheme}{user_info}@nats-1.nats:4222");
            let plain = format!("{scheme}nats-0.nats:4222");
            let urls = if before { format!("{plain},{with}") } else { format!("{with}, {plain}") };
            let error = validate(&urls).unwrap_err();
            proptest::prop_assert!(error.contains("--nats-creds"), "{}", error);
            proptest::prop_assert!(!error.contains(&format!("{user_info}@")), "{}", error);
            proptest::prop_assert!(validate(&plain).is_ok());
        });
        // A path's '@' is not a user.
        assert!(validate("ws://nats.example:443/ws@edge").is_ok());
    }

    /// With NATS a request_id's claim is a key that expires with the window: it must outlive
    /// the request's answer (the request timeout, the grace to answer, the write).
    #[test]
    fn with_nats_the_idempotency_window_outlasts_the_request_timeout_by_a_margin() {
        let validate = |window: &str| {
            Config::try_parse_from([
                "x",
                "--simulate",
                "--nats-url",
                "nats://127.0.0.1:4222",
                "--request-timeout-ms",
                "10000",
                "--idempotency-window-secs",
                window,
            ])
            .unwrap()
            .validate()
        };
        let error = validate("10").unwrap_err();
        assert!(
            error.contains("--idempotency-window-secs (10)")
                && error.contains("--request-timeout-ms (10000 ms)"),
            "{error}"
        );
        assert!(validate("19").is_err());
        assert!(validate("20").is_ok());
        // Alone, the answer lives in the process: the request timeout is enough.
        let alone = Config::try_parse_from([
            "x",
            "--simulate",
            "--request-timeout-ms",
            "10000",
            "--idempotency-window-secs",
            "10",
        ])
        .unwrap();
        assert!(alone.validate().is_ok());
    }

    #[test]
    fn limit_flags_are_range_checked() {
        for (flag, refused, accepted) in [
            ("--gateway-probe-secs", "0", "1"),
            ("--max-gateway-requests", "0", "1"),
            ("--max-gateway-queue", "1000001", "0"),
            ("--max-connection-age-secs", "0", "1"),
            ("--max-connection-age-grace-secs", "0", "10"),
            ("--http2-keepalive-secs", "0", "1"),
        ] {
            assert!(Config::try_parse_from(["x", "--simulate", flag, refused]).is_err());
            let config = Config::try_parse_from(["x", "--simulate", flag, accepted]).unwrap();
            assert!(config.validate().is_ok(), "{flag} {accepted}");
        }
    }

    #[test]
    fn logs_are_json_unless_stderr_is_a_terminal_and_metrics_are_off_unless_asked_for() {
        let default = Config::try_parse_from(["x", "--simulate"]).unwrap();
        assert_eq!(default.log_format, LogFormat::Auto);
        assert_eq!(LogFormat::Auto.resolve(false), LogFormat::Json);
        assert_eq!(LogFormat::Auto.resolve(true), LogFormat::Text);
        assert_eq!(LogFormat::Json.resolve(true), LogFormat::Json);
        assert_eq!(LogFormat::Text.resolve(false), LogFormat::Text);
        assert_eq!(default.metrics_listen, None);
        let on = Config::try_parse_from(["x", "--simulate", "--metrics-listen", "0.0.0.0:9464"])
            .unwrap();
        assert_eq!(on.metrics_listen, Some("0.0.0.0:9464".parse().unwrap()));
        assert!(Config::try_parse_from(["x", "--simulate", "--metrics-listen", "9464"]).is_err());
    }

    /// The demo listens on loopback: `--simulate` alone listens on
    /// 127.0.0.1:50051, the real service on every interface, and `--listen` wins in both modes.
    /// Assumes CCGW_LISTEN is not set in the test's environment.
    #[test]
    fn the_demo_listens_on_loopback_unless_told_otherwise() {
        let listen = |args: &[&str]| {
            Config::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
                .unwrap()
                .listen_addr()
                .to_string()
        };
        assert_eq!(listen(&["--simulate"]), "127.0.0.1:50051");
        assert_eq!(
            listen(&["--gateway-url", "https://gw:8043"]),
            "0.0.0.0:50051"
        );
        assert_eq!(
            listen(&["--simulate", "--listen", "0.0.0.0:50051"]),
            "0.0.0.0:50051"
        );
        assert_eq!(
            listen(&[
                "--gateway-url",
                "https://gw:8043",
                "--listen",
                "127.0.0.1:6000"
            ]),
            "127.0.0.1:6000"
        );
        assert_eq!(
            listen(&["--simulate", "--gateway-url", "https://gw:8043"]),
            "127.0.0.1:50051",
            "--simulate runs the demo even with a gateway URL"
        );
    }

    /// A client certificate needs its key and the reverse; skipping verification contradicts a
    /// CA bundle. Each is refused by name.
    #[test]
    fn gateway_tls_flags_that_cannot_work_together_are_refused() {
        let refused = |args: &[&str]| {
            let base = ["x", "--gateway-url", "https://gw:8043"];
            Config::try_parse_from(base.iter().chain(args))
                .unwrap_err()
                .to_string()
        };
        let error = refused(&["--gateway-client-cert", "c.pem"]);
        assert!(error.contains("--gateway-client-key"), "{error}");
        let error = refused(&["--gateway-client-key", "k.pem"]);
        assert!(error.contains("--gateway-client-cert"), "{error}");
        let error = refused(&[
            "--gateway-insecure-skip-verify",
            "--gateway-ca-bundle",
            "ca.pem",
        ]);
        assert!(error.contains("--gateway-ca-bundle"), "{error}");
    }

    /// TLS files are read at startup; a missing one is named, with its flag.
    #[test]
    fn an_unreadable_gateway_tls_file_is_named() {
        let config = Config::try_parse_from([
            "x",
            "--gateway-url",
            "https://gw:8043",
            "--gateway-client-cert",
            "/nonexistent/client.pem",
            "--gateway-client-key",
            "/nonexistent/client-key.pem",
        ])
        .unwrap();
        let error = config
            .gateway("https://gw:8043".into())
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("--gateway-client-cert /nonexistent/client.pem: cannot read it"),
            "{error}"
        );
    }
}
