//! Traces: a caller's W3C trace context (`traceparent`, `tracestate`) continues on the gateway
//! requests made for its call, and spans are exported over OTLP (HTTP/protobuf) when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! Two modes, chosen once at startup:
//! - **No exporter** (the default): no span is made. A call whose metadata carries a valid
//!   `traceparent` has it (and its `tracestate`) passed on to its gateway requests: the
//!   caller's span is their parent. A call without one costs a header lookup.
//! - **Exporting**: each call gets a server span (its parent the caller's context, if any), and
//!   each gateway request made for it a client span, whose context the request carries. Spans
//!   go to the SDK's batch processor: a bounded queue drained by a thread of its own, so a slow
//!   or down collector drops spans, never slows a call.
//!
//! What reaches the gateway is rebuilt from what was read, never the caller's text: a
//! `traceparent` is read by the W3C rules (a version after `00` by the rules for versions the
//! reader does not know: its first 55 characters) and sent as version `00`; a `tracestate` is
//! checked against the W3C grammar and its bounds (32 list members, 512 characters) and sent
//! with its members rejoined. Anything that does not read is left out: the gateway request goes
//! without it. The OpenTelemetry propagator is not used to read them: it accepts short or signed
//! hex fields and passes later versions' tails and unchecked `tracestate` values on.
//!
//! Event polls carry no trace context: one poll loop serves every caller watching the agent.
//!
//! The call's trace travels with it in a task-local (`carry` moves it onto tasks spawned for
//! the call), so rooms that make gateway requests need not pass it along.
use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use futures_util::future::Either;
use hyper::{header::HeaderValue, http, HeaderMap};
use opentelemetry::{
    propagation::{Injector, TextMapPropagator},
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TracerProvider as _},
    Context as OtelContext,
};
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider, Resource};
use tokio::task::futures::TaskLocalFuture;
use tracing::{instrument::Instrumented, Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer as _;

use super::CallRecord;

/// The target of the spans made here: the only spans exported (the log filter leaves them
/// out unless RUST_LOG asks for them).
const TARGET: &str = "ccgw_trace";
const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";
/// `service.name` unless OTEL_SERVICE_NAME says otherwise.
const DEFAULT_SERVICE_NAME: &str = "ccgw-callcontrol";
/// The length of a version-00 `traceparent`, and of the part of a later version that is read.
const TRACEPARENT_LEN: usize = 55;
/// The longest `tracestate` passed on (W3C trace context: 512 characters).
const MAX_TRACESTATE_BYTES: usize = 512;
/// The most list members a `tracestate` may have (W3C trace context).
const MAX_TRACESTATE_MEMBERS: usize = 32;
/// gRPC services whose calls continue no trace.
const UNTRACED_PREFIXES: [&str; 2] = ["/grpc.health.", "/grpc.reflection."];
/// How long the exit waits for the last spans to be exported.
pub(crate) const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);
/// OpenTelemetry's semantic conventions: a gRPC server span's numeric code.
const GRPC_STATUS_CODE: &str = "rpc.grpc.status_code";
/// tracing-opentelemetry's field for the span status.
const OTEL_STATUS_CODE: &str = "otel.status_code";
/// A client span's HTTP status (semantic conventions).
const HTTP_STATUS_CODE: &str = "http.response.status_code";

/// Set once the exporter is installed; read per call.
static EXPORTING: AtomicBool = AtomicBool::new(false);

tokio::task_local! {
    static CALL_TRACE: CallTrace;
}

/// The trace a call's gateway requests continue, and the ids its log lines carry.
#[derive(Debug, Clone)]
pub struct CallTrace {
    trace: Trace,
    ids: TraceIds,
}

/// The `trace_id` and `span_id` of a call's log lines: its server span's when exporting, else
/// the caller's span (the parent of the call's gateway requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceIds {
    pub trace_id: TraceId,
    pub span_id: SpanId,
}

impl CallTrace {
    pub fn ids(&self) -> TraceIds {
        self.ids
    }

    /// Records the call's gRPC code on its server span: `rpc.grpc.status_code`, and an error
    /// status unless it is OK. Nothing when not exporting.
    pub(crate) fn ended(&self, code: tonic::Code) {
        if let Trace::Span(span) = &self.trace {
            span.record(GRPC_STATUS_CODE, code as i64);
            if code != tonic::Code::Ok {
                span.record(OTEL_STATUS_CODE, "ERROR");
            }
        }
    }
}

/// The ids of the call the current task works for, if it has a trace.
pub fn current_ids() -> Option<TraceIds> {
    CALL_TRACE.try_with(CallTrace::ids).ok()
}

#[derive(Debug, Clone)]
enum Trace {
    /// No exporter: the caller's context, rebuilt from what was read.
    Caller(TraceHeaders),
    /// Exporting: the call's server span.
    Span(Span),
}

/// The OTLP exporter, while it runs; dropping it exports what is queued (bounded in time)
/// and stops it.
#[derive(Debug)]
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Drop for Exporter {
    fn drop(&mut self) {
        if let Err(error) = self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            eprintln!("ccgw-callcontrol: exporting the last spans failed: {error}");
        }
    }
}

/// The exporting layer and its exporter, when the environment asks for one
/// (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, and not
/// `OTEL_SDK_DISABLED=true`). Errors are returned as text for the caller to log once logging
/// runs; the service then runs without exporting.
pub fn exporter_from_env<S>(
) -> Result<Option<(impl tracing_subscriber::Layer<S> + 'static, Exporter)>, String>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    let set = |name| std::env::var(name).is_ok_and(|value| !value.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    if disabled
        || !(set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
    {
        return Ok(None);
    }
    // The blocking HTTP client of the exporter uses rustls with the process's provider.
    crate::install_crypto_provider();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| format!("OTLP span exporter: {e}"))?;
    let service_name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|name| !name.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned());
    let provider = SdkTracerProvider::builder()
        // The batch processor's queue (OTEL_BSP_MAX_QUEUE_SIZE, 2048 by default) is bounded:
        // when the collector is slow or down, spans are dropped.
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service_name).build())
        .build();
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("ccgw-callcontrol"))
        .with_filter(
            tracing_subscriber::filter::Targets::new().with_target(TARGET, tracing::Level::TRACE),
        );
    EXPORTING.store(true, Ordering::Relaxed);
    Ok(Some((layer, Exporter { provider })))
}

/// The layer to put around the gRPC services: makes the caller's trace the call's.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContextLayer;

impl<S> tower::Layer<S> for TraceContextLayer {
    type Service = TraceContext<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceContext { inner }
    }
}

#[derive(Debug, Clone)]
pub struct TraceContext<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for TraceContext<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, TaskLocalFuture<CallTrace, Instrumented<S::Future>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Some(trace) = call_trace(&request) else {
            return Either::Left(self.inner.call(request));
        };
        // The call's log line and its end (the span's status) are written by the telemetry
        // layer outside this one, once the answer's last frame has gone.
        CallRecord::update_in(request.extensions(), |facts| {
            facts.trace = Some(trace.clone())
        });
        let span = match &trace.trace {
            Trace::Span(span) => span.clone(),
            Trace::Caller { .. } => Span::none(),
        };
        Either::Right(CALL_TRACE.scope(trace, self.inner.call(request).instrument(span)))
    }
}

/// The trace of a call, if it has one to pass on. Health checks (a probe every few seconds)
/// and reflection make no gateway request and get no span.
fn call_trace<B>(request: &http::Request<B>) -> Option<CallTrace> {
    let headers = request.headers();
    let path = request.uri().path();
    if UNTRACED_PREFIXES
        .iter()
        .any(|prefix| path.starts_with(prefix))
    {
        return None;
    }
    if !EXPORTING.load(Ordering::Relaxed) {
        return caller_context(headers).map(|caller| CallTrace {
            trace: Trace::Caller(caller.headers()),
            ids: TraceIds {
                trace_id: TraceId::from(caller.parent.trace_id),
                span_id: SpanId::from(caller.parent.parent_id),
            },
        });
    }
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or(("", path));
    let span = tracing::trace_span!(
        target: TARGET,
        "grpc server call",
        otel.name = path.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    if let Some(caller) = caller_context(headers) {
        // Fails only when the span is not exported, which the flag rules out.
        let _ = span.set_parent(OtelContext::new().with_remote_span_context(caller.span_context()));
    }
    // Starts the span (its parent is set for good): from here on its ids are known.
    let context = span.context();
    let started = context.span();
    let ids = TraceIds {
        trace_id: started.span_context().trace_id(),
        span_id: started.span_context().span_id(),
    };
    Some(CallTrace {
        trace: Trace::Span(span),
        ids,
    })
}

/// Runs `write` as part of the call of `trace` (its log lines carry the call's ids).
pub(crate) fn in_call<T>(trace: &CallTrace, write: impl FnOnce() -> T) -> T {
    CALL_TRACE.sync_scope(trace.clone(), write)
}

/// `future` with the current call's trace, for a task spawned for that call.
pub(crate) fn carry<F: Future>(future: F) -> Either<F, TaskLocalFuture<CallTrace, F>> {
    match CALL_TRACE.try_with(CallTrace::clone) {
        Ok(trace) => Either::Right(CALL_TRACE.scope(trace, future)),
        Err(_) => Either::Left(future),
    }
}

/// The trace headers of a gateway request: `traceparent` and, when there is one,
/// `tracestate`, each built here (never a caller's text).
#[derive(Debug, Clone)]
pub(crate) struct TraceHeaders {
    traceparent: HeaderValue,
    tracestate: Option<HeaderValue>,
}

impl TraceHeaders {
    /// `request` with these headers.
    pub(crate) fn set_on(&self, request: http::request::Builder) -> http::request::Builder {
        let request = request.header(TRACEPARENT, self.traceparent.clone());
        match &self.tracestate {
            Some(tracestate) => request.header(TRACESTATE, tracestate.clone()),
            None => request,
        }
    }
}

/// What a gateway request made for the current call carries: trace headers, and the span that
/// times it (disabled when not exporting). The default: none.
pub(crate) struct GatewayTrace {
    pub(crate) headers: Option<TraceHeaders>,
    pub(crate) span: Span,
}

impl Default for GatewayTrace {
    fn default() -> Self {
        Self {
            headers: None,
            span: Span::none(),
        }
    }
}

/// Where gateway requests go: the `server.address` and `server.port` of their spans.
#[derive(Debug, Clone)]
pub(crate) struct GatewayServer {
    address: Arc<str>,
    port: u16,
}

impl GatewayServer {
    /// The host (an IPv6 address without its brackets) and port of `uri`, the scheme's default
    /// port when it names none.
    pub(crate) fn of(uri: &http::Uri) -> Self {
        let host = uri.host().unwrap_or_default();
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        Self {
            address: host.trim_start_matches('[').trim_end_matches(']').into(),
            port: uri.port_u16().unwrap_or(if https { 443 } else { 80 }),
        }
    }
}

/// The trace context of a gateway request `method path` to `server` made for the current
/// call; nothing outside a call. The path names agents and calls, never a Guid or cookie.
pub(crate) fn gateway_request(
    method: &http::Method,
    path: &str,
    server: &GatewayServer,
) -> GatewayTrace {
    CALL_TRACE
        .try_with(|trace| match &trace.trace {
            Trace::Caller(headers) => GatewayTrace {
                headers: Some(headers.clone()),
                span: Span::none(),
            },
            Trace::Span(call) => {
                let span = tracing::trace_span!(
                    target: TARGET,
                    parent: call,
                    "gateway request",
                    otel.name = %method,
                    otel.kind = "client",
                    http.request.method = %method,
                    url.path = path,
                    server.address = &*server.address,
                    // OTLP has signed integers: an unsigned value would be exported as text.
                    server.port = i64::from(server.port),
                    http.response.status_code = tracing::field::Empty,
                    otel.status_code = tracing::field::Empty,
                );
                let mut headers = HeaderMap::new();
                TraceContextPropagator::new()
                    .inject_context(&span.context(), &mut HeaderInjector(&mut headers));
                // The propagator writes the span's own context: version 00, and the tracestate
                // the span inherited from the caller's, which was checked when it was read.
                let tracestate = headers.remove(TRACESTATE).filter(|state| !state.is_empty());
                GatewayTrace {
                    headers: headers.remove(TRACEPARENT).map(|traceparent| TraceHeaders {
                        traceparent,
                        tracestate,
                    }),
                    span,
                }
            }
        })
        .unwrap_or_default()
}

/// Records a gateway request's answer on its span: the HTTP status, and an error status when
/// there was none (no answer in time, a transport failure) or it was 4xx or 5xx.
pub(crate) fn gateway_answered(span: &Span, status: Option<http::StatusCode>) {
    if span.is_none() {
        return;
    }
    if let Some(status) = status {
        span.record(HTTP_STATUS_CODE, i64::from(status.as_u16()));
    }
    if status.is_none_or(|status| status.is_client_error() || status.is_server_error()) {
        span.record(OTEL_STATUS_CODE, "ERROR");
    }
}

/// A caller's trace context, read from its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CallerContext {
    parent: TraceParent,
    tracestate: Option<HeaderValue>,
}

/// The caller's context, when its `traceparent` reads; a `tracestate` that does not is left out.
fn caller_context(headers: &HeaderMap) -> Option<CallerContext> {
    let parent = TraceParent::parse(headers.get(TRACEPARENT)?.as_bytes())?;
    Some(CallerContext {
        parent,
        tracestate: headers
            .get(TRACESTATE)
            .and_then(|state| tracestate(state.as_bytes())),
    })
}

impl CallerContext {
    fn headers(&self) -> TraceHeaders {
        TraceHeaders {
            traceparent: self.parent.header(),
            tracestate: self.tracestate.clone(),
        }
    }

    /// The remote parent of the call's server span.
    fn span_context(&self) -> SpanContext {
        let state = self
            .tracestate
            .as_ref()
            .and_then(|state| state.to_str().ok()?.parse().ok())
            .unwrap_or_default();
        let flags = if self.parent.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanContext::new(
            TraceId::from(self.parent.trace_id),
            SpanId::from(self.parent.parent_id),
            flags,
            true,
            state,
        )
    }
}

/// A W3C `traceparent`: what of it is passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TraceParent {
    trace_id: u128,
    parent_id: u64,
    sampled: bool,
}

impl TraceParent {
    /// Reads a `traceparent` value: `version-traceid-parentid-flags`, lower-case hex, neither
    /// id all zeros. Version `00` is exactly 55 characters. A later version (`01` to `fe`) is
    /// read as W3C asks of versions the reader does not know: the first 55 characters in the
    /// version-00 layout, then the end or a dash; the rest is ignored. `ff` is invalid. Reads
    /// at most 56 bytes whatever the value's length, and allocates nothing.
    pub(crate) fn parse(value: &[u8]) -> Option<Self> {
        let head = value.get(..TRACEPARENT_LEN)?;
        let version = lower_hex(&head[..2])?;
        let rest_ok = match version {
            0 => value.len() == TRACEPARENT_LEN,
            0xff => false,
            _ => value.get(TRACEPARENT_LEN).is_none_or(|&b| b == b'-'),
        };
        if !rest_ok || [head[2], head[35], head[52]] != [b'-'; 3] {
            return None;
        }
        let trace_id = lower_hex(&head[3..35])?;
        let parent_id = u64::try_from(lower_hex(&head[36..52])?).ok()?;
        let flags = lower_hex(&head[53..55])?;
        (trace_id != 0 && parent_id != 0).then_some(Self {
            trace_id,
            parent_id,
            // The only flag version 00 defines; others are not passed on.
            sampled: flags & 1 == 1,
        })
    }

    /// The version-00 header of this context.
    pub(crate) fn header(&self) -> HeaderValue {
        let text = format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.parent_id,
            u8::from(self.sampled)
        );
        HeaderValue::from_str(&text).expect("hex digits and dashes make a header value")
    }
}

/// The value of `digits` (at most 32), when they are all lower-case hex digits (W3C's HEXDIGLC:
/// `u128::from_str_radix` alone would take upper case and a sign).
fn lower_hex(digits: &[u8]) -> Option<u128> {
    if digits.is_empty()
        || !digits
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    u128::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

/// A `tracestate` value checked against the W3C grammar, rebuilt: its list members without the
/// whitespace around them, joined by `,`; empty members left out. None (the whole header is
/// left out, as W3C allows) when it is longer than 512 characters, has more than 32 members,
/// a member that is not `key=value` by the grammar, a key twice, or no member at all. Looks at
/// nothing past the 512th byte; allocates at most 512 bytes and 32 keys.
pub(crate) fn tracestate(value: &[u8]) -> Option<HeaderValue> {
    if value.len() > MAX_TRACESTATE_BYTES {
        return None;
    }
    let mut keys: Vec<&[u8]> = Vec::new();
    let mut rebuilt = Vec::with_capacity(value.len());
    for member in value.split(|&b| b == b',') {
        let member = trim_ows(member);
        if member.is_empty() {
            continue;
        }
        let split = member.iter().position(|&b| b == b'=')?;
        let (key, value) = (&member[..split], &member[split + 1..]);
        if keys.len() == MAX_TRACESTATE_MEMBERS
            || !tracestate_key(key)
            || !tracestate_value(value)
            || keys.contains(&key)
        {
            return None;
        }
        keys.push(key);
        if !rebuilt.is_empty() {
            rebuilt.push(b',');
        }
        rebuilt.extend_from_slice(member);
    }
    if rebuilt.is_empty() {
        return None;
    }
    HeaderValue::from_bytes(&rebuilt).ok()
}

/// `bytes` without the spaces and tabs (W3C's OWS) around it.
fn trim_ows(bytes: &[u8]) -> &[u8] {
    let text = |b: &u8| !matches!(b, b' ' | b'\t');
    match bytes.iter().position(text) {
        Some(first) => &bytes[first..=bytes.iter().rposition(text).unwrap_or(first)],
        None => &[],
    }
}

/// A `simple-key` (`lcalpha 0*255(lcalpha / DIGIT / "_" / "-" / "*" / "/")`) or a
/// `multi-tenant-key` (`tenant-id "@" system-id`, a tenant of 1 to 241 and a system of 1 to 14
/// such characters, the tenant starting with a letter or digit, the system with a letter).
fn tracestate_key(key: &[u8]) -> bool {
    let rest = |part: &[u8]| {
        part.iter()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'*' | b'/'))
    };
    let starts = |part: &[u8], digit_too: bool| match part.first() {
        Some(b'a'..=b'z') => true,
        Some(b'0'..=b'9') => digit_too,
        _ => false,
    };
    match key.iter().position(|&b| b == b'@') {
        None => key.len() <= 256 && starts(key, false) && rest(key),
        Some(at) => {
            let (tenant, system) = (&key[..at], &key[at + 1..]);
            tenant.len() <= 241
                && system.len() <= 14
                && starts(tenant, true)
                && starts(system, false)
                && rest(tenant)
                && rest(system)
        }
    }
}

/// `0*255(chr) nblk-chr`: 1 to 256 printable ASCII characters but `,` and `=`, not ending in a
/// space (leading and inner spaces are allowed).
fn tracestate_value(value: &[u8]) -> bool {
    let nblk = |b: &u8| matches!(b, 0x21..=0x7e) && !matches!(b, b',' | b'=');
    value.len() <= 256
        && value.last().is_some_and(nblk)
        && value.iter().all(|b| *b == b' ' || nblk(b))
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::{collection::vec, prelude::*};

    use super::*;

    const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT_ID: &str = "00f067aa0ba902b7";

    fn rebuilt(value: &str) -> Option<String> {
        TraceParent::parse(value.as_bytes()).map(|parent| parent.header().to_str().unwrap().into())
    }

    fn state(value: &str) -> Option<String> {
        tracestate(value.as_bytes()).map(|state| state.to_str().unwrap().into())
    }

    #[test]
    fn a_version_00_traceparent_is_rebuilt_as_it_came() {
        for flags in ["00", "01"] {
            let value = format!("00-{TRACE_ID}-{PARENT_ID}-{flags}");
            assert_eq!(rebuilt(&value), Some(value));
        }
        // Flags version 00 does not define are not passed on.
        assert_eq!(
            rebuilt(&format!("00-{TRACE_ID}-{PARENT_ID}-ff")),
            Some(format!("00-{TRACE_ID}-{PARENT_ID}-01"))
        );
    }

    /// A later version is read by its first 55 characters and passed on as version 00: a
    /// 16 KiB tail stays with the caller.
    #[test]
    fn a_later_version_is_passed_on_as_version_00_without_its_tail() {
        let expected = Some(format!("00-{TRACE_ID}-{PARENT_ID}-01"));
        let head = format!("cc-{TRACE_ID}-{PARENT_ID}-01");
        assert_eq!(rebuilt(&head), expected);
        let tail = format!("{head}-{}", "x".repeat(16 * 1024));
        assert_eq!(rebuilt(&tail), expected);
        // The tail must be set off by a dash.
        assert_eq!(rebuilt(&format!("{head}x")), None);
    }

    #[test]
    fn what_the_w3c_rules_refuse_is_not_read() {
        let zeros32 = "0".repeat(32);
        for value in [
            String::new(),
            "00-not-a-trace-01".into(),
            // A version-00 header is exactly 55 characters.
            format!("00-{TRACE_ID}-{PARENT_ID}-01-"),
            format!("00-{TRACE_ID}-{PARENT_ID}-1"),
            format!("ff-{TRACE_ID}-{PARENT_ID}-01"),
            format!("0A-{TRACE_ID}-{PARENT_ID}-01"),
            format!("00-{}-{PARENT_ID}-01", TRACE_ID.to_uppercase()),
            format!("00-{zeros32}-{PARENT_ID}-01"),
            format!("00-{TRACE_ID}-0000000000000000-01"),
            // What u128::from_str_radix would take.
            format!("00-+{}-{PARENT_ID}-01", &TRACE_ID[1..]),
            format!("00-{TRACE_ID}-{PARENT_ID}-+1"),
            format!("00_{TRACE_ID}-{PARENT_ID}-01"),
            format!("00-{TRACE_ID}-{PARENT_ID}x01"),
        ] {
            assert_eq!(rebuilt(&value), None, "{value:?}");
        }
    }

    #[test]
    fn a_tracestate_is_checked_and_rebuilt() {
        assert_eq!(
            state("vendor=opaque-value"),
            Some("vendor=opaque-value".into())
        );
        assert_eq!(
            state(" a=1 ,\t, b@c=x y ,tenant-1@sys*/_-=v "),
            Some("a=1,b@c=x y,tenant-1@sys*/_-=v".into())
        );
        let members = |n: usize| {
            (0..n)
                .map(|i| format!("k{i}=v"))
                .collect::<Vec<_>>()
                .join(",")
        };
        assert_eq!(state(&members(32)), Some(members(32)));
        for value in [
            String::new(),
            " , ".into(),
            members(33),
            format!("k={}", "v".repeat(MAX_TRACESTATE_BYTES)),
            "a=1,a=2".into(),
            "A=1".into(),
            "1a=1".into(),
            "a".into(),
            "a=".into(),
            "a= ".into(),
            "a=x=y".into(),
            "a=\u{7f}".into(),
            "a=é".into(),
            "a@=1".into(),
            "@b=1".into(),
            "a@1b=1".into(),
            format!("a@{}=1", "b".repeat(15)),
            format!("{}=1", "k".repeat(257)),
        ] {
            assert_eq!(state(&value), None, "{value:?}");
        }
    }

    /// Lower-case hex of `digits` digits whose value is not zero.
    fn nonzero_hex(digits: usize) -> impl Strategy<Value = String> {
        vec(prop::sample::select(b"0123456789abcdef".to_vec()), digits)
            .prop_filter("not all zeros", |d| d.iter().any(|&b| b != b'0'))
            .prop_map(|d| String::from_utf8(d).unwrap())
    }

    /// A character of a tracestate value other than a space.
    fn value_char() -> impl Strategy<Value = char> {
        prop::char::range('!', '~').prop_filter("not , or =", |c| !matches!(c, ',' | '='))
    }

    fn tracestate_member() -> impl Strategy<Value = (String, String)> {
        let key = prop_oneof![
            "[a-z][a-z0-9_*/-]{0,12}",
            "[a-z0-9][a-z0-9_*/-]{0,8}@[a-z][a-z0-9_*/-]{0,13}",
        ];
        let value = (
            vec(prop_oneof![Just(' '), value_char()], 0..12),
            value_char(),
        )
            .prop_map(|(body, last)| body.into_iter().chain([last]).collect());
        (key, value)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(TRACE_CASES))]

        /// Any bytes: either nothing, or a context whose version-00 header reads back the same.
        #[test]
        fn a_traceparent_reads_or_is_dropped(value in vec(any::<u8>(), 0..80)) {
            if let Some(parent) = TraceParent::parse(&value) {
                let header = parent.header();
                prop_assert_eq!(header.len(), TRACEPARENT_LEN);
                prop_assert_eq!(TraceParent::parse(header.as_bytes()), Some(parent));
            }
        }

        /// Near misses (the right alphabet and about the right length): what reads is exactly
        /// the ids of the input's first 55 characters.
        #[test]
        fn a_near_miss_reads_only_its_own_ids(value in "[0-9a-fA-F+x-]{50,60}") {
            if let Some(parent) = TraceParent::parse(value.as_bytes()) {
                let header = parent.header();
                let header = header.to_str().unwrap();
                prop_assert_eq!(&header[2..52], &value[2..52]);
                prop_assert_eq!(&header[..2], "00");
            }
        }

        /// Every valid context round-trips, whatever its flags.
        #[test]
        fn a_valid_traceparent_round_trips(trace in nonzero_hex(32), parent in nonzero_hex(16), flags: u8) {
            let value = format!("00-{trace}-{parent}-{flags:02x}");
            let read = TraceParent::parse(value.as_bytes()).expect("a valid traceparent");
            prop_assert_eq!(read.sampled, flags & 1 == 1);
            prop_assert_eq!(
                rebuilt(&value),
                Some(format!("00-{trace}-{parent}-{:02x}", flags & 1))
            );
        }

        /// A later version, with or without a tail of up to 16 KiB, is read by its head and
        /// passed on as version 00; a tail not set off by a dash drops it.
        #[test]
        fn a_later_version_is_read_by_its_head(
            version in 1u8..0xff,
            trace in nonzero_hex(32),
            parent in nonzero_hex(16),
            tail_len in 0usize..16 * 1024,
            tail_byte in any::<u8>(),
        ) {
            let head = format!("{version:02x}-{trace}-{parent}-01");
            let expected = format!("00-{trace}-{parent}-01");
            let mut with_tail = head.clone().into_bytes();
            with_tail.push(b'-');
            with_tail.resize(TRACEPARENT_LEN + 1 + tail_len, tail_byte);
            prop_assert_eq!(rebuilt(&head), Some(expected.clone()));
            prop_assert_eq!(
                TraceParent::parse(&with_tail).map(|p| p.header()),
                Some(HeaderValue::from_str(&expected).unwrap())
            );
            let mut undelimited = head.into_bytes();
            undelimited.push(if tail_byte == b'-' { b'x' } else { tail_byte });
            prop_assert_eq!(TraceParent::parse(&undelimited), None);
        }

        /// Any bytes: either nothing, or a tracestate within the W3C bounds that reads back
        /// the same.
        #[test]
        fn a_tracestate_reads_or_is_dropped(value in prop_oneof![
            vec(any::<u8>(), 0..600),
            "[a-z0-9@=, \t_*/A-]{0,600}".prop_map(String::into_bytes),
        ]) {
            if let Some(state) = tracestate(&value) {
                prop_assert!(state.len() <= MAX_TRACESTATE_BYTES);
                prop_assert!(state.as_bytes().split(|&b| b == b',').count() <= MAX_TRACESTATE_MEMBERS);
                prop_assert_eq!(tracestate(state.as_bytes()), Some(state));
            }
        }

    }

    proptest! {
        // Lists of up to 40 generated members: slower to make, so fewer cases.
        #![proptest_config(ProptestConfig::with_cases(TRACESTATE_LIST_CASES))]

        /// A list of valid members with distinct keys is kept, whitespace around members
        /// removed, up to 32 members and 512 characters; beyond either it is dropped.
        #[test]
        fn valid_tracestate_members_are_kept_within_the_bounds(
            members in vec(tracestate_member(), 1..40),
            spaced in any::<bool>(),
        ) {
            let mut seen = std::collections::HashSet::new();
            let members: Vec<String> = members
                .into_iter()
                .filter(|(key, _)| seen.insert(key.clone()))
                .map(|(key, value)| format!("{key}={value}"))
                .collect();
            let compact = members.join(",");
            let sent = if spaced { members.join(" ,\t") } else { compact.clone() };
            let fits = members.len() <= MAX_TRACESTATE_MEMBERS && sent.len() <= MAX_TRACESTATE_BYTES;
            prop_assert_eq!(state(&sent), fits.then_some(compact));
        }
    }

    /// Cases each property above runs (docs/layout.md's reliability section counts them).
    const TRACE_CASES: u32 = 256;
    const TRACESTATE_LIST_CASES: u32 = 64;
}
