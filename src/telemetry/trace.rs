//! Traces: a caller's W3C trace context (`traceparent`, `tracestate`) continues on the gateway
//! requests made for its call, and spans are exported over OTLP (HTTP/protobuf) when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! Two modes, chosen once at startup:
//! - **No exporter** (the default): no span is made. A call whose metadata carries a valid
//!   `traceparent` has it (and its `tracestate`) passed on, as received, to its gateway
//!   requests: the caller's span is their parent. A call without one costs a header lookup.
//! - **Exporting**: each call gets a server span (its parent the caller's context, if any), and
//!   each gateway request made for it a client span, whose context the request carries. Spans
//!   go to the SDK's batch processor: a bounded queue drained by a thread of its own, so a slow
//!   or down collector drops spans, never slows a call.
//!
//! Event polls carry no trace context: one poll loop serves every caller watching the agent.
//!
//! The call's trace travels with it in a task-local (`carry` moves it onto tasks spawned for
//! the call), so rooms that make gateway requests need not pass it along.
use std::{
    future::Future,
    sync::atomic::{AtomicBool, Ordering},
    task::{Context, Poll},
    time::Duration,
};

use futures_util::future::Either;
use hyper::{header::HeaderValue, http, HeaderMap};
use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider, Resource};
use tokio::task::futures::TaskLocalFuture;
use tracing::{instrument::Instrumented, Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer as _;

/// The target of the spans made here: the only spans exported (the log filter leaves them
/// out unless RUST_LOG asks for them).
const TARGET: &str = "ccgw_trace";
const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";
/// `service.name` unless OTEL_SERVICE_NAME says otherwise.
const DEFAULT_SERVICE_NAME: &str = "ccgw-callcontrol";
/// The longest `tracestate` passed on (W3C trace context: 512 characters).
const MAX_TRACESTATE_BYTES: usize = 512;
/// gRPC services whose calls continue no trace.
const UNTRACED_PREFIXES: [&str; 2] = ["/grpc.health.", "/grpc.reflection."];
/// How long the exit waits for the last spans to be exported.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

/// Set once the exporter is installed; read per call.
static EXPORTING: AtomicBool = AtomicBool::new(false);

tokio::task_local! {
    static CALL_TRACE: CallTrace;
}

/// The trace a call's gateway requests continue.
#[derive(Debug, Clone)]
pub struct CallTrace(Trace);

#[derive(Debug, Clone)]
enum Trace {
    /// No exporter: the caller's headers, checked, passed on as they came.
    Caller {
        traceparent: HeaderValue,
        tracestate: Option<HeaderValue>,
    },
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
        let span = match &trace.0 {
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
        let traceparent = headers.get(TRACEPARENT)?;
        // Only a well-formed context is passed on; what else the caller sent stays here.
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        if !parent.span().span_context().is_valid() {
            return None;
        }
        return Some(CallTrace(Trace::Caller {
            traceparent: traceparent.clone(),
            // W3C lets a vendor drop a tracestate longer than 512 characters: the gateway need
            // not carry whatever size a caller sends.
            tracestate: headers
                .get(TRACESTATE)
                .filter(|state| state.len() <= MAX_TRACESTATE_BYTES)
                .cloned(),
        }));
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
    );
    if headers.contains_key(TRACEPARENT) {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        // Fails only when the span is not exported, which the flag rules out.
        let _ = span.set_parent(parent);
    }
    Some(CallTrace(Trace::Span(span)))
}

/// `future` with the current call's trace, for a task spawned for that call.
pub(crate) fn carry<F: Future>(future: F) -> Either<F, TaskLocalFuture<CallTrace, F>> {
    match CALL_TRACE.try_with(CallTrace::clone) {
        Ok(trace) => Either::Right(CALL_TRACE.scope(trace, future)),
        Err(_) => Either::Left(future),
    }
}

/// `traceparent` and, when there is one, `tracestate`.
pub(crate) type TraceHeaders = (HeaderValue, Option<HeaderValue>);

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

/// The trace context of a gateway request `method path` made for the current call; nothing
/// outside a call.
pub(crate) fn gateway_request(method: &http::Method, path: &str) -> GatewayTrace {
    CALL_TRACE
        .try_with(|trace| match &trace.0 {
            Trace::Caller {
                traceparent,
                tracestate,
            } => GatewayTrace {
                headers: Some((traceparent.clone(), tracestate.clone())),
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
                );
                let mut headers = HeaderMap::new();
                TraceContextPropagator::new()
                    .inject_context(&span.context(), &mut HeaderInjector(&mut headers));
                let traceparent = headers.remove(TRACEPARENT);
                GatewayTrace {
                    headers: traceparent.map(|tp| (tp, headers.remove(TRACESTATE))),
                    span,
                }
            }
        })
        .unwrap_or_default()
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|name| name.as_str()).collect()
    }
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
