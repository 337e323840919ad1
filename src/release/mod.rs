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

pub(crate) use claims::{
    AnswerCache, AnswerKey, Claim, ClaimTerms, KeptAnswer, Pending, ReleaseAnswer, RequestIds,
    Ticket,
};
pub(crate) use confirm::Confirmation;
pub(crate) use idempotency::Retention;
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

/// The gateway's refusals of a release that provably changed nothing: the only retcodes after
/// which a release of the current call is forgotten, so that a repeat may act. The list is
/// closed on purpose: any other retcode, documented or not, known today or added later, may have
/// hung the call up (the reference lists 100-007 for release, and says nothing of what an
/// undocumented code did), so its answer is kept and a repeat sends nothing.
const REFUSALS_THAT_CHANGED_NOTHING: [Retcode; 3] = [
    // 100-006: the gateway does not know the agent as signed in with this Guid (the reference:
    // what a wrong or expired Guid gets); it acted for nobody. The caller hands a fresh Guid
    // over and repeats.
    Retcode::AGENT_NOT_SIGNED_IN,
    // 000-003: no right to invoke, the reference's other answer to a wrong or expired Guid.
    Retcode::NO_RIGHT,
    // 000-002: the parameter or URL is invalid: the request named no agent or interface the
    // gateway could act on. (000-006 "message parameter error" is not here: a release carries
    // no message, so the reference does not say what that code means for one.)
    Retcode::INVALID_PARAMETER,
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReleaseCommand {
    pub(crate) agent: AgentId,
    pub(crate) target: ReleaseTarget,
    pub(crate) require_active_call: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ReleaseOutcome {
    Released,
    NoActiveCall,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ReleaseReport {
    pub(crate) outcome: ReleaseOutcome,
    pub(crate) retcode: Retcode,
    pub(crate) message: String,
    /// The answer was recorded for an earlier request with the same id (never kept: whoever
    /// reads a kept answer sets it).
    #[serde(skip)]
    pub(crate) replayed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
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
    /// wait_for_release_event could not start watching; nothing was sent. Never kept
    /// ([`KeptAnswer`] records it as a lost attempt).
    #[error(transparent)]
    #[serde(skip)]
    CannotWait(SubscribeError),
}

impl ReleaseError {
    /// Whether the failure provably changed nothing at the gateway: it never left the facade,
    /// or the gateway refused it in a way that [`REFUSALS_THAT_CHANGED_NOTHING`] lists, or
    /// found no call. Everything else may have acted.
    pub(crate) fn changed_nothing(&self) -> bool {
        match self {
            Self::Gateway(e) => !e.may_have_taken_effect(),
            Self::Rejected { retcode, .. } => REFUSALS_THAT_CHANGED_NOTHING.contains(retcode),
            Self::NoActiveCall { .. }
            | Self::RequestIdReused
            | Self::TooManyPending
            | Self::CallerLimit(_)
            | Self::SharedStateUnavailable
            | Self::CannotWait(_) => true,
            // The earlier attempt may have sent its release before it died; shutdown may cut
            // off a release in flight.
            Self::EarlierAttemptLost | Self::ShuttingDown => false,
        }
    }

    /// Whether the hang-up may have happened although no success came back. Only a release of
    /// the *current* call makes this dangerous: repeating it could hang up the next call.
    pub(crate) fn may_have_released(&self) -> bool {
        !self.changed_nothing()
    }
}

/// How long a request id keeps its answer. A client repeats a request because it did not get
/// the answer, whatever the facade knew: so every answer to a release of the current call that
/// may have reached the gateway (released, no call, and anything that may have acted: an
/// unknown retcode, a malformed answer, a timeout) holds for the whole window, whatever the
/// cache's pressure, or the repeat would hang up the next call; only what provably changed
/// nothing is forgotten. A dropcall names its call: its answers (released, no call) are kept
/// so that a repeat gets them rather than "no call", but may make room; one whose outcome is
/// unknown is safe to repeat (the repeat finds the call or its absence), so it is not kept.
fn retention(target: &ReleaseTarget, answer: &ReleaseAnswer) -> Retention {
    let kept = match answer {
        Ok(_) | Err(ReleaseError::NoActiveCall { .. }) => true,
        Err(error) => *target == ReleaseTarget::Current && !error.changed_nothing(),
    };
    match (kept, target) {
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
    /// Whether a release without a request_id may go ahead with this process's sessions while
    /// the shared state cannot be reached.
    pub(crate) release_while_unreachable: bool,
}

/// Tells whether the state the replicas share can be reached now (always, for a process
/// alone).
#[derive(Clone)]
pub(crate) struct Reachable(Arc<dyn Fn() -> bool + Send + Sync>);

impl Reachable {
    pub(crate) fn new(reachable: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        Self(Arc::new(reachable))
    }

    pub(crate) fn now(&self) -> bool {
        (self.0)()
    }
}

impl std::fmt::Debug for Reachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Reachable").field(&self.now()).finish()
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
    /// Whether the state the replicas share (`answers`, the sessions) can be reached now.
    shared_state_reachable: Reachable,
    /// The release room's part of the hard stop: a call still running answers at once with
    /// what it knows.
    hard_stop: CancellationToken,
    /// Where releases that must outlive their caller run.
    tasks: TaskTracker,
}

impl ReleaseService {
    /// Claims request ids in `answers`. While the shared state cannot be reached (as
    /// `shared_state_reachable` tells), releases are refused (nothing sent), unless the policy
    /// allows releasing while it is unreachable: then releases without a request_id go ahead
    /// with this process's sessions (one with a request_id is still refused, as its id cannot
    /// be claimed where the other replicas would see it).
    pub(crate) fn new(
        sessions: Sessions,
        events: EventHub,
        policy: ReleasePolicy,
        answers: Arc<dyn RequestIds>,
        shared_state_reachable: Reachable,
        lifecycle: &Lifecycle,
    ) -> Self {
        let mut request_id_shares =
            shares::RequestIdShares::new(policy.caller_shares, policy.idempotency_window);
        if !answers.forgets_evictable_answers() {
            request_id_shares = request_id_shares.keeping_evictable_answers();
        }
        Self {
            sessions,
            events,
            request_id_shares,
            waiter_shares: Shares::new(policy.caller_shares.release_waiters),
            policy,
            answers,
            shared_state_reachable,
            hard_stop: lifecycle.hard_stop().child_token(),
            tasks: lifecycle.tasks().clone(),
        }
    }

    /// Carries out a ReleaseCall: watches for the release's event first when asked (so it
    /// cannot slip by unseen), releases (at most once per request_id), then waits for the
    /// event. A release that happened is a success whatever becomes of the wait. At the hard
    /// stop it answers at once: a release that may have been sent is outcome-unknown.
    pub(crate) async fn release_call(
        &self,
        request: ReleaseRequest,
    ) -> Result<Released, ReleaseError> {
        if !self.policy.release_while_unreachable && !self.shared_state_reachable.now() {
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
            // The share is asked for only now, by the owner of a new id: an id already
            // claimed or answered is replayed (or waited for) whatever the caller holds, so a
            // repeat of a release that may have acted never hears a refusal that invites a
            // retry.
            Claim::Owner(ticket) => {
                let share = match self.request_id_shares.take(caller) {
                    Ok(share) => share,
                    Err(limit) => {
                        // Nothing was sent for it: the claim is handed back.
                        let refused = Err(ReleaseError::CallerLimit(limit));
                        ticket.complete(refused.clone(), Retention::Forget).await;
                        return refused;
                    }
                };
                // The work runs on its own task: a caller that goes away mid-request must not
                // cut off the answer that later duplicates are promised. The task is tracked,
                // so a stopping process records the answer before it exits.
                let (answer_tx, answer_rx) = tokio::sync::oneshot::channel();
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
                    let retention = retention(&command.target, &answer);
                    record_and_answer(ticket, answer, retention, answer_tx).await;
                    this.request_id_shares.settle(share, retention);
                }));
                answer_rx
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

/// Records an owner's answer under its request_id and tells the caller, in the order that
/// keeps every promise to a repeat while the caller waits as little as it can.
///
/// An answer that is kept (it may have acted, or it says what happened) reaches the caller
/// before its record is written: the claim, acknowledged before anything was sent, already
/// stops any repeat from acting. Until the record lands a repeat finds the claim pending and
/// waits for the answer; if the record never lands (the write failed, this process died) the
/// claim outlives its deadline unanswered and a repeat is told the earlier attempt was lost,
/// which is what it was told when the write failed before the caller heard, too. For a
/// release of the current call that is EARLIER_ATTEMPT_LOST, never a second release; a
/// dropcall's lost claim is forgotten, as a dropcall whose outcome is unknown always was.
///
/// An answer that is forgotten (it provably changed nothing) is forgotten before the caller
/// hears it: it tells the caller to try again, and a repeat right after it must be free to act,
/// not be handed the refusal again by a record still on its way out.
async fn record_and_answer(
    ticket: Box<dyn Ticket>,
    answer: ReleaseAnswer,
    retention: Retention,
    caller: tokio::sync::oneshot::Sender<ReleaseAnswer>,
) {
    let recording = ticket.complete(answer.clone(), retention);
    if retention == Retention::Forget {
        recording.await;
        let _ = caller.send(answer);
    } else {
        // The caller may have gone: the record is written all the same.
        let _ = caller.send(answer);
        recording.await;
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::{
        domain::{CallId, RequestId},
        gateway::{wire, KnownRetcode},
    };

    /// The retcodes, as the gateway sends them, after which a release of the current call is
    /// forgotten: written out here, apart from the code's list.
    const FORGOTTEN: [&str; 3] = ["100-006", "000-003", "000-002"];

    fn command(target: ReleaseTarget, require_active_call: bool) -> ReleaseCommand {
        ReleaseCommand {
            agent: AgentId::parse("agent_id", "101", 59_999).unwrap(),
            target,
            require_active_call,
        }
    }

    /// What a release makes of a gateway answer whose retcode is `retcode` (any string, as the
    /// JSON envelope carries it): read off the wire like any answer, then interpreted.
    fn answer_with(command: &ReleaseCommand, retcode: &str) -> ReleaseAnswer {
        let body = serde_json::json!({"message": "simulated", "retcode": retcode}).to_string();
        match wire::parse_answer(body.as_bytes()) {
            Ok(answer) => interpret(command, answer),
            Err(error) => Err(ReleaseError::Gateway(error)),
        }
    }

    /// Whether a repeat of a request_id whose release was answered `answer` would act again
    /// (own the id, so send its release) rather than get that answer.
    fn repeat_acts(command: &ReleaseCommand, answer: ReleaseAnswer) -> bool {
        let cache = AnswerCache::new(Duration::from_secs(600), 4);
        let key: AnswerKey = ("billing".into(), RequestId::parse("r", "r-1").unwrap());
        let idempotency::Claim::Owner(ticket) = cache.claim(&key, command.clone()) else {
            panic!("the first claim owns the id");
        };
        let kept = retention(&command.target, &answer);
        ticket.complete(answer, kept);
        matches!(
            cache.claim(&key, command.clone()),
            idempotency::Claim::Owner(_)
        )
    }

    /// Any string, documented codes, and strings shaped like codes (with the whitespace the
    /// envelope may carry around them).
    fn retcodes() -> impl Strategy<Value = String> {
        let documented: Vec<String> = KnownRetcode::ALL
            .iter()
            .map(|k| k.code().to_owned())
            .chain(["0".to_owned()])
            .collect();
        prop_oneof![
            any::<String>(),
            "[0-9]{3}-[0-9]{3}",
            "[ \t]{0,2}[0-9]{0,4}-?[0-9]{0,4}[ \t]{0,2}",
            proptest::sample::select(documented.clone()),
            proptest::sample::select(documented).prop_map(|code| format!(" {code} ")),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// For any retcode outside the refusals that changed nothing, a repeat of a current-call
        /// release's request_id sends nothing, and a failure is "may have released" (which the
        /// status table answers RELEASE_OUTCOME_UNKNOWN).
        #[test]
        fn only_listed_refusals_free_a_current_call_release(
            retcode in retcodes(),
            require_active_call in any::<bool>(),
        ) {
            let command = command(ReleaseTarget::Current, require_active_call);
            let answer = answer_with(&command, &retcode);
            let forgotten = FORGOTTEN.contains(&retcode.trim());
            prop_assert_eq!(repeat_acts(&command, answer.clone()), forgotten, "{:?}", answer);
            if let Err(error) = &answer {
                let no_call = matches!(error, ReleaseError::NoActiveCall { .. });
                prop_assert_eq!(error.may_have_released(), !forgotten && !no_call, "{:?}", error);
            }
        }

        /// A dropcall names its call, so repeating one whose outcome is unknown is safe: only
        /// its answers (released, no call) are kept.
        #[test]
        fn a_dropcall_keeps_only_its_answers(retcode in retcodes()) {
            let call = CallId::parse("call_id", "1456403549-15").unwrap();
            let command = command(ReleaseTarget::Call(call), false);
            let answer = answer_with(&command, &retcode);
            let answered = matches!(answer, Ok(_) | Err(ReleaseError::NoActiveCall { .. }));
            prop_assert_eq!(repeat_acts(&command, answer), !answered);
        }
    }

    #[test]
    fn unknown_and_unsettling_retcodes_keep_the_request_id() {
        let command = command(ReleaseTarget::Current, false);
        for retcode in [
            "200-099", "900-001", "100-007", "000-007", "000-004", "000-006",
        ] {
            let answer = answer_with(&command, retcode);
            assert!(
                matches!(&answer, Err(ReleaseError::Rejected { .. })),
                "{answer:?}"
            );
            assert!(!repeat_acts(&command, answer), "{retcode}");
        }
        for malformed in ["", "   ", &"9".repeat(33)] {
            let answer = answer_with(&command, malformed);
            assert!(
                matches!(
                    &answer,
                    Err(ReleaseError::Gateway(GatewayError::Malformed(_)))
                ),
                "{answer:?}"
            );
            assert!(!repeat_acts(&command, answer), "{malformed:?}");
        }
        for retcode in FORGOTTEN {
            assert!(repeat_acts(&command, answer_with(&command, retcode)));
        }
    }
}
