//! `run(listener, health, app, settings, shutdown)`: the gRPC server with health (see
//! `health`, and a plaintext health-only port for probes), reflection (v1 and v1alpha),
//! connection limits (caps, handshake timeout, keepalive, maximum age: see `connections`) and a
//! bounded graceful drain, on plaintext or TLS (`tls`); CallControl calls go through caller
//! authentication, health and reflection stay open.
mod tls;
use std::{
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::FutureExt;
use tokio::{net::TcpListener, time::Instant};
use tokio_util::sync::CancellationToken;
use tonic::{codegen::http, service::interceptor::InterceptedService};
use tonic_health::{
    pb::health_server::HealthServer,
    server::{HealthReporter, HealthService},
};
use tonic_reflection::server::{v1, v1alpha};

use self::tls::ServerTls;
pub use self::tls::TlsFiles;
use crate::{
    api::{
        status::{self, Unfinished},
        CallControlServer,
    },
    app::App,
    callers::Callers,
    connections::{self, Admission, ConnectionLimits},
    events::HAND_BACK_ON_SHUTDOWN,
    gateway::GatewayClient,
    health,
    lifecycle::{Lifecycle, SideServer},
    proto,
    reload::{self, ReloadStats},
    telemetry::{trace::TraceContextLayer, Listener, Metrics, RpcTelemetryLayer},
};

/// After the hard stop, how long calls get to deliver the answers they give at once.
const HARD_STOP_FLUSH: Duration = Duration::from_secs(1);
/// After the server stopped, how long the service's tasks get to end: a single process's poll
/// loops end within a second of shutdown, stream forwarders once their streams are gone.
const TASKS_GRACE: Duration = Duration::from_secs(2);
/// From the start of shutdown, how long the service's tasks may run in any case: a replica's
/// last polls run until the gateway answers them, then its leases are handed back.
const TASKS_RUN_AFTER_SHUTDOWN: Duration = HAND_BACK_ON_SHUTDOWN;
/// The longest the process takes from SIGTERM to its exit when calls may drain for
/// `drain_timeout`: the drain, the hard stop's flush and the tasks' grace (or a replica's last
/// polls and hand-back, if longer), then the export of the last spans. A pod's
/// terminationGracePeriodSeconds covers it after its preStop pause (tests/it/deploy.rs checks
/// the manifests against it).
pub fn exit_bound(drain_timeout: Duration) -> Duration {
    (drain_timeout + HARD_STOP_FLUSH + TASKS_GRACE).max(TASKS_RUN_AFTER_SHUTDOWN)
        + crate::telemetry::trace::SHUTDOWN_TIMEOUT
}
/// The longest wait for a keepalive ping's answer: a connection whose peer is gone (node down,
/// NAT entry dropped) is closed this long after its ping.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// How long in-flight calls may take to finish after shutdown begins.
    pub(crate) drain_timeout: Duration,
    /// Largest request message accepted.
    pub(crate) max_request_bytes: usize,
    /// HTTP/2 streams per connection.
    pub(crate) max_concurrent_streams: u32,
    /// None: plaintext.
    pub(crate) tls: Option<TlsFiles>,
    /// How often the TLS and callers files are re-read.
    pub(crate) reload_interval: Duration,
    /// The TLS files' loads and failed reloads, read by the metrics endpoint.
    pub(crate) tls_reloads: Arc<ReloadStats>,
    /// How often the gateway's reachability is probed.
    pub(crate) gateway_probe: Duration,
    /// A silent client connection is pinged this often.
    pub(crate) http2_keepalive: Duration,
    /// A client connection is asked to go away (GOAWAY) at this age...
    pub(crate) max_connection_age: Duration,
    /// ...and closed this much later.
    pub(crate) max_connection_age_grace: Duration,
    /// The gRPC port's caps and handshake timeout (the health port's: `side_port` of its
    /// timeout).
    pub(crate) connections: ConnectionLimits,
}

impl ServerSettings {
    /// How long a client connection lives at most: its maximum age and the grace after it.
    fn connection_lifetime(&self) -> Duration {
        self.max_connection_age + self.max_connection_age_grace
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("TLS: {0}")]
    Tls(String),
}

/// The health service, and the plaintext health port when there is one: started before the
/// service is built, so that probes see a replica waiting for NATS alive and not ready.
pub struct HealthEndpoint {
    reporter: HealthReporter,
    service: HealthServer<HealthService>,
    probes: Option<SideServer<tonic::transport::Error>>,
}

impl HealthEndpoint {
    /// Reports alive and not ready, serving `listener` (the health port) when given, counted in
    /// `metrics`.
    pub async fn start(
        listener: Option<TcpListener>,
        settings: &ServerSettings,
        metrics: &Metrics,
    ) -> Self {
        let reporter = HealthReporter::new();
        health::starting(&reporter).await;
        let service = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
        let side_port = ConnectionLimits::side_port(settings.connections.handshake_timeout);
        let admission = Admission::new(side_port, metrics.listener(Listener::Health).clone());
        let probes =
            listener.map(|listener| serve_health(listener, service.clone(), admission, settings));
        Self {
            reporter,
            service,
            probes,
        }
    }

    /// Stops the health port (the service never got built, or it has drained).
    pub async fn stop(self) {
        if let Some(probes) = self.probes {
            probes.stop().await;
        }
    }

    /// The service is built: reports its readiness (ready at once when it does not wait for
    /// its share of the shared state) and follows the gateway, before anything announces that
    /// the service serves, so that a probe never sees it serving and not ready.
    pub async fn serving(self, app: &App, settings: &ServerSettings) -> ServingHealth {
        health::start(
            &self.reporter,
            &app.gateway,
            app.shared_state.clone(),
            settings.gateway_probe,
            &app.lifecycle,
        )
        .await;
        ServingHealth(self)
    }
}

/// The health service of a built service, reporting its readiness.
pub struct ServingHealth(HealthEndpoint);

/// Serves until `shutdown` resolves, then reports not ready, stops accepting, and gives
/// in-flight calls `drain_timeout` to finish; stops `health` after.
pub async fn run(
    listener: TcpListener,
    ServingHealth(health): ServingHealth,
    app: App,
    settings: ServerSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let App {
        api,
        lifecycle,
        callers,
        metrics,
        shared_state: _,
        gateway,
    } = app;
    let health_service = health.service.clone();

    let (reflection_v1, reflection_v1alpha) = reflection()?;
    let tls = settings
        .tls
        .as_ref()
        .map(|files| ServerTls::load(files, settings.tls_reloads.clone()))
        .transpose()
        .map_err(ServerError::Tls)?;
    match &settings.tls {
        Some(files) => tracing::info!(
            client_certificates_required = files.client_ca.is_some(),
            "TLS on the gRPC port"
        ),
        None => tracing::info!("the gRPC port speaks plaintext (no --tls-cert)"),
    }
    reload_files(
        tls.clone(),
        callers,
        gateway,
        &lifecycle,
        settings.reload_interval,
    );
    let authenticate = api.authenticator();
    let call_control = InterceptedService::new(
        CallControlServer::new(api).max_decoding_message_size(settings.max_request_bytes),
        authenticate,
    );
    let signal = {
        let (lifecycle, health) = (lifecycle.clone(), health.reporter.clone());
        async move {
            shutdown.await;
            begin_shutdown(&lifecycle, &health).await;
        }
    };
    let hard_stop = lifecycle.hard_stop().clone();
    let admission = Admission::new(
        settings.connections,
        metrics.listener(Listener::Grpc).clone(),
    );
    let router = http2_server(&settings)
        .max_concurrent_streams(settings.max_concurrent_streams)
        // Outermost: every answer, including those of the layers below, is counted and logged.
        .layer(RpcTelemetryLayer::new(metrics.clone()))
        // The caller's trace context becomes the call's, outside AnswerEveryCall so that its
        // answers at the hard stop are part of the call's span too.
        .layer(TraceContextLayer)
        .layer(tower::layer::layer_fn(move |inner| AnswerEveryCall {
            inner,
            stop: hard_stop.clone(),
        }))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(call_control);
    let lifetime = settings.connection_lifetime();
    let serve = match tls {
        None => router
            .serve_with_incoming_shutdown(connections::http2(listener, admission, lifetime), signal)
            .boxed(),
        Some(tls) => router
            .serve_with_incoming_shutdown(tls::incoming(listener, tls, admission, lifetime), signal)
            .boxed(),
    };
    let served = drain(serve, &lifecycle, settings.drain_timeout).await;
    health.stop().await;
    served
}

/// The plaintext health port: `grpc.health.v1.Health` and nothing else, for probes that speak
/// no TLS (the kubelet's). It answers until the gRPC server has drained, so that a draining
/// replica is seen alive and not ready, rather than not there.
fn serve_health(
    listener: TcpListener,
    health_service: HealthServer<HealthService>,
    admission: Admission,
    settings: &ServerSettings,
) -> SideServer<tonic::transport::Error> {
    let incoming = connections::http2(listener, admission, settings.connection_lifetime());
    let server = http2_server(settings);
    SideServer::spawn("the health port", |stop| {
        let mut server = server;
        server
            .add_service(health_service)
            .serve_with_incoming_shutdown(incoming, stop)
    })
}

/// A server whose HTTP/2 connections are pinged when silent and asked to go away at their
/// maximum age (the gRPC port's and the health port's).
fn http2_server(settings: &ServerSettings) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(settings.http2_keepalive))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT.min(settings.http2_keepalive)))
        // The GOAWAY only: tonic's own grace would drop it (see `connections`).
        .max_connection_age(settings.max_connection_age)
}

/// Re-reads the TLS files (the gRPC port's, the gateway client certificate) and the callers
/// files every `interval` until shutdown, so that rotated certificates and tokens take effect
/// without a restart.
fn reload_files(
    tls: Option<ServerTls>,
    callers: Option<Callers>,
    gateway: GatewayClient,
    lifecycle: &Lifecycle,
    interval: Duration,
) {
    if tls.is_none() && callers.is_none() && !gateway.has_tls_files() {
        return;
    }
    let stop = lifecycle.shutdown().clone();
    reload::every(lifecycle.tasks(), interval, stop, move || {
        if let Some(tls) = &tls {
            tls.reload();
        }
        if let Some(callers) = &callers {
            callers.reload();
        }
        gateway.reload_tls_files();
    });
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
/// loops and gateway probes stop, then readiness says NOT_SERVING (liveness stays SERVING).
async fn begin_shutdown(lifecycle: &Lifecycle, health: &tonic_health::server::HealthReporter) {
    tracing::info!("shutting down: not ready, ending event streams, draining in-flight calls");
    lifecycle.shutdown().cancel();
    health::draining(health).await;
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
    let shutdown_began = std::sync::OnceLock::new();
    let drain_deadline = async {
        lifecycle.shutdown().cancelled().await;
        shutdown_began.get_or_init(Instant::now);
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
    // Unset only if the server ended before the deadline's wait saw shutdown begin: now is later.
    let shutdown_began = *shutdown_began.get_or_init(Instant::now);
    let tasks = lifecycle.tasks();
    tasks.close();
    let tasks_until = (Instant::now() + TASKS_GRACE).max(shutdown_began + TASKS_RUN_AFTER_SHUTDOWN);
    if tokio::time::timeout_at(tasks_until, tasks.wait())
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

    /// A ReleaseCall whose handler panicked may have sent its release.
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

    /// At the hard stop, a ReleaseCall that could not answer for itself is
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
