//! The feed registry: one feed per agent somebody watches (its poll loop, replay ring and
//! members), created by the first watcher and retired once nobody watches the agent, its grace
//! period is over and nothing is left to replay. Knows neither how events are numbered nor how
//! a watcher is built.
use std::{
    collections::HashMap,
    sync::{atomic::AtomicBool, Arc, Mutex},
};

use tokio::{
    sync::{mpsc, Notify},
    time::Instant,
};

use super::{
    hub::Hub, poll::PollLoop, ring::ReplayRing, watcher::SessionEnding, EventSettings, KindFilter,
    ReleaseEvent,
};
use crate::{domain::AgentId, lock};

#[derive(Debug, Default)]
pub(super) struct FeedRegistry {
    live: HashMap<AgentId, Arc<Feed>>,
    /// The highest sequence each retired feed had seen: a token from before it missed
    /// something. Eight bytes per agent ever watched, bounded by the agent id range.
    retired: HashMap<AgentId, u64>,
}

#[derive(Debug)]
pub(super) struct Feed {
    pub agent: AgentId,
    pub state: Mutex<FeedState>,
    /// Wakes the poll loop when watchers come or go.
    pub changed: Notify,
}

#[derive(Debug)]
pub(super) struct FeedState {
    pub ring: ReplayRing,
    pub members: Vec<Member>,
    /// When the last watcher left; meaningful while there is none.
    pub idle_since: Instant,
    /// The gateway refused the session; polling waits for a watcher with a new one.
    pub session_lost: bool,
    /// The last poll failed; the loop is backing off.
    poll_failing: bool,
}

/// A watcher's [`Membership`](super::watcher::Membership) as the feed sees it: where to
/// deliver, and the flag that cuts the watcher off when it falls behind.
#[derive(Debug, Clone)]
pub(super) struct Member {
    pub watcher_id: u64,
    pub sender: mpsc::Sender<FeedItem>,
    pub overflowed: Arc<AtomicBool>,
}

/// Pointer-sized payloads keep every watcher's channel small: tokio allocates its slots in
/// blocks of 32, so the item's size is paid 32 times per watcher (measured: 2.3 KiB per
/// watcher with the ending inline, see BENCHMARKS.md).
#[derive(Debug, Clone)]
pub(super) enum FeedItem {
    Event(Arc<ReleaseEvent>),
    SessionEnded(Arc<(AgentId, SessionEnding)>),
}

/// What a poll loop does next.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    Poll,
    /// Nothing to poll for: wait for a watcher, or until `Some` instant to check again.
    Wait(Option<Instant>),
    Retire,
}

/// What a joining watcher finds in a feed.
pub(super) struct Kept {
    /// The kept events after its position that it wants, oldest first.
    pub events: Vec<Arc<ReleaseEvent>>,
    /// Events after its position are no longer kept.
    pub evicted: bool,
}

impl FeedRegistry {
    /// The agent's feed, created (with its poll loop) when missing.
    pub fn feed(&mut self, hub: &Arc<Hub>, agent: AgentId) -> Arc<Feed> {
        if let Some(feed) = self.live.get(&agent) {
            return feed.clone();
        }
        let floor = self.retired.remove(&agent).unwrap_or(0);
        let feed = Arc::new(Feed {
            agent,
            state: Mutex::new(FeedState {
                ring: ReplayRing::new(hub.settings.replay_events, hub.settings.replay_age, floor),
                members: Vec::new(),
                idle_since: Instant::now(),
                session_lost: false,
                poll_failing: false,
            }),
            changed: Notify::new(),
        });
        self.live.insert(agent, feed.clone());
        let poll_loop = PollLoop::new(hub.clone(), feed.clone()).run();
        hub.tasks.spawn(hub.poll_loops.track_future(poll_loop));
        feed
    }

    /// The agent's feed, if it has one.
    pub fn get(&self, agent: AgentId) -> Option<Arc<Feed>> {
        self.live.get(&agent).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Feed>> {
        self.live.values().cloned().collect()
    }
}

impl FeedState {
    pub(super) fn wants_polling(&self, settings: &EventSettings, now: Instant) -> bool {
        !self.session_lost && (!self.members.is_empty() || now < self.idle_since + settings.grace)
    }
}

impl Feed {
    pub(super) fn set_failing(&self, failing: bool) {
        lock(&self.state).poll_failing = failing;
    }

    pub(super) fn is_failing(&self) -> bool {
        lock(&self.state).poll_failing
    }

    /// Watchers and release waiters the feed delivers to.
    pub(super) fn members(&self) -> usize {
        lock(&self.state).members.len()
    }

    pub(super) fn wants_polling(&self, settings: &EventSettings, now: Instant) -> bool {
        lock(&self.state).wants_polling(settings, now)
    }

    /// A watcher joins: from now on it gets the agent's events. It brings a session, so a feed
    /// that lost its session polls again.
    pub(super) fn join(
        &self,
        member: Member,
        position: u64,
        kinds: &KindFilter,
        now: Instant,
    ) -> Kept {
        let mut state = lock(&self.state);
        state.ring.expire(now);
        let kept = Kept {
            evicted: state.ring.floor() > position,
            events: state
                .ring
                .after(position)
                .filter(|e| kinds.accepts(e))
                .cloned()
                .collect(),
        };
        state.members.push(member);
        state.session_lost = false;
        drop(state);
        self.changed.notify_one();
        kept
    }

    /// A watcher leaves: from now on it gets nothing from this agent.
    pub(super) fn leave(&self, watcher_id: u64) {
        let mut state = lock(&self.state);
        let before = state.members.len();
        state.members.retain(|s| s.watcher_id != watcher_id);
        if before > 0 && state.members.is_empty() {
            state.idle_since = Instant::now();
        }
        drop(state);
        self.changed.notify_one();
    }
}

impl Hub {
    /// Decides what `feed`'s poll loop does next; retires the feed when nothing is left to do.
    pub(super) fn next_step(&self, feed: &Feed) -> Step {
        if self.shutdown.is_cancelled() {
            return Step::Retire;
        }
        let now = Instant::now();
        let mut feeds = lock(&self.feeds);
        let mut state = lock(&feed.state);
        if state.wants_polling(&self.settings, now) {
            return Step::Poll;
        }
        if !state.members.is_empty() {
            // Watchers of a lost session: they are being told and will leave.
            return Step::Wait(None);
        }
        state.ring.expire(now);
        if let Some(empty_at) = state.ring.empty_at() {
            // Not polled any more, but kept so that resuming watchers can replay.
            return Step::Wait(Some(empty_at));
        }
        let high_water = state.ring.high_water();
        if high_water > 0 {
            feeds.retired.insert(feed.agent, high_water);
        }
        feeds.live.remove(&feed.agent);
        Step::Retire
    }
}
