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
use prometheus_client::metrics::counter::Counter;
use tonic::{codegen::http, Code};
use tonic_types::StatusExt;

use super::{
    metrics::{go_code_name, MethodMetrics, Metrics},
    trace, CallFacts, CallRecord,
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

impl<S, ResBody> tower::Service<http::Request<tonic::body::Body>> for RpcTelemetry<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<ObservedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let method = self.metrics.method(request.uri().path()).clone();
        method.started.inc();
        let received = MessageCounter::new(method.msg_received.clone());
        let sent = MessageCounter::new(method.msg_sent.clone());
        let mut request = request.map(|body| {
            tonic::body::Body::new(ObservedBody {
                inner: body,
                observer: received,
            })
        });
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
                observer: AnswerObserver {
                    sent,
                    end: Some(end),
                },
            }))
        })
    }
}

/// A body passing through unchanged, each poll's outcome shown to `observer` on the way: the
/// answer's ends the call when its trailers pass (or when it is dropped), a request's counts
/// the messages it brings.
#[derive(Debug)]
pub struct ObservedBody<B, O = AnswerObserver> {
    inner: B,
    observer: O,
}

/// What an [`ObservedBody`] shows each poll's outcome to: a frame, an error, or the end
/// (`None`).
pub trait FrameObserver {
    fn observe<E>(&mut self, polled: Option<&Result<Frame<Bytes>, E>>);
}

impl<B, O> Body for ObservedBody<B, O>
where
    B: Body<Data = Bytes> + Unpin,
    O: FrameObserver + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        this.observer.observe(frame.as_ref());
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Watches the answer's body: counts the messages it sends, and ends the call with the status
/// of its trailers, or when it ends or fails without any.
#[derive(Debug)]
pub struct AnswerObserver {
    sent: MessageCounter,
    end: Option<CallEnd>,
}

impl AnswerObserver {
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

impl FrameObserver for AnswerObserver {
    fn observe<E>(&mut self, polled: Option<&Result<Frame<Bytes>, E>>) {
        match polled {
            Some(Ok(frame)) => {
                self.sent.observe_frame(frame);
                if let Some(trailers) = frame.trailers_ref() {
                    self.end_with(grpc_status(trailers), Some(trailers));
                }
            }
            // The end of a trailers-only answer (its code came with the headers), or of one
            // without any status.
            None => self.end_with(None, None),
            Some(Err(_)) => self.end_with(Some(Code::Unknown), None),
        }
    }
}

/// Counts the gRPC messages of a body as its data passes, in whatever pieces it comes: each
/// message is a 5-byte prefix (a compression flag and a big-endian 4-byte length) and that
/// many bytes. A message counts once its prefix has passed.
#[derive(Debug)]
struct MessageCounter {
    counter: Counter,
    framing: MessageFraming,
}

impl MessageCounter {
    fn new(counter: Counter) -> Self {
        Self {
            counter,
            framing: MessageFraming::default(),
        }
    }

    fn observe_frame(&mut self, frame: &Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            let messages = self.framing.messages_in(data);
            if messages > 0 {
                self.counter.inc_by(messages);
            }
        }
    }
}

impl FrameObserver for MessageCounter {
    fn observe<E>(&mut self, polled: Option<&Result<Frame<Bytes>, E>>) {
        if let Some(Ok(frame)) = polled {
            self.observe_frame(frame);
        }
    }
}

/// Where a body's data is in gRPC's message framing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct MessageFraming {
    /// Bytes of the current message still to come.
    remaining: u64,
    /// Bytes of the next prefix seen so far (0 to 4).
    prefix_seen: u8,
    /// The length bytes of the next prefix seen so far.
    length: u32,
}

const PREFIX_LEN: u8 = 5;

impl MessageFraming {
    /// The messages whose prefix ends in `data`, the next piece of the body.
    fn messages_in(&mut self, mut data: &[u8]) -> u64 {
        let mut messages = 0;
        while !data.is_empty() {
            if self.remaining > 0 {
                let skipped =
                    usize::try_from(self.remaining).map_or(data.len(), |r| r.min(data.len()));
                data = &data[skipped..];
                self.remaining -= skipped as u64;
                continue;
            }
            // The first prefix byte is the compression flag.
            if self.prefix_seen > 0 {
                self.length = self.length << 8 | u32::from(data[0]);
            }
            data = &data[1..];
            self.prefix_seen += 1;
            if self.prefix_seen == PREFIX_LEN {
                messages += 1;
                self.remaining = u64::from(self.length);
                self.prefix_seen = 0;
                self.length = 0;
            }
        }
        messages
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
            if let Some(retcode) = info.metadata.get(crate::proto::metadata_key::RETCODE) {
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
        self.record.read(|facts| {
            if let Some(reason) = &facts.reason {
                self.method.ended_with(reason);
            }
            match &facts.trace {
                Some(trace) => {
                    trace.ended(code);
                    trace::in_call(trace, || log_line(&self.method, code, elapsed, facts));
                }
                None => log_line(&self.method, code, elapsed, facts),
            }
        });
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
                peer = facts.peer.as_deref(),
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

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{BodyExt, StreamBody};
    use tower::{Layer, Service, ServiceExt};

    use super::*;

    const RELEASE: &str = "/ccgw.callcontrol.v1.CallControl/ReleaseCall";
    const WATCH: &str = "/ccgw.callcontrol.v1.CallControl/WatchReleaseEvents";

    type Frames = futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>;
    type TestBody = StreamBody<Frames>;

    fn body(frames: Vec<Frame<Bytes>>) -> TestBody {
        StreamBody::new(futures_util::stream::iter(
            frames.into_iter().map(Ok).collect::<Vec<_>>(),
        ))
    }

    fn status_map(code: Code) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        map.insert("grpc-status", (code as i32).into());
        map
    }

    /// The response the layer gives for `path` when the service inside answers `response`.
    async fn through_layer(
        metrics: &Metrics,
        path: &str,
        response: http::Response<TestBody>,
    ) -> http::Response<ObservedBody<TestBody>> {
        let response = std::sync::Mutex::new(Some(response));
        let inner = tower::service_fn(move |request: http::Request<tonic::body::Body>| {
            assert!(
                CallRecord::of(request.extensions()).is_some(),
                "a record goes in"
            );
            let response = response.lock().unwrap().take().expect("called once");
            async move { Ok::<_, Infallible>(response) }
        });
        let mut service = RpcTelemetryLayer::new(metrics.clone()).layer(inner);
        let request = http::Request::builder()
            .uri(path)
            .body(tonic::body::Body::empty())
            .unwrap();
        service.ready().await.unwrap().call(request).await.unwrap()
    }

    fn handled(metrics: &Metrics, path: &str, code: Code) -> u64 {
        metrics.method(path).handled(code).get()
    }

    fn handled_in_all(metrics: &Metrics, path: &str) -> u64 {
        (0..17)
            .map(|code| handled(metrics, path, Code::from(code)))
            .sum()
    }

    #[tokio::test]
    async fn a_trailers_only_answer_counts_the_code_of_its_headers() {
        let metrics = Metrics::default();
        let mut refusal = http::Response::new(body(vec![]));
        *refusal.headers_mut() = status_map(Code::InvalidArgument);
        let response = through_layer(&metrics, RELEASE, refusal).await;
        assert_eq!(metrics.method(RELEASE).started.get(), 1);
        // hyper drops an empty body without polling it.
        drop(response);
        assert_eq!(handled(&metrics, RELEASE, Code::InvalidArgument), 1);
        assert_eq!(handled_in_all(&metrics, RELEASE), 1, "counted once");
    }

    #[tokio::test]
    async fn a_stream_is_counted_when_its_trailers_pass_not_before() {
        let metrics = Metrics::default();
        let stream = http::Response::new(body(vec![
            Frame::data(Bytes::from_static(b"event")),
            Frame::trailers(status_map(Code::ResourceExhausted)),
        ]));
        let mut response = through_layer(&metrics, WATCH, stream).await.into_body();
        let first = response.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        assert_eq!(
            handled(&metrics, WATCH, Code::ResourceExhausted),
            0,
            "still open"
        );
        let last = response.frame().await.unwrap().unwrap();
        assert!(last.is_trailers());
        assert_eq!(handled(&metrics, WATCH, Code::ResourceExhausted), 1);
        assert!(response.frame().await.is_none());
        drop(response);
        assert_eq!(handled_in_all(&metrics, WATCH), 1, "counted once");
    }

    #[tokio::test]
    async fn a_unary_answer_counts_the_code_of_its_trailers() {
        let metrics = Metrics::default();
        let answer = http::Response::new(body(vec![
            Frame::data(Bytes::from_static(b"answer")),
            Frame::trailers(status_map(Code::Ok)),
        ]));
        let response = through_layer(&metrics, RELEASE, answer).await;
        response.into_body().collect().await.unwrap();
        assert_eq!(handled(&metrics, RELEASE, Code::Ok), 1);
    }

    #[tokio::test]
    async fn a_stream_the_client_cut_off_is_cancelled() {
        let metrics = Metrics::default();
        let stream = http::Response::new(body(vec![
            Frame::data(Bytes::from_static(b"event")),
            Frame::trailers(status_map(Code::Ok)),
        ]));
        let mut response = through_layer(&metrics, WATCH, stream).await.into_body();
        response.frame().await.unwrap().unwrap();
        // The client reset the stream: hyper drops the body before its trailers.
        drop(response);
        assert_eq!(handled(&metrics, WATCH, Code::Cancelled), 1);
        assert_eq!(handled(&metrics, WATCH, Code::Ok), 0);
    }

    #[tokio::test]
    async fn a_call_dropped_before_its_answer_is_cancelled() {
        let metrics = Metrics::default();
        let inner = tower::service_fn(|_: http::Request<tonic::body::Body>| {
            std::future::pending::<Result<http::Response<TestBody>, Infallible>>()
        });
        let mut service = RpcTelemetryLayer::new(metrics.clone()).layer(inner);
        let request = http::Request::builder()
            .uri(RELEASE)
            .body(tonic::body::Body::empty())
            .unwrap();
        let call = service.ready().await.unwrap().call(request);
        drop(call);
        assert_eq!(handled(&metrics, RELEASE, Code::Cancelled), 1);
    }

    #[tokio::test]
    async fn a_path_nobody_serves_counts_as_the_unknown_method() {
        let metrics = Metrics::default();
        let mut refusal = http::Response::new(body(vec![]));
        *refusal.headers_mut() = status_map(Code::Unimplemented);
        drop(through_layer(&metrics, "/evil.Service/Random123", refusal).await);
        assert_eq!(
            handled(&metrics, "/unknown/unknown", Code::Unimplemented),
            1
        );
        assert!(std::ptr::eq(
            metrics.method("/evil.Service/Random123").as_ref(),
            metrics.method("/other/path").as_ref()
        ));
    }

    /// An answer given outside the handler (an authentication layer, the hard stop) still has
    /// its ErrorInfo reason and retcode in the call's line; what the handler said wins.
    #[tokio::test]
    async fn a_failure_records_its_error_info_unless_the_handler_said_more() {
        let mut details = tonic_types::ErrorDetails::new();
        details.set_error_info(
            "SESSION_ENDED",
            "ccgw-callcontrol",
            std::collections::HashMap::from([("retcode".to_owned(), "100-006".to_owned())]),
        );
        let status = tonic::Status::with_error_details(Code::FailedPrecondition, "x", details);
        for handler_said in [None, Some("MORE_SPECIFIC")] {
            let record = Arc::new(std::sync::Mutex::new(None));
            let inner = tower::service_fn({
                let (record, status) = (record.clone(), status.clone());
                move |request: http::Request<tonic::body::Body>| {
                    let call = CallRecord::of(request.extensions()).unwrap();
                    call.update(|f| f.reason = handler_said.map(str::to_owned));
                    *record.lock().unwrap() = Some(call);
                    let headers = status.clone().into_http::<()>().into_parts().0.headers;
                    let mut response = http::Response::new(body(vec![]));
                    *response.headers_mut() = headers;
                    async move { Ok::<_, Infallible>(response) }
                }
            });
            let mut service = RpcTelemetryLayer::new(Metrics::default()).layer(inner);
            let request = http::Request::builder()
                .uri(RELEASE)
                .body(tonic::body::Body::empty())
                .unwrap();
            drop(service.ready().await.unwrap().call(request).await.unwrap());
            let facts = record.lock().unwrap().take().unwrap().facts();
            assert_eq!(
                facts.reason.as_deref(),
                Some(handler_said.unwrap_or("SESSION_ENDED"))
            );
            assert_eq!(facts.retcode.as_deref(), Some("100-006"));
        }
    }

    /// Every method of the service's proto is in the table, with its streaming type.
    #[test]
    fn every_served_method_is_resolved_with_its_type() {
        use prost::Message;
        let set =
            prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut seen = 0;
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                    let kind = match (method.client_streaming(), method.server_streaming()) {
                        (false, false) => crate::telemetry::metrics::RpcType::Unary,
                        (false, true) => crate::telemetry::metrics::RpcType::ServerStream,
                        _ => crate::telemetry::metrics::RpcType::BidiStream,
                    };
                    let served = crate::telemetry::metrics::SERVED_METHODS
                        .iter()
                        .find(|(p, _, _)| *p == path)
                        .unwrap_or_else(|| panic!("{path} is not in SERVED_METHODS"));
                    assert_eq!(served.1, kind, "{path}");
                    seen += 1;
                }
            }
        }
        assert_eq!(seen, 2);
    }

    /// gRPC's framing of `messages`: each a flag byte, a big-endian length, the message.
    fn framed(messages: &[Vec<u8>]) -> Vec<u8> {
        let mut data = Vec::new();
        for message in messages {
            data.push(0);
            data.extend_from_slice(&(message.len() as u32).to_be_bytes());
            data.extend_from_slice(message);
        }
        data
    }

    #[tokio::test]
    async fn each_message_of_a_stream_is_counted_sent_and_the_request_received() {
        let metrics = Metrics::default();
        let events = framed(&[b"one".to_vec(), b"two".to_vec(), Vec::new()]);
        // The second message's prefix is split between two frames.
        let stream = http::Response::new(body(vec![
            Frame::data(Bytes::copy_from_slice(&events[..10])),
            Frame::data(Bytes::copy_from_slice(&events[10..])),
            Frame::trailers(status_map(Code::Ok)),
        ]));
        let response = std::sync::Mutex::new(Some(stream));
        let inner = tower::service_fn(move |request: http::Request<tonic::body::Body>| {
            let response = response.lock().unwrap().take().expect("called once");
            async move {
                // The handler reads the request, as tonic does.
                request.into_body().collect().await.unwrap();
                Ok::<_, Infallible>(response)
            }
        });
        let mut service = RpcTelemetryLayer::new(metrics.clone()).layer(inner);
        let request = http::Request::builder()
            .uri(WATCH)
            .body(tonic::body::Body::new(http_body_util::Full::new(
                Bytes::from(framed(&[b"watch".to_vec()])),
            )))
            .unwrap();
        let response = service.ready().await.unwrap().call(request).await.unwrap();
        assert_eq!(metrics.method(WATCH).msg_received.get(), 1);
        assert_eq!(metrics.method(WATCH).msg_sent.get(), 0, "nothing sent yet");
        response.into_body().collect().await.unwrap();
        assert_eq!(metrics.method(WATCH).msg_sent.get(), 3);
    }

    proptest::proptest! {
        /// Messages of any lengths, cut into pieces anywhere: each is counted once, when its
        /// prefix has passed.
        #[test]
        fn messages_are_counted_however_the_body_is_cut(
            messages in proptest::collection::vec(proptest::collection::vec(0u8..=255, 0..300), 0..12),
            cuts in proptest::collection::vec(0usize..4000, 0..20),
        ) {
            let data = framed(&messages);
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|&c| c <= data.len()).collect();
            cuts.extend([0, data.len()]);
            cuts.sort_unstable();
            let mut framing = MessageFraming::default();
            let counted: u64 = cuts
                .windows(2)
                .map(|piece| framing.messages_in(&data[piece[0]..piece[1]]))
                .sum();
            proptest::prop_assert_eq!(counted, messages.len() as u64);
            proptest::prop_assert_eq!(framing, MessageFraming::default(), "at a message boundary");
        }
    }
}
