//! Logs and metrics.
use std::net::SocketAddr;

use clap::Args;

use crate::telemetry::LogFormat;

/// Flags of telemetry: the log format and the metrics endpoint.
#[derive(Debug, Clone, Args)]
pub struct TelemetryFlags {
    /// Log format: `json` (one object a line, for log collectors), `text`, or `auto`: JSON
    /// when stderr is not a terminal (a container), text when it is.
    #[arg(long, env = "CCGW_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,

    /// Address of the Prometheus endpoint (`GET /metrics`), e.g. `0.0.0.0:9464`. Off unless
    /// set: it is a second port, without authentication, that a deployment opens on purpose
    /// (and that a NetworkPolicy then restricts to the scraper).
    #[arg(long, env = "CCGW_METRICS_LISTEN")]
    pub(crate) metrics_listen: Option<SocketAddr>,
}
