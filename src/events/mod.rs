//! The events room: the agents' release events, read by one poll loop per agent somebody
//! watches and delivered to any number of watchers, with a bounded replay per agent and resume
//! tokens. Owns the poll loops, the feeds and the watchers; knows nothing of gRPC (the api room
//! turns a watcher into a stream), nothing of hanging up (the release room only waits on a
//! watcher), and keeps no session itself (it polls through the sessions room).
//!
//! One name per concept:
//! - a *watcher* ([`Watcher`]) receives the release events of one or more agents: one per
//!   WatchReleaseEvents stream, or one per ReleaseCall waiting for its event (a *release
//!   waiter*, whose permit comes from a pool of its own);
//! - a *feed* is one agent's state: its poll loop, its replay ring and its members; the *feed
//!   registry* creates and retires feeds;
//! - a watcher's *membership* in a feed has two sides: the watcher holds a `Membership`
//!   (dropping it leaves the feed), the feed holds a `Member` (where to deliver);
//! - a watcher's *start* (`WatcherStart`) is what subscribing works out for it: its position,
//!   replay, gap and memberships;
//! - the *poll loop* (`PollLoop`) is the one reader of an agent's gateway events.
//!
//! Parts: `hub` ([`EventHub`], the facade, and the `Room` its parts share), `numbering` (the
//! sequence and the publish lock), `feeds` (the feed registry), `polled` (the polled agents'
//! limit), `ownership` (which agents this replica may poll, and who watches what across
//! replicas), `publish` (appending and delivering events), `log` (where events are appended,
//! and read back for resuming watchers), `subscribe` (admitting and starting watchers),
//! `watcher`, `forward` (a watcher read by a task of its own), `queue` (the queue a watcher's
//! feeds deliver into, and a forwarded watcher's), `poll`, `ring` (the replay ring), `token`.
//!
//! Ordering: every release event gets the next number of one sequence, and events are
//! delivered in that order (one publish lock, `numbering`), so a watcher of several agents can deliver them
//! in sequence order. "Everything up to sequence N was delivered" is then a complete
//! description of where a watcher stands, which is all a resume token holds. The sequence is
//! the event log's (`log`, `EventLog`): the process's own (in memory), or a JetStream
//! stream's that every replica follows (`--nats-url`), where a token means the same on every
//! replica and across restarts.
mod feeds;
mod forward;
mod hub;
mod lease_holder;
mod log;
mod numbering;
mod ownership;
mod poll;
mod polled;
mod publish;
mod queue;
mod ring;
mod subscribe;
#[cfg(test)]
mod testing;
mod token;
mod watcher;

use std::{time::Duration, time::SystemTime};

pub(crate) use forward::Forwarded;
pub use hub::{EventHub, EventStats};
pub(crate) use lease_holder::{HeldLease, Holder, HolderState, Holding, LeaseOwnership};
pub use log::LogStats;
pub(crate) use log::{dropped_after, Backfill, EventLog, LogFollower, ProcessLog, Record};
pub use ownership::{desired_owner, shard_of, OwnershipStats, PollingPart, SHARDS};
pub(crate) use ownership::{
    LeaseSettings, PollOwnership, PollPermit, ProcessOwnership, RemoteInterest,
    HAND_BACK_ON_SHUTDOWN, LEASED_SHUTDOWN_POLL_GRACE, SHUTDOWN_POLL_GRACE,
};
pub use polled::PolledAgentsFull;
pub use subscribe::{SubscribeError, WatcherLimit};
pub use token::ResumeToken;
pub use watcher::Watcher;
pub(crate) use watcher::{SessionEnding, WatcherEnd, WatcherItem};

use crate::domain::{AgentId, CallId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ReleaseKind {
    /// `AgentEvent_Call_Release`: the agent left the call.
    CallRelease,
    /// `AgentEvent_Customer_Release`: the customer left the call.
    CustomerRelease,
}

/// One observed release event, shared (behind an `Arc`) by every watcher that receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReleaseEvent {
    pub(crate) agent: AgentId,
    pub(crate) kind: ReleaseKind,
    pub(crate) call_id: CallId,
    /// The customer's number (customer releases that carry one).
    pub(crate) customer_number: Option<String>,
    /// The gateway's `eventGenTime`, when it sends one.
    pub(crate) event_time: Option<SystemTime>,
    /// When the facade received it.
    pub(crate) observed_time: SystemTime,
    /// The gateway's `eventType`.
    pub(crate) raw_event_type: String,
    /// Its place in the process's sequence; also the token to resume after it.
    pub(crate) token: ResumeToken,
}

/// Which kinds a watcher wants (empty: all).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KindFilter(Vec<ReleaseKind>);

impl KindFilter {
    pub(crate) fn new(kinds: Vec<ReleaseKind>) -> Self {
        Self(kinds)
    }

    pub(crate) fn only(kind: ReleaseKind) -> Self {
        Self(vec![kind])
    }

    pub(crate) fn accepts(&self, event: &ReleaseEvent) -> bool {
        self.0.is_empty() || self.0.contains(&event.kind)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct EventSettings {
    /// Pause after an empty poll answer (Huawei's demos: 500 ms; an event is re-polled at once).
    pub(crate) poll_pause: Duration,
    /// HTTP timeout of one poll; must outlast the gateway's long-poll wait (about 10 s).
    pub(crate) poll_timeout: Duration,
    /// Longest pause between polls after consecutive failures.
    pub(crate) backoff_max: Duration,
    /// How long an agent is still polled after its last watcher left.
    pub(crate) grace: Duration,
    /// Release events kept per agent for resuming watchers.
    pub(crate) replay_events: usize,
    /// How long a release event is kept for resuming watchers.
    pub(crate) replay_age: Duration,
    /// How many events a watcher may fall behind before it is cut off.
    pub(crate) watcher_buffer: usize,
    /// A watcher that sent nothing for this long gets a heartbeat.
    pub(crate) heartbeat: Duration,
    /// Open watchers in the process (`EventHub::subscribe`).
    pub(crate) max_watchers: usize,
    /// Open release waiters in the process (`EventHub::subscribe_release_waiter`), a pool of
    /// their own so that neither kind can crowd out the other.
    pub(crate) max_release_waiters: usize,
    /// Agents whose poll loop may poll at once (watched, or in their grace period): each
    /// holds one long-poll connection to the gateway. Watchers and release waiters that would
    /// need one more are refused.
    pub(crate) max_polled_agents: usize,
}
