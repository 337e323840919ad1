//! Gateway sessions: the Guid (a credential) and the load balancer's cookies, per agent.
use std::{collections::HashMap, fmt, sync::Mutex, time::Duration};

use tokio::time::Instant;

use crate::{
    domain::{AgentId, FieldViolation},
    lock,
};

/// The gateway's session token. Debug and Display never show it, so it cannot leak into logs,
/// error messages or metrics by accident; `expose` is the one way to read it.
#[derive(Clone, PartialEq, Eq)]
pub struct Guid(String);

impl Guid {
    pub const MAX_LEN: usize = 256;

    /// Accepts the bare Guid or the `JSESSIONID=<guid>` form of a `Set-GUID` header. The
    /// violation never repeats the value.
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, FieldViolation> {
        let raw = raw.trim();
        let value = raw.strip_prefix("JSESSIONID=").unwrap_or(raw);
        let ok = !value.is_empty()
            && value.len() <= Self::MAX_LEN
            && value
                .bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b';' | b',' | b'"' | b'\\'));
        if ok {
            Ok(Self(value.to_owned()))
        } else {
            Err(FieldViolation::new(
                field,
                format!(
                    "must be the gateway's Guid (1 to {} printable ASCII characters, optionally prefixed with JSESSIONID=)",
                    Self::MAX_LEN
                ),
            ))
        }
    }

    /// Reads a `Set-GUID: JSESSIONID=<guid>` header value; attributes after the first `;`
    /// (`Path=/; Secure`, as on a Set-Cookie) are not part of the Guid.
    pub fn from_set_guid(header: &str) -> Option<Self> {
        let value = header.split(';').next().unwrap_or_default();
        Self::parse("Set-GUID", value).ok()
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Guid(<redacted>)")
    }
}

/// Cookies the load balancer set (session stickiness), sent back on every later call. Values
/// are credentials too, so Debug shows names only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Cookies(Vec<(String, String)>);

impl Cookies {
    /// Longest `Cookie` header a session sends (and a caller may hand over).
    pub const MAX_HEADER_LEN: usize = 4096;
    /// Most cookies a session holds: a load balancer sets one or two.
    pub const MAX_COOKIES: usize = 16;

    /// Parses a `Cookie` request-header value: `name=value; name2=value2`.
    pub fn parse_header(field: &'static str, raw: &str) -> Result<Self, FieldViolation> {
        let invalid = || {
            FieldViolation::new(
                field,
                format!(
                    "must be a Cookie header value `name=value; name2=value2` of at most {} bytes and {} cookies",
                    Self::MAX_HEADER_LEN, Self::MAX_COOKIES
                ),
            )
        };
        if raw.len() > Self::MAX_HEADER_LEN {
            return Err(invalid());
        }
        let mut cookies = Self::default();
        for pair in raw.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = split_pair(pair).ok_or_else(invalid)?;
            let known = cookies.0.iter().any(|(n, _)| n == name);
            if !known && cookies.0.len() == Self::MAX_COOKIES {
                return Err(invalid());
            }
            cookies.set(name, value);
        }
        if cookies.0.is_empty() {
            return Err(invalid());
        }
        Ok(cookies)
    }

    /// Applies one `Set-Cookie` response header (attributes after the first `;` are ignored:
    /// the facade talks to one gateway, so Domain/Path scoping does not apply).
    pub fn apply_set_cookie(&mut self, header: &str) -> bool {
        let first = header.split(';').next().unwrap_or("").trim();
        match split_pair(first) {
            Some((name, value)) => self.set(name, value),
            None => false,
        }
    }

    /// Sets one cookie; false when nothing changed, or when it would take the session past
    /// `MAX_COOKIES` or `MAX_HEADER_LEN` (a misbehaving gateway must not grow it without bound).
    fn set(&mut self, name: &str, value: &str) -> bool {
        let len = self.header_len();
        let full = self.0.len() == Self::MAX_COOKIES;
        match self.0.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) if v == value => false,
            Some((_, v)) if len - v.len() + value.len() > Self::MAX_HEADER_LEN => false,
            Some((_, v)) => {
                *v = value.to_owned();
                true
            }
            None if full || len + 2 + name.len() + 1 + value.len() > Self::MAX_HEADER_LEN => false,
            None => {
                self.0.push((name.to_owned(), value.to_owned()));
                true
            }
        }
    }

    /// The length of `header_value()`.
    fn header_len(&self) -> usize {
        let pairs: usize = self.0.iter().map(|(n, v)| n.len() + 1 + v.len()).sum();
        pairs + 2 * self.0.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `Cookie` header to send, or None when there is nothing to send.
    pub fn header_value(&self) -> Option<String> {
        (!self.0.is_empty()).then(|| {
            self.0
                .iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join("; ")
        })
    }
}

fn split_pair(pair: &str) -> Option<(&str, &str)> {
    let (name, value) = pair.split_once('=')?;
    let name = name.trim();
    let token = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b';' | b',' | b'='))
    };
    let value = value.trim();
    (!name.is_empty() && token(name) && value.bytes().all(|b| b.is_ascii_graphic() && b != b';'))
        .then_some((name, value))
}

impl fmt::Debug for Cookies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(n, _)| n))
            .finish()
    }
}

/// What an accepted handover did to the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adoption {
    /// It is the agent's session now.
    Adopted,
    /// A session confirmed after the request began stays the agent's.
    Superseded,
    /// The registry holds `max_sessions` other agents.
    Full,
}

/// What a refused Guid did to the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It was not the agent's session (any more); nothing changed.
    NotCurrent,
    /// A session a watcher handed over is the agent's session now, to be tried next.
    CandidateNext,
    /// The agent has no session any more.
    Forgotten,
}

/// One agent's session with the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub guid: Guid,
    pub cookies: Cookies,
}

impl Session {
    /// Applies an answer's `Set-GUID` and `Set-Cookie` headers. True when the Guid changed.
    pub(super) fn absorb(&mut self, headers: SessionHeaders) -> bool {
        for header in &headers.set_cookies {
            self.cookies.apply_set_cookie(header);
        }
        match headers.set_guid {
            Some(new) if new != self.guid => {
                self.guid = new;
                true
            }
            _ => false,
        }
    }
}

/// The session headers of one gateway answer.
#[derive(Debug, Default)]
pub struct SessionHeaders {
    pub set_guid: Option<Guid>,
    pub set_cookies: Vec<String>,
}

impl SessionHeaders {
    pub fn is_empty(&self) -> bool {
        self.set_guid.is_none() && self.set_cookies.is_empty()
    }
}

/// Bounds on what callers can make the registry hold.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// Agents with a session; a new one beyond it is refused (idle ones are forgotten first).
    pub max_sessions: usize,
    /// A session nobody used (no release, no poll) for this long is forgotten.
    pub idle: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            max_sessions: 50_000,
            idle: Duration::from_secs(3600),
        }
    }
}

/// The registry holds `max_sessions` agents already, none of them idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the facade holds {0} agents' sessions, the most it allows")]
pub struct SessionsFull(pub usize);

/// agent id -> session: what the gateway issued (sign-in, `Set-GUID` rotation) or accepted.
///
/// Callers' handovers are safe by construction rather than by remembering old Guids: the
/// session the gateway last issued or accepted is always tried first, and a different
/// handed-over one only after the gateway refused that (a refusal changed nothing, so trying
/// another Guid is safe). A request's handover lives as long as the request and is kept only
/// when the gateway accepts it; a watcher's is parked as the agent's candidate, tried by the
/// poll loop only once the current session is refused. A caller holding an outdated Guid
/// (the sign-in one, say, rotated away long ago) therefore never displaces the live session.
#[derive(Debug, Default)]
pub struct SessionRegistry {
    sessions: Mutex<HashMap<AgentId, Entry>>,
    limits: SessionLimits,
}

#[derive(Debug)]
struct Entry {
    current: Session,
    /// The gateway issued `current` or carried out an operation with it.
    confirmed: bool,
    /// A different session a watcher handed over: tried once the gateway refuses `current`.
    candidate: Option<Session>,
    last_used: Instant,
}

impl Entry {
    fn new(current: Session, confirmed: bool, now: Instant) -> Self {
        Self {
            current,
            confirmed,
            candidate: None,
            last_used: now,
        }
    }
}

impl SessionRegistry {
    pub fn new(limits: SessionLimits) -> Self {
        Self {
            sessions: Mutex::default(),
            limits,
        }
    }

    /// The agent's session, for a request about to use it.
    pub fn get(&self, agent: AgentId) -> Option<Session> {
        let now = Instant::now();
        let mut sessions = lock(&self.sessions);
        let entry = sessions.get_mut(&agent)?;
        if now.duration_since(entry.last_used) >= self.limits.idle {
            sessions.remove(&agent);
            return None;
        }
        entry.last_used = now;
        Some(entry.current.clone())
    }

    /// A watcher hands a session over. With none held it becomes the agent's session (the poll
    /// loop's first answer confirms or refuses it); a different one from the session held is
    /// parked as the candidate, replacing an older candidate. Cookies of the Guid held replace
    /// its cookies only while the gateway has not accepted it: the gateway's word beats a
    /// caller's copy.
    pub fn offer(&self, agent: AgentId, offered: Session) -> Result<(), SessionsFull> {
        let now = Instant::now();
        let mut sessions = lock(&self.sessions);
        match sessions.get_mut(&agent) {
            Some(entry) if entry.current.guid == offered.guid => {
                if !entry.confirmed && !offered.cookies.is_empty() {
                    entry.current.cookies = offered.cookies;
                }
            }
            Some(entry) => entry.candidate = Some(offered),
            None => {
                self.make_room(&mut sessions, now)?;
                sessions.insert(agent, Entry::new(offered, false, now));
            }
        }
        Ok(())
    }

    /// Applies a gateway answer's session headers to the session the request was made with
    /// (`guid_used`); a sign-in's answer (`None`) starts a new session. Answers to a Guid the
    /// agent's session no longer holds change nothing. Returns true when a Guid rotated.
    pub fn absorb(
        &self,
        agent: AgentId,
        guid_used: Option<&Guid>,
        headers: SessionHeaders,
    ) -> bool {
        if headers.is_empty() {
            return false;
        }
        let now = Instant::now();
        let mut sessions = lock(&self.sessions);
        let Some(guid_used) = guid_used else {
            let Some(guid) = headers.set_guid else {
                return false;
            };
            let mut session = Session {
                guid,
                cookies: Cookies::default(),
            };
            session.absorb(SessionHeaders {
                set_guid: None,
                set_cookies: headers.set_cookies,
            });
            if self.make_room(&mut sessions, now).is_err() {
                tracing::warn!(%agent, "signed in, but the session registry is full; the session is not kept");
                return false;
            }
            sessions.insert(agent, Entry::new(session, true, now));
            return true;
        };
        let Some(entry) = sessions
            .get_mut(&agent)
            .filter(|e| e.current.guid == *guid_used)
        else {
            return false;
        };
        let rotated = entry.current.absorb(headers);
        // A Guid the gateway issued is one it accepts.
        entry.confirmed |= rotated;
        rotated
    }

    /// The gateway carried out an operation with `guid`: if it is the agent's session, it is
    /// settled.
    pub fn confirm(&self, agent: AgentId, guid: &Guid) {
        if let Some(entry) = lock(&self.sessions)
            .get_mut(&agent)
            .filter(|e| e.current.guid == *guid)
        {
            entry.confirmed = true;
        }
    }

    /// The gateway accepted a session a request handed over (`session`, with what its answer
    /// rotated): it becomes the agent's session, in place of `replacing` (the registry session
    /// the gateway refused before, if any), or of a session the gateway never accepted. A
    /// session confirmed meanwhile by someone else (a rotation, another handover) is newer
    /// than what this request saw, and stays.
    pub fn adopt(&self, agent: AgentId, session: Session, replacing: Option<&Guid>) -> Adoption {
        let now = Instant::now();
        let mut sessions = lock(&self.sessions);
        if let Some(entry) = sessions.get_mut(&agent) {
            let ours_to_replace = !entry.confirmed
                || replacing == Some(&entry.current.guid)
                || entry.current.guid == session.guid;
            if !ours_to_replace {
                return Adoption::Superseded;
            }
            if entry
                .candidate
                .as_ref()
                .is_some_and(|c| c.guid == session.guid)
            {
                entry.candidate = None;
            }
            entry.current = session;
            entry.confirmed = true;
            entry.last_used = now;
            return Adoption::Adopted;
        }
        if self.make_room(&mut sessions, now).is_err() {
            return Adoption::Full;
        }
        sessions.insert(agent, Entry::new(session, true, now));
        Adoption::Adopted
    }

    /// The gateway refused `guid`. If it is the agent's session (a refusal of an old Guid must
    /// not discard one that rotated in meanwhile), the candidate takes its place, or the agent
    /// is forgotten; a refused candidate is dropped.
    pub fn refused(&self, agent: AgentId, guid: &Guid) -> Refusal {
        let mut sessions = lock(&self.sessions);
        let Some(entry) = sessions.get_mut(&agent) else {
            return Refusal::NotCurrent;
        };
        if entry.current.guid != *guid {
            if entry.candidate.as_ref().is_some_and(|c| c.guid == *guid) {
                entry.candidate = None;
            }
            return Refusal::NotCurrent;
        }
        match entry.candidate.take() {
            Some(candidate) => {
                entry.current = candidate;
                entry.confirmed = false;
                Refusal::CandidateNext
            }
            None => {
                sessions.remove(&agent);
                Refusal::Forgotten
            }
        }
    }

    /// Agents with a session.
    pub fn len(&self) -> usize {
        lock(&self.sessions).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes room for one more agent: idle sessions are forgotten first; a session in use (a
    /// polled agent's is used every poll) never is.
    fn make_room(
        &self,
        sessions: &mut HashMap<AgentId, Entry>,
        now: Instant,
    ) -> Result<(), SessionsFull> {
        if sessions.len() < self.limits.max_sessions {
            return Ok(());
        }
        sessions.retain(|_, e| now.duration_since(e.last_used) < self.limits.idle);
        if sessions.len() < self.limits.max_sessions {
            Ok(())
        } else {
            Err(SessionsFull(self.limits.max_sessions))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(n: u32) -> AgentId {
        AgentId::parse("a", &n.to_string(), 999_999).unwrap()
    }

    #[test]
    fn guid_never_prints() {
        let guid = Guid::parse("g", "JSESSIONID=279fe21d-2caa.AgentGateway0").unwrap();
        assert_eq!(guid.expose(), "279fe21d-2caa.AgentGateway0");
        let session = Session {
            guid,
            cookies: Cookies::parse_header("c", "route=secret-node").unwrap(),
        };
        let shown = format!("{session:?}");
        assert!(!shown.contains("279fe21d"), "{shown}");
        assert!(!shown.contains("secret-node"), "{shown}");
    }

    /// Issue 7, point 5: a Set-GUID with attributes is read.
    #[test]
    fn set_guid_attributes_are_not_part_of_the_guid() {
        let guid =
            Guid::from_set_guid("JSESSIONID=279fe21d.AgentGateway0; Path=/; Secure").unwrap();
        assert_eq!(guid.expose(), "279fe21d.AgentGateway0");
        assert_eq!(
            Guid::from_set_guid(" JSESSIONID=abc ").unwrap().expose(),
            "abc"
        );
        for unreadable in ["", "; Path=/", "JSESSIONID=; Secure", "a b"] {
            assert!(Guid::from_set_guid(unreadable).is_none(), "{unreadable:?}");
        }
    }

    /// Issue 7, point 3: a handover's cookies are bounded in number and size, and so is what
    /// Set-Cookie can grow a session to.
    #[test]
    fn cookies_are_bounded() {
        let many = (0..=Cookies::MAX_COOKIES)
            .map(|n| format!("c{n}=v"))
            .collect::<Vec<_>>()
            .join("; ");
        assert!(Cookies::parse_header("c", &many).is_err());
        let mut cookies = Cookies::parse_header("c", "a=b").unwrap();
        for n in 0..100 {
            cookies.apply_set_cookie(&format!("n{n}={}; Path=/", "v".repeat(300)));
        }
        let header = cookies.header_value().unwrap();
        assert!(header.len() <= Cookies::MAX_HEADER_LEN, "{}", header.len());
        assert!(cookies.0.len() <= Cookies::MAX_COOKIES);
        assert_eq!(header.len(), cookies.header_len());
    }

    #[test]
    fn guid_rejects_header_breakers() {
        for bad in ["", "a b", "a\r\nb", "a;b", &"x".repeat(300), "JSESSIONID="] {
            assert!(Guid::parse("g", bad).is_err(), "{bad:?}");
        }
        let err = Guid::parse("g", "secret value").unwrap_err();
        assert!(!err.description.contains("secret"), "{}", err.description);
    }

    fn guid(g: &str) -> Guid {
        Guid::parse("g", g).unwrap()
    }

    fn session(g: &str) -> Session {
        Session {
            guid: guid(g),
            cookies: Cookies::default(),
        }
    }

    fn registry() -> SessionRegistry {
        SessionRegistry::new(SessionLimits::default())
    }

    fn headers(set_guid: Option<&str>, set_cookies: &[&str]) -> SessionHeaders {
        SessionHeaders {
            set_guid: set_guid.map(guid),
            set_cookies: set_cookies.iter().map(|c| (*c).to_owned()).collect(),
        }
    }

    #[test]
    fn set_cookie_updates_and_rotation_is_detected() {
        let registry = registry();
        let a = agent(101);
        registry.offer(a, session("one")).unwrap();
        assert!(!registry.absorb(a, Some(&guid("one")), headers(Some("one"), &[])));
        assert!(registry.absorb(
            a,
            Some(&guid("one")),
            headers(
                Some("JSESSIONID=two"),
                &["route=n1; Path=/; HttpOnly", "JSESSIONID=x; Path=/"]
            )
        ));
        let session = registry.get(a).unwrap();
        assert_eq!(session.guid.expose(), "two");
        assert_eq!(
            session.cookies.header_value().as_deref(),
            Some("route=n1; JSESSIONID=x")
        );
        registry.absorb(a, Some(&guid("two")), headers(None, &["route=n2"]));
        assert_eq!(
            registry.get(a).unwrap().cookies.header_value().as_deref(),
            Some("route=n2; JSESSIONID=x")
        );
        // An answer to a Guid the session no longer holds changes nothing.
        assert!(!registry.absorb(a, Some(&guid("one")), headers(Some("stale"), &["route=n9"])));
        assert_eq!(registry.get(a).unwrap().guid, guid("two"));
    }

    #[test]
    fn forget_only_the_guid_that_failed() {
        let registry = registry();
        let a = agent(101);
        registry.offer(a, session("old")).unwrap();
        registry.absorb(a, Some(&guid("old")), headers(Some("new"), &[]));
        assert_eq!(registry.refused(a, &guid("old")), Refusal::NotCurrent);
        assert!(registry.get(a).is_some());
        assert_eq!(registry.refused(a, &guid("new")), Refusal::Forgotten);
        assert!(registry.get(a).is_none());
    }

    /// Issue 7, point 2: an outdated handover never displaces the session the gateway gave; it
    /// is tried only once that one is refused.
    #[test]
    fn a_watchers_handover_waits_until_the_live_session_is_refused() {
        let registry = registry();
        let a = agent(101);
        registry.absorb(a, None, headers(Some("signed-in"), &["route=n1"]));
        registry.absorb(a, Some(&guid("signed-in")), headers(Some("rotated"), &[]));
        registry.offer(a, session("signed-in")).unwrap();
        let live = registry.get(a).unwrap();
        assert_eq!(live.guid, guid("rotated"));
        assert_eq!(live.cookies.header_value().as_deref(), Some("route=n1"));
        // A refusal of the live one brings the candidate in; its refusal ends the session.
        assert_eq!(
            registry.refused(a, &guid("rotated")),
            Refusal::CandidateNext
        );
        assert_eq!(registry.get(a).unwrap().guid, guid("signed-in"));
        assert_eq!(registry.refused(a, &guid("signed-in")), Refusal::Forgotten);
        assert!(registry.get(a).is_none());
    }

    #[test]
    fn a_refused_candidate_is_dropped_and_a_newer_one_replaces_it() {
        let registry = registry();
        let a = agent(101);
        registry.absorb(a, None, headers(Some("live"), &[]));
        registry.offer(a, session("first")).unwrap();
        registry.offer(a, session("second")).unwrap();
        assert_eq!(registry.refused(a, &guid("first")), Refusal::NotCurrent);
        assert_eq!(registry.refused(a, &guid("second")), Refusal::NotCurrent);
        assert_eq!(registry.refused(a, &guid("live")), Refusal::Forgotten);
    }

    #[test]
    fn an_adopted_session_replaces_the_live_one_and_its_cookies() {
        let registry = registry();
        let a = agent(101);
        registry.absorb(a, None, headers(Some("old"), &["route=n1"]));
        assert_eq!(
            registry.adopt(
                a,
                Session {
                    guid: guid("forcelogin"),
                    cookies: Cookies::parse_header("c", "route=n2").unwrap(),
                },
                Some(&guid("old")),
            ),
            Adoption::Adopted
        );
        let session = registry.get(a).unwrap();
        assert_eq!(session.guid, guid("forcelogin"));
        assert_eq!(session.cookies.header_value().as_deref(), Some("route=n2"));
        // An old poll's late answer cannot rotate the replaced session back in.
        registry.absorb(a, Some(&guid("old")), headers(Some("old-rotated"), &[]));
        assert_eq!(registry.get(a).unwrap().guid, guid("forcelogin"));
    }

    /// A request that saw the registry refused, then had its handover accepted, does not
    /// overwrite a session confirmed meanwhile.
    #[test]
    fn adoption_never_replaces_a_session_confirmed_meanwhile() {
        let registry = registry();
        let a = agent(101);
        registry.absorb(a, None, headers(Some("f1"), &[]));
        registry.absorb(a, Some(&guid("f1")), headers(Some("f2"), &[]));
        assert_eq!(
            registry.adopt(a, session("f1"), Some(&guid("g-refused"))),
            Adoption::Superseded
        );
        assert_eq!(registry.get(a).unwrap().guid, guid("f2"));
        // An unconfirmed one (a watcher's handover nobody proved yet) gives way.
        registry.offer(agent(102), session("junk")).unwrap();
        assert_eq!(
            registry.adopt(agent(102), session("good"), None),
            Adoption::Adopted
        );
    }

    #[test]
    fn a_callers_cookies_never_overwrite_a_confirmed_sessions() {
        let registry = registry();
        let a = agent(101);
        registry.absorb(a, None, headers(Some("g"), &["route=n1"]));
        let stale = Session {
            guid: guid("g"),
            cookies: Cookies::parse_header("c", "route=stale").unwrap(),
        };
        registry.offer(a, stale).unwrap();
        assert_eq!(
            registry.get(a).unwrap().cookies.header_value().as_deref(),
            Some("route=n1")
        );
    }

    /// Issue 7, point 3: the registry is bounded; idle sessions make room, used ones do not.
    #[tokio::test(start_paused = true)]
    async fn the_registry_is_bounded_and_forgets_idle_sessions() {
        let registry = SessionRegistry::new(SessionLimits {
            max_sessions: 2,
            idle: Duration::from_secs(600),
        });
        registry.offer(agent(101), session("a")).unwrap();
        registry.offer(agent(102), session("b")).unwrap();
        assert_eq!(
            registry.offer(agent(103), session("c")),
            Err(SessionsFull(2))
        );
        assert_eq!(
            registry.adopt(agent(103), session("c"), None),
            Adoption::Full
        );
        tokio::time::advance(Duration::from_secs(400)).await;
        registry.get(agent(101)).expect("still there");
        tokio::time::advance(Duration::from_secs(400)).await;
        // 102 went unused for 800 s: forgotten to make room; 101 was used 400 s ago.
        registry.offer(agent(103), session("c")).unwrap();
        assert!(registry.get(agent(102)).is_none());
        assert!(registry.get(agent(101)).is_some());
        tokio::time::advance(Duration::from_secs(600)).await;
        assert!(
            registry.get(agent(101)).is_none(),
            "idle for the whole idle time"
        );
        assert_eq!(registry.len(), 1);
    }
}
