//! Flags and environment variables of the service binary.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

use crate::{
    api::ApiSettings,
    domain::{DEFAULT_MAX_AGENT_ID, MAX_AGENT_ID_LIMIT, MIN_AGENT_ID},
    events::EventSettings,
    gateway::GatewaySettings,
    release::ReleasePolicy,
    server::ServerSettings,
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

    /// CC-Gateway base URL, e.g. `https://ccgw.example:8043` (the /agentgateway/resource prefix
    /// is added). Not needed with --simulate.
    #[arg(long, env = "CCGW_GATEWAY_URL", required_unless_present = "simulate")]
    pub(crate) gateway_url: Option<String>,

    /// PEM file with the CA certificate(s) that issued the gateway's TLS certificate.
    #[arg(long, env = "CCGW_GATEWAY_CA_BUNDLE")]
    pub(crate) gateway_ca_bundle: Option<PathBuf>,

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

    /// Largest gateway answer read, in bytes.
    #[arg(long, env = "CCGW_MAX_ANSWER_BYTES", default_value_t = 64 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..=16 * 1024 * 1024))]
    pub(crate) max_answer_bytes: u32,

    /// How long a request_id's answer is remembered, in seconds; at least the request timeout.
    #[arg(long, env = "CCGW_IDEMPOTENCY_WINDOW_SECS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub(crate) idempotency_window_secs: u64,

    /// How many request_ids are remembered at most (oldest forgotten first).
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

    /// Address of the Prometheus endpoint (`GET /metrics`), e.g. `0.0.0.0:9464`. Off unless
    /// set: it is a second port, without authentication, that a deployment opens on purpose
    /// (and that a NetworkPolicy then restricts to the scraper).
    #[arg(long, env = "CCGW_METRICS_LISTEN")]
    pub(crate) metrics_listen: Option<SocketAddr>,
}

/// The real service's default: reachable from the other services it is made for.
const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 50051);
/// The `--simulate` demo's default: it has no authentication and hangs up calls for anyone who
/// reaches it, so only this machine may, unless `--listen` says otherwise.
const DEFAULT_SIMULATE_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 50051);

impl Config {
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
        if self.idempotency_window_secs * 1000 < self.request_timeout_ms {
            return Err(format!(
                "--idempotency-window-secs ({}) must cover --request-timeout-ms ({})",
                self.idempotency_window_secs, self.request_timeout_ms
            ));
        }
        Ok(())
    }

    /// Gateway settings for `base_url` (the configured one, or the simulator's).
    pub(crate) fn gateway(&self, base_url: String) -> std::io::Result<GatewaySettings> {
        let ca_bundle_pem = self
            .gateway_ca_bundle
            .as_ref()
            .map(std::fs::read)
            .transpose()?;
        Ok(GatewaySettings {
            base_url,
            ca_bundle_pem,
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            max_answer_bytes: self.max_answer_bytes as usize,
            legacy_release_path: self.legacy_release_path,
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
            ..ReleasePolicy::default()
        }
    }

    pub(crate) fn api(&self) -> ApiSettings {
        ApiSettings {
            max_agent_id: self.max_agent_id,
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            max_watch_agents: self.max_watch_agents as usize,
            stream_send_timeout: Duration::from_secs(self.stream_send_timeout_secs),
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

    pub fn server(&self) -> ServerSettings {
        ServerSettings {
            drain_timeout: Duration::from_secs(self.drain_timeout_secs),
            ..ServerSettings::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Review point 6 (the demo listens on loopback): `--simulate` alone listens on
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
}
