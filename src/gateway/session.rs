//! Gateway sessions: the Guid (a credential) and the load balancer's cookies, per agent.
use std::{collections::HashMap, fmt, sync::RwLock};

use crate::domain::{AgentId, FieldViolation};

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

    /// Reads a `Set-GUID: JSESSIONID=<guid>` header value.
    pub fn from_set_guid(header: &str) -> Option<Self> {
        Self::parse("Set-GUID", header).ok()
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
    pub const MAX_HEADER_LEN: usize = 4096;

    /// Parses a `Cookie` request-header value: `name=value; name2=value2`.
    pub fn parse_header(field: &'static str, raw: &str) -> Result<Self, FieldViolation> {
        let invalid = || {
            FieldViolation::new(
                field,
                format!(
                    "must be a Cookie header value `name=value; name2=value2` of at most {} bytes",
                    Self::MAX_HEADER_LEN
                ),
            )
        };
        if raw.len() > Self::MAX_HEADER_LEN {
            return Err(invalid());
        }
        let mut cookies = Self::default();
        for pair in raw.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = split_pair(pair).ok_or_else(invalid)?;
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

    fn set(&mut self, name: &str, value: &str) -> bool {
        match self.0.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) if v == value => false,
            Some((_, v)) => {
                *v = value.to_owned();
                true
            }
            None => {
                self.0.push((name.to_owned(), value.to_owned()));
                true
            }
        }
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

/// What a refused Guid did to the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The agent's session had moved on already; nothing changed.
    NotCurrent,
    /// It was a handover; the session it replaced is back.
    RestoredPrevious,
    /// The agent has no session any more.
    Forgotten,
}

/// One agent's session with the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub guid: Guid,
    pub cookies: Cookies,
}

/// agent id -> session. Updated by callers handing a session over, and by every `Set-GUID` /
/// `Set-Cookie` on a gateway answer (dynamic authentication rotates the Guid).
///
/// A handed-over Guid that differs from the one held is tentative until the gateway accepts
/// it: if the gateway refuses it, the registry goes back to the session it replaced. Without
/// that, one caller with an outdated Guid would end the session (and every event stream) of the
/// agent for everybody. For the same reason a handover of a Guid the gateway has since rotated
/// away is ignored: the old Guid may still be accepted for a while (GUIDTIMEOUT), but the newer
/// one is the session.
#[derive(Debug, Default)]
pub struct SessionRegistry {
    sessions: RwLock<HashMap<AgentId, Entry>>,
}

/// How many rotated-away Guids an agent's entry remembers.
const ROTATED_AWAY: usize = 4;

#[derive(Debug)]
struct Entry {
    current: Session,
    /// The session `current` replaced by a handover, until the gateway accepts `current`.
    fallback: Option<Session>,
    /// Guids the gateway replaced with a newer one (Set-GUID), newest last.
    rotated_away: Vec<Guid>,
}

impl Entry {
    fn new(current: Session) -> Self {
        Self {
            current,
            fallback: None,
            rotated_away: Vec::new(),
        }
    }

    /// The session a request made with `guid` belongs to, if it is one of this entry's.
    fn session_of(&mut self, guid: &Guid) -> Option<&mut Session> {
        if self.current.guid == *guid {
            return Some(&mut self.current);
        }
        self.fallback.as_mut().filter(|f| f.guid == *guid)
    }

    fn rotated(&mut self, old: Guid) {
        if self.rotated_away.len() == ROTATED_AWAY {
            self.rotated_away.remove(0);
        }
        self.rotated_away.push(old);
    }
}

/// What a handover did to the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handover {
    /// The Guid is the agent's session now (tentatively, if it replaced another).
    Taken,
    /// The gateway has rotated this Guid away already; the newer session stays.
    Outdated,
}

impl SessionRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, agent: AgentId) -> Option<Session> {
        self.read().get(&agent).map(|e| e.current.clone())
    }

    /// Hands a session over. Cookies given replace the session's; a different Guid without
    /// cookies is a new session, whose stickiness the old cookies would only get wrong.
    pub fn hand_over(&self, agent: AgentId, guid: Guid, cookies: Option<Cookies>) -> Handover {
        let mut sessions = self.write();
        let Some(entry) = sessions.get_mut(&agent) else {
            let cookies = cookies.unwrap_or_default();
            sessions.insert(agent, Entry::new(Session { guid, cookies }));
            return Handover::Taken;
        };
        if entry.rotated_away.contains(&guid) {
            return Handover::Outdated;
        }
        if entry.current.guid == guid {
            if let Some(cookies) = cookies {
                entry.current.cookies = cookies;
            }
            return Handover::Taken;
        }
        let handed = match entry.fallback.take() {
            // Back to the session the last handover replaced, cookies and all.
            Some(mut previous) if previous.guid == guid => {
                if let Some(cookies) = cookies {
                    previous.cookies = cookies;
                }
                previous
            }
            // Fall back to the last session not itself waiting for the gateway's word.
            fallback => {
                entry.fallback = Some(fallback.unwrap_or_else(|| entry.current.clone()));
                Session {
                    guid,
                    cookies: cookies.unwrap_or_default(),
                }
            }
        };
        entry.current = handed;
        Handover::Taken
    }

    /// Applies a gateway answer's `Set-GUID` and `Set-Cookie` headers to the session the request
    /// was made with (`guid_used`; `None` for a sign-in, whose answer starts a new session).
    /// Answers to a Guid the agent's session no longer holds change nothing. A new Guid for the
    /// current session settles any handover. Returns true when a Guid rotated.
    pub fn absorb(
        &self,
        agent: AgentId,
        guid_used: Option<&Guid>,
        set_guid: Option<Guid>,
        set_cookies: &[&str],
    ) -> bool {
        if set_guid.is_none() && set_cookies.is_empty() {
            return false;
        }
        let mut sessions = self.write();
        let Some(guid_used) = guid_used else {
            let Some(guid) = set_guid else {
                return false;
            };
            let mut cookies = Cookies::default();
            for header in set_cookies {
                cookies.apply_set_cookie(header);
            }
            sessions.insert(agent, Entry::new(Session { guid, cookies }));
            return true;
        };
        let Some(entry) = sessions.get_mut(&agent) else {
            return false;
        };
        let was_current = entry.current.guid == *guid_used;
        let Some(session) = entry.session_of(guid_used) else {
            return false;
        };
        for header in set_cookies {
            session.cookies.apply_set_cookie(header);
        }
        let Some(new) = set_guid.filter(|g| *g != session.guid) else {
            return false;
        };
        let old = std::mem::replace(&mut session.guid, new);
        entry.rotated(old);
        if was_current {
            entry.fallback = None;
        }
        true
    }

    /// The gateway accepted `guid` (it carried out an operation with it): a handover of it is
    /// settled.
    pub fn confirm(&self, agent: AgentId, guid: &Guid) {
        let pending = |e: &Entry| e.current.guid == *guid && e.fallback.is_some();
        if self.read().get(&agent).is_some_and(pending) {
            if let Some(entry) = self.write().get_mut(&agent).filter(|e| pending(e)) {
                entry.fallback = None;
            }
        }
    }

    /// The gateway refused `guid`. If it is the agent's current Guid (a refusal of an old Guid
    /// must not discard one that rotated in meanwhile), the registry goes back to the session a
    /// handover replaced, or forgets the agent; a refused fallback is dropped. Returns what
    /// happened.
    pub fn refused(&self, agent: AgentId, guid: &Guid) -> Refusal {
        let mut sessions = self.write();
        let Some(entry) = sessions.get_mut(&agent) else {
            return Refusal::NotCurrent;
        };
        if entry.current.guid != *guid {
            if entry.fallback.as_ref().is_some_and(|f| f.guid == *guid) {
                entry.fallback = None;
            }
            return Refusal::NotCurrent;
        }
        match entry.fallback.take() {
            Some(previous) => {
                entry.current = previous;
                Refusal::RestoredPrevious
            }
            None => {
                sessions.remove(&agent);
                Refusal::Forgotten
            }
        }
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<AgentId, Entry>> {
        // A panic elsewhere while holding the lock leaves the map itself intact.
        self.sessions.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<AgentId, Entry>> {
        self.sessions.write().unwrap_or_else(|e| e.into_inner())
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

    #[test]
    fn set_cookie_updates_and_rotation_is_detected() {
        let registry = SessionRegistry::new();
        let a = agent(101);
        registry.hand_over(a, guid("one"), None);
        assert!(!registry.absorb(a, Some(&guid("one")), Some(guid("one")), &[]));
        assert!(registry.absorb(
            a,
            Some(&guid("one")),
            Some(guid("JSESSIONID=two")),
            &["route=n1; Path=/; HttpOnly", "JSESSIONID=x; Path=/"]
        ));
        let session = registry.get(a).unwrap();
        assert_eq!(session.guid.expose(), "two");
        assert_eq!(
            session.cookies.header_value().as_deref(),
            Some("route=n1; JSESSIONID=x")
        );
        registry.absorb(a, Some(&guid("two")), None, &["route=n2"]);
        assert_eq!(
            registry.get(a).unwrap().cookies.header_value().as_deref(),
            Some("route=n2; JSESSIONID=x")
        );
        // An answer to a Guid the session no longer holds changes nothing.
        assert!(!registry.absorb(a, Some(&guid("one")), Some(guid("stale")), &["route=n9"]));
        assert_eq!(registry.get(a).unwrap().guid, guid("two"));
    }

    #[test]
    fn forget_only_the_guid_that_failed() {
        let registry = SessionRegistry::new();
        let a = agent(101);
        registry.hand_over(a, guid("old"), None);
        registry.absorb(a, Some(&guid("old")), Some(guid("new")), &[]);
        assert_eq!(registry.refused(a, &guid("old")), Refusal::NotCurrent);
        assert!(registry.get(a).is_some());
        assert_eq!(registry.refused(a, &guid("new")), Refusal::Forgotten);
        assert!(registry.get(a).is_none());
    }

    #[test]
    fn a_refused_handover_brings_back_the_session_it_replaced() {
        let registry = SessionRegistry::new();
        let a = agent(101);
        registry.absorb(a, None, Some(guid("learned")), &["route=n1"]);
        // Two stale handovers in a row: the fallback stays the session the gateway gave.
        registry.hand_over(a, guid("stale1"), None);
        registry.hand_over(a, guid("stale2"), None);
        assert_eq!(registry.get(a).unwrap().guid, guid("stale2"));
        assert_eq!(
            registry.refused(a, &guid("stale2")),
            Refusal::RestoredPrevious
        );
        let back = registry.get(a).unwrap();
        assert_eq!(back.guid, guid("learned"));
        assert_eq!(back.cookies.header_value().as_deref(), Some("route=n1"));
        assert_eq!(registry.refused(a, &guid("learned")), Refusal::Forgotten);
    }

    #[test]
    fn an_accepted_handover_is_final() {
        let registry = SessionRegistry::new();
        let a = agent(101);
        registry.hand_over(a, guid("first"), None);
        registry.hand_over(a, guid("second"), None);
        registry.confirm(a, &guid("second"));
        assert_eq!(registry.refused(a, &guid("second")), Refusal::Forgotten);

        // A rotation of the current session settles a handover too.
        registry.hand_over(a, guid("third"), None);
        registry.hand_over(a, guid("fourth"), None);
        registry.absorb(a, Some(&guid("fourth")), Some(guid("rotated")), &[]);
        assert_eq!(registry.refused(a, &guid("rotated")), Refusal::Forgotten);
    }

    #[test]
    fn a_handover_of_a_rotated_away_guid_keeps_the_newer_session() {
        let registry = SessionRegistry::new();
        let a = agent(101);
        registry.absorb(a, None, Some(guid("signed-in")), &["route=n1"]);
        registry.absorb(a, Some(&guid("signed-in")), Some(guid("rotated")), &[]);
        assert_eq!(
            registry.hand_over(a, guid("signed-in"), None),
            Handover::Outdated
        );
        let session = registry.get(a).unwrap();
        assert_eq!(session.guid, guid("rotated"));
        assert_eq!(session.cookies.header_value().as_deref(), Some("route=n1"));
    }

    #[test]
    fn answers_to_the_replaced_session_stay_with_it() {
        let registry = SessionRegistry::new();
        let a = agent(101);
        registry.absorb(a, None, Some(guid("old")), &["route=n1"]);
        // A new sign-in elsewhere is handed over; an old poll's answer then rotates the old
        // session: the new one stays current, with its cookies.
        registry.hand_over(
            a,
            guid("new"),
            Some(Cookies::parse_header("c", "route=n2").unwrap()),
        );
        registry.absorb(a, Some(&guid("old")), Some(guid("old-rotated")), &[]);
        let session = registry.get(a).unwrap();
        assert_eq!(session.guid, guid("new"));
        assert_eq!(session.cookies.header_value().as_deref(), Some("route=n2"));
        // Should the new one be refused, the old session comes back as rotated.
        assert_eq!(registry.refused(a, &guid("new")), Refusal::RestoredPrevious);
        let back = registry.get(a).unwrap();
        assert_eq!(back.guid, guid("old-rotated"));
        assert_eq!(back.cookies.header_value().as_deref(), Some("route=n1"));
    }

    #[test]
    fn handing_the_replaced_guid_back_restores_its_cookies() {
        let registry = SessionRegistry::new();
        let a = agent(101);
        registry.absorb(a, None, Some(guid("learned")), &["route=n1"]);
        registry.hand_over(a, guid("other"), None);
        registry.hand_over(a, guid("learned"), None);
        let session = registry.get(a).unwrap();
        assert_eq!(session.guid, guid("learned"));
        assert_eq!(session.cookies.header_value().as_deref(), Some("route=n1"));
    }
}
