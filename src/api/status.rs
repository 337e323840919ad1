//! The one table from failures (gateway retcodes, HTTP and transport errors, bad input) to gRPC
//! statuses with google.rpc details. README.md shows the same table; a test keeps them equal.
use std::{collections::HashMap, time::Duration};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    domain::{AgentId, FieldViolation},
    events::{SessionEnding, SubscribeError, WatchEnd},
    gateway::{GatewayError, Retcode},
    release::ReleaseError,
};

/// `ErrorInfo.domain` of every error this service returns.
pub const ERROR_DOMAIN: &str = "ccgw-callcontrol";

/// Whether and when a client may send the same request again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    No,
    /// Retrying after the delay is safe: the request had no effect, or it names its call
    /// (dropcall). A release of the current call that may have happened never gets here: it
    /// takes the RELEASE_OUTCOME_UNKNOWN row instead.
    After(Duration),
}

#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// A gateway retcode, or a condition in parentheses.
    pub key: &'static str,
    pub code: Code,
    pub reason: &'static str,
    pub retry: Retry,
    /// The start of the status message, what a person reads first.
    pub meaning: &'static str,
}

const fn row(
    key: &'static str,
    code: Code,
    reason: &'static str,
    retry: Retry,
    meaning: &'static str,
) -> Rule {
    Rule {
        key,
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
    ResourceExhausted, Unauthenticated, Unavailable, Unimplemented, Unknown,
};
use Retry::{After, No};

/// Every retcode of the reference, then the conditions that carry no retcode.
pub const TABLE: &[Rule] = &[
    row("000-001", FailedPrecondition, "WRONG_EVENT_METHOD", No, "the gateway is configured for another event-obtaining method"),
    row("000-002", InvalidArgument, "GATEWAY_INVALID_PARAMETER", No, "the gateway rejected a parameter or the URL"),
    row("000-003", Unauthenticated, "GATEWAY_NO_RIGHT", No, "the gateway refused the session (no right to invoke; the Guid may have expired); hand over a fresh Guid"),
    row("000-004", Unavailable, "AGENT_SWITCHING_OVER", After(secs(2)), "the agent is being switched over to another gateway (DR)"),
    row("000-005", FailedPrecondition, "INSPECTOR_IS_AGENT", No, "the inspected agent is the inspector itself"),
    row("000-006", InvalidArgument, "GATEWAY_MESSAGE_PARAMETER_ERROR", No, "the gateway rejected a message parameter"),
    row("000-007", Aborted, "DUPLICATE_REQUEST_IN_PROGRESS", No, "the same operation is already in progress at the gateway"),
    row("100-001", InvalidArgument, "SIGN_IN_PARAMETER_INVALID", No, "a sign-in parameter is empty or invalid"),
    row("100-002", AlreadyExists, "AGENT_ALREADY_SIGNED_IN", No, "the agent is already signed in"),
    row("100-003", Unavailable, "SIGN_IN_RESOURCE_UNAVAILABLE", After(secs(5)), "a resource was unavailable during sign-in"),
    row("100-004", Unauthenticated, "WRONG_CREDENTIALS", No, "wrong user name or password"),
    row("100-005", InvalidArgument, "SIGN_OUT_PARAMETER_INVALID", No, "a sign-out parameter is invalid"),
    row("100-006", FailedPrecondition, "AGENT_NOT_SIGNED_IN", No, "the agent is not signed in, or its Guid expired; sign in again and hand over the new Guid"),
    row("100-007", Unavailable, "AGENT_OPERATION_FAILED", After(secs(1)), "the gateway failed while operating on the agent (outcome unknown)"),
    row("100-008", FailedPrecondition, "AGENT_ALREADY_SIGNED_OUT", No, "the agent is already signed out"),
    row("100-009", FailedPrecondition, "AGENT_STATE_CHANGE_FAILED", No, "setting the agent's state failed"),
    row("100-010", FailedPrecondition, "AGENT_STATE_ERROR", No, "the agent is in the wrong state for this operation"),
    row("100-011", InvalidArgument, "SIGN_IN_PARAMETER_INVALID", No, "a sign-in parameter is invalid"),
    row("100-012", FailedPrecondition, "WRONG_AGENT_TYPE", No, "wrong agent type"),
    row("200-017", FailedPrecondition, "NO_ACTIVE_CALL", No, "the agent has no call to release (success with outcome NO_ACTIVE_CALL unless require_active_call)"),
    row("200-023", FailedPrecondition, "NUMBER_CANNOT_BE_RELEASED", No, "the number cannot be released"),
    row("200-024", FailedPrecondition, "NUMBER_CANNOT_BE_RELEASED", No, "the number cannot be released"),
    row("200-025", FailedPrecondition, "NO_ACTIVE_CALL", No, "the call cannot be dropped: it is gone (success with outcome NO_ACTIVE_CALL unless require_active_call)"),
    row("200-204", FailedPrecondition, "NUMBER_NOT_IN_CALL", No, "the number is not in the agent's last call"),
    row("(other retcode)", Unknown, "GATEWAY_RETCODE_UNKNOWN", No, "the gateway answered a retcode this service does not know"),
    row("(HTTP 429, 502, 503, 504)", Unavailable, "GATEWAY_HTTP_ERROR", After(secs(1)), "the gateway or its load balancer answered an HTTP error"),
    row("(HTTP 404, 405)", Unimplemented, "GATEWAY_PATH_NOT_FOUND", No, "the gateway does not know this interface (old gateway? see --legacy-release-path)"),
    row("(other HTTP status)", Unknown, "GATEWAY_HTTP_ERROR", No, "the gateway or its load balancer answered an HTTP error"),
    row("(timeout)", DeadlineExceeded, "GATEWAY_TIMEOUT", No, "no answer from the gateway before the deadline (outcome unknown)"),
    row("(deadline too short)", DeadlineExceeded, "DEADLINE_TOO_SHORT", No, "the deadline left too little time to reach the gateway (nothing was sent)"),
    row("(connect or TLS failure)", Unavailable, "GATEWAY_UNREACHABLE", After(secs(1)), "could not connect to the gateway (nothing was sent)"),
    row("(connection lost)", Unavailable, "GATEWAY_CONNECTION_LOST", After(secs(1)), "the connection to the gateway failed during the request (outcome unknown)"),
    row("(malformed answer)", Internal, "GATEWAY_MALFORMED_ANSWER", No, "the gateway's answer is not a valid envelope (outcome unknown)"),
    row("(oversized answer)", Internal, "GATEWAY_ANSWER_TOO_LARGE", No, "the gateway's answer exceeds the size limit (outcome unknown)"),
    row("(current-call release, outcome unknown)", Unknown, "RELEASE_OUTCOME_UNKNOWN", No, "the release of the agent's current call may have reached the gateway, but its outcome is unknown: do not repeat it blindly, it could hang up the next call; use call_id (dropcall) or check the agent's release events"),
    row("(no session)", FailedPrecondition, "NO_SESSION", No, "no CC-Gateway session is known for the agent: send its Guid in request metadata x-ccgw-guid (and the load balancer's cookies in x-ccgw-cookie)"),
    row("(invalid argument)", InvalidArgument, "INVALID_ARGUMENT", No, "the request is invalid; nothing was sent to the gateway"),
    row("(request_id reused)", InvalidArgument, "REQUEST_ID_REUSED", No, "request_id was already used with different parameters; nothing was sent to the gateway"),
    row("(too many pending)", ResourceExhausted, "TOO_MANY_PENDING_RELEASES", After(secs(1)), "the request_id cache holds only releases still waiting for the gateway and answers to releases of the current call, which are all kept for their whole window; nothing was sent"),
    row("(earlier attempt lost)", Aborted, "EARLIER_ATTEMPT_LOST", After(secs(0)), "an earlier request with this request_id ended without an answer"),
    row("(watcher too slow)", ResourceExhausted, "WATCHER_TOO_SLOW", After(secs(0)), "the stream fell too far behind its agents' events, or could not send for the send timeout, and was cut off; resume from ErrorInfo metadata resume_token"),
    row("(too many sessions)", ResourceExhausted, "TOO_MANY_SESSIONS", No, "the facade holds as many agents' sessions as it allows (--max-sessions); a handover for another agent waits until one is idle for --session-idle-secs; nothing was sent"),
    row("(too many watchers)", ResourceExhausted, "TOO_MANY_WATCHERS", After(secs(1)), "the facade has as many open WatchReleaseEvents streams, or ReleaseCalls waiting for their release event, as it allows"),
    row("(shutting down)", Unavailable, "SHUTTING_DOWN", After(secs(1)), "the facade is shutting down; resume from ErrorInfo metadata resume_token on another replica or after the restart"),
];

pub fn rule(key: &str) -> &'static Rule {
    TABLE
        .iter()
        .find(|r| r.key == key)
        .unwrap_or_else(|| rule("(other retcode)"))
}

/// The row of a gateway retcode.
pub fn retcode_rule(retcode: &Retcode) -> &'static Rule {
    rule(retcode.as_str())
}

/// What the status message and ErrorInfo say about the request.
pub struct Context<'a> {
    pub agent: Option<AgentId>,
    pub request_id: &'a str,
    /// The request releases whatever call is current (no call_id).
    pub releases_current_call: bool,
}

pub fn release_failure(error: &ReleaseError, ctx: &Context<'_>) -> Status {
    let mut metadata = HashMap::new();
    let (rule, detail) = match error {
        ReleaseError::Rejected { retcode, message }
        | ReleaseError::NoActiveCall { retcode, message } => {
            metadata.insert("retcode".to_owned(), retcode.to_string());
            metadata.insert("message".to_owned(), message.clone());
            (
                retcode_rule(retcode),
                format!("gateway retcode {retcode}: {message:?}"),
            )
        }
        ReleaseError::Gateway(gateway) => {
            let key = match gateway {
                GatewayError::NoSession(_) => "(no session)",
                GatewayError::Connect(_) => "(connect or TLS failure)",
                GatewayError::Timeout(_) => "(timeout)",
                GatewayError::DeadlineTooShort(_) => "(deadline too short)",
                GatewayError::Transport(_) => "(connection lost)",
                GatewayError::Malformed(_) => "(malformed answer)",
                GatewayError::Oversized { .. } => "(oversized answer)",
                GatewayError::HttpStatus { status } => {
                    metadata.insert("http_status".to_owned(), status.to_string());
                    match status {
                        429 | 502..=504 => "(HTTP 429, 502, 503, 504)",
                        404 | 405 => "(HTTP 404, 405)",
                        _ => "(other HTTP status)",
                    }
                }
            };
            metadata.insert("message".to_owned(), gateway.to_string());
            (rule(key), gateway.to_string())
        }
        ReleaseError::RequestIdReused => (rule("(request_id reused)"), String::new()),
        ReleaseError::EarlierAttemptLost => (rule("(earlier attempt lost)"), String::new()),
        ReleaseError::TooManyPending => (rule("(too many pending)"), String::new()),
        ReleaseError::ShuttingDown => (
            rule("(shutting down)"),
            "the facade shut down before the gateway answered".to_owned(),
        ),
    };
    if ctx.releases_current_call && error.may_have_released() {
        // Whatever went wrong, the one thing the caller must know is that the call may be gone:
        // one code that retry policies leave alone, and the failure itself as the cause.
        metadata.insert("cause".to_owned(), rule.reason.to_owned());
        metadata.insert("may_have_released".to_owned(), "true".to_owned());
        let unknown = self::rule("(current-call release, outcome unknown)");
        return failure(
            unknown,
            &format!("{}: {detail}", rule.meaning),
            metadata,
            ctx,
        );
    }
    failure(rule, &detail, metadata, ctx)
}

/// Why a call is answered by the server around its handler rather than by the handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unfinished {
    /// Still running at the hard stop (after the drain timeout), unable to answer for itself
    /// (e.g. still reading its request).
    HardStop,
    /// The handler panicked.
    Panicked,
}

/// The answer to a call its handler did not finish. A ReleaseCall may have sent a release of
/// the current call by then, so it must not be told anything that invites a retry.
pub fn unfinished(path: &str, why: Unfinished) -> Status {
    let (cause, detail) = match why {
        Unfinished::HardStop => (
            rule("(shutting down)").reason,
            "the facade shut down before this call finished",
        ),
        Unfinished::Panicked => (
            "INTERNAL_ERROR",
            "the facade failed while handling this call",
        ),
    };
    if path.ends_with("/ReleaseCall") {
        let metadata = HashMap::from([
            ("cause".to_owned(), cause.to_owned()),
            ("may_have_released".to_owned(), "true".to_owned()),
        ]);
        let ctx = Context {
            agent: None,
            request_id: "",
            releases_current_call: true,
        };
        return failure(
            rule("(current-call release, outcome unknown)"),
            detail,
            metadata,
            &ctx,
        );
    }
    match why {
        Unfinished::HardStop => Status::unavailable(detail),
        Unfinished::Panicked => Status::internal(detail),
    }
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
        metadata.insert("agent_id".to_owned(), agent.to_string());
    }
    if !detail.is_empty() {
        message.push_str(&format!(" ({detail})"));
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

/// A WatchReleaseEvents (or wait_for_release_event) subscription that could not start.
pub fn subscribe_failure(error: &SubscribeError, ctx: &Context<'_>) -> Status {
    let mut metadata = HashMap::new();
    let key = match error {
        SubscribeError::NoSession(agents) => {
            let ids: Vec<String> = agents.iter().map(ToString::to_string).collect();
            metadata.insert("agent_ids".to_owned(), ids.join(","));
            "(no session)"
        }
        SubscribeError::TooManyWatchers(_) => "(too many watchers)",
        SubscribeError::SessionsFull(_) => "(too many sessions)",
        SubscribeError::ShuttingDown => "(shutting down)",
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
    failure(rule(key), &error.to_string(), metadata, ctx)
}

/// How a watch stream ends (all but a client's cancel). Metadata `resume_token` says where to
/// continue.
pub fn watch_end(end: &WatchEnd, ctx: &Context<'_>) -> Status {
    let mut metadata = HashMap::new();
    let (rule, detail, resume) = match end {
        WatchEnd::TooSlow { resume } => (rule("(watcher too slow)"), String::new(), resume),
        WatchEnd::ShuttingDown { resume } => (rule("(shutting down)"), String::new(), resume),
        WatchEnd::SessionEnded {
            agent,
            ending,
            resume,
        } => {
            metadata.insert("agent_id".to_owned(), agent.to_string());
            let (rule, detail) = session_ending(ending, &mut metadata);
            (rule, format!("agent {agent}: {detail}"), resume)
        }
    };
    metadata.insert("resume_token".to_owned(), resume.to_string());
    failure(rule, &detail, metadata, ctx)
}

/// The table row and detail of a lost session; fills `retcode`/`message` metadata.
pub fn session_ending(
    ending: &SessionEnding,
    metadata: &mut HashMap<String, String>,
) -> (&'static Rule, String) {
    match ending {
        SessionEnding::Refused { retcode, message } => {
            metadata.insert("retcode".to_owned(), retcode.to_string());
            metadata.insert("message".to_owned(), message.clone());
            (
                retcode_rule(retcode),
                format!("the gateway answered a poll with retcode {retcode}: {message:?}"),
            )
        }
        SessionEnding::Forgotten => (
            rule("(no session)"),
            "the facade dropped the session after the gateway refused it".to_owned(),
        ),
    }
}

/// INVALID_ARGUMENT with one BadRequest violation per field; nothing reached the gateway.
pub fn invalid_argument(violations: &[FieldViolation], ctx: &Context<'_>) -> Status {
    let rule = rule("(invalid argument)");
    let summary = violations
        .iter()
        .map(|v| format!("{} {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ");
    let mut details = ErrorDetails::new();
    for v in violations {
        details.add_bad_request_violation(v.field, &v.description);
    }
    let mut metadata = HashMap::new();
    if let Some(agent) = ctx.agent {
        metadata.insert("agent_id".to_owned(), agent.to_string());
    }
    details.set_error_info(rule.reason, ERROR_DOMAIN, metadata);
    details.set_request_info(ctx.request_id, "");
    Status::with_error_details(rule.code, format!("{}: {summary}", rule.meaning), details)
}

/// The table as README.md shows it.
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| gateway retcode or condition | gRPC code | ErrorInfo.reason | RetryInfo | status message starts with |\n|---|---|---|---|---|\n",
    );
    for r in TABLE {
        let retry = match r.retry {
            Retry::No => "none".to_owned(),
            Retry::After(d) => format!("{}s", d.as_secs()),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r.key,
            code_name(r.code),
            r.reason,
            retry,
            r.meaning
        ));
    }
    out
}

/// The canonical UPPER_SNAKE name of a code, as grpcurl prints it.
pub fn code_name(code: Code) -> &'static str {
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

    #[test]
    fn keys_are_unique_and_reasons_are_upper_snake() {
        let mut keys = std::collections::HashSet::new();
        for r in TABLE {
            assert!(keys.insert(r.key), "duplicate key {}", r.key);
            assert!(
                r.reason
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b == b'_'),
                "{}",
                r.reason
            );
        }
    }

    #[test]
    fn unknown_retcodes_fall_back() {
        assert_eq!(rule("999-999").reason, "GATEWAY_RETCODE_UNKNOWN");
        assert_eq!(rule("100-006").reason, "AGENT_NOT_SIGNED_IN");
    }
}
