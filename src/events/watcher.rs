//! One watcher: its replay, then live events in sequence order, heartbeats, and how it ends.
use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use futures_util::future::BoxFuture;
use tokio::{sync::OwnedSemaphorePermit, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    feeds::{Feed, FeedItem},
    hub::Room,
    log::Backfill,
    queue, KindFilter, ReleaseEvent, ResumeToken,
};
use crate::{domain::AgentId, gateway::Retcode};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WatcherItem {
    Event(Arc<ReleaseEvent>),
    /// Nothing was sent for the heartbeat interval: where the watcher stands, and which of its
    /// agents cannot be polled right now (the gateway fails; the loop keeps retrying).
    Heartbeat {
        position: ResumeToken,
        failing: Vec<AgentId>,
    },
    /// Events after the resume token may be missing (always the first item).
    Gap(Gap),
    /// One agent of a multi-agent watcher lost its session; the others go on.
    SessionEnded {
        agent: AgentId,
        ending: SessionEnding,
    },
}

/// How a watcher ends; each carries the token to resume from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WatcherEnd {
    /// The watcher fell more than its buffer behind, or (forwarded) its reader took nothing
    /// for the send timeout.
    TooSlow {
        resume: ResumeToken,
    },
    /// The session of its last agent ended.
    SessionEnded {
        agent: AgentId,
        ending: SessionEnding,
        resume: ResumeToken,
    },
    ShuttingDown {
        resume: ResumeToken,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Gap {
    pub(crate) cause: GapCause,
    pub(crate) agents: Vec<AgentId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GapCause {
    /// The token is from another process lifetime (a restart, or another replica).
    OtherProcess,
    /// Events after the token fell out of the replay ring (count or age limit).
    Evicted,
}

impl Gap {
    pub(crate) fn describe(&self) -> &'static str {
        match self.cause {
            GapCause::OtherProcess => {
                "the resume token is from another process lifetime of the facade (restart or another replica); release events observed in between cannot be replayed"
            }
            GapCause::Evicted => {
                "release events after the resume token are no longer kept (the replay ring's size or age limit); some may be missing"
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SessionEnding {
    /// The gateway refused to deliver the agent's events: its session (100-006, 000-003) or
    /// polling altogether (000-001, configured for another event method).
    Refused { retcode: Retcode, message: String },
    /// The facade no longer has a session for the agent (another request's refusal dropped
    /// it).
    Forgotten,
}

impl SessionEnding {
    /// The gateway's retcode, when it was the gateway that refused.
    pub(crate) fn retcode(&self) -> Option<&Retcode> {
        match self {
            Self::Refused { retcode, .. } => Some(retcode),
            Self::Forgotten => None,
        }
    }
}

/// A watcher's membership in one agent's feed, as the watcher holds it (the feed holds the
/// other side, its [`Member`](super::feeds::Member)); dropping it leaves the feed.
#[derive(Debug)]
pub(super) struct Membership {
    feed: Arc<Feed>,
    watcher_id: u64,
}

impl Membership {
    pub fn new(feed: Arc<Feed>, watcher_id: u64) -> Self {
        Self { feed, watcher_id }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.feed.leave(self.watcher_id);
    }
}

/// Yields replayed events, then live ones, until it ends. Dropping it frees everything at once.
#[derive(Debug)]
pub struct Watcher {
    position: ResumeToken,
    memberships: Vec<Membership>,
    live: queue::Receiver<FeedItem>,
    overflowed: Arc<AtomicBool>,
    replay: VecDeque<Arc<ReleaseEvent>>,
    /// The last sequence number when the watcher subscribed: once the replay is out, everything
    /// up to it was delivered or is not for this watcher.
    replay_end: u64,
    gap: Option<Gap>,
    /// What a shared log is reading for agents whose rings here do not cover the position;
    /// merged into the replay before anything else is delivered.
    backfill: Option<PendingBackfill>,
    kinds: KindFilter,
    /// Where heartbeats learn how far the room delivered, and shutdown waits for the last
    /// polls' answers.
    room: Arc<Room>,
    heartbeat: Duration,
    last_sent: Instant,
    shutdown: CancellationToken,
    /// Where a reader task for this watcher is spawned.
    tasks: TaskTracker,
    /// Set once shutdown began: deliver what has arrived, then end.
    draining: bool,
    ended: bool,
    _permit: OwnedSemaphorePermit,
}

/// What a new watcher starts from; subscribing fills it in while it holds the publish lock.
pub(super) struct WatcherStart {
    /// The resume token's position (or "now").
    pub position: ResumeToken,
    pub memberships: Vec<Membership>,
    pub live: queue::Receiver<FeedItem>,
    pub overflowed: Arc<AtomicBool>,
    /// Kept events after `position`, in sequence order.
    pub replay: Vec<Arc<ReleaseEvent>>,
    /// The last sequence number handed out when the watcher subscribed.
    pub replay_end: u64,
    pub gap: Option<Gap>,
    /// The read of a shared log for `agents` whose rings do not cover `position`.
    pub backfill: Option<(Vec<AgentId>, BoxFuture<'static, Backfill>)>,
    pub kinds: KindFilter,
    pub permit: OwnedSemaphorePermit,
}

/// A shared log's read for a resuming watcher: the agents it covers, and the read.
struct PendingBackfill {
    agents: Vec<AgentId>,
    read: BoxFuture<'static, Backfill>,
}

impl std::fmt::Debug for PendingBackfill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingBackfill")
            .field("agents", &self.agents)
            .finish_non_exhaustive()
    }
}

/// What woke a watcher waiting for its next live item.
enum Woke {
    Item(Option<FeedItem>),
    ShutdownBegan,
    HeartbeatDue,
}

impl Watcher {
    pub(super) fn new(start: WatcherStart, room: &Arc<Room>) -> Self {
        let mut position = start.position;
        if start.replay.is_empty() && start.backfill.is_none() {
            position.sequence = position.sequence.max(start.replay_end);
        }
        Self {
            position,
            memberships: start.memberships,
            live: start.live,
            overflowed: start.overflowed,
            replay: start.replay.into(),
            replay_end: start.replay_end,
            gap: start.gap,
            backfill: start
                .backfill
                .map(|(agents, read)| PendingBackfill { agents, read }),
            kinds: start.kinds,
            room: room.clone(),
            heartbeat: room.settings.heartbeat,
            last_sent: Instant::now(),
            shutdown: room.shutdown.clone(),
            tasks: room.tasks.clone(),
            draining: false,
            ended: false,
            _permit: start.permit,
        }
    }

    /// Where the watcher stands: everything up to here was delivered (or filtered out).
    pub(crate) fn position(&self) -> ResumeToken {
        self.position
    }

    /// True once the facade began shutting down.
    pub(super) fn shutdown_signal(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub(super) fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// The next item; `Some(Err(_))` once, then `None`.
    pub(crate) async fn next(&mut self) -> Option<Result<WatcherItem, WatcherEnd>> {
        if self.ended {
            return None;
        }
        let item = self.next_item().await;
        match &item {
            Ok(_) => self.last_sent = Instant::now(),
            Err(_) => {
                self.ended = true;
                // Leave the feeds now, not when the stream object is dropped.
                self.memberships.clear();
            }
        }
        Some(item)
    }

    /// The next event accepted by `wanted`, skipping everything else, until `deadline`.
    /// `Ok(None)` when the deadline passed first.
    pub(crate) async fn next_event(
        &mut self,
        wanted: impl Fn(&ReleaseEvent) -> bool,
        deadline: Instant,
    ) -> Result<Option<Arc<ReleaseEvent>>, WatcherEnd> {
        loop {
            match tokio::time::timeout_at(deadline, self.next()).await {
                Err(_) => return Ok(None),
                Ok(Some(Ok(WatcherItem::Event(event)))) if wanted(&event) => {
                    return Ok(Some(event))
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(end))) => return Err(end),
                Ok(None) => unreachable!("next() is not called after the end"),
            }
        }
    }

    async fn next_item(&mut self) -> Result<WatcherItem, WatcherEnd> {
        if let Some(backfill) = self.backfill.take() {
            let read = backfill.read.await;
            self.merge_backfill(&backfill.agents, read);
        }
        if let Some(item) = self.next_replayed() {
            return Ok(item);
        }
        loop {
            if self.overflowed.load(Ordering::Relaxed) {
                return Err(self.too_slow());
            }
            let item = if self.draining {
                self.live.try_recv().ok_or(WatcherEnd::ShuttingDown {
                    resume: self.position,
                })?
            } else {
                match self.wake().await {
                    Woke::Item(Some(item)) => item,
                    // Every feed dropped this watcher: only an overflow does that.
                    Woke::Item(None) => return Err(self.too_slow()),
                    Woke::ShutdownBegan => {
                        self.await_last_polls().await;
                        continue;
                    }
                    Woke::HeartbeatDue => return Ok(self.heartbeat_item()),
                }
            };
            if let Some(item) = self.receive(item)? {
                return Ok(item);
            }
        }
    }

    /// Puts what a shared log kept for `agents` into the replay, in place of what their rings
    /// held; a Gap names the agents some of whose events may be missing.
    fn merge_backfill(&mut self, agents: &[AgentId], read: Backfill) {
        self.replay.retain(|event| !agents.contains(&event.agent));
        self.replay.extend(
            read.events
                .into_iter()
                .filter(|event| self.kinds.accepts(event))
                .map(Arc::new),
        );
        self.replay
            .make_contiguous()
            .sort_by_key(|event| event.token.sequence);
        if !read.dropped.is_empty() {
            self.gap = Some(Gap {
                cause: GapCause::Evicted,
                agents: read.dropped,
            });
        }
        if self.replay.is_empty() {
            self.position.sequence = self.position.sequence.max(self.replay_end);
        }
    }

    /// The gap, then the replay, before anything live.
    fn next_replayed(&mut self) -> Option<WatcherItem> {
        if let Some(gap) = self.gap.take() {
            return Some(WatcherItem::Gap(gap));
        }
        let event = self.replay.pop_front()?;
        self.position.sequence = if self.replay.is_empty() {
            self.replay_end.max(event.token.sequence)
        } else {
            event.token.sequence
        };
        Some(WatcherItem::Event(event))
    }

    async fn wake(&mut self) -> Woke {
        let heartbeat_at = self.last_sent + self.heartbeat;
        tokio::select! {
            biased;
            item = self.live.recv() => Woke::Item(item),
            () = self.shutdown.cancelled() => Woke::ShutdownBegan,
            () = tokio::time::sleep_until(heartbeat_at) => Woke::HeartbeatDue,
        }
    }

    /// What the loops' last polls bring is delivered too.
    async fn await_last_polls(&mut self) {
        self.room.poll_loops.last_polls_answered().await;
        self.draining = true;
    }

    fn heartbeat_item(&mut self) -> WatcherItem {
        if let Some(delivered) = self.room.delivered_through(&self.live) {
            self.position.sequence = self.position.sequence.max(delivered);
        }
        WatcherItem::Heartbeat {
            position: self.position,
            failing: self
                .memberships
                .iter()
                .filter(|m| m.feed.is_failing())
                .map(|m| m.feed.agent)
                .collect(),
        }
    }

    /// What a live item means for this watcher: an event it wants, nothing (an event its kinds
    /// filter out), or an agent's lost session, which ends the watcher with its last agent.
    fn receive(&mut self, item: FeedItem) -> Result<Option<WatcherItem>, WatcherEnd> {
        match item {
            // Before the position: a token of another replica ahead of this one's follower.
            FeedItem::Event(event) if event.token.sequence <= self.position.sequence => Ok(None),
            FeedItem::Event(event) => {
                self.position.sequence = self.position.sequence.max(event.token.sequence);
                Ok(self
                    .kinds
                    .accepts(&event)
                    .then_some(WatcherItem::Event(event)))
            }
            FeedItem::SessionEnded(ended) => {
                let (agent, ending) = (ended.0, ended.1.clone());
                self.memberships.retain(|m| m.feed.agent != agent);
                if self.memberships.is_empty() {
                    return Err(WatcherEnd::SessionEnded {
                        agent,
                        ending,
                        resume: self.position,
                    });
                }
                Ok(Some(WatcherItem::SessionEnded { agent, ending }))
            }
        }
    }

    fn too_slow(&self) -> WatcherEnd {
        WatcherEnd::TooSlow {
            resume: self.position,
        }
    }
}

impl Room {
    /// With a shared log, how far the follower delivered, when everything delivered to this
    /// watcher was read (its live queue is empty; the publish lock keeps a delivery from
    /// slipping in between): an idle watcher's heartbeat carries it, so its token stays near
    /// the log's end. The in-memory log: `None` (the position moves with events alone).
    fn delivered_through(&self, live: &queue::Receiver<FeedItem>) -> Option<u64> {
        if !self.log.keeps_history() {
            return None;
        }
        let publishing = self.numbering.publish();
        live.is_empty().then(|| publishing.delivered())
    }
}
