//! The members' one release event log, kept as the NATS stream keeps it: every record numbered
//! by where it is stored, one sequence across members; per agent at most `--replay-events`
//! release records (and as many session ends) and none older than `--replay-age-secs`; each
//! release chained to its agent's previous one, so a resuming watcher's read tells whether
//! retention dropped anything after its token. Each member's follower hands every record, in
//! order, to its events room. A member cut off appends nothing (its appends wait, its poll loops
//! with them), follows nothing and reads nothing until it is back.
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use futures_util::future::BoxFuture;
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use super::MemberLink;
use crate::{
    domain::AgentId,
    events::{
        dropped_after, Backfill, EventLog, EventSettings, LogFollower, LogStats, Record,
        ResumeToken,
    },
    lifecycle::Lifecycle,
    lock,
};

/// Once the member shuts down, an append still waiting is given up after this long, and the
/// follower follows this long at most for the last polls' events (as on NATS).
const SHUTDOWN_BOUND: Duration = Duration::from_secs(3);

/// The store's log.
#[derive(Debug)]
pub(super) struct Log {
    epoch: u64,
    /// Kept per agent and kind of record.
    per_agent: usize,
    max_age: Duration,
    state: std::sync::Mutex<LogState>,
    /// The last sequence stored.
    last: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct LogState {
    last: u64,
    records: BTreeMap<u64, Stored>,
    /// The sequences kept of each agent's releases (`false`) and session ends (`true`), oldest
    /// first.
    subjects: HashMap<(AgentId, bool), VecDeque<u64>>,
}

#[derive(Debug)]
struct Stored {
    record: Record,
    /// Releases: the sequence of the agent's previous release (see [`dropped_after`]).
    previous: u64,
    at: Instant,
}

fn subject(record: &Record) -> (AgentId, bool) {
    (record.agent(), matches!(record, Record::SessionEnded(..)))
}

impl LogState {
    /// The first sequence kept (the next one when nothing is).
    fn first_kept(&self) -> u64 {
        self.records.keys().next().copied().unwrap_or(self.last + 1)
    }

    fn forget(&mut self, sequence: u64) {
        if let Some(stored) = self.records.remove(&sequence) {
            let subject = subject(&stored.record);
            if let Some(kept) = self.subjects.get_mut(&subject) {
                kept.retain(|s| *s != sequence);
                if kept.is_empty() {
                    self.subjects.remove(&subject);
                }
            }
        }
    }

    /// Drops the records older than `max_age` at `now`.
    fn expire(&mut self, now: Instant, max_age: Duration) {
        while let Some((sequence, stored)) = self.records.first_key_value() {
            if now < stored.at + max_age {
                break;
            }
            let sequence = *sequence;
            self.forget(sequence);
        }
    }

    fn append(&mut self, record: Record, now: Instant, per_agent: usize) -> u64 {
        let subject = subject(&record);
        let kept = self.subjects.get(&subject).and_then(|kept| kept.back());
        let previous = match kept {
            Some(last) => *last,
            None => self.first_kept().saturating_sub(1),
        };
        self.last += 1;
        let sequence = self.last;
        self.records.insert(
            sequence,
            Stored {
                record,
                previous,
                at: now,
            },
        );
        let kept = self.subjects.entry(subject).or_default();
        kept.push_back(sequence);
        if kept.len() > per_agent {
            let oldest = kept[0];
            self.forget(oldest);
        }
        sequence
    }

    /// One agent's kept releases in `after + 1 ..= up_to`, and whether any after `after` were
    /// dropped.
    fn read_agent(
        &self,
        agent: AgentId,
        after: u64,
        up_to: u64,
        epoch: u64,
    ) -> (Vec<crate::events::ReleaseEvent>, bool) {
        let kept = self.subjects.get(&(agent, false));
        let mut after_token = kept
            .into_iter()
            .flatten()
            .copied()
            .filter(|sequence| *sequence > after)
            .peekable();
        let first_previous = after_token.peek().map(|first| self.records[first].previous);
        let events = after_token
            .take_while(|sequence| *sequence <= up_to)
            .filter_map(|sequence| match &self.records[&sequence].record {
                Record::Release(event) => {
                    let mut event = event.clone();
                    event.token = ResumeToken { epoch, sequence };
                    Some(event)
                }
                Record::SessionEnded(..) => None,
            })
            .collect();
        let dropped = match first_previous {
            Some(previous) => dropped_after(after, Some(previous), true, 0),
            None => dropped_after(after, None, kept.is_some(), self.first_kept()),
        };
        (events, dropped)
    }
}

impl Log {
    pub(super) fn new(events: &EventSettings) -> Self {
        Self {
            epoch: rand::random(),
            per_agent: events.replay_events.max(1),
            max_age: events.replay_age,
            state: std::sync::Mutex::default(),
            last: watch::Sender::new(0),
        }
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, LogState> {
        let mut state = lock(&self.state);
        state.expire(Instant::now(), self.max_age);
        state
    }

    fn append(&self, record: Record) -> u64 {
        let sequence = self.locked().append(record, Instant::now(), self.per_agent);
        self.last.send_replace(sequence);
        sequence
    }

    /// The records kept after `position`, in order.
    fn after(&self, position: u64) -> Vec<(u64, Record)> {
        self.locked()
            .records
            .range(position + 1..)
            .map(|(sequence, stored)| (*sequence, stored.record.clone()))
            .collect()
    }

    fn read(&self, agents: Vec<AgentId>, after: u64, up_to: u64) -> Backfill {
        let state = self.locked();
        let mut backfill = Backfill::default();
        for agent in agents {
            let (events, dropped) = state.read_agent(agent, after, up_to, self.epoch);
            backfill.events.extend(events);
            if dropped {
                backfill.dropped.push(agent);
            }
        }
        backfill.dropped.sort();
        backfill.events.sort_by_key(|event| event.token.sequence);
        backfill
    }
}

/// The log as one member appends to, follows and reads it.
#[derive(Debug)]
pub(super) struct MemberLog {
    log: Arc<Log>,
    link: Arc<MemberLink>,
    opened_at: u64,
    shutdown: CancellationToken,
    /// The highest sequence this member's appends were stored at.
    appended: Arc<AtomicU64>,
    /// Appends that waited for the member to reach the store; records given up at shutdown.
    retried: Arc<AtomicU64>,
    lost: Arc<AtomicU64>,
    lag: Arc<AtomicU64>,
}

impl MemberLog {
    pub(super) fn open(log: Arc<Log>, link: Arc<MemberLink>, lifecycle: &Lifecycle) -> Self {
        let opened_at = *log.last.borrow();
        Self {
            log,
            link,
            opened_at,
            shutdown: lifecycle.shutdown().clone(),
            appended: Arc::default(),
            retried: Arc::default(),
            lost: Arc::default(),
            lag: Arc::default(),
        }
    }
}

impl EventLog for MemberLog {
    fn epoch(&self) -> u64 {
        self.log.epoch
    }

    fn opened_at(&self) -> u64 {
        self.opened_at
    }

    fn keeps_history(&self) -> bool {
        true
    }

    fn follow(&self, follower: LogFollower) {
        follower.spawn(follow(
            self.log.clone(),
            self.link.clone(),
            self.appended.clone(),
            self.lag.clone(),
            follower.clone(),
        ));
    }

    /// Stored once the member reaches the store; given up a bound after shutdown began.
    fn append(&self, record: &Record) -> Option<BoxFuture<'static, ()>> {
        let record = record.clone();
        let log = self.log.clone();
        let link = self.link.clone();
        let shutdown = self.shutdown.clone();
        let appended = self.appended.clone();
        let retried = self.retried.clone();
        let lost = self.lost.clone();
        Some(Box::pin(async move {
            if !link.reachable() {
                retried.fetch_add(1, Ordering::Relaxed);
                let given_up = async {
                    shutdown.cancelled().await;
                    tokio::time::sleep(SHUTDOWN_BOUND).await;
                };
                tokio::select! {
                    () = link.reached() => {}
                    () = given_up => {
                        lost.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(agent = %record.agent(), "release log: gave up appending a record at shutdown; watchers elsewhere miss it without a Gap");
                        return;
                    }
                }
            }
            let sequence = log.append(record);
            appended.fetch_max(sequence, Ordering::SeqCst);
        }))
    }

    /// Nothing can be read while cut off: every agent asked about may miss something.
    fn read(&self, agents: Vec<AgentId>, after: u64, up_to: u64) -> BoxFuture<'static, Backfill> {
        let backfill = if self.link.reachable() {
            self.log.read(agents, after, up_to)
        } else {
            Backfill {
                events: Vec::new(),
                dropped: agents,
            }
        };
        Box::pin(std::future::ready(backfill))
    }

    fn last_sequence(&self) -> BoxFuture<'static, Option<u64>> {
        let last = self.link.reachable().then(|| *self.log.last.borrow());
        Box::pin(std::future::ready(last))
    }

    fn stats(&self) -> LogStats {
        LogStats {
            appends_retried: self.retried.load(Ordering::Relaxed),
            appends_lost: self.lost.load(Ordering::Relaxed),
            follower_lag: self.lag.load(Ordering::Relaxed),
        }
    }
}

/// Hands every stored record, in order, to the member's room from where it stands, while the
/// member reaches the store; ends once the member shut down and the last polls' events are
/// delivered (bounded), or the room is gone.
async fn follow(
    log: Arc<Log>,
    link: Arc<MemberLink>,
    appended: Arc<AtomicU64>,
    lag: Arc<AtomicU64>,
    follower: LogFollower,
) {
    let stop = async {
        follower.shutdown().cancelled().await;
        let drained = async {
            follower.poll_loops_ended().await;
            let appended = appended.load(Ordering::SeqCst);
            let mut last = log.last.subscribe();
            let mut reached = link.changes();
            while follower.position().is_some_and(|p| p < appended) {
                tokio::select! {
                    _ = last.changed() => {}
                    _ = reached.changed() => {}
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        };
        let _ = tokio::time::timeout(SHUTDOWN_BOUND, drained).await;
    };
    let following = async {
        let mut last = log.last.subscribe();
        let mut reached = link.changes();
        loop {
            if link.reachable() {
                last.borrow_and_update();
                let Some(position) = follower.position() else {
                    return;
                };
                let records = log.after(position);
                let end = records.last().map_or(position, |(sequence, _)| *sequence);
                for (sequence, record) in records {
                    lag.store(end - sequence, Ordering::Relaxed);
                    if !follower.deliver(sequence, Some(record)) {
                        return;
                    }
                }
            }
            tokio::select! {
                _ = last.changed() => {}
                _ = reached.changed() => {}
            }
        }
    };
    tokio::select! {
        () = following => {}
        () = stop => {}
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::{
        domain::CallId,
        events::{ReleaseEvent, ReleaseKind, SessionEnding},
    };

    fn agent(n: u32) -> AgentId {
        AgentId::parse("agent", &(101 + n).to_string(), 59_999).unwrap()
    }

    fn release(agent: AgentId) -> Record {
        Record::Release(ReleaseEvent {
            agent,
            kind: ReleaseKind::CallRelease,
            call_id: CallId::parse("c", "1-1").unwrap(),
            customer_number: None,
            event_time: None,
            observed_time: SystemTime::UNIX_EPOCH,
            raw_event_type: "AgentEvent_Call_Release".into(),
            token: ResumeToken {
                epoch: 0,
                sequence: 0,
            },
        })
    }

    fn log(replay_events: usize) -> Log {
        Log::new(&EventSettings {
            replay_events,
            replay_age: Duration::from_secs(60),
            ..EventSettings::default()
        })
    }

    fn sequences(backfill: &Backfill) -> Vec<u64> {
        backfill.events.iter().map(|e| e.token.sequence).collect()
    }

    /// Records appended by any member get the next number of one sequence, and a follower
    /// reads every kept record after its position, in order.
    #[tokio::test(start_paused = true)]
    async fn records_are_numbered_across_members_and_followed_in_order() {
        let log = Arc::new(log(10));
        let links = [
            Arc::new(MemberLink::default()),
            Arc::new(MemberLink::default()),
        ];
        let lifecycle = Lifecycle::new();
        let members: Vec<MemberLog> = links
            .iter()
            .map(|link| MemberLog::open(log.clone(), link.clone(), &lifecycle))
            .collect();
        for n in 0..6 {
            members[n % 2]
                .append(&release(agent(n as u32 % 3)))
                .unwrap()
                .await;
        }
        let followed: Vec<u64> = log.after(0).iter().map(|(s, _)| *s).collect();
        assert_eq!(followed, [1, 2, 3, 4, 5, 6]);
        assert_eq!(log.after(4).len(), 2);
        assert_eq!(members[1].last_sequence().await, Some(6));

        // Cut off: nothing read, the append waits until the member is back.
        links[1].connected.send_replace(false);
        assert_eq!(members[1].last_sequence().await, None);
        let read = members[1].read(vec![agent(0)], 0, 6).await;
        assert_eq!(read.dropped, [agent(0)]);
        let append = tokio::spawn(members[1].append(&release(agent(0))).unwrap());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(*log.last.borrow(), 6);
        links[1].connected.send_replace(true);
        append.await.unwrap();
        assert_eq!(*log.last.borrow(), 7);
    }

    /// At most `replay_events` per agent and kind, none older than the replay age; a read
    /// after a token names the agent when records after the token were dropped.
    #[tokio::test(start_paused = true)]
    async fn retention_drops_per_agent_and_by_age_and_reads_tell_what_was_dropped() {
        let log = log(2);
        for _ in 0..3 {
            log.append(release(agent(0)));
        }
        log.append(Record::SessionEnded(agent(0), SessionEnding::Forgotten));
        log.append(release(agent(1)));
        let read = log.read(vec![agent(0), agent(1)], 0, 5);
        // Agent 0's first release (1) was dropped; its session end is no release. Agent 1's
        // first release chains to the last record dropped before it, as on the stream: it may
        // have had one there.
        assert_eq!(sequences(&read), [2, 3, 5]);
        assert_eq!(read.dropped, [agent(0), agent(1)]);
        assert!(log.read(vec![agent(1)], 1, 5).dropped.is_empty());
        let read = log.read(vec![agent(0)], 1, 5);
        assert_eq!((sequences(&read), read.dropped), (vec![2, 3], vec![]));
        assert_eq!(
            sequences(&log.read(vec![agent(0)], 2, 2)),
            Vec::<u64>::new()
        );

        tokio::time::advance(Duration::from_secs(60)).await;
        log.append(release(agent(2)));
        assert_eq!(log.after(0).len(), 1, "older records expired");
        // Agent 1's record after token 4 expired: a Gap; a token at the log's end: none.
        assert_eq!(log.read(vec![agent(1)], 4, 6).dropped, [agent(1)]);
        assert!(log.read(vec![agent(1)], 5, 6).dropped.is_empty());
    }
}
