//! Where request ids are claimed and their answers kept: in this process's memory
//! ([`IdempotencyCache`], alone) or shared by the replicas (`--nats-url`). The release policy
//! sees only [`RequestIds`], so it behaves the same on either.
use std::{fmt, sync::Arc};

use futures_util::future::BoxFuture;
use tokio::time::Instant;

use super::{
    idempotency::{self, IdempotencyCache},
    ReleaseCommand, ReleaseError, ReleaseReport, Retention,
};
use crate::{domain::RequestId, gateway::GatewayError};

/// What a ReleaseCall answered, as a duplicate gets it.
pub(crate) type ReleaseAnswer = Result<ReleaseReport, ReleaseError>;

/// An answer as a store shared by replicas keeps it, for repeats of its request_id on any of
/// them. Versioned: a replica reads only the versions it knows (a record it cannot read is,
/// to a claim, a store out of reach: nothing is sent), and a new format comes beside this one.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "version", rename_all = "snake_case")]
pub(crate) enum KeptAnswer {
    V1 { answer: ReleaseAnswer },
}

impl KeptAnswer {
    /// `answer` with each of its texts cut to `max_chars` (a store bounds its values), and a
    /// wait that could not start kept as what it is to a repeat: an attempt that ended
    /// without an answer.
    pub(crate) fn of(answer: &ReleaseAnswer, max_chars: usize) -> Self {
        let cut = |text: &mut String| *text = text.chars().take(max_chars).collect();
        let mut answer = answer.clone();
        match &mut answer {
            Ok(report) => cut(&mut report.message),
            Err(
                ReleaseError::Rejected { message, .. }
                | ReleaseError::NoActiveCall { message, .. }
                | ReleaseError::Gateway(
                    GatewayError::Connect(message)
                    | GatewayError::Transport(message)
                    | GatewayError::Malformed(message),
                ),
            ) => cut(message),
            Err(error @ ReleaseError::CannotWait(_)) => *error = ReleaseError::EarlierAttemptLost,
            Err(_) => {}
        }
        Self::V1 { answer }
    }

    pub(crate) fn into_answer(self) -> ReleaseAnswer {
        match self {
            Self::V1 { answer } => answer,
        }
    }
}

/// A request_id within its caller's namespace: two callers' ids never meet.
pub(crate) type AnswerKey = (Arc<str>, RequestId);

/// Request ids claimed and answered, for the idempotency window.
pub(crate) trait RequestIds: fmt::Debug + Send + Sync {
    /// Claims `key` for `command`: the first claim anywhere does the work; the others wait for
    /// its answer, or are told the id meant something else.
    fn claim<'a>(
        &'a self,
        key: &'a AnswerKey,
        command: &'a ReleaseCommand,
        terms: ClaimTerms,
    ) -> BoxFuture<'a, Claim>;

    /// Whether `key` has an answer, or one on the way, within the window (false when that
    /// cannot be known now).
    fn contains<'a>(&'a self, key: &'a AnswerKey) -> BoxFuture<'a, bool>;

    /// Ids remembered, as last known (for the metrics).
    fn entries(&self) -> usize;

    /// Whether answers kept as [`Retention::Evictable`] may be forgotten before their window
    /// ends to make room (a cache), rather than holding their place for the whole window (a
    /// store that evicts nothing).
    fn forgets_evictable_answers(&self) -> bool;
}

/// What a claim promises about the work it is for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClaimTerms {
    /// The owner answers by then (plus the time to record the answer); a claim left unanswered
    /// well past it is an attempt lost with its process.
    pub(crate) deadline: Instant,
    /// How long to keep the id if the attempt is lost (its outcome unknown).
    pub(crate) if_lost: Retention,
}

/// The outcome of claiming a request id.
pub(crate) enum Claim {
    /// First of its id: do the work and complete the ticket.
    Owner(Box<dyn Ticket>),
    /// Seen before (maybe still running, maybe on another replica): wait for that answer.
    Follower(Pending),
    /// Seen before with different parameters.
    Conflict,
    /// Every remembered id is still waiting for its answer or must be kept: none can be
    /// forgotten safely.
    Full,
    /// The store cannot be reached: nothing may be done under this id now.
    Unavailable,
}

/// The right, and the duty, to record an id's answer.
pub(crate) trait Ticket: Send {
    /// Records the answer for everyone waiting and keeps it as `retention` says; the future
    /// ends once it is recorded, or could not be (a duplicate then finds the claim lost). The
    /// caller decides whether its own answer waits for that.
    fn complete(
        self: Box<Self>,
        answer: ReleaseAnswer,
        retention: Retention,
    ) -> BoxFuture<'static, ()>;
}

/// The answer of the attempt that owns the id, or None if it ended without one (lost).
pub(crate) struct Pending(BoxFuture<'static, Option<ReleaseAnswer>>);

impl Pending {
    pub(crate) fn new(answer: BoxFuture<'static, Option<ReleaseAnswer>>) -> Self {
        Self(answer)
    }

    pub(crate) async fn wait(self) -> Option<ReleaseAnswer> {
        self.0.await
    }
}

/// The in-memory store: one process's cache. Claims never wait and are never unavailable.
pub(crate) type AnswerCache = IdempotencyCache<AnswerKey, ReleaseCommand, ReleaseAnswer>;

impl RequestIds for AnswerCache {
    fn claim<'a>(
        &'a self,
        key: &'a AnswerKey,
        command: &'a ReleaseCommand,
        // A lost attempt here is a dropped ticket, whose id is forgotten as today.
        _terms: ClaimTerms,
    ) -> BoxFuture<'a, Claim> {
        let claim = match IdempotencyCache::claim(self, key, command.clone()) {
            idempotency::Claim::Owner(ticket) => Claim::Owner(Box::new(ticket)),
            idempotency::Claim::Follower(pending) => {
                Claim::Follower(Pending::new(Box::pin(pending.wait())))
            }
            idempotency::Claim::Conflict => Claim::Conflict,
            idempotency::Claim::Full => Claim::Full,
        };
        Box::pin(std::future::ready(claim))
    }

    fn contains<'a>(&'a self, key: &'a AnswerKey) -> BoxFuture<'a, bool> {
        Box::pin(std::future::ready(IdempotencyCache::contains(self, key)))
    }

    fn entries(&self) -> usize {
        self.len()
    }

    fn forgets_evictable_answers(&self) -> bool {
        true
    }
}

impl Ticket for idempotency::Ticket<AnswerKey, ReleaseCommand, ReleaseAnswer> {
    fn complete(
        self: Box<Self>,
        answer: ReleaseAnswer,
        retention: Retention,
    ) -> BoxFuture<'static, ()> {
        idempotency::Ticket::complete(*self, answer, retention);
        Box::pin(std::future::ready(()))
    }
}
