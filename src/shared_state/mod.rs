//! What the replicas share, built once at startup: the sessions registry, who polls which
//! agent, the release event log, the request ids, and whether they can be reached. A single
//! process keeps each in its own memory (`SharedState::in_process`); replicas share them
//! through NATS JetStream (`crate::nats::shared_state`), or, several facades in one process
//! (tests), through that process's memory ([`SharedMemory`]). The rooms receive their parts
//! from here; none of them knows which it runs on.
use std::{fmt, sync::Arc, time::Duration};

pub mod memory;

pub use memory::SharedMemory;

use crate::{
    events::{EventLog, PollOwnership, PollingPart, ProcessLog, ProcessOwnership},
    release::{AnswerCache, Reachable, RequestIds},
    sessions::{SessionLimits, SessionRegistry},
};

/// Cheap to clone; every clone is the same state.
#[derive(Clone, Debug)]
pub struct SharedState {
    sessions: Arc<SessionRegistry>,
    ownership: Arc<dyn PollOwnership>,
    event_log: Arc<dyn EventLog>,
    request_ids: Arc<dyn RequestIds>,
    link: Arc<dyn Link>,
}

/// The way to where the state is kept.
pub(crate) trait Link: Send + Sync + fmt::Debug {
    /// Whether the shared state can be reached now (false while it cannot be known).
    fn reachable(&self) -> bool;
}

/// State kept in this process's memory: always within reach.
#[derive(Debug)]
struct InProcess;

impl Link for InProcess {
    fn reachable(&self) -> bool {
        true
    }
}

impl SharedState {
    /// State of its own kept in this process's memory, for a process alone: sessions within
    /// `session_limits`, request ids remembered for `idempotency_window`, at most
    /// `idempotency_capacity` of them.
    pub(crate) fn in_process(
        session_limits: SessionLimits,
        idempotency_window: Duration,
        idempotency_capacity: usize,
    ) -> Self {
        let request_ids: AnswerCache = AnswerCache::new(idempotency_window, idempotency_capacity);
        Self::new(
            Arc::new(SessionRegistry::new(session_limits)),
            Arc::new(ProcessOwnership::new()),
            Arc::new(ProcessLog::new()),
            Arc::new(request_ids),
            Arc::new(InProcess),
        )
    }

    /// State kept where `link` reaches.
    pub(crate) fn new(
        sessions: Arc<SessionRegistry>,
        ownership: Arc<dyn PollOwnership>,
        event_log: Arc<dyn EventLog>,
        request_ids: Arc<dyn RequestIds>,
        link: Arc<dyn Link>,
    ) -> Self {
        Self {
            sessions,
            ownership,
            event_log,
            request_ids,
            link,
        }
    }

    /// Every agent's gateway session.
    pub(crate) fn sessions(&self) -> Arc<SessionRegistry> {
        self.sessions.clone()
    }

    /// Which agents this process may poll, and who watches what.
    pub(crate) fn ownership(&self) -> Arc<dyn PollOwnership> {
        self.ownership.clone()
    }

    /// Where release events are numbered and kept for resuming watchers.
    pub(crate) fn event_log(&self) -> Arc<dyn EventLog> {
        self.event_log.clone()
    }

    /// Where request ids are claimed and their answers kept.
    pub(crate) fn request_ids(&self) -> Arc<dyn RequestIds> {
        self.request_ids.clone()
    }

    /// Whether the state can be reached now: while it cannot, releases are refused (or go
    /// ahead on this process's sessions, if allowed) and watches are refused.
    pub fn reachable(&self) -> bool {
        self.link.reachable()
    }

    /// [`reachable`](Self::reachable), for a room that must not know this seam.
    pub(crate) fn reachability(&self) -> Reachable {
        let link = self.link.clone();
        Reachable::new(move || link.reachable())
    }

    /// The state can be reached and takes this process's writes (its poll leases).
    pub fn takes_writes(&self) -> bool {
        self.reachable() && self.part().writes_accepted
    }

    /// Readiness: the state takes this process's writes and it has taken its share of the
    /// polling (all of it, alone).
    pub fn ready(&self) -> bool {
        let part = self.part();
        self.reachable() && part.writes_accepted && part.share_taken
    }

    fn part(&self) -> PollingPart {
        self.ownership.part()
    }
}
