use std::{
    fmt::Display,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, HeaderMap, Method, Request, StatusCode, Uri};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use rustls::client::danger::ServerCertVerifier;
use serde_json::json;
use tokio::{net::TcpStream, time::Instant};
use tokio_util::sync::CancellationToken;
use tower::{util::BoxCloneSyncService, BoxError, ServiceExt};
use tracing::{Instrument, Span};

pub use super::tls::PemFile;
use super::{
    admission::{self, GatewayAdmission},
    reachability::GatewayHealth,
    session::{Guid, Session, SessionHeaders},
    tls::{self, warn_about_exposure, ClientIdentity},
    wire::{self, Answer},
    GatewayError,
};
use crate::{
    domain::{AgentId, CallId},
    reload::ReloadStats,
    shares::CallerName,
    telemetry::trace::{self, GatewayServer, GatewayTrace, TraceHeaders},
    telemetry::{GatewayOperation, Metrics},
};

/// Path prefix of the agent interface on every gateway.
const RESOURCE_PREFIX: &str = "/agentgateway/resource";
const CONTENT_TYPE_JSON: &str = "application/json; charset=UTF-8";
/// Below this budget a request would almost surely time out after it was sent, leaving its
/// outcome unknown; better not to send it at all.
const MIN_BUDGET: Duration = Duration::from_millis(20);
/// Sent with every request, so that the gateway's logs tell the facade's requests apart.
const USER_AGENT: &str = concat!("ccgw-callcontrol/", env!("CARGO_PKG_VERSION"));
/// The read buffer of each gateway connection, which lives as long as the connection: one per
/// watched agent. hyper's adaptive default starts at 8 KiB. Answer bodies stream through it in
/// pieces of this size, whatever their length, but an answer's status line and headers must fit
/// in it: hyper refuses a bigger head ("message head is too large", a transport error). 4 KiB is
/// nginx's default limit on the head of an upstream's answer (`proxy_buffer_size`, one page).
const READ_BUFFER_BYTES: usize = 4 * 1024;

/// hyper's pooled HTTP/1 client over TCP, with TLS for `https` gateways.
type HttpClient = Client<Connector, Full<Bytes>>;
type Connector = BoxCloneSyncService<Uri, MaybeHttpsStream<TokioIo<TcpStream>>, BoxError>;

#[derive(Debug, Clone)]
pub(crate) struct GatewaySettings {
    /// `https://host:8043` (the `/agentgateway/resource` prefix is added when missing).
    pub(crate) base_url: String,
    /// Extra trust anchors for the gateway's TLS certificate, besides the system's.
    pub(crate) ca_bundle: Option<PemFile>,
    /// Certificate chain and private key presented to the gateway (mutual TLS).
    pub(crate) client_identity: Option<(PemFile, PemFile)>,
    /// Accept any gateway certificate (lab gateways only).
    pub(crate) insecure_skip_verify: bool,
    pub(crate) connect_timeout: Duration,
    /// Largest answer body the facade reads; anything bigger is an error, not an allocation.
    pub(crate) max_answer_bytes: usize,
    /// Use `DELETE .../voicecall/{agentid}` (releaseEx) instead of `.../release`.
    pub(crate) legacy_release_path: bool,
    /// Gateway requests other than event polls in flight at once.
    pub(crate) max_requests: usize,
    /// Gateway requests other than event polls waiting for their turn.
    pub(crate) max_queue: usize,
    /// Of those, the ones made for one caller.
    pub(crate) max_queue_per_caller: usize,
}

/// An operation made in an agent's session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionOperation {
    /// `DELETE .../voicecall/{agentid}/release` (or the legacy path), or
    /// `POST .../voicecall/{agentid}/dropcall/{callid}`.
    Release(ReleaseTarget),
    /// One long poll, `GET .../agentevent/{agentid}`: the deadline must outlast the gateway's
    /// long-poll wait (about 10 s).
    PollEvents {
        /// Asks the gateway to close the connection after answering (`Connection: close`).
        /// hyper queues a connection's requests in a channel that takes a second block of 32
        /// slots at its 33rd request, about 9 KiB for as long as the connection lives; a poll
        /// loop keeps one pooled connection busy, so retiring it every 30 polls keeps every
        /// polled agent's connection at one block.
        retire_connection: bool,
    },
}

/// How many polls a poll loop sends on one connection before it asks for a new one: below the
/// 32 requests hyper's per-connection channel holds in its first block, with room for a
/// release sent on the same pooled connection.
pub(crate) const POLLS_PER_CONNECTION: u32 = 30;

/// An operation for an agent as it goes out, in whichever session: when its answer is due, and
/// the caller it is made for (None: for the facade itself, like an event poll).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AgentRequest<'a> {
    pub(crate) agent: AgentId,
    pub(crate) operation: &'a SessionOperation,
    pub(crate) deadline: Instant,
    pub(crate) caller: Option<&'a CallerName>,
}

/// One gateway answer with the session headers that came with it.
#[derive(Debug)]
pub(crate) struct Exchange {
    pub(crate) headers: SessionHeaders,
    pub(crate) answer: Result<Answer, GatewayError>,
}

/// Which call a release acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseTarget {
    /// Whatever call is current when the gateway handles the request.
    Current,
    /// Exactly this call; safe to repeat.
    Call(CallId),
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("gateway URL {0:?} is not an http(s) URL")]
    BadUrl(String),
    /// A PEM file given by `flag` could not be read or used; `problem` never quotes it.
    #[error("{flag} {path}: {problem}")]
    File {
        flag: &'static str,
        path: String,
        problem: String,
    },
    #[error("HTTP client: {0}")]
    Client(String),
}

/// Counters of what the client could not read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GatewayStats {
    /// `Set-GUID` headers that held no readable Guid (ignored, so the session did not rotate).
    pub unreadable_set_guid: u64,
}

/// Talks to one CC-Gateway (or its load balancer): requests in, answers out. What a session
/// answer means for the agent's session is the sessions room's business. Cheap to clone.
#[derive(Debug, Clone)]
pub struct GatewayClient {
    http: HttpClient,
    /// The HTTP client's connector, which the reachability probe uses on its own.
    connector: Connector,
    /// Where the probe connects: the gateway's scheme, host and port.
    probe_target: Uri,
    /// The gateway's host and port, for the spans of requests made for a call.
    server: GatewayServer,
    admission: GatewayAdmission,
    health: GatewayHealth,
    base: Arc<str>,
    max_answer_bytes: usize,
    legacy_release_path: bool,
    unreadable_set_guid: Arc<AtomicU64>,
    metrics: Metrics,
    /// The client certificate presented to the gateway, re-read while the service runs.
    client_identity: Option<ClientIdentity>,
}

impl GatewayClient {
    pub(crate) fn new(settings: &GatewaySettings) -> Result<Self, SettingsError> {
        crate::install_crypto_provider();
        let base = normalize_base(&settings.base_url)?;
        warn_about_exposure(&base, settings.insecure_skip_verify);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            // Load balancers drop idle connections, often after 60 s; a release sent on one
            // they just closed would fail with an unknown outcome. Retire idle ones sooner.
            .pool_idle_timeout(Duration::from_secs(30))
            .http1_read_buf_exact_size(READ_BUFFER_BYTES);
        // hyper's client follows no redirects and knows no proxies: requests go straight to
        // the configured gateway, and a 3xx answer is an HTTP status error.
        let client_identity = client_identity(settings)?;
        let connector = connector(settings, client_identity.as_ref())?;
        let http = builder.build(connector.clone());
        let probe_target: Uri = base
            .parse()
            .map_err(|_| SettingsError::BadUrl(base.clone()))?;
        Ok(Self {
            http,
            connector,
            server: GatewayServer::of(&probe_target),
            probe_target,
            admission: GatewayAdmission::new(
                settings.max_requests,
                settings.max_queue,
                settings.max_queue_per_caller,
            ),
            health: GatewayHealth::default(),
            base: base.into(),
            max_answer_bytes: settings.max_answer_bytes,
            legacy_release_path: settings.legacy_release_path,
            unreadable_set_guid: Arc::default(),
            metrics: Metrics::default(),
            client_identity,
        })
    }

    /// Re-reads the client certificate and key, if configured; new connections use them.
    pub(crate) fn reload_tls_files(&self) {
        if let Some(identity) = &self.client_identity {
            identity.reload();
        }
    }

    /// The client certificate's reloads, if configured.
    pub(crate) fn tls_reload_stats(&self) -> Option<Arc<ReloadStats>> {
        self.client_identity
            .as_ref()
            .map(ClientIdentity::reload_stats)
    }

    /// Whether [`Self::reload_tls_files`] has anything to re-read.
    pub(crate) fn has_tls_files(&self) -> bool {
        self.client_identity.is_some()
    }

    /// Counts this client's requests in `metrics` (by operation and outcome).
    pub(crate) fn counted_in(mut self, metrics: &Metrics) -> Self {
        self.metrics = metrics.clone();
        self
    }

    pub fn stats(&self) -> GatewayStats {
        GatewayStats {
            unreadable_set_guid: self.unreadable_set_guid.load(Ordering::Relaxed),
        }
    }

    /// The cap on requests other than event polls, with its in-flight and waiting counts.
    pub fn admission(&self) -> &GatewayAdmission {
        &self.admission
    }

    /// The gateway's damped reachability.
    pub fn health(&self) -> &GatewayHealth {
        &self.health
    }

    /// Connects to the gateway (TCP, and the TLS handshake for `https`), sends nothing, closes.
    pub(crate) async fn probe(&self) -> Result<(), GatewayError> {
        match self
            .connector
            .clone()
            .oneshot(self.probe_target.clone())
            .await
        {
            Ok(_connection) => Ok(()),
            Err(error) => Err(GatewayError::Connect(describe(&*error))),
        }
    }

    /// Probes the gateway now and then every `every` until `stop`, into [`Self::health`].
    pub(crate) async fn probe_until(&self, every: Duration, stop: CancellationToken) {
        loop {
            let outcome = tokio::select! {
                () = stop.cancelled() => return,
                outcome = self.probe() => outcome,
            };
            self.health
                .observe(outcome.as_ref().map(drop).map_err(|e| e as &dyn Display));
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Sends `request` in `session`. Makes no decision about the session: the answer comes back
    /// with the session headers it carried.
    pub(crate) async fn send(&self, request: AgentRequest<'_>, session: &Session) -> Exchange {
        let AgentRequest {
            agent,
            operation,
            deadline,
            caller,
        } = request;
        let (method, path, counted) = match operation {
            SessionOperation::Release(ReleaseTarget::Current) if self.legacy_release_path => (
                Method::DELETE,
                format!("/voicecall/{agent}"),
                GatewayOperation::Release,
            ),
            SessionOperation::Release(ReleaseTarget::Current) => (
                Method::DELETE,
                format!("/voicecall/{agent}/release"),
                GatewayOperation::Release,
            ),
            SessionOperation::Release(ReleaseTarget::Call(call)) => (
                Method::POST,
                format!("/voicecall/{agent}/dropcall/{call}"),
                GatewayOperation::Dropcall,
            ),
            SessionOperation::PollEvents { .. } => (
                Method::GET,
                format!("/agentevent/{agent}"),
                GatewayOperation::Poll,
            ),
        };
        // Polls have their own cap (one per polled agent, --max-polled-agents), and serve every
        // caller watching the agent: they continue nobody's trace.
        let (admitted, trace) = match operation {
            SessionOperation::PollEvents { .. } => (Admitted::Unlimited, GatewayTrace::default()),
            SessionOperation::Release(_) => (
                Admitted::UnderCap(caller.cloned()),
                trace::gateway_request(&method, &path, &self.server),
            ),
        };
        match self.request_in(method, &path, session, trace.headers) {
            Ok(mut request) => {
                if let SessionOperation::PollEvents {
                    retire_connection: true,
                } = operation
                {
                    let close = header::HeaderValue::from_static("close");
                    request.headers_mut().insert(header::CONNECTION, close);
                }
                self.exchange(counted, request, admitted, deadline, &trace.span)
                    .instrument(trace.span.clone())
                    .await
            }
            Err(error) => Exchange {
                headers: SessionHeaders::default(),
                answer: Err(error),
            },
        }
    }

    /// `PUT .../onlineagent/{agentid}` (or `/forcelogin`); a successful answer's `Set-GUID`
    /// starts the agent's session.
    pub(crate) async fn sign_in(
        &self,
        agent: AgentId,
        password: &str,
        phone_number: &str,
        force: bool,
        deadline: Instant,
    ) -> Exchange {
        let (path, counted) = if force {
            (
                format!("/onlineagent/{agent}/forcelogin"),
                GatewayOperation::ForceSignIn,
            )
        } else {
            (format!("/onlineagent/{agent}"), GatewayOperation::SignIn)
        };
        let body = json!({ "password": password, "phonenum": phone_number }).to_string();
        match self
            .request(Method::PUT, &path)
            .body(Full::new(Bytes::from(body)))
        {
            Ok(request) => {
                self.exchange(
                    counted,
                    request,
                    Admitted::UnderCap(None),
                    deadline,
                    &Span::none(),
                )
                .await
            }
            Err(_) => Exchange {
                headers: SessionHeaders::default(),
                answer: Err(GatewayError::Malformed("request URI is invalid".into())),
            },
        }
    }

    /// A request to the gateway's `path` with the headers every request carries.
    fn request(&self, method: Method, path: &str) -> hyper::http::request::Builder {
        Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(header::USER_AGENT, USER_AGENT)
            // As reqwest sent it: the gateway sees the requests it saw before.
            .header(header::ACCEPT, "*/*")
            .header(header::CONTENT_TYPE, CONTENT_TYPE_JSON)
    }

    fn request_in(
        &self,
        method: Method,
        path: &str,
        session: &Session,
        trace: Option<TraceHeaders>,
    ) -> Result<Request<Full<Bytes>>, GatewayError> {
        let mut request = self
            .request(method, path)
            .header("Guid", sensitive(session.guid.expose())?);
        if let Some(cookie) = session.cookies.header_value() {
            request = request.header(header::COOKIE, sensitive(&cookie)?);
        }
        if let Some(trace) = trace {
            request = trace.set_on(request);
        }
        request
            .body(Full::default())
            .map_err(|_| GatewayError::Malformed("request URI is invalid".into()))
    }

    /// Counts the request by operation and outcome, with its latency, around
    /// [`Self::exchange_uncounted`].
    async fn exchange(
        &self,
        operation: GatewayOperation,
        request: Request<Full<Bytes>>,
        admitted: Admitted,
        deadline: Instant,
        span: &Span,
    ) -> Exchange {
        let started = std::time::Instant::now();
        let exchange = self
            .exchange_uncounted(request, admitted, deadline, span)
            .await;
        let seconds = started.elapsed().as_secs_f64();
        self.metrics
            .gateway_request(operation, outcome_label(&exchange.answer), seconds);
        exchange
    }

    /// Waits for its turn (unless `admitted` says it needs none), sends, takes the session headers
    /// as soon as they arrive (they count even when the body then fails), reads a bounded body
    /// and parses the envelope, all within `deadline`. What the answer says of the gateway's
    /// reachability goes into [`Self::health`], what it said of the HTTP exchange onto `span`.
    async fn exchange_uncounted(
        &self,
        request: Request<Full<Bytes>>,
        admitted: Admitted,
        deadline: Instant,
        span: &Span,
    ) -> Exchange {
        let mut headers = SessionHeaders::default();
        let too_short = |budget| Exchange {
            headers: SessionHeaders::default(),
            answer: Err(GatewayError::DeadlineTooShort(budget)),
        };
        let budget = deadline.saturating_duration_since(Instant::now());
        if budget < MIN_BUDGET {
            return too_short(budget);
        }
        let _turn = match admitted {
            Admitted::Unlimited => None,
            Admitted::UnderCap(caller) => match self
                .admission
                .admit(admission::give_up_at(deadline, MIN_BUDGET), caller.as_ref())
                .await
            {
                Ok(turn) => Some(turn),
                Err(busy) => {
                    return Exchange {
                        headers,
                        answer: Err(busy),
                    }
                }
            },
        };
        let budget = deadline.saturating_duration_since(Instant::now());
        if budget < MIN_BUDGET {
            return too_short(budget);
        }
        let mut http_status = None;
        let work = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(classify_send_error)?;
            headers = self.session_headers(response.headers());
            let status = response.status();
            http_status = Some(status);
            if status != StatusCode::OK {
                return Err(GatewayError::HttpStatus {
                    status: status.as_u16(),
                });
            }
            let body = wire::read_bounded(response.into_body(), self.max_answer_bytes).await?;
            wire::parse_answer(&body)
        };
        let answer = tokio::time::timeout_at(deadline, work)
            .await
            .unwrap_or(Err(GatewayError::Timeout(budget)));
        trace::gateway_answered(span, http_status);
        if let Some(evidence) = reachability_evidence(&answer) {
            self.health.observe(evidence.map_err(|e| e as &dyn Display));
        }
        Exchange { headers, answer }
    }

    fn session_headers(&self, headers: &HeaderMap) -> SessionHeaders {
        let set_guid = headers.get("set-guid").and_then(|value| {
            let guid = value.to_str().ok().and_then(Guid::from_set_guid);
            if guid.is_none() {
                // Ignoring it keeps the old Guid, which the gateway stops accepting after
                // GUIDTIMEOUT: worth a warning, never the value.
                self.unreadable_set_guid.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    bytes = value.len(),
                    "the gateway sent a Set-GUID header without a readable Guid; ignored it"
                );
            }
            guid
        });
        let set_cookies = headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_owned)
            .collect();
        SessionHeaders {
            set_guid,
            set_cookies,
        }
    }
}

/// How a request is admitted: under the cap on gateway requests (waiting for a turn, counted
/// for its caller if it has one), or without a cap (event polls, bounded by the polled agents).
#[derive(Debug, Clone)]
enum Admitted {
    UnderCap(Option<CallerName>),
    Unlimited,
}

/// What a request's end says of the gateway's reachability: a connect failure or a load
/// balancer's 502/503/504 that it is unreachable, any other answer that it is reachable. A lost
/// connection or a timeout says nothing (a long poll or a slow release may end so on a
/// reachable gateway).
fn reachability_evidence(
    answer: &Result<Answer, GatewayError>,
) -> Option<Result<(), &GatewayError>> {
    match answer {
        Err(
            error @ (GatewayError::Connect(_) | GatewayError::HttpStatus { status: 502..=504 }),
        ) => Some(Err(error)),
        Ok(_)
        | Err(
            GatewayError::HttpStatus { .. }
            | GatewayError::Malformed(_)
            | GatewayError::Oversized { .. },
        ) => Some(Ok(())),
        Err(_) => None,
    }
}

/// The `outcome` label of a gateway request: the answer's retcode (a bounded set: success, the
/// documented codes, `other_retcode`), or why there was none.
fn outcome_label(answer: &Result<Answer, GatewayError>) -> &'static str {
    match answer {
        Ok(answer) if answer.retcode.is_ok() => "0",
        Ok(answer) => answer.retcode.known().map_or("other_retcode", |k| k.code()),
        Err(GatewayError::NoSession(_)) => "no_session",
        Err(GatewayError::Connect(_)) => "connect_error",
        Err(GatewayError::Timeout(_)) => "timeout",
        Err(GatewayError::DeadlineTooShort(_)) => "deadline_too_short",
        Err(GatewayError::Transport(_)) => "transport_error",
        Err(GatewayError::HttpStatus { status }) => match status {
            400..=499 => "http_4xx",
            500..=599 => "http_5xx",
            _ => "http_other",
        },
        Err(GatewayError::Malformed(_)) => "malformed_answer",
        Err(GatewayError::Oversized { .. }) => "oversized_answer",
        Err(GatewayError::Busy(_)) => "busy",
    }
}

/// A header value marked sensitive, so hyper and any HTTP tracing redact it.
fn sensitive(value: &str) -> Result<header::HeaderValue, GatewayError> {
    let mut value = header::HeaderValue::from_str(value)
        .map_err(|_| GatewayError::Malformed("session value is not a valid header".into()))?;
    value.set_sensitive(true);
    Ok(value)
}

/// TCP (as reqwest set it up) and TLS for `https` gateways; the connect timeout covers both.
fn connector(
    settings: &GatewaySettings,
    identity: Option<&ClientIdentity>,
) -> Result<Connector, SettingsError> {
    let mut tcp = HttpConnector::new();
    // The TLS wrapper decides which schemes go through it.
    tcp.enforce_http(false);
    tcp.set_connect_timeout(Some(settings.connect_timeout));
    tcp.set_nodelay(true);
    // A gateway that vanished without closing its connections (host down, NAT entry gone) is
    // noticed within about a minute, instead of each long poll waiting for its deadline.
    tcp.set_keepalive(Some(Duration::from_secs(15)));
    tcp.set_keepalive_interval(Some(Duration::from_secs(15)));
    tcp.set_keepalive_retries(Some(3));
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    tcp.set_tcp_user_timeout(Some(Duration::from_secs(30)));
    let tls = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(settings, identity)?)
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp);
    // Until the handshake is over nothing was sent, so a stalled one is a connect failure (safe
    // to retry), not a timeout with an unknown outcome.
    let limit = settings.connect_timeout;
    let within_limit = tls.map_future(move |connecting| async move {
        tokio::time::timeout(limit, connecting)
            .await
            .unwrap_or_else(|_| Err(format!("connecting took longer than {limit:?}").into()))
    });
    Ok(BoxCloneSyncService::new(within_limit))
}

/// What reqwest did with rustls and no provider of its own: the process-wide provider, the
/// platform's verifier (on Linux, the system's roots), plus the roots of `--gateway-ca-bundle`;
/// the gateway's host name is verified. Optionally a client certificate, or no verification at
/// all (`--gateway-insecure-skip-verify`).
fn tls_config(
    settings: &GatewaySettings,
    identity: Option<&ClientIdentity>,
) -> Result<rustls::ClientConfig, SettingsError> {
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let verifier: Arc<dyn ServerCertVerifier> = if settings.insecure_skip_verify {
        Arc::new(tls::AcceptAnyCertificate::new(&provider))
    } else {
        let extra_roots = match &settings.ca_bundle {
            None => Vec::new(),
            Some(bundle) => bundle.certificates()?,
        };
        Arc::new(
            rustls_platform_verifier::Verifier::new_with_extra_roots(extra_roots, provider.clone())
                .map_err(|e| SettingsError::Client(e.to_string()))?,
        )
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SettingsError::Client(e.to_string()))?
        // "dangerous" only names the way in for verifiers other than rustls' own; the
        // platform's verifies the chain and the host name.
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    Ok(match identity {
        None => builder.with_no_client_auth(),
        Some(identity) => builder.with_client_cert_resolver(Arc::new(identity.clone())),
    })
}

/// The client certificate and key, if configured: checked as PEM files (errors name what is
/// wrong with which), then loaded to be re-read while the service runs.
fn client_identity(settings: &GatewaySettings) -> Result<Option<ClientIdentity>, SettingsError> {
    let Some((cert, key)) = &settings.client_identity else {
        return Ok(None);
    };
    cert.certificates()?;
    key.private_key()?;
    ClientIdentity::load(cert, key).map(Some)
}

/// `scheme://host[:port][/path]`, without a trailing slash, ending in the resource prefix.
fn normalize_base(raw: &str) -> Result<String, SettingsError> {
    let bad = || SettingsError::BadUrl(raw.into());
    let uri: Uri = raw.parse().map_err(|_| bad())?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(bad());
    };
    // Credentials in the URL would be silently dropped, and a query would end up in the middle
    // of every request's path.
    if !matches!(scheme, "http" | "https")
        || authority.host().is_empty()
        || authority.as_str().contains('@')
        || uri.query().is_some()
    {
        return Err(bad());
    }
    let trimmed = format!("{scheme}://{authority}{}", uri.path());
    let trimmed = trimmed.trim_end_matches('/');
    Ok(if trimmed.ends_with(RESOURCE_PREFIX) {
        trimmed.to_owned()
    } else {
        format!("{trimmed}{RESOURCE_PREFIX}")
    })
}

/// Connect errors (refused, DNS, TLS handshake, connect timeout) happen before a byte of the
/// request is written; anything else may have reached the gateway. hyper's "connection closed
/// before message completed" (the simulator's `drop` and `lose_answer`) is one of the latter.
/// So is the gateway refusing the facade's client certificate, as far as hyper can tell: under
/// TLS 1.3 the client's side of the handshake ends before the gateway has checked the
/// certificate, and the request goes out. But the gateway checks it before it reads a byte of
/// the request, so that refusal, too, is a connect failure.
fn classify_send_error(error: hyper_util::client::legacy::Error) -> GatewayError {
    if error.is_connect() || tls::refused_client_certificate(&error) {
        GatewayError::Connect(describe(&error))
    } else {
        GatewayError::Transport(describe(&error))
    }
}

/// An error and its causes on one line. hyper's errors carry neither the URL nor headers.
pub(crate) fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    let mut current = Some(error);
    while let Some(err) = current {
        let part = err.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
        current = err.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_gets_the_resource_prefix_once() {
        assert_eq!(
            normalize_base("https://gw:8043").unwrap(),
            "https://gw:8043/agentgateway/resource"
        );
        assert_eq!(
            normalize_base("https://gw:8043/agentgateway/resource/").unwrap(),
            "https://gw:8043/agentgateway/resource"
        );
        assert!(normalize_base("ftp://gw").is_err());
        assert!(normalize_base("gw:8043").is_err());
        assert!(normalize_base("https://user:pw@gw:8043").is_err());
        assert!(normalize_base("https://gw:8043/?x=1").is_err());
        assert_eq!(
            normalize_base("http://[::1]:8043/").unwrap(),
            "http://[::1]:8043/agentgateway/resource"
        );
    }

    fn answer_with_set_guid(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("set-guid", value.parse().unwrap());
        headers.insert(header::SET_COOKIE, "route=n1; Path=/".parse().unwrap());
        headers
    }

    /// A Set-GUID with attributes is read; an unreadable one is counted (and
    /// ignored), never silently dropped.
    #[test]
    fn set_guid_headers_are_read_or_counted() {
        let client = GatewayClient::new(&GatewaySettings::new("http://127.0.0.1:1")).unwrap();
        let read = client.session_headers(&answer_with_set_guid("JSESSIONID=g1; Path=/; Secure"));
        assert_eq!(read.set_guid.unwrap().expose(), "g1");
        assert_eq!(read.set_cookies, ["route=n1; Path=/"]);
        assert_eq!(client.stats().unreadable_set_guid, 0);
        let unreadable = client.session_headers(&answer_with_set_guid("; Path=/"));
        assert!(unreadable.set_guid.is_none());
        assert_eq!(client.stats().unreadable_set_guid, 1);
    }

    /// Answers a sign-in once with a head of about `head_bytes` and a body of `body_bytes`.
    async fn gateway_answering(head_bytes: usize, body_bytes: usize) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            // The whole request (its JSON body ends with '}'), so that closing sends no reset.
            let mut request = Vec::new();
            while request.last() != Some(&b'}') {
                let mut chunk = [0; 1024];
                let n = socket.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the client closed early");
                request.extend_from_slice(&chunk[..n]);
            }
            let body = format!(
                r#"{{"message":"","retcode":"0","result":{{"pad":"{}"}}}}"#,
                "b".repeat(body_bytes)
            );
            let answer = format!(
                "HTTP/1.1 200 OK\r\nX-Pad: {}\r\nContent-Length: {}\r\n\r\n{body}",
                "h".repeat(head_bytes),
                body.len()
            );
            socket.write_all(answer.as_bytes()).await.unwrap();
            socket.shutdown().await.unwrap();
        });
        url
    }

    async fn sign_in_at(url: &str) -> Result<Answer, GatewayError> {
        let client = GatewayClient::new(&GatewaySettings::new(url)).unwrap();
        let agent = AgentId::parse("agent", "101", 999_999).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        client
            .sign_in(agent, "pw", "70001", false, deadline)
            .await
            .answer
    }

    /// The probe connects and sends nothing: it succeeds on a listening port (whose accepted
    /// socket then sees end of file, no request) and fails as a connect error on a closed one.
    #[tokio::test]
    async fn the_probe_connects_without_sending_anything() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = GatewayClient::new(&GatewaySettings::new(format!("http://{addr}"))).unwrap();
        client.probe().await.unwrap();
        let (mut accepted, _) = listener.accept().await.unwrap();
        let mut received = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(10), accepted.read_to_end(&mut received))
                .await
                .expect("the probe closes its connection");
        assert_eq!(read.unwrap(), 0, "the probe sent {received:?}");
        drop(listener);
        let closed = client.probe().await.unwrap_err();
        assert!(matches!(closed, GatewayError::Connect(_)), "{closed:?}");
    }

    /// A TLS server on a std thread that shakes hands with every connection it accepts, then
    /// reads until the client closes; returns its port and the certificate's PEM.
    fn tls_server(connections: usize) -> (u16, String) {
        crate::install_crypto_provider();
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert_pem = certified.cert.pem();
        let key =
            rustls::pki_types::PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der());
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![certified.cert.der().clone()], key.into())
            .unwrap();
        let config = Arc::new(config);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for tcp in listener.incoming().take(connections) {
                let mut tcp = tcp.unwrap();
                tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut tls = rustls::ServerConnection::new(config.clone()).unwrap();
                let mut stream = rustls::Stream::new(&mut tls, &mut tcp);
                let _ = std::io::Read::read_to_end(&mut stream, &mut Vec::new());
            }
        });
        (port, cert_pem)
    }

    /// For an https gateway the probe's success includes the TLS handshake: a certificate the
    /// facade does not trust makes the gateway unreachable, as it does for real requests.
    #[tokio::test]
    async fn the_probe_of_an_https_gateway_includes_the_tls_handshake() {
        let (port, cert_pem) = tls_server(2);
        let url = format!("https://localhost:{port}");
        let untrusting = GatewayClient::new(&GatewaySettings::new(url.clone())).unwrap();
        let refused = untrusting.probe().await.unwrap_err();
        assert!(matches!(refused, GatewayError::Connect(_)), "{refused:?}");
        let trusting = GatewayClient::new(&GatewaySettings {
            ca_bundle: Some(PemFile::from_pem("--gateway-ca-bundle", cert_pem)),
            ..GatewaySettings::new(url)
        })
        .unwrap();
        trusting.probe().await.unwrap();
    }

    #[test]
    fn only_connect_failures_and_gateway_unavailable_statuses_say_unreachable() {
        let evidence = |answer: Result<Answer, GatewayError>| {
            reachability_evidence(&answer).map(|e| e.is_ok())
        };
        let ok = wire::parse_answer(br#"{"message":"","retcode":"0"}"#);
        assert_eq!(evidence(ok), Some(true));
        let status = |status| Err(GatewayError::HttpStatus { status });
        assert_eq!(evidence(status(404)), Some(true));
        assert_eq!(evidence(status(503)), Some(false));
        assert_eq!(
            evidence(Err(GatewayError::Connect("refused".into()))),
            Some(false)
        );
        assert_eq!(evidence(Err(GatewayError::Transport("reset".into()))), None);
        assert_eq!(evidence(Err(GatewayError::Timeout(Duration::ZERO))), None);
        let busy = GatewayError::Busy(crate::gateway::BusyCause::QueueFull);
        assert_eq!(evidence(Err(busy)), None);
    }

    /// The small read buffer bounds an answer's head, not its body.
    #[tokio::test]
    async fn answers_bigger_than_the_read_buffer_are_read_but_not_heads() {
        let big_body = sign_in_at(&gateway_answering(3 * 1024, 20 * 1024).await).await;
        assert!(big_body.unwrap().is_ok());
        let big_head = sign_in_at(&gateway_answering(READ_BUFFER_BYTES, 10).await).await;
        assert!(
            matches!(&big_head, Err(GatewayError::Transport(e)) if e.contains("too large")),
            "{big_head:?}"
        );
    }
}
