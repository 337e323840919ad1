use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use reqwest::{header, Method, StatusCode};
use serde_json::json;
use tokio::time::Instant;

use super::{
    session::{Guid, Session, SessionHeaders},
    wire::{self, Answer},
    GatewayError,
};
use crate::domain::{AgentId, CallId};

/// Path prefix of the agent interface on every gateway.
const RESOURCE_PREFIX: &str = "/agentgateway/resource";
const CONTENT_TYPE_JSON: &str = "application/json; charset=UTF-8";
/// Below this budget a request would almost surely time out after it was sent, leaving its
/// outcome unknown; better not to send it at all.
const MIN_BUDGET: Duration = Duration::from_millis(20);

#[derive(Debug, Clone)]
pub(crate) struct GatewaySettings {
    /// `https://host:8043` (the `/agentgateway/resource` prefix is added when missing).
    pub(crate) base_url: String,
    /// Extra trust anchors (PEM) for the gateway's TLS certificate.
    pub(crate) ca_bundle_pem: Option<Vec<u8>>,
    pub(crate) connect_timeout: Duration,
    /// Largest answer body the facade reads; anything bigger is an error, not an allocation.
    pub(crate) max_answer_bytes: usize,
    /// Use `DELETE .../voicecall/{agentid}` (releaseEx) instead of `.../release`.
    pub(crate) legacy_release_path: bool,
}

impl GatewaySettings {
    #[cfg(test)]
    pub(crate) fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            ca_bundle_pem: None,
            connect_timeout: Duration::from_secs(3),
            max_answer_bytes: 64 * 1024,
            legacy_release_path: false,
        }
    }
}

/// An operation made in an agent's session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionOperation {
    /// `DELETE .../voicecall/{agentid}/release` (or the legacy path), or
    /// `POST .../voicecall/{agentid}/dropcall/{callid}`.
    Release(ReleaseTarget),
    /// One long poll, `GET .../agentevent/{agentid}`: the deadline must outlast the gateway's
    /// long-poll wait (about 10 s).
    PollEvents,
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
    #[error("gateway CA bundle: {0}")]
    CaBundle(String),
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
    http: reqwest::Client,
    base: Arc<str>,
    max_answer_bytes: usize,
    legacy_release_path: bool,
    unreadable_set_guid: Arc<AtomicU64>,
}

impl GatewayClient {
    pub(crate) fn new(settings: &GatewaySettings) -> Result<Self, SettingsError> {
        crate::install_crypto_provider();
        let base = normalize_base(&settings.base_url)?;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            // Load balancers drop idle connections, often after 60 s; a release sent on one
            // they just closed would fail with an unknown outcome. Retire idle ones sooner.
            .pool_idle_timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("ccgw-callcontrol/", env!("CARGO_PKG_VERSION")))
            .no_proxy();
        if let Some(pem) = &settings.ca_bundle_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| SettingsError::CaBundle(e.to_string()))?;
            if certs.is_empty() {
                return Err(SettingsError::CaBundle(
                    "no certificate in the bundle".into(),
                ));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| SettingsError::Client(describe(&e)))?;
        Ok(Self {
            http,
            base: base.into(),
            max_answer_bytes: settings.max_answer_bytes,
            legacy_release_path: settings.legacy_release_path,
            unreadable_set_guid: Arc::default(),
        })
    }

    pub fn stats(&self) -> GatewayStats {
        GatewayStats {
            unreadable_set_guid: self.unreadable_set_guid.load(Ordering::Relaxed),
        }
    }

    /// Sends `operation` for `agent` in `session`. Makes no decision about the session: the
    /// answer comes back with the session headers it carried.
    pub(crate) async fn send(
        &self,
        agent: AgentId,
        operation: &SessionOperation,
        session: &Session,
        deadline: Instant,
    ) -> Exchange {
        let (method, path) = match operation {
            SessionOperation::Release(ReleaseTarget::Current) if self.legacy_release_path => {
                (Method::DELETE, format!("/voicecall/{agent}"))
            }
            SessionOperation::Release(ReleaseTarget::Current) => {
                (Method::DELETE, format!("/voicecall/{agent}/release"))
            }
            SessionOperation::Release(ReleaseTarget::Call(call)) => {
                (Method::POST, format!("/voicecall/{agent}/dropcall/{call}"))
            }
            SessionOperation::PollEvents => (Method::GET, format!("/agentevent/{agent}")),
        };
        match self.request_in(method, &path, session) {
            Ok(request) => self.exchange(request, deadline).await,
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
        let path = if force {
            format!("/onlineagent/{agent}/forcelogin")
        } else {
            format!("/onlineagent/{agent}")
        };
        let request = self
            .http
            .put(format!("{}{path}", self.base))
            .header(header::CONTENT_TYPE, CONTENT_TYPE_JSON)
            .json(&json!({ "password": password, "phonenum": phone_number }));
        self.exchange(request, deadline).await
    }

    fn request_in(
        &self,
        method: Method,
        path: &str,
        session: &Session,
    ) -> Result<reqwest::RequestBuilder, GatewayError> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header(header::CONTENT_TYPE, CONTENT_TYPE_JSON)
            .header("Guid", sensitive(session.guid.expose())?);
        if let Some(cookie) = session.cookies.header_value() {
            request = request.header(header::COOKIE, sensitive(&cookie)?);
        }
        Ok(request)
    }

    /// Sends, takes the session headers as soon as they arrive (they count even when the body
    /// then fails), reads a bounded body and parses the envelope, all within `deadline`.
    async fn exchange(&self, request: reqwest::RequestBuilder, deadline: Instant) -> Exchange {
        let mut headers = SessionHeaders::default();
        let budget = deadline.saturating_duration_since(Instant::now());
        if budget < MIN_BUDGET {
            return Exchange {
                headers,
                answer: Err(GatewayError::DeadlineTooShort(budget)),
            };
        }
        let work = async {
            let response = request.send().await.map_err(classify_send_error)?;
            headers = self.session_headers(&response);
            let status = response.status();
            if status != StatusCode::OK {
                return Err(GatewayError::HttpStatus {
                    status: status.as_u16(),
                });
            }
            let body = wire::read_bounded(response, self.max_answer_bytes).await?;
            wire::parse_answer(&body)
        };
        let answer = tokio::time::timeout_at(deadline, work)
            .await
            .unwrap_or(Err(GatewayError::Timeout(budget)));
        Exchange { headers, answer }
    }

    fn session_headers(&self, response: &reqwest::Response) -> SessionHeaders {
        let headers = response.headers();
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

/// A header value marked sensitive, so hyper and any HTTP tracing redact it.
fn sensitive(value: &str) -> Result<header::HeaderValue, GatewayError> {
    let mut value = header::HeaderValue::from_str(value)
        .map_err(|_| GatewayError::Malformed("session value is not a valid header".into()))?;
    value.set_sensitive(true);
    Ok(value)
}

fn normalize_base(raw: &str) -> Result<String, SettingsError> {
    let url = reqwest::Url::parse(raw).map_err(|_| SettingsError::BadUrl(raw.into()))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(SettingsError::BadUrl(raw.into()));
    }
    let trimmed = url.as_str().trim_end_matches('/');
    Ok(if trimmed.ends_with(RESOURCE_PREFIX) {
        trimmed.to_owned()
    } else {
        format!("{trimmed}{RESOURCE_PREFIX}")
    })
}

/// Connect errors (refused, DNS, TLS handshake, connect timeout) happen before a byte of the
/// request is written; anything else may have reached the gateway.
fn classify_send_error(error: reqwest::Error) -> GatewayError {
    if error.is_connect() {
        GatewayError::Connect(describe(&error))
    } else {
        GatewayError::Transport(describe(&error))
    }
}

/// An error and its causes on one line, without the URL.
pub(crate) fn describe(error: &reqwest::Error) -> String {
    let mut text = String::new();
    let mut current: Option<&dyn std::error::Error> = Some(error);
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
    // reqwest puts the URL in its own message; the facade's callers need the cause, not our
    // gateway's address.
    match error.url() {
        Some(url) => text.replace(&format!(" for url ({url})"), ""),
        None => text,
    }
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
    }

    fn answer_with_set_guid(value: &str) -> reqwest::Response {
        tonic::codegen::http::Response::builder()
            .header("set-guid", value)
            .header(header::SET_COOKIE, "route=n1; Path=/")
            .body("")
            .unwrap()
            .into()
    }

    /// Issue 7, point 5: a Set-GUID with attributes is read; an unreadable one is counted (and
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
}
