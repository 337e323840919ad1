//! Logging, metrics and the one log line per RPC. Nothing logged or counted anywhere carries a
//! Guid or cookie: their types redact themselves, and no label holds an agent id.
mod call_record;
pub mod endpoint;
mod metrics;
mod rpc;

use std::io::IsTerminal;

pub use call_record::{CallFacts, CallRecord};
pub(crate) use metrics::{GatewayOperation, StreamMetrics};
pub use metrics::{Metrics, ScrapeTimeMetrics};
pub use rpc::{ObservedBody, RpcTelemetry, RpcTelemetryLayer};
pub use tracing_appender::non_blocking::ErrorCounter as DroppedLogLines;

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{fmt, EnvFilter};

use crate::config::LogFormat;

/// The installed logging: keep it until the process ends (dropping it writes out what is still
/// queued).
#[derive(Debug)]
pub struct Logging {
    _guard: WorkerGuard,
    dropped: DroppedLogLines,
}

impl Logging {
    /// Log lines the writer dropped because its queue was full.
    pub fn dropped_lines(&self) -> DroppedLogLines {
        self.dropped.clone()
    }
}

/// Installs the global subscriber; `RUST_LOG` overrides the default `info` filter.
///
/// Lines are written by a thread of their own, through a buffer flushed whenever its queue is
/// empty: at thousands of ReleaseCalls a second, a `write` system call per log line on the
/// calling thread was a tenth of the facade's CPU (BENCHMARKS.md). Under a burst several lines
/// go out in one write; at most 128 000 lines wait, and beyond that lines are dropped rather
/// than calls slowed (counted: `ccgw_log_lines_dropped_total`).
pub fn init(format: LogFormat) -> Logging {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .thread_name("ccgw-log")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let dropped = writer.error_counter();
    let terminal = std::io::stderr().is_terminal();
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(terminal);
    let _ = match format.resolve(terminal) {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text | LogFormat::Auto => builder.try_init(),
    };
    Logging {
        _guard: guard,
        dropped,
    }
}
