//! Request ids shared by the replicas: the KV bucket `<prefix>-requests`, one key per
//! (caller, request_id), named by its hex SHA-256 (short, in NATS's key charset, and without the
//! caller's name). The first replica to create the key owns the id and executes; the value
//! holds the command's fingerprint, then the claim (its replica and when an unanswered claim
//! counts as lost), then the answer. Duplicates on any replica read it, or watch the key until
//! the answer or the claim's loss. Revisions settle every race: an answer and a loss are both
//! written on the claim's revision, so only one of them lands.
//!
//! The bucket keeps every key for the idempotency window (its max age) and holds at most
//! `--idempotency-capacity` keys: a new claim beyond that is refused (TooManyPending), as no
//! kept answer may be dropped early. Unlike the in-memory cache, settled answers that could be
//! forgotten (dropcall's) are not evicted to make room: they leave at the end of their window.
use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_nats::jetstream::kv::{self, Operation};
use bytes::Bytes;
use futures_util::{future::BoxFuture, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{jetstream_error_code, Bucket, Cluster, NatsError};
use crate::{
    gateway::ReleaseTarget,
    lock,
    release::{
        AnswerKey, Claim, ClaimTerms, KeptAnswer, Pending, ReleaseAnswer, ReleaseCommand,
        ReleaseError, RequestIds, Retention, Ticket,
    },
};

/// After its deadline, how long a claim may still be answered before it counts as lost: the
/// time to record the answer, and clocks that differ a little between replicas.
const LOST_GRACE: Duration = Duration::from_secs(5);

/// How long past its request's timeout a claim may still be written over (answered, or found
/// lost), the write included: the bucket must keep a claim that much longer than the request
/// timeout, or a repeat would find the id free and release again (the configuration checks
/// --idempotency-window-secs against it).
pub const CLAIM_OUTLIVES_REQUEST: Duration = LOST_GRACE.saturating_add(super::NATS_TIMEOUT);

/// Claims in a row that find the key forgotten just then: each such round means another
/// replica's claim came and went, so a few bound the loop without refusing in practice.
const CLAIM_ROUNDS: usize = 3;

/// A waiting duplicate whose watch broke (NATS went away) tries again after this.
const REWATCH_PAUSE: Duration = Duration::from_millis(500);

/// The bucket's message count is read again at most this often (for the metrics).
const ENTRIES_REFRESH: Duration = Duration::from_secs(5);

/// The longest gateway message kept in an answer; a value stays far below the bucket's
/// value limit.
const MAX_MESSAGE_CHARS: usize = 1024;
const MAX_VALUE_BYTES: i32 = 16 * 1024;

#[derive(Debug, Clone)]
pub(crate) struct NatsRequestIds {
    cluster: Cluster,
    store: kv::Store,
    entries: Arc<EntriesGauge>,
}

#[derive(Debug, Default)]
struct EntriesGauge {
    last: AtomicUsize,
    refreshed: Mutex<Option<Instant>>,
}

/// The bucket as this replica wants it: answers kept for `window`, at most `capacity` of them.
pub(super) fn bucket(window: Duration, capacity: usize) -> Bucket {
    Bucket {
        what: "requests",
        config: kv::Config {
            history: 1,
            max_age: window,
            max_value_size: MAX_VALUE_BYTES,
            ..Default::default()
        },
        max_messages: Some(i64::try_from(capacity).unwrap_or(i64::MAX)),
    }
}

impl NatsRequestIds {
    /// The bucket, created when missing; an existing one gets `window` and `capacity` (they
    /// may have changed since it was made). KV buckets discard new messages when full, so a
    /// claim beyond capacity fails while the answers already kept stay.
    pub(crate) async fn open(
        cluster: &Cluster,
        window: Duration,
        capacity: usize,
    ) -> Result<Self, NatsError> {
        let store = cluster.key_value(bucket(window, capacity)).await?;
        Ok(Self {
            cluster: cluster.clone(),
            store,
            entries: Arc::default(),
        })
    }

    async fn claim_key(&self, key: String, fingerprint: String, terms: ClaimTerms) -> Claim {
        if !self.cluster.is_connected() {
            return Claim::Unavailable;
        }
        // Tells this claim from any other, this replica's included, when reading it back.
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let claim = Record {
            fingerprint: fingerprint.clone(),
            state: State::Pending {
                replica: self.cluster.replica().to_owned(),
                claim: nonce.clone(),
                lost_after_ms: wall_ms(terms.deadline) + millis(LOST_GRACE),
                forget_if_lost: terms.if_lost == Retention::Forget,
            },
        };
        let owner = |key, revision| {
            Claim::Owner(Box::new(NatsTicket {
                store: self.store.clone(),
                key,
                fingerprint: fingerprint.clone(),
                revision,
            }))
        };
        let mut expected = 0;
        for _ in 0..CLAIM_ROUNDS {
            // Whether the claim may have landed although no acknowledgement said so.
            let mut uncertain = false;
            match self.store.update(&key, claim.to_bytes(), expected).await {
                Ok(revision) => return owner(key, revision),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                Err(e) if is_full(&e) => return Claim::Full,
                Err(error) => {
                    tracing::warn!(%error, "could not claim a request_id in NATS: reading back whether the claim landed");
                    uncertain = true;
                }
            }
            // A claim that lands after this read is never executed: duplicates will see it
            // lost (outcome unknown), never free to act.
            let entry = match self.store.entry(&key).await {
                Ok(entry) => entry,
                Err(error) => {
                    tracing::warn!(%error, "could not read a request_id's claim in NATS");
                    return Claim::Unavailable;
                }
            };
            let entry = match entry {
                Some(entry) if entry.operation == Operation::Put => entry,
                _ if uncertain => return Claim::Unavailable,
                // Forgotten between the two: claim it again.
                None => {
                    expected = 0;
                    continue;
                }
                Some(marker) => {
                    expected = marker.revision;
                    continue;
                }
            };
            let Some(record) = Record::parse(&entry.value) else {
                tracing::warn!("a request_id's record in NATS is unreadable");
                return Claim::Unavailable;
            };
            if record.is_claim(&nonce) {
                return owner(key, entry.revision);
            }
            if record.fingerprint != fingerprint {
                return Claim::Conflict;
            }
            let answer = match record.state {
                State::Answered { answer } => {
                    let answer = answer.into_answer();
                    Pending::new(Box::pin(std::future::ready(Some(answer))))
                }
                State::Pending { .. } => Pending::new(Box::pin(await_answer(
                    self.store.clone(),
                    key,
                    entry.revision,
                    record,
                ))),
            };
            return Claim::Follower(answer);
        }
        tracing::warn!(
            rounds = CLAIM_ROUNDS,
            "a request_id's key kept changing while it was claimed"
        );
        Claim::Unavailable
    }

    /// Reads the bucket's message count in the background, at most every [`ENTRIES_REFRESH`].
    fn refresh_entries(&self) {
        {
            let mut refreshed = lock(&self.entries.refreshed);
            if refreshed.is_some_and(|at| at.elapsed() < ENTRIES_REFRESH) {
                return;
            }
            *refreshed = Some(Instant::now());
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (mut stream, entries) = (self.store.stream.clone(), self.entries.clone());
        runtime.spawn(async move {
            if let Ok(info) = stream.info().await {
                let count = usize::try_from(info.state.messages).unwrap_or(usize::MAX);
                entries.last.store(count, Ordering::Relaxed);
            }
        });
    }
}

impl RequestIds for NatsRequestIds {
    fn claim<'a>(
        &'a self,
        key: &'a AnswerKey,
        command: &'a ReleaseCommand,
        terms: ClaimTerms,
    ) -> BoxFuture<'a, Claim> {
        Box::pin(self.claim_key(key_of(key), fingerprint(command), terms))
    }

    fn contains<'a>(&'a self, key: &'a AnswerKey) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            if !self.cluster.is_connected() {
                return false;
            }
            matches!(
                self.store.entry(key_of(key)).await,
                Ok(Some(entry)) if entry.operation == Operation::Put
            )
        })
    }

    fn entries(&self) -> usize {
        self.refresh_entries();
        self.entries.last.load(Ordering::Relaxed)
    }

    fn forgets_evictable_answers(&self) -> bool {
        // The bucket evicts nothing: every answer holds its place for the window.
        false
    }
}

struct NatsTicket {
    store: kv::Store,
    key: String,
    fingerprint: String,
    /// The claim's revision: the answer lands only if the claim is still there.
    revision: u64,
}

/// Dropped without an answer (the process is going away), the claim stays: past its deadline
/// duplicates see it lost, which is safe whatever the work did.
impl Ticket for NatsTicket {
    fn complete(
        self: Box<Self>,
        answer: ReleaseAnswer,
        retention: Retention,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let record = Record {
                fingerprint: self.fingerprint,
                state: State::Answered {
                    answer: KeptAnswer::of(&answer, MAX_MESSAGE_CHARS),
                },
            };
            let answered = match self
                .store
                .update(&self.key, record.to_bytes(), self.revision)
                .await
            {
                Ok(revision) => revision,
                Err(error) => {
                    tracing::warn!(%error, "could not record a request_id's answer in NATS: duplicates will see the attempt as lost");
                    return;
                }
            };
            if retention == Retention::Forget {
                // Waiting duplicates have seen the answer; later ones may act again.
                forget(&self.store, &self.key, answered).await;
            }
        })
    }
}

/// Removes the key's messages up to `revision` (a later claim stays), leaving no marker
/// behind, so that the slot is free for another id at once.
async fn forget(store: &kv::Store, key: &str, revision: u64) -> bool {
    let purged = store
        .stream
        .purge()
        .filter(format!("{}{key}", store.prefix))
        .sequence(revision + 1)
        .await;
    match purged {
        Ok(response) => response.purged > 0,
        Err(error) => {
            tracing::warn!(%error, "could not forget a request_id in NATS: it stays until its window ends");
            false
        }
    }
}

/// A duplicate's wait for the owner's answer, seen by watching the key; None when the claim is
/// lost (its deadline passed unanswered: it is then recorded as lost, once) or forgotten. The
/// caller bounds the wait by its own deadline.
async fn await_answer(
    store: kv::Store,
    key: String,
    mut revision: u64,
    mut claim: Record,
) -> Option<ReleaseAnswer> {
    loop {
        let mut watch = match store.watch_with_history(&key).await {
            Ok(watch) => watch,
            Err(error) => {
                tracing::debug!(%error, "cannot watch a request_id's key yet");
                tokio::time::sleep(REWATCH_PAUSE).await;
                continue;
            }
        };
        loop {
            let lost_at = claim.lost_at();
            tokio::select! {
                entry = watch.next() => match entry {
                    Some(Ok(entry)) if entry.operation == Operation::Put => {
                        let record = Record::parse(&entry.value)?;
                        if record.fingerprint != claim.fingerprint {
                            return None;
                        }
                        if let State::Answered { answer } = record.state {
                            return Some(answer.into_answer());
                        }
                        (revision, claim) = (entry.revision, record);
                    }
                    Some(Ok(_)) => return None,
                    Some(Err(_)) | None => {
                        tokio::time::sleep(REWATCH_PAUSE).await;
                        break;
                    }
                },
                () = tokio::time::sleep_until(lost_at) => {
                    if record_lost(&store, &key, revision, &claim).await {
                        return None;
                    }
                    // The owner answered (or the key moved) just now: the watch shows it.
                    claim.extend_grace();
                }
            }
        }
    }
}

/// Records that the claim at `revision` was lost; false if it is no longer the key's
/// newest (answered meanwhile, or another claim).
async fn record_lost(store: &kv::Store, key: &str, revision: u64, claim: &Record) -> bool {
    let State::Pending { forget_if_lost, .. } = claim.state else {
        return false;
    };
    tracing::warn!("a request_id's claim was not answered by its deadline: its attempt is lost");
    if forget_if_lost {
        return forget(store, key, revision).await;
    }
    let lost = Record {
        fingerprint: claim.fingerprint.clone(),
        state: State::Answered {
            answer: KeptAnswer::of(&Err(ReleaseError::EarlierAttemptLost), MAX_MESSAGE_CHARS),
        },
    };
    store.update(key, lost.to_bytes(), revision).await.is_ok()
}

/// Whether a write failed because the bucket takes no more keys: JetStream answers a bucket
/// that discards new messages at its maximum with "store failed" (10077), as it does any
/// store failure; either way the claim did not land.
fn is_full(error: &kv::UpdateError) -> bool {
    jetstream_error_code(error) == Some(async_nats::jetstream::ErrorCode::STREAM_STORE_FAILED)
}

/// The key of a request id: hex SHA-256 of the caller's name (length first, so no two pairs
/// run together) and the id.
fn key_of((caller, id): &AnswerKey) -> String {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    digest.update(&(caller.len() as u64).to_be_bytes());
    digest.update(caller.as_bytes());
    digest.update(id.as_str().as_bytes());
    digest
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What makes two requests with one id the same request.
fn fingerprint(command: &ReleaseCommand) -> String {
    let target = match &command.target {
        ReleaseTarget::Current => "current".to_owned(),
        ReleaseTarget::Call(call) => format!("call {call}"),
    };
    format!(
        "agent {} {target} require_active_call {}",
        command.agent, command.require_active_call
    )
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// `at` on the wall clock, in milliseconds since the epoch: what other replicas can read.
fn wall_ms(at: Instant) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    millis(now + at.saturating_duration_since(Instant::now()))
}

/// The value of a key.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    fingerprint: String,
    state: State,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum State {
    /// Claimed by `replica`, which answers before `lost_after_ms` (wall clock) or never.
    Pending {
        replica: String,
        /// This claim's own id.
        claim: String,
        lost_after_ms: u64,
        forget_if_lost: bool,
    },
    Answered {
        answer: KeptAnswer,
    },
}

impl Record {
    fn to_bytes(&self) -> Bytes {
        serde_json::to_vec(self)
            .expect("a record serializes")
            .into()
    }

    fn parse(value: &[u8]) -> Option<Self> {
        serde_json::from_slice(value).ok()
    }

    /// Whether this is the pending claim `nonce`.
    fn is_claim(&self, nonce: &str) -> bool {
        matches!(&self.state, State::Pending { claim, .. } if claim == nonce)
    }

    /// When, on this replica's clock, the claim counts as lost.
    fn lost_at(&self) -> Instant {
        let State::Pending { lost_after_ms, .. } = self.state else {
            return Instant::now();
        };
        let now = millis(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        );
        Instant::now() + Duration::from_millis(lost_after_ms.saturating_sub(now))
    }

    /// Gives the owner a little longer, once its answer is known to be on the way.
    fn extend_grace(&mut self) {
        if let State::Pending { lost_after_ms, .. } = &mut self.state {
            *lost_after_ms = lost_after_ms.saturating_add(millis(LOST_GRACE));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        domain::{AgentId, CallId, RequestId},
        gateway::{BusyCause, GatewayError, Retcode},
        release::{CallerLimit, ReleaseOutcome, ReleaseReport},
    };

    fn answers() -> Vec<ReleaseAnswer> {
        let retcode = |raw| Retcode::parse(raw).unwrap();
        let agent = AgentId::parse("a", "101", 1000).unwrap();
        let mut answers = vec![
            Ok(ReleaseReport {
                outcome: ReleaseOutcome::Released,
                retcode: retcode("0"),
                message: "success".to_owned(),
                replayed: false,
            }),
            Ok(ReleaseReport {
                outcome: ReleaseOutcome::NoActiveCall,
                retcode: retcode("200-017"),
                message: "no call".to_owned(),
                replayed: false,
            }),
            Err(ReleaseError::Rejected {
                retcode: retcode("100-007"),
                message: "exception".to_owned(),
            }),
            Err(ReleaseError::NoActiveCall {
                retcode: retcode("200-025"),
                message: "gone".to_owned(),
            }),
            // Retcodes the reference does not document: kept, as the release may have
            // happened, and read back as the same retcode (never as a documented one).
            Err(ReleaseError::Rejected {
                retcode: retcode("200-099"),
                message: "undocumented".to_owned(),
            }),
            Err(ReleaseError::Rejected {
                retcode: retcode(&"é".repeat(16)),
                message: "not ascii, 32 bytes".to_owned(),
            }),
        ];
        let gateway = [
            GatewayError::NoSession(agent),
            GatewayError::Connect("refused".to_owned()),
            GatewayError::Timeout(Duration::from_millis(1500)),
            GatewayError::DeadlineTooShort(Duration::from_millis(3)),
            GatewayError::Transport("reset".to_owned()),
            GatewayError::HttpStatus { status: 503 },
            GatewayError::Malformed("not json".to_owned()),
            GatewayError::Oversized { limit: 65536 },
            GatewayError::Busy(BusyCause::QueueFull),
            GatewayError::Busy(BusyCause::CallerQueueFull),
            GatewayError::Busy(BusyCause::DeadlineWhileWaiting),
        ];
        answers.extend(gateway.into_iter().map(|e| Err(ReleaseError::Gateway(e))));
        answers.extend(
            [
                ReleaseError::RequestIdReused,
                ReleaseError::EarlierAttemptLost,
                ReleaseError::TooManyPending,
                ReleaseError::CallerLimit(CallerLimit::RequestIds),
                ReleaseError::CallerLimit(CallerLimit::PendingRequestIds),
                ReleaseError::CallerLimit(CallerLimit::ReleaseWaiters),
                ReleaseError::ShuttingDown,
                ReleaseError::SharedStateUnavailable,
            ]
            .map(Err),
        );
        answers
    }

    #[test]
    fn every_answer_survives_the_bucket() {
        for answer in answers() {
            let record = Record {
                fingerprint: "f".to_owned(),
                state: State::Answered {
                    answer: KeptAnswer::of(&answer, MAX_MESSAGE_CHARS),
                },
            };
            let read = Record::parse(&record.to_bytes()).expect("parses");
            let State::Answered { answer: stored } = read.state else {
                panic!("answered");
            };
            let stored = stored.into_answer();
            // What a duplicate on another replica answers: outcome unknown or not, alike.
            assert_eq!(
                stored.as_ref().err().map(ReleaseError::may_have_released),
                answer.as_ref().err().map(ReleaseError::may_have_released)
            );
            assert_eq!(stored, answer);
        }
    }

    #[test]
    fn long_messages_are_cut() {
        let answer = Err(ReleaseError::Rejected {
            retcode: Retcode::parse("100-007").unwrap(),
            message: "x".repeat(100_000),
        });
        let bytes = Record {
            fingerprint: "f".to_owned(),
            state: State::Answered {
                answer: KeptAnswer::of(&answer, MAX_MESSAGE_CHARS),
            },
        }
        .to_bytes();
        assert!(bytes.len() < usize::try_from(MAX_VALUE_BYTES).unwrap());
    }

    #[test]
    fn keys_are_hex_hashes_of_caller_and_id() {
        let id = |s| RequestId::parse("r", s).unwrap();
        let key = key_of(&("billing".into(), id("r-1")));
        assert_eq!(key.len(), 64);
        assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(!key.contains("billing"));
        // The caller's name does not run into the id.
        assert_ne!(
            key_of(&("ab".into(), id("c"))),
            key_of(&("a".into(), id("bc")))
        );
        assert_eq!(key, key_of(&("billing".into(), id("r-1"))));
    }

    #[test]
    fn fingerprints_tell_commands_apart() {
        let agent = |n| AgentId::parse("a", n, 1000).unwrap();
        let command = |a, target, require| ReleaseCommand {
            agent: agent(a),
            target,
            require_active_call: require,
        };
        let call = ReleaseTarget::Call(CallId::parse("c", "1-2").unwrap());
        let all = [
            command("101", ReleaseTarget::Current, false),
            command("102", ReleaseTarget::Current, false),
            command("101", ReleaseTarget::Current, true),
            command("101", call.clone(), false),
        ];
        for (i, a) in all.iter().enumerate() {
            for (j, b) in all.iter().enumerate() {
                assert_eq!(fingerprint(a) == fingerprint(b), i == j);
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_is_lost_after_its_deadline_and_the_grace() {
        let deadline = Instant::now() + Duration::from_secs(10);
        let record = Record {
            fingerprint: "f".to_owned(),
            state: State::Pending {
                replica: "r".to_owned(),
                claim: "c".to_owned(),
                lost_after_ms: wall_ms(deadline) + millis(LOST_GRACE),
                forget_if_lost: false,
            },
        };
        let lost_at = record.lost_at();
        let expected = deadline + LOST_GRACE;
        let skew = lost_at.max(expected) - lost_at.min(expected);
        assert!(skew < Duration::from_millis(50), "{skew:?}");
    }
}
