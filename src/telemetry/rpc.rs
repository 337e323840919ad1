//! The one tower layer every call goes through first: counts it (`grpc_server_*`) and writes its
//! one log line when it ends. A call ends with its gRPC status: in the trailers, or in the
//! headers of a trailers-only answer (every refusal); a stream therefore ends when its body
//! does. An answer whose body is dropped before its status went out (the client cancelled or
//! went away) ended CANCELLED.
use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tonic::{codegen::http, Code};
use tonic_types::StatusExt;

use super::{
    metrics::{go_code_name, MethodMetrics, Metrics},
    CallFacts, CallRecord,
};

/// Wraps a service in [`RpcTelemetry`]. Must be the outermost layer, so that answers given by
/// the layers inside it (authentication refusals, the hard stop) are counted and logged too.
#[derive(Debug, Clone)]
pub struct RpcTelemetryLayer {
    metrics: Metrics,
}

impl RpcTelemetryLayer {
    pub fn new(metrics: Metrics) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for RpcTelemetryLayer {
    type Service = RpcTelemetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcTelemetry {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RpcTelemetry<S> {
    inner: S,
    metrics: Metrics,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RpcTelemetry<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<ObservedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let method = self.metrics.method(request.uri().path()).clone();
        method.started.inc();
        let record = CallRecord::default();
        request.extensions_mut().insert(record.clone());
        let mut end = CallEnd {
            method,
            started: Instant::now(),
            record,
            code: None,
        };
        let call = self.inner.call(request);
        Box::pin(async move {
            // Dropped here (the client went before the answer), `end` counts CANCELLED.
            let response = call.await?;
            end.code = grpc_status(response.headers());
            if end.code.is_some() {
                end.record_failure(response.headers());
            }
            Ok(response.map(|body| ObservedBody {
                inner: body,
                end: Some(end),
            }))
        })
    }
}

/// The answer's body, which ends the call when its trailers pass (or when it is dropped).
#[derive(Debug)]
pub struct ObservedBody<B> {
    inner: B,
    end: Option<CallEnd>,
}

impl<B> ObservedBody<B> {
    /// Ends the call with `code` (or the code its headers carried, or Unknown).
    fn end_with(&mut self, code: Option<Code>, trailers: Option<&http::HeaderMap>) {
        if let Some(mut end) = self.end.take() {
            end.code = code.or(end.code).or(Some(Code::Unknown));
            if let Some(trailers) = trailers {
                end.record_failure(trailers);
            }
        }
    }
}

impl<B> Body for ObservedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.end_with(grpc_status(trailers), Some(trailers));
                }
            }
            // The end of a trailers-only answer (its code came with the headers), or of one
            // without any status.
            None => this.end_with(None, None),
            Some(Err(_)) => this.end_with(Some(Code::Unknown), None),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A call on its way: ends (counted and logged) when dropped, with its code, or CANCELLED when
/// none was seen.
#[derive(Debug)]
struct CallEnd {
    method: Arc<MethodMetrics>,
    started: Instant,
    record: CallRecord,
    code: Option<Code>,
}

impl CallEnd {
    /// A failure's ErrorInfo reason and retcode, unless the handler said more.
    fn record_failure(&self, headers: &http::HeaderMap) {
        if self.code == Some(Code::Ok) {
            return;
        }
        let Some(status) = tonic::Status::from_header_map(headers) else {
            return;
        };
        let details = status.get_error_details();
        let Some(info) = details.error_info() else {
            return;
        };
        self.record.update(|facts| {
            facts.reason.get_or_insert_with(|| info.reason.clone());
            if let Some(retcode) = info.metadata.get(crate::api::status::metadata_key::RETCODE) {
                facts.retcode.get_or_insert_with(|| retcode.clone());
            }
        });
    }
}

impl Drop for CallEnd {
    fn drop(&mut self) {
        let code = self.code.unwrap_or(Code::Cancelled);
        let elapsed = self.started.elapsed().as_secs_f64();
        self.method.handled(code).inc();
        self.method.seconds.observe(elapsed);
        log_line(&self.method, code, elapsed, &self.record.facts());
    }
}

/// The call's one log line; health checks and reflection at debug level.
fn log_line(method: &MethodMetrics, code: Code, seconds: f64, facts: &CallFacts) {
    macro_rules! line {
        ($level:expr) => {
            tracing::event!(
                $level,
                rpc = method.name,
                code = go_code_name(code),
                caller = facts.caller.as_deref(),
                agents = facts.agents.as_deref(),
                request_id = facts.request_id.as_deref(),
                retcode = facts.retcode.as_deref(),
                reason = facts.reason.as_deref(),
                latency_ms = seconds * 1000.0,
                "rpc"
            )
        };
    }
    if method.quiet {
        line!(tracing::Level::DEBUG);
    } else {
        line!(tracing::Level::INFO);
    }
}

/// The `grpc-status` of a header map (trailers, or a trailers-only answer's headers).
fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?;
    let code: i32 = value.to_str().ok()?.parse().ok()?;
    Some(Code::from(code))
}
