//! How the flags are presented: their order in `--help`, and the table of them in docs/operating.md.
use clap::{Arg, CommandFactory};

use super::Config;

/// The flags in the order `--help` and docs/operating.md's table list them. The groups hold their
/// flags by room; readers know the flags in this order, which interleaves the rooms, so it is
/// kept here, in one list.
const FLAG_ORDER: &[&str] = &[
    "listen",
    "metrics-listen",
    "health-listen",
    "gateway-url",
    "gateway-ca-bundle",
    "gateway-client-cert",
    "gateway-client-key",
    "gateway-insecure-skip-verify",
    "legacy-release-path",
    "max-agent-id",
    "connect-timeout-ms",
    "request-timeout-ms",
    "max-answer-bytes",
    "idempotency-window-secs",
    "idempotency-capacity",
    "max-sessions",
    "session-idle-secs",
    "poll-pause-ms",
    "poll-timeout-ms",
    "poll-backoff-max-ms",
    "watch-grace-secs",
    "replay-events",
    "replay-age-secs",
    "watch-buffer-events",
    "heartbeat-secs",
    "max-watch-agents",
    "max-watchers",
    "max-release-waiters",
    "max-polled-agents",
    "stream-send-timeout-secs",
    "drain-timeout-secs",
    "log-format",
    "simulate",
    "sim-listen",
    "tls-cert",
    "tls-key",
    "tls-client-ca",
    "callers",
    "caller-tokens",
    "no-caller-auth",
    "reload-secs",
    "max-streams-per-caller",
    "gateway-probe-secs",
    "max-gateway-requests",
    "max-gateway-queue",
    "max-connection-age-secs",
    "max-request-ids-per-caller",
    "max-pending-request-ids-per-caller",
    "max-gateway-queue-per-caller",
    "max-release-waiters-per-caller",
    "max-connection-age-grace-secs",
    "http2-keepalive-secs",
    "max-connections",
    "max-connections-per-address",
    "max-handshakes",
    "max-handshakes-per-address",
    "handshake-timeout-ms",
    "nats-url",
    "nats-creds",
    "nats-tls-ca",
    "nats-tls-cert",
    "nats-tls-key",
    "nats-prefix",
    "nats-replicas",
    "lease-renew-secs",
    "lease-ttl-secs",
    "release-without-nats",
];

/// `arg` placed at its position in [`FLAG_ORDER`]; a flag missing there goes after them all.
pub(super) fn in_flag_order(arg: Arg) -> Arg {
    let position = arg
        .get_long()
        .and_then(|long| FLAG_ORDER.iter().position(|listed| *listed == long))
        .unwrap_or(FLAG_ORDER.len());
    arg.display_order(position)
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
/// the flags' own definitions, so that a test can hold the document to them.
pub fn markdown_flags_table() -> String {
    let mut out = String::from("| flag | env | default | meaning |\n|---|---|---|---|\n");
    let command = Config::command();
    let mut args: Vec<&Arg> = command.get_arguments().collect();
    args.sort_by_key(|arg| arg.get_display_order());
    for arg in args {
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

    /// A flag missing from [`FLAG_ORDER`] would sit after all the others in `--help` and the
    /// table; one listed twice, or no longer a flag, is a mistake in the list.
    #[test]
    fn every_flag_has_one_place_in_the_flag_order() {
        let command = Config::command();
        let mut flags: Vec<&str> = command.get_arguments().filter_map(Arg::get_long).collect();
        let mut listed = FLAG_ORDER.to_vec();
        flags.sort_unstable();
        listed.sort_unstable();
        assert_eq!(flags, listed);
    }
}
