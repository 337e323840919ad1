//! Subscribing: admitting a new watcher (shutdown, resume token, permit, places among the
//! polled agents, handover, sessions), making it a member of its agents' feeds, and working out
//! its replay and gap, all under the publish lock so that its replay ends exactly where its
//! live events begin. Keeps the watchers' permits and ids. Knows nothing of how events are
//! read from the gateway.
use std::sync::{
    atomic::{AtomicBool, AtomicU64, Ordering},
    Arc,
};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

use super::{
    feeds::Member,
    hub::Room,
    numbering::Publishing,
    polled::PolledAgentsFull,
    queue,
    watcher::{Gap, GapCause, Membership, Watcher, WatcherStart},
    EventSettings, KindFilter, ReleaseEvent, ResumeToken,
};
use crate::{domain::AgentId, gateway::Session, sessions::SessionsFull};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("no CC-Gateway session is known for agent(s) {}", list(.0))]
    NoSession(Vec<AgentId>),
    #[error("{} {}, the most this facade allows", .0.limit, .0.holders)]
    TooManyWatchers(WatcherLimit),
    #[error("the resume token is not one this facade issued")]
    UnknownToken,
    #[error("the facade is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    SessionsFull(#[from] SessionsFull),
    #[error(transparent)]
    TooManyPolledAgents(#[from] PolledAgentsFull),
}

/// The pool of permits that refused a watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatcherLimit {
    limit: usize,
    /// Who holds its permits, e.g. "watchers are open".
    holders: &'static str,
}

pub(super) fn list(agents: &[AgentId]) -> String {
    agents
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The pools a watcher's permit comes from, and the watchers' ids.
#[derive(Debug)]
pub(super) struct WatcherPermits {
    watchers: Permits,
    release_waiters: Permits,
    next_watcher_id: AtomicU64,
}

/// Which pool a new watcher's permit comes from.
#[derive(Debug, Clone, Copy)]
pub(super) enum Pool {
    /// Watchers from [`EventHub::subscribe`](super::EventHub::subscribe).
    Watchers,
    /// Releases waiting for their event.
    ReleaseWaiters,
}

impl WatcherPermits {
    pub fn new(settings: &EventSettings) -> Self {
        Self {
            watchers: Permits::new(settings.max_watchers, "watchers are open"),
            release_waiters: Permits::new(
                settings.max_release_waiters,
                "ReleaseCalls are waiting for their release event",
            ),
            next_watcher_id: AtomicU64::new(0),
        }
    }

    /// Permits of `pool` held now.
    pub fn in_use(&self, pool: Pool) -> usize {
        self.pool(pool).in_use()
    }

    fn pool(&self, pool: Pool) -> &Permits {
        match pool {
            Pool::Watchers => &self.watchers,
            Pool::ReleaseWaiters => &self.release_waiters,
        }
    }

    fn next_watcher_id(&self) -> u64 {
        self.next_watcher_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// One pool of watcher permits; a watcher holds its permit until it is dropped.
#[derive(Debug)]
struct Permits {
    semaphore: Arc<Semaphore>,
    limit: WatcherLimit,
}

impl Permits {
    fn new(limit: usize, holders: &'static str) -> Self {
        Self {
            semaphore: Arc::new(Semaphore::new(limit)),
            limit: WatcherLimit { limit, holders },
        }
    }

    fn take(&self) -> Result<OwnedSemaphorePermit, SubscribeError> {
        self.semaphore
            .clone()
            .try_acquire_owned()
            .map_err(|_| SubscribeError::TooManyWatchers(self.limit))
    }

    fn in_use(&self) -> usize {
        self.limit.limit - self.semaphore.available_permits()
    }
}

/// What a new watcher asks for.
pub(super) struct Request<'a> {
    pub agents: &'a [AgentId],
    /// Where to resume; `None`: live from now.
    pub from: Option<ResumeToken>,
    pub kinds: KindFilter,
    /// One agent's session, handed over by the watcher.
    pub handover: Option<(AgentId, Session)>,
}

/// An admitted watcher's reservations among the polled agents (see
/// [`FeedRegistry::admit`](super::feeds::FeedRegistry::admit)) until it joins its agents'
/// feeds; dropped before, because something refused the watcher after all, it withdraws them.
struct Admission<'a> {
    room: &'a Room,
    /// Empty once joined.
    agents: &'a [AgentId],
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if !self.agents.is_empty() {
            self.room.feeds.lock().withdraw(self.agents);
        }
    }
}

/// What joining its agents' feeds gives a new watcher.
struct Joined {
    memberships: Vec<Membership>,
    /// Kept events after its position, in sequence order.
    replay: Vec<Arc<ReleaseEvent>>,
    /// Agents whose feeds no longer keep every event after its position.
    evicted: Vec<AgentId>,
}

impl Room {
    /// A new watcher holding a permit from `pool`, or why it cannot have one.
    pub(super) fn subscribe(
        self: &Arc<Self>,
        pool: Pool,
        mut request: Request<'_>,
    ) -> Result<Watcher, SubscribeError> {
        let (permit, admission) = self.admit(pool, &mut request)?;
        let overflowed = Arc::new(AtomicBool::new(false));
        let (sender, live) = queue::queue();
        let member = Member {
            watcher_id: self.permits.next_watcher_id(),
            sender,
            overflowed: overflowed.clone(),
        };

        let publishing = self.numbering.publish();
        let current = publishing.delivered();
        let position = match request.from {
            Some(token) if token.epoch == self.numbering.epoch() => token.sequence,
            _ => current,
        };
        let mut joined = self.join_feeds(&publishing, admission, position, &request.kinds, &member);
        // A shared log keeps what the rings here do not: read it, before anything live.
        let backfill = (self.log.keeps_history()
            && !joined.evicted.is_empty()
            && position < current)
            .then(|| {
                let agents = std::mem::take(&mut joined.evicted);
                (agents.clone(), self.log.read(agents, position, current))
            });
        Ok(Watcher::new(
            WatcherStart {
                position: self.numbering.token(position),
                memberships: joined.memberships,
                live,
                overflowed,
                replay: joined.replay,
                replay_end: current,
                gap: self.gap(&request, joined.evicted),
                backfill,
                kinds: request.kinds,
                permit,
            },
            self,
        ))
    }

    /// Everything that can refuse a watcher, before anything changes. The places of its agents
    /// among the polled agents are reserved before the handover (one agent's session) is
    /// offered to the session registry, which happens only once nothing else can refuse it, so
    /// a refused request leaves no state behind (the admission, dropped, withdraws).
    fn admit<'a, 'r: 'a>(
        &'a self,
        pool: Pool,
        request: &mut Request<'r>,
    ) -> Result<(OwnedSemaphorePermit, Admission<'a>), SubscribeError> {
        if self.shutdown.is_cancelled() {
            return Err(SubscribeError::ShuttingDown);
        }
        // Sequence numbers only grow: a token ahead of them now is ahead for good.
        if request.from.is_some_and(|t| {
            t.epoch == self.numbering.epoch() && t.sequence > self.numbering.known_end()
        }) {
            return Err(SubscribeError::UnknownToken);
        }
        let permit = self.permits.pool(pool).take()?;
        self.feeds.lock().admit(request.agents)?;
        let admission = Admission {
            room: self,
            agents: request.agents,
        };
        if let Some((agent, session)) = request.handover.take() {
            self.sessions.registry().offer(agent, session)?;
        }
        let missing: Vec<AgentId> = request
            .agents
            .iter()
            .copied()
            .filter(|a| self.sessions.registry().get(*a).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(SubscribeError::NoSession(missing));
        }
        Ok((permit, admission))
    }

    /// Makes the admitted watcher a member of each agent's feed (creating a missing feed and
    /// its poll loop) and collects what the feeds kept after `position`: while `publishing`,
    /// so that no event is delivered between the position and the membership.
    fn join_feeds(
        self: &Arc<Self>,
        _publishing: &Publishing<'_>,
        mut admission: Admission<'_>,
        position: u64,
        kinds: &KindFilter,
        member: &Member,
    ) -> Joined {
        let now = Instant::now();
        let mut joined = Joined {
            memberships: Vec::with_capacity(admission.agents.len()),
            replay: Vec::new(),
            evicted: Vec::new(),
        };
        let mut feeds = self.feeds.lock();
        for &agent in std::mem::take(&mut admission.agents) {
            let feed = feeds.admitted_feed(self, agent);
            let kept = feed.join(member.clone(), position, kinds, now);
            if kept.evicted {
                joined.evicted.push(agent);
            }
            joined.replay.extend(kept.events);
            joined
                .memberships
                .push(Membership::new(feed, member.watcher_id));
        }
        drop(feeds);
        joined.replay.sort_by_key(|e| e.token.sequence);
        joined
    }

    /// Why events after the resume token may be missing, if they may: a token of another
    /// process lifetime misses everything in between, a feed that evicted events after it
    /// misses those.
    fn gap(&self, request: &Request<'_>, evicted: Vec<AgentId>) -> Option<Gap> {
        let from = request.from?;
        if from.epoch != self.numbering.epoch() {
            return Some(Gap {
                cause: GapCause::OtherProcess,
                agents: request.agents.to_vec(),
            });
        }
        (!evicted.is_empty()).then_some(Gap {
            cause: GapCause::Evicted,
            agents: evicted,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use crate::domain::AgentId;
    use crate::events::{
        testing::{agent, hub, publish, ready, sign_in},
        EventSettings, KindFilter, PolledAgentsFull, SubscribeError, Watcher, WatcherItem,
    };

    #[derive(Debug, Clone)]
    enum Op {
        /// An event of agent n (a feed exists only while someone watched it).
        Publish(u32),
        /// A watcher of the agents in the mask, resuming where watcher n stands, if any.
        Subscribe(u8, Option<usize>),
        /// Watcher n reads what is ready.
        Read(usize),
        /// Watcher n goes away.
        Drop(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u32..3).prop_map(Op::Publish),
            1 => (1u8..8, proptest::option::of(0usize..6)).prop_map(|(m, r)| Op::Subscribe(m, r)),
            2 => (0usize..6).prop_map(Op::Read),
            1 => (0usize..6).prop_map(Op::Drop),
        ]
    }

    struct Tracked {
        watcher: Option<Watcher>,
        agents: Vec<AgentId>,
        /// What it should have delivered: everything of its agents after its start.
        start: u64,
        delivered: Vec<u64>,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the interleaving of events, subscriptions, reads and departures, every
        /// watcher delivers exactly the events of its agents after its start (token or "now"),
        /// in sequence order: no duplicate, no gap, across agents too.
        #[test]
        fn watchers_deliver_every_event_after_their_start_in_order(ops in proptest::collection::vec(op(), 1..60)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
            rt.block_on(async {
                let hub = hub(EventSettings { replay_events: 1000, watcher_buffer: 1000, ..EventSettings::default() });
                for n in 0..3 { sign_in(&hub, agent(n)); }
                let mut published: Vec<(u64, AgentId)> = Vec::new();
                let mut watchers: Vec<Tracked> = Vec::new();
                for op in ops {
                    match op {
                        Op::Publish(n) => {
                            if publish(&hub, agent(n)) {
                                published.push((hub.room.numbering.delivered(), agent(n)));
                            }
                        }
                        Op::Subscribe(mask, resume) => {
                            let agents: Vec<AgentId> = (0..3).filter(|n| mask & (1 << n) != 0).map(agent).collect();
                            let from = resume
                                .and_then(|i| watchers.get(i))
                                .and_then(|w| w.watcher.as_ref())
                                .map(Watcher::position);
                            let watcher = hub.subscribe(&agents, from, KindFilter::default(), None).unwrap();
                            let start = watcher.position().sequence;
                            watchers.push(Tracked { watcher: Some(watcher), agents, start, delivered: Vec::new() });
                        }
                        Op::Read(i) => {
                            let Some(w) = watchers.get_mut(i) else { continue };
                            let Some(watcher) = w.watcher.as_mut() else { continue };
                            for item in ready(watcher) {
                                match item {
                                    Ok(WatcherItem::Event(e)) => w.delivered.push(e.token.sequence),
                                    other => prop_assert!(false, "unexpected {other:?}"),
                                }
                            }
                            let expected: Vec<u64> = published
                                .iter()
                                .filter(|(s, a)| *s > w.start && w.agents.contains(a))
                                .map(|(s, _)| *s)
                                .collect();
                            prop_assert_eq!(&w.delivered, &expected);
                        }
                        Op::Drop(i) => {
                            if let Some(w) = watchers.get_mut(i) { w.watcher = None; }
                        }
                    }
                }
                prop_assert_eq!(hub.watchers(), watchers.iter().filter(|w| w.watcher.is_some()).count());
                Ok(())
            })?;
        }
    }

    /// Separate capacity: watchers at their limit do not keep a release
    /// from waiting for its event, and release waiters at theirs do not keep a watcher out.
    #[tokio::test]
    async fn watchers_and_release_waiters_draw_from_pools_of_their_own() {
        let hub = hub(EventSettings {
            max_watchers: 1,
            max_release_waiters: 1,
            ..EventSettings::default()
        });
        sign_in(&hub, agent(0));
        let all = KindFilter::default;
        let watcher = hub.subscribe(&[agent(0)], None, all(), None).unwrap();
        let refused = hub.subscribe(&[agent(0)], None, all(), None).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "1 watchers are open, the most this facade allows"
        );
        let waiter = hub.subscribe_release_waiter(agent(0), all()).await.unwrap();
        let refused = hub
            .subscribe_release_waiter(agent(0), all())
            .await
            .unwrap_err();
        assert_eq!(
            refused.to_string(),
            "1 ReleaseCalls are waiting for their release event, the most this facade allows"
        );
        assert_eq!(
            (
                hub.watchers(),
                hub.release_waiters(),
                hub.watchers_of(agent(0))
            ),
            (1, 1, 2)
        );
        drop(watcher);
        let _watcher = hub.subscribe(&[agent(0)], None, all(), None).unwrap();
        drop(waiter);
        let _waiter = hub.subscribe_release_waiter(agent(0), all()).await.unwrap();
    }

    /// --max-polled-agents: a watcher that needs more new poll loops than are left is refused
    /// and takes none; one refused after its admission (an agent without a session) gives its
    /// places back; agents already polled take no place, for watchers and release waiters.
    #[tokio::test(start_paused = true)]
    async fn watchers_take_places_among_the_polled_agents_all_or_none() {
        let hub = hub(EventSettings {
            max_polled_agents: 2,
            ..EventSettings::default()
        });
        for n in 0..3 {
            sign_in(&hub, agent(n));
        }
        let all = KindFilter::default;
        let refused = hub
            .subscribe(&[agent(0), agent(3)], None, all(), None)
            .unwrap_err();
        assert_eq!(refused, SubscribeError::NoSession(vec![agent(3)]));
        assert_eq!(
            hub.polled_agents_in_use(),
            0,
            "a refused admission keeps no place"
        );

        let _first = hub.subscribe(&[agent(0)], None, all(), None).unwrap();
        let refused = hub
            .subscribe(&[agent(1), agent(2)], None, all(), None)
            .unwrap_err();
        assert_eq!(
            refused,
            SubscribeError::TooManyPolledAgents(PolledAgentsFull {
                in_use: 1,
                limit: 2,
                agents: vec![agent(1), agent(2)],
            })
        );
        assert_eq!(
            (
                hub.polled_agents_in_use(),
                hub.watchers(),
                hub.agents_to_poll()
            ),
            (1, 1, vec![agent(0)])
        );

        let _second = hub.subscribe(&[agent(1)], None, all(), None).unwrap();
        let _both = hub
            .subscribe(&[agent(0), agent(1)], None, all(), None)
            .unwrap();
        let _waiter = hub.subscribe_release_waiter(agent(1), all()).await.unwrap();
        assert!(matches!(
            hub.subscribe_release_waiter(agent(2), all()).await,
            Err(SubscribeError::TooManyPolledAgents(_))
        ));
        assert_eq!(hub.polled_agents_in_use(), 2);
        assert_eq!(hub.agents_to_poll(), [agent(0), agent(1)]);
    }
}
