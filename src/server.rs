//! `run(listener, api, settings, shutdown)`: the gRPC server with health, reflection (v1 and
//! v1alpha) and a bounded graceful drain.
use std::{
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::FutureExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{codegen::http, transport::server::TcpIncoming};
use tonic_reflection::server::{v1, v1alpha};

use crate::{
    api::{
        status::{self, Unfinished},
        CallControlApi, CallControlServer,
    },
    lifecycle::Lifecycle,
    proto,
    telemetry::RpcTelemetryLayer,
};

/// After the hard stop, how long calls get to deliver the answers they give at once.
const HARD_STOP_FLUSH: Duration = Duration::from_secs(1);
/// After the server stopped, how long the service's tasks get to end: poll loops end within a
/// second of shutdown, stream forwarders once their streams are gone.
const TASKS_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// How long in-flight calls may take to finish after shutdown begins.
    pub(crate) drain_timeout: Duration,
    /// Largest request message accepted.
    pub(crate) max_request_bytes: usize,
    /// HTTP/2 streams per connection.
    pub(crate) max_concurrent_streams: u32,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(10),
            max_request_bytes: 16 * 1024,
            max_concurrent_streams: 256,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Serves until `shutdown` resolves, then reports NOT_SERVING, stops accepting, and gives
/// in-flight calls `drain_timeout` to finish.
pub async fn run(
    listener: TcpListener,
    api: CallControlApi,
    settings: ServerSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<CallControlServer<CallControlApi>>()
        .await;

    let (reflection_v1, reflection_v1alpha) = reflection()?;
    let lifecycle = api.lifecycle().clone();
    let call_control_metrics = api.metrics().clone();
    let call_control =
        CallControlServer::new(api).max_decoding_message_size(settings.max_request_bytes);
    let signal = {
        let (lifecycle, health) = (lifecycle.clone(), health.clone());
        async move {
            shutdown.await;
            begin_shutdown(&lifecycle, &health).await;
        }
    };
    let hard_stop = lifecycle.hard_stop().clone();
    let telemetry = RpcTelemetryLayer::new(call_control_metrics);
    let serve = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(settings.max_concurrent_streams)
        // Outermost: every answer, including those of the layers below, is counted and logged.
        .layer(telemetry)
        .layer(tower::layer::layer_fn(move |inner| AnswerEveryCall {
            inner,
            stop: hard_stop.clone(),
        }))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(call_control)
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY small answers wait on delayed ACKs (40 ms stalls at p99).
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            signal,
        );
    drain(serve, &lifecycle, settings.drain_timeout).await
}

/// Server reflection v1 and v1alpha. Each lists the other too, so every client sees the same
/// list whichever it speaks. The error details add no service: they let a client decode the
/// details of every failure.
fn reflection() -> Result<
    (
        v1::ServerReflectionServer<impl v1::ServerReflection>,
        v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>,
    ),
    ServerError,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(proto::ERROR_DETAILS_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = builder()
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = builder()
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    Ok((reflection_v1, reflection_v1alpha))
}

/// The first steps of shutdown, in order: streams deliver what they hold and end (UNAVAILABLE,
/// with a resume token; without this the drain would wait for them until its timeout), poll
/// loops stop, then health says NOT_SERVING.
async fn begin_shutdown(lifecycle: &Lifecycle, health: &tonic_health::server::HealthReporter) {
    tracing::info!("shutting down: NOT_SERVING, ending event streams, draining in-flight calls");
    lifecycle.shutdown().cancel();
    health
        .set_not_serving::<CallControlServer<CallControlApi>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
}

/// The rest of shutdown: tonic waits for every open call and stream, bounded by
/// `drain_timeout`; then the hard stop, where calls answer at once with what they know and get
/// a moment for their answers to reach the client; then, bounded too, the service's tasks.
async fn drain(
    serve: impl Future<Output = Result<(), tonic::transport::Error>>,
    lifecycle: &Lifecycle,
    drain_timeout: Duration,
) -> Result<(), ServerError> {
    tokio::pin!(serve);
    let drain_deadline = async {
        lifecycle.shutdown().cancelled().await;
        tokio::time::sleep(drain_timeout).await;
    };
    tokio::select! {
        result = &mut serve => result?,
        () = drain_deadline => {
            tracing::warn!(timeout = ?drain_timeout, "drain timed out; ending the remaining calls");
            lifecycle.hard_stop().cancel();
            match tokio::time::timeout(HARD_STOP_FLUSH, &mut serve).await {
                Ok(result) => result?,
                Err(_) => tracing::warn!("connections still open after the hard stop; leaving them"),
            }
        }
    }
    let tasks = lifecycle.tasks();
    tasks.close();
    if tokio::time::timeout(TASKS_GRACE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            running = tasks.len(),
            "tasks still running after shutdown (releases waiting for the gateway, streams whose clients stopped reading)"
        );
    }
    Ok(())
}

/// Makes sure every call gets an answer that tells the truth about a release: at the hard
/// stop, and when a handler panics (hyper would reset the stream, which a client sees as a
/// bare CANCELLED, with no word on whether its call was hung up). A handler that watches the
/// stop itself answers first: it is polled first, on the same wake-up.
#[derive(Clone)]
struct AnswerEveryCall<S> {
    inner: S,
    stop: CancellationToken,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for AnswerEveryCall<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // A Uri shares its bytes: no copy on every call for the rare answer that needs it.
        let uri = request.uri().clone();
        let call = AssertUnwindSafe(self.inner.call(request)).catch_unwind();
        let stop = self.stop.clone();
        Box::pin(async move {
            let why = tokio::select! {
                biased;
                response = call => match response {
                    Ok(response) => return response,
                    Err(_) => {
                        tracing::error!(path = uri.path(), "a call's handler panicked");
                        Unfinished::Panicked
                    }
                },
                () = stop.cancelled() => Unfinished::HardStop,
            };
            Ok(status::unfinished(uri.path(), why).into_http())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tonic_types::StatusExt;
    use tower::{Service, ServiceExt};

    use super::*;

    const RELEASE: &str = "/ccgw.callcontrol.v1.CallControl/ReleaseCall";

    async fn answer<F>(path: &str, handler: F, stop: CancellationToken) -> tonic::Status
    where
        F: Future<Output = Result<http::Response<tonic::body::Body>, Infallible>> + Send + 'static,
    {
        let handler = std::sync::Mutex::new(Some(handler));
        let inner = tower::service_fn(move |_: http::Request<()>| {
            handler.lock().unwrap().take().expect("called once")
        });
        let mut service = AnswerEveryCall { inner, stop };
        let request = http::Request::builder().uri(path).body(()).unwrap();
        let response = service.ready().await.unwrap().call(request).await.unwrap();
        tonic::Status::from_header_map(response.headers()).expect("a gRPC status")
    }

    fn assert_outcome_unknown(status: &tonic::Status, cause: &str) {
        assert_eq!(status.code(), tonic::Code::Unknown, "{status:?}");
        let details = status.get_error_details();
        let info = details.error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "RELEASE_OUTCOME_UNKNOWN");
        assert_eq!(info.metadata["may_have_released"], "true");
        assert_eq!(info.metadata["cause"], cause);
        assert!(details.retry_info().is_none());
    }

    /// Issue 7, point 1: a ReleaseCall whose handler panicked may have sent its release.
    #[tokio::test]
    async fn a_panicking_release_answers_outcome_unknown() {
        let status = answer(
            RELEASE,
            async { panic!("a bug in the handler") },
            CancellationToken::new(),
        )
        .await;
        assert_outcome_unknown(&status, "INTERNAL_ERROR");
        let other = answer(
            "/grpc.health.v1.Health/Check",
            async { panic!("a bug in the handler") },
            CancellationToken::new(),
        )
        .await;
        assert_eq!(other.code(), tonic::Code::Internal);
    }

    /// Issue 7, point 1: at the hard stop, a ReleaseCall that could not answer for itself is
    /// not told UNAVAILABLE; other calls are.
    #[tokio::test(start_paused = true)]
    async fn the_hard_stop_never_answers_a_release_unavailable() {
        let stop = CancellationToken::new();
        stop.cancel();
        let status = answer(RELEASE, std::future::pending(), stop.clone()).await;
        assert_outcome_unknown(&status, "SHUTTING_DOWN");
        let other = answer("/grpc.health.v1.Health/Check", std::future::pending(), stop).await;
        assert_eq!(other.code(), tonic::Code::Unavailable);
    }
}
