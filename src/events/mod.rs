//! Release events: one long-poll loop per watched agent ([`PollLoop`]), fanned out to any
//! number of watchers ([`EventHub`], [`Watcher`]), with a bounded replay ring per agent and resume
//! tokens. Knows nothing of gRPC.
//!
//! Ordering: every release event gets the next number of one per-process sequence, and events
//! are published in that order (one publish lock), so a watcher of several agents can deliver
//! them in sequence order. "Everything up to sequence N was delivered" is then a complete
//! description of where a watcher stands, which is all a resume token holds.
mod feeds;
mod forward;
mod hub;
mod poll;
mod publish;
mod ring;
mod subscribe;
#[cfg(test)]
mod testing;
mod token;
mod watcher;

use std::{time::Duration, time::SystemTime};

pub use forward::Forwarded;
pub use hub::{EventHub, EventStats};
pub use poll::PollLoop;
pub use ring::ReplayRing;
pub use subscribe::{SubscribeError, WatcherLimit};
pub use token::ResumeToken;
pub use watcher::{Gap, GapCause, SessionEnding, Watcher, WatcherEnd, WatcherItem};

use crate::domain::{AgentId, CallId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReleaseKind {
    /// `AgentEvent_Call_Release`: the agent left the call.
    CallRelease,
    /// `AgentEvent_Customer_Release`: the customer left the call.
    CustomerRelease,
}

/// One observed release event, shared (behind an `Arc`) by every watcher that receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseEvent {
    pub agent: AgentId,
    pub kind: ReleaseKind,
    pub call_id: CallId,
    /// The customer's number (customer releases that carry one).
    pub customer_number: Option<String>,
    /// The gateway's `eventGenTime`, when it sends one.
    pub event_time: Option<SystemTime>,
    /// When the facade received it.
    pub observed_time: SystemTime,
    /// The gateway's `eventType`.
    pub raw_event_type: String,
    /// Its place in the process's sequence; also the token to resume after it.
    pub token: ResumeToken,
}

/// Which kinds a watcher wants (empty: all).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KindFilter(Vec<ReleaseKind>);

impl KindFilter {
    pub fn new(kinds: Vec<ReleaseKind>) -> Self {
        Self(kinds)
    }

    pub fn only(kind: ReleaseKind) -> Self {
        Self(vec![kind])
    }

    pub fn accepts(&self, event: &ReleaseEvent) -> bool {
        self.0.is_empty() || self.0.contains(&event.kind)
    }
}

#[derive(Debug, Clone)]
pub struct EventSettings {
    /// Pause after an empty poll answer (Huawei's demos: 500 ms; an event is re-polled at once).
    pub poll_pause: Duration,
    /// HTTP timeout of one poll; must outlast the gateway's long-poll wait (about 10 s).
    pub poll_timeout: Duration,
    /// Longest pause between polls after consecutive failures.
    pub backoff_max: Duration,
    /// How long an agent is still polled after its last watcher left.
    pub grace: Duration,
    /// Release events kept per agent for resuming watchers.
    pub replay_events: usize,
    /// How long a release event is kept for resuming watchers.
    pub replay_age: Duration,
    /// How many events a watcher may fall behind before it is cut off.
    pub watcher_buffer: usize,
    /// A watcher that sent nothing for this long gets a heartbeat.
    pub heartbeat: Duration,
    /// Open watchers in the process (`EventHub::subscribe`).
    pub max_watchers: usize,
    /// Open release waiters in the process (`EventHub::subscribe_release_waiter`), a pool of
    /// their own so that neither kind can crowd out the other.
    pub max_release_waiters: usize,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self {
            poll_pause: Duration::from_millis(300),
            poll_timeout: Duration::from_secs(30),
            backoff_max: Duration::from_secs(10),
            grace: Duration::from_secs(60),
            replay_events: 256,
            replay_age: Duration::from_secs(600),
            watcher_buffer: 1024,
            heartbeat: Duration::from_secs(15),
            max_watchers: 10_000,
            max_release_waiters: 1_000,
        }
    }
}
