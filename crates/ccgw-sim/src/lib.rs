//! CC-Gateway simulator: Huawei's agent REST interface (`/agentgateway/resource/...`) as
//! described in `ccgw-reference.md`, plus an HTTP control API under `/sim` to drive calls and
//! inject faults. A product feature for demos, tests and benchmarks; it speaks plain HTTP/1.1
//! (put a TLS terminator in front if a client insists on HTTPS).
//!
//! # Gateway behaviour (choices where the reference is silent)
//! - Every business outcome is HTTP 200 with `{"message","retcode","result"}` (`result` is `{}`);
//!   poll answers use the event shapes of the reference (`{"message":"","retcode":"0"}` when empty).
//! - Agent ids must be canonical ASCII decimal (no sign, no leading zero) in
//!   `101..=max_agent_id`, otherwise `000-002`.
//! - **Guid rejection rule**: checks run in this order on every route but sign-in/forcelogin:
//!   agent not signed in (never, logged out, forced out, missed polls) → `100-006`; sticky cookie
//!   required but missing/stale → `100-006` (the request landed on a node without the session);
//!   signed in but the `Guid` header is missing, unknown, superseded or expired → `000-003`.
//!   Only the bare Guid is accepted (no `JSESSIONID=` prefix).
//! - Dynamic auth: a poll *answer* rotates the Guid when it is `guid_interval` old or a rotation
//!   was requested (`Set-GUID: JSESSIONID=<new>`); the previous Guid stays valid for
//!   `guid_timeout` (strictly: a timeout of 0 rejects it at once). A successful poll that
//!   presents the still-valid previous Guid gets `Set-GUID` with the current one again, so a
//!   client that lost the rotating answer can catch up within `guid_timeout`. Static auth never
//!   rotates; [`Simulator::rotate_guid`] is refused there.
//! - `logout` while in a call does nothing and answers `100-010`. `forcelogout` releases the call
//!   (queuing the release events) and signs out; the queue dies with the session, so nobody can
//!   poll those events afterwards (a poll waiting at that moment answers `100-006`).
//! - forcelogin replaces the session: new Guid, new sticky cookie, empty queue, no call; polls of
//!   the old session wake and answer `000-003`.
//! - Sign-in bodies carrying both `callBackUri` and `serviceToken` (push mode) answer `000-001`:
//!   the simulator only implements polling. `GET /agentevent/allagentevent` also answers `000-001`.
//! - `disconnect/{number}`: no call → `200-023`; number is not the caller → `200-204`; otherwise
//!   the call ends with the same events as `release`.
//! - Missed polls: an agent with no poll answered or in progress for `signout_after` is signed
//!   out (checked lazily on each request and by the reaper that [`Simulator::serve`] runs).
//! - Response header names go out lower-case (`set-guid`); HTTP header names are
//!   case-insensitive and hyper does not preserve case here.
//!
//! # Faults
//! Rule JSON: `{"fault":{"kind":"drop"},"count":1,"method":"GET","path_contains":"/agentevent/"}`
//! (`count` defaults to 1, `method`/`path_contains` to any). Kinds: `latency {ms}`,
//! `retcode {retcode, message}`, `http_status {status}`, `malformed`, `drop`, `lose_answer`,
//! `oversized {bytes}`.
//! A [`FaultRule`] applies to the next `count` gateway requests matching `method`
//! (case-insensitive) and `path_contains` (substring of the full path). The request is recorded
//! but, except for `latency` and `lose_answer`, never reaches the gateway logic (state
//! untouched):
//! - `latency {ms}`: waits, then answers normally. If the client gives up first the request is
//!   never executed.
//! - `retcode {retcode, message}`: HTTP 200 envelope with that retcode.
//! - `http_status {status}`: that status with a small `text/html` body, like nginx/NSLB.
//! - `malformed`: HTTP 200, `application/json`, truncated JSON.
//! - `drop`: the answer is a 200 whose body stream fails before the first byte; hyper then closes
//!   the connection without writing anything, so the client gets no status line at all. With
//!   reqwest, `send()` fails with a request error whose source is hyper's `IncompleteMessage`
//!   ("connection closed before message completed"). Nothing was executed, so a retry is safe.
//! - `lose_answer`: the request IS executed as normal (a `release` really hangs up the call and
//!   queues the release events; a poll really dequeues its event and may rotate the Guid), then
//!   the answer is thrown away and the client sees exactly what `drop` gives: no status line,
//!   `send()` fails. This is the reference's hazard: a blind `release` retry after a lost
//!   answer can hang up the *next* call (or answer `200-017` when there is none).
//! - `oversized {bytes}`: HTTP 200, chunked (no `Content-Length`), a lazily generated JSON-ish
//!   body of exactly `bytes` bytes; the bytes actually pulled by the connection are counted in
//!   [`Simulator::oversized_bytes_sent`].
//!
//! # Control API (JSON, prefix `/sim`, never recorded, never faulted)
//! ```text
//! # place a call to signed-in idle agent 101 (caller optional) -> {"callid":"1712345678-1"}
//! curl -X POST localhost:8043/sim/agents/101/calls -H 'content-type: application/json' -d '{"caller":"70093"}'
//! # the customer hangs up -> {"callid":"..."}            (409 {"error":..} when no call)
//! curl -X POST localhost:8043/sim/agents/101/customer-hangup
//! # next poll answer carries Set-GUID -> {}
//! curl -X POST localhost:8043/sim/agents/101/rotate-guid
//! # sign the agent out like an inspector -> {}
//! curl -X POST localhost:8043/sim/agents/101/force-signout
//! # queue this JSON verbatim as the `event` of a later poll answer, in turn with the
//! # simulator's own events (no workNo/eventGenTime added; any JSON, malformed shapes too) -> {}
//! curl -X POST localhost:8043/sim/agents/101/events -H 'content-type: application/json' \
//!      -d '{"eventType":"AgentState_Work","workNo":"101","content":null}'
//! # agent view -> {"agent_id":"101","signed_in":true,"call_id":null,"queued_events":0,
//! #                "polls_in_flight":1,"max_polls_in_flight":1}
//! # (polls_in_flight: polls waiting now; max_polls_in_flight: most at once since sign-in)
//! curl localhost:8043/sim/agents/101
//! # push a fault rule / clear all rules
//! curl -X POST localhost:8043/sim/faults -H 'content-type: application/json' \
//!      -d '{"fault":{"kind":"http_status","status":502},"count":2,"method":"DELETE","path_contains":"/voicecall/"}'
//! curl -X POST localhost:8043/sim/faults -H 'content-type: application/json' -d '{"fault":{"kind":"latency","ms":30000}}'
//! curl -X DELETE localhost:8043/sim/faults
//! # recorded gateway requests (seq, method, path, guid, cookie) / clear them
//! curl localhost:8043/sim/requests
//! curl -X DELETE localhost:8043/sim/requests
//! # -> {"oversized_bytes_sent":N,"requests":N}  (requests: gateway requests received since start)
//! curl localhost:8043/sim/stats
//! ```
//! Errors: 400 `{"error":..}` for a bad agent id or body, 409 `{"error":..}` when the agent is not
//! signed in, busy, has no call, or the simulator runs static auth (rotate-guid).
//! `GET /sim/requests` keeps the latest 100 000 requests.

mod control;
mod faults;
mod gateway;
mod state;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use state::Shared;

/// How the gateway authenticates sessions (reference: `AUTHMODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMode {
    /// `AUTHMODE=1`: the sign-in Guid stays valid for the whole session.
    Static,
    /// `AUTHMODE=2` (default): the Guid rotates on poll answers.
    #[default]
    Dynamic,
}

/// Simulator settings; `Default` gives the reference's defaults.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub auth_mode: AuthMode,
    /// Rotate the Guid on a poll answer this long after it was issued (`GUIDINTERVAL`).
    pub guid_interval: Duration,
    /// How long the previous Guid stays valid after a rotation (`GUIDTIMEOUT`).
    pub guid_timeout: Duration,
    /// Long-poll wait when no event is queued.
    pub poll_wait: Duration,
    /// Sign the agent out after no poll for this long (`None`: never).
    pub signout_after: Option<Duration>,
    /// Highest valid agent id; ids are `101..=max_agent_id`.
    pub max_agent_id: u32,
    /// Requests without the sign-in's sticky cookie answer `100-006`.
    pub require_sticky_cookie: bool,
    /// `None`: any non-empty password signs in; `Some(p)`: other passwords answer `100-004`.
    pub password: Option<String>,
    /// Include `eventGenTime` (ms since the epoch) in events.
    pub event_gen_time: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            auth_mode: AuthMode::Dynamic,
            guid_interval: Duration::from_secs(60),
            guid_timeout: Duration::from_secs(120),
            poll_wait: Duration::from_secs(10),
            signout_after: Some(Duration::from_secs(120)),
            max_agent_id: 999_999,
            require_sticky_cookie: false,
            password: None,
            event_gen_time: true,
        }
    }
}

/// One gateway request as received (control requests under `/sim` are not recorded).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordedRequest {
    pub seq: u64,
    pub method: String,
    /// Full path including `/agentgateway/resource`, without the query.
    pub path: String,
    /// `Guid` header value.
    pub guid: Option<String>,
    /// `Cookie` header value (several headers joined with `; `).
    pub cookie: Option<String>,
}

fn one() -> u32 {
    1
}

/// Applies `fault` to the next `count` gateway requests matching `method` and `path_contains`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultRule {
    pub fault: Fault,
    #[serde(default = "one")]
    pub count: u32,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub path_contains: Option<String>,
}

impl FaultRule {
    /// A rule for the next single gateway request, whatever it is.
    pub fn once(fault: Fault) -> Self {
        Self {
            fault,
            count: 1,
            method: None,
            path_contains: None,
        }
    }
}

/// What goes wrong; see the module doc for what a client sees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// Wait, then answer normally (a big value = a hung gateway).
    Latency { ms: u64 },
    /// HTTP 200 envelope with that retcode; state untouched.
    Retcode {
        retcode: String,
        #[serde(default)]
        message: String,
    },
    /// That HTTP status with a small `text/html` body, like a load balancer.
    HttpStatus { status: u16 },
    /// HTTP 200 with a body that is not valid JSON.
    Malformed,
    /// The connection dies without a complete answer.
    Drop,
    /// The request is executed as normal, then the connection dies without a complete answer.
    LoseAnswer,
    /// HTTP 200 with a streamed, lazily generated body of that many bytes.
    Oversized { bytes: u64 },
}

/// Why a control operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    #[error("invalid agent id {0:?}")]
    BadAgentId(String),
    #[error("agent {0} is not signed in")]
    NotSignedIn(String),
    #[error("agent {0} has no call")]
    NoCall(String),
    #[error("agent {0} is already in a call")]
    Busy(String),
    #[error("the simulator runs static authentication; the Guid never rotates")]
    StaticAuth,
}

/// One agent as the simulator sees it (`GET /sim/agents/{id}`). Not signed in: no call and
/// all counts 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentView {
    pub agent_id: String,
    pub signed_in: bool,
    pub call_id: Option<String>,
    /// Events waiting for a poll.
    pub queued_events: usize,
    /// Polls of the current session being answered right now.
    pub polls_in_flight: u32,
    /// Most polls in flight at once since sign-in; above 1 means the client ran two pollers,
    /// which the reference says steal each other's events.
    pub max_polls_in_flight: u32,
}

/// The simulator; cheap to clone (shared state).
#[derive(Clone)]
pub struct Simulator {
    shared: Arc<Shared>,
}

impl Simulator {
    pub fn new(config: SimConfig) -> Self {
        Self {
            shared: Arc::new(Shared::new(config)),
        }
    }

    /// Gateway routes under `/agentgateway/resource` and the control API under `/sim`.
    pub fn router(&self) -> axum::Router {
        let gateway = gateway::routes();
        let control = control::routes();
        gateway
            .merge(control)
            .fallback(|| async { axum::http::StatusCode::NOT_FOUND })
            .layer(axum::middleware::from_fn_with_state(
                self.shared.clone(),
                faults::record_and_inject,
            ))
            .with_state(self.shared.clone())
    }

    /// Serves on the bound listener until `shutdown` resolves; also runs the missed-poll
    /// sign-out reaper. After `shutdown`, requests in flight get one second to finish (a
    /// `latency` fault can hang forever), then this returns.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let reaper = tokio::spawn(state::reaper(self.shared.clone()));
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = tx.send(true);
        });
        let mut graceful_rx = rx.clone();
        let server = axum::serve(listener, self.router()).with_graceful_shutdown(async move {
            let _ = graceful_rx.wait_for(|stop| *stop).await;
        });
        let mut grace_rx = rx;
        let result = tokio::select! {
            result = server => result,
            _ = async {
                let _ = grace_rx.wait_for(|stop| *stop).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            } => Ok(()),
        };
        reaper.abort();
        result
    }

    /// Rings agent `agent_id` from `caller` and connects: queues `AgentEvent_Ringing` then
    /// `AgentEvent_Talking`. Returns the call id.
    pub fn place_call(&self, agent_id: &str, caller: &str) -> Result<String, SimError> {
        self.shared.place_call(agent_id, caller)
    }

    /// The customer hangs up the agent's current call. Returns its call id.
    pub fn customer_hangup(&self, agent_id: &str) -> Result<String, SimError> {
        self.shared.customer_hangup(agent_id)
    }

    /// The agent's next poll answer carries `Set-GUID` with a new Guid.
    pub fn rotate_guid(&self, agent_id: &str) -> Result<(), SimError> {
        self.shared.rotate_guid(agent_id)
    }

    /// Signs the agent out like an inspector: its next request answers `100-006`.
    pub fn force_signout(&self, agent_id: &str) -> Result<(), SimError> {
        self.shared.force_signout(agent_id)
    }

    /// Queues `event` as is as the `event` member of a later poll answer (FIFO with the
    /// simulator's own events), so tests can feed a client other event types or malformed
    /// shapes: no `workNo` or `eventGenTime` is added.
    pub fn queue_event(&self, agent_id: &str, event: serde_json::Value) -> Result<(), SimError> {
        self.shared.queue_event(agent_id, event)
    }

    /// The agent's session as the control API shows it.
    pub fn agent(&self, agent_id: &str) -> Result<AgentView, SimError> {
        self.shared.agent_view(agent_id)
    }

    pub fn push_fault(&self, rule: FaultRule) {
        self.shared.lock().faults.push_rule(rule);
    }

    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// Every gateway (non-`/sim`) request received, in order (the latest 100 000).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.iter().cloned().collect()
    }

    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }

    /// Bytes of oversized fault bodies actually pulled by connections.
    pub fn oversized_bytes_sent(&self) -> u64 {
        self.shared.oversized_bytes.load(Ordering::Relaxed)
    }
}
