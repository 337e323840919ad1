//! Logging, metrics and the one log line per RPC. Nothing logged or counted anywhere carries a
//! Guid or cookie: their types redact themselves, and no label holds an agent id.
mod call_record;
pub mod endpoint;
mod log_ids;
mod metrics;
#[cfg(target_os = "linux")]
pub mod process;
mod rpc;
pub mod trace;

use std::io::IsTerminal;

pub use call_record::{CallFacts, CallRecord};
pub(crate) use metrics::{
    ConnectionClosed, ConnectionLimit, GatewayOperation, Listener, ListenerMetrics, StreamMetrics,
};
pub use metrics::{Metrics, ScrapeTimeMetrics};
pub use rpc::{ObservedBody, RpcTelemetry, RpcTelemetryLayer};
pub use tracing_appender::non_blocking::ErrorCounter as DroppedLogLines;

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{fmt, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer};

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
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

/// Installs the global subscriber (log lines, and spans over OTLP when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set); `RUST_LOG` overrides the default `info` filter of the
/// log lines.
///
/// Lines are written by a thread of their own, through a buffer flushed whenever its queue is
/// empty: at thousands of ReleaseCalls a second, a `write` system call per log line on the
/// calling thread was a tenth of the facade's CPU (BENCHMARKS.md). Under a burst several lines
/// go out in one write; at most 128 000 lines wait, and beyond that lines are dropped rather
/// than calls slowed (counted: `ccgw_log_lines_dropped_total`).
pub fn init(format: LogFormat) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, logs) = NonBlockingBuilder::default()
        .thread_name("ccgw-log")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let dropped = writer.error_counter();
    let terminal = std::io::stderr().is_terminal();
    let lines = fmt::layer().with_writer(writer).with_ansi(terminal);
    let lines = match format.resolve(terminal) {
        LogFormat::Json => lines
            .json()
            .flatten_event(true)
            .map_event_format(log_ids::WithTraceIds)
            .boxed(),
        LogFormat::Text | LogFormat::Auto => lines.boxed(),
    };
    let (traces, exporter) = match trace::exporter_from_env() {
        Ok(Some((layer, exporter))) => (Some(layer), Some(exporter)),
        Ok(None) => (None, None),
        Err(error) => {
            eprintln!("ccgw-callcontrol: traces are not exported: {error}");
            (None, None)
        }
    };
    let _ = tracing_subscriber::registry()
        .with(lines.with_filter(filter))
        .with(traces)
        .try_init();
    if exporter.is_some() {
        tracing::info!("exporting spans over OTLP (OTEL_EXPORTER_OTLP_ENDPOINT)");
    }
    Telemetry {
        _exporter: exporter,
        _logs: logs,
        dropped,
    }
}

/// The installed logging and tracing. Keep it until the process ends: dropping it exports the
/// spans still queued (bounded in time), then writes out the log lines still queued.
#[must_use]
pub struct Telemetry {
    // Fields drop in order: the exporter's last words may still be logged.
    _exporter: Option<trace::Exporter>,
    _logs: WorkerGuard,
    dropped: DroppedLogLines,
}

impl Telemetry {
    /// Log lines the writer dropped because its queue was full.
    pub fn dropped_lines(&self) -> DroppedLogLines {
        self.dropped.clone()
    }
}
