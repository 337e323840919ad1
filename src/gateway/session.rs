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

/// One agent's session with the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub guid: Guid,
    pub cookies: Cookies,
}

/// agent id -> session. Updated by callers handing a session over, and by every `Set-GUID` /
/// `Set-Cookie` on a gateway answer (dynamic authentication rotates the Guid).
#[derive(Debug, Default)]
pub struct SessionRegistry {
    sessions: RwLock<HashMap<AgentId, Session>>,
}

impl SessionRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, agent: AgentId) -> Option<Session> {
        self.read().get(&agent).cloned()
    }

    /// Hands a session over. Cookies given replace the agent's; a different Guid without
    /// cookies is a new session, whose stickiness the old cookies would only get wrong.
    pub fn hand_over(&self, agent: AgentId, guid: Guid, cookies: Option<Cookies>) {
        let mut sessions = self.write();
        let cookies = match (cookies, sessions.get(&agent)) {
            (Some(cookies), _) => cookies,
            (None, Some(same)) if same.guid == guid => same.cookies.clone(),
            (None, _) => Cookies::default(),
        };
        sessions.insert(agent, Session { guid, cookies });
    }

    /// Applies a gateway answer's `Set-GUID` and `Set-Cookie` headers to an agent's session.
    /// Returns true when the Guid rotated.
    pub fn absorb(&self, agent: AgentId, set_guid: Option<Guid>, set_cookies: &[&str]) -> bool {
        if set_guid.is_none() && set_cookies.is_empty() {
            return false;
        }
        let mut sessions = self.write();
        let rotated;
        match (sessions.get_mut(&agent), set_guid) {
            (Some(session), guid) => {
                rotated = guid.as_ref().is_some_and(|g| *g != session.guid);
                if let Some(guid) = guid {
                    session.guid = guid;
                }
                for header in set_cookies {
                    session.cookies.apply_set_cookie(header);
                }
            }
            (None, Some(guid)) => {
                let mut cookies = Cookies::default();
                for header in set_cookies {
                    cookies.apply_set_cookie(header);
                }
                sessions.insert(agent, Session { guid, cookies });
                rotated = true;
            }
            (None, None) => rotated = false,
        }
        rotated
    }

    /// Drops the agent's session if it still holds `guid`: a "not signed in" answer to an old
    /// Guid must not discard one that rotated in meanwhile.
    pub fn forget_if_current(&self, agent: AgentId, guid: &Guid) -> bool {
        let mut sessions = self.write();
        if sessions.get(&agent).is_some_and(|s| s.guid == *guid) {
            sessions.remove(&agent);
            true
        } else {
            false
        }
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<AgentId, Session>> {
        // A panic elsewhere while holding the lock leaves the map itself intact.
        self.sessions.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<AgentId, Session>> {
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

    #[test]
    fn set_cookie_updates_and_rotation_is_detected() {
        let registry = SessionRegistry::new();
        let a = agent(101);
        registry.hand_over(a, Guid::parse("g", "one").unwrap(), None);
        assert!(!registry.absorb(a, Some(Guid::parse("g", "one").unwrap()), &[]));
        assert!(registry.absorb(
            a,
            Some(Guid::parse("g", "JSESSIONID=two").unwrap()),
            &["route=n1; Path=/; HttpOnly", "JSESSIONID=x; Path=/"]
        ));
        let session = registry.get(a).unwrap();
        assert_eq!(session.guid.expose(), "two");
        assert_eq!(
            session.cookies.header_value().as_deref(),
            Some("route=n1; JSESSIONID=x")
        );
        registry.absorb(a, None, &["route=n2"]);
        assert_eq!(
            registry.get(a).unwrap().cookies.header_value().as_deref(),
            Some("route=n2; JSESSIONID=x")
        );
    }

    #[test]
    fn forget_only_the_guid_that_failed() {
        let registry = SessionRegistry::new();
        let a = agent(101);
        let old = Guid::parse("g", "old").unwrap();
        registry.hand_over(a, old.clone(), None);
        registry.absorb(a, Some(Guid::parse("g", "new").unwrap()), &[]);
        assert!(!registry.forget_if_current(a, &old));
        assert!(registry.get(a).is_some());
        let new = registry.get(a).unwrap().guid;
        assert!(registry.forget_if_current(a, &new));
        assert!(registry.get(a).is_none());
    }
}
