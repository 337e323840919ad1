//! What a replica holding shard leases keeps about its own polls and watchers. The lease store
//! differs (NATS, or memory shared by facades in one process); how the held leases gate polls,
//! when a lease being handed back has drained, and when this replica's interest in an agent
//! must be put or withdrawn do not.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use tokio::{
    sync::{watch, Notify},
    time::Instant,
};

use super::{
    shard_of, OwnershipStats, PollOwnership, PollPermit, PollingPart, RemoteInterest,
    LEASED_SHUTDOWN_POLL_GRACE,
};
use crate::domain::AgentId;

/// A shard lease this replica holds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeldLease {
    /// Its revision in the store: the next renewal updates on it.
    pub(crate) revision: u64,
    /// Polls may start before this: the last successful renewal's send time + TTL - margin -
    /// poll timeout.
    pub(crate) fence: Instant,
    /// No longer ours to poll: handed back once its polls in flight end.
    pub(crate) releasing: bool,
}

/// The held leases, the polls in flight on them, and the agents this replica's clients watch.
#[derive(Debug, Default)]
pub(crate) struct Holding {
    pub(crate) held: BTreeMap<u16, HeldLease>,
    /// Polls in flight per shard.
    pub(crate) in_flight: HashMap<u16, usize>,
    /// Agents this replica's clients watch: how many poll loops said so.
    pub(crate) local: HashMap<AgentId, usize>,
    /// Agents whose interest this replica put in the store.
    pub(crate) published: HashSet<AgentId>,
}

impl Holding {
    /// Whether a poll of the shard may start now.
    pub(crate) fn may_poll(&self, shard: u16, now: Instant) -> bool {
        self.held
            .get(&shard)
            .is_some_and(|held| !held.releasing && now < held.fence)
    }

    /// The shards a poll may start on now.
    pub(crate) fn pollable(&self, now: Instant) -> Vec<u16> {
        self.held
            .keys()
            .copied()
            .filter(|shard| self.may_poll(*shard, now))
            .collect()
    }

    /// Whether this replica polls the agent: its shard held and not being handed back.
    pub(crate) fn owns(&self, agent: AgentId) -> bool {
        self.held
            .get(&shard_of(agent))
            .is_some_and(|held| !held.releasing)
    }

    /// Agents whose interest this replica should have put: watched here, polled elsewhere.
    pub(crate) fn interest_wanted(&self) -> HashSet<AgentId> {
        self.local
            .keys()
            .copied()
            .filter(|agent| !self.owns(*agent))
            .collect()
    }

    /// Marks every held lease as being handed back: the leases whose polls ended, as (shard,
    /// revision), and how many still have polls in flight.
    pub(crate) fn release_all(&mut self) -> (Vec<(u16, u64)>, usize) {
        for held in self.held.values_mut() {
            held.releasing = true;
        }
        let (drained, busy): (Vec<_>, Vec<_>) = self
            .held
            .iter()
            .map(|(shard, held)| (*shard, held.revision))
            .partition(|(shard, _)| !self.in_flight.contains_key(shard));
        (drained, busy.len())
    }

    /// Counts one more poll in flight on the shard, if one may start now.
    fn begin_poll(&mut self, shard: u16, now: Instant) -> bool {
        if !self.may_poll(shard, now) {
            return false;
        }
        *self.in_flight.entry(shard).or_default() += 1;
        true
    }

    /// Counts a poll on the shard as ended; whether the holder's driver must look again (the
    /// shard's last poll ended while the shard is no longer this replica's to poll).
    fn end_poll(&mut self, shard: u16) -> bool {
        let drained = match self.in_flight.get_mut(&shard) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                self.in_flight.remove(&shard);
                true
            }
        };
        drained && self.held.get(&shard).is_none_or(|held| held.releasing)
    }

    /// Counts a poll loop's watching of the agent starting or stopping; whether the holder's
    /// driver must look again (the interest to put or withdraw changed).
    fn set_watched(&mut self, agent: AgentId, watched: bool) -> bool {
        let count = self.local.entry(agent).or_default();
        if watched {
            *count += 1;
        } else {
            *count = count.saturating_sub(1);
        }
        match *count {
            0 => {
                self.local.remove(&agent);
                self.published.contains(&agent)
            }
            _ => !self.published.contains(&agent) && !self.owns(agent),
        }
    }
}

/// How a lease holder tells the rest of the replica what changed, and what it counts.
#[derive(Debug)]
pub(crate) struct HolderSignals {
    /// Wakes the driver: a shard being handed back drained, an agent's interest changed, a
    /// shard the holder wants was freed.
    pub(crate) wake: Notify,
    /// Bumped when the shards polls may start on changed.
    pub(crate) changes: watch::Sender<u64>,
    /// The agents other replicas watch whose shard this replica may poll.
    pub(crate) interest: watch::Sender<RemoteInterest>,
    /// Counted for [`OwnershipStats`].
    pub(crate) renewals_failed: AtomicU64,
    /// Counted for [`OwnershipStats`].
    pub(crate) leases_lost: AtomicU64,
}

impl Default for HolderSignals {
    fn default() -> Self {
        Self {
            wake: Notify::new(),
            changes: watch::Sender::new(0),
            interest: watch::Sender::new(RemoteInterest::default()),
            renewals_failed: AtomicU64::new(0),
            leases_lost: AtomicU64::new(0),
        }
    }
}

/// A lease store's replica-side state: it keeps a [`Holding`], and knows its part in polling.
pub(crate) trait HolderState: fmt::Debug + Send + 'static {
    fn holding(&mut self) -> &mut Holding;

    /// This replica's part in polling, as the store's writes went.
    fn part(&self) -> PollingPart;
}

/// A lease store's replica-side state behind its one lock, and its signals.
#[derive(Debug)]
pub(crate) struct Holder<S> {
    state: Mutex<S>,
    pub(crate) signals: HolderSignals,
}

impl<S> Holder<S> {
    pub(crate) fn new(state: S) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(state),
            signals: HolderSignals::default(),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, S> {
        crate::lock(&self.state)
    }
}

impl<S: HolderState> Holder<S> {
    fn with_holding<T>(&self, change: impl FnOnce(&mut Holding) -> T) -> T {
        change(self.lock().holding())
    }
}

/// Poll ownership by leases held in a store (NATS, or memory shared by facades in one process).
#[derive(Debug)]
pub(crate) struct LeaseOwnership<S> {
    holder: Arc<Holder<S>>,
}

impl<S> LeaseOwnership<S> {
    pub(crate) fn new(holder: Arc<Holder<S>>) -> Self {
        Self { holder }
    }
}

impl<S: HolderState> PollOwnership for LeaseOwnership<S> {
    /// Until the gateway answers: another replica polls the agent once the lease is back.
    fn shutdown_poll_grace(&self) -> Duration {
        LEASED_SHUTDOWN_POLL_GRACE
    }

    fn poll_permit(&self, agent: AgentId) -> Option<PollPermit> {
        let shard = shard_of(agent);
        self.holder
            .with_holding(|holding| holding.begin_poll(shard, Instant::now()))
            .then(|| {
                PollPermit::guarded(InFlight {
                    holder: self.holder.clone(),
                    shard,
                })
            })
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.holder.signals.changes.subscribe()
    }

    fn set_watched(&self, agent: AgentId, watched: bool) {
        if self
            .holder
            .with_holding(|holding| holding.set_watched(agent, watched))
        {
            self.holder.signals.wake.notify_one();
        }
    }

    fn remote_interest(&self) -> watch::Receiver<RemoteInterest> {
        self.holder.signals.interest.subscribe()
    }

    fn stats(&self) -> OwnershipStats {
        let signals = &self.holder.signals;
        OwnershipStats {
            shards_held: self.holder.with_holding(|holding| holding.held.len()),
            renewals_failed: signals.renewals_failed.load(Ordering::Relaxed),
            leases_lost: signals.leases_lost.load(Ordering::Relaxed),
        }
    }

    fn part(&self) -> PollingPart {
        self.holder.lock().part()
    }
}

/// A poll in flight on a held shard.
struct InFlight<S: HolderState> {
    holder: Arc<Holder<S>>,
    shard: u16,
}

impl<S: HolderState> Drop for InFlight<S> {
    fn drop(&mut self) {
        if self
            .holder
            .with_holding(|holding| holding.end_poll(self.shard))
        {
            self.holder.signals.wake.notify_one();
        }
    }
}
