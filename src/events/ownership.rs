//! Who may poll an agent's gateway events. The gateway hands each event to one poll only, so
//! two replicas polling one agent take turns stealing its events: across replicas one of them
//! at a time owns each agent's polling, and the others' poll loops wait. Who is watched is
//! shared too: a replica tells which agents its clients watch, and the owner polls an agent
//! that only other replicas' clients watch.
//!
//! [`ProcessOwnership`] is the single process (it owns every agent, nobody else watches
//! anything); the NATS implementation (`crate::nats::ownership`) shares leases between
//! replicas, and so does the in-memory one of facades sharing one process
//! (`crate::shared_state::memory`). Both spread agents over [`SHARDS`] shards
//! ([`shard_of`]) and shards over replicas ([`desired_owner`]) alike.
use std::{collections::BTreeSet, fmt, sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::domain::AgentId;

/// Shards agents are spread over: fixed, since every replica must map an agent to the same
/// lease (changing it needs every replica stopped).
pub const SHARDS: u16 = 256;

/// The shard of an agent: FNV-1a of its decimal id, mixed, modulo [`SHARDS`]. Stable across
/// processes, versions and platforms.
pub fn shard_of(agent: AgentId) -> u16 {
    (mix(fnv1a(agent.to_string().as_bytes())) % u64::from(SHARDS)) as u16
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// splitmix64's finalizer: FNV-1a alone leaves similar inputs' hashes close together.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Rendezvous (highest random weight) hashing: the member of highest weight owns the shard.
fn weight(member: &str, shard: u16) -> u64 {
    let mut bytes = member.as_bytes().to_vec();
    bytes.push(b'/');
    bytes.extend_from_slice(&shard.to_be_bytes());
    mix(fnv1a(&bytes))
}

/// The member of `live` that should hold `shard`'s lease.
pub fn desired_owner<'a>(shard: u16, live: &[&'a str]) -> Option<&'a str> {
    live.iter()
        .copied()
        .max_by_key(|member| (weight(member, shard), *member))
}

/// The terms of a poll lease, as every replica keeps them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseSettings {
    /// How often a held lease is renewed.
    pub(crate) renew: Duration,
    /// A lease not renewed for this long may be taken over.
    pub(crate) ttl: Duration,
    /// Before the TTL runs out, a holder's polls have ended this early.
    pub(crate) margin: Duration,
    /// The longest one poll runs.
    pub(crate) poll_timeout: Duration,
}

impl LeaseSettings {
    /// How long after a renewal was sent polls may still start: each ends within the poll
    /// timeout, before the lease could be taken over.
    pub(crate) fn polls_start_within(&self) -> Duration {
        self.ttl.saturating_sub(self.margin + self.poll_timeout)
    }
}

/// Once shutdown begins, how long a poll in flight may still run when nobody polls its agent
/// after this process: an answer already on its way arrives within it.
pub(crate) const SHUTDOWN_POLL_GRACE: Duration = Duration::from_secs(1);
/// Once shutdown begins, how long a poll in flight may still run when another replica polls
/// its agent as soon as this one hands the lease back: until the gateway answers it (its
/// long-poll wait, about 10 s, and a margin). Cut sooner, the gateway would still hold the
/// poll while the other replica polls the agent (two pollers), and could hand it an event for
/// a connection that is gone.
pub(crate) const LEASED_SHUTDOWN_POLL_GRACE: Duration = Duration::from_secs(12);
/// How long a lease holder's shutdown may take to hand every lease back: its last polls'
/// grace, then the deletes (1.5 s).
pub(crate) const HAND_BACK_ON_SHUTDOWN: Duration = Duration::from_millis(13_500);

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

    /// Once shutdown begins, how long a poll in flight may still run before it is cut.
    fn shutdown_poll_grace(&self) -> Duration {
        SHUTDOWN_POLL_GRACE
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
