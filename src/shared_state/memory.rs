//! State kept in this process's memory and shared by several facades (replicas) in it: what
//! the replicas share through NATS JetStream, without a server, so that multi-replica
//! behaviour (one poller per agent, resuming on another replica, request ids across replicas,
//! takeovers, a replica cut off) is tested fast.
//!
//! [`SharedMemory`] is the store (the NATS server and its buckets and stream); each facade built
//! on it is one *member* (`SharedMemory::member`), with its own session registry, its own
//! poll ownership and its own follower of the one event log, as a replica has. Members are
//! numbered in the order they were made. [`SharedMemory::cut_off`] takes a member out of reach
//! of the store as a network partition takes a replica away from NATS: its writes wait, it sees
//! nothing the others write, and its link reads unreachable.
//!
//! Each part keeps the semantics the NATS one gives the rooms (see `sessions`, `ownership`,
//! `event_log`); request ids are one `AnswerCache` the members share, refused
//! (`Claim::Unavailable`) to a member cut off.
mod event_log;
mod ownership;
mod sessions;

use std::{sync::Arc, time::Duration};

use futures_util::future::BoxFuture;
use tokio::sync::watch;

use super::{Link, SharedState};
use crate::{
    domain::AgentId,
    events::{shard_of, EventSettings, LeaseSettings},
    lifecycle::Lifecycle,
    lock,
    release::{AnswerCache, AnswerKey, Claim, ClaimTerms, ReleaseCommand, RequestIds},
    sessions::SessionLimits,
};

/// The state several facades in one process share. Cheap to clone; every clone is the same
/// store.
#[derive(Clone, Debug)]
pub struct SharedMemory {
    store: Arc<Store>,
}

#[derive(Debug)]
struct Store {
    sessions: sessions::Bucket,
    leases: Arc<ownership::Leases>,
    log: Arc<event_log::Log>,
    request_ids: Arc<AnswerCache>,
    /// Every member made, in order.
    members: std::sync::Mutex<Vec<MemberInfo>>,
}

#[derive(Debug, Clone)]
struct MemberInfo {
    id: Arc<str>,
    link: Arc<MemberLink>,
}

impl SharedMemory {
    /// A store with these poll leases, the event retention of `events`, and request ids
    /// remembered for `idempotency_window`, at most `idempotency_capacity` of them (each
    /// member's session limits are its own).
    pub(crate) fn new(
        leases: LeaseSettings,
        events: &EventSettings,
        idempotency_window: Duration,
        idempotency_capacity: usize,
    ) -> Self {
        Self {
            store: Arc::new(Store {
                sessions: sessions::Bucket::default(),
                leases: Arc::new(ownership::Leases::new(leases)),
                log: Arc::new(event_log::Log::new(events)),
                request_ids: Arc::new(AnswerCache::new(idempotency_window, idempotency_capacity)),
                members: std::sync::Mutex::default(),
            }),
        }
    }

    /// A new member's shared state: its sessions within `session_limits`, its tasks in
    /// `lifecycle` (ended by its shutdown, when it hands its leases back).
    pub(crate) fn member(
        &self,
        session_limits: SessionLimits,
        lifecycle: &Lifecycle,
    ) -> SharedState {
        let id: Arc<str> = uuid::Uuid::new_v4().simple().to_string().into();
        let link = Arc::new(MemberLink::default());
        lock(&self.store.members).push(MemberInfo {
            id: id.clone(),
            link: link.clone(),
        });
        let store = &self.store;
        let sessions = store
            .sessions
            .member(id.clone(), link.clone(), session_limits, lifecycle);
        let ownership =
            ownership::MemberOwnership::start(store.leases.clone(), id, link.clone(), lifecycle);
        let log = event_log::MemberLog::open(store.log.clone(), link.clone(), lifecycle);
        let request_ids = MemberRequestIds {
            cache: store.request_ids.clone(),
            link: link.clone(),
        };
        SharedState::new(
            sessions,
            ownership,
            Arc::new(log),
            Arc::new(request_ids),
            link,
        )
    }

    /// Members made so far.
    pub fn members(&self) -> usize {
        lock(&self.store.members).len()
    }

    /// Member `member`'s id, as the shards' spread ([`crate::events::desired_owner`]) names it.
    pub fn member_id(&self, member: usize) -> String {
        lock(&self.store.members)[member].id.to_string()
    }

    /// Cuts member `member` off from the store (`true`) or brings it back (`false`).
    pub fn cut_off(&self, member: usize, cut: bool) {
        let link = lock(&self.store.members)[member].link.clone();
        link.connected.send_replace(!cut);
    }

    /// The member whose lease of `agent`'s shard the store holds now, if any.
    pub fn poller_of(&self, agent: AgentId) -> Option<usize> {
        let holder = self.store.leases.holder(shard_of(agent))?;
        lock(&self.store.members)
            .iter()
            .position(|member| member.id == holder)
    }
}

/// One member's way to the store: reachable until cut off.
#[derive(Debug)]
struct MemberLink {
    connected: watch::Sender<bool>,
}

impl Default for MemberLink {
    fn default() -> Self {
        Self {
            connected: watch::Sender::new(true),
        }
    }
}

impl Link for MemberLink {
    fn reachable(&self) -> bool {
        MemberLink::reachable(self)
    }
}

impl MemberLink {
    /// Whether the member reaches the store now.
    fn reachable(&self) -> bool {
        *self.connected.borrow()
    }

    /// Resolves once the member reaches the store (at once while it does).
    async fn reached(&self) {
        let mut connected = self.connected.subscribe();
        // The sender lives in `self`: the wait cannot fail.
        let _ = connected.wait_for(|connected| *connected).await;
    }

    /// Changes whenever the member is cut off or brought back.
    fn changes(&self) -> watch::Receiver<bool> {
        self.connected.subscribe()
    }
}

/// The members' one request-id cache, as one member reaches it. Its semantics are the
/// in-process cache's, which differ from the NATS bucket's in two ways the rooms allow for
/// (`forgets_evictable_answers`, and a lost attempt is forgotten): answers kept as evictable
/// may make room for new ids, and an attempt whose member stopped before answering (its ticket
/// dropped) frees its id at once instead of being reported as lost after its deadline.
#[derive(Debug)]
struct MemberRequestIds {
    cache: Arc<AnswerCache>,
    link: Arc<MemberLink>,
}

impl RequestIds for MemberRequestIds {
    fn claim<'a>(
        &'a self,
        key: &'a AnswerKey,
        command: &'a ReleaseCommand,
        terms: ClaimTerms,
    ) -> BoxFuture<'a, Claim> {
        if !self.link.reachable() {
            return Box::pin(std::future::ready(Claim::Unavailable));
        }
        RequestIds::claim(&*self.cache, key, command, terms)
    }

    fn contains<'a>(&'a self, key: &'a AnswerKey) -> BoxFuture<'a, bool> {
        if !self.link.reachable() {
            return Box::pin(std::future::ready(false));
        }
        RequestIds::contains(&*self.cache, key)
    }

    fn entries(&self) -> usize {
        self.cache.entries()
    }

    fn forgets_evictable_answers(&self) -> bool {
        self.cache.forgets_evictable_answers()
    }
}
