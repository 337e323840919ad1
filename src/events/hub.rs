//! The fan-out hub: one feed per watched agent (its poll loop, replay ring and watchers).
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{
    sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    poll::PollLoop,
    watcher::{Gap, GapCause, Membership, SessionEnding, Watcher, WatcherStart},
    EventSettings, KindFilter, ReleaseEvent, ReleaseKind, ReplayRing, ResumeToken,
};
use crate::{
    domain::AgentId,
    gateway::{
        event::{EventBody, PolledEvent},
        Session,
    },
    lifecycle::Lifecycle,
    lock,
    sessions::{Sessions, SessionsFull},
};

/// Counters of what the poll loops read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventStats {
    pub release_events: u64,
    /// Events of other types, read and dropped.
    pub skipped_events: u64,
    /// Events that could not be read; logged and dropped.
    pub malformed_events: u64,
    /// Fields that failed validation and were left out of events delivered without them
    /// (a customer release's `number`); logged by name, never with their value.
    pub dropped_fields: u64,
    /// Polls that failed (transport, HTTP, unexpected retcode) and were retried after a pause.
    pub poll_failures: u64,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    release: AtomicU64,
    skipped: AtomicU64,
    malformed: AtomicU64,
    dropped_fields: AtomicU64,
    pub poll_failures: AtomicU64,
}

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
}

/// The pool of permits that refused a watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatcherLimit {
    pub limit: usize,
    /// Who holds its permits, e.g. "watchers are open".
    pub holders: &'static str,
}

fn list(agents: &[AgentId]) -> String {
    agents
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Cheap to clone; every clone is the same hub.
#[derive(Debug, Clone)]
pub struct EventHub {
    hub: Arc<Hub>,
}

#[derive(Debug)]
pub(super) struct Hub {
    pub sessions: Sessions,
    pub settings: EventSettings,
    /// Tells tokens of this process lifetime from older ones.
    epoch: u64,
    /// The last sequence number handed out.
    sequence: AtomicU64,
    /// Held while an event is numbered and delivered, and while a watcher subscribes, so every
    /// watcher receives events in sequence order and its replay ends where its live part
    /// begins. Taken before `feeds` and before any feed's state.
    publish: Mutex<()>,
    feeds: Mutex<FeedRegistry>,
    watchers: Permits,
    release_waiters: Permits,
    next_watcher_id: AtomicU64,
    /// The events room's part of the shutdown.
    pub shutdown: CancellationToken,
    /// Every task the room spawns (poll loops, stream forwarders).
    pub tasks: TaskTracker,
    /// The poll loops alone: on shutdown watchers wait for their last polls' answers.
    pub poll_loops: TaskTracker,
    pub counters: Counters,
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

#[derive(Debug, Default)]
struct FeedRegistry {
    live: HashMap<AgentId, Arc<Feed>>,
    /// The highest sequence each retired feed had seen: a token from before it missed
    /// something. Eight bytes per agent ever watched, bounded by the agent id range.
    retired: HashMap<AgentId, u64>,
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
    /// The last poll failed; the loop is backing off.
    poll_failing: bool,
}

/// A watcher's [`Membership`] as the feed sees it: where to deliver, and the flag that cuts the
/// watcher off when it falls behind.
#[derive(Debug)]
struct Member {
    watcher_id: u64,
    sender: mpsc::Sender<FeedItem>,
    overflowed: Arc<AtomicBool>,
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

impl EventHub {
    pub fn new(sessions: Sessions, settings: EventSettings, lifecycle: &Lifecycle) -> Self {
        Self {
            hub: Arc::new(Hub {
                sessions,
                epoch: rand::random(),
                sequence: AtomicU64::new(0),
                publish: Mutex::new(()),
                feeds: Mutex::default(),
                watchers: Permits::new(settings.max_watchers, "watchers are open"),
                release_waiters: Permits::new(
                    settings.max_release_waiters,
                    "ReleaseCalls are waiting for their release event",
                ),
                next_watcher_id: AtomicU64::new(0),
                shutdown: lifecycle.shutdown().child_token(),
                tasks: lifecycle.tasks().clone(),
                poll_loops: TaskTracker::new(),
                counters: Counters::default(),
                settings,
            }),
        }
    }

    pub fn sessions(&self) -> &Sessions {
        &self.hub.sessions
    }

    /// Starts watching `agents` (each must have a session), live from now or, with `from`,
    /// first replaying what came after that token. `handover` (one agent's session, handed
    /// over by the watcher) is offered to the session registry only once nothing else can
    /// refuse the watcher, so a refused request leaves no state behind.
    pub fn subscribe(
        &self,
        agents: &[AgentId],
        from: Option<ResumeToken>,
        kinds: KindFilter,
        handover: Option<(AgentId, Session)>,
    ) -> Result<Watcher, SubscribeError> {
        self.subscribe_with(&self.hub.watchers, agents, from, kinds, handover)
    }

    /// Like [`subscribe`](Self::subscribe) (live from now), for a release that waits for its
    /// event: its permit comes from the release waiters' pool, so open streams cannot starve
    /// releases and waiting releases cannot starve streams.
    pub fn subscribe_release_waiter(
        &self,
        agent: AgentId,
        kinds: KindFilter,
    ) -> Result<Watcher, SubscribeError> {
        self.subscribe_with(&self.hub.release_waiters, &[agent], None, kinds, None)
    }

    fn subscribe_with(
        &self,
        permits: &Permits,
        agents: &[AgentId],
        from: Option<ResumeToken>,
        kinds: KindFilter,
        handover: Option<(AgentId, Session)>,
    ) -> Result<Watcher, SubscribeError> {
        let hub = &self.hub;
        if hub.shutdown.is_cancelled() {
            return Err(SubscribeError::ShuttingDown);
        }
        // Sequence numbers only grow: a token ahead of them now is ahead for good.
        if from.is_some_and(|t| {
            t.epoch == hub.epoch && t.sequence > hub.sequence.load(Ordering::SeqCst)
        }) {
            return Err(SubscribeError::UnknownToken);
        }
        let permit = permits.take()?;
        if let Some((agent, session)) = handover {
            hub.sessions.registry().offer(agent, session)?;
        }
        let missing: Vec<AgentId> = agents
            .iter()
            .copied()
            .filter(|a| hub.sessions.registry().get(*a).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(SubscribeError::NoSession(missing));
        }
        let watcher_id = hub.next_watcher_id.fetch_add(1, Ordering::Relaxed);
        let overflowed = Arc::new(AtomicBool::new(false));
        let (sender, receiver) = mpsc::channel(hub.settings.watcher_buffer.max(1));

        let _order = lock(&hub.publish);
        let current = hub.sequence.load(Ordering::SeqCst);
        let (position, mut gap) = match from {
            None => (current, None),
            Some(token) if token.epoch != hub.epoch => (
                current,
                Some(Gap {
                    cause: GapCause::OtherProcess,
                    agents: agents.to_vec(),
                }),
            ),
            Some(token) => (token.sequence, None),
        };
        let now = Instant::now();
        let mut replay = Vec::new();
        let mut evicted = Vec::new();
        let mut memberships = Vec::with_capacity(agents.len());
        let mut feeds = lock(&hub.feeds);
        for &agent in agents {
            let feed = feeds.feed(hub, agent);
            let mut state = lock(&feed.state);
            state.ring.expire(now);
            if state.ring.floor() > position {
                evicted.push(agent);
            }
            replay.extend(
                state
                    .ring
                    .after(position)
                    .filter(|e| kinds.accepts(e))
                    .cloned(),
            );
            state.members.push(Member {
                watcher_id,
                sender: sender.clone(),
                overflowed: overflowed.clone(),
            });
            state.session_lost = false;
            drop(state);
            feed.changed.notify_one();
            memberships.push(Membership::new(feed, watcher_id));
        }
        drop(feeds);
        if gap.is_none() && from.is_some() && !evicted.is_empty() {
            gap = Some(Gap {
                cause: GapCause::Evicted,
                agents: evicted,
            });
        }
        replay.sort_by_key(|e| e.token.sequence);
        Ok(Watcher::new(WatcherStart {
            position: ResumeToken {
                epoch: hub.epoch,
                sequence: position,
            },
            memberships,
            live: receiver,
            overflowed,
            replay,
            replay_end: current,
            gap,
            kinds,
            heartbeat: hub.settings.heartbeat,
            shutdown: hub.shutdown.clone(),
            poll_loops: hub.poll_loops.clone(),
            tasks: hub.tasks.clone(),
            permit,
        }))
    }

    /// Ends every watcher (after what it already received) and stops the poll loops: the
    /// events room's part of the shutdown, on its own.
    pub fn shut_down(&self) {
        self.hub.shutdown.cancel();
    }

    /// Open watchers (release waiters are counted apart).
    pub fn watchers(&self) -> usize {
        self.hub.watchers.in_use()
    }

    /// Open release waiters.
    pub fn release_waiters(&self) -> usize {
        self.hub.release_waiters.in_use()
    }

    /// Watchers and release waiters the agent's feed delivers to (0 when it has no feed); a
    /// watcher the feed cut off for falling behind is not counted, even before it is dropped.
    pub fn watchers_of(&self, agent: AgentId) -> usize {
        let feed = lock(&self.hub.feeds).live.get(&agent).cloned();
        feed.map_or(0, |feed| lock(&feed.state).members.len())
    }

    /// Agents being polled right now: watched, or in their grace period.
    pub fn polling_agents(&self) -> Vec<AgentId> {
        let feeds: Vec<Arc<Feed>> = lock(&self.hub.feeds).live.values().cloned().collect();
        let now = Instant::now();
        let mut agents: Vec<_> = feeds
            .iter()
            .filter(|f| lock(&f.state).wants_polling(&self.hub.settings, now))
            .map(|f| f.agent)
            .collect();
        agents.sort();
        agents
    }

    pub fn stats(&self) -> EventStats {
        let c = &self.hub.counters;
        EventStats {
            release_events: c.release.load(Ordering::Relaxed),
            skipped_events: c.skipped.load(Ordering::Relaxed),
            malformed_events: c.malformed.load(Ordering::Relaxed),
            dropped_fields: c.dropped_fields.load(Ordering::Relaxed),
            poll_failures: c.poll_failures.load(Ordering::Relaxed),
        }
    }
}

impl FeedRegistry {
    /// The agent's feed, created (with its poll loop) when missing.
    fn feed(&mut self, hub: &Arc<Hub>, agent: AgentId) -> Arc<Feed> {
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
}

impl FeedState {
    fn wants_polling(&self, settings: &EventSettings, now: Instant) -> bool {
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
    pub fn next_step(&self, feed: &Feed) -> Step {
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

    /// Numbers a polled event and delivers it to the feed's watchers, or counts it.
    pub fn observe(
        &self,
        feed: &Feed,
        polled: Result<PolledEvent, crate::gateway::event::MalformedEvent>,
    ) {
        let agent = feed.agent;
        let polled = match polled {
            Ok(polled) => polled,
            Err(malformed) => {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%agent, error = %malformed, "skipped a malformed gateway event");
                return;
            }
        };
        for field in &polled.dropped_fields {
            self.counters.dropped_fields.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%agent, event_type = %polled.event_type, field, "left an invalid field out of a gateway event");
        }
        let (kind, call_id, customer_number) = match polled.body {
            EventBody::CallRelease { call_id } => (ReleaseKind::CallRelease, call_id, None),
            EventBody::CustomerRelease { call_id, number } => (
                ReleaseKind::CustomerRelease,
                call_id,
                (!number.is_empty()).then_some(number),
            ),
            EventBody::Other => {
                self.counters.skipped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%agent, event_type = %polled.event_type, "skipped a gateway event");
                return;
            }
        };
        self.counters.release.fetch_add(1, Ordering::Relaxed);
        let _order = lock(&self.publish);
        let sequence = self.sequence.fetch_add(1, Ordering::SeqCst) + 1;
        let event = Arc::new(ReleaseEvent {
            agent,
            kind,
            call_id,
            customer_number,
            event_time: polled
                .gen_time_ms
                .and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms))),
            observed_time: SystemTime::now(),
            raw_event_type: polled.event_type,
            token: ResumeToken {
                epoch: self.epoch,
                sequence,
            },
        });
        tracing::info!(%agent, kind = ?event.kind, call_id = %event.call_id, sequence, "release event");
        let mut state = lock(&feed.state);
        state.ring.push(event.clone(), Instant::now());
        state.deliver(&FeedItem::Event(event));
    }

    /// The gateway will not deliver the agent's events any more (its session was refused, or
    /// 000-001): tell its watchers; polling waits for a watcher with a session.
    pub fn end_session(&self, feed: &Feed, ending: SessionEnding) {
        let _order = lock(&self.publish);
        let mut state = lock(&feed.state);
        state.session_lost = true;
        state.deliver(&FeedItem::SessionEnded(Arc::new((feed.agent, ending))));
    }
}

impl FeedState {
    /// Hands `item` to every watcher without waiting: a watcher whose buffer is full is cut off
    /// (it learns so and ends), and nobody else is held up.
    fn deliver(&mut self, item: &FeedItem) {
        let before = self.members.len();
        self.members.retain(|s| {
            if s.overflowed.load(Ordering::Relaxed) {
                return false;
            }
            match s.sender.try_send(item.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.overflowed.store(true, Ordering::Relaxed);
                    false
                }
                // The watcher is gone; its guard removes it from the other feeds.
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        if before > 0 && self.members.is_empty() {
            self.idle_since = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures_util::FutureExt;
    use proptest::prelude::*;

    use super::*;
    use crate::{
        domain::CallId,
        events::{Forwarded, WatcherEnd, WatcherItem},
        gateway::{GatewayClient, GatewaySettings, Guid},
        sessions::SessionRegistry,
    };

    /// A hub whose poll loops find no gateway (they back off quietly); tests publish by hand.
    fn hub(settings: EventSettings) -> EventHub {
        let gateway = GatewayClient::new(&GatewaySettings::new("http://127.0.0.1:1")).unwrap();
        EventHub::new(
            Sessions::new(SessionRegistry::default(), gateway),
            settings,
            &Lifecycle::default(),
        )
    }

    fn agent(n: u32) -> AgentId {
        AgentId::parse("agent", &(101 + n).to_string(), 59_999).unwrap()
    }

    fn sign_in(hub: &EventHub, agent: AgentId) {
        let session = Session {
            guid: Guid::parse("guid", "g.AgentGateway0").unwrap(),
            cookies: Default::default(),
        };
        hub.sessions().registry().offer(agent, session).unwrap();
    }

    /// An event polled for `agent`, as its poll loop would hand it over. False when the agent
    /// has no feed: nobody polls it, so no event of it can be observed.
    fn publish(hub: &EventHub, agent: AgentId) -> bool {
        let Some(feed) = lock(&hub.hub.feeds).live.get(&agent).cloned() else {
            return false;
        };
        hub.hub.observe(
            &feed,
            Ok(PolledEvent {
                event_type: "AgentEvent_Call_Release".into(),
                body: EventBody::CallRelease {
                    call_id: CallId::parse("c", "1-1").unwrap(),
                },
                gen_time_ms: None,
                dropped_fields: Vec::new(),
            }),
        );
        true
    }

    /// Everything the watcher has ready now, without waiting.
    fn ready(watcher: &mut Watcher) -> Vec<Result<WatcherItem, WatcherEnd>> {
        std::iter::from_fn(|| watcher.next().now_or_never().flatten()).collect()
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// An event of agent n (a feed exists only while someone watched it).
        Publish(u32),
        /// A watcher of the agents in the mask, resuming where watcher n stands, if any.
        Watcher(u8, Option<usize>),
        /// Watcher n reads what is ready.
        Read(usize),
        /// Watcher n goes away.
        Drop(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u32..3).prop_map(Op::Publish),
            1 => (1u8..8, proptest::option::of(0usize..6)).prop_map(|(m, r)| Op::Watcher(m, r)),
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
                                published.push((hub.hub.sequence.load(Ordering::SeqCst), agent(n)));
                            }
                        }
                        Op::Watcher(mask, resume) => {
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

    /// Collects what a tracing subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Review point 5, first bullet: a customer release whose number fails validation reaches
    /// its watchers without the number; the dropped field is counted, and logged at warn with
    /// the event type and the field's name but not its value.
    #[tokio::test(start_paused = true)]
    async fn a_dropped_field_is_counted_and_logged_without_its_value() {
        let hub = hub(EventSettings::default());
        sign_in(&hub, agent(0));
        let mut watcher = hub
            .subscribe(&[agent(0)], None, KindFilter::default(), None)
            .unwrap();
        let feed = lock(&hub.hub.feeds).live[&agent(0)].clone();
        let bad_number = "9".repeat(65);
        let polled = crate::gateway::event::parse_event(
            agent(0),
            &serde_json::json!({"eventType": "AgentEvent_Customer_Release", "workNo": "101",
                                "content": {"callid": "1-1", "number": bad_number}}),
        );

        let logs = Captured::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || hub.hub.observe(&feed, polled));

        let delivered = ready(&mut watcher);
        let [Ok(WatcherItem::Event(event))] = &delivered[..] else {
            panic!("{delivered:?}");
        };
        assert_eq!(event.kind, ReleaseKind::CustomerRelease);
        assert_eq!(event.customer_number, None);
        let stats = hub.stats();
        assert_eq!((stats.dropped_fields, stats.malformed_events), (1, 0));
        let logs = String::from_utf8(lock(&logs.0).clone()).unwrap();
        let warning = logs
            .lines()
            .find(|line| line.contains("WARN"))
            .unwrap_or_else(|| panic!("no warning in {logs}"));
        assert!(
            warning.contains("event_type=AgentEvent_Customer_Release")
                && warning.contains("field=\"number\""),
            "{warning}"
        );
        assert!(!logs.contains(&bad_number), "{logs}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_overflowing_watcher_is_cut_off_alone_and_told_where_it_stands() {
        let hub = hub(EventSettings {
            watcher_buffer: 2,
            ..EventSettings::default()
        });
        sign_in(&hub, agent(0));
        let mut slow = hub
            .subscribe(&[agent(0)], None, KindFilter::default(), None)
            .unwrap();
        let mut fast = hub
            .subscribe(&[agent(0)], None, KindFilter::default(), None)
            .unwrap();
        assert!(publish(&hub, agent(0)));
        let first = ready(&mut slow);
        assert!(
            matches!(&first[..], [Ok(WatcherItem::Event(_))]),
            "{first:?}"
        );
        let mut fast_seen = ready(&mut fast).len();
        for _ in 0..5 {
            assert!(publish(&hub, agent(0)));
            fast_seen += ready(&mut fast).len();
        }
        assert_eq!(fast_seen, 6);
        let end = ready(&mut slow);
        assert_eq!(
            end,
            [Err(WatcherEnd::TooSlow {
                resume: token(&hub, 1)
            })]
        );
        assert_eq!(
            hub.watchers(),
            2,
            "the ended watcher still holds its permit until dropped"
        );
        drop(slow);
        assert_eq!(hub.watchers(), 1);
    }

    fn token(hub: &EventHub, sequence: u64) -> ResumeToken {
        ResumeToken {
            epoch: hub.hub.epoch,
            sequence,
        }
    }

    /// Sequence numbers of events, `None` for anything else.
    fn sequences(items: &[Result<WatcherItem, WatcherEnd>]) -> Vec<Option<u64>> {
        items
            .iter()
            .map(|item| match item {
                Ok(WatcherItem::Event(event)) => Some(event.token.sequence),
                _ => None,
            })
            .collect()
    }

    /// Everything a forwarded watcher yields until it ends (paused clock: a hang fails at once).
    async fn read_to_end(reader: &mut Forwarded) -> Vec<Result<WatcherItem, WatcherEnd>> {
        let mut items = Vec::new();
        tokio::time::timeout(Duration::from_secs(600), async {
            while let Some(item) = reader.recv().await {
                items.push(item);
            }
        })
        .await
        .expect("the forwarded watcher ended");
        items
    }

    /// Lets every woken task run; on the paused clock nothing else happens meanwhile.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    /// Point 4 of the review (a stream that stops reading is cut off in bounded time), without
    /// sockets: a reader that takes nothing keeps its watcher until the send timeout, not
    /// after; then the permit is back and the feed no longer holds it, and the reader gets
    /// what was queued, then TooSlow whose token resumes with the event that could not be
    /// queued: nothing repeated, nothing missed.
    #[tokio::test(start_paused = true)]
    async fn a_forwarded_watcher_whose_reader_takes_nothing_is_cut_off_at_the_send_timeout() {
        let hub = hub(EventSettings::default());
        sign_in(&hub, agent(0));
        let watcher = hub
            .subscribe(&[agent(0)], None, KindFilter::default(), None)
            .unwrap();
        let mut reader = watcher.forward(2, Duration::from_secs(5));
        for _ in 0..4 {
            assert!(publish(&hub, agent(0)));
        }
        // Two queued, the third waiting for room.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!((hub.watchers(), hub.watchers_of(agent(0))), (1, 1));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!((hub.watchers(), hub.watchers_of(agent(0))), (0, 0));

        let items = read_to_end(&mut reader).await;
        assert_eq!(sequences(&items), [Some(1), Some(2), None]);
        assert_eq!(
            items[2],
            Err(WatcherEnd::TooSlow {
                resume: token(&hub, 2)
            })
        );
        let mut resumed = hub
            .subscribe(
                &[agent(0)],
                Some(token(&hub, 2)),
                KindFilter::default(),
                None,
            )
            .unwrap();
        assert_eq!(sequences(&ready(&mut resumed)), [Some(3), Some(4)]);
    }

    /// Point 4: on an idle agent, heartbeats do not fill the queue first: a reader that takes
    /// nothing is cut off one heartbeat interval plus the send timeout after the first
    /// heartbeat it left unread.
    #[tokio::test(start_paused = true)]
    async fn a_reader_that_takes_no_heartbeats_is_cut_off_a_heartbeat_later() {
        let hub = hub(EventSettings {
            heartbeat: Duration::from_secs(15),
            ..EventSettings::default()
        });
        sign_in(&hub, agent(0));
        let watcher = hub
            .subscribe(&[agent(0)], None, KindFilter::default(), None)
            .unwrap();
        let mut reader = watcher.forward(16, Duration::from_secs(30));
        // Heartbeats at 15 s (queued) and 30 s (waits for the reader until 60 s).
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert_eq!(hub.watchers(), 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!((hub.watchers(), hub.watchers_of(agent(0))), (0, 0));
        let items = read_to_end(&mut reader).await;
        assert!(
            matches!(items[0], Ok(WatcherItem::Heartbeat { .. })),
            "{items:?}"
        );
        assert!(
            matches!(items[1], Err(WatcherEnd::TooSlow { .. })),
            "{items:?}"
        );
    }

    /// A reader that reads (slowly, but within the send timeout) gets everything, heartbeats
    /// included, and keeps its watcher.
    #[tokio::test(start_paused = true)]
    async fn a_forwarded_watcher_whose_reader_reads_in_time_keeps_going() {
        let hub = hub(EventSettings {
            heartbeat: Duration::from_secs(3),
            ..EventSettings::default()
        });
        sign_in(&hub, agent(0));
        let watcher = hub
            .subscribe(&[agent(0)], None, KindFilter::default(), None)
            .unwrap();
        let mut reader = watcher.forward(1, Duration::from_secs(5));
        for _ in 0..3 {
            assert!(publish(&hub, agent(0)));
        }
        for sequence in 1..=3 {
            tokio::time::sleep(Duration::from_secs(4)).await;
            let item = reader.recv().await.unwrap();
            assert_eq!(sequences(&[item]), [Some(sequence)]);
        }
        let heartbeat = reader.recv().await.unwrap();
        assert!(
            matches!(heartbeat, Ok(WatcherItem::Heartbeat { position, .. }) if position == token(&hub, 3)),
            "{heartbeat:?}"
        );
        assert_eq!((hub.watchers(), hub.watchers_of(agent(0))), (1, 1));
    }

    /// Whether the task waits for the watcher or for room in the queue, a reader that goes
    /// frees the watcher at once.
    #[tokio::test(start_paused = true)]
    async fn a_forwarded_watcher_is_freed_as_soon_as_its_reader_goes() {
        let hub = hub(EventSettings::default());
        sign_in(&hub, agent(0));
        let subscribe = || {
            hub.subscribe(&[agent(0)], None, KindFilter::default(), None)
                .unwrap()
                .forward(1, Duration::from_secs(600))
        };
        let waiting_for_room = subscribe();
        for _ in 0..3 {
            assert!(publish(&hub, agent(0)));
        }
        // Live from now: nothing for it yet.
        let waiting_for_events = subscribe();
        settle().await;
        assert_eq!((hub.watchers(), hub.watchers_of(agent(0))), (2, 2));
        drop(waiting_for_events);
        drop(waiting_for_room);
        settle().await;
        assert_eq!((hub.watchers(), hub.watchers_of(agent(0))), (0, 0));
    }

    /// On shutdown a reader that reads gets everything, then ShuttingDown; one that does not
    /// read is freed after the send timeout and learns ShuttingDown (not TooSlow), with the
    /// position after what was queued for it.
    #[tokio::test(start_paused = true)]
    async fn a_forwarded_watcher_ends_shutting_down_whether_its_reader_reads_or_not() {
        let hub = hub(EventSettings::default());
        sign_in(&hub, agent(0));
        let forwarded = || {
            hub.subscribe(&[agent(0)], None, KindFilter::default(), None)
                .unwrap()
                .forward(1, Duration::from_secs(5))
        };
        let mut reading = forwarded();
        let mut not_reading = forwarded();
        for _ in 0..3 {
            assert!(publish(&hub, agent(0)));
        }
        settle().await;
        hub.shut_down();

        let items = read_to_end(&mut reading).await;
        assert_eq!(sequences(&items), [Some(1), Some(2), Some(3), None]);
        assert_eq!(
            items[3],
            Err(WatcherEnd::ShuttingDown {
                resume: token(&hub, 3)
            })
        );

        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(hub.watchers(), 0);
        let items = read_to_end(&mut not_reading).await;
        assert_eq!(sequences(&items), [Some(1), None]);
        assert_eq!(
            items[1],
            Err(WatcherEnd::ShuttingDown {
                resume: token(&hub, 1)
            })
        );
    }

    /// After shutdown began, every send shares one send timeout: a reader that takes an item
    /// just before each send would time out cannot keep the task (and the watcher) alive.
    #[tokio::test(start_paused = true)]
    async fn after_shutdown_a_trickling_reader_cannot_keep_a_forwarded_watcher_alive() {
        let hub = hub(EventSettings::default());
        sign_in(&hub, agent(0));
        let mut reader = hub
            .subscribe(&[agent(0)], None, KindFilter::default(), None)
            .unwrap()
            .forward(1, Duration::from_secs(5));
        for _ in 0..5 {
            assert!(publish(&hub, agent(0)));
        }
        settle().await;
        hub.shut_down();
        let mut items = Vec::new();
        tokio::time::timeout(Duration::from_secs(600), async {
            while let Some(item) = reader.recv().await {
                items.push(item);
                tokio::time::sleep(Duration::from_secs(4)).await;
            }
        })
        .await
        .expect("the forwarded watcher ended");
        // Event 3 was the first sent after shutdown began: the shared deadline ran from then,
        // and event 4 waited past it.
        assert_eq!(sequences(&items), [Some(1), Some(2), Some(3), None]);
        assert_eq!(
            items[3],
            Err(WatcherEnd::ShuttingDown {
                resume: token(&hub, 3)
            })
        );
        assert_eq!(hub.watchers(), 0);
    }

    /// Point 4 of the review, separate capacity: watchers at their limit do not keep a release
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
        let waiter = hub.subscribe_release_waiter(agent(0), all()).unwrap();
        let refused = hub.subscribe_release_waiter(agent(0), all()).unwrap_err();
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
        let _waiter = hub.subscribe_release_waiter(agent(0), all()).unwrap();
    }
}
