//! The one table from failures (gateway retcodes, HTTP and transport errors, bad input) to gRPC
//! statuses with google.rpc details. It has a row for every retcode the reference documents
//! (`known_retcode_rule`) and every `Condition` (`condition_rule`); both are exhaustive
//! `match`es, so a retcode or condition without a row does not compile. docs/api.md shows the
//! table ([`markdown_table`], built from `KnownRetcode::ALL` and `Condition::ALL`); a test keeps
//! them equal.
use std::{collections::HashMap, time::Duration};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    callers::{self, Denied},
    domain::{AgentId, FieldViolation},
    events::{ResumeToken, SessionEnding, SubscribeError, WatcherEnd},
    gateway::{BusyCause, GatewayError, KnownRetcode, Retcode},
    proto::metadata_key,
    release::ReleaseError,
};

/// `ErrorInfo.domain` of every error this service returns.
pub(crate) const ERROR_DOMAIN: &str = "ccgw-callcontrol";

/// Common gRPC clients (grpc-go, grpc-java, grpcio) refuse a status whose metadata exceeds
/// 8 KiB, and a status carries its message twice (`grpc-message`, percent-encoded, and inside
/// `grpc-status-details-bin`, base64): so whatever a request or the gateway puts into one is
/// bounded, and what is left out is counted.
mod bound {
    /// BadRequest field violations listed, and named in the message.
    pub(super) const VIOLATIONS: usize = 10;
    /// Agents listed in metadata `agent_ids`.
    pub(super) const AGENTS: usize = 50;
    /// Bytes of a message's detail (what went wrong, after the row's meaning).
    pub(super) const DETAIL_BYTES: usize = 768;
    /// Bytes of one metadata value, and of one violation's description.
    pub(super) const VALUE_BYTES: usize = 512;
}

/// `text` cut to at most `max` bytes, on a character boundary, with "…" where it was cut.
fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    const CUT: &str = "…";
    let mut end = max.saturating_sub(CUT.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{CUT}", &text[..end])
}

/// Lists at most [`bound::AGENTS`] agents in metadata `agent_ids`, and counts the rest.
fn list_agents(agents: &[AgentId], metadata: &mut HashMap<String, String>) {
    let listed: Vec<String> = agents
        .iter()
        .take(bound::AGENTS)
        .map(ToString::to_string)
        .collect();
    metadata.insert(metadata_key::AGENT_IDS.to_owned(), listed.join(","));
    if agents.len() > bound::AGENTS {
        metadata.insert(
            metadata_key::UNLISTED_AGENT_IDS.to_owned(),
            (agents.len() - bound::AGENTS).to_string(),
        );
    }
}

/// Whether and when a client may send the same request again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    No,
    /// Retrying after the delay is safe: the request had no effect, or it names its call
    /// (dropcall). A release of the current call that may have happened never gets here: it
    /// takes the RELEASE_OUTCOME_UNKNOWN row instead.
    After(Duration),
}

/// What a failure becomes: one row of the table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rule {
    pub(crate) code: Code,
    pub(crate) reason: &'static str,
    pub(crate) retry: Retry,
    /// The start of the status message, what a person reads first.
    pub(crate) meaning: &'static str,
}

const fn row(code: Code, reason: &'static str, retry: Retry, meaning: &'static str) -> Rule {
    Rule {
        code,
        reason,
        retry,
        meaning,
    }
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

use Code::{
    Aborted, AlreadyExists, DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument,
    PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable, Unimplemented, Unknown,
};
use Retry::{After, No};

enum_with_all! {
    /// The failures that are not a documented gateway retcode, in the table's order.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Condition {
        /// The gateway answered a retcode the reference does not document.
        OtherRetcode,
        /// HTTP 429, 502, 503 or 504: the gateway or its load balancer is busy or restarting.
        HttpUnavailable,
        /// HTTP 404 or 405: the gateway does not know the interface.
        HttpNotFound,
        /// Any other HTTP status instead of an envelope.
        OtherHttpStatus,
        Timeout,
        DeadlineTooShort,
        ConnectFailed,
        ConnectionLost,
        MalformedAnswer,
        OversizedAnswer,
        /// A release of the current call may have happened; takes the place of the failure's
        /// own row (see [`release_failure`]).
        ReleaseOutcomeUnknown,
        NoSession,
        InvalidArgument,
        RequestIdReused,
        TooManyPending,
        EarlierAttemptLost,
        WatcherTooSlow,
        TooManySessions,
        TooManyWatchers,
        TooManyPolledAgents,
        GatewayBusy,
        ShuttingDown,
        /// The replicas' shared state (NATS JetStream) cannot be reached from this replica.
        SharedStateUnavailable,
        /// No credentials, or credentials that identify no caller.
        CallerUnauthenticated,
        /// The caller is not granted the verb or an agent of the request.
        CallerNotPermitted,
        TooManyCallerStreams,
        /// The caller holds its whole share of something all callers share.
        CallerShareExhausted,
        /// An open stream's credential no longer identifies its caller (a reload).
        StreamCallerRevoked,
        /// An open stream's caller is no longer granted what it watches (a reload).
        StreamGrantRevoked,
    }
}

impl Condition {
    /// How the table's first column names the condition.
    pub(crate) const fn label(self) -> &'static str {
        match self {
            Self::OtherRetcode => "(other retcode)",
            Self::HttpUnavailable => "(HTTP 429, 502, 503, 504)",
            Self::HttpNotFound => "(HTTP 404, 405)",
            Self::OtherHttpStatus => "(other HTTP status)",
            Self::Timeout => "(timeout)",
            Self::DeadlineTooShort => "(deadline too short)",
            Self::ConnectFailed => "(connect or TLS failure)",
            Self::ConnectionLost => "(connection lost)",
            Self::MalformedAnswer => "(malformed answer)",
            Self::OversizedAnswer => "(oversized answer)",
            Self::ReleaseOutcomeUnknown => "(current-call release, outcome unknown)",
            Self::NoSession => "(no session)",
            Self::InvalidArgument => "(invalid argument)",
            Self::RequestIdReused => "(request_id reused)",
            Self::TooManyPending => "(too many pending)",
            Self::EarlierAttemptLost => "(earlier attempt lost)",
            Self::WatcherTooSlow => "(watcher too slow)",
            Self::TooManySessions => "(too many sessions)",
            Self::TooManyWatchers => "(too many watchers)",
            Self::TooManyPolledAgents => "(too many polled agents)",
            Self::GatewayBusy => "(too many gateway requests)",
            Self::ShuttingDown => "(shutting down)",
            Self::SharedStateUnavailable => "(shared state unreachable)",
            Self::CallerUnauthenticated => "(caller not authenticated)",
            Self::CallerNotPermitted => "(caller not permitted)",
            Self::TooManyCallerStreams => "(too many streams of the caller)",
            Self::CallerShareExhausted => "(caller's share used up)",
            Self::StreamCallerRevoked => "(stream's credential revoked)",
            Self::StreamGrantRevoked => "(stream's grant revoked)",
        }
    }
}

/// The rows of the retcodes the reference documents.
pub(crate) const fn known_retcode_rule(retcode: KnownRetcode) -> Rule {
    match retcode {
        KnownRetcode::WrongEventMethod => row(FailedPrecondition, "WRONG_EVENT_METHOD", No, "the gateway is configured for another event-obtaining method"),
        KnownRetcode::InvalidParameter => row(InvalidArgument, "GATEWAY_INVALID_PARAMETER", No, "the gateway rejected a parameter or the URL"),
        KnownRetcode::NoRight => row(Unauthenticated, "GATEWAY_NO_RIGHT", No, "the gateway refused the session (no right to invoke; the Guid may have expired); hand over a fresh Guid"),
        KnownRetcode::SwitchingOver => row(Unavailable, "AGENT_SWITCHING_OVER", After(secs(2)), "the agent is being switched over to another gateway (DR)"),
        KnownRetcode::InspectorIsAgent => row(FailedPrecondition, "INSPECTOR_IS_AGENT", No, "the inspected agent is the inspector itself"),
        KnownRetcode::MessageParameterError => row(InvalidArgument, "GATEWAY_MESSAGE_PARAMETER_ERROR", No, "the gateway rejected a message parameter"),
        KnownRetcode::DuplicateInProgress => row(Aborted, "DUPLICATE_REQUEST_IN_PROGRESS", No, "the same operation is already in progress at the gateway"),
        KnownRetcode::SignInParameterEmptyOrInvalid => row(InvalidArgument, "SIGN_IN_PARAMETER_INVALID", No, "a sign-in parameter is empty or invalid"),
        KnownRetcode::AlreadySignedIn => row(AlreadyExists, "AGENT_ALREADY_SIGNED_IN", No, "the agent is already signed in"),
        KnownRetcode::SignInResourceUnavailable => row(Unavailable, "SIGN_IN_RESOURCE_UNAVAILABLE", After(secs(5)), "a resource was unavailable during sign-in"),
        KnownRetcode::WrongCredentials => row(Unauthenticated, "WRONG_CREDENTIALS", No, "wrong user name or password"),
        KnownRetcode::SignOutParameterInvalid => row(InvalidArgument, "SIGN_OUT_PARAMETER_INVALID", No, "a sign-out parameter is invalid"),
        KnownRetcode::AgentNotSignedIn => row(FailedPrecondition, "AGENT_NOT_SIGNED_IN", No, "the agent is not signed in, or its Guid expired; sign in again and hand over the new Guid"),
        KnownRetcode::OperationException => row(Unavailable, "AGENT_OPERATION_FAILED", After(secs(1)), "the gateway failed while operating on the agent (outcome unknown)"),
        KnownRetcode::AlreadySignedOut => row(FailedPrecondition, "AGENT_ALREADY_SIGNED_OUT", No, "the agent is already signed out"),
        KnownRetcode::StateChangeFailed => row(FailedPrecondition, "AGENT_STATE_CHANGE_FAILED", No, "setting the agent's state failed"),
        KnownRetcode::StateError => row(FailedPrecondition, "AGENT_STATE_ERROR", No, "the agent is in the wrong state for this operation"),
        KnownRetcode::SignInParameterInvalid => row(InvalidArgument, "SIGN_IN_PARAMETER_INVALID", No, "a sign-in parameter is invalid"),
        KnownRetcode::WrongAgentType => row(FailedPrecondition, "WRONG_AGENT_TYPE", No, "wrong agent type"),
        KnownRetcode::NoCallToRelease => row(FailedPrecondition, "NO_ACTIVE_CALL", No, "the agent has no call to release (success with outcome NO_ACTIVE_CALL unless require_active_call)"),
        KnownRetcode::NumberCannotBeReleased023 => row(FailedPrecondition, "NUMBER_CANNOT_BE_RELEASED", No, "the number cannot be released"),
        KnownRetcode::NumberCannotBeReleased024 => row(FailedPrecondition, "NUMBER_CANNOT_BE_RELEASED", No, "the number cannot be released"),
        KnownRetcode::NoCallToDrop => row(FailedPrecondition, "NO_ACTIVE_CALL", No, "the call cannot be dropped: it is gone (success with outcome NO_ACTIVE_CALL unless require_active_call)"),
        KnownRetcode::NumberNotInCall => row(FailedPrecondition, "NUMBER_NOT_IN_CALL", No, "the number is not in the agent's last call"),
    }
}

/// The rows of the conditions.
pub(crate) const fn condition_rule(condition: Condition) -> Rule {
    match condition {
        Condition::OtherRetcode => row(Unknown, "GATEWAY_RETCODE_UNKNOWN", No, "the gateway answered a retcode this service does not know"),
        Condition::HttpUnavailable => row(Unavailable, "GATEWAY_HTTP_ERROR", After(secs(1)), "the gateway or its load balancer answered an HTTP error"),
        Condition::HttpNotFound => row(Unimplemented, "GATEWAY_PATH_NOT_FOUND", No, "the gateway does not know this interface (old gateway? see --legacy-release-path)"),
        Condition::OtherHttpStatus => row(Unknown, "GATEWAY_HTTP_ERROR", No, "the gateway or its load balancer answered an HTTP error"),
        Condition::Timeout => row(DeadlineExceeded, "GATEWAY_TIMEOUT", No, "no answer from the gateway before the deadline (outcome unknown)"),
        Condition::DeadlineTooShort => row(DeadlineExceeded, "DEADLINE_TOO_SHORT", No, "the deadline left too little time to reach the gateway (nothing was sent)"),
        Condition::ConnectFailed => row(Unavailable, "GATEWAY_UNREACHABLE", After(secs(1)), "could not connect to the gateway (nothing was sent)"),
        Condition::ConnectionLost => row(Unavailable, "GATEWAY_CONNECTION_LOST", After(secs(1)), "the connection to the gateway failed during the request (outcome unknown)"),
        Condition::MalformedAnswer => row(Internal, "GATEWAY_MALFORMED_ANSWER", No, "the gateway's answer is not a valid envelope (outcome unknown)"),
        Condition::OversizedAnswer => row(Internal, "GATEWAY_ANSWER_TOO_LARGE", No, "the gateway's answer exceeds the size limit (outcome unknown)"),
        Condition::ReleaseOutcomeUnknown => row(Unknown, "RELEASE_OUTCOME_UNKNOWN", No, "the release of the agent's current call may have reached the gateway, but its outcome is unknown: do not repeat it blindly, it could hang up the next call; use call_id (dropcall) or check the agent's release events"),
        Condition::NoSession => row(FailedPrecondition, "NO_SESSION", No, "no CC-Gateway session is known for the agent: send its Guid in request metadata x-ccgw-guid (and the load balancer's cookies in x-ccgw-cookie)"),
        Condition::InvalidArgument => row(InvalidArgument, "INVALID_ARGUMENT", No, "the request is invalid; nothing was sent to the gateway"),
        Condition::RequestIdReused => row(InvalidArgument, "REQUEST_ID_REUSED", No, "request_id was already used with different parameters; nothing was sent to the gateway"),
        Condition::TooManyPending => row(ResourceExhausted, "TOO_MANY_PENDING_RELEASES", After(secs(1)), "the request_id cache holds only releases still waiting for the gateway and answers to releases of the current call, which are all kept for their whole window; nothing was sent"),
        Condition::EarlierAttemptLost => row(Aborted, "EARLIER_ATTEMPT_LOST", After(secs(0)), "an earlier request with this request_id ended without an answer"),
        Condition::WatcherTooSlow => row(ResourceExhausted, "WATCHER_TOO_SLOW", After(secs(0)), "the stream fell too far behind its agents' events, or could not send for the send timeout, and was cut off; resume from ErrorInfo metadata resume_token"),
        Condition::TooManySessions => row(ResourceExhausted, "TOO_MANY_SESSIONS", No, "the facade holds as many agents' sessions as it allows (--max-sessions); a handover for another agent waits until one is idle for --session-idle-secs; nothing was sent"),
        Condition::TooManyWatchers => row(ResourceExhausted, "TOO_MANY_WATCHERS", After(secs(1)), "the facade has as many open WatchReleaseEvents streams, or ReleaseCalls waiting for their release event, as it allows"),
        Condition::TooManyPolledAgents => row(ResourceExhausted, "TOO_MANY_POLLED_AGENTS", After(secs(1)), "the facade polls as many agents as it allows (--max-polled-agents: each polled agent holds a connection to the gateway); another agent can be watched once one nobody watches is past its grace period (--watch-grace-secs); nothing was sent"),
        Condition::GatewayBusy => row(ResourceExhausted, "GATEWAY_BUSY", After(secs(1)), "the facade has as many gateway requests in flight (--max-gateway-requests) and waiting (--max-gateway-queue) as it allows, or the deadline came while this one waited its turn; nothing was sent"),
        Condition::ShuttingDown => row(Unavailable, "SHUTTING_DOWN", After(secs(1)), "the facade is shutting down; resume from ErrorInfo metadata resume_token on another replica or after the restart"),
        Condition::SharedStateUnavailable => row(Unavailable, "SHARED_STATE_UNAVAILABLE", After(secs(1)), "this replica cannot reach the state the replicas share (NATS JetStream), so it cannot know the agents' newest sessions, claim request_ids or follow the event log; nothing was sent or opened: retry on another replica or once NATS is back (see --release-without-nats)"),
        Condition::CallerUnauthenticated => row(Unauthenticated, "UNAUTHENTICATED", No, "the request identifies no caller: send `authorization: Bearer <token>` metadata with a token of the tokens file, or a client certificate whose name the callers file lists; nothing was done"),
        Condition::CallerNotPermitted => row(PermissionDenied, "PERMISSION_DENIED", No, "the caller is not granted this verb or agent (callers file: agents, verbs; handing a session over in x-ccgw-guid needs handover, wait_for_release_event needs watch); nothing was done"),
        Condition::TooManyCallerStreams => row(ResourceExhausted, "TOO_MANY_CALLER_STREAMS", After(secs(1)), "the caller has as many open WatchReleaseEvents streams as one caller may (--max-streams-per-caller); nothing was opened"),
        Condition::CallerShareExhausted => row(ResourceExhausted, "CALLER_LIMIT_REACHED", After(secs(1)), "the caller holds as many remembered or pending request_ids, queued gateway requests or release waiters as one caller may (ErrorInfo metadata caller_limit names the flag); other callers are not held up; nothing was sent"),
        Condition::StreamCallerRevoked => row(Unauthenticated, "UNAUTHENTICATED", No, "the stream ended: the callers or tokens file changed and its credential no longer identifies its caller; once it does again, resume from ErrorInfo metadata resume_token"),
        Condition::StreamGrantRevoked => row(PermissionDenied, "PERMISSION_DENIED", No, "the stream ended: the callers file changed and its caller is no longer granted this verb or agent; once it is again, resume from ErrorInfo metadata resume_token"),
    }
}

/// The row of any retcode: its own when the reference documents it, else "(other retcode)".
pub(crate) fn retcode_rule(retcode: &Retcode) -> Rule {
    match retcode.known() {
        Some(known) => known_retcode_rule(known),
        None => condition_rule(Condition::OtherRetcode),
    }
}

/// Every row with its first column: the documented retcodes, then the conditions.
fn rows() -> impl Iterator<Item = (&'static str, Rule)> {
    let retcodes = KnownRetcode::ALL
        .iter()
        .map(|&retcode| (retcode.code(), known_retcode_rule(retcode)));
    let conditions = Condition::ALL
        .iter()
        .map(|&condition| (condition.label(), condition_rule(condition)));
    retcodes.chain(conditions)
}

/// What the status message and ErrorInfo say about the request.
pub(crate) struct Context<'a> {
    pub(crate) agent: Option<AgentId>,
    pub(crate) request_id: &'a str,
    /// The request releases whatever call is current (no call_id).
    pub(crate) releases_current_call: bool,
}

pub(crate) fn release_failure(error: &ReleaseError, ctx: &Context<'_>) -> Status {
    let mut metadata = HashMap::new();
    let (rule, detail) = match error {
        ReleaseError::Rejected { retcode, message }
        | ReleaseError::NoActiveCall { retcode, message } => (
            refusal(retcode, message, &mut metadata),
            format!("gateway retcode {retcode}: {message:?}"),
        ),
        ReleaseError::Gateway(gateway) => {
            let condition = match gateway {
                GatewayError::NoSession(_) => Condition::NoSession,
                GatewayError::Connect(_) => Condition::ConnectFailed,
                GatewayError::Timeout(_) => Condition::Timeout,
                GatewayError::DeadlineTooShort(_) => Condition::DeadlineTooShort,
                GatewayError::Transport(_) => Condition::ConnectionLost,
                GatewayError::Malformed(_) => Condition::MalformedAnswer,
                GatewayError::Oversized { .. } => Condition::OversizedAnswer,
                GatewayError::Busy(BusyCause::CallerQueueFull) => {
                    caller_limit("--max-gateway-queue-per-caller", &mut metadata)
                }
                GatewayError::Busy(_) => Condition::GatewayBusy,
                GatewayError::HttpStatus { status } => {
                    metadata.insert(metadata_key::HTTP_STATUS.to_owned(), status.to_string());
                    match status {
                        429 | 502..=504 => Condition::HttpUnavailable,
                        404 | 405 => Condition::HttpNotFound,
                        _ => Condition::OtherHttpStatus,
                    }
                }
            };
            metadata.insert(metadata_key::MESSAGE.to_owned(), gateway.to_string());
            (condition_rule(condition), gateway.to_string())
        }
        ReleaseError::RequestIdReused => {
            (condition_rule(Condition::RequestIdReused), String::new())
        }
        ReleaseError::EarlierAttemptLost => {
            (condition_rule(Condition::EarlierAttemptLost), String::new())
        }
        ReleaseError::TooManyPending => (condition_rule(Condition::TooManyPending), String::new()),
        ReleaseError::CallerLimit(limit) => (
            condition_rule(caller_limit(limit.flag(), &mut metadata)),
            format!("{} reached", limit.flag()),
        ),
        ReleaseError::SharedStateUnavailable => (
            condition_rule(Condition::SharedStateUnavailable),
            String::new(),
        ),
        ReleaseError::CannotWait(error) => return subscribe_failure(error, ctx),
        ReleaseError::ShuttingDown => (
            condition_rule(Condition::ShuttingDown),
            "the facade shut down before the gateway answered".to_owned(),
        ),
    };
    if ctx.releases_current_call && error.may_have_released() {
        // Whatever went wrong, the one thing the caller must know is that the call may be gone:
        // one code that retry policies leave alone, and the failure itself as the cause.
        return outcome_unknown(
            rule.reason,
            &format!("{}: {detail}", rule.meaning),
            metadata,
            ctx,
        );
    }
    failure(&rule, &detail, metadata, ctx)
}

/// Why a call is answered by the server around its handler rather than by the handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unfinished {
    /// Still running at the hard stop (after the drain timeout), unable to answer for itself
    /// (e.g. still reading its request).
    HardStop,
    /// The handler panicked.
    Panicked,
}

/// The answer to a call its handler did not finish. A ReleaseCall may have sent a release of
/// the current call by then, so it must not be told anything that invites a retry.
pub(crate) fn unfinished(path: &str, why: Unfinished) -> Status {
    let (cause, detail) = match why {
        Unfinished::HardStop => (
            condition_rule(Condition::ShuttingDown).reason,
            "the facade shut down before this call finished",
        ),
        Unfinished::Panicked => (
            "INTERNAL_ERROR",
            "the facade failed while handling this call",
        ),
    };
    if path.ends_with("/ReleaseCall") {
        let ctx = Context {
            agent: None,
            request_id: "",
            releases_current_call: true,
        };
        return outcome_unknown(cause, detail, HashMap::new(), &ctx);
    }
    match why {
        Unfinished::HardStop => Status::unavailable(detail),
        Unfinished::Panicked => Status::internal(detail),
    }
}

/// The RELEASE_OUTCOME_UNKNOWN answer, with `cause` the reason of what went wrong.
fn outcome_unknown(
    cause: &str,
    detail: &str,
    mut metadata: HashMap<String, String>,
    ctx: &Context<'_>,
) -> Status {
    metadata.insert(metadata_key::CAUSE.to_owned(), cause.to_owned());
    metadata.insert(
        metadata_key::MAY_HAVE_RELEASED.to_owned(),
        "true".to_owned(),
    );
    let rule = condition_rule(Condition::ReleaseOutcomeUnknown);
    failure(&rule, detail, metadata, ctx)
}

/// The one way a table row becomes a Status: message `meaning [agent N] (detail)`, ErrorInfo
/// with the agent, RequestInfo, and RetryInfo when the row allows a retry.
fn failure(
    rule: &Rule,
    detail: &str,
    mut metadata: HashMap<String, String>,
    ctx: &Context<'_>,
) -> Status {
    let mut message = rule.meaning.to_owned();
    if let Some(agent) = ctx.agent {
        message.push_str(&format!(" [agent {agent}]"));
        metadata.insert(metadata_key::AGENT_ID.to_owned(), agent.to_string());
    }
    if !detail.is_empty() {
        message.push_str(&format!(" ({})", bounded(detail, bound::DETAIL_BYTES)));
    }
    for value in metadata.values_mut() {
        if value.len() > bound::VALUE_BYTES {
            *value = bounded(value, bound::VALUE_BYTES);
        }
    }
    let mut details = ErrorDetails::new();
    details.set_error_info(rule.reason, ERROR_DOMAIN, metadata);
    if !ctx.request_id.is_empty() {
        details.set_request_info(ctx.request_id, "");
    }
    if let Retry::After(delay) = rule.retry {
        details.set_retry_info(Some(delay));
    }
    Status::with_error_details(rule.code, message, details)
}

/// A watcher (of a WatchReleaseEvents stream, or a wait_for_release_event) that could not start.
pub(crate) fn subscribe_failure(error: &SubscribeError, ctx: &Context<'_>) -> Status {
    let mut metadata = HashMap::new();
    let condition = match error {
        SubscribeError::NoSession(agents) => {
            list_agents(agents, &mut metadata);
            Condition::NoSession
        }
        SubscribeError::TooManyWatchers(_) => Condition::TooManyWatchers,
        SubscribeError::TooManyPolledAgents(full) => {
            list_agents(&full.agents, &mut metadata);
            Condition::TooManyPolledAgents
        }
        SubscribeError::SessionsFull(_) => Condition::TooManySessions,
        SubscribeError::ShuttingDown => Condition::ShuttingDown,
        SubscribeError::UnknownToken => {
            return invalid_argument(
                &[FieldViolation::new(
                    "resume_token",
                    "is not a token this facade issued: pass the resume_token of an event, heartbeat or error unchanged",
                )],
                ctx,
            )
        }
    };
    let rule = condition_rule(condition);
    failure(&rule, &error.to_string(), metadata, ctx)
}

/// A WatchReleaseEvents refused because the replicas' shared state cannot be reached: its
/// events would not arrive; the client retries (with its resume token) later or elsewhere.
pub(crate) fn shared_state_unavailable(ctx: &Context<'_>) -> Status {
    failure(
        &condition_rule(Condition::SharedStateUnavailable),
        "",
        HashMap::new(),
        ctx,
    )
}

/// A request whose credentials identify no caller; `request_id` only ties the answer to the
/// log line.
pub(crate) fn unauthenticated(why: &callers::Unauthenticated, request_id: &str) -> Status {
    let ctx = Context {
        agent: None,
        request_id,
        releases_current_call: false,
    };
    failure(
        &condition_rule(Condition::CallerUnauthenticated),
        &why.to_string(),
        HashMap::new(),
        &ctx,
    )
}

/// A request outside its caller's grant; names the verb or agent it lacks.
pub(crate) fn permission_denied(denied: &Denied, ctx: &Context<'_>) -> Status {
    let mut metadata = HashMap::new();
    denied_metadata(denied, &mut metadata);
    failure(
        &condition_rule(Condition::CallerNotPermitted),
        &denied.to_string(),
        metadata,
        ctx,
    )
}

/// Metadata `verb` or `denied_agent_id`: what the caller lacks.
fn denied_metadata(denied: &Denied, metadata: &mut HashMap<String, String>) {
    match denied {
        Denied::Verb(verb) => metadata.insert(metadata_key::VERB.to_owned(), verb.to_string()),
        Denied::Agent(agent) => {
            metadata.insert(metadata_key::DENIED_AGENT_ID.to_owned(), agent.to_string())
        }
    };
}

/// An open stream ended because a reload took its caller's access away; metadata
/// `resume_token` is the position after the last item it sent.
pub(crate) fn access_revoked(
    revoked: &callers::Revoked,
    resume: ResumeToken,
    ctx: &Context<'_>,
) -> Status {
    let mut metadata = HashMap::new();
    metadata.insert(metadata_key::RESUME_TOKEN.to_owned(), resume.to_string());
    let (condition, detail) = match revoked {
        callers::Revoked::Unauthenticated(why) => (Condition::StreamCallerRevoked, why.to_string()),
        callers::Revoked::Denied(denied) => {
            denied_metadata(denied, &mut metadata);
            (Condition::StreamGrantRevoked, denied.to_string())
        }
    };
    failure(&condition_rule(condition), &detail, metadata, ctx)
}

/// A stream refused because its caller holds `limit` streams already.
pub(crate) fn too_many_caller_streams(limit: usize, ctx: &Context<'_>) -> Status {
    failure(
        &condition_rule(Condition::TooManyCallerStreams),
        &format!("{limit} streams open"),
        HashMap::new(),
        ctx,
    )
}

/// How a watcher's stream ends (all but a client's cancel). Metadata `resume_token` says where to
/// continue.
pub(crate) fn watcher_end(end: &WatcherEnd, ctx: &Context<'_>) -> Status {
    let mut metadata = HashMap::new();
    let (rule, detail, resume) = match end {
        WatcherEnd::TooSlow { resume } => (
            condition_rule(Condition::WatcherTooSlow),
            String::new(),
            resume,
        ),
        WatcherEnd::ShuttingDown { resume } => (
            condition_rule(Condition::ShuttingDown),
            String::new(),
            resume,
        ),
        WatcherEnd::SessionEnded {
            agent,
            ending,
            resume,
        } => {
            metadata.insert(metadata_key::AGENT_ID.to_owned(), agent.to_string());
            let (rule, detail) = session_ending(ending, &mut metadata);
            (rule, format!("agent {agent}: {detail}"), resume)
        }
    };
    metadata.insert(metadata_key::RESUME_TOKEN.to_owned(), resume.to_string());
    failure(&rule, &detail, metadata, ctx)
}

/// The table row and detail of a lost session; fills `retcode`/`message` metadata.
pub(crate) fn session_ending(
    ending: &SessionEnding,
    metadata: &mut HashMap<String, String>,
) -> (Rule, String) {
    match ending {
        SessionEnding::Refused { retcode, message } => (
            refusal(retcode, message, metadata),
            format!("the gateway answered a poll with retcode {retcode}: {message:?}"),
        ),
        SessionEnding::Forgotten => (
            condition_rule(Condition::NoSession),
            "the facade dropped the session after the gateway refused it".to_owned(),
        ),
    }
}

/// The condition of a caller at its limit, which `flag` sets.
fn caller_limit(flag: &str, metadata: &mut HashMap<String, String>) -> Condition {
    metadata.insert(metadata_key::CALLER_LIMIT.to_owned(), flag.to_owned());
    Condition::CallerShareExhausted
}

/// The row of a gateway refusal; fills `retcode`/`message` metadata.
fn refusal(retcode: &Retcode, message: &str, metadata: &mut HashMap<String, String>) -> Rule {
    metadata.insert(metadata_key::RETCODE.to_owned(), retcode.to_string());
    metadata.insert(metadata_key::MESSAGE.to_owned(), message.to_owned());
    retcode_rule(retcode)
}

/// INVALID_ARGUMENT with one BadRequest violation per field, the first [`bound::VIOLATIONS`] of
/// them (metadata `unlisted_violations` counts the rest); nothing reached the gateway.
pub(crate) fn invalid_argument(violations: &[FieldViolation], ctx: &Context<'_>) -> Status {
    let rule = condition_rule(Condition::InvalidArgument);
    let listed: Vec<(&str, String)> = violations
        .iter()
        .take(bound::VIOLATIONS)
        .map(|v| (v.field, bounded(&v.description, bound::VALUE_BYTES)))
        .collect();
    let unlisted = violations.len() - listed.len();
    let mut summary = listed
        .iter()
        .map(|(field, description)| format!("{field} {description}"))
        .collect::<Vec<_>>()
        .join("; ");
    let mut details = ErrorDetails::new();
    for (field, description) in &listed {
        details.add_bad_request_violation(*field, description);
    }
    let mut metadata = HashMap::new();
    if let Some(agent) = ctx.agent {
        metadata.insert(metadata_key::AGENT_ID.to_owned(), agent.to_string());
    }
    if unlisted > 0 {
        summary.push_str(&format!("; and {unlisted} more"));
        metadata.insert(
            metadata_key::UNLISTED_VIOLATIONS.to_owned(),
            unlisted.to_string(),
        );
    }
    details.set_error_info(rule.reason, ERROR_DOMAIN, metadata);
    details.set_request_info(ctx.request_id, "");
    Status::with_error_details(rule.code, format!("{}: {summary}", rule.meaning), details)
}

/// The table as docs/api.md shows it.
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| gateway retcode or condition | gRPC code | ErrorInfo.reason | RetryInfo | status message starts with |\n|---|---|---|---|---|\n",
    );
    for (key, r) in rows() {
        let retry = match r.retry {
            Retry::No => "none".to_owned(),
            Retry::After(d) => format!("{}s", d.as_secs()),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            key,
            code_name(r.code),
            r.reason,
            retry,
            r.meaning
        ));
    }
    out
}

/// The canonical UPPER_SNAKE name of a code, as grpcurl prints it.
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        events::{SessionEnding, WatcherEnd},
        proto,
    };

    #[test]
    fn keys_are_unique_and_reasons_are_upper_snake() {
        let mut keys = std::collections::HashSet::new();
        for (key, r) in rows() {
            assert!(keys.insert(key), "duplicate key {key}");
            assert!(
                r.reason
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b == b'_'),
                "{}",
                r.reason
            );
        }
        for condition in Condition::ALL {
            let label = condition.label();
            assert!(label.starts_with('(') && label.ends_with(')'), "{label}");
        }
    }

    /// What a status costs a client's metadata limit: every trailer field it is sent with, each
    /// counted as HTTP/2 does (name, value, 32 bytes).
    fn metadata_bytes(status: &Status) -> usize {
        let mut headers = tonic::codegen::http::HeaderMap::new();
        status.add_header(&mut headers).expect("a status encodes");
        headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 32)
            .sum()
    }

    /// 8 KiB, the default limit of grpc-go, grpc-java and grpcio, less room for the rest of a
    /// trailers-only answer (`:status`, `content-type`).
    const BUDGET: usize = 8 * 1024 - 512;

    /// Gateway messages and details as large and as costly to encode as anything can make
    /// them: four-byte characters (twelve bytes percent-encoded), characters Debug escapes
    /// (`\u{10fffd}`), '%', far beyond any bound upstream.
    fn costly_texts() -> Vec<String> {
        ["😀", "\u{10fffd}", "%", "\0", "x"]
            .iter()
            .map(|unit| unit.repeat(10_000))
            .collect()
    }

    fn costly_retcodes() -> Vec<Retcode> {
        [
            "😀".repeat(8),
            "%".repeat(32),
            "200-099".to_owned(),
            "100-006".to_owned(),
        ]
        .iter()
        .map(|raw| Retcode::parse(raw).unwrap())
        .collect()
    }

    fn most_agents() -> Vec<AgentId> {
        (0..10_000)
            .map(|n| AgentId::parse("a", &(999_999 - n).to_string(), 999_999).unwrap())
            .collect()
    }

    fn release_errors() -> Vec<ReleaseError> {
        let mut errors = vec![
            ReleaseError::RequestIdReused,
            ReleaseError::EarlierAttemptLost,
            ReleaseError::TooManyPending,
            ReleaseError::ShuttingDown,
            ReleaseError::SharedStateUnavailable,
            ReleaseError::CannotWait(SubscribeError::NoSession(most_agents())),
            ReleaseError::CannotWait(SubscribeError::TooManyPolledAgents(
                crate::events::PolledAgentsFull {
                    in_use: usize::MAX,
                    limit: usize::MAX,
                    agents: most_agents(),
                },
            )),
            ReleaseError::CannotWait(SubscribeError::SessionsFull(crate::sessions::SessionsFull(
                usize::MAX,
            ))),
            ReleaseError::CannotWait(SubscribeError::UnknownToken),
            ReleaseError::CannotWait(SubscribeError::ShuttingDown),
        ];
        for text in costly_texts() {
            for retcode in costly_retcodes() {
                errors.push(ReleaseError::Rejected {
                    retcode: retcode.clone(),
                    message: text.clone(),
                });
                errors.push(ReleaseError::NoActiveCall {
                    retcode,
                    message: text.clone(),
                });
            }
            let agent = AgentId::parse("a", "999999", 999_999).unwrap();
            errors.extend(
                [
                    GatewayError::NoSession(agent),
                    GatewayError::Connect(text.clone()),
                    GatewayError::Timeout(Duration::MAX),
                    GatewayError::DeadlineTooShort(Duration::MAX),
                    GatewayError::Transport(text.clone()),
                    GatewayError::HttpStatus { status: 599 },
                    GatewayError::HttpStatus { status: 503 },
                    GatewayError::Malformed(text.clone()),
                    GatewayError::Oversized { limit: usize::MAX },
                    GatewayError::Busy(crate::gateway::BusyCause::QueueFull),
                ]
                .map(ReleaseError::Gateway),
            );
        }
        errors
    }

    /// The worst requests: every field bad, every repeated field at its largest accepted size
    /// (10,000 agents is the most --max-watch-agents allows), a request_id of 128 characters.
    fn costly_contexts(request_id: &str) -> Vec<Context<'_>> {
        let agent = AgentId::parse("a", "999999", 999_999).ok();
        [true, false]
            .into_iter()
            .map(|releases_current_call| Context {
                agent,
                request_id,
                releases_current_call,
            })
            .collect()
    }

    #[test]
    fn the_largest_release_call_status_fits_a_clients_metadata_limit() {
        let request_id = "%".repeat(crate::domain::RequestId::MAX_LEN);
        let mut largest = 0;
        for ctx in costly_contexts(&request_id) {
            for error in release_errors() {
                let status = release_failure(&error, &ctx);
                largest = largest.max(metadata_bytes(&status));
                assert!(metadata_bytes(&status) < BUDGET, "{error:?}: {status:?}");
            }
            let request = proto::ReleaseCallRequest {
                agent_id: "😀".repeat(10_000),
                call_id: "%".repeat(10_000),
                request_id: "\u{10fffd}".repeat(10_000),
                ..Default::default()
            };
            let mut violations = crate::api::request::release_request(&request, 999_999)
                .err()
                .unwrap();
            violations.push(FieldViolation::new(
                crate::api::request::GUID_METADATA,
                "x".repeat(10_000),
            ));
            let status = invalid_argument(&violations, &ctx);
            assert!(metadata_bytes(&status) < BUDGET, "{status:?}");
            for denied in [
                Denied::Verb(callers::Verb::Handover),
                Denied::Agent(ctx.agent.unwrap()),
            ] {
                assert!(metadata_bytes(&permission_denied(&denied, &ctx)) < BUDGET);
            }
        }
        for why in [Unfinished::HardStop, Unfinished::Panicked] {
            let status = unfinished("/ccgw.callcontrol.v1.CallControl/ReleaseCall", why);
            assert!(metadata_bytes(&status) < BUDGET);
        }
        for why in [
            callers::Unauthenticated::Missing,
            callers::Unauthenticated::Malformed,
            callers::Unauthenticated::UnknownToken,
            callers::Unauthenticated::UnknownCertificate,
            callers::Unauthenticated::AmbiguousCertificate,
        ] {
            assert!(metadata_bytes(&unauthenticated(&why, &request_id)) < BUDGET);
        }
        // The bound is not so tight that nothing is left to read.
        assert!(largest > 2 * 1024, "{largest}");
    }

    #[test]
    fn the_largest_watch_status_fits_a_clients_metadata_limit() {
        let request_id = "%".repeat(crate::domain::RequestId::MAX_LEN);
        let resume = crate::events::ResumeToken {
            epoch: u64::MAX,
            sequence: u64::MAX,
        };
        let agent = AgentId::parse("a", "999999", 999_999).unwrap();
        for ctx in costly_contexts(&request_id) {
            for error in release_errors() {
                if let ReleaseError::CannotWait(error) = error {
                    assert!(metadata_bytes(&subscribe_failure(&error, &ctx)) < BUDGET);
                }
            }
            let mut ends = vec![
                WatcherEnd::TooSlow { resume },
                WatcherEnd::ShuttingDown { resume },
                WatcherEnd::SessionEnded {
                    agent,
                    ending: SessionEnding::Forgotten,
                    resume,
                },
            ];
            for message in costly_texts() {
                for retcode in costly_retcodes() {
                    ends.push(WatcherEnd::SessionEnded {
                        agent,
                        ending: SessionEnding::Refused {
                            retcode,
                            message: message.clone(),
                        },
                        resume,
                    });
                }
            }
            for end in ends {
                let status = watcher_end(&end, &ctx);
                assert!(metadata_bytes(&status) < BUDGET, "{status:?}");
            }
            // Every element of every field bad, at the largest sizes accepted.
            let request = proto::WatchReleaseEventsRequest {
                agent_ids: (0..10_000).map(|n| format!("0{n}")).collect(),
                resume_token: "😀".repeat(10_000),
                kinds: vec![i32::MAX; crate::api::request::MAX_KINDS],
            };
            let violations = crate::api::request::watch_request(&request, 999_999, 10_000)
                .err()
                .unwrap();
            assert!(violations.len() > 10_000, "{}", violations.len());
            let status = invalid_argument(&violations, &ctx);
            assert!(metadata_bytes(&status) < BUDGET, "{status:?}");
            assert!(metadata_bytes(&too_many_caller_streams(usize::MAX, &ctx)) < BUDGET);
            assert!(metadata_bytes(&shared_state_unavailable(&ctx)) < BUDGET);
        }
    }

    /// At most ten violations are named; the rest are counted, in the message and metadata.
    #[test]
    fn violations_beyond_ten_are_counted() {
        let violations: Vec<_> = (0..25)
            .map(|n| FieldViolation::new("agent_ids", format!("agent_ids[{n}] is bad")))
            .collect();
        let ctx = Context {
            agent: None,
            request_id: "r",
            releases_current_call: false,
        };
        let status = invalid_argument(&violations, &ctx);
        let details = status.get_error_details();
        let listed = &details.bad_request().unwrap().field_violations;
        assert_eq!(listed.len(), 10);
        assert_eq!(listed[9].description, "agent_ids[9] is bad");
        let info = details.error_info().unwrap();
        assert_eq!(info.metadata[metadata_key::UNLISTED_VIOLATIONS], "15");
        assert!(
            status
                .message()
                .ends_with("agent_ids[9] is bad; and 15 more"),
            "{}",
            status.message()
        );
        let ten = invalid_argument(&violations[..10], &ctx);
        assert!(!ten
            .get_error_details()
            .error_info()
            .unwrap()
            .metadata
            .contains_key(metadata_key::UNLISTED_VIOLATIONS));
        assert!(!ten.message().contains("more"));
    }

    #[test]
    fn agent_lists_beyond_fifty_are_counted() {
        let ctx = Context {
            agent: None,
            request_id: "r",
            releases_current_call: false,
        };
        let status = subscribe_failure(&SubscribeError::NoSession(most_agents()), &ctx);
        let metadata = status
            .get_error_details()
            .error_info()
            .unwrap()
            .metadata
            .clone();
        let listed: Vec<_> = metadata[metadata_key::AGENT_IDS].split(',').collect();
        assert_eq!(listed.len(), 50);
        assert_eq!((listed[0], listed[49]), ("999999", "999950"));
        assert_eq!(metadata[metadata_key::UNLISTED_AGENT_IDS], "9950");
    }

    #[test]
    fn bounded_text_is_cut_on_a_character_boundary() {
        assert_eq!(bounded("short", 10), "short");
        assert_eq!(bounded("0123456789", 10), "0123456789");
        assert_eq!(bounded("0123456789a", 10), "0123456…");
        let cut = bounded(&"😀".repeat(10), 10);
        assert_eq!(cut, "😀…");
        assert!(cut.len() <= 10);
    }

    #[test]
    fn unknown_retcodes_fall_back() {
        let rule = |code| retcode_rule(&Retcode::parse(code).unwrap());
        assert_eq!(rule("999-999").reason, "GATEWAY_RETCODE_UNKNOWN");
        assert_eq!(rule("0").reason, "GATEWAY_RETCODE_UNKNOWN");
        assert_eq!(rule("100-006").reason, "AGENT_NOT_SIGNED_IN");
    }
}
