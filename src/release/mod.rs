//! The hang-up policy and the ReleaseCall use case: which retries are safe, what "no call"
//! means, request-id idempotency, and waiting for a release's event. Knows nothing of gRPC.
mod claims;
mod confirm;
mod idempotency;
mod shares;

use std::{panic::AssertUnwindSafe, sync::Arc, time::Duration};

use futures_util::FutureExt;
use tokio::time::Instant;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub(crate) use claims::{AnswerKey, Claim, ClaimTerms, Pending, ReleaseAnswer, RequestIds, Ticket};
pub(crate) use confirm::Confirmation;
pub(crate) use idempotency::{IdempotencyCache, Retention};
pub(crate) use shares::{CallerLimit, CallerShareLimits};

use crate::{
    domain::{AgentId, RequestId},
    events::{EventHub, SubscribeError},
    gateway::{Answer, GatewayError, ReleaseTarget, Retcode, Session, SessionOperation},
    jittered_backoff,
    lifecycle::Lifecycle,
    sessions::Sessions,
    shares::{CallerName, Shares},
    telemetry::trace,
};

/// Whether the retcode means "the call is already gone": 200-017 (release) and 200-025
/// (dropcall).
fn means_no_call(retcode: &Retcode) -> bool {
    [Retcode::NO_CALL_TO_RELEASE, Retcode::NO_CALL_TO_DROP].contains(retcode)
}

/// Whether a release may have happened (or be happening) although the gateway refused it:
/// 100-007 "exception during the agent operation" (the gateway may have got part way); 000-007
/// "interface invoked repeatedly" (the same release of this agent is running at the gateway:
/// repeating ours once it is done would hang up the next call); 000-004 "agent being switched
/// over" (DR: the reference does not say the operation was not carried out first).
fn leaves_outcome_unknown(retcode: &Retcode) -> bool {
    [
        Retcode::OPERATION_EXCEPTION,
        Retcode::DUPLICATE_IN_PROGRESS,
        Retcode::SWITCHING_OVER,
    ]
    .contains(retcode)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReleaseCommand {
    pub(crate) agent: AgentId,
    pub(crate) target: ReleaseTarget,
    pub(crate) require_active_call: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReleaseOutcome {
    Released,
    NoActiveCall,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReleaseReport {
    pub(crate) outcome: ReleaseOutcome,
    pub(crate) retcode: Retcode,
    pub(crate) message: String,
    /// The answer was recorded for an earlier request with the same id.
    pub(crate) replayed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ReleaseError {
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("the CC-Gateway refused: retcode {retcode} ({message})")]
    Rejected { retcode: Retcode, message: String },
    #[error("the agent has no call to release: retcode {retcode} ({message})")]
    NoActiveCall { retcode: Retcode, message: String },
    #[error("request_id was already used with different parameters")]
    RequestIdReused,
    #[error("an earlier request with this request_id ended without an answer")]
    EarlierAttemptLost,
    #[error("the request_id cache holds only pending releases and answers it must keep")]
    TooManyPending,
    /// The caller holds as much of what callers share as one caller may; nothing was sent.
    #[error("the caller is at its limit ({})", .0.flag())]
    CallerLimit(CallerLimit),
    #[error("the facade shut down before the gateway answered")]
    ShuttingDown,
    /// The state the replicas share (NATS) cannot be reached; nothing was sent.
    #[error("the replicas' shared state (NATS) is unreachable; nothing was sent")]
    SharedStateUnavailable,
    /// wait_for_release_event could not start watching; nothing was sent.
    #[error(transparent)]
    CannotWait(SubscribeError),
}

impl ReleaseError {
    /// Whether the hang-up may have happened although no success came back. Only a release of
    /// the *current* call makes this dangerous: repeating it could hang up the next call.
    pub(crate) fn may_have_released(&self) -> bool {
        match self {
            Self::Gateway(e) => e.may_have_taken_effect(),
            Self::Rejected { retcode, .. } => leaves_outcome_unknown(retcode),
            // The earlier attempt may have sent its release before it died; shutdown may cut
            // off a release in flight.
            Self::EarlierAttemptLost | Self::ShuttingDown => true,
            Self::NoActiveCall { .. }
            | Self::RequestIdReused
            | Self::TooManyPending
            | Self::CallerLimit(_)
            | Self::SharedStateUnavailable
            | Self::CannotWait(_) => false,
        }
    }
}

/// How long a request id keeps its answer. A client repeats a request because it did not get
/// the answer, whatever the facade knew: so every answer to a release of the current call that
/// reached the gateway (released, no call, outcome unknown) holds for the whole window,
/// whatever the cache's pressure, or the repeat would hang up the next call. A dropcall names
/// its call: its settled answers may make room, and one with an unknown outcome is safe to
/// repeat, so it is not remembered, nor is anything that provably changed nothing.
fn retention(target: &ReleaseTarget, answer: &ReleaseAnswer) -> Retention {
    let settled = match answer {
        Ok(_) | Err(ReleaseError::NoActiveCall { .. }) => true,
        Err(error) if *target == ReleaseTarget::Current && error.may_have_released() => true,
        Err(_) => false,
    };
    match (settled, target) {
        (false, _) => Retention::Forget,
        (true, ReleaseTarget::Current) => Retention::Pinned,
        (true, ReleaseTarget::Call(_)) => Retention::Evictable,
    }
}

#[derive(Debug, Clone)]
pub(crate) struct ReleasePolicy {
    /// Attempts for dropcall (call-scoped, safe to repeat) on transport failures.
    pub(crate) dropcall_attempts: u32,
    /// Attempts for any release when the connection provably was not made.
    pub(crate) connect_attempts: u32,
    pub(crate) retry_base_delay: Duration,
    pub(crate) idempotency_window: Duration,
    pub(crate) idempotency_capacity: usize,
    pub(crate) caller_shares: CallerShareLimits,
}

impl Default for ReleasePolicy {
    fn default() -> Self {
        Self {
            dropcall_attempts: 3,
            connect_attempts: 3,
            retry_base_delay: Duration::from_millis(100),
            idempotency_window: Duration::from_secs(600),
            idempotency_capacity: 100_000,
            // A quarter of each shared default, as the flags' defaults are.
            caller_shares: CallerShareLimits {
                request_ids: 25_000,
                pending_request_ids: 272,
                release_waiters: 250,
            },
        }
    }
}

/// One ReleaseCall, as a caller asks for it.
#[derive(Debug, Clone)]
pub(crate) struct ReleaseRequest {
    pub(crate) command: ReleaseCommand,
    /// The caller's idempotency key, if it sent one.
    pub(crate) request_id: Option<RequestId>,
    /// The name of the caller, whose namespace `request_id` is in (one namespace for all
    /// without caller authorization).
    pub(crate) caller: CallerName,
    /// When the answer is due.
    pub(crate) deadline: Instant,
    /// A session the caller handed over (see `Sessions::send`); not part of what makes a
    /// repeated request_id the same request.
    pub(crate) handed: Option<Session>,
    /// Answer only once the release's event was observed (or why it was not).
    pub(crate) wait_for_event: bool,
}

/// A release carried out (or replayed), and what became of the wait for its event.
#[derive(Debug, Clone)]
pub(crate) struct Released {
    pub(crate) report: ReleaseReport,
    pub(crate) confirmation: Confirmation,
}

#[derive(Debug, Clone)]
pub(crate) struct ReleaseService {
    sessions: Sessions,
    events: EventHub,
    policy: ReleasePolicy,
    answers: Arc<dyn RequestIds>,
    /// Each caller's share of the request_ids in `answers`.
    request_id_shares: shares::RequestIdShares,
    /// Each caller's share of the release waiters.
    waiter_shares: Shares,
    /// Whether a release may go ahead with this replica's sessions while `answers` (and the
    /// rest of the shared state) cannot be reached.
    release_while_unreachable: bool,
    /// Whether `answers` is shared with other replicas.
    shared: bool,
    /// The release room's part of the hard stop: a call still running answers at once with
    /// what it knows.
    hard_stop: CancellationToken,
    /// Where releases that must outlive their caller run.
    tasks: TaskTracker,
}

impl ReleaseService {
    pub(crate) fn new(
        sessions: Sessions,
        events: EventHub,
        policy: ReleasePolicy,
        lifecycle: &Lifecycle,
    ) -> Self {
        let answers: claims::AnswerCache =
            IdempotencyCache::new(policy.idempotency_window, policy.idempotency_capacity);
        Self {
            sessions,
            events,
            request_id_shares: shares::RequestIdShares::new(
                policy.caller_shares,
                policy.idempotency_window,
            ),
            waiter_shares: Shares::new(policy.caller_shares.release_waiters),
            policy,
            answers: Arc::new(answers),
            release_while_unreachable: true,
            shared: false,
            hard_stop: lifecycle.hard_stop().child_token(),
            tasks: lifecycle.tasks().clone(),
        }
    }

    /// Claims request ids in `answers`, shared with other replicas, instead of this process's
    /// memory. While it cannot be reached, releases are refused (nothing sent), unless
    /// `release_while_unreachable`: then releases without a request_id go ahead with this
    /// replica's sessions (one with a request_id is still refused, as its id cannot be claimed
    /// where the other replicas would see it).
    pub(crate) fn sharing_request_ids(
        self,
        answers: Arc<dyn RequestIds>,
        release_while_unreachable: bool,
    ) -> Self {
        Self {
            answers,
            release_while_unreachable,
            shared: true,
            // The bucket evicts nothing: every answer holds its place for the window.
            request_id_shares: self.request_id_shares.clone().keeping_evictable_answers(),
            ..self
        }
    }

    /// Whether request ids (and the rest of the state) are shared with other replicas.
    pub(crate) fn shares_state(&self) -> bool {
        self.shared
    }

    /// request_ids whose answers (or releases under way) are remembered.
    pub(crate) fn idempotency_entries(&self) -> usize {
        self.answers.entries()
    }

    /// Whether the state the replicas share can be reached (always, alone).
    pub(crate) fn shared_state_reachable(&self) -> bool {
        self.answers.reachable()
    }

    /// Carries out a ReleaseCall: watches for the release's event first when asked (so it
    /// cannot slip by unseen), releases (at most once per request_id), then waits for the
    /// event. A release that happened is a success whatever becomes of the wait. At the hard
    /// stop it answers at once: a release that may have been sent is outcome-unknown.
    pub(crate) async fn release_call(
        &self,
        request: ReleaseRequest,
    ) -> Result<Released, ReleaseError> {
        if !self.release_while_unreachable && !self.answers.reachable() {
            // Another replica may hold a newer Guid, or the same request_id: refuse before
            // anything is sent, so that a retry is safe.
            return Err(ReleaseError::SharedStateUnavailable);
        }
        let agent = request.command.agent;
        let target = request.command.target.clone();
        let caller = request.caller;
        let key = request.request_id.map(|id| (caller.clone(), id));
        // Not for a repeated request_id, whose answer is replayed without waiting (and which
        // must not start polling an agent for nothing).
        let repeated = match &key {
            Some(key) if request.wait_for_event => {
                tokio::time::timeout_at(request.deadline, self.answers.contains(key))
                    .await
                    .unwrap_or(false)
            }
            _ => false,
        };
        let wait_for_event = request.wait_for_event && !repeated;
        // Held until the wait ends; taken before anything is sent (a watcher starts polling
        // the agent), so that a caller over its share costs the gateway nothing.
        let _waiter_share = if wait_for_event {
            Some(
                self.waiter_shares
                    .take(&caller)
                    .ok_or(ReleaseError::CallerLimit(CallerLimit::ReleaseWaiters))?,
            )
        } else {
            None
        };
        let watcher = if wait_for_event {
            match confirm::watch_releases(&self.events, agent).await {
                Ok(watcher) => Some(watcher),
                // No session yet: one handed over is adopted by the release; nobody polled the
                // agent, so its event waits at the gateway for the watcher subscribed after.
                Err(SubscribeError::NoSession(_)) => None,
                Err(error) => return Err(ReleaseError::CannotWait(error)),
            }
        } else {
            None
        };
        let report = tokio::select! {
            biased;
            report = self.release(request.command, &caller, key.as_ref(), request.deadline, request.handed) => report?,
            () = self.hard_stop.cancelled() => return Err(ReleaseError::ShuttingDown),
        };
        let confirmation = if wait_for_event
            && report.outcome == ReleaseOutcome::Released
            && !report.replayed
        {
            let watcher = match watcher {
                Some(watcher) => Ok(watcher),
                None => confirm::watch_releases(&self.events, agent).await,
            };
            let confirmation = tokio::select! {
                biased;
                confirmation = confirm::wait_for_release(watcher, &target, request.deadline) => confirmation,
                () = self.hard_stop.cancelled() => Confirmation::ShuttingDown,
            };
            if !matches!(confirmation, Confirmation::Confirmed(_)) {
                tracing::warn!(%agent, ?confirmation, "released the call, but its release event was not observed");
            }
            confirmation
        } else {
            Confirmation::NotAsked
        };
        Ok(Released {
            report,
            confirmation,
        })
    }

    /// Releases a call for `caller`, at most once per `request_id` within the idempotency
    /// window, and only within the caller's share of the request_ids.
    async fn release(
        &self,
        command: ReleaseCommand,
        caller: &CallerName,
        key: Option<&AnswerKey>,
        deadline: Instant,
        handed: Option<Session>,
    ) -> Result<ReleaseReport, ReleaseError> {
        let budget = deadline.saturating_duration_since(Instant::now());
        let Some(key) = key else {
            return self
                .release_once(&command, caller, deadline, handed.as_ref())
                .await;
        };
        let share = self.request_id_shares.take(caller);
        if let Err(limit) = share {
            // An id the caller was given an answer for is still replayed: only a new one
            // needs a share.
            let known = tokio::time::timeout_at(deadline, self.answers.contains(key))
                .await
                .unwrap_or(false);
            if !known {
                return Err(ReleaseError::CallerLimit(limit));
            }
        }
        let terms = ClaimTerms {
            deadline,
            if_lost: retention(&command.target, &Err(ReleaseError::EarlierAttemptLost)),
        };
        // A claim cut off by the deadline may have landed: it is then never executed, and
        // duplicates find it lost (outcome unknown), never free to act.
        let claim = tokio::time::timeout_at(deadline, self.answers.claim(key, &command, terms))
            .await
            .unwrap_or(Claim::Unavailable);
        let pending = match claim {
            Claim::Conflict => return Err(ReleaseError::RequestIdReused),
            Claim::Full => return Err(ReleaseError::TooManyPending),
            Claim::Unavailable => return Err(ReleaseError::SharedStateUnavailable),
            Claim::Follower(pending) => {
                let answer = tokio::time::timeout_at(deadline, pending.wait())
                    .await
                    .map_err(|_| GatewayError::Timeout(budget))?;
                return match answer {
                    Some(Ok(report)) => Ok(ReleaseReport {
                        replayed: true,
                        ..report
                    }),
                    Some(Err(error)) => Err(error),
                    None => Err(ReleaseError::EarlierAttemptLost),
                };
            }
            Claim::Owner(ticket) => {
                let share = match share {
                    Ok(share) => share,
                    Err(limit) => {
                        // The id was forgotten since it was found: a new one after all, and
                        // nothing was sent for it.
                        let refused = Err(ReleaseError::CallerLimit(limit));
                        ticket.complete(refused.clone(), Retention::Forget).await;
                        return refused;
                    }
                };
                // The work runs on its own task: a caller that goes away mid-request must not
                // cut off the answer that later duplicates are promised.
                let this = self.clone();
                let caller = caller.clone();
                // The caller's trace goes along: the gateway request is still made for it.
                self.tasks.spawn(trace::carry(async move {
                    // A panic must not leave duplicates free to act: for them it is an attempt
                    // whose outcome is unknown.
                    let release = this.release_once(&command, &caller, deadline, handed.as_ref());
                    let answer = AssertUnwindSafe(release)
                        .catch_unwind()
                        .await
                        .unwrap_or(Err(ReleaseError::EarlierAttemptLost));
                    // Recorded before the caller hears it: a retry after the answer finds it.
                    let retention = retention(&command.target, &answer);
                    ticket.complete(answer.clone(), retention).await;
                    this.request_id_shares.settle(share, retention);
                    answer
                }))
            }
        };
        pending
            .await
            .unwrap_or(Err(ReleaseError::EarlierAttemptLost))
    }

    async fn release_once(
        &self,
        command: &ReleaseCommand,
        caller: &CallerName,
        deadline: Instant,
        handed: Option<&Session>,
    ) -> Result<ReleaseReport, ReleaseError> {
        let answer = self
            .send_with_safe_retries(command, caller, deadline, handed)
            .await?;
        interpret(command, answer)
    }

    async fn send_with_safe_retries(
        &self,
        command: &ReleaseCommand,
        caller: &CallerName,
        deadline: Instant,
        handed: Option<&Session>,
    ) -> Result<Answer, GatewayError> {
        let mut attempt = 1;
        loop {
            let error = match self
                .sessions
                .send(
                    command.agent,
                    &SessionOperation::Release(command.target.clone()),
                    deadline,
                    handed,
                    Some(caller),
                )
                .await
            {
                Ok((answer, _)) => return Ok(answer),
                Err(error) => error,
            };
            let limit = self.retry_limit(&command.target, &error);
            let delay = jittered_backoff(self.policy.retry_base_delay, attempt, Duration::MAX);
            if attempt >= limit || Instant::now() + delay >= deadline {
                return Err(error);
            }
            tracing::warn!(agent = %command.agent, attempt, %error, "retrying a release that is safe to repeat");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// How many attempts an error allows. "Release the current call" is repeated only when the
    /// request provably never left; dropcall names its call and may be repeated after any
    /// transport failure.
    fn retry_limit(&self, target: &ReleaseTarget, error: &GatewayError) -> u32 {
        match (target, error) {
            (_, GatewayError::Connect(_)) => self.policy.connect_attempts,
            (
                ReleaseTarget::Call(_),
                GatewayError::Transport(_) | GatewayError::HttpStatus { status: 502..=504 },
            ) => self.policy.dropcall_attempts,
            _ => 1,
        }
    }
}

fn interpret(command: &ReleaseCommand, answer: Answer) -> Result<ReleaseReport, ReleaseError> {
    let Answer {
        retcode, message, ..
    } = answer;
    let outcome = if retcode.is_ok() {
        ReleaseOutcome::Released
    } else if means_no_call(&retcode) {
        if command.require_active_call {
            return Err(ReleaseError::NoActiveCall { retcode, message });
        }
        ReleaseOutcome::NoActiveCall
    } else {
        return Err(ReleaseError::Rejected { retcode, message });
    };
    Ok(ReleaseReport {
        outcome,
        retcode,
        message,
        replayed: false,
    })
}
