//! Flags and environment variables of the service binary, one group of flags per room: each
//! group owns its flags and their defaults and turns them into its room's settings, so that the
//! rooms themselves know nothing of clap.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{CommandFactory, FromArgMatches, Parser};

use crate::{
    api::ApiSettings,
    events::EventSettings,
    gateway::{GatewaySettings, SettingsError},
    nats::{NatsSettings, CLAIM_OUTLIVES_REQUEST},
    release::ReleasePolicy,
    server::ServerSettings,
    sessions::SessionLimits,
};

mod callers;
mod demo;
mod events;
mod gateway;
mod help;
mod nats;
mod release;
mod server;
mod sessions;
mod telemetry;

use self::{
    callers::CallerFlags,
    demo::DemoFlags,
    events::EventFlags,
    gateway::GatewayFlags,
    nats::{NatsFlags, LEASE_MARGIN_SECS},
    release::ReleaseFlags,
    server::ServerFlags,
    sessions::SessionFlags,
};
pub use self::{help::markdown_flags_table, telemetry::TelemetryFlags};

/// gRPC facade over Huawei CC-Gateway: hang up contact-center calls, watch calls end.
#[derive(Debug, Clone, Parser)]
#[command(version, about, mut_args = help::in_flag_order)]
pub struct Config {
    #[command(flatten)]
    pub(crate) server: ServerFlags,
    #[command(flatten)]
    pub(crate) gateway: GatewayFlags,
    #[command(flatten)]
    pub(crate) sessions: SessionFlags,
    #[command(flatten)]
    pub(crate) release: ReleaseFlags,
    #[command(flatten)]
    pub(crate) events: EventFlags,
    #[command(flatten)]
    pub(crate) callers: CallerFlags,
    #[command(flatten)]
    pub(crate) nats: NatsFlags,
    #[command(flatten)]
    pub telemetry: TelemetryFlags,
    #[command(flatten)]
    pub(crate) demo: DemoFlags,
}

/// A configuration the service refuses to start with: each names its flags and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Outside the demo, nobody said who may call.
    #[error(
        "caller authorization is not configured: give --callers FILE (CCGW_CALLERS) to say who \
         may call, or --no-caller-auth (CCGW_NO_CALLER_AUTH) to let anyone who reaches the port \
         release and watch any agent's calls"
    )]
    CallerAuthorizationUnset,
    /// `--callers` without a way for a caller to prove who it is.
    #[error(
        "--callers: no caller could identify itself: give --caller-tokens FILE (bearer tokens) \
         or --tls-client-ca FILE (client certificates)"
    )]
    CallersCannotIdentify,
    /// The callers file or the tokens file cannot be used; the reason names the file.
    #[error("{0}")]
    CallersFiles(String),
    /// A request_id would be forgotten while its request may still run.
    #[error(
        "--idempotency-window-secs ({window_secs}) must cover --request-timeout-ms \
         ({request_timeout_ms})"
    )]
    IdempotencyWindowBelowRequestTimeout {
        window_secs: u64,
        request_timeout_ms: u64,
    },
    /// The NATS client would connect without the user and password of a URL.
    #[error(
        "--nats-url holds a user or password, which the NATS client does not send: \
         authenticate with --nats-creds or a client certificate (--nats-tls-cert and \
         --nats-tls-key)"
    )]
    NatsUrlHoldsUserInfo,
    /// With NATS, a request_id's claim could expire before its answer is written.
    #[error(
        "--idempotency-window-secs ({window_secs}) must exceed --request-timeout-ms \
         ({request_timeout_ms} ms) by at least {outlives_secs} s with --nats-url: a \
         request_id's claim must outlive its answer, or a repeat finds the id free and \
         releases again",
        outlives_secs = CLAIM_OUTLIVES_REQUEST.as_secs()
    )]
    IdempotencyWindowBelowClaim {
        window_secs: u64,
        request_timeout_ms: u64,
    },
    /// A replica could take over a shard whose former holder may still be polling.
    #[error(
        "--lease-ttl-secs ({lease_ttl_secs}) must exceed --poll-timeout-ms ({poll_timeout_ms} \
         ms) plus --lease-renew-secs ({lease_renew_secs}) plus a {LEASE_MARGIN_SECS} s margin: \
         a paused replica could still be polling when another takes its shards over"
    )]
    LeaseTtlTooShort {
        lease_ttl_secs: u64,
        poll_timeout_ms: u64,
        lease_renew_secs: u64,
    },
    /// A ReleaseCall could be cut off with its connection.
    #[error(
        "--max-connection-age-grace-secs ({grace_secs}) must cover --request-timeout-ms \
         ({request_timeout_ms})"
    )]
    ConnectionAgeGraceBelowRequestTimeout {
        grace_secs: u64,
        request_timeout_ms: u64,
    },
}

impl Config {
    /// The configuration when no flag is given and no variable is set: the defaults the flags
    /// declare, which the settings' `Default` (for tests) comes from. With `--simulate`, the
    /// one mode that needs no gateway URL; no setting derived from it depends on the mode.
    fn defaults() -> Self {
        let command = Self::command().mut_args(|arg| arg.env(None));
        let matches = command
            .try_get_matches_from(["defaults", "--simulate"])
            .expect("the defaults parse");
        Self::from_arg_matches(&matches).expect("the defaults are a configuration")
    }

    /// Who may call must be said: a production facade that silently let anyone hang up any
    /// call would be found out too late.
    fn validate_caller_auth(&self) -> Result<(), ConfigError> {
        let callers = &self.callers;
        if !self.demo.simulate && callers.callers.is_none() && !callers.no_caller_auth {
            return Err(ConfigError::CallerAuthorizationUnset);
        }
        if callers.callers.is_some()
            && callers.caller_tokens.is_none()
            && self.server.tls_client_ca.is_none()
        {
            return Err(ConfigError::CallersCannotIdentify);
        }
        Ok(())
    }

    /// Where the gRPC server listens: `--listen` / `CCGW_LISTEN`, else the default of the mode.
    pub fn listen_addr(&self) -> SocketAddr {
        self.server.listen_addr(self.demo.simulate)
    }

    /// Checks what one flag's range cannot: a request id must be remembered at least as long
    /// as its request may run, or a duplicate could act while the first is still waiting.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        self.validate_caller_auth()?;
        let window_secs = self.release.idempotency_window_secs;
        let request_timeout_ms = self.release.request_timeout_ms;
        if window_secs * 1000 < request_timeout_ms {
            return Err(ConfigError::IdempotencyWindowBelowRequestTimeout {
                window_secs,
                request_timeout_ms,
            });
        }
        if self.nats.nats_url.is_some() {
            // The NATS client ignores a URL's user and password: the server would see an
            // anonymous client. The URL is not repeated: it holds a password.
            if self.nats.url_holds_user_info() {
                return Err(ConfigError::NatsUrlHoldsUserInfo);
            }
            let outlives_ms = CLAIM_OUTLIVES_REQUEST.as_millis() as u64;
            if window_secs * 1000 < request_timeout_ms + outlives_ms {
                return Err(ConfigError::IdempotencyWindowBelowClaim {
                    window_secs,
                    request_timeout_ms,
                });
            }
            let poll_timeout_ms = self.events.poll_timeout_ms;
            let NatsFlags {
                lease_renew_secs,
                lease_ttl_secs,
                ..
            } = self.nats;
            let fenced_ms = poll_timeout_ms + (lease_renew_secs + LEASE_MARGIN_SECS) * 1000;
            if fenced_ms >= lease_ttl_secs * 1000 {
                return Err(ConfigError::LeaseTtlTooShort {
                    lease_ttl_secs,
                    poll_timeout_ms,
                    lease_renew_secs,
                });
            }
        }
        // A ReleaseCall cut off with its connection would leave its caller guessing whether the
        // call was hung up.
        if let Some(grace_secs) = self.server.max_connection_age_grace_secs {
            if grace_secs * 1000 < request_timeout_ms {
                return Err(ConfigError::ConnectionAgeGraceBelowRequestTimeout {
                    grace_secs,
                    request_timeout_ms,
                });
            }
        }
        Ok(())
    }

    /// Gateway settings for `base_url` (the configured one, or the simulator's).
    pub(crate) fn gateway(&self, base_url: String) -> Result<GatewaySettings, SettingsError> {
        let max_queue_per_caller = self
            .callers
            .gateway_queue_share(self.gateway.max_gateway_queue);
        self.gateway.settings(base_url, max_queue_per_caller)
    }

    pub(crate) fn session_limits(&self) -> SessionLimits {
        self.sessions.limits()
    }

    pub(crate) fn release_policy(&self) -> ReleasePolicy {
        let gateway = &self.gateway;
        self.release.policy(
            self.callers.release_shares(
                self.release.idempotency_capacity,
                gateway
                    .max_gateway_requests
                    .saturating_add(gateway.max_gateway_queue),
                self.events.max_release_waiters,
            ),
            self.nats.release_without_nats,
        )
    }

    /// The callers and tokens files, when caller authorization is on.
    pub(crate) fn callers_files(&self) -> Option<(PathBuf, Option<PathBuf>)> {
        self.callers.files()
    }

    pub(crate) fn api(&self) -> ApiSettings {
        ApiSettings {
            max_agent_id: self.gateway.max_agent_id,
            request_timeout: self.release.request_timeout(),
            max_watch_agents: self.events.max_watch_agents as usize,
            stream_send_timeout: Duration::from_secs(self.events.stream_send_timeout_secs),
            max_streams_per_caller: self.callers.max_streams_per_caller as usize,
        }
    }

    pub(crate) fn events(&self) -> EventSettings {
        self.events.settings()
    }

    /// How replicas share state, when `--nats-url` is given.
    pub(crate) fn nats(&self) -> Option<NatsSettings> {
        self.nats.settings(self.events.poll_timeout())
    }

    pub fn server(&self) -> ServerSettings {
        self.server.settings(
            Duration::from_secs(self.gateway.gateway_probe_secs),
            self.release.request_timeout(),
        )
    }
}

/// The flags' defaults.
impl Default for EventSettings {
    fn default() -> Self {
        Config::defaults().events()
    }
}

/// The flags' defaults.
impl Default for SessionLimits {
    fn default() -> Self {
        Config::defaults().session_limits()
    }
}

#[cfg(test)]
impl GatewaySettings {
    /// The flags' defaults, for the gateway at `base_url`.
    pub(crate) fn new(base_url: impl Into<String>) -> Self {
        Config::defaults()
            .gateway(base_url.into())
            .expect("the defaults name no TLS file")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::LogFormat;

    /// A production facade must be told who may call; --simulate needs nothing.
    #[test]
    fn caller_authorization_must_be_configured_unless_simulating() {
        let validate = |args: &[&str]| {
            Config::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
                .map_err(|e| e.to_string())?
                .validate_caller_auth()
                .map_err(|e| e.to_string())
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
            proptest::prop_assert_eq!(&error, &ConfigError::NatsUrlHoldsUserInfo);
            let error = error.to_string();
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
        assert!(matches!(
            error,
            ConfigError::IdempotencyWindowBelowClaim { .. }
        ));
        let error = error.to_string();
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

    /// The settings tests start from (`Default`) are those of a service given no flag.
    #[test]
    fn settings_defaults_are_the_flags_defaults() {
        let config = Config::try_parse_from(["x", "--simulate"]).unwrap();
        assert_eq!(
            format!("{:?}", EventSettings::default()),
            format!("{:?}", config.events())
        );
        assert_eq!(
            format!("{:?}", SessionLimits::default()),
            format!("{:?}", config.session_limits())
        );
    }

    /// A caller's share of a capacity is a quarter of it unless its flag says otherwise.
    #[test]
    fn a_callers_share_is_a_quarter_unless_given() {
        let shares = |args: &[&str]| {
            let config = Config::try_parse_from(["x", "--simulate"].iter().chain(args)).unwrap();
            let queue = config.gateway("http://127.0.0.1:1".into()).unwrap();
            (
                config.release_policy().caller_shares,
                queue.max_queue_per_caller,
            )
        };
        let (default, queue) = shares(&[]);
        assert_eq!(
            (
                default.request_ids,
                default.pending_request_ids,
                default.release_waiters,
                queue
            ),
            (25_000, 272, 250, 256)
        );
        let (given, queue) = shares(&[
            "--max-request-ids-per-caller",
            "7",
            "--max-pending-request-ids-per-caller",
            "8",
            "--max-release-waiters-per-caller",
            "9",
            "--max-gateway-queue-per-caller",
            "10",
        ]);
        assert_eq!(
            (
                given.request_ids,
                given.pending_request_ids,
                given.release_waiters,
                queue
            ),
            (7, 8, 9, 10)
        );
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
        assert_eq!(default.telemetry.log_format, LogFormat::Auto);
        assert_eq!(LogFormat::Auto.resolve(false), LogFormat::Json);
        assert_eq!(LogFormat::Auto.resolve(true), LogFormat::Text);
        assert_eq!(LogFormat::Json.resolve(true), LogFormat::Json);
        assert_eq!(LogFormat::Text.resolve(false), LogFormat::Text);
        assert_eq!(default.telemetry.metrics_listen, None);
        let on = Config::try_parse_from(["x", "--simulate", "--metrics-listen", "0.0.0.0:9464"])
            .unwrap();
        assert_eq!(
            on.telemetry.metrics_listen,
            Some("0.0.0.0:9464".parse().unwrap())
        );
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
