//! The event log: where a polled release event (and the end of an agent's session) goes, and
//! where a resuming watcher's missing events come from. The in-memory log ([`ProcessLog`]) is
//! this process alone: it numbers records as they are observed and keeps nothing beyond the
//! feeds' replay rings. A shared log (a JetStream stream, `nats::event_log`) numbers records by
//! where it stored them; one follower per replica hands every stored record back to the hub
//! ([`LogFollower`]), which delivers it to the local watchers exactly as the in-memory log's
//! records are; and it keeps what the rings of this replica never saw, so a resume token from
//! any replica, or from before a restart, resumes exactly.
use std::{
    fmt,
    sync::{Arc, Weak},
};

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::{hub::Room, ReleaseEvent, SessionEnding};
use crate::domain::AgentId;

/// One record of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    /// A release event; its token is set where the record is placed in the log.
    Release(ReleaseEvent),
    /// The gateway will not deliver the agent's events any more: its watchers, on every
    /// replica, are told.
    SessionEnded(AgentId, SessionEnding),
}

impl Record {
    pub(crate) fn agent(&self) -> AgentId {
        match self {
            Self::Release(event) => event.agent,
            Self::SessionEnded(agent, _) => *agent,
        }
    }
}

/// What a shared log kept for a resuming watcher.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Backfill {
    /// The agents' release events in the asked range, tokens set, in sequence order.
    pub events: Vec<ReleaseEvent>,
    /// Agents some of whose events in the range may have been dropped (by retention, or
    /// because the log could not be read in time): the watcher gets a Gap naming them.
    pub dropped: Vec<AgentId>,
}

/// What a shared log counted (the in-memory log counts nothing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Appends that failed and were retried.
    pub appends_retried: u64,
    /// Records given up at shutdown because they could not be appended.
    pub appends_lost: u64,
    /// Records stored that this replica's follower had not delivered, when it last received.
    pub follower_lag: u64,
}

/// Where release events go and come back from. The hub does not know which log it runs on.
pub(crate) trait EventLog: Send + Sync + fmt::Debug {
    /// Identifies the log's sequence: a token of another epoch is from another sequence (a
    /// process lifetime for the in-memory log, a recreated stream for a shared one).
    fn epoch(&self) -> u64;

    /// The last sequence the log held when it was opened: this replica's position at start.
    fn opened_at(&self) -> u64;

    /// Whether the log keeps events this process's rings never saw (a shared log), so that a
    /// watcher whose rings do not cover its position is backfilled rather than given a Gap.
    fn keeps_history(&self) -> bool;

    /// Starts handing stored records to `follower` (a shared log; the in-memory log delivers
    /// nothing itself).
    fn follow(&self, follower: LogFollower);

    /// Appends `record`, under the publish lock. `None`: the log is this process; the
    /// caller numbers and delivers the record now. `Some`: the append to await (it retries
    /// until the record is stored, or gives up once the room shuts down); the follower
    /// delivers the record once stored.
    fn append(&self, record: &Record) -> Option<BoxFuture<'static, ()>>;

    /// The release events of `agents` with a sequence in `after + 1 ..= up_to`, and which
    /// agents' events in that range may be missing. Bounded in count and time.
    fn read(&self, agents: Vec<AgentId>, after: u64, up_to: u64) -> BoxFuture<'static, Backfill>;

    /// The last sequence the log holds now; `None` when it cannot tell (unreachable).
    fn last_sequence(&self) -> BoxFuture<'static, Option<u64>>;

    fn stats(&self) -> LogStats {
        LogStats::default()
    }
}

/// The in-memory log: the process's own sequence, numbered by the room as events are observed.
#[derive(Debug)]
pub(crate) struct ProcessLog {
    epoch: u64,
}

impl ProcessLog {
    pub(crate) fn new() -> Self {
        Self {
            epoch: rand::random(),
        }
    }
}

impl EventLog for ProcessLog {
    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn opened_at(&self) -> u64 {
        0
    }

    fn keeps_history(&self) -> bool {
        false
    }

    fn follow(&self, _follower: LogFollower) {}

    fn append(&self, _record: &Record) -> Option<BoxFuture<'static, ()>> {
        None
    }

    /// Nothing is kept beyond the rings: every agent asked about missed something.
    fn read(&self, agents: Vec<AgentId>, _after: u64, _up_to: u64) -> BoxFuture<'static, Backfill> {
        Box::pin(std::future::ready(Backfill {
            events: Vec::new(),
            dropped: agents,
        }))
    }

    fn last_sequence(&self) -> BoxFuture<'static, Option<u64>> {
        Box::pin(std::future::ready(None))
    }
}

/// A shared log's way back into this replica's events room: every stored record, in sequence
/// order.
#[derive(Debug, Clone)]
pub(crate) struct LogFollower {
    room: Weak<Room>,
    shutdown: CancellationToken,
}

impl LogFollower {
    pub(super) fn new(room: &Arc<Room>) -> Self {
        Self {
            room: Arc::downgrade(room),
            shutdown: room.shutdown.clone(),
        }
    }

    /// Delivers the record stored at `sequence` (`None`: a record this replica cannot read,
    /// which only moves the position). False once the room is gone: stop following.
    pub(crate) fn deliver(&self, sequence: u64, record: Option<Record>) -> bool {
        let Some(room) = self.room.upgrade() else {
            return false;
        };
        room.deliver_followed(sequence, record);
        true
    }

    /// The last sequence delivered (or the log's position when it was opened).
    pub(crate) fn position(&self) -> Option<u64> {
        self.room.upgrade().map(|room| room.numbering.delivered())
    }

    /// Cancelled when the events room shuts down.
    pub(crate) fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Resolves once the room's poll loops have ended (their last events appended), or at
    /// once when the room is gone.
    pub(crate) async fn poll_loops_ended(&self) {
        let Some(ended) = self.room.upgrade().map(|room| room.poll_loops.ended()) else {
            return;
        };
        ended.await;
    }

    /// Where the follower task runs (tracked by the service's lifecycle).
    pub(crate) fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        if let Some(room) = self.room.upgrade() {
            room.tasks.spawn(task);
        }
    }
}

impl Room {
    /// The floor of a new feed's ring, whose agent's feed here last saw sequence `retired` (0:
    /// never). A shared log's records before now never reached it either: a watcher resuming
    /// from before now reads them from the log.
    pub(super) fn ring_floor(&self, retired: u64) -> u64 {
        if self.log.keeps_history() {
            retired.max(self.numbering.delivered())
        } else {
            retired
        }
    }

    /// A record the follower read from the shared log: numbered by the log, delivered like a
    /// record of the in-memory log. Records at or before the position (a consumer recreated
    /// after a reconnect may repeat some) are skipped.
    pub(super) fn deliver_followed(&self, sequence: u64, record: Option<Record>) {
        let publishing = self.numbering.publish();
        if sequence <= publishing.delivered() {
            return;
        }
        let Some(record) = record else {
            publishing.advance(sequence);
            return;
        };
        let feed = self.feeds.lock().get(record.agent());
        self.deliver(&publishing, feed.as_deref(), sequence, record);
    }
}

/// Whether release events of one agent with a sequence after `token` may have been dropped,
/// from what the shared log still holds of the agent:
/// - `first_after`: the first kept record after the token, with the sequence of the agent's
///   record before it (each record carries it): records between the token and it were dropped
///   when that previous one is after the token;
/// - otherwise, `kept_before`: the agent still has a kept record (at or before the token).
///   Retention drops the oldest records first (the per-agent count limit keeps the newest; the
///   age limit drops a prefix of the log), so a dropped record after the token would have
///   taken every older one with it: nothing was dropped;
/// - otherwise the agent has nothing kept: either it never had records after the token, or
///   the age limit dropped them, which it did only to records before the log's first kept
///   sequence (`log_first`). Conservatively, a Gap when the log dropped anything after the
///   token at all.
pub(crate) fn dropped_after(
    token: u64,
    first_after: Option<u64>,
    kept_before: bool,
    log_first: u64,
) -> bool {
    match first_after {
        Some(previous) => previous > token,
        None if kept_before => false,
        None => log_first > token.saturating_add(1),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex},
        time::Duration,
    };

    use futures_util::future::BoxFuture;

    use super::{dropped_after, Backfill, EventLog, LogFollower, Record};
    use crate::{
        domain::AgentId,
        events::{
            testing::{agent, call_release, hub_on, ready, sequences, sign_in},
            watcher::{Gap, GapCause},
            EventHub, EventSettings, KindFilter, ReleaseEvent, ResumeToken, SessionEnding,
            SubscribeError, WatcherEnd, WatcherItem,
        },
        lock,
    };

    const EPOCH: u64 = 7;

    /// A shared log played by the test: it was at 10 when opened, its end is what the test
    /// says, a read answers what the test put in and records what was asked.
    #[derive(Debug, Default)]
    struct SharedLog {
        end: Mutex<u64>,
        kept: Mutex<Backfill>,
        reads: Mutex<Vec<(Vec<AgentId>, u64, u64)>>,
        appended: Mutex<Vec<Record>>,
    }

    impl EventLog for Arc<SharedLog> {
        fn epoch(&self) -> u64 {
            EPOCH
        }
        fn opened_at(&self) -> u64 {
            10
        }
        fn keeps_history(&self) -> bool {
            true
        }
        fn follow(&self, _follower: LogFollower) {}
        fn append(&self, record: &Record) -> Option<BoxFuture<'static, ()>> {
            lock(&self.appended).push(record.clone());
            Some(Box::pin(std::future::ready(())))
        }
        fn read(
            &self,
            agents: Vec<AgentId>,
            after: u64,
            up_to: u64,
        ) -> BoxFuture<'static, Backfill> {
            lock(&self.reads).push((agents, after, up_to));
            Box::pin(std::future::ready(std::mem::take(&mut *lock(&self.kept))))
        }
        fn last_sequence(&self) -> BoxFuture<'static, Option<u64>> {
            Box::pin(std::future::ready(Some(*lock(&self.end))))
        }
    }

    fn release(agent: AgentId, sequence: u64) -> ReleaseEvent {
        call_release(
            agent,
            ResumeToken {
                epoch: EPOCH,
                sequence,
            },
        )
    }

    /// What the follower would hand over: the record stored at `sequence`.
    fn followed(hub: &EventHub, agent: AgentId, sequence: u64) {
        hub.room
            .deliver_followed(sequence, Some(Record::Release(release(agent, sequence))));
    }

    fn shared() -> (Arc<SharedLog>, EventHub) {
        let log = Arc::new(SharedLog::default());
        let hub = hub_on(
            EventSettings {
                heartbeat: Duration::from_secs(1),
                ..EventSettings::default()
            },
            Arc::new(log.clone()),
        );
        for n in 0..2 {
            sign_in(&hub, agent(n));
        }
        (log, hub)
    }

    fn token(sequence: u64) -> Option<ResumeToken> {
        Some(ResumeToken {
            epoch: EPOCH,
            sequence,
        })
    }

    /// A polled event goes to the shared log, not to the watchers: they get it, numbered by
    /// the log, once the follower hands it back; records of agents nobody watches here only
    /// move the position, and a repeated one is delivered once.
    #[tokio::test(start_paused = true)]
    async fn a_shared_log_numbers_records_and_its_follower_delivers_them() {
        let (log, hub) = shared();
        let mut watcher = hub
            .subscribe(&[agent(0)], None, KindFilter::default(), None)
            .unwrap();
        assert_eq!(watcher.position(), token(10).unwrap());
        assert!(crate::events::testing::publish(&hub, agent(0)));
        assert!(matches!(&lock(&log.appended)[..], [Record::Release(e)] if e.agent == agent(0)));
        assert_eq!(ready(&mut watcher), []);

        followed(&hub, agent(0), 12);
        followed(&hub, agent(1), 13);
        followed(&hub, agent(0), 12);
        followed(&hub, agent(0), 14);
        assert_eq!(sequences(&ready(&mut watcher)), [Some(12), Some(14)]);
        assert_eq!(hub.room.numbering.delivered(), 14);

        // Another replica's poll loop learned that the session ended: told here too.
        hub.room.deliver_followed(
            15,
            Some(Record::SessionEnded(agent(0), SessionEnding::Forgotten)),
        );
        assert!(matches!(
            &ready(&mut watcher)[..],
            [Err(WatcherEnd::SessionEnded { agent: a, resume, .. })]
                if *a == agent(0) && resume.sequence == 14
        ));
        let feed = hub.room.feeds.lock().get(agent(0)).unwrap();
        assert!(feed.session_lost());
    }

    /// A token from before this replica's feed began is backfilled from the log (in place of
    /// what the ring holds), merged with the rings that do cover it, before anything live.
    #[tokio::test(start_paused = true)]
    async fn a_token_before_the_feed_began_is_backfilled_from_the_log() {
        let (log, hub) = shared();
        let _covering = hub
            .subscribe(&[agent(1)], None, KindFilter::default(), None)
            .unwrap();
        followed(&hub, agent(0), 11);
        followed(&hub, agent(1), 12);
        let _feed = hub
            .subscribe(&[agent(0)], None, KindFilter::default(), None)
            .unwrap();
        followed(&hub, agent(0), 13);
        *lock(&log.kept) = Backfill {
            events: vec![release(agent(0), 11), release(agent(0), 13)],
            dropped: Vec::new(),
        };
        let mut resumed = hub
            .subscribe(
                &[agent(0), agent(1)],
                token(10),
                KindFilter::default(),
                None,
            )
            .unwrap();
        followed(&hub, agent(0), 15);
        // Agent 1's feed began at 10: its ring covers the token; agent 0's began at 12.
        assert_eq!(lock(&log.reads)[..], [(vec![agent(0)], 10, 13)]);
        assert_eq!(
            sequences(&ready(&mut resumed)),
            [Some(11), Some(12), Some(13), Some(15)]
        );
    }

    /// The log's verdict that events were dropped becomes a Gap naming those agents.
    #[tokio::test(start_paused = true)]
    async fn events_the_log_dropped_are_a_gap_naming_their_agents() {
        let (log, hub) = shared();
        followed(&hub, agent(0), 12);
        *lock(&log.kept) = Backfill {
            events: vec![release(agent(0), 12)],
            dropped: vec![agent(0)],
        };
        let mut resumed = hub
            .subscribe(&[agent(0)], token(3), KindFilter::default(), None)
            .unwrap();
        let items = ready(&mut resumed);
        assert_eq!(
            items[0],
            Ok(WatcherItem::Gap(Gap {
                cause: GapCause::Evicted,
                agents: vec![agent(0)],
            }))
        );
        assert_eq!(sequences(&items[1..]), [Some(12)]);
    }

    /// Tokens and epochs: another epoch (a recreated stream) is a Gap; a token beyond what the
    /// log holds is refused; one the log holds but the follower has not reached yet resumes
    /// from it, and what the follower delivers up to it is not repeated.
    #[tokio::test(start_paused = true)]
    async fn tokens_of_other_epochs_gap_and_tokens_ahead_are_checked_against_the_log() {
        let (log, hub) = shared();
        let other = ResumeToken {
            epoch: EPOCH + 1,
            sequence: 3,
        };
        let mut recreated = hub
            .subscribe(&[agent(0)], Some(other), KindFilter::default(), None)
            .unwrap();
        assert!(matches!(
            &ready(&mut recreated)[..],
            [Ok(WatcherItem::Gap(Gap {
                cause: GapCause::OtherProcess,
                ..
            }))]
        ));

        *lock(&log.end) = 20;
        hub.prepare_resume(token(21)).await;
        assert_eq!(
            hub.subscribe(&[agent(0)], token(21), KindFilter::default(), None)
                .unwrap_err(),
            SubscribeError::UnknownToken
        );
        hub.prepare_resume(token(18)).await;
        let mut ahead = hub
            .subscribe(&[agent(0)], token(18), KindFilter::default(), None)
            .unwrap();
        followed(&hub, agent(0), 17);
        followed(&hub, agent(0), 19);
        assert_eq!(sequences(&ready(&mut ahead)), [Some(19)]);
    }

    /// An idle watcher's heartbeat carries how far the follower delivered, so its token stays
    /// near the log's end.
    #[tokio::test(start_paused = true)]
    async fn heartbeats_carry_the_followers_position() {
        let (_log, hub) = shared();
        let mut watcher = hub
            .subscribe(&[agent(0)], None, KindFilter::default(), None)
            .unwrap();
        followed(&hub, agent(1), 30);
        let heartbeat = watcher.next().await;
        assert!(
            matches!(&heartbeat, Some(Ok(WatcherItem::Heartbeat { position, .. })) if position.sequence == 30),
            "{heartbeat:?}"
        );
    }

    #[test]
    fn a_chained_record_after_the_token_tells_whether_any_in_between_was_dropped() {
        // The first kept record after token 10 follows record 7: nothing was dropped.
        assert!(!dropped_after(10, Some(7), true, 1));
        // It follows record 10, the token itself.
        assert!(!dropped_after(10, Some(10), true, 1));
        // It follows record 12, which is no longer kept.
        assert!(dropped_after(10, Some(12), true, 1));
        // Its predecessor is unknown (the agent's first record): nothing before it.
        assert!(!dropped_after(10, Some(0), false, 50));
    }

    #[test]
    fn with_nothing_kept_after_the_token_only_a_dropped_prefix_past_it_is_a_gap() {
        // A record at or before the token is still kept: nothing after it was dropped.
        assert!(!dropped_after(10, None, true, 200));
        // Nothing kept at all, and the log dropped nothing after the token.
        assert!(!dropped_after(10, None, false, 11));
        assert!(!dropped_after(10, None, false, 1));
        // Nothing kept, and the log dropped records after the token: maybe this agent's.
        assert!(dropped_after(10, None, false, 12));
        assert!(!dropped_after(u64::MAX, None, false, u64::MAX));
    }
}
