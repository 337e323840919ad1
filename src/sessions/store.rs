//! Where the registry hands each change of an agent's session, so that replicas share their
//! sessions (`--nats-url`). Alone, the registry has no store: its map is the only copy.
use std::{
    fmt::Debug,
    sync::atomic::{AtomicU64, Ordering},
};

use crate::{domain::AgentId, gateway::Session};

/// One agent's session as the replicas share it: everything a replica needs to send in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedSession {
    pub current: Session,
    /// The gateway issued `current` or carried out an operation with it.
    pub confirmed: bool,
    /// A different session a watcher handed over: tried once the gateway refuses `current`.
    pub candidate: Option<Session>,
}

/// Takes the registry's changes to the replicas' shared copy.
pub trait SessionStore: Send + Sync + Debug {
    /// The agent's entry changed. `based_on` is the store revision the registry's entry derived
    /// from (0: one the store never held), `entry` the entry now (`None`: forgotten after the
    /// gateway refused it). Called under the registry's lock: it must neither block nor call
    /// back into the registry.
    fn changed(&self, agent: AgentId, based_on: u64, entry: Option<SharedSession>);
}

/// How sharing sessions went; all zero without a store.
#[derive(Debug, Default)]
pub struct StoreCounters {
    /// Writes the store did not take (unreachable, timed out): retried.
    pub(crate) failed_writes: AtomicU64,
    /// Writes based on a revision the store had moved past: the newer entry was kept.
    pub(crate) conflicts: AtomicU64,
    /// Changes not queued because the store's waiting changes already cover as many agents as
    /// it keeps (coalesced per agent, so a burst of known agents' changes never counts here).
    pub(crate) dropped_changes: AtomicU64,
}

impl StoreCounters {
    pub fn failed_writes(&self) -> u64 {
        self.failed_writes.load(Ordering::Relaxed)
    }

    pub fn conflicts(&self) -> u64 {
        self.conflicts.load(Ordering::Relaxed)
    }

    pub fn dropped_changes(&self) -> u64 {
        self.dropped_changes.load(Ordering::Relaxed)
    }

    pub(crate) fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
