//! The events room's facade, [`EventHub`], and what the room's parts share, [`Room`]: its
//! settings and handles, each part's own state (the numbering, the feed registry, the permits,
//! the poll loops, the counts), and the room's lifecycle. The parts: `numbering` (the sequence
//! and the publish lock), `feeds` (the feed registry), `publish` (appending and delivering),
//! `subscribe` (admitting and starting watchers), `poll` (the poll loops).
use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    feeds::{Feed, Feeds},
    log::{EventLog, LogFollower, LogStats},
    numbering::Numbering,
    ownership::{OwnershipStats, PollOwnership},
    poll::PollLoops,
    publish::ObservedEvents,
    subscribe::{Pool, Request, SubscribeError, WatcherPermits},
    watcher::Watcher,
    EventSettings, KindFilter, ResumeToken,
};
use crate::{domain::AgentId, gateway::Session, lifecycle::Lifecycle, sessions::Sessions};

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

/// Cheap to clone; every clone is the same hub.
#[derive(Debug, Clone)]
pub struct EventHub {
    pub(super) room: Arc<Room>,
}

/// What the events room's parts share (poll loops, watchers and the log's follower hold it).
/// Every field is set once, when the room is built: what changes lives inside the part that
/// owns it (`numbering`, `feeds`, `permits`, `poll_loops`, `observed`), behind that part's
/// methods, so no file changes another's state.
#[derive(Debug)]
pub(super) struct Room {
    pub sessions: Sessions,
    pub settings: EventSettings,
    /// Where release events are appended and resuming watchers' missing ones come from.
    pub log: Arc<dyn EventLog>,
    /// Which agents this replica may poll, and who watches what across replicas.
    pub ownership: Arc<dyn PollOwnership>,
    /// The events room's part of the shutdown.
    pub shutdown: CancellationToken,
    /// Every task the room spawns (poll loops, stream forwarders).
    pub tasks: TaskTracker,
    /// The log's sequence as delivered here, and the publish lock.
    pub numbering: Numbering,
    /// The feeds and the polled agents.
    pub feeds: Feeds,
    /// The permits of watchers and release waiters.
    pub permits: WatcherPermits,
    pub poll_loops: PollLoops,
    /// What the publisher counted of the polled events.
    pub observed: ObservedEvents,
}

impl EventHub {
    /// The room's events go to `log`, and it polls the agents `ownership` lets it: its own
    /// clients' and, with replicas, those it owns that other replicas' clients watch. A single
    /// process passes [`ProcessOwnership`](super::ProcessOwnership) and
    /// [`ProcessLog`](super::ProcessLog).
    pub(crate) fn new(
        sessions: Sessions,
        settings: EventSettings,
        lifecycle: &Lifecycle,
        ownership: Arc<dyn PollOwnership>,
        log: Arc<dyn EventLog>,
    ) -> Self {
        let room = Arc::new(Room {
            sessions,
            numbering: Numbering::new(log.as_ref()),
            log,
            ownership,
            shutdown: lifecycle.shutdown().child_token(),
            tasks: lifecycle.tasks().clone(),
            feeds: Feeds::new(settings.max_polled_agents),
            permits: WatcherPermits::new(&settings),
            poll_loops: PollLoops::default(),
            observed: ObservedEvents::default(),
            settings,
        });
        room.log.follow(LogFollower::new(&room));
        room.tasks.spawn(room.clone().follow_remote_interest());
        Self { room }
    }

    /// Before [`subscribe`](Self::subscribe) with a token of a shared log that is ahead of
    /// what this replica has followed so far: asks the log where it ends, so that a token
    /// beyond it is refused and one within it resumes exactly. When the log cannot tell, the
    /// token is trusted (its watcher then waits for the follower to reach it).
    pub async fn prepare_resume(&self, from: Option<ResumeToken>) {
        let room = &self.room;
        let Some(token) =
            from.filter(|t| t.epoch == room.numbering.epoch() && room.log.keeps_history())
        else {
            return;
        };
        if token.sequence <= room.numbering.known_end() {
            return;
        }
        if self.read_log_end().await.is_none() {
            room.numbering.raise_log_end(token.sequence);
        }
    }

    /// Reads where the shared log ends, and raises what this replica knows of it; `None` when
    /// the log cannot tell.
    async fn read_log_end(&self) -> Option<u64> {
        let end = self.room.log.last_sequence().await?;
        self.room.numbering.raise_log_end(end);
        Some(end)
    }

    /// Where a shared log ends now (read within [`LOG_END_WITHIN`]), as a position; `None`
    /// for this process's own log, or when the log cannot tell in time (then "now" is the
    /// follower's position).
    async fn log_end(&self) -> Option<ResumeToken> {
        if !self.room.log.keeps_history() {
            return None;
        }
        let end = tokio::time::timeout(LOG_END_WITHIN, self.read_log_end())
            .await
            .ok()
            .flatten()?;
        Some(self.room.numbering.token(end))
    }

    pub(crate) fn sessions(&self) -> &Sessions {
        &self.room.sessions
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
        self.room.subscribe(Pool::Watchers, request)
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
        self.room.subscribe(Pool::ReleaseWaiters, request)
    }

    /// Ends every watcher (after what it already received) and stops the poll loops: the
    /// events room's part of the shutdown, on its own.
    #[cfg(test)]
    pub(crate) fn shut_down(&self) {
        self.room.shutdown.cancel();
    }

    /// Open watchers from [`subscribe`](Self::subscribe) (release waiters are counted apart).
    pub fn watchers(&self) -> usize {
        self.room.permits.in_use(Pool::Watchers)
    }

    /// Open release waiters.
    pub fn release_waiters(&self) -> usize {
        self.room.permits.in_use(Pool::ReleaseWaiters)
    }

    /// Watchers and release waiters the agent's feed delivers to (0 when it has no feed); a
    /// watcher the feed cut off for falling behind is not counted, even before it is dropped.
    pub fn watchers_of(&self, agent: AgentId) -> usize {
        let feed = self.room.feeds.lock().get(agent);
        feed.map_or(0, |feed| feed.members())
    }

    /// Agents whose poll loop wants to poll now (it polls while this replica owns them):
    /// watched, here or by other replicas, or in their grace period, and not of a lost session.
    /// Sorted.
    pub fn agents_to_poll(&self) -> Vec<AgentId> {
        let feeds: Vec<Arc<Feed>> = self.room.feeds.lock().all();
        let now = Instant::now();
        let mut agents: Vec<_> = feeds
            .iter()
            .filter(|f| f.wants_polling(&self.room.settings, now))
            .map(|f| f.agent)
            .collect();
        agents.sort();
        agents
    }

    /// How many agents count against `--max-polled-agents`: those whose poll loop may poll
    /// (watched, or in their grace period), and those a watcher being admitted reserved.
    pub fn polled_agents_in_use(&self) -> usize {
        self.room.feeds.lock().polled_agents_in_use()
    }

    /// Poll loops running (each polls one agent; it ends a grace period after its last watcher).
    pub fn poll_loops_running(&self) -> usize {
        self.room.poll_loops.running()
    }

    /// Event polls sent and not answered yet: with replicas, which replica polls an agent now.
    pub fn polls_in_flight(&self) -> usize {
        self.room.poll_loops.polls_in_flight()
    }

    /// Agents whose last poll failed (transport, HTTP, unexpected retcode): their poll loops
    /// are backing off and retrying.
    pub fn failing_poll_loops(&self) -> usize {
        let feeds: Vec<Arc<Feed>> = self.room.feeds.lock().all();
        feeds.iter().filter(|feed| feed.is_failing()).count()
    }

    /// What this replica's poll leases did (all zero for a single process).
    pub fn ownership_stats(&self) -> OwnershipStats {
        self.room.ownership.stats()
    }

    pub fn stats(&self) -> EventStats {
        let mut stats = EventStats {
            log: self.room.log.stats(),
            ..EventStats::default()
        };
        self.room.observed.report(&mut stats);
        self.room.poll_loops.report(&mut stats);
        stats
    }
}
