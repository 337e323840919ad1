//! The `trace_id` and `span_id` of JSON log lines: every line written for a call that has a
//! trace (the caller sent a `traceparent`, or spans are exported) carries them, so a caller's
//! trace id finds the call's lines. They come from the call's trace, which travels with the
//! call in a task-local, not from tracing spans: the log filter leaves the exported spans out,
//! and without an exporter there are none.
use std::fmt;

use tracing::{Event, Subscriber};
use tracing_subscriber::{
    fmt::{format::Writer, FmtContext, FormatEvent, FormatFields},
    registry::LookupSpan,
};

use super::trace;

/// Wraps tracing-subscriber's JSON event format. A line written outside a call is written as
/// it would be; one for a call is formatted aside, and the two fields go in before its closing
/// brace.
#[derive(Debug)]
pub(super) struct WithTraceIds<F>(pub(super) F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let Some(ids) = trace::current_ids() else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::with_capacity(256);
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        let end = line.rfind('}').ok_or(fmt::Error)?;
        writer.write_str(&line[..end])?;
        write!(
            writer,
            r#","trace_id":"{}","span_id":"{}""#,
            ids.trace_id, ids.span_id
        )?;
        writer.write_str(&line[end..])
    }
}
