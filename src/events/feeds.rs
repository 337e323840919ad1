//! The feed registry: one feed per agent somebody watches (its poll loop, replay ring and
//! members), created by the first watcher and retired once nobody watches the agent, its grace
//! period is over and nothing is left to replay; and the polled agents, the feeds whose loop
//! may poll, which `--max-polled-agents` bounds. Knows neither how events are numbered nor how
//! a watcher is built.
use std::{
    collections::{BTreeSet, HashMap},
    ops::{Deref, DerefMut},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use super::{
    hub::Room,
    numbering::BelowPublish,
    ownership::RemoteInterest,
    poll::PollLoop,
    polled::{PolledAgents, PolledAgentsFull},
    queue::{self, Refused},
    ring::ReplayRing,
    watcher::SessionEnding,
    EventSettings, KindFilter, ReleaseEvent,
};
use crate::{domain::AgentId, lock};

/// How often agents other replicas watch that did not fit among the polled agents are tried
/// again.
const REMOTE_RETRY: Duration = Duration::from_secs(1);

/// The feed registry behind its lock, which comes after the publish lock and before any feed's
/// state (see [`numbering`](super::numbering)).
#[derive(Debug)]
pub(super) struct Feeds {
    registry: Mutex<FeedRegistry>,
}

/// The feed registry, locked; the publish lock may not be taken while it is held.
pub(super) struct LockedFeeds<'a> {
    registry: MutexGuard<'a, FeedRegistry>,
    /// Dropped after the lock it marks.
    _order: BelowPublish,
}

#[derive(Debug)]
pub(super) struct FeedRegistry {
    live: HashMap<AgentId, Arc<Feed>>,
    /// The highest sequence each retired feed had seen: a token from before it missed
    /// something. Eight bytes per agent ever watched, bounded by the agent id range.
    retired: HashMap<AgentId, u64>,
    /// The agents whose feed's loop may poll, and those reserved by watchers being admitted.
    polled: PolledAgents,
}

#[derive(Debug)]
pub(super) struct Feed {
    pub agent: AgentId,
    state: Mutex<FeedState>,
    /// Wakes the poll loop when watchers come or go.
    pub changed: Notify,
}

#[derive(Debug)]
struct FeedState {
    ring: ReplayRing,
    members: Vec<Member>,
    /// When the last watcher left; meaningful while there is none.
    idle_since: Instant,
    /// The gateway refused the session; polling waits for a watcher with a new one.
    session_lost: bool,
    /// Another replica's clients watch the agent, and this replica owns its polling.
    remote: bool,
    /// When the last of this replica's watchers left, if one ever joined.
    last_member_left: Option<Instant>,
    /// The last poll failed; the loop is backing off.
    poll_failing: bool,
    /// How many items a watcher may have queued; one more cuts it off.
    watcher_buffer: usize,
}

/// A watcher's [`Membership`](super::watcher::Membership) as the feed sees it: where to
/// deliver, and the flag that cuts the watcher off when it falls behind.
#[derive(Debug, Clone)]
pub(super) struct Member {
    pub watcher_id: u64,
    pub sender: queue::Sender<FeedItem>,
    pub overflowed: Arc<AtomicBool>,
}

/// Pointer-sized payloads keep every watcher's live queue small: its buffer keeps the largest
/// length it reached, in items.
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

impl Feeds {
    /// At most `max_polled_agents` agents polled at once.
    pub fn new(max_polled_agents: usize) -> Self {
        Self {
            registry: Mutex::new(FeedRegistry {
                live: HashMap::new(),
                retired: HashMap::new(),
                polled: PolledAgents::new(max_polled_agents),
            }),
        }
    }

    /// Locks the registry: after the publish lock, if at all, never before it.
    pub fn lock(&self) -> LockedFeeds<'_> {
        let order = BelowPublish::mark();
        LockedFeeds {
            registry: lock(&self.registry),
            _order: order,
        }
    }
}

impl Deref for LockedFeeds<'_> {
    type Target = FeedRegistry;

    fn deref(&self) -> &FeedRegistry {
        &self.registry
    }
}

impl DerefMut for LockedFeeds<'_> {
    fn deref_mut(&mut self) -> &mut FeedRegistry {
        &mut self.registry
    }
}

impl FeedRegistry {
    /// Admits a watcher of `agents`: reserves a place among the polled agents for each one
    /// nobody polls yet, all or none. The watcher then joins each agent's feed
    /// ([`admitted_feed`](Self::admitted_feed)) or, refused after all, withdraws.
    pub fn admit(&mut self, agents: &[AgentId]) -> Result<(), PolledAgentsFull> {
        self.polled.admit(agents)
    }

    /// An admitted watcher will not join its agents' feeds after all: their reservations go,
    /// and feeds nobody else awaits may stop polling or retire.
    pub fn withdraw(&mut self, agents: &[AgentId]) {
        for &agent in agents {
            if self.polled.withdraw(agent) {
                if let Some(feed) = self.live.get(&agent) {
                    feed.changed.notify_one();
                }
            }
        }
    }

    /// Places taken among the polled agents.
    pub fn polled_agents_in_use(&self) -> usize {
        self.polled.in_use()
    }

    /// The agent's feed for a watcher admitted for it, created (with its poll loop) when
    /// missing; from now on the agent is polled.
    pub fn admitted_feed(&mut self, room: &Arc<Room>, agent: AgentId) -> Arc<Feed> {
        self.polled.join(agent);
        self.feed_of(room, agent)
    }

    /// The agent's feed, polled for other replicas' watchers from now on: created (with its
    /// poll loop) when missing, if it fits among the polled agents.
    fn remote_feed(
        &mut self,
        room: &Arc<Room>,
        agent: AgentId,
    ) -> Result<Arc<Feed>, PolledAgentsFull> {
        self.polled.poll_for_others(agent)?;
        let feed = self.feed_of(room, agent);
        let mut state = lock(&feed.state);
        state.remote = true;
        state.session_lost = false;
        drop(state);
        feed.changed.notify_one();
        Ok(feed)
    }

    fn feed_of(&mut self, room: &Arc<Room>, agent: AgentId) -> Arc<Feed> {
        if let Some(feed) = self.live.get(&agent) {
            return feed.clone();
        }
        let floor = room.ring_floor(self.retired.remove(&agent).unwrap_or(0));
        let feed = Arc::new(Feed {
            agent,
            state: Mutex::new(FeedState {
                ring: ReplayRing::new(room.settings.replay_events, room.settings.replay_age, floor),
                members: Vec::new(),
                idle_since: Instant::now(),
                session_lost: false,
                remote: false,
                last_member_left: None,
                poll_failing: false,
                watcher_buffer: room.settings.watcher_buffer.max(1),
            }),
            changed: Notify::new(),
        });
        self.live.insert(agent, feed.clone());
        PollLoop::start(room, feed.clone());
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
    fn wants_polling(&self, settings: &EventSettings, now: Instant) -> bool {
        !self.session_lost
            && (!self.members.is_empty() || self.remote || now < self.idle_since + settings.grace)
    }

    /// Hands `item` to every watcher without waiting: a watcher whose buffer is full is cut off
    /// (it learns so and ends), and nobody else is held up.
    fn deliver(&mut self, item: &FeedItem) {
        let before = self.members.len();
        self.members.retain(|s| {
            if s.overflowed.load(Ordering::Relaxed) {
                return false;
            }
            match s.sender.try_send(item.clone(), self.watcher_buffer) {
                Ok(()) => true,
                Err(Refused::Full) => {
                    s.overflowed.store(true, Ordering::Relaxed);
                    false
                }
                // The watcher is gone; its memberships remove it from the other feeds.
                Err(Refused::ReceiverGone) => false,
            }
        });
        if before > 0 && self.members.is_empty() {
            self.idle_since = Instant::now();
        }
    }

    /// This replica's clients watch the agent, or did within the grace period.
    fn watched_here(&self, settings: &EventSettings, now: Instant) -> bool {
        !self.members.is_empty()
            || self
                .last_member_left
                .is_some_and(|left| now < left + settings.grace)
    }
}

impl Feed {
    pub(super) fn set_failing(&self, failing: bool) {
        lock(&self.state).poll_failing = failing;
    }

    pub(crate) fn is_failing(&self) -> bool {
        lock(&self.state).poll_failing
    }

    /// Watchers and release waiters the feed delivers to.
    pub(super) fn members(&self) -> usize {
        lock(&self.state).members.len()
    }

    pub(super) fn wants_polling(&self, settings: &EventSettings, now: Instant) -> bool {
        lock(&self.state).wants_polling(settings, now)
    }

    /// Whether this replica's clients watch the agent (see
    /// [`PollOwnership::set_watched`](super::ownership::PollOwnership::set_watched)), and
    /// when that, or the polling, ends by itself (a grace period running out).
    pub(super) fn interest(
        &self,
        settings: &EventSettings,
        now: Instant,
    ) -> (bool, Option<Instant>) {
        let state = lock(&self.state);
        let ends = if state.members.is_empty() {
            [
                state.last_member_left,
                (!state.remote).then_some(state.idle_since),
            ]
            .into_iter()
            .flatten()
            .map(|since| since + settings.grace)
            .filter(|end| *end > now)
            .min()
        } else {
            None
        };
        (state.watched_here(settings, now), ends)
    }

    /// Other replicas' watchers of the agent are gone (or this replica no longer owns its
    /// polling): without watchers here, its grace period begins.
    fn others_stopped_watching(&self) {
        let mut state = lock(&self.state);
        state.remote = false;
        if state.members.is_empty() {
            state.idle_since = Instant::now();
        }
        drop(state);
        self.changed.notify_one();
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

    /// Keeps the release event numbered last in the ring and hands it to the watchers.
    pub(super) fn deliver_event(&self, event: Arc<ReleaseEvent>) {
        let mut state = lock(&self.state);
        state.ring.push(event.clone(), Instant::now());
        state.deliver(&FeedItem::Event(event));
    }

    /// Tells the watchers the agent's session ended; polling waits for a watcher with a new one.
    pub(super) fn deliver_session_end(&self, ending: SessionEnding) {
        let mut state = lock(&self.state);
        state.session_lost = true;
        state.deliver(&FeedItem::SessionEnded(Arc::new((self.agent, ending))));
    }

    /// The gateway will not deliver the agent's events: polling waits for a watcher with a new
    /// session (its watchers are told through the log).
    pub(super) fn lose_session(&self) {
        lock(&self.state).session_lost = true;
    }

    #[cfg(test)]
    pub(super) fn session_lost(&self) -> bool {
        lock(&self.state).session_lost
    }

    /// A watcher leaves: from now on it gets nothing from this agent.
    pub(super) fn leave(&self, watcher_id: u64) {
        let mut state = lock(&self.state);
        let before = state.members.len();
        state.members.retain(|s| s.watcher_id != watcher_id);
        if before > 0 && state.members.is_empty() {
            let now = Instant::now();
            state.idle_since = now;
            state.last_member_left = Some(now);
        }
        drop(state);
        self.changed.notify_one();
    }
}

impl Room {
    /// Decides what `feed`'s poll loop does next; retires the feed when nothing is left to do.
    pub(super) fn next_step(&self, feed: &Feed) -> Step {
        if self.shutdown.is_cancelled() {
            return Step::Retire;
        }
        let now = Instant::now();
        let mut feeds = self.feeds.lock();
        let mut state = lock(&feed.state);
        if state.wants_polling(&self.settings, now) {
            return Step::Poll;
        }
        if !state.members.is_empty() || state.remote || feeds.polled.is_awaited(feed.agent) {
            // Watchers of a lost session: they are being told and will leave (other replicas'
            // watchers, when their interest ends). Or a watcher admitted for the agent is about
            // to join (or to withdraw): either wakes the loop.
            return Step::Wait(None);
        }
        // Not polled any more (the grace period is over, or the session was lost): the
        // agent's place among the polled agents is free.
        feeds.polled.stop(feed.agent);
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

impl Room {
    /// Keeps a feed polling each agent that only other replicas' clients watch, while this
    /// replica owns the agent's polling: it counts among the polled agents, and its grace
    /// period begins when their interest ends. Agents that did not fit are tried again every
    /// [`REMOTE_RETRY`] (places free up as grace periods end). Ends on shutdown.
    pub(super) async fn follow_remote_interest(self: Arc<Self>) {
        let mut interest = self.ownership.remote_interest();
        let mut followed = BTreeSet::new();
        let mut refused = BTreeSet::new();
        loop {
            let wanted = interest.borrow_and_update().clone();
            followed = self.follow(followed, &wanted, &mut refused);
            let retry = async {
                if refused.is_empty() {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(REMOTE_RETRY).await;
            };
            tokio::select! {
                changed = interest.changed() => if changed.is_err() { break },
                () = retry => {}
                () = self.shutdown.cancelled() => break,
            }
        }
    }

    /// Starts following the agents of `wanted` not followed yet, stops following those no
    /// longer wanted; returns the agents followed now. `refused`: the wanted agents that did
    /// not fit (each logged once).
    fn follow(
        self: &Arc<Self>,
        mut followed: BTreeSet<AgentId>,
        wanted: &RemoteInterest,
        refused: &mut BTreeSet<AgentId>,
    ) -> BTreeSet<AgentId> {
        let mut feeds = self.feeds.lock();
        followed.retain(|agent| {
            let keep = wanted.contains(agent);
            if !keep {
                if let Some(feed) = feeds.get(*agent) {
                    feed.others_stopped_watching();
                }
            }
            keep
        });
        refused.retain(|agent| wanted.contains(agent));
        for &agent in wanted.iter() {
            if followed.contains(&agent) {
                continue;
            }
            match feeds.remote_feed(self, agent) {
                Ok(_) => {
                    refused.remove(&agent);
                    followed.insert(agent);
                }
                Err(full) => {
                    if refused.insert(agent) {
                        tracing::warn!(
                            %agent,
                            "another replica's clients watch the agent, but it cannot be polled here yet: {full}"
                        );
                    }
                }
            }
        }
        followed
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Step;
    use crate::events::{
        testing::{agent, hub, publish, sign_in},
        EventSettings, KindFilter, PolledAgentsFull, SubscribeError,
    };

    /// The poll loop's steps are taken by hand here (the loop itself runs only when the test
    /// awaits, and finds no gateway).
    #[tokio::test(start_paused = true)]
    async fn a_feed_frees_its_place_when_it_stops_polling_but_not_while_a_watcher_is_awaited() {
        let hub = hub(EventSettings {
            max_polled_agents: 1,
            grace: Duration::ZERO,
            ..EventSettings::default()
        });
        sign_in(&hub, agent(0));
        sign_in(&hub, agent(1));
        let all = KindFilter::default;
        let watcher = hub.subscribe(&[agent(0)], None, all(), None).unwrap();
        let feed = hub.room.feeds.lock().get(agent(0)).unwrap();
        assert_eq!(hub.room.next_step(&feed), Step::Poll);
        drop(watcher);

        // A watcher admitted for the agent, not joined yet: the feed waits for it, polled.
        hub.room.feeds.lock().admit(&[agent(0)]).unwrap();
        assert_eq!(hub.room.next_step(&feed), Step::Wait(None));
        assert_eq!(hub.polled_agents_in_use(), 1);
        hub.room.feeds.lock().withdraw(&[agent(0)]);
        assert_eq!(hub.room.next_step(&feed), Step::Retire);
        assert_eq!(hub.polled_agents_in_use(), 0);
        assert!(hub.room.feeds.lock().get(agent(0)).is_none());

        // A feed kept for replay alone polls nothing and holds no place: watching its agent
        // again takes one.
        let watcher = hub.subscribe(&[agent(0)], None, all(), None).unwrap();
        let feed = hub.room.feeds.lock().get(agent(0)).unwrap();
        assert!(publish(&hub, agent(0)));
        drop(watcher);
        assert!(matches!(hub.room.next_step(&feed), Step::Wait(Some(_))));
        assert_eq!(hub.polled_agents_in_use(), 0);
        let _other = hub.subscribe(&[agent(1)], None, all(), None).unwrap();
        assert_eq!(
            hub.subscribe(&[agent(0)], None, all(), None).unwrap_err(),
            SubscribeError::TooManyPolledAgents(PolledAgentsFull {
                in_use: 1,
                limit: 1,
                agents: vec![agent(0)],
            })
        );
    }
}
