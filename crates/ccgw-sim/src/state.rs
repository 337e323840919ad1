//! Agent sessions, Guids, event queues and calls. One mutex guards everything: the simulator's
//! operations are tiny and never hold it across an await.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{AgentView, AuthMode, FaultRule, RecordedRequest, SimConfig, SimError};

/// Cap on one agent's queue: nobody polling must not grow memory without bound.
const MAX_QUEUED_EVENTS: usize = 10_000;
/// Cap on recorded requests (oldest dropped first) so long benchmarks stay bounded.
pub(crate) const MAX_RECORDED_REQUESTS: usize = 100_000;
/// Name of the sticky (load-balancer route) cookie set at sign-in.
pub(crate) const STICKY_COOKIE: &str = "ccgw_route";

pub(crate) struct Shared {
    pub config: SimConfig,
    state: Mutex<State>,
    pub oversized_bytes: AtomicU64,
}

#[derive(Default)]
pub(crate) struct State {
    agents: HashMap<u32, Agent>,
    call_seq: u64,
    session_seq: u64,
    pub faults: Faults,
    pub requests: VecDeque<RecordedRequest>,
    pub request_seq: u64,
}

#[derive(Default)]
struct Agent {
    /// Woken on every queued event and every session change, so long polls re-check.
    notify: Arc<Notify>,
    session: Option<Session>,
}

pub(crate) struct Session {
    id: u64,
    guid: String,
    guid_issued: Instant,
    /// The superseded Guid and when it stops being accepted.
    previous: Option<(String, Instant)>,
    rotate_requested: bool,
    last_poll: Instant,
    polls_in_flight: u32,
    /// High-water mark of `polls_in_flight` since sign-in: shows a client running two pollers.
    max_polls_in_flight: u32,
    /// Polls whose client went away before their answer, since sign-in.
    polls_abandoned: u32,
    /// When the last poll in flight was answered (none in flight since), once one was.
    unpolled_since: Option<Instant>,
    /// Longest wait since sign-in between a poll's answer and the agent's next poll.
    longest_unpolled: Duration,
    /// `name=value` of the sticky cookie handed out at sign-in.
    cookie: String,
    phonenum: String,
    events: VecDeque<QueuedEvent>,
    pub call: Option<Call>,
}

impl Session {
    /// [`Session::longest_unpolled`], counting the wait still going on at `now`.
    fn longest_unpolled_at(&self, now: Instant) -> Duration {
        let current = self
            .unpolled_since
            .map_or(Duration::ZERO, |since| now.duration_since(since));
        self.longest_unpolled.max(current)
    }
}

pub(crate) struct Call {
    pub callid: String,
    pub caller: String,
}

pub(crate) enum QueuedEvent {
    /// One of the simulator's own events; `workNo` and `eventGenTime` are added when answered.
    Gateway {
        event_type: &'static str,
        content: Value,
        gen_ms: u64,
    },
    /// Injected through [`Shared::queue_event`]: answered exactly as given, malformed or not.
    Raw(Value),
}

/// Why the gateway refuses a request's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Denied {
    /// `100-006`: not signed in, or the sticky cookie is missing (wrong node).
    NotSignedIn,
    /// `000-003`: signed in, but the Guid is missing, wrong or expired.
    NoRight,
}

impl Denied {
    pub fn retcode(self) -> &'static str {
        match self {
            Denied::NotSignedIn => "100-006",
            Denied::NoRight => "000-003",
        }
    }
}

/// Which Guid a request presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GuidUse {
    Current,
    Previous,
}

/// What a request carries to prove its session.
pub(crate) struct Credentials {
    pub guid: Option<String>,
    pub cookie: Option<String>,
}

/// A fresh sign-in: what goes into the response headers.
pub(crate) struct NewSession {
    pub guid: String,
    pub cookie: String,
}

impl Shared {
    pub fn new(config: SimConfig) -> Self {
        Self {
            config,
            state: Mutex::new(State::default()),
            oversized_bytes: AtomicU64::new(0),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Canonical decimal id in `101..=max_agent_id`.
    pub fn parse_agent_id(&self, raw: &str) -> Option<u32> {
        if raw.is_empty() || raw.len() > 10 || raw.starts_with('0') {
            return None;
        }
        if !raw.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let id: u32 = raw.parse().ok()?;
        (101..=self.config.max_agent_id).contains(&id).then_some(id)
    }

    fn agent_id(&self, raw: &str) -> Result<u32, SimError> {
        self.parse_agent_id(raw)
            .ok_or_else(|| SimError::BadAgentId(raw.to_owned()))
    }

    pub fn place_call(&self, raw: &str, caller: &str) -> Result<String, SimError> {
        let id = self.agent_id(raw)?;
        let mut st = self.lock();
        st.call_seq += 1;
        let callid = format!("{}-{}", unix_secs(), st.call_seq);
        let cfg = &self.config;
        let session = st
            .session_mut(cfg, id, Instant::now())
            .ok_or_else(|| SimError::NotSignedIn(raw.to_owned()))?;
        if session.call.is_some() {
            return Err(SimError::Busy(raw.to_owned()));
        }
        let called = session.phonenum.clone();
        // Field values are strings, as in Huawei's examples (feature 0 = inbound call).
        let ringing = json!({
            "caller": caller, "called": called, "callid": callid, "type": "main",
            "feature": "0", "mediaType": "5", "mediaAbility": "1",
            "transfer": "no", "transfrom": "",
        });
        let talking = json!({
            "caller": caller, "called": called, "callid": callid, "type": "main",
            "feature": "0", "mediaAbility": "1",
        });
        session.call = Some(Call {
            callid: callid.clone(),
            caller: caller.to_owned(),
        });
        session.push(cfg, "AgentEvent_Ringing", ringing);
        session.push(cfg, "AgentEvent_Talking", talking);
        st.wake(id);
        tracing::info!(agent = id, %callid, "sim: call placed");
        Ok(callid)
    }

    pub fn customer_hangup(&self, raw: &str) -> Result<String, SimError> {
        let id = self.agent_id(raw)?;
        let mut st = self.lock();
        let cfg = &self.config;
        let session = st
            .session_mut(cfg, id, Instant::now())
            .ok_or_else(|| SimError::NotSignedIn(raw.to_owned()))?;
        let call = session
            .call
            .take()
            .ok_or_else(|| SimError::NoCall(raw.to_owned()))?;
        session.push(
            cfg,
            "AgentEvent_Customer_Release",
            json!({"callid": call.callid, "number": call.caller}),
        );
        session.push(cfg, "AgentEvent_Call_Release", json!(call.callid));
        session.push(cfg, "AgentOther_PhoneRelease", json!({"phoneState": 3}));
        session.push(cfg, "AgentState_Ready", Value::Null);
        st.wake(id);
        tracing::info!(agent = id, callid = %call.callid, "sim: customer hung up");
        Ok(call.callid)
    }

    pub fn rotate_guid(&self, raw: &str) -> Result<(), SimError> {
        let id = self.agent_id(raw)?;
        if self.config.auth_mode == AuthMode::Static {
            return Err(SimError::StaticAuth);
        }
        let mut st = self.lock();
        let session = st
            .session_mut(&self.config, id, Instant::now())
            .ok_or_else(|| SimError::NotSignedIn(raw.to_owned()))?;
        session.rotate_requested = true;
        Ok(())
    }

    pub fn force_signout(&self, raw: &str) -> Result<(), SimError> {
        let id = self.agent_id(raw)?;
        let mut st = self.lock();
        if st.session_mut(&self.config, id, Instant::now()).is_none() {
            return Err(SimError::NotSignedIn(raw.to_owned()));
        }
        st.sign_out(id);
        tracing::info!(agent = id, "sim: agent forced out");
        Ok(())
    }

    pub fn queue_event(&self, raw: &str, event: Value) -> Result<(), SimError> {
        let id = self.agent_id(raw)?;
        let mut st = self.lock();
        let session = st
            .session_mut(&self.config, id, Instant::now())
            .ok_or_else(|| SimError::NotSignedIn(raw.to_owned()))?;
        session.enqueue(QueuedEvent::Raw(event));
        st.wake(id);
        Ok(())
    }

    pub fn agent_view(&self, raw: &str) -> Result<AgentView, SimError> {
        let id = self.agent_id(raw)?;
        let mut st = self.lock();
        let now = Instant::now();
        let session = st.session_mut(&self.config, id, now).map(|s| &*s);
        Ok(AgentView {
            agent_id: id.to_string(),
            signed_in: session.is_some(),
            call_id: session
                .and_then(|s| s.call.as_ref())
                .map(|c| c.callid.clone()),
            queued_events: session.map_or(0, |s| s.events.len()),
            polls_in_flight: session.map_or(0, |s| s.polls_in_flight),
            max_polls_in_flight: session.map_or(0, |s| s.max_polls_in_flight),
            polls_abandoned: session.map_or(0, |s| s.polls_abandoned),
            longest_unpolled_ms: session
                .map_or(0, |s| s.longest_unpolled_at(now).as_millis() as u64),
        })
    }
}

impl State {
    /// The signed-in agents' sessions.
    fn sessions(&self) -> impl Iterator<Item = &Session> {
        self.agents.values().filter_map(|a| a.session.as_ref())
    }

    /// Polls waiting at the gateway now, over every agent.
    pub fn polls_in_flight(&self) -> u64 {
        self.sessions().map(|s| u64::from(s.polls_in_flight)).sum()
    }

    /// Signed-in agents that had more than one poll waiting at once since their sign-in
    /// ([`AgentView::max_polls_in_flight`]).
    pub fn agents_polled_twice(&self) -> usize {
        self.sessions()
            .filter(|s| s.max_polls_in_flight > 1)
            .count()
    }

    /// Polls abandoned by their client, over every signed-in agent
    /// ([`AgentView::polls_abandoned`]).
    pub fn polls_abandoned(&self) -> u64 {
        self.sessions().map(|s| u64::from(s.polls_abandoned)).sum()
    }

    /// The longest any signed-in agent went unpolled ([`AgentView::longest_unpolled_ms`]).
    pub fn longest_unpolled(&self, now: Instant) -> Duration {
        self.sessions()
            .map(|s| s.longest_unpolled_at(now))
            .max()
            .unwrap_or_default()
    }

    /// The agent's live session, after signing it out if it missed its polls.
    pub fn session_mut(&mut self, cfg: &SimConfig, id: u32, now: Instant) -> Option<&mut Session> {
        self.expire_if_idle(cfg, id, now);
        self.agents.get_mut(&id)?.session.as_mut()
    }

    fn expire_if_idle(&mut self, cfg: &SimConfig, id: u32, now: Instant) {
        let Some(limit) = cfg.signout_after else {
            return;
        };
        let idle = self
            .agents
            .get(&id)
            .and_then(|a| a.session.as_ref())
            .is_some_and(|s| s.polls_in_flight == 0 && now.duration_since(s.last_poll) >= limit);
        if idle {
            tracing::info!(agent = id, "sim: agent signed out after missed polls");
            self.sign_out(id);
        }
    }

    /// Checks a request's session: signed in, sticky cookie (when required), then the Guid.
    pub fn authorize(
        &mut self,
        cfg: &SimConfig,
        id: u32,
        creds: &Credentials,
        now: Instant,
    ) -> Result<GuidUse, Denied> {
        let session = self.session_mut(cfg, id, now).ok_or(Denied::NotSignedIn)?;
        if cfg.require_sticky_cookie && !has_cookie(creds.cookie.as_deref(), &session.cookie) {
            return Err(Denied::NotSignedIn);
        }
        let guid = creds.guid.as_deref().ok_or(Denied::NoRight)?;
        if guid == session.guid {
            return Ok(GuidUse::Current);
        }
        match &session.previous {
            Some((prev, until)) if prev == guid && now < *until => Ok(GuidUse::Previous),
            _ => Err(Denied::NoRight),
        }
    }

    /// Creates (or, with `force`, replaces) the agent's session. `None`: already signed in.
    pub fn sign_in(
        &mut self,
        cfg: &SimConfig,
        id: u32,
        phonenum: String,
        force: bool,
        now: Instant,
    ) -> Option<NewSession> {
        if !force && self.session_mut(cfg, id, now).is_some() {
            return None;
        }
        self.session_seq += 1;
        let guid = new_guid();
        let cookie = format!("{STICKY_COOKIE}=node{:016x}", rand::random::<u64>());
        let session = Session {
            id: self.session_seq,
            guid: guid.clone(),
            guid_issued: now,
            previous: None,
            rotate_requested: false,
            last_poll: now,
            polls_in_flight: 0,
            max_polls_in_flight: 0,
            polls_abandoned: 0,
            unpolled_since: None,
            longest_unpolled: Duration::ZERO,
            cookie: cookie.clone(),
            phonenum,
            events: VecDeque::new(),
            call: None,
        };
        let agent = self.agents.entry(id).or_default();
        agent.session = Some(session);
        // Polls of a replaced session must wake up and notice their Guid is gone.
        agent.notify.notify_waiters();
        Some(NewSession { guid, cookie })
    }

    pub fn sign_out(&mut self, id: u32) {
        if let Some(agent) = self.agents.get_mut(&id) {
            agent.session = None;
            agent.notify.notify_waiters();
        }
    }

    pub fn wake(&self, id: u32) {
        if let Some(agent) = self.agents.get(&id) {
            agent.notify.notify_waiters();
        }
    }

    pub fn notifier(&self, id: u32) -> Option<Arc<Notify>> {
        self.agents.get(&id).map(|a| a.notify.clone())
    }

    /// Ends the current call as the agent's hang-up; `None` when there is none.
    pub fn release_call(&mut self, cfg: &SimConfig, id: u32, now: Instant) -> Option<String> {
        let session = self.session_mut(cfg, id, now)?;
        let call = session.call.take()?;
        session.push(cfg, "AgentEvent_Call_Release", json!(call.callid));
        session.push(
            cfg,
            "AgentEvent_Customer_Release",
            json!({"callid": call.callid, "number": call.caller}),
        );
        session.push(cfg, "AgentOther_PhoneRelease", json!({"phoneState": 2}));
        session.push(cfg, "AgentState_Ready", Value::Null);
        self.wake(id);
        tracing::info!(agent = id, callid = %call.callid, "sim: call released");
        Some(call.callid)
    }

    /// Marks a poll as started (it counts as the heartbeat while it waits). Returns the session
    /// id so the matching [`State::poll_finished`] only touches the same session.
    pub fn poll_started(&mut self, cfg: &SimConfig, id: u32, now: Instant) -> Option<u64> {
        let s = self.session_mut(cfg, id, now)?;
        s.last_poll = now;
        if let Some(since) = s.unpolled_since.take() {
            s.longest_unpolled = s.longest_unpolled.max(now.duration_since(since));
        }
        s.polls_in_flight += 1;
        s.max_polls_in_flight = s.max_polls_in_flight.max(s.polls_in_flight);
        Some(s.id)
    }

    /// A poll ended: answered, or `abandoned` by its client before the answer.
    pub fn poll_finished(&mut self, id: u32, session_id: u64, now: Instant, abandoned: bool) {
        if let Some(s) = self.agents.get_mut(&id).and_then(|a| a.session.as_mut()) {
            if s.id == session_id {
                s.polls_in_flight = s.polls_in_flight.saturating_sub(1);
                s.polls_abandoned += u32::from(abandoned);
                s.last_poll = now;
                if s.polls_in_flight == 0 {
                    s.unpolled_since = Some(now);
                }
            }
        }
    }

    /// Takes the oldest queued event of an authorized agent.
    pub fn pop_event(&mut self, id: u32) -> Option<QueuedEvent> {
        self.agents
            .get_mut(&id)?
            .session
            .as_mut()?
            .events
            .pop_front()
    }

    /// Called on a successful poll answer: rotates the Guid when due (dynamic mode). Returns the
    /// Guid to announce with `Set-GUID`, if any.
    pub fn guid_for_answer(
        &mut self,
        cfg: &SimConfig,
        id: u32,
        used: GuidUse,
        now: Instant,
    ) -> Option<String> {
        if cfg.auth_mode == AuthMode::Static {
            return None;
        }
        let s = self.agents.get_mut(&id)?.session.as_mut()?;
        if s.rotate_requested || now.duration_since(s.guid_issued) >= cfg.guid_interval {
            let old = std::mem::replace(&mut s.guid, new_guid());
            s.previous = Some((old, now + cfg.guid_timeout));
            s.guid_issued = now;
            s.rotate_requested = false;
            return Some(s.guid.clone());
        }
        (used == GuidUse::Previous).then(|| s.guid.clone())
    }

    /// Signs out every agent that missed its polls; returns how many.
    fn reap(&mut self, cfg: &SimConfig, now: Instant) -> usize {
        let ids: Vec<u32> = self.agents.keys().copied().collect();
        let mut n = 0;
        for id in ids {
            let before = self.agents[&id].session.is_some();
            self.expire_if_idle(cfg, id, now);
            if before && self.agents[&id].session.is_none() {
                n += 1;
            }
        }
        n
    }
}

impl Session {
    fn push(&mut self, cfg: &SimConfig, event_type: &'static str, content: Value) {
        let gen_ms = if cfg.event_gen_time { unix_millis() } else { 0 };
        self.enqueue(QueuedEvent::Gateway {
            event_type,
            content,
            gen_ms,
        });
    }

    fn enqueue(&mut self, event: QueuedEvent) {
        if self.events.len() >= MAX_QUEUED_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }
}

/// Signs out agents that missed their polls, so the effect shows without further requests.
pub(crate) async fn reaper(shared: Arc<Shared>) {
    let Some(limit) = shared.config.signout_after else {
        return;
    };
    let period = (limit / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        shared.lock().reap(&shared.config, Instant::now());
    }
}

/// `<uuid>.AgentGateway0`, the shape real gateways hand out.
fn new_guid() -> String {
    format!("{}.AgentGateway0", uuid::Uuid::new_v4())
}

fn has_cookie(header: Option<&str>, wanted: &str) -> bool {
    header.is_some_and(|h| h.split(';').any(|pair| pair.trim() == wanted))
}

fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

fn unix_secs() -> u64 {
    since_epoch().as_secs()
}

fn unix_millis() -> u64 {
    since_epoch().as_millis() as u64
}

/// Active fault rules, consumed in push order.
#[derive(Default)]
pub(crate) struct Faults {
    rules: Vec<FaultRule>,
}

impl Faults {
    pub fn push_rule(&mut self, rule: FaultRule) {
        if rule.count > 0 {
            self.rules.push(rule);
        }
    }

    pub fn clear(&mut self) {
        self.rules.clear();
    }

    /// The fault for this request, if a rule matches; uses up one of the rule's count.
    pub fn take(&mut self, method: &str, path: &str) -> Option<super::Fault> {
        let idx = self.rules.iter().position(|r| {
            r.method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(method))
                && r.path_contains.as_deref().is_none_or(|p| path.contains(p))
        })?;
        let rule = &mut self.rules[idx];
        rule.count -= 1;
        let fault = rule.fault.clone();
        if rule.count == 0 {
            self.rules.remove(idx);
        }
        Some(fault)
    }
}
