//! Who may poll an agent's gateway events. The gateway hands each event to one poll only, so
//! two replicas polling one agent take turns stealing its events: across replicas one of them
//! at a time owns each agent's polling, and the others' poll loops wait. Who is watched is
//! shared too: a replica tells which agents its clients watch, and the owner polls an agent
//! that only other replicas' clients watch.
//!
//! [`ProcessOwnership`] is the single process (it owns every agent, nobody else watches
//! anything); the NATS implementation (`crate::nats::ownership`) shares leases between
//! replicas.
use std::{collections::BTreeSet, fmt, sync::Arc};

use tokio::sync::watch;

use crate::domain::AgentId;

/// Agents that other replicas' clients watch, of those whose polling this replica owns.
pub(crate) type RemoteInterest = Arc<BTreeSet<AgentId>>;

/// Which agents this replica may poll, and who watches what.
pub(crate) trait PollOwnership: Send + Sync + fmt::Debug {
    /// A permit to start one poll of `agent` now, to hold until its answer is handled; `None`
    /// while another replica owns the agent, or while this replica cannot be sure it still
    /// does (its lease not renewed in time). Polls in flight keep a lease being handed back
    /// until they end.
    fn poll_permit(&self, agent: AgentId) -> Option<PollPermit>;

    /// Changes when what [`poll_permit`](Self::poll_permit) answers may have changed.
    fn changes(&self) -> watch::Receiver<u64>;

    /// This replica's clients watch `agent` (a feed with watchers, or in its grace period
    /// after them), or stopped.
    fn set_watched(&self, agent: AgentId, watched: bool);

    /// The agents other replicas watch whose polling this replica owns; a receiver whose
    /// sender is gone: never any.
    fn remote_interest(&self) -> watch::Receiver<RemoteInterest>;

    fn stats(&self) -> OwnershipStats {
        OwnershipStats::default()
    }

    /// This replica's part in polling (all of it, alone).
    fn part(&self) -> PollingPart {
        PollingPart {
            writes_accepted: true,
            share_taken: true,
        }
    }
}

/// Whether a replica takes its part in polling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollingPart {
    /// Its last writes of who polls what were taken (by the shared state).
    pub writes_accepted: bool,
    /// It has held, at least once, every agent it should: with other replicas, its share.
    pub share_taken: bool,
}

/// What the ownership's leases did, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OwnershipStats {
    /// Shards whose poll lease this replica holds.
    pub shards_held: usize,
    /// Lease renewals that failed (NATS unreachable or slow); the lease is still held.
    pub renewals_failed: u64,
    /// Leases found taken over by another replica when renewing them.
    pub leases_lost: u64,
}

/// Held while one poll is in flight; dropping it tells the ownership the poll ended.
pub(crate) struct PollPermit(#[allow(dead_code)] Option<Box<dyn Send + Sync>>);

impl PollPermit {
    /// A permit nobody waits for.
    pub(crate) fn free() -> Self {
        Self(None)
    }

    /// A permit whose `guard`, dropped, ends the poll's hold.
    pub(crate) fn guarded(guard: impl Send + Sync + 'static) -> Self {
        Self(Some(Box::new(guard)))
    }
}

/// The single process's ownership: it owns every agent's polling, and no other replica watches
/// any agent.
#[derive(Debug)]
pub(crate) struct ProcessOwnership {
    /// Kept so that the receivers' `changed()` waits forever instead of failing.
    changes: watch::Sender<u64>,
}

impl ProcessOwnership {
    pub(crate) fn new() -> Self {
        Self {
            changes: watch::Sender::new(0),
        }
    }
}

impl PollOwnership for ProcessOwnership {
    fn poll_permit(&self, _agent: AgentId) -> Option<PollPermit> {
        Some(PollPermit::free())
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn set_watched(&self, _agent: AgentId, _watched: bool) {}

    /// Never any, and never changing: its sender is gone, so following it ends at once.
    fn remote_interest(&self) -> watch::Receiver<RemoteInterest> {
        watch::channel(RemoteInterest::default()).1
    }
}
