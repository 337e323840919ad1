//! Logging. Nothing logged anywhere carries a Guid or cookie: their types redact themselves.
mod call_record;

use std::io::IsTerminal;

pub use call_record::{CallFacts, CallRecord};

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{fmt, EnvFilter};

use crate::config::LogFormat;

/// Installs the global subscriber; `RUST_LOG` overrides the default `info` filter. Keep the
/// guard until the process ends: dropping it writes out what is still queued.
///
/// Lines are written by a thread of their own, through a buffer flushed whenever its queue is
/// empty: at thousands of ReleaseCalls a second, a `write` system call per log line on the
/// calling thread was a tenth of the facade's CPU (BENCHMARKS.md). Under a burst several lines
/// go out in one write; at most 128 000 lines wait, and beyond that lines are dropped rather
/// than calls slowed.
pub fn init(format: LogFormat) -> WorkerGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .thread_name("ccgw-log")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    guard
}
