//! The release event log on a JetStream stream, `<prefix>-events`: one subject per agent,
//! `<prefix>.events.<agent id>` (release events; `.ended` after it for the end of its
//! session), at most `--replay-events` kept per subject and none older than
//! `--replay-age-secs`. The stream sequence is every record's number, and the stream's creation
//! time its epoch, so a resume token means the same on every replica and across restarts.
//!
//! Appends are deduplicated (`Nats-Msg-Id`, made once per record) and chained: each release
//! carries the stream sequence of its agent's previous one (`Ccgw-Previous`), written with
//! `Nats-Expected-Last-Subject-Sequence` so the chain is exact even if two replicas append for
//! one agent (a deposed poll owner). A resuming watcher's reader uses the chain to tell whether
//! retention dropped anything after its token. Reads go to the stream's leader
//! (`STREAM.MSG.GET`), which holds everything the follower delivered, rather than to a direct-get
//! replica that may lag it.
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_nats::{
    jetstream::{
        self,
        consumer::{pull, DeliverPolicy},
        context::PublishErrorKind,
        stream::{self, LastRawMessageErrorKind, StorageType},
    },
    HeaderMap,
};
use bytes::Bytes;
use futures_util::{future::BoxFuture, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Cluster, NatsError};
use crate::{
    domain::{AgentId, CallId},
    events::{
        dropped_after, Backfill, EventLog, EventSettings, LogFollower, LogStats, Record,
        ReleaseEvent, ReleaseKind, ResumeToken, SessionEnding,
    },
    gateway::Retcode,
    jittered_backoff, lock,
};

/// The sequence of the agent's previous release event (0: none kept when it was appended, and
/// the stream had dropped nothing).
const PREVIOUS: &str = "Ccgw-Previous";
/// How long the stream remembers a message id: a retried append within it is not stored twice.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// The first retry of a failed append or follow waits 100 to 200 ms; the ceiling doubles up to
/// `RETRY_MAX`.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// One append attempt (its reads and its acknowledgement): shorter than the JetStream context's
/// 5 s, so an append retries soon after the stream's leader changed; a retry of an append that
/// was stored after all is deduplicated by its message id.
const APPEND_ATTEMPT: Duration = Duration::from_secs(2);
/// Once the service shuts down, an append still failing is given up after this long (logged
/// and counted as lost), and the follower follows this long at most for the last polls' events.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(3);
/// Agents of one resuming watcher read at once.
const PARALLEL_READS: usize = 16;
/// How often the follower checks that it keeps up with the stream.
const STALL_CHECK: Duration = Duration::from_secs(2);
/// A resuming watcher's read of the stream, all its agents together.
const READ_BOUND: Duration = Duration::from_secs(10);
/// The largest agent id a subject may name (the configuration allows up to 999 999).
const MAX_AGENT_ID: u32 = 999_999;

/// The stream, as this replica appends to, follows and reads it.
#[derive(Debug)]
pub(crate) struct StreamLog {
    inner: Arc<Inner>,
    epoch: u64,
    opened_at: u64,
}

#[derive(Debug)]
struct Inner {
    jetstream: jetstream::Context,
    stream: stream::Stream,
    /// `<prefix>.events`.
    root: String,
    replica: Arc<str>,
    next_id: AtomicU64,
    /// The last stored sequence of each agent's release subject, as this replica last appended
    /// or read it; bounded by the agent id range.
    last_of: Mutex<HashMap<AgentId, u64>>,
    /// The highest sequence this replica's appends were stored at.
    appended: AtomicU64,
    /// Kept per subject: a read of one agent takes at most this many messages.
    per_agent: usize,
    shutdown: CancellationToken,
    /// Appends that failed and were retried; records given up at shutdown.
    retried: AtomicU64,
    lost: AtomicU64,
    /// What the consumer said was pending after the last record it delivered.
    lag: AtomicU64,
}

/// The stream as this replica wants it.
pub(super) fn stream_config(cluster: &Cluster, events: &EventSettings) -> stream::Config {
    stream::Config {
        name: cluster.name("events"),
        subjects: vec![format!("{}.>", cluster.subject("events"))],
        // Zero would mean "no limit" to JetStream: keep the one newest at least.
        max_messages_per_subject: i64::try_from(events.replay_events.max(1)).unwrap_or(i64::MAX),
        max_age: events.replay_age,
        storage: StorageType::File,
        num_replicas: cluster.settings().replicas,
        duplicate_window: DUPLICATE_WINDOW.min(events.replay_age),
        allow_direct: true,
        ..Default::default()
    }
}

impl StreamLog {
    /// The stream, created when missing (its limits brought to the configured ones when it
    /// exists with others).
    pub(crate) async fn open(
        cluster: &Cluster,
        events: &EventSettings,
        shutdown: CancellationToken,
    ) -> Result<Self, NatsError> {
        let name = cluster.name("events");
        let root = cluster.subject("events");
        let per_agent = events.replay_events.max(1);
        let (stream, info) = cluster.stream(stream_config(cluster, events)).await?;
        let js = cluster.jetstream();
        let created = info.created.unix_timestamp_nanos();
        tracing::info!(stream = %name, last_sequence = info.state.last_sequence, "event log opened");
        Ok(Self {
            // Identifies the stream: a recreated one has another creation time.
            epoch: (created as u64) ^ ((created >> 64) as u64),
            opened_at: info.state.last_sequence,
            inner: Arc::new(Inner {
                jetstream: js.clone(),
                stream,
                root,
                replica: cluster.replica().into(),
                next_id: AtomicU64::new(0),
                last_of: Mutex::new(HashMap::new()),
                appended: AtomicU64::new(0),
                per_agent,
                shutdown,
                retried: AtomicU64::new(0),
                lost: AtomicU64::new(0),
                lag: AtomicU64::new(0),
            }),
        })
    }
}

impl EventLog for StreamLog {
    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn opened_at(&self) -> u64 {
        self.opened_at
    }

    fn keeps_history(&self) -> bool {
        true
    }

    fn follow(&self, follower: LogFollower) {
        follower.spawn(self.inner.clone().follow(follower.clone()));
    }

    fn append(&self, record: &Record) -> Option<BoxFuture<'static, ()>> {
        let inner = self.inner.clone();
        let agent = record.agent();
        let (subject, chained) = match record {
            Record::Release(_) => (inner.subject_of(agent), true),
            Record::SessionEnded(..) => (format!("{}.ended", inner.subject_of(agent)), false),
        };
        let payload = Bytes::from(serde_json::to_vec(&WireRecord::of(record)).unwrap_or_default());
        // Made once per record: every retry of it carries the same id.
        let id = format!(
            "{}.{}",
            inner.replica,
            inner.next_id.fetch_add(1, Ordering::Relaxed)
        );
        Some(Box::pin(async move {
            inner
                .append_until_stored(agent, subject, chained, id, payload)
                .await;
        }))
    }

    fn read(&self, agents: Vec<AgentId>, after: u64, up_to: u64) -> BoxFuture<'static, Backfill> {
        let inner = self.inner.clone();
        let epoch = self.epoch;
        Box::pin(async move { inner.read(agents, after, up_to, epoch).await })
    }

    fn stats(&self) -> LogStats {
        LogStats {
            appends_retried: self.inner.retried.load(Ordering::Relaxed),
            appends_lost: self.inner.lost.load(Ordering::Relaxed),
            follower_lag: self.inner.lag.load(Ordering::Relaxed),
        }
    }

    fn last_sequence(&self) -> BoxFuture<'static, Option<u64>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let info = inner.stream.get_info().await;
            info.ok().map(|info| info.state.last_sequence)
        })
    }
}

/// Why one attempt to append failed.
enum AppendFailure {
    /// Another append for the agent came first: re-read its last and chain to it.
    Moved,
    Other(String),
}

impl Inner {
    fn subject_of(&self, agent: AgentId) -> String {
        format!("{}.{agent}", self.root)
    }

    /// Appends until the record is stored: the gateway already removed the event from its
    /// queue, so it must not be dropped. While NATS is down this waits (with backoff), and the
    /// agent's poll loop with it. Once the service shuts down, it gives up after a bound.
    async fn append_until_stored(
        &self,
        agent: AgentId,
        subject: String,
        chained: bool,
        id: String,
        payload: Bytes,
    ) {
        let mut failures = 0u32;
        let mut give_up_at = None;
        loop {
            let attempt = self.append_once(agent, &subject, chained, &id, payload.clone());
            let attempt = tokio::time::timeout(APPEND_ATTEMPT, attempt).await;
            let attempt = attempt.unwrap_or_else(|_| {
                Err(AppendFailure::Other(format!(
                    "no acknowledgement within {APPEND_ATTEMPT:?}"
                )))
            });
            let error = match attempt {
                Ok(sequence) => {
                    self.appended.fetch_max(sequence, Ordering::SeqCst);
                    if failures > 0 {
                        tracing::info!(%agent, sequence, failures, "release log: appended after retries");
                    }
                    return;
                }
                Err(AppendFailure::Moved) if failures == 0 => {
                    lock(&self.last_of).remove(&agent);
                    failures += 1;
                    continue;
                }
                Err(AppendFailure::Moved) => {
                    lock(&self.last_of).remove(&agent);
                    "the agent's last record moved".to_owned()
                }
                Err(AppendFailure::Other(error)) => error,
            };
            failures = failures.saturating_add(1);
            self.retried.fetch_add(1, Ordering::Relaxed);
            if self.shutdown.is_cancelled() {
                let at = *give_up_at.get_or_insert_with(|| Instant::now() + SHUTDOWN_BOUND);
                if Instant::now() >= at {
                    self.lost.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(%agent, failures, %error, "release log: gave up appending a record at shutdown; watchers elsewhere miss it without a Gap");
                    return;
                }
            }
            let pause = jittered_backoff(RETRY_FIRST, failures, RETRY_MAX);
            tracing::warn!(%agent, failures, ?pause, %error, "release log: append failed; retrying (the agent is not polled meanwhile)");
            tokio::time::sleep(pause).await;
        }
    }

    /// One append; the stream sequence it was stored at (the first one, for a duplicate).
    async fn append_once(
        &self,
        agent: AgentId,
        subject: &str,
        chained: bool,
        id: &str,
        payload: Bytes,
    ) -> Result<u64, AppendFailure> {
        let other = |e: &dyn std::fmt::Display| AppendFailure::Other(e.to_string());
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
        if chained {
            let (last, previous) = self.last_and_previous(agent, subject).await?;
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                last.to_string().as_str(),
            );
            headers.insert(PREVIOUS, previous.to_string().as_str());
        }
        let ack = self
            .jetstream
            .publish_with_headers(subject.to_owned(), headers, payload)
            .await
            .map_err(|e| other(&e))?
            .await
            .map_err(|e| match e.kind() {
                PublishErrorKind::WrongLastSequence => AppendFailure::Moved,
                _ => other(&e),
            })?;
        if chained {
            lock(&self.last_of).insert(agent, ack.sequence);
        }
        Ok(ack.sequence)
    }

    /// The stream sequence of the agent's last kept release (0: none), and what to chain the
    /// next to: that sequence, or when nothing is kept, the last sequence the stream dropped by
    /// age (the agent's records, if it had any, were at or before it), so a reader never takes
    /// an emptied subject for one that had nothing.
    async fn last_and_previous(
        &self,
        agent: AgentId,
        subject: &str,
    ) -> Result<(u64, u64), AppendFailure> {
        if let Some(last) = lock(&self.last_of).get(&agent).copied() {
            return Ok((last, last));
        }
        match self.last_kept(subject).await? {
            Some(last) => Ok((last, last)),
            None => Ok((0, self.first_kept().await?.saturating_sub(1))),
        }
    }

    async fn last_kept(&self, subject: &str) -> Result<Option<u64>, AppendFailure> {
        let last = self
            .stream
            .raw_message_builder()
            .last_by_subject(subject)
            .send()
            .await;
        match last {
            Ok(message) => Ok(Some(message.sequence)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(AppendFailure::Other(e.to_string())),
        }
    }

    async fn first_kept(&self) -> Result<u64, AppendFailure> {
        let info = self.stream.get_info().await;
        info.map(|info| info.state.first_sequence)
            .map_err(|e| AppendFailure::Other(e.to_string()))
    }

    /// Everything kept of `agents` in `after + 1 ..= up_to`, bounded in time: an agent whose
    /// read failed or did not finish is named in `dropped` (its watcher gets a Gap rather than
    /// a silent hole).
    async fn read(&self, agents: Vec<AgentId>, after: u64, up_to: u64, epoch: u64) -> Backfill {
        let mut backfill = Backfill::default();
        let deadline = Instant::now() + READ_BOUND;
        let reads = futures_util::stream::iter(agents).map(|agent| async move {
            let read = tokio::time::timeout_at(deadline, self.read_agent(agent, after, up_to));
            (agent, read.await)
        });
        let mut reads = reads.buffer_unordered(PARALLEL_READS);
        while let Some((agent, read)) = reads.next().await {
            match read {
                Ok(Ok((events, dropped))) => {
                    backfill
                        .events
                        .extend(events.into_iter().map(|(sequence, mut event)| {
                            event.token = ResumeToken { epoch, sequence };
                            event
                        }));
                    if dropped {
                        backfill.dropped.push(agent);
                    }
                }
                Ok(Err(error)) => {
                    tracing::warn!(%agent, %error, "release log: a resuming watcher's events could not be read; it gets a Gap");
                    backfill.dropped.push(agent);
                }
                Err(_) => {
                    tracing::warn!(%agent, "release log: reading a resuming watcher's events took too long; it gets a Gap");
                    backfill.dropped.push(agent);
                }
            }
        }
        backfill.dropped.sort();
        backfill.events.sort_by_key(|event| event.token.sequence);
        backfill
    }

    /// One agent's kept release events in `after + 1 ..= up_to`, and whether any after `after`
    /// were dropped.
    async fn read_agent(
        &self,
        agent: AgentId,
        after: u64,
        up_to: u64,
    ) -> Result<(Vec<(u64, ReleaseEvent)>, bool), String> {
        let subject = self.subject_of(agent);
        let mut events = Vec::new();
        let mut first_previous = None;
        let mut next = after.saturating_add(1);
        // The subject keeps at most `per_agent` messages; one more ends the range.
        for _ in 0..=self.per_agent {
            let message = self
                .stream
                .raw_message_builder()
                .next_by_subject(subject.clone())
                .sequence(next)
                .send()
                .await;
            let message = match message {
                Ok(message) => message,
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(e.to_string()),
            };
            if first_previous.is_none() {
                // Unchained (not written by this service): assume the one before it is gone.
                let previous = message
                    .headers
                    .get(PREVIOUS)
                    .and_then(|v| v.as_str().parse().ok())
                    .unwrap_or(message.sequence - 1);
                first_previous = Some(previous);
            }
            if message.sequence > up_to {
                break;
            }
            match decode(&self.root, message.subject.as_str(), &message.payload) {
                Some(Record::Release(event)) => events.push((message.sequence, event)),
                _ => {
                    tracing::warn!(%agent, sequence = message.sequence, "release log: skipped a record it cannot read")
                }
            }
            next = message.sequence + 1;
        }
        let dropped = match first_previous {
            Some(previous) => dropped_after(after, Some(previous), true, 0),
            None => {
                let kept_before = self.last_kept(&subject).await.map_err(failure_text)?;
                let first = self.first_kept().await.map_err(failure_text)?;
                dropped_after(after, None, kept_before.is_some(), first)
            }
        };
        Ok((events, dropped))
    }

    /// Hands every stored record, in order, to this replica's hub, from where the hub stands:
    /// an ordered consumer, recreated (from the hub's position) whenever it breaks.
    async fn follow(self: Arc<Self>, follower: LogFollower) {
        let mut failures = 0u32;
        let stop = self.follow_until_drained(&follower);
        tokio::pin!(stop);
        loop {
            let Some(position) = follower.position() else {
                return;
            };
            let followed = async {
                let consumer = self
                    .stream
                    .create_consumer(pull::OrderedConfig {
                        deliver_policy: DeliverPolicy::ByStartSequence {
                            start_sequence: position + 1,
                        },
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
                while let Some(message) = messages.next().await {
                    let message = message.map_err(|e| e.to_string())?;
                    let info = message.info().map_err(|e| e.to_string())?;
                    let sequence = info.stream_sequence;
                    self.lag.store(info.pending, Ordering::Relaxed);
                    let expected = follower.position().map_or(sequence, |p| p + 1);
                    if sequence > expected {
                        // Only retention removes records this early: the follower fell behind
                        // it (a long outage). Watchers here miss them; resuming ones get a Gap.
                        tracing::warn!(missed = sequence - expected, "release log: records were dropped before this replica followed them; its live watchers may have missed events");
                    }
                    let record = decode(&self.root, message.subject.as_str(), &message.payload);
                    if record.is_none() {
                        tracing::warn!(sequence, "release log: skipped a record it cannot read");
                    }
                    if !follower.deliver(sequence, record) {
                        return Ok(());
                    }
                }
                Err("the consumer ended".to_owned())
            };
            let error = tokio::select! {
                result = followed => match result {
                    Ok(()) => return,
                    Err(error) => error,
                },
                () = self.stalled(&follower) => "the stream moved on, the consumer did not".to_owned(),
                () = &mut stop => return,
            };
            failures = failures.saturating_add(1);
            let pause = jittered_backoff(RETRY_FIRST, failures, RETRY_MAX);
            tracing::warn!(failures, ?pause, %error, "release log: following the stream failed; resuming from where this replica stands");
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = &mut stop => return,
            }
        }
    }

    /// Resolves when the follower's position stood still for a check interval while the stream
    /// holds more: a consumer whose server restarted can wait for its missed heartbeats (tens of
    /// seconds) before it notices; recreating it at once costs nothing.
    async fn stalled(&self, follower: &LogFollower) {
        let mut before = follower.position();
        loop {
            tokio::time::sleep(STALL_CHECK).await;
            let now = follower.position();
            if now.is_some() && now == before {
                let info = self.stream.get_info().await;
                if info.is_ok_and(|info| Some(info.state.last_sequence) > now) {
                    return;
                }
            }
            before = now;
        }
    }

    /// Resolves once the service shuts down and the last polls' events are delivered here
    /// (their appends stored and followed), or a bound after shutdown began.
    async fn follow_until_drained(&self, follower: &LogFollower) {
        follower.shutdown().cancelled().await;
        let drained = async {
            follower.poll_loops_ended().await;
            let appended = self.appended.load(Ordering::SeqCst);
            while follower.position().is_some_and(|p| p < appended) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let _ = tokio::time::timeout(SHUTDOWN_BOUND, drained).await;
    }
}

fn failure_text(failure: AppendFailure) -> String {
    match failure {
        AppendFailure::Moved => "moved".to_owned(),
        AppendFailure::Other(error) => error,
    }
}

/// A record as the stream stores it (the agent is in the subject).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "record", rename_all = "snake_case")]
enum WireRecord {
    Release {
        kind: WireKind,
        call_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        customer_number: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        event_time_ms: Option<u64>,
        observed_time_ms: u64,
        event_type: String,
    },
    SessionRefused {
        retcode: String,
        message: String,
    },
    SessionForgotten,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum WireKind {
    CallRelease,
    CustomerRelease,
}

fn millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl WireRecord {
    fn of(record: &Record) -> Self {
        match record {
            Record::Release(event) => Self::Release {
                kind: match event.kind {
                    ReleaseKind::CallRelease => WireKind::CallRelease,
                    ReleaseKind::CustomerRelease => WireKind::CustomerRelease,
                },
                call_id: event.call_id.to_string(),
                customer_number: event.customer_number.clone(),
                event_time_ms: event.event_time.map(millis),
                observed_time_ms: millis(event.observed_time),
                event_type: event.raw_event_type.clone(),
            },
            Record::SessionEnded(_, SessionEnding::Refused { retcode, message }) => {
                Self::SessionRefused {
                    retcode: retcode.to_string(),
                    message: message.clone(),
                }
            }
            Record::SessionEnded(_, SessionEnding::Forgotten) => Self::SessionForgotten,
        }
    }
}

/// The record stored under `subject`; `None` when it is not one this service wrote.
fn decode(root: &str, subject: &str, payload: &[u8]) -> Option<Record> {
    let rest = subject.strip_prefix(root)?.strip_prefix('.')?;
    let (agent, ended) = match rest.strip_suffix(".ended") {
        Some(agent) => (agent, true),
        None => (rest, false),
    };
    let agent = AgentId::parse("subject", agent, MAX_AGENT_ID).ok()?;
    let wire: WireRecord = serde_json::from_slice(payload).ok()?;
    let time = |ms: u64| UNIX_EPOCH.checked_add(Duration::from_millis(ms));
    match (wire, ended) {
        (
            WireRecord::Release {
                kind,
                call_id,
                customer_number,
                event_time_ms,
                observed_time_ms,
                event_type,
            },
            false,
        ) => Some(Record::Release(ReleaseEvent {
            agent,
            kind: match kind {
                WireKind::CallRelease => ReleaseKind::CallRelease,
                WireKind::CustomerRelease => ReleaseKind::CustomerRelease,
            },
            call_id: CallId::parse("call_id", &call_id).ok()?,
            customer_number,
            event_time: event_time_ms.and_then(time),
            observed_time: time(observed_time_ms)?,
            raw_event_type: event_type,
            token: ResumeToken {
                epoch: 0,
                sequence: 0,
            },
        })),
        (WireRecord::SessionRefused { retcode, message }, true) => Some(Record::SessionEnded(
            agent,
            SessionEnding::Refused {
                retcode: Retcode::parse(&retcode).ok()?,
                message,
            },
        )),
        (WireRecord::SessionForgotten, true) => {
            Some(Record::SessionEnded(agent, SessionEnding::Forgotten))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(agent: u32) -> Record {
        Record::Release(ReleaseEvent {
            agent: AgentId::parse("a", &agent.to_string(), MAX_AGENT_ID).unwrap(),
            kind: ReleaseKind::CustomerRelease,
            call_id: CallId::parse("c", "1700000000-42").unwrap(),
            customer_number: Some("88001".into()),
            event_time: UNIX_EPOCH.checked_add(Duration::from_millis(1_700_000_000_123)),
            observed_time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_456),
            raw_event_type: "AgentEvent_Customer_Release".into(),
            token: ResumeToken {
                epoch: 0,
                sequence: 0,
            },
        })
    }

    fn stored(record: &Record) -> Vec<u8> {
        serde_json::to_vec(&WireRecord::of(record)).unwrap()
    }

    #[test]
    fn records_round_trip_through_their_subject_and_payload() {
        let event = release(101);
        assert_eq!(
            decode("p.events", "p.events.101", &stored(&event)),
            Some(event)
        );
        let agent = AgentId::parse("a", "102", MAX_AGENT_ID).unwrap();
        for ending in [
            SessionEnding::Forgotten,
            SessionEnding::Refused {
                retcode: Retcode::parse("100-006").unwrap(),
                message: "no such session".into(),
            },
        ] {
            let ended = Record::SessionEnded(agent, ending);
            assert_eq!(
                decode("p.events", "p.events.102.ended", &stored(&ended)),
                Some(ended)
            );
        }
    }

    #[test]
    fn records_under_the_wrong_subject_or_foreign_payloads_are_not_read() {
        let event = stored(&release(101));
        for subject in [
            "p.events.101.ended",
            "p.events.0101",
            "p.events.x",
            "q.events.101",
            "p.events",
        ] {
            assert_eq!(decode("p.events", subject, &event), None, "{subject}");
        }
        assert_eq!(decode("p.events", "p.events.101", b"{}"), None);
        assert_eq!(decode("p.events", "p.events.101", b"junk"), None);
    }
}
