//! The replicas' shared sessions: the KV bucket `<prefix>-sessions`, agent id (decimal) -> the
//! agent's registry entry as JSON, with the replica that wrote it. The values are credentials
//! (Guids, cookies); keys, logs and errors name agents and revisions only.
//!
//! The registry stays the local copy that every request reads and the one place that decides;
//! its changes reach the bucket through a writer task (compare-and-set on the revision the
//! entry was based on), and a watch of the bucket installs what the other replicas write. On a
//! conflict the bucket holds something newer: it is read and installed, so a replica with an old
//! view never overwrites a newer Guid.
//!
//! The changes waiting for the writer are coalesced per agent (the latest replaces the one
//! before), so a burst never drops one: they are bounded by the agents the registry may hold
//! (`--max-sessions`, twice over), not by how many changes come before NATS takes them.
use std::{
    collections::HashMap,
    fmt,
    future::Future,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::{sync::Notify, time::Instant};

use super::{jetstream_error_code, Bucket, Cluster, NatsError};
use crate::{
    domain::AgentId,
    gateway::{Cookies, Guid, Session},
    jittered_backoff,
    lifecycle::Lifecycle,
    lock,
    sessions::{
        Installed, SessionLimits, SessionRegistry, SessionStore, SharedSession, StoreCounters,
    },
};

const BUCKET: &str = "sessions";
/// Agents with a change waiting for the writer, per agent the registry may hold
/// (`--max-sessions`): each agent it holds, and as many it let go of (a refused session,
/// an idle one) before NATS took their last change. Only beyond it is a change dropped (the
/// agent's next change carries its whole entry).
const PENDING_AGENTS_PER_SESSION: usize = 2;
/// How long loading the bucket may take at startup.
const LOAD_WITHIN: Duration = Duration::from_secs(30);
/// The first retry of a failed write (or of the watch) comes after 100 to 200 ms; the pause
/// doubles up to `RETRY_MAX`.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How long pending writes get once the service has drained: within the 2 s the server gives
/// its tasks.
const FLUSH_WITHIN: Duration = Duration::from_millis(1500);
/// Agents whose last write the writer remembers, to chain the next change onto it. Beyond it
/// they are forgotten: a change then costs one conflict and a re-read, nothing worse.
const MAX_CHAINS: usize = 4096;
/// Retries of one write that conflicted with this replica's own latest write (whose
/// acknowledgement was lost).
const MAX_REBASES: usize = 2;
/// Keys are agent ids: at most six digits.
const KEY_MAX_AGENT: u32 = 999_999;
/// A Guid, two cookie headers and their JSON fit well below it.
const MAX_VALUE_SIZE: i32 = 16 * 1024;

/// The sessions bucket as this replica wants it.
pub(super) fn bucket() -> Bucket {
    Bucket {
        what: BUCKET,
        config: kv::Config {
            description: "ccgw-callcontrol: agent id -> gateway session (credentials)".into(),
            history: 1,
            max_value_size: MAX_VALUE_SIZE,
            ..Default::default()
        },
        max_messages: None,
    }
}

/// This replica's registry, sharing its sessions through the bucket: created if missing, loaded
/// whole before it returns (bounded), then kept current by a watch; its changes are written
/// back by a writer task. Both tasks run until the service has drained, the writer flushing
/// what is pending (bounded).
pub(crate) async fn shared_registry(
    cluster: &Cluster,
    limits: SessionLimits,
    lifecycle: &Lifecycle,
) -> Result<Arc<SessionRegistry>, NatsError> {
    let bucket = cluster.name(BUCKET);
    let kv = cluster.key_value(self::bucket()).await?;
    let counters = Arc::new(StoreCounters::default());
    let max_agents = limits
        .max_sessions
        .saturating_mul(PENDING_AGENTS_PER_SESSION);
    let outbox = Arc::new(Outbox {
        writes: Mutex::new(PendingWrites::new(max_agents)),
        arrived: Notify::new(),
    });
    let changes = Changes {
        outbox: outbox.clone(),
        counters: counters.clone(),
    };
    let registry = Arc::new(SessionRegistry::with_store(
        limits,
        Arc::new(changes),
        counters.clone(),
    ));
    let replica: Arc<str> = cluster.replica().into();
    let mut follower = Follower {
        kv: kv.clone(),
        registry: registry.clone(),
        replica: replica.clone(),
        last_revision: 0,
    };
    let watch = tokio::time::timeout(LOAD_WITHIN, follower.load())
        .await
        .map_err(|_| {
            NatsError::jetstream(
                format!("bucket {bucket}"),
                format!("loading it took longer than {LOAD_WITHIN:?}"),
            )
        })?
        .map_err(|error| NatsError::jetstream(format!("bucket {bucket}"), error))?;
    tracing::info!(
        sessions = registry.len(),
        "loaded the shared sessions from NATS"
    );
    let tasks = lifecycle.tasks();
    tasks.spawn(follower.run(watch, lifecycle.drained()));
    let writer = Writer {
        kv,
        registry: registry.clone(),
        replica,
        counters,
        outbox,
        failures: 0,
    };
    tasks.spawn(writer.run(lifecycle.drained()));
    Ok(registry)
}

/// The bucket's value. No Debug: it holds credentials.
#[derive(Serialize, Deserialize)]
struct StoredEntry {
    current: StoredSession,
    confirmed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    candidate: Option<StoredSession>,
    /// The replica that wrote it.
    writer: String,
}

#[derive(Serialize, Deserialize)]
struct StoredSession {
    guid: String,
    /// The `Cookie` header the session sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cookies: Option<String>,
}

impl StoredSession {
    fn of(session: &Session) -> Self {
        Self {
            guid: session.guid.expose().to_owned(),
            cookies: session.cookies.header_value(),
        }
    }

    fn session(self) -> Option<Session> {
        Some(Session {
            guid: Guid::parse("guid", &self.guid).ok()?,
            cookies: match self.cookies {
                Some(header) => Cookies::parse_header("cookies", &header).ok()?,
                None => Cookies::default(),
            },
        })
    }
}

fn encode(shared: &SharedSession, writer: &str) -> Bytes {
    let stored = StoredEntry {
        current: StoredSession::of(&shared.current),
        confirmed: shared.confirmed,
        candidate: shared.candidate.as_ref().map(StoredSession::of),
        writer: writer.to_owned(),
    };
    serde_json::to_vec(&stored)
        .expect("plain strings and booleans serialize")
        .into()
}

/// A bucket entry as the registry takes it.
enum Stored {
    Put {
        shared: SharedSession,
        writer: String,
    },
    Deleted,
}

/// The entry's agent and content; `None` when unreadable (never says why: serde's messages may
/// quote the value, a credential).
fn read(entry: &kv::Entry) -> Option<(AgentId, Stored)> {
    read_parts(&entry.key, entry.operation, &entry.value)
}

fn read_parts(key: &str, operation: kv::Operation, value: &[u8]) -> Option<(AgentId, Stored)> {
    let agent = AgentId::parse("key", key, KEY_MAX_AGENT).ok()?;
    let stored = match operation {
        kv::Operation::Delete | kv::Operation::Purge => Stored::Deleted,
        kv::Operation::Put => {
            let stored: StoredEntry = serde_json::from_slice(value).ok()?;
            let candidate = match stored.candidate {
                Some(candidate) => Some(candidate.session()?),
                None => None,
            };
            Stored::Put {
                shared: SharedSession {
                    current: stored.current.session()?,
                    confirmed: stored.confirmed,
                    candidate,
                },
                writer: stored.writer,
            }
        }
    };
    Some((agent, stored))
}

/// Installs `stored` (the bucket's entry at `revision`) in the registry.
fn install(registry: &SessionRegistry, agent: AgentId, revision: u64, stored: Stored) {
    let shared = match stored {
        Stored::Put { shared, .. } => Some(shared),
        Stored::Deleted => None,
    };
    if registry.install(agent, revision, shared) == Installed::Full {
        // The first, then one in a thousand: loading a bucket larger than --max-sessions
        // must not flood the log.
        static NOT_KEPT: AtomicU64 = AtomicU64::new(0);
        let not_kept = NOT_KEPT.fetch_add(1, Ordering::Relaxed);
        if not_kept.is_multiple_of(1000) {
            tracing::warn!(%agent, revision, not_kept = not_kept + 1, "another replica's session of the agent is not kept here: the session registry is full (--max-sessions)");
        }
    }
}

/// One change of an agent's entry, on its way to the writer.
#[derive(Debug)]
struct Change {
    agent: AgentId,
    based_on: u64,
    entry: Option<SharedSession>,
}

/// The changes waiting for the writer, shared by the registry's side and the writer. Its lock
/// comes after the registry's (the registry hands changes on under its own), never before it,
/// and is never held across an await.
struct Outbox {
    writes: Mutex<PendingWrites>,
    /// A change was queued.
    arrived: Notify,
}

/// The registry's side of the outbox: never blocks (the lock is held for a map operation).
struct Changes {
    outbox: Arc<Outbox>,
    counters: Arc<StoreCounters>,
}

impl fmt::Debug for Changes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Changes")
            .field("pending", &lock(&self.outbox.writes).len())
            .finish_non_exhaustive()
    }
}

impl SessionStore for Changes {
    fn changed(&self, agent: AgentId, based_on: u64, entry: Option<SharedSession>) {
        let change = Change {
            agent,
            based_on,
            entry,
        };
        let queued = lock(&self.outbox.writes).queue(change);
        if queued {
            self.outbox.arrived.notify_one();
            return;
        }
        let dropped = self.counters.dropped_changes();
        StoreCounters::count(&self.counters.dropped_changes);
        // The first, then one in a thousand: a stalled NATS must not flood the log.
        if dropped.is_multiple_of(1000) {
            tracing::warn!(%agent, dropped = dropped + 1, "changes of twice --max-sessions agents' sessions wait for NATS; a change of one more agent is not shared (the agent's next change carries its whole session)");
        }
    }
}

/// Keeps the registry current with what the other replicas write.
struct Follower {
    kv: kv::Store,
    registry: Arc<SessionRegistry>,
    replica: Arc<str>,
    /// The newest revision seen: the watch resumes after it.
    last_revision: u64,
}

impl Follower {
    /// Installs every entry of the bucket; returns the watch, which goes on with later changes.
    async fn load(&mut self) -> Result<kv::Watch, async_nats::Error> {
        let mut watch = self.kv.watch_with_history(">").await?;
        // An empty bucket delivers nothing to wait for.
        if self.kv.status().await?.values() == 0 {
            return Ok(watch);
        }
        while let Some(entry) = watch.next().await {
            let entry = entry?;
            let caught_up = entry.delta == 0;
            self.apply(&entry);
            if caught_up {
                return Ok(watch);
            }
        }
        Err("the watch ended while loading".into())
    }

    /// Follows the bucket until the service has drained; a failed watch is resumed after the
    /// last revision seen (bounded backoff), so that nothing written meanwhile is missed.
    async fn run(mut self, mut watch: kv::Watch, drained: impl Future<Output = ()>) {
        tokio::pin!(drained);
        let mut failures = 0u32;
        loop {
            let next = tokio::select! {
                () = &mut drained => return,
                next = watch.next() => next,
            };
            match next {
                Some(Ok(entry)) => {
                    failures = 0;
                    self.apply(&entry);
                    continue;
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "the watch of the shared sessions failed; resuming it")
                }
                None => tracing::warn!("the watch of the shared sessions ended; resuming it"),
            }
            watch = loop {
                failures = failures.saturating_add(1);
                let pause = jittered_backoff(RETRY_FIRST, failures, RETRY_MAX);
                tokio::select! {
                    () = &mut drained => return,
                    () = tokio::time::sleep(pause) => {}
                }
                match self
                    .kv
                    .watch_all_from_revision(self.last_revision + 1)
                    .await
                {
                    Ok(watch) => break watch,
                    Err(error) => {
                        tracing::warn!(%error, failures, "cannot resume the watch of the shared sessions yet")
                    }
                }
            };
            tracing::info!("resumed the watch of the shared sessions");
        }
    }

    fn apply(&mut self, entry: &kv::Entry) {
        self.last_revision = self.last_revision.max(entry.revision);
        match read(entry) {
            // This replica's own write: its registry holds it, or a later change of its own.
            Some((_, Stored::Put { writer, .. })) if *writer == *self.replica => {}
            Some((agent, stored)) => install(&self.registry, agent, entry.revision, stored),
            None => tracing::warn!(
                revision = entry.revision,
                "an unreadable entry in the shared sessions bucket; ignored"
            ),
        }
    }
}

/// An agent's change waiting to be written: the latest entry, and the revision the first
/// unwritten change was based on (later ones derive from it).
struct Pending {
    based_on: u64,
    entry: Option<SharedSession>,
    /// Arrival order: agents are written in the order their changes came.
    seq: u64,
}

impl Pending {
    /// A later change of the agent, based on `based_on`, replaces this one's entry. Revisions
    /// only grow: a higher base is a newer entry installed meanwhile, a lower one (0: the entry
    /// was forgotten and made again) derives from the pending one.
    fn supersede(&mut self, based_on: u64, entry: Option<SharedSession>) {
        self.based_on = self.based_on.max(based_on);
        self.entry = entry;
    }
}

/// This replica's last write of an agent: a change still based on `from` (made before the
/// registry learnt of the write) derives from `to`.
struct Chain {
    from: u64,
    to: u64,
}

enum WriteError {
    /// The bucket's entry is not at the revision the write was based on.
    Conflict,
    Failed(String),
}

/// Writes the registry's changes to the bucket, one agent at a time, in order.
struct Writer {
    kv: kv::Store,
    registry: Arc<SessionRegistry>,
    replica: Arc<str>,
    counters: Arc<StoreCounters>,
    outbox: Arc<Outbox>,
    /// Consecutive passes that failed.
    failures: u32,
}

impl Writer {
    /// Writes what arrives until the service has drained, then flushes what is pending
    /// (bounded). While NATS fails, changes go on coalescing per agent and are retried with
    /// backoff.
    async fn run(mut self, drained: impl Future<Output = ()>) {
        tokio::pin!(drained);
        let mut retry_at: Option<Instant> = None;
        loop {
            let backing_off = retry_at.is_some();
            tokio::select! {
                biased;
                () = &mut drained => break,
                () = self.outbox.arrived.notified() => {}
                () = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if backing_off => {
                    retry_at = None;
                }
            }
            if retry_at.is_some() || self.writes().is_empty() {
                continue;
            }
            retry_at = match self.write_pending().await {
                Ok(()) => {
                    self.failures = 0;
                    None
                }
                Err(()) => {
                    self.failures = self.failures.saturating_add(1);
                    let pause = jittered_backoff(RETRY_FIRST, self.failures, RETRY_MAX);
                    Some(Instant::now() + pause)
                }
            };
        }
        if self.writes().is_empty() {
            return;
        }
        let flushed = tokio::time::timeout(FLUSH_WITHIN, self.write_pending()).await;
        if !matches!(flushed, Ok(Ok(()))) {
            tracing::warn!(
                agents = self.writes().len(),
                "stopping with session changes NATS has not taken; the other replicas keep the sessions they knew"
            );
        }
    }

    /// The outbox, locked: never across an await, never while calling the registry.
    fn writes(&self) -> std::sync::MutexGuard<'_, PendingWrites> {
        lock(&self.outbox.writes)
    }

    /// Writes every change pending when it starts, in arrival order; stops at the first that
    /// NATS did not take. A change queued meanwhile wakes the writer for the next pass.
    async fn write_pending(&mut self) -> Result<(), ()> {
        let agents = self.writes().in_arrival_order();
        for agent in agents {
            let Some(pending) = self.writes().take(agent) else {
                continue;
            };
            if let Err(pending) = self.write(agent, pending).await {
                self.writes().put_back(agent, pending);
                return Err(());
            }
        }
        Ok(())
    }

    /// Writes one agent's change; hands it back when NATS did not take it.
    async fn write(&mut self, agent: AgentId, mut pending: Pending) -> Result<(), Pending> {
        let based_on = pending.based_on;
        for _ in 0..=MAX_REBASES {
            let error = match self.put(agent, &pending).await {
                Ok(revision) => {
                    self.written(agent, based_on, revision);
                    return Ok(());
                }
                Err(error) => error,
            };
            if let WriteError::Failed(error) = error {
                StoreCounters::count(&self.counters.failed_writes);
                tracing::warn!(%agent, %error, "NATS did not take a change of the agent's session; retrying");
                return Err(pending);
            }
            match self.kv.entry(agent.to_string()).await {
                // Gone altogether (purged): nothing to be based on.
                Ok(None) => pending.based_on = 0,
                Ok(Some(entry)) => match read(&entry) {
                    // This replica's own write, whose acknowledgement was lost: the change
                    // derives from it.
                    Some((_, Stored::Put { writer, .. })) if *writer == *self.replica => {
                        pending.based_on = entry.revision;
                    }
                    Some((_, stored)) => {
                        StoreCounters::count(&self.counters.conflicts);
                        tracing::info!(%agent, revision = entry.revision, "another replica changed the agent's session first; this replica takes the newer one");
                        install(&self.registry, agent, entry.revision, stored);
                        return Ok(());
                    }
                    None => {
                        StoreCounters::count(&self.counters.conflicts);
                        tracing::warn!(%agent, revision = entry.revision, "an unreadable entry in the shared sessions bucket; this replica's change is not written over it");
                        return Ok(());
                    }
                },
                // The watch brings the newer entry.
                Err(error) => {
                    StoreCounters::count(&self.counters.conflicts);
                    tracing::warn!(%agent, %error, "another replica changed the agent's session first, and reading it failed; the watch brings it");
                    return Ok(());
                }
            }
        }
        tracing::warn!(%agent, "a change of the agent's session kept conflicting; not written");
        Ok(())
    }

    /// Compare-and-set of the agent's entry on `pending.based_on` (0: create). Returns the new
    /// revision; `None` after a deletion, or when there was nothing to delete.
    async fn put(&self, agent: AgentId, pending: &Pending) -> Result<Option<u64>, WriteError> {
        let key = agent.to_string();
        let based_on = pending.based_on;
        match &pending.entry {
            Some(shared) => {
                let value = encode(shared, &self.replica);
                let revision = if based_on == 0 {
                    self.kv
                        .create(&key, value)
                        .await
                        .map_err(|e| match e.kind() {
                            kv::CreateErrorKind::AlreadyExists => WriteError::Conflict,
                            _ if another_write_in_flight(&e) => WriteError::Conflict,
                            _ => WriteError::Failed(e.to_string()),
                        })?
                } else {
                    self.kv
                        .update(&key, value, based_on)
                        .await
                        .map_err(update_error)?
                };
                Ok(Some(revision))
            }
            None if based_on == 0 => Ok(None),
            None => {
                self.kv
                    .delete_expect_revision(&key, Some(based_on))
                    .await
                    .map_err(update_error)?;
                Ok(None)
            }
        }
    }

    fn written(&mut self, agent: AgentId, based_on: u64, revision: Option<u64>) {
        self.writes().written(agent, based_on, revision);
        if let Some(revision) = revision {
            self.registry.written(agent, revision);
        }
    }
}

/// The changes waiting to be written, one per agent, and this replica's last write of each
/// agent (to chain the next change onto it).
struct PendingWrites {
    pending: HashMap<AgentId, Pending>,
    chains: HashMap<AgentId, Chain>,
    next_seq: u64,
    /// Agents with a pending change at most: a change of one more is dropped.
    max_agents: usize,
}

impl PendingWrites {
    fn new(max_agents: usize) -> Self {
        Self {
            pending: HashMap::new(),
            chains: HashMap::new(),
            next_seq: 0,
            max_agents,
        }
    }

    /// Queues the change, in place of the agent's pending one; false when it is another agent's
    /// beyond `max_agents` (not queued).
    fn queue(&mut self, change: Change) -> bool {
        let based_on = match self.chains.get(&change.agent) {
            Some(chain) if chain.from == change.based_on => chain.to,
            _ => change.based_on,
        };
        if let Some(pending) = self.pending.get_mut(&change.agent) {
            pending.supersede(based_on, change.entry);
            return true;
        }
        if self.pending.len() >= self.max_agents {
            return false;
        }
        self.next_seq += 1;
        let pending = Pending {
            based_on,
            entry: change.entry,
            seq: self.next_seq,
        };
        self.pending.insert(change.agent, pending);
        true
    }

    /// The agents with a pending change, in the order their first pending change came.
    fn in_arrival_order(&self) -> Vec<AgentId> {
        let mut order: Vec<(u64, AgentId)> =
            self.pending.iter().map(|(a, p)| (p.seq, *a)).collect();
        order.sort_unstable();
        order.into_iter().map(|(_, agent)| agent).collect()
    }

    fn take(&mut self, agent: AgentId) -> Option<Pending> {
        self.pending.remove(&agent)
    }

    /// A change NATS did not take. A change of the agent queued while it was being written is
    /// newer: it supersedes the one put back, in its place in the order, as if it had been
    /// queued behind it.
    fn put_back(&mut self, agent: AgentId, mut taken: Pending) {
        if let Some(newer) = self.pending.remove(&agent) {
            taken.supersede(newer.based_on, newer.entry);
        }
        self.pending.insert(agent, taken);
    }

    /// NATS took the agent's change based on `based_on` as `revision` (`None`: a deletion).
    /// A change of the agent queued while it was being written, on that same base, derives
    /// from the write: it is chained onto it as if it had come after.
    fn written(&mut self, agent: AgentId, based_on: u64, revision: Option<u64>) {
        let Some(revision) = revision else {
            // Deleted: the registry makes any later entry anew (based on 0).
            self.chains.remove(&agent);
            return;
        };
        if let Some(newer) = self.pending.get_mut(&agent) {
            if newer.based_on == based_on {
                newer.based_on = revision;
            }
        }
        if self.chains.len() >= MAX_CHAINS && !self.chains.contains_key(&agent) {
            self.chains.clear();
        }
        self.chains.insert(
            agent,
            Chain {
                from: based_on,
                to: revision,
            },
        );
    }

    fn len(&self) -> usize {
        self.pending.len()
    }

    fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

fn update_error(error: kv::UpdateError) -> WriteError {
    match error.kind() {
        kv::UpdateErrorKind::WrongLastRevision => WriteError::Conflict,
        _ if another_write_in_flight(&error) => WriteError::Conflict,
        _ => WriteError::Failed(error.to_string()),
    }
}

/// A compare-and-set that a clustered JetStream refused because another write of the key was
/// still being replicated ("wrong last sequence", 10164): async-nats reports it as some other
/// failure, but it is a conflict like a wrong revision (read the newer entry, write again), not
/// a failure to warn about.
fn another_write_in_flight(error: &(dyn std::error::Error + 'static)) -> bool {
    jetstream_error_code(error)
        == Some(async_nats::jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(n: u32) -> AgentId {
        AgentId::parse("a", &n.to_string(), KEY_MAX_AGENT).unwrap()
    }

    /// A compare-and-set refused with a JetStream API error `code`, as async-nats reports it.
    fn refused(code: u64) -> kv::UpdateError {
        use async_nats::jetstream::context::{PublishError, PublishErrorKind};
        let api: async_nats::jetstream::Error = serde_json::from_value(serde_json::json!({
            "code": 400, "err_code": code, "description": "wrong last sequence"
        }))
        .unwrap();
        PublishError::with_source(PublishErrorKind::Other, api).into()
    }

    /// What a clustered JetStream answers a write racing another write of the key (10164) is
    /// a conflict, for an update and for a create; other refusals are failures.
    #[test]
    fn another_write_in_flight_is_a_conflict() {
        assert!(matches!(update_error(refused(10164)), WriteError::Conflict));
        assert!(another_write_in_flight(&kv::CreateError::from(refused(
            10164
        ))));
        assert!(matches!(
            update_error(refused(10077)),
            WriteError::Failed(_)
        ));
        assert!(!another_write_in_flight(&kv::CreateError::from(refused(
            10077
        ))));
    }

    fn shared(g: &str) -> SharedSession {
        SharedSession {
            current: Session {
                guid: Guid::parse("g", g).unwrap(),
                cookies: Cookies::parse_header("c", "route=n1").unwrap(),
            },
            confirmed: true,
            candidate: None,
        }
    }

    fn change(n: u32, based_on: u64, g: Option<&str>) -> Change {
        Change {
            agent: agent(n),
            based_on,
            entry: g.map(shared),
        }
    }

    /// Agents with a pending change the tests' outbox holds at most.
    const MAX_AGENTS: usize = 1000;

    /// (based on, current Guid) of the agent's pending write.
    fn next(writes: &mut PendingWrites, n: u32) -> (u64, Option<String>) {
        let pending = writes.take(agent(n)).expect("a pending write");
        let guid = pending.entry.map(|e| e.current.guid.expose().to_owned());
        (pending.based_on, guid)
    }

    /// Two local changes on one revision make one write of the latest, on that revision.
    #[test]
    fn changes_of_one_agent_coalesce_into_the_latest() {
        let mut writes = PendingWrites::new(MAX_AGENTS);
        writes.queue(change(101, 4, Some("g1")));
        writes.queue(change(101, 4, Some("g2")));
        assert_eq!(writes.len(), 1);
        assert_eq!(next(&mut writes, 101), (4, Some("g2".to_owned())));
        // Forgotten, then signed in again before anything was written: a replacement of what
        // revision 4 held, not a create.
        writes.queue(change(101, 4, None));
        writes.queue(change(101, 0, Some("g3")));
        assert_eq!(next(&mut writes, 101), (4, Some("g3".to_owned())));
        // A newer entry installed meanwhile raises the base.
        writes.queue(change(101, 4, Some("g4")));
        writes.queue(change(101, 9, Some("g5")));
        assert_eq!(next(&mut writes, 101), (9, Some("g5".to_owned())));
        assert!(writes.is_empty());
    }

    /// Of every burst of an agent's changes only the latest is written: a deletion after a put
    /// is written as a deletion of what the first change was based on, a put after a deletion
    /// replaces it, and a put and deletion of an entry the bucket never held write nothing.
    #[test]
    fn only_the_latest_change_of_each_agent_is_written() {
        let mut writes = PendingWrites::new(MAX_AGENTS);
        for n in 0..100 {
            writes.queue(change(101, 4, Some(&format!("g{n}"))));
        }
        writes.queue(change(101, 4, None));
        writes.queue(change(102, 7, None));
        writes.queue(change(102, 0, Some("made-again")));
        writes.queue(change(103, 0, Some("never-written")));
        writes.queue(change(103, 0, None));
        assert_eq!(writes.len(), 3);
        assert_eq!(next(&mut writes, 101), (4, None));
        assert_eq!(next(&mut writes, 102), (7, Some("made-again".to_owned())));
        assert_eq!(next(&mut writes, 103), (0, None));
        assert!(writes.is_empty());
    }

    /// The bound is on agents, not on changes: an agent with a pending change always takes its
    /// next one, and only another agent's beyond the bound is refused.
    #[test]
    fn beyond_the_bound_only_a_pending_agents_change_is_queued() {
        let mut writes = PendingWrites::new(2);
        assert!(writes.queue(change(101, 0, Some("g1"))));
        assert!(writes.queue(change(102, 0, Some("g1"))));
        assert!(!writes.queue(change(103, 0, Some("g1"))), "a third agent");
        for n in 0..10 {
            assert!(writes.queue(change(101, 0, Some(&format!("g{n}")))));
        }
        assert!(writes.queue(change(102, 0, None)));
        assert_eq!(writes.len(), 2);
        assert_eq!(next(&mut writes, 101), (0, Some("g9".to_owned())));
        assert!(writes.queue(change(103, 0, Some("g1"))), "room again");
    }

    /// The registry hands a change on while the agent's previous one is being written: once
    /// NATS takes that write, the newer change derives from it; if NATS does not, the newer one
    /// supersedes it, keeping its place and the base it was rebased to.
    #[test]
    fn a_change_queued_while_the_previous_one_is_written_follows_it() {
        let mut writes = PendingWrites::new(MAX_AGENTS);
        writes.queue(change(101, 4, Some("g1")));
        let in_flight = writes.take(agent(101)).unwrap();
        writes.queue(change(101, 4, Some("g2")));
        writes.written(agent(101), in_flight.based_on, Some(6));
        assert_eq!(next(&mut writes, 101), (6, Some("g2".to_owned())));

        writes.queue(change(101, 8, Some("g3")));
        writes.queue(change(102, 0, Some("g1")));
        let mut in_flight = writes.take(agent(101)).unwrap();
        // Its acknowledgement was lost: rebased onto this replica's own write.
        in_flight.based_on = 9;
        writes.queue(change(101, 8, None));
        writes.put_back(agent(101), in_flight);
        assert_eq!(writes.in_arrival_order(), [agent(101), agent(102)]);
        assert_eq!(next(&mut writes, 101), (9, None));
    }

    /// A change made before the registry learnt of this replica's write is written on it.
    #[test]
    fn a_change_based_on_what_our_last_write_replaced_is_chained_onto_it() {
        let mut writes = PendingWrites::new(MAX_AGENTS);
        writes.written(agent(101), 4, Some(6));
        writes.queue(change(101, 4, Some("g2")));
        assert_eq!(next(&mut writes, 101), (6, Some("g2".to_owned())));
        writes.queue(change(101, 5, Some("g3")));
        assert_eq!(
            next(&mut writes, 101),
            (5, Some("g3".to_owned())),
            "not ours"
        );
        writes.written(agent(101), 6, None);
        writes.queue(change(101, 6, Some("g4")));
        assert_eq!(next(&mut writes, 101), (6, Some("g4".to_owned())));
    }

    #[test]
    fn agents_are_written_in_arrival_order() {
        let mut writes = PendingWrites::new(MAX_AGENTS);
        for n in [105, 101, 103] {
            writes.queue(change(n, 0, Some("g")));
        }
        writes.queue(change(105, 0, Some("again")));
        assert_eq!(
            writes.in_arrival_order(),
            [agent(105), agent(101), agent(103)]
        );
        let first = writes.take(agent(105)).unwrap();
        writes.put_back(agent(105), first);
        assert_eq!(writes.in_arrival_order()[0], agent(105));
    }

    #[test]
    fn the_chains_are_bounded() {
        let mut writes = PendingWrites::new(MAX_AGENTS);
        for n in 0..=MAX_CHAINS as u32 {
            writes.written(agent(101 + n), 1, Some(2));
        }
        assert!(writes.chains.len() <= MAX_CHAINS);
    }

    /// The value round-trips; a value that is not a session is unreadable, and says nothing.
    #[test]
    fn entries_round_trip_through_the_bucket_format() {
        let mut entry = shared("279fe21d.AgentGateway0");
        entry.candidate = Some(shared("handed").current);
        let value = encode(&entry, "replica-a");
        match read_parts("101", kv::Operation::Put, &value) {
            Some((a, Stored::Put { shared, writer })) => {
                assert_eq!(a, agent(101));
                assert_eq!(shared, entry);
                assert_eq!(writer, "replica-a");
            }
            _ => panic!("readable"),
        }
        assert!(matches!(
            read_parts("101", kv::Operation::Delete, b""),
            Some((_, Stored::Deleted))
        ));
        let junk = br#"{"current":{"guid":"a b"},"confirmed":true,"writer":"x"}"#;
        assert!(read_parts("101", kv::Operation::Put, junk).is_none());
        assert!(read_parts("guid", kv::Operation::Put, &value).is_none());
    }
}
