//! The gateway routes under `/agentgateway/resource`, answering as the crate documentation
//! describes.

use std::pin::pin;
use std::sync::{Arc, MutexGuard};

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::Router;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

use super::state::{Call, Credentials, QueuedEvent, Shared, State as SimState};

const PREFIX: &str = "/agentgateway/resource";

pub(crate) fn routes() -> Router<Arc<Shared>> {
    let r = |p: &str| format!("{PREFIX}{p}");
    Router::new()
        .route(&r("/onlineagent/{agentid}"), put(sign_in))
        .route(&r("/onlineagent/{agentid}/forcelogin"), put(force_login))
        .route(&r("/onlineagent/{agentid}/logout"), delete(logout))
        .route(
            &r("/onlineagent/{agentid}/forcelogout"),
            delete(force_logout),
        )
        .route(&r("/agentevent/allagentevent"), get(all_agent_events))
        .route(&r("/agentevent/{agentid}"), get(poll))
        .route(&r("/voicecall/{agentid}/release"), delete(release))
        .route(&r("/voicecall/{agentid}"), delete(release))
        .route(
            &r("/voicecall/{agentid}/dropcall/{callid}"),
            post(drop_call),
        )
        .route(
            &r("/voicecall/{agentid}/disconnect/{number}"),
            post(disconnect),
        )
}

/// Text the gateway puts in `message` for the codes the simulator answers.
fn message_for(retcode: &str) -> &'static str {
    match retcode {
        "0" => "success",
        "000-001" => "wrong event-obtaining method",
        "000-002" => "invalid parameter or URL",
        "000-003" => "no right to invoke the interface",
        "100-001" => "sign-in parameter empty or invalid",
        "100-002" => "agent already signed in",
        "100-004" => "wrong user name or password",
        "100-006" => "agent not signed in",
        "100-010" => "state error at sign-out",
        "200-017" => "no call to release",
        "200-023" => "the number cannot be released",
        "200-025" => "no call can be droped",
        "200-204" => "number not in the last call",
        _ => "",
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    message: &'a str,
    retcode: &'a str,
    result: Value,
}

pub(crate) fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    resp
}

/// HTTP 200 `{"message","retcode","result":{}}`.
pub(crate) fn envelope(retcode: &str, message: &str) -> Response {
    let body = Envelope {
        message,
        retcode,
        result: Value::Object(Default::default()),
    };
    json_response(
        StatusCode::OK,
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

fn code(retcode: &str) -> Response {
    envelope(retcode, message_for(retcode))
}

/// The `{agentid}` of a route's path (its other parameters are the handler's).
#[derive(Deserialize)]
struct AgentPath {
    agentid: String,
}

/// The agent a request to any route but sign-in acts for, past the check those routes all make
/// first: a valid agent id (else `000-002`), then the request's session (else the retcode
/// [`SimState::authorize`] refuses it with). A rejection is the gateway's answer with that
/// retcode, or the path's own rejection.
///
/// The state's lock is taken for the check and released; a handler locks again with
/// [`AgentSession::lock`]. The extractor cannot hand the guard over: a std `MutexGuard` is not
/// `Send`, an extractor's value lives in the handler's future, which axum needs `Send`, and
/// the poll's future keeps it across its long wait, which must not hold the lock.
struct AgentSession {
    sim: Arc<Shared>,
    id: u32,
    creds: Credentials,
}

impl FromRequestParts<Arc<Shared>> for AgentSession {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, sim: &Arc<Shared>) -> Result<Self, Response> {
        let Path(AgentPath { agentid }) = Path::from_request_parts(parts, sim)
            .await
            .map_err(IntoResponse::into_response)?;
        let id = sim
            .parse_agent_id(&agentid)
            .ok_or_else(|| code("000-002"))?;
        let (guid, cookie) = super::faults::session_headers(&parts.headers);
        let creds = Credentials { guid, cookie };
        sim.lock()
            .authorize(&sim.config, id, &creds, Instant::now())
            .map_err(|denied| code(denied.retcode()))?;
        Ok(Self {
            sim: sim.clone(),
            id,
            creds,
        })
    }
}

impl AgentSession {
    /// The state, locked for this agent's request, at the time the request acts.
    fn lock(&self) -> LockedAgent<'_> {
        LockedAgent {
            state: self.sim.lock(),
            sim: &self.sim,
            id: self.id,
            now: Instant::now(),
        }
    }
}

/// The locked state, seen from one agent's request: its session's call, and what the request
/// does to it.
struct LockedAgent<'a> {
    state: MutexGuard<'a, SimState>,
    sim: &'a Shared,
    id: u32,
    now: Instant,
}

impl LockedAgent<'_> {
    /// The agent's current call: `None` without a session or without a call.
    fn call(&mut self) -> Option<&Call> {
        self.state
            .session_mut(&self.sim.config, self.id, self.now)
            .and_then(|session| session.call.as_ref())
    }

    /// Ends the current call as the agent's hang-up; `None` when there is none.
    fn release_call(&mut self) -> Option<String> {
        self.state.release_call(&self.sim.config, self.id, self.now)
    }

    /// Signs the agent out (its polls wake up to find their session gone).
    fn sign_out(&mut self) {
        self.state.sign_out(self.id);
    }
}

async fn sign_in(
    State(sim): State<Arc<Shared>>,
    Path(agentid): Path<String>,
    body: Bytes,
) -> Response {
    do_sign_in(&sim, &agentid, &body, false)
}

async fn force_login(
    State(sim): State<Arc<Shared>>,
    Path(agentid): Path<String>,
    body: Bytes,
) -> Response {
    do_sign_in(&sim, &agentid, &body, true)
}

fn do_sign_in(sim: &Shared, raw_id: &str, body: &[u8], force: bool) -> Response {
    let Some(id) = sim.parse_agent_id(raw_id) else {
        return code("000-002");
    };
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
        return code("100-001");
    };
    let password = fields.get("password").and_then(Value::as_str).unwrap_or("");
    if password.is_empty() {
        return code("100-001");
    }
    if fields.contains_key("callBackUri") && fields.contains_key("serviceToken") {
        return envelope(
            "000-001",
            "event push mode is not supported by the simulator",
        );
    }
    if sim
        .config
        .password
        .as_deref()
        .is_some_and(|p| p != password)
    {
        return code("100-004");
    }
    let phonenum = match fields.get("phonenum") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => id.to_string(),
    };
    let created = sim
        .lock()
        .sign_in(&sim.config, id, phonenum, force, Instant::now());
    let Some(session) = created else {
        return code("100-002");
    };
    tracing::info!(agent = id, force, "sim: agent signed in");
    let mut resp = code("0");
    let headers = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("JSESSIONID={}", session.guid)) {
        headers.insert("set-guid", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("{}; Path=/; HttpOnly", session.cookie)) {
        headers.insert(header::SET_COOKIE, v);
    }
    resp
}

async fn logout(agent: AgentSession) -> Response {
    let mut st = agent.lock();
    if st.call().is_some() {
        return code("100-010");
    }
    st.sign_out();
    tracing::info!(agent = agent.id, "sim: agent signed out");
    code("0")
}

async fn force_logout(agent: AgentSession) -> Response {
    let mut st = agent.lock();
    st.release_call();
    st.sign_out();
    tracing::info!(agent = agent.id, "sim: agent force-signed out");
    code("0")
}

async fn release(agent: AgentSession) -> Response {
    match agent.lock().release_call() {
        Some(_) => code("0"),
        None => code("200-017"),
    }
}

async fn drop_call(Path((_, callid)): Path<(String, String)>, agent: AgentSession) -> Response {
    let mut st = agent.lock();
    let matches = st.call().is_some_and(|c| c.callid == callid);
    if !matches {
        return code("200-025");
    }
    st.release_call();
    code("0")
}

async fn disconnect(Path((_, number)): Path<(String, String)>, agent: AgentSession) -> Response {
    let mut st = agent.lock();
    let caller = st.call().map(|c| c.caller.clone());
    match caller {
        None => code("200-023"),
        Some(c) if c != number => code("200-204"),
        Some(_) => {
            st.release_call();
            code("0")
        }
    }
}

#[derive(Serialize)]
struct PollAnswer<'a> {
    message: &'a str,
    retcode: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<EventMember<'a>>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum EventMember<'a> {
    Gateway(EventBody<'a>),
    Raw(&'a Value),
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EventBody<'a> {
    event_type: &'a str,
    work_no: String,
    content: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_gen_time: Option<u64>,
}

/// Decrements the in-flight poll count however the poll ends: answered, or dropped unanswered
/// because its client went away (counted as abandoned).
struct InFlight<'a> {
    sim: &'a Shared,
    id: u32,
    session: u64,
    answered: bool,
}

impl InFlight<'_> {
    fn answer(&mut self, response: Response) -> Response {
        self.answered = true;
        response
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.sim
            .lock()
            .poll_finished(self.id, self.session, Instant::now(), !self.answered);
    }
}

/// All agents' events in one poll: needs GET_EVENT_MODE=2, and the simulator runs the per-agent
/// mode. (The router takes this path before `{agentid}`'s, whose check would answer 000-002.)
async fn all_agent_events() -> Response {
    code("000-001")
}

async fn poll(agent: AgentSession) -> Response {
    let AgentSession { sim, id, creds } = agent;
    let (notify, session) = {
        let mut st = sim.lock();
        let (Some(notify), Some(session)) = (
            st.notifier(id),
            st.poll_started(&sim.config, id, Instant::now()),
        ) else {
            return code("100-006");
        };
        (notify, session)
    };
    let mut in_flight = InFlight {
        sim: &sim,
        id,
        session,
        answered: false,
    };
    let deadline = Instant::now() + sim.config.poll_wait;
    loop {
        // Register for wake-ups before looking, so an event queued in between is not missed.
        let mut notified = pin!(notify.notified());
        notified.as_mut().enable();
        {
            let mut st = sim.lock();
            let now = Instant::now();
            let used = match st.authorize(&sim.config, id, &creds, now) {
                Ok(used) => used,
                Err(d) => return in_flight.answer(code(d.retcode())),
            };
            let event = st.pop_event(id);
            if event.is_some() || now >= deadline {
                let new_guid = st.guid_for_answer(&sim.config, id, used, now);
                drop(st);
                return in_flight.answer(poll_answer(&sim, id, event, new_guid));
            }
        }
        // Timing out just loops once more to answer (empty, or an event that raced in).
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

fn poll_answer(
    sim: &Shared,
    id: u32,
    event: Option<QueuedEvent>,
    new_guid: Option<String>,
) -> Response {
    let answer = PollAnswer {
        message: "",
        retcode: "0",
        event: event.as_ref().map(|e| match e {
            QueuedEvent::Gateway {
                event_type,
                content,
                gen_ms,
            } => EventMember::Gateway(EventBody {
                event_type,
                work_no: id.to_string(),
                content,
                event_gen_time: sim.config.event_gen_time.then_some(*gen_ms),
            }),
            QueuedEvent::Raw(event) => EventMember::Raw(event),
        }),
    };
    let mut resp = json_response(
        StatusCode::OK,
        serde_json::to_vec(&answer).unwrap_or_default(),
    );
    if let Some(guid) = new_guid {
        if let Ok(v) = HeaderValue::from_str(&format!("JSESSIONID={guid}")) {
            resp.headers_mut().insert("set-guid", v);
        }
    }
    resp
}
