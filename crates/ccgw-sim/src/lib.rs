//! A simulator of Huawei CC-Gateway's agent REST interface (`/agentgateway/resource/...`), with
//! an HTTP control API under `/sim` that drives calls and injects faults. It serves demos, tests
//! and benchmarks of gateway clients, this repository's facade among them, and shares no code
//! with that facade: a misreading of the wire format cannot then hide on both sides of a test.
//! It speaks HTTP/1.1, plain ([`Simulator::serve`]) or over TLS ([`Simulator::serve_tls`], with
//! [`tls::server_config`], optionally requiring client certificates), as a real gateway does
//! (HTTPS on port 8043 by default, the same port on the load balancer in front of a cluster).
//!
//! This page is the repository's account of the interface: first what a real gateway does, as far
//! as the simulator implements it (condensed from Huawei's public interface reference and
//! developer guide, and from what Huawei's demo clients send), then the choices the simulator
//! makes where that documentation is silent. Paths below are relative to
//! `/agentgateway/resource`.
//!
//! # The gateway's interface
//!
//! ## Envelope
//! - Every operation answers HTTP 200 with a JSON object `{"message", "retcode", "result"}`.
//!   `retcode` is a string: `"0"` is success, anything else a failure code (see
//!   [Retcodes](#retcodes)). A failed operation does not change the HTTP status; another status
//!   means something in front of or inside the gateway broke (load balancer, proxy, crash).
//! - Requests send `Content-Type: application/json; charset=UTF-8`, and every one except sign-in
//!   the session's Guid in a `Guid` header (header names are case-insensitive; Huawei's clients
//!   write `guid`).
//! - In a cluster the load balancer keeps an agent on one node with cookies it sets on the
//!   sign-in answer; clients send them back in `Cookie` on every later request.
//!
//! ## Sessions and the Guid
//! - Sign-in: `PUT /onlineagent/{agentid}` with a body such as
//!   `{"password": "...", "phonenum": "..."}`. The answer carries `Set-GUID: JSESSIONID=<guid>`;
//!   the Guid is what follows `JSESSIONID=` and looks like
//!   `279fe21d-2caa-4437-84c3-ab9e9dae20f5.AgentGateway0`. An agent signed in already gets
//!   `100-002`; `PUT /onlineagent/{agentid}/forcelogin` (same body) then takes the session over
//!   and answers with a Guid of its own.
//! - Sign-out: `DELETE /onlineagent/{agentid}/logout` does nothing while the agent is in a call;
//!   `DELETE /onlineagent/{agentid}/forcelogout` hangs the call up and signs out.
//! - Static authentication (`AUTHMODE=1`, older sites): the sign-in Guid is good for the whole
//!   session. Dynamic authentication (`AUTHMODE=2`, the default): the gateway replaces the Guid
//!   once it is `GUIDINTERVAL` old (60 s by default) and hands the new one out in `Set-GUID` on
//!   an answer of the event poll; the client must send the newest from then on. The
//!   documentation does not say how long the replaced Guid keeps working; `GUIDTIMEOUT` (120 s
//!   by default) is the bound the simulator takes.
//! - A Guid the gateway does not accept (wrong, replaced and expired, or of a session that is
//!   gone) answers `100-006` (agent not signed in) or `000-003` (no right to invoke).
//! - Polling is also the heartbeat: an agent nobody has polled for about two minutes is signed
//!   out. Each event goes to the one poll that takes it, so two pollers of one agent steal each
//!   other's events; one client has to own an agent's event stream.
//!
//! ## Long polling
//! - `GET /agentevent/{agentid}` (a `?calldata=` query may follow) with the Guid. The answer
//!   comes at once when an event is waiting, otherwise when one arrives or after about 10 s
//!   (100 checks 100 ms apart). Clients poll again at once after an event and a few hundred
//!   milliseconds after an empty answer, with an HTTP timeout longer than that wait.
//! - One event per answer:
//!   `{"message":"","retcode":"0","event":{"eventType":"...","workNo":"101","content":...}}`;
//!   newer gateways add `"eventGenTime"` (milliseconds since the epoch) inside `event`. With
//!   nothing to deliver the answer is exactly `{"message":"","retcode":"0"}`, with no `event`.
//! - An agent signed out by an inspector or for missed polls gets `100-006` on its next poll.
//! - Two alternatives exist, which the simulator does not implement: one poll for every agent's
//!   events (`GET /agentevent/allagentevent`, behind a gateway setting), and push mode, where a
//!   sign-in naming a `callBackUri` and a `serviceToken` has the gateway POST events to that
//!   callback and expects a handshake every 30 s instead of polls.
//!
//! ## Calls and release events
//! A two-party call that ends queues these events for the agent:
//!
//! | `eventType` | meaning | `content` |
//! |---|---|---|
//! | `AgentEvent_Call_Release` | the agent left the call | the call id as a JSON **string**, e.g. `"1456403549-15"` |
//! | `AgentEvent_Customer_Release` | the customer left the call | `{"callid": "1456404171-43", "number": "70093"}` |
//! | `AgentOther_PhoneRelease` | the agent's phone is on-hook | `{"phoneState": 3}` (the platform hung up) or `2` (the agent did) |
//! | `AgentState_Ready` | the agent is available again | `null` |
//!
//! A real gateway sends `AgentState_Work` instead of `AgentState_Ready` when wrap-up time
//! follows. Its documentation lists the events in the order of the table without promising that
//! order, so a client must not depend on it. Call ids are `<unix seconds>-<sequence>`. A call
//! is announced by events such as `AgentEvent_Ringing`, `AgentEvent_Auto_Answer` and
//! `AgentEvent_Talking`, whose content carries `caller`, `called`, `callid`, `type`, `feature`
//! and more. The same poll delivers many other event types (agent states, conferences, service
//! notices; the call id member is `callid` in some and `callId` in others), which a client must
//! read past: [`Simulator::queue_event`] feeds them.
//!
//! ## Release interfaces
//!
//! | operation | request | its own failure retcodes |
//! |---|---|---|
//! | hang up the agent's current call | `DELETE /voicecall/{agentid}/release` | `200-017` no call |
//! | the same, older gateways' path | `DELETE /voicecall/{agentid}` | `200-017` |
//! | hang up the call with this id | `POST /voicecall/{agentid}/dropcall/{callid}` | `200-025` no such call to drop |
//! | release the party with this number | `POST /voicecall/{agentid}/disconnect/{number}` | `200-023`, `200-024` the number cannot be released; `200-204` it is not in the call |
//!
//! None takes a body; success is `{"message":"success","retcode":"0","result":{}}`, and the
//! release events follow on the poll. Every one can also answer `100-006` and `100-007`. A
//! release hangs up whatever call is current when the gateway handles it: repeating one whose
//! answer was lost can hang up the agent's *next* call. A dropcall names its call and is safe to
//! repeat. `200-017` and `200-025` mean the call is gone already (Huawei's own demo client takes
//! `200-017` as success). Agent ids run from 101 to 59999 on older gateways and to 999999 on
//! newer ones.
//!
//! ## Retcodes
//! What the simulator answers, and when (a real gateway has many more):
//!
//! | retcode | meaning | the simulator answers it |
//! |---|---|---|
//! | `0` | success | |
//! | `000-001` | wrong way of obtaining events for this gateway | to a push-mode sign-in and to `allagentevent` |
//! | `000-002` | invalid parameter or URL | to an agent id that is not one (see below) |
//! | `000-003` | no right to invoke: the session may have expired | signed in, but the Guid is missing, unknown, replaced or expired |
//! | `100-001` | sign-in parameter empty or invalid | sign-in body not a JSON object, or without a password |
//! | `100-002` | agent already signed in | sign-in (not forcelogin) of a signed-in agent |
//! | `100-004` | wrong user name or password | only with [`SimConfig::password`] set |
//! | `100-006` | agent not signed in | never signed in, signed out, forced out, missed polls; a required sticky cookie missing |
//! | `100-010` | state error at sign-out | `logout` during a call |
//! | `200-017` | release: no call | |
//! | `200-023` | disconnect: the number cannot be released | the agent has no call |
//! | `200-025` | dropcall: no call can be dropped | the id is not the agent's current call |
//! | `200-204` | disconnect: the number is not in the call | the number is not the caller's |
//!
//! Others that a real gateway answers to these operations, the simulator only through the
//! `retcode` fault (below): `000-004` (the agent is being switched over to another site),
//! `000-007` (the same interface invoked again before its first answer), `100-007` (the
//! operation failed inside the gateway). Whole families exist for other interfaces (passwords,
//! queries, recording...); a client has to turn a retcode it does not know into an error that
//! still carries the code and its message.
//!
//! # Choices where the documentation is silent
//! - `result` is always `{}`; poll answers have no `result`. Answers are
//!   `application/json;charset=UTF-8`. Query strings are ignored.
//! - Agent ids must be canonical ASCII decimal (no sign, no leading zero) in
//!   `101..=max_agent_id`, otherwise `000-002`.
//! - **Guid rejection rule**: checks run in this order on every route but sign-in/forcelogin:
//!   agent not signed in (never, logged out, forced out, missed polls) → `100-006`; sticky cookie
//!   required but missing/stale → `100-006` (the request landed on a node without the session);
//!   signed in but the `Guid` header is missing, unknown, superseded or expired → `000-003`.
//!   Only the bare Guid is accepted (no `JSESSIONID=` prefix).
//! - Sign-in sets one sticky cookie, `ccgw_route=node<16 hex digits>; Path=/; HttpOnly`, new for
//!   every session; it is checked only with [`SimConfig::require_sticky_cookie`]. Any non-empty
//!   password signs in unless [`SimConfig::password`] names one. A missing or empty `phonenum`
//!   becomes the agent id (it is the `called` number of the agent's calls).
//! - A call placed through the control API queues `AgentEvent_Ringing` (content: `caller`,
//!   `called`, `callid`, `type`, `feature`, `mediaType`, `mediaAbility`, `transfer`,
//!   `transfrom`, the members Huawei documents for an answered call) then `AgentEvent_Talking`
//!   (`caller`, `called`, `callid`, `type`, `feature`, `mediaAbility`), every value a string.
//! - Dynamic auth: a poll *answer* rotates the Guid when it is `guid_interval` old or a rotation
//!   was requested (`Set-GUID: JSESSIONID=<new>`); the previous Guid stays valid for
//!   `guid_timeout` (strictly: a timeout of 0 rejects it at once). A successful poll that
//!   presents the still-valid previous Guid gets `Set-GUID` with the current one again, so a
//!   client that lost the rotating answer can catch up within `guid_timeout`. Other answers never
//!   rotate. Static auth never rotates; [`Simulator::rotate_guid`] is refused there.
//! - Release events: a release by the agent (`release`, the legacy path, `dropcall`,
//!   `disconnect`, `forcelogout`) queues `AgentEvent_Call_Release` first and `phoneState` 2; a
//!   customer hang-up ([`Simulator::customer_hangup`]) queues `AgentEvent_Customer_Release`
//!   first and `phoneState` 3; both end with `AgentState_Ready`. Every event the simulator makes
//!   carries `workNo` and, unless [`SimConfig::event_gen_time`] is off, `eventGenTime`.
//! - `logout` while in a call does nothing and answers `100-010`. `forcelogout` releases the call
//!   (queuing the release events) and signs out; the queue dies with the session, so nobody can
//!   poll those events afterwards (a poll waiting at that moment answers `100-006`).
//! - forcelogin replaces the session: new Guid, new sticky cookie, empty queue, no call; polls of
//!   the old session wake and answer `000-003`.
//! - Sign-in bodies carrying both `callBackUri` and `serviceToken` (push mode) answer `000-001`:
//!   the simulator only implements polling. `GET /agentevent/allagentevent` also answers `000-001`.
//! - `disconnect/{number}`: no call → `200-023`; number is not the caller → `200-204`; otherwise
//!   the call ends with the same events as `release`.
//! - Concurrent polls of one agent are all served, each taking its own event (so a client running
//!   two pollers sees them steal from each other); [`AgentView::max_polls_in_flight`] shows it.
//!   An agent's queue holds at most 10 000 events, dropping the oldest.
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
//!   the connection without writing anything, so the client gets no status line at all. A hyper
//!   client (reqwest's `send()` too) fails with hyper's `IncompleteMessage` ("connection closed
//!   before message completed"). Nothing was executed, so a retry is safe.
//! - `lose_answer`: the request IS executed as normal (a `release` really hangs up the call and
//!   queues the release events; a poll really dequeues its event and may rotate the Guid), then
//!   the answer is thrown away and the client sees exactly what `drop` gives: no status line,
//!   `send()` fails. This stages the release hazard above: a blind `release` retry after a lost
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
//! #                "polls_in_flight":1,"max_polls_in_flight":1,"polls_abandoned":0,
//! #                "longest_unpolled_ms":3}
//! # (polls_in_flight: polls waiting now; max_polls_in_flight: most at once since sign-in;
//! #  polls_abandoned: polls since sign-in whose client went away before the answer;
//! #  longest_unpolled_ms: longest wait since sign-in from a poll's answer to the next poll)
//! curl localhost:8043/sim/agents/101
//! # push a fault rule / clear all rules
//! curl -X POST localhost:8043/sim/faults -H 'content-type: application/json' \
//!      -d '{"fault":{"kind":"http_status","status":502},"count":2,"method":"DELETE","path_contains":"/voicecall/"}'
//! curl -X POST localhost:8043/sim/faults -H 'content-type: application/json' -d '{"fault":{"kind":"latency","ms":30000}}'
//! curl -X DELETE localhost:8043/sim/faults
//! # recorded gateway requests (seq, method, path, guid, cookie) / clear them
//! curl localhost:8043/sim/requests
//! curl -X DELETE localhost:8043/sim/requests
//! # -> {"agents_polled_twice":N,"longest_unpolled_ms":N,"oversized_bytes_sent":N,
//! #     "polls_abandoned":N,"polls_in_flight":N,"requests":N}
//! #    (agents_polled_twice: signed-in agents with two polls waiting at once since sign-in;
//! #     polls_abandoned: the signed-in agents' polls whose client went away first;
//! #     longest_unpolled_ms: the agents' longest, see the agent view; polls_in_flight: polls
//! #     waiting now, all agents; requests: gateway requests since start)
//! curl localhost:8043/sim/stats
//! ```
//! Errors: 400 `{"error":..}` for a bad agent id or body, 409 `{"error":..}` when the agent is not
//! signed in, busy, has no call, or the simulator runs static auth (rotate-guid).
//! `GET /sim/requests` keeps the latest 100 000 requests.

mod control;
mod faults;
mod gateway;
mod state;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use state::Shared;

/// How the gateway authenticates sessions (the gateway's `AUTHMODE` setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMode {
    /// `AUTHMODE=1`: the sign-in Guid stays valid for the whole session.
    Static,
    /// `AUTHMODE=2` (default): the Guid rotates on poll answers.
    #[default]
    Dynamic,
}

/// Simulator settings; `Default` gives a real gateway's defaults.
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
    /// W3C trace context (`traceparent` header), as sent.
    #[serde(default)]
    pub traceparent: Option<String>,
    /// W3C trace context (`tracestate` header), as sent.
    #[serde(default)]
    pub tracestate: Option<String>,
    /// The client's address: which connection the request came on.
    #[serde(default)]
    pub peer: Option<SocketAddr>,
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
    /// which steal each other's events.
    pub max_polls_in_flight: u32,
    /// Polls since sign-in whose client went away before their answer (closed the connection
    /// while the poll waited). A real gateway may not notice until it answers, and may hand
    /// such a poll an event meanwhile: a client that cuts its waiting polls can lose events,
    /// and, if it polls again elsewhere, is polling twice at the gateway.
    #[serde(default)]
    pub polls_abandoned: u32,
    /// Longest time since sign-in between a poll's answer and the agent's next poll (the wait
    /// going on now included), in milliseconds: how long its poller was away, e.g. while its
    /// polling moved to another replica. 0 until the first poll was answered.
    pub longest_unpolled_ms: u64,
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
        let router = self.router();
        self.run_until(shutdown, |stop| async move {
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        })
        .await
    }

    /// Like [`serve`](Self::serve), over HTTPS: every connection first completes a TLS
    /// handshake with `tls` (see [`tls::server_config`], which can require client
    /// certificates). A failed handshake is never recorded: no request got through.
    pub async fn serve_tls(
        self,
        listener: tokio::net::TcpListener,
        tls: Arc<rustls::ServerConfig>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let router = self.router();
        self.run_until(shutdown, |stop| {
            tls::accept_loop(listener, tls, router, stop)
        })
        .await
    }

    /// Runs `server` (its token cancelled when `shutdown` resolves) and the reaper; after
    /// `shutdown`, gives requests in flight a second.
    async fn run_until<F>(
        &self,
        shutdown: impl Future<Output = ()> + Send + 'static,
        server: impl FnOnce(CancellationToken) -> F,
    ) -> std::io::Result<()>
    where
        F: Future<Output = std::io::Result<()>>,
    {
        let reaper = tokio::spawn(state::reaper(self.shared.clone()));
        let stop = CancellationToken::new();
        tokio::spawn({
            let stop = stop.clone();
            async move {
                shutdown.await;
                stop.cancel();
            }
        });
        let result = tokio::select! {
            result = server(stop.clone()) => result,
            () = async {
                stop.cancelled().await;
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
