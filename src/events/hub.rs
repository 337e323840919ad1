//! The events room's facade: [`EventHub`], what its parts share ([`Hub`]: settings, the event
//! log, the sequence delivered so far and the publish lock, the feed registry, the permit pools,
//! the room's lifecycle) and what the poll loops counted. The parts: `feeds` (the feed
//! registry), `publish` (appending and delivering), `subscribe` (admitting and starting
//! watchers).
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, Mutex,
};

use tokio::time::Instant;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    feeds::{Feed, FeedRegistry},
    log::{EventLog, LogFollower, LogStats},
    ownership::{OwnershipStats, PollOwnership},
    subscribe::{Permits, Request, SubscribeError},
    watcher::Watcher,
    EventSettings, KindFilter, ResumeToken,
};
use crate::{domain::AgentId, gateway::Session, lifecycle::Lifecycle, lock, sessions::Sessions};

/// How long a release waiter waits to learn where a shared log ends.
const LOG_END_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

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
    /// What the event log counted (a shared log's appends and follower).
    pub log: LogStats,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub release: AtomicU64,
    pub skipped: AtomicU64,
    pub malformed: AtomicU64,
    pub dropped_fields: AtomicU64,
    pub poll_failures: AtomicU64,
    /// Polls sent and not answered yet.
    pub polls_in_flight: AtomicU64,
}

/// Cheap to clone; every clone is the same hub.
#[derive(Debug, Clone)]
pub struct EventHub {
    pub(super) hub: Arc<Hub>,
}

#[derive(Debug)]
pub(super) struct Hub {
    pub sessions: Sessions,
    pub settings: EventSettings,
    /// Tells tokens of this log's sequence (process lifetime, or shared stream) from others.
    pub epoch: u64,
    /// The last sequence number delivered here (numbered here, or followed from a shared log).
    pub sequence: AtomicU64,
    /// Where release events are appended and resuming watchers' missing ones come from.
    pub log: Arc<dyn EventLog>,
    /// The highest sequence known to be in the log (a shared log's followers may lag it).
    pub log_end: AtomicU64,
    /// Held while an event is numbered and delivered, and while a watcher subscribes, so every
    /// watcher receives events in sequence order and its replay ends where its live part
    /// begins. Taken before `feeds` and before any feed's state.
    pub publish: Mutex<()>,
    /// The feeds and the polled agents; taken before any feed's state.
    pub feeds: Mutex<FeedRegistry>,
    /// Permits of the watchers from [`EventHub::subscribe`].
    pub watchers: Permits,
    pub release_waiters: Permits,
    pub next_watcher_id: AtomicU64,
    /// The events room's part of the shutdown.
    pub shutdown: CancellationToken,
    /// Every task the room spawns (poll loops, stream forwarders).
    pub tasks: TaskTracker,
    /// The poll loops alone: on shutdown watchers wait for their last polls' answers.
    pub poll_loops: TaskTracker,
    pub counters: Counters,
    /// Which agents this replica may poll, and who watches what across replicas.
    pub ownership: Arc<dyn PollOwnership>,
}

impl EventHub {
    /// A replica's hub: its events go to the replicas' shared `log`, and it polls the agents
    /// `ownership` lets it: its own clients' and, for other replicas' clients, those it owns
    /// that they watch.
    pub(crate) fn replicated(
        sessions: Sessions,
        settings: EventSettings,
        lifecycle: &Lifecycle,
        ownership: Arc<dyn PollOwnership>,
        log: Arc<dyn EventLog>,
    ) -> Self {
        let events = Self::build(sessions, settings, lifecycle, ownership, log);
        let hub = events.hub.clone();
        events.hub.tasks.spawn(hub.follow_remote_interest());
        events
    }

    pub(super) fn build(
        sessions: Sessions,
        settings: EventSettings,
        lifecycle: &Lifecycle,
        ownership: Arc<dyn PollOwnership>,
        log: Arc<dyn EventLog>,
    ) -> Self {
        let hub = Self {
            hub: Arc::new(Hub {
                sessions,
                epoch: log.epoch(),
                sequence: AtomicU64::new(log.opened_at()),
                log_end: AtomicU64::new(log.opened_at()),
                log,
                publish: Mutex::new(()),
                feeds: Mutex::new(FeedRegistry::new(settings.max_polled_agents)),
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
                ownership,
                settings,
            }),
        };
        hub.hub.log.follow(LogFollower::new(&hub.hub));
        hub
    }

    /// Before [`subscribe`](Self::subscribe) with a token of a shared log that is ahead of
    /// what this replica has followed so far: asks the log where it ends, so that a token
    /// beyond it is refused and one within it resumes exactly. When the log cannot tell, the
    /// token is trusted (its watcher then waits for the follower to reach it).
    pub async fn prepare_resume(&self, from: Option<ResumeToken>) {
        let hub = &self.hub;
        let Some(token) = from.filter(|t| t.epoch == hub.epoch && hub.log.keeps_history()) else {
            return;
        };
        if token.sequence <= hub.log_end.load(Ordering::SeqCst) {
            return;
        }
        if self.read_log_end().await.is_none() {
            hub.log_end.fetch_max(token.sequence, Ordering::SeqCst);
        }
    }

    /// Reads where the shared log ends, and raises what this replica knows of it; `None` when
    /// the log cannot tell.
    async fn read_log_end(&self) -> Option<u64> {
        let end = self.hub.log.last_sequence().await?;
        self.hub.log_end.fetch_max(end, Ordering::SeqCst);
        Some(end)
    }

    /// Where a shared log ends now (read within [`LOG_END_WITHIN`]), as a position; `None`
    /// for this process's own log, or when the log cannot tell in time (then "now" is the
    /// follower's position).
    async fn log_end(&self) -> Option<ResumeToken> {
        let hub = &self.hub;
        if !hub.log.keeps_history() {
            return None;
        }
        let end = tokio::time::timeout(LOG_END_WITHIN, self.read_log_end())
            .await
            .ok()
            .flatten()?;
        Some(ResumeToken {
            epoch: hub.epoch,
            sequence: end,
        })
    }

    pub(crate) fn sessions(&self) -> &Sessions {
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
        let request = Request {
            agents,
            from,
            kinds,
            handover,
        };
        self.hub.subscribe(&self.hub.watchers, request)
    }

    /// Like [`subscribe`](Self::subscribe) (live from now), for a release that waits for its
    /// event: its permit comes from the release waiters' pool, so open streams cannot starve
    /// releases and waiting releases cannot starve streams.
    ///
    /// With a shared log, "now" is where the log ends, not how far this replica's follower has
    /// read: a release another replica appended just before is not this release's event.
    pub(crate) async fn subscribe_release_waiter(
        &self,
        agent: AgentId,
        kinds: KindFilter,
    ) -> Result<Watcher, SubscribeError> {
        let from = self.log_end().await;
        let request = Request {
            agents: &[agent],
            from,
            kinds,
            handover: None,
        };
        self.hub.subscribe(&self.hub.release_waiters, request)
    }

    /// Ends every watcher (after what it already received) and stops the poll loops: the
    /// events room's part of the shutdown, on its own.
    #[cfg(test)]
    pub(crate) fn shut_down(&self) {
        self.hub.shutdown.cancel();
    }

    /// Open watchers from [`subscribe`](Self::subscribe) (release waiters are counted apart).
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
        let feed = lock(&self.hub.feeds).get(agent);
        feed.map_or(0, |feed| feed.members())
    }

    /// Agents being polled right now: watched, or in their grace period.
    pub fn polling_agents(&self) -> Vec<AgentId> {
        let feeds: Vec<Arc<Feed>> = lock(&self.hub.feeds).all();
        let now = Instant::now();
        let mut agents: Vec<_> = feeds
            .iter()
            .filter(|f| f.wants_polling(&self.hub.settings, now))
            .map(|f| f.agent)
            .collect();
        agents.sort();
        agents
    }

    /// Agents counted against `--max-polled-agents`: those whose poll loop may poll (watched,
    /// or in their grace period), and those a watcher being admitted reserved.
    pub fn polled_agents(&self) -> usize {
        lock(&self.hub.feeds).polled_agents()
    }

    /// Poll loops running (each polls one agent; it ends a grace period after its last watcher).
    pub fn poll_loops_running(&self) -> usize {
        self.hub.poll_loops.len()
    }

    /// Event polls sent and not answered yet: with replicas, which replica polls an agent now.
    pub fn polls_in_flight(&self) -> usize {
        self.hub.counters.polls_in_flight.load(Ordering::Relaxed) as usize
    }

    /// Agents whose last poll failed (transport, HTTP, unexpected retcode): their poll loops
    /// are backing off and retrying.
    pub fn failing_poll_loops(&self) -> usize {
        let feeds: Vec<Arc<Feed>> = lock(&self.hub.feeds).all();
        feeds.iter().filter(|feed| feed.is_failing()).count()
    }

    /// What this replica's poll leases did (all zero for a single process).
    pub fn ownership_stats(&self) -> OwnershipStats {
        self.hub.ownership.stats()
    }

    /// This replica's part in polling (all of it, alone).
    pub fn stats(&self) -> EventStats {
        let c = &self.hub.counters;
        EventStats {
            release_events: c.release.load(Ordering::Relaxed),
            skipped_events: c.skipped.load(Ordering::Relaxed),
            malformed_events: c.malformed.load(Ordering::Relaxed),
            dropped_fields: c.dropped_fields.load(Ordering::Relaxed),
            poll_failures: c.poll_failures.load(Ordering::Relaxed),
            log: self.hub.log.stats(),
        }
    }
}
