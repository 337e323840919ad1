//! agent id -> session: what the gateway issued or accepted, bounded by configuration.
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use super::store::{SessionStore, SharedSession, StoreCounters};
use crate::{
    domain::AgentId,
    gateway::{Cookies, Guid, Session, SessionHeaders},
    lock,
};

/// What an accepted handover did to the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Adoption {
    /// It is the agent's session now.
    Adopted,
    /// A session confirmed after the request began stays the agent's.
    Superseded,
    /// The registry holds `max_sessions` other agents.
    Full,
}

/// What a refused Guid did to the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// It was not the agent's session (any more); nothing changed.
    NotCurrent,
    /// A session a watcher handed over is the agent's session now, to be tried next.
    CandidateNext,
    /// The agent has no session any more.
    Forgotten,
}

/// What the store's copy of an entry did to the registry's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Installed {
    /// The registry holds it now (or, for a deletion, no longer holds the agent).
    Applied,
    /// The registry's entry is as new or newer; nothing changed.
    NotNewer,
    /// The registry holds `max_sessions` other agents, none idle; it is not kept.
    Full,
}

/// Bounds on what callers can make the registry hold.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionLimits {
    /// Agents with a session; a new one beyond it is refused (idle ones are forgotten first).
    pub(crate) max_sessions: usize,
    /// A session nobody used (no release, no poll) for this long is forgotten.
    pub(crate) idle: Duration,
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
///
/// With a [`SessionStore`] (replicas), the registry stays the one place that decides and the
/// local copy every request reads; each change goes to the store with the store revision the
/// entry was based on, and the store installs what other replicas wrote
/// ([`install`](Self::install)), newer revisions only. Idle expiry and the bound stay local:
/// forgetting a session locally writes nothing.
#[derive(Debug, Default)]
pub struct SessionRegistry {
    sessions: Mutex<HashMap<AgentId, Entry>>,
    limits: SessionLimits,
    /// `Set-GUID` rotations of a held session.
    rotations: AtomicU64,
    store: Option<Arc<dyn SessionStore>>,
    counters: Arc<StoreCounters>,
    /// Agents a poll loop waits to get a session for ([`arrival`](Self::arrival)): woken when
    /// one arrives. Taken after `sessions`, never before.
    awaited: Mutex<HashMap<AgentId, Arc<Notify>>>,
}

#[derive(Debug)]
struct Entry {
    current: Session,
    /// The gateway issued `current` or carried out an operation with it.
    confirmed: bool,
    /// A different session a watcher handed over: tried once the gateway refuses `current`.
    candidate: Option<Session>,
    last_used: Instant,
    /// The store revision this entry derives from; 0: one the store never held (always, alone).
    revision: u64,
}

impl Entry {
    fn new(current: Session, confirmed: bool, now: Instant) -> Self {
        Self {
            current,
            confirmed,
            candidate: None,
            last_used: now,
            revision: 0,
        }
    }

    fn shared(&self) -> SharedSession {
        SharedSession {
            current: self.current.clone(),
            confirmed: self.confirmed,
            candidate: self.candidate.clone(),
        }
    }
}

impl SessionRegistry {
    pub(crate) fn new(limits: SessionLimits) -> Self {
        Self {
            sessions: Mutex::default(),
            limits,
            rotations: AtomicU64::new(0),
            store: None,
            counters: Arc::default(),
            awaited: Mutex::default(),
        }
    }

    /// A registry whose changes go to `store`, counting into `counters` (which the store
    /// shares).
    pub(crate) fn with_store(
        limits: SessionLimits,
        store: Arc<dyn SessionStore>,
        counters: Arc<StoreCounters>,
    ) -> Self {
        Self {
            store: Some(store),
            counters,
            ..Self::new(limits)
        }
    }

    /// The agent's session, for a request about to use it.
    pub fn get(&self, agent: AgentId) -> Option<Session> {
        let now = Instant::now();
        let mut sessions = lock(&self.sessions);
        let entry = sessions.get_mut(&agent)?;
        // A session the replicas share may be in use on another replica: only the bound
        // (make_room) forgets it, not this replica's idleness.
        if entry.revision == 0 && now.duration_since(entry.last_used) >= self.limits.idle {
            sessions.remove(&agent);
            return None;
        }
        entry.last_used = now;
        Some(entry.current.clone())
    }

    /// Resolves once the agent has a session, at once if it has one now: for a poll loop whose
    /// agent's session is on its way (with replicas, a watcher's handover on another replica
    /// comes through the store, perhaps after the watcher's interest did). Unbounded: the
    /// caller bounds the wait.
    pub(crate) async fn arrival(&self, agent: AgentId) {
        let awaiting = Awaiting::register(self, agent);
        let arrived = awaiting.notify.notified();
        tokio::pin!(arrived);
        // Registered before looking, so a session arriving in between wakes it.
        arrived.as_mut().enable();
        if lock(&self.sessions).contains_key(&agent) {
            return;
        }
        arrived.await;
    }

    /// Wakes whoever waits for the agent's session, if it has one now. Called with `sessions`
    /// locked.
    fn tell_arrival(&self, sessions: &HashMap<AgentId, Entry>, agent: AgentId) {
        if !sessions.contains_key(&agent) {
            return;
        }
        if let Some(notify) = lock(&self.awaited).get(&agent) {
            notify.notify_waiters();
        }
    }

    /// A watcher hands a session over. With none held it becomes the agent's session (the poll
    /// loop's first answer confirms or refuses it); a different one from the session held is
    /// parked as the candidate, replacing an older candidate. Cookies of the Guid held replace
    /// its cookies only while the gateway has not accepted it: the gateway's word beats a
    /// caller's copy.
    pub fn offer(&self, agent: AgentId, offered: Session) -> Result<(), SessionsFull> {
        self.change(agent, |sessions, now| {
            match sessions.get_mut(&agent) {
                Some(entry) if entry.current.guid == offered.guid => {
                    if !entry.confirmed && !offered.cookies.is_empty() {
                        entry.current.cookies = offered.cookies;
                    }
                }
                Some(entry) => entry.candidate = Some(offered),
                None => {
                    self.make_room(sessions, now)?;
                    sessions.insert(agent, Entry::new(offered, false, now));
                }
            }
            Ok(())
        })
    }

    /// Applies a gateway answer's session headers to the session the request was made with
    /// (`guid_used`); a sign-in's answer (`None`) starts a new session. Answers to a Guid the
    /// agent's session no longer holds change nothing. Returns true when a Guid rotated.
    pub(crate) fn absorb(
        &self,
        agent: AgentId,
        guid_used: Option<&Guid>,
        headers: SessionHeaders,
    ) -> bool {
        if headers.is_empty() {
            return false;
        }
        self.change(agent, |sessions, now| {
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
                if self.make_room(sessions, now).is_err() {
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
            if rotated {
                self.rotations.fetch_add(1, Ordering::Relaxed);
            }
            rotated
        })
    }

    /// The gateway carried out an operation with `guid`: if it is the agent's session, it is
    /// settled.
    pub(crate) fn confirm(&self, agent: AgentId, guid: &Guid) {
        self.change(agent, |sessions, _| {
            if let Some(entry) = sessions.get_mut(&agent).filter(|e| e.current.guid == *guid) {
                entry.confirmed = true;
            }
        });
    }

    /// The gateway accepted a session a request handed over (`session`, with what its answer
    /// rotated): it becomes the agent's session, in place of `replacing` (the registry session
    /// the gateway refused before, if any), or of a session the gateway never accepted. A
    /// session confirmed meanwhile by someone else (a rotation, another handover) is newer
    /// than what this request saw, and stays.
    pub(crate) fn adopt(
        &self,
        agent: AgentId,
        session: Session,
        replacing: Option<&Guid>,
    ) -> Adoption {
        self.change(agent, |sessions, now| {
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
            if self.make_room(sessions, now).is_err() {
                return Adoption::Full;
            }
            sessions.insert(agent, Entry::new(session, true, now));
            Adoption::Adopted
        })
    }

    /// The gateway refused `guid`. If it is the agent's session (a refusal of an old Guid must
    /// not discard one that rotated in meanwhile), the candidate takes its place, or the agent
    /// is forgotten; a refused candidate is dropped.
    pub(crate) fn refused(&self, agent: AgentId, guid: &Guid) -> Refusal {
        self.change(agent, |sessions, _| {
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
        })
    }

    /// The store's copy of the agent's entry at `revision` (`None`: deleted there), written by
    /// another replica or read after a conflict. Applied only when newer than what the
    /// registry's entry derives from: revisions only grow, so an old copy arriving late never
    /// replaces a newer one. A deletion leaves alone an entry the store never held (revision
    /// 0): it is newer than what was deleted, and on its way to the store.
    pub(crate) fn install(
        &self,
        agent: AgentId,
        revision: u64,
        shared: Option<SharedSession>,
    ) -> Installed {
        let now = Instant::now();
        let mut sessions = lock(&self.sessions);
        let installed = self.install_locked(&mut sessions, agent, revision, shared, now);
        self.tell_arrival(&sessions, agent);
        installed
    }

    fn install_locked(
        &self,
        sessions: &mut HashMap<AgentId, Entry>,
        agent: AgentId,
        revision: u64,
        shared: Option<SharedSession>,
        now: Instant,
    ) -> Installed {
        match (sessions.get_mut(&agent), shared) {
            (Some(entry), _) if entry.revision >= revision => Installed::NotNewer,
            (Some(entry), Some(shared)) => {
                entry.current = shared.current;
                entry.confirmed = shared.confirmed;
                entry.candidate = shared.candidate;
                entry.revision = revision;
                entry.last_used = now;
                Installed::Applied
            }
            (Some(entry), None) if entry.revision == 0 => Installed::NotNewer,
            (Some(_), None) => {
                sessions.remove(&agent);
                Installed::Applied
            }
            (None, None) => Installed::NotNewer,
            (None, Some(shared)) => {
                if self.make_room(sessions, now).is_err() {
                    return Installed::Full;
                }
                let mut entry = Entry::new(shared.current, shared.confirmed, now);
                entry.candidate = shared.candidate;
                entry.revision = revision;
                sessions.insert(agent, entry);
                Installed::Applied
            }
        }
    }

    /// The store took a change of the agent's entry as `revision`: the entry (that change, or
    /// a later local one still on its way) derives from it now. Nobody wrote the agent between
    /// that change's base and `revision`, so nothing newer can have been installed meanwhile.
    pub(crate) fn written(&self, agent: AgentId, revision: u64) {
        if let Some(entry) = lock(&self.sessions).get_mut(&agent) {
            entry.revision = entry.revision.max(revision);
        }
    }

    /// The store revision the agent's entry derives from (0: none), if the registry holds it.
    pub fn revision(&self, agent: AgentId) -> Option<u64> {
        lock(&self.sessions).get(&agent).map(|e| e.revision)
    }

    /// Where the registry's changes go (`None`: alone). Tests drive a store through it.
    #[doc(hidden)]
    pub fn store(&self) -> Option<&dyn SessionStore> {
        self.store.as_deref()
    }

    /// How sharing the sessions goes (all zero alone).
    pub fn store_counters(&self) -> &StoreCounters {
        &self.counters
    }

    /// Agents with a session.
    pub fn len(&self) -> usize {
        lock(&self.sessions).len()
    }

    /// Guid rotations (`Set-GUID` on an answer in a held session) so far.
    pub fn guid_rotations(&self) -> u64 {
        self.rotations.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `change` on the map under the lock; with a store, hands it the agent's entry when
    /// `change` altered it, with the revision the entry was based on (a sign-in replacing the
    /// entry derives from the one it replaced).
    fn change<R>(
        &self,
        agent: AgentId,
        change: impl FnOnce(&mut HashMap<AgentId, Entry>, Instant) -> R,
    ) -> R {
        let now = Instant::now();
        let mut sessions = lock(&self.sessions);
        let Some(store) = &self.store else {
            let result = change(&mut sessions, now);
            self.tell_arrival(&sessions, agent);
            return result;
        };
        let before = sessions.get(&agent).map(|e| (e.revision, e.shared()));
        let result = change(&mut sessions, now);
        self.tell_arrival(&sessions, agent);
        let based_on = before.as_ref().map_or(0, |(revision, _)| *revision);
        let after = sessions.get_mut(&agent).map(|entry| {
            entry.revision = based_on;
            entry.shared()
        });
        if before.map(|(_, shared)| shared) != after {
            store.changed(agent, based_on, after);
        }
        result
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

/// One waiter's registration in [`SessionRegistry::arrival`]; the last one out removes the
/// agent's entry, so the map holds only agents somebody waits for.
struct Awaiting<'a> {
    registry: &'a SessionRegistry,
    agent: AgentId,
    notify: Arc<Notify>,
}

impl<'a> Awaiting<'a> {
    fn register(registry: &'a SessionRegistry, agent: AgentId) -> Self {
        let notify = lock(&registry.awaited).entry(agent).or_default().clone();
        Self {
            registry,
            agent,
            notify,
        }
    }
}

impl Drop for Awaiting<'_> {
    fn drop(&mut self) {
        let mut awaited = lock(&self.registry.awaited);
        // Clones are made under this lock only: the map's and this one mean nobody else waits.
        if Arc::strong_count(&self.notify) <= 2 {
            awaited.remove(&self.agent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(n: u32) -> AgentId {
        AgentId::parse("a", &n.to_string(), 999_999).unwrap()
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

    /// An outdated handover never displaces the session the gateway gave; it
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

    /// What the registry handed its store: (agent, based on, entry).
    #[derive(Debug, Default)]
    struct Recorder(Mutex<Vec<(AgentId, u64, Option<SharedSession>)>>);

    impl SessionStore for Recorder {
        fn changed(&self, agent: AgentId, based_on: u64, entry: Option<SharedSession>) {
            lock(&self.0).push((agent, based_on, entry));
        }
    }

    impl Recorder {
        /// (based on, current Guid) of each change so far, emptied.
        fn take(&self) -> Vec<(u64, Option<String>)> {
            std::mem::take(&mut *lock(&self.0))
                .into_iter()
                .map(|(_, based_on, e)| (based_on, e.map(|e| e.current.guid.expose().to_owned())))
                .collect()
        }
    }

    fn shared_registry(limits: SessionLimits) -> (SessionRegistry, Arc<Recorder>) {
        let recorder = Arc::new(Recorder::default());
        let registry = SessionRegistry::with_store(limits, recorder.clone(), Arc::default());
        (registry, recorder)
    }

    fn shared(g: &str) -> SharedSession {
        SharedSession {
            current: session(g),
            confirmed: true,
            candidate: None,
        }
    }

    /// Each change goes to the store with the revision its entry derived from; what changes
    /// nothing (a second confirmation, an answer to an old Guid) goes nowhere.
    #[test]
    fn changes_reach_the_store_with_the_revision_they_were_based_on() {
        let (registry, store) = shared_registry(SessionLimits::default());
        let a = agent(101);
        registry.absorb(a, None, headers(Some("g1"), &[]));
        assert_eq!(store.take(), [(0, Some("g1".to_owned()))]);
        registry.written(a, 3);
        assert_eq!(registry.revision(a), Some(3));
        registry.confirm(a, &guid("g1"));
        registry.absorb(a, Some(&guid("old")), headers(Some("g9"), &[]));
        assert_eq!(store.take(), []);
        registry.absorb(a, Some(&guid("g1")), headers(Some("g2"), &[]));
        // A second change before the store took the first is based on the same revision.
        registry.offer(a, session("handed")).unwrap();
        assert_eq!(
            store.take(),
            [(3, Some("g2".to_owned())), (3, Some("g2".to_owned()))]
        );
        registry.written(a, 5);
        // A write the store took late never moves the entry back.
        registry.written(a, 4);
        assert_eq!(registry.revision(a), Some(5));
        assert_eq!(registry.refused(a, &guid("g2")), Refusal::CandidateNext);
        assert_eq!(registry.refused(a, &guid("handed")), Refusal::Forgotten);
        assert_eq!(store.take(), [(5, Some("handed".to_owned())), (5, None)]);
        // Signed in again: a new entry, based on nothing.
        registry.absorb(a, None, headers(Some("g3"), &[]));
        assert_eq!(store.take(), [(0, Some("g3".to_owned()))]);
    }

    /// A sign-in that replaces the entry derives from it: its write must not be a create.
    #[test]
    fn a_sign_in_replacing_a_shared_entry_is_based_on_its_revision() {
        let (registry, store) = shared_registry(SessionLimits::default());
        let a = agent(101);
        assert_eq!(
            registry.install(a, 7, Some(shared("g1"))),
            Installed::Applied
        );
        registry.absorb(a, None, headers(Some("g2"), &[]));
        assert_eq!(store.take(), [(7, Some("g2".to_owned()))]);
    }

    /// Only newer revisions install, and installing hands nothing back to the store.
    #[test]
    fn only_newer_revisions_install() {
        let (registry, store) = shared_registry(SessionLimits::default());
        let a = agent(101);
        assert_eq!(
            registry.install(a, 5, Some(shared("g5"))),
            Installed::Applied
        );
        assert_eq!(
            registry.install(a, 4, Some(shared("g4"))),
            Installed::NotNewer
        );
        assert_eq!(
            registry.install(a, 5, Some(shared("gx"))),
            Installed::NotNewer
        );
        assert_eq!(registry.get(a).unwrap().guid, guid("g5"));
        assert_eq!(registry.revision(a), Some(5));
        assert_eq!(registry.install(a, 6, None), Installed::Applied);
        assert!(registry.get(a).is_none());
        assert_eq!(registry.install(a, 6, None), Installed::NotNewer);
        assert_eq!(store.take(), []);
    }

    /// A deletion says nothing about an entry the store never held (made here since, on its
    /// way to the store); a newer entry from the store replaces it.
    #[test]
    fn a_deletion_spares_an_entry_the_store_never_held() {
        let (registry, _store) = shared_registry(SessionLimits::default());
        let a = agent(101);
        registry.offer(a, session("fresh")).unwrap();
        assert_eq!(registry.install(a, 9, None), Installed::NotNewer);
        assert_eq!(registry.get(a).unwrap().guid, guid("fresh"));
        assert_eq!(
            registry.install(a, 9, Some(shared("g9"))),
            Installed::Applied
        );
        assert_eq!(registry.get(a).unwrap().guid, guid("g9"));
    }

    /// A shared session may be in use on another replica: this replica's idleness does not
    /// forget it; only the bound does, and forgetting writes nothing.
    #[tokio::test(start_paused = true)]
    async fn a_shared_session_is_forgotten_only_to_make_room() {
        let (registry, store) = shared_registry(SessionLimits {
            max_sessions: 2,
            idle: Duration::from_secs(600),
        });
        registry.install(agent(101), 5, Some(shared("shared")));
        registry.offer(agent(102), session("local")).unwrap();
        store.take();
        tokio::time::advance(Duration::from_secs(700)).await;
        assert!(registry.get(agent(102)).is_none(), "idle, never shared");
        assert!(registry.get(agent(101)).is_some(), "idle, but shared");
        tokio::time::advance(Duration::from_secs(700)).await;
        registry.offer(agent(103), session("c")).unwrap();
        registry.offer(agent(104), session("d")).unwrap();
        assert!(registry.get(agent(101)).is_none(), "made room for 104");
        assert_eq!(
            store.take(),
            [(0, Some("c".to_owned())), (0, Some("d".to_owned()))]
        );
        // Full of sessions in use: what another replica wrote is not kept here.
        assert_eq!(
            registry.install(agent(105), 1, Some(shared("e"))),
            Installed::Full
        );
    }

    /// A wait for an agent's session ends when one arrives, from a handover or from the store,
    /// and not for another agent's; nothing stays registered after it.
    #[tokio::test(start_paused = true)]
    async fn a_wait_for_a_session_ends_when_one_arrives() {
        let (registry, _store) = shared_registry(SessionLimits::default());
        let registry = Arc::new(registry);
        let waiting = |a: AgentId| {
            let registry = registry.clone();
            tokio::spawn(async move { registry.arrival(a).await })
        };
        let (handed, stored) = (waiting(agent(101)), waiting(agent(102)));
        tokio::task::yield_now().await;
        registry.offer(agent(103), session("other")).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!handed.is_finished() && !stored.is_finished());
        registry.offer(agent(101), session("handed")).unwrap();
        registry.install(agent(102), 4, Some(shared("stored")));
        tokio::time::timeout(Duration::from_secs(1), handed)
            .await
            .expect("the handover ends the wait")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(1), stored)
            .await
            .expect("the store's entry ends the wait")
            .unwrap();
        // Held already: at once.
        tokio::time::timeout(Duration::ZERO, registry.arrival(agent(101)))
            .await
            .unwrap();
        assert!(lock(&registry.awaited).is_empty());
    }

    /// The registry is bounded; idle sessions make room, used ones do not.
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
