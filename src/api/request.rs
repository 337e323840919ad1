//! Proto requests and metadata -> validated domain values. Nothing here talks to the gateway.
use std::{collections::HashSet, time::Duration};

use tokio::time::Instant;
use tonic::metadata::MetadataMap;

use crate::{
    domain::{AgentId, CallId, FieldViolation, RequestId},
    events::{KindFilter, ReleaseKind, ResumeToken},
    gateway::{Cookies, Guid, ReleaseTarget, Session},
    proto,
    release::ReleaseCommand,
};

/// Metadata key carrying the agent's gateway Guid (a session handover).
pub(crate) const GUID_METADATA: &str = "x-ccgw-guid";
/// Metadata key carrying the load balancer's cookies for that session.
pub(crate) const COOKIE_METADATA: &str = "x-ccgw-cookie";

pub(crate) struct ValidRelease {
    pub(crate) command: ReleaseCommand,
    /// The caller's idempotency key, if it sent one.
    pub(crate) request_id: Option<RequestId>,
}

/// Checks every field and reports every violation at once.
pub(crate) fn release_request(
    request: &proto::ReleaseCallRequest,
    max_agent_id: u32,
) -> Result<ValidRelease, Vec<FieldViolation>> {
    let mut violations = Vec::new();
    let agent = AgentId::parse("agent_id", &request.agent_id, max_agent_id)
        .map_err(|v| violations.push(v))
        .ok();
    let target = if request.call_id.is_empty() {
        Some(ReleaseTarget::Current)
    } else {
        CallId::parse("call_id", &request.call_id)
            .map(ReleaseTarget::Call)
            .map_err(|v| violations.push(v))
            .ok()
    };
    let request_id = if request.request_id.is_empty() {
        None
    } else {
        RequestId::parse("request_id", &request.request_id)
            .map_err(|v| violations.push(v))
            .ok()
    };
    match (agent, target) {
        (Some(agent), Some(target)) if violations.is_empty() => Ok(ValidRelease {
            command: ReleaseCommand {
                agent,
                target,
                require_active_call: request.require_active_call,
            },
            request_id,
        }),
        _ => Err(violations),
    }
}

pub(crate) struct ValidWatchRequest {
    pub(crate) agents: Vec<AgentId>,
    pub(crate) from: Option<ResumeToken>,
    pub(crate) kinds: KindFilter,
}

/// Kinds one request may name: there are two (a longer list can only repeat them).
pub(crate) const MAX_KINDS: usize = 2;

/// Checks a WatchReleaseEvents request and reports every violation at once; a repeated field
/// over its bound is reported alone, before any element is looked at.
pub(crate) fn watch_request(
    request: &proto::WatchReleaseEventsRequest,
    max_agent_id: u32,
    max_agents: usize,
) -> Result<ValidWatchRequest, Vec<FieldViolation>> {
    watch_request_sizes(request, max_agents)?;
    let mut violations = Vec::new();
    let agents = agent_ids(&request.agent_ids, max_agent_id, &mut violations);
    let from = resume_token(&request.resume_token, &mut violations);
    let kinds = release_kinds(&request.kinds, &mut violations);
    if violations.is_empty() {
        Ok(ValidWatchRequest {
            agents,
            from,
            kinds: KindFilter::new(kinds),
        })
    } else {
        Err(violations)
    }
}

/// The repeated fields' lengths: `agent_ids` at most `max_agents`, `kinds` at most
/// [`MAX_KINDS`].
fn watch_request_sizes(
    request: &proto::WatchReleaseEventsRequest,
    max_agents: usize,
) -> Result<(), Vec<FieldViolation>> {
    let mut violations = Vec::new();
    if request.agent_ids.len() > max_agents {
        violations.push(FieldViolation::new(
            "agent_ids",
            format!(
                "holds {} agent ids; at most {max_agents} per stream",
                request.agent_ids.len()
            ),
        ));
    }
    if request.kinds.len() > MAX_KINDS {
        violations.push(FieldViolation::new(
            "kinds",
            format!(
                "holds {} kinds; at most {MAX_KINDS}: CALL_RELEASE, CUSTOMER_RELEASE",
                request.kinds.len()
            ),
        ));
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations)
    }
}

/// One or more distinct valid agent ids (their number is checked before).
fn agent_ids(
    raw_ids: &[String],
    max_agent_id: u32,
    violations: &mut Vec<FieldViolation>,
) -> Vec<AgentId> {
    if raw_ids.is_empty() {
        violations.push(FieldViolation::new(
            "agent_ids",
            "is required: one or more agent ids to watch",
        ));
    }
    let mut agents = Vec::with_capacity(raw_ids.len());
    let mut seen = HashSet::with_capacity(raw_ids.len());
    for (i, raw) in raw_ids.iter().enumerate() {
        match AgentId::parse("agent_ids", raw, max_agent_id) {
            Ok(agent) if !seen.insert(agent) => violations.push(FieldViolation::new(
                "agent_ids",
                format!("agent_ids[{i}] repeats agent {agent}"),
            )),
            Ok(agent) => agents.push(agent),
            Err(v) => violations.push(FieldViolation::new(
                "agent_ids",
                format!("agent_ids[{i}] {}", v.description),
            )),
        }
    }
    agents
}

/// No token (live from now), or one this facade issued.
fn resume_token(raw: &str, violations: &mut Vec<FieldViolation>) -> Option<ResumeToken> {
    if raw.is_empty() {
        return None;
    }
    let token = ResumeToken::parse(raw);
    if token.is_none() {
        violations.push(FieldViolation::new(
            "resume_token",
            "is not a token this facade issued: pass the resume_token of an event, heartbeat or error unchanged",
        ));
    }
    token
}

fn release_kinds(raw_kinds: &[i32], violations: &mut Vec<FieldViolation>) -> Vec<ReleaseKind> {
    let mut kinds = Vec::new();
    for (i, raw) in raw_kinds.iter().enumerate() {
        match proto::ReleaseKind::try_from(*raw) {
            Ok(proto::ReleaseKind::CallRelease) => kinds.push(ReleaseKind::CallRelease),
            Ok(proto::ReleaseKind::CustomerRelease) => kinds.push(ReleaseKind::CustomerRelease),
            _ => violations.push(FieldViolation::new(
                "kinds",
                format!("kinds[{i}] must be CALL_RELEASE or CUSTOMER_RELEASE"),
            )),
        }
    }
    kinds
}

/// A session handed over in metadata: `x-ccgw-guid` and optionally `x-ccgw-cookie`.
pub(crate) fn session_handover(metadata: &MetadataMap) -> Result<Option<Session>, FieldViolation> {
    let guid = single_ascii(metadata, GUID_METADATA)?;
    let cookie = single_ascii(metadata, COOKIE_METADATA)?;
    match (guid, cookie) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(FieldViolation::new(
            COOKIE_METADATA,
            format!("is only accepted together with {GUID_METADATA}"),
        )),
        (Some(guid), cookie) => {
            let guid = Guid::parse(GUID_METADATA, guid)?;
            let cookies = cookie
                .map(|c| Cookies::parse_header(COOKIE_METADATA, c))
                .transpose()?
                .unwrap_or_default();
            Ok(Some(Session { guid, cookies }))
        }
    }
}

fn single_ascii<'a>(
    metadata: &'a MetadataMap,
    key: &'static str,
) -> Result<Option<&'a str>, FieldViolation> {
    let mut values = metadata.get_all(key).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(FieldViolation::new(key, "must be sent once"));
    }
    first
        .to_str()
        .map(Some)
        .map_err(|_| FieldViolation::new(key, "must be printable ASCII"))
}

/// When the facade must have answered: `ceiling`, or the caller's `grpc-timeout` less a margin
/// when that comes first. tonic enforces `grpc-timeout` itself, answering a bare CANCELLED at
/// the deadline, and the caller's own timer fires then too: the facade's answer (its details
/// say whether the call may have been released) must be on its way well before.
pub(crate) fn deadline(metadata: &MetadataMap, ceiling: Duration) -> Instant {
    let budget = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map_or(ceiling, |caller| {
            caller.saturating_sub(answer_margin(caller)).min(ceiling)
        });
    Instant::now() + budget
}

/// A tenth of the caller's budget, at least 200 ms (half of a shorter budget), at most 1 s.
fn answer_margin(budget: Duration) -> Duration {
    (budget / 10)
        .max(Duration::from_millis(200).min(budget / 2))
        .min(Duration::from_secs(1))
}

/// `grpc-timeout`: at most 8 digits and a unit (H, M, S, m, u, n), per the gRPC HTTP/2 spec.
pub(crate) fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    // ASCII first: the unit is then the last byte, and splitting there cannot cut a character.
    if value.len() < 2 || value.len() > 9 || !value.is_ascii() {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use proptest::{collection::vec, prelude::*};

    use super::*;

    /// Whether an agent id is valid, written apart from the parser: 1 to 6 digits without a
    /// leading zero, from 101 to `max`.
    fn agent_ok(raw: &str, max: u32) -> bool {
        !raw.is_empty()
            && raw.len() <= 6
            && raw.bytes().all(|b| b.is_ascii_digit())
            && !raw.starts_with('0')
            && raw.parse::<u32>().is_ok_and(|n| (101..=max).contains(&n))
    }

    fn hex_ok(raw: &str) -> bool {
        (1..=16).contains(&raw.len()) && raw.bytes().all(|b| b.is_ascii_hexdigit())
    }

    /// `r1.<epoch>.<sequence>`, each 1 to 16 hex digits.
    fn token_ok(raw: &str) -> bool {
        raw.strip_prefix("r1.")
            .and_then(|rest| rest.split_once('.'))
            .is_some_and(|(epoch, sequence)| hex_ok(epoch) && hex_ok(sequence))
    }

    /// Any text, and texts near the shapes the fields accept.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            Just(String::new()),
            "[0-9]{0,8}",
            "[0-9-]{0,70}",
            "[ -~]{0,140}",
            "r1\\.[0-9a-fA-F]{0,18}\\.[0-9a-gA-F]{0,18}",
        ]
    }

    fn kind() -> impl Strategy<Value = i32> {
        prop_oneof![0i32..4, any::<i32>()]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Every ReleaseCall request either parses into exactly what it says, or names each bad
        /// field once, in order, and nothing else.
        #[test]
        fn release_requests_parse_or_name_each_bad_field(
            agent_id in text(),
            call_id in text(),
            request_id in text(),
            max in 101u32..=999_999,
        ) {
            let call_ok = call_id.is_empty()
                || (call_id.len() <= 64
                    && call_id.bytes().all(|b| b.is_ascii_digit() || b == b'-')
                    && call_id.bytes().any(|b| b.is_ascii_digit()));
            let request_id_ok = request_id.is_empty()
                || (request_id.len() <= 128 && request_id.bytes().all(|b| b.is_ascii_graphic()));
            let expected: Vec<&str> = [
                (!agent_ok(&agent_id, max)).then_some("agent_id"),
                (!call_ok).then_some("call_id"),
                (!request_id_ok).then_some("request_id"),
            ]
            .into_iter()
            .flatten()
            .collect();
            let request = proto::ReleaseCallRequest {
                agent_id: agent_id.clone(),
                call_id: call_id.clone(),
                request_id: request_id.clone(),
                ..Default::default()
            };
            match release_request(&request, max) {
                Ok(valid) => {
                    prop_assert!(expected.is_empty(), "{:?}", expected);
                    prop_assert_eq!(valid.command.agent.to_string(), agent_id);
                    match valid.command.target {
                        ReleaseTarget::Current => prop_assert!(call_id.is_empty()),
                        ReleaseTarget::Call(call) => prop_assert_eq!(call.to_string(), call_id),
                    }
                    prop_assert_eq!(
                        valid.request_id.map(|id| id.as_str().to_owned()).unwrap_or_default(),
                        request_id
                    );
                }
                Err(violations) => {
                    let fields: Vec<_> = violations.iter().map(|v| v.field).collect();
                    prop_assert_eq!(fields, expected);
                    for v in &violations {
                        prop_assert!(!v.description.is_empty() && v.description.len() < 200);
                    }
                }
            }
        }

        /// Every WatchReleaseEvents request either parses into exactly what it says, or is
        /// refused: over a size bound with that alone (one violation per oversized field,
        /// before any element is read), else with one violation per bad element; never more
        /// violations than its bounded fields can hold.
        #[test]
        fn watch_requests_parse_or_name_each_bad_element(
            agent_ids in vec(prop_oneof![3 => (101u32..130).prop_map(|n| n.to_string()), 1 => text()], 0..40),
            kinds in vec(kind(), 0..6),
            resume_token in text(),
            max_agents in 1usize..30,
        ) {
            let max_agent_id = 59_999;
            let request = proto::WatchReleaseEventsRequest {
                agent_ids: agent_ids.clone(),
                resume_token: resume_token.clone(),
                kinds: kinds.clone(),
            };
            let result = watch_request(&request, max_agent_id, max_agents);
            let oversized: Vec<&str> = [
                (agent_ids.len() > max_agents).then_some("agent_ids"),
                (kinds.len() > MAX_KINDS).then_some("kinds"),
            ]
            .into_iter()
            .flatten()
            .collect();
            if !oversized.is_empty() {
                let violations = result.err().expect("an oversized request is refused");
                let fields: Vec<_> = violations.iter().map(|v| v.field).collect();
                prop_assert_eq!(fields, oversized);
                return Ok(());
            }
            let mut expected = Vec::new();
            let mut agents: Vec<String> = Vec::new();
            if agent_ids.is_empty() {
                expected.push("agent_ids");
            }
            for raw in &agent_ids {
                if !agent_ok(raw, max_agent_id) || agents.contains(raw) {
                    expected.push("agent_ids");
                } else {
                    agents.push(raw.clone());
                }
            }
            if !resume_token.is_empty() && !token_ok(&resume_token) {
                expected.push("resume_token");
            }
            for kind in &kinds {
                if !(1..=2).contains(kind) {
                    expected.push("kinds");
                }
            }
            match result {
                Ok(valid) => {
                    prop_assert!(expected.is_empty(), "{:?}", expected);
                    let parsed: Vec<String> = valid.agents.iter().map(ToString::to_string).collect();
                    prop_assert_eq!(parsed, agents);
                    prop_assert_eq!(valid.from.map(|t| t.to_string()).is_some(), !resume_token.is_empty());
                }
                Err(violations) => {
                    prop_assert!(violations.len() <= max_agents + 1 + MAX_KINDS + 1);
                    let fields: Vec<_> = violations.iter().map(|v| v.field).collect();
                    prop_assert_eq!(fields, expected);
                }
            }
        }

        /// A session handover in metadata: the Guid alone or with cookies, never cookies
        /// alone; a bad value names its key.
        #[test]
        fn handovers_parse_or_name_their_key(
            guid in proptest::option::of("[ -~]{0,300}"),
            cookie in proptest::option::of("[ -~]{0,300}"),
        ) {
            let mut metadata = MetadataMap::new();
            for (key, value) in [(GUID_METADATA, &guid), (COOKIE_METADATA, &cookie)] {
                if let Some(value) = value {
                    if let Ok(value) = value.parse() {
                        metadata.insert(key, value);
                    }
                }
            }
            let sent = |key| metadata.get(key).is_some();
            match session_handover(&metadata) {
                Ok(None) => prop_assert!(!sent(GUID_METADATA) && !sent(COOKIE_METADATA)),
                Ok(Some(session)) => {
                    prop_assert!(sent(GUID_METADATA));
                    let guid = session.guid.expose();
                    prop_assert!(!guid.is_empty() && guid.len() <= Guid::MAX_LEN);
                }
                Err(violation) => {
                    prop_assert!([GUID_METADATA, COOKIE_METADATA].contains(&violation.field));
                    if !sent(GUID_METADATA) {
                        prop_assert_eq!(violation.field, COOKIE_METADATA);
                    }
                }
            }
        }

        /// `grpc-timeout`: 1 to 8 digits and a unit, or nothing.
        #[test]
        fn grpc_timeouts_parse_exactly_or_not_at_all(raw in prop_oneof![any::<String>(), "[0-9]{0,10}[HMSmunx]?"]) {
            let parsed = parse_grpc_timeout(&raw);
            let shaped = (2..=9).contains(&raw.len())
                && raw.is_ascii()
                && raw[..raw.len() - 1].bytes().all(|b| b.is_ascii_digit())
                && raw.ends_with(['H', 'M', 'S', 'm', 'u', 'n']);
            prop_assert_eq!(parsed.is_some(), shaped, "{:?}", raw);
            if let Some(parsed) = parsed {
                let n: u128 = raw[..raw.len() - 1].parse().unwrap();
                let nanos = match raw.as_bytes()[raw.len() - 1] {
                    b'H' => n * 3_600_000_000_000,
                    b'M' => n * 60_000_000_000,
                    b'S' => n * 1_000_000_000,
                    b'm' => n * 1_000_000,
                    b'u' => n * 1_000,
                    _ => n,
                };
                prop_assert_eq!(parsed.as_nanos(), nanos);
            }
        }
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "10", "123456789m", "-1S", "1x", "1.5S", "¡", "1©"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_answer_leaves_room_before_the_callers_deadline() {
        let ms = Duration::from_millis;
        assert_eq!(
            answer_margin(Duration::from_secs(30)),
            Duration::from_secs(1)
        );
        assert_eq!(answer_margin(Duration::from_secs(5)), ms(500));
        assert_eq!(answer_margin(Duration::from_secs(1)), ms(200));
        assert_eq!(answer_margin(ms(100)), ms(50));
        let mut metadata = MetadataMap::new();
        let ceiling = Duration::from_secs(10);
        let before = Instant::now();
        // No caller deadline: nothing enforces one but the facade.
        assert!(deadline(&metadata, ceiling) >= before + ceiling);
        metadata.insert("grpc-timeout", "5S".parse().unwrap());
        let at = deadline(&metadata, ceiling);
        assert!(at >= before + ms(4500) && at <= Instant::now() + ms(4500));
    }

    #[test]
    fn all_violations_are_reported_together() {
        let request = proto::ReleaseCallRequest {
            agent_id: "12".into(),
            call_id: "../../x".into(),
            request_id: "has space".into(),
            ..Default::default()
        };
        let fields: Vec<_> = release_request(&request, 59_999)
            .err()
            .unwrap()
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(fields, ["agent_id", "call_id", "request_id"]);
    }

    #[test]
    fn watch_requests_report_each_bad_element() {
        let request = proto::WatchReleaseEventsRequest {
            agent_ids: vec!["101".into(), "42".into(), "101".into()],
            resume_token: "xyz".into(),
            kinds: vec![0, 7],
        };
        let descriptions: Vec<_> = watch_request(&request, 59_999, 100)
            .err()
            .unwrap()
            .into_iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect();
        assert_eq!(descriptions.len(), 5, "{descriptions:?}");
        assert!(descriptions[0].starts_with("agent_ids: agent_ids[1] must be"));
        assert_eq!(descriptions[1], "agent_ids: agent_ids[2] repeats agent 101");
        assert!(descriptions[2].starts_with("resume_token: "));
        assert_eq!(
            descriptions[3],
            "kinds: kinds[0] must be CALL_RELEASE or CUSTOMER_RELEASE"
        );
        assert_eq!(
            descriptions[4],
            "kinds: kinds[1] must be CALL_RELEASE or CUSTOMER_RELEASE"
        );
        let too_many = proto::WatchReleaseEventsRequest {
            agent_ids: (101..104).map(|a| a.to_string()).collect(),
            ..Default::default()
        };
        assert_eq!(watch_request(&too_many, 59_999, 2).err().unwrap().len(), 1);
        assert_eq!(watch_request(&too_many, 59_999, 3).unwrap().agents.len(), 3);
    }

    #[test]
    fn cookie_needs_a_guid() {
        let mut metadata = MetadataMap::new();
        metadata.insert(COOKIE_METADATA, "a=b".parse().unwrap());
        assert!(session_handover(&metadata).is_err());
        metadata.insert(
            GUID_METADATA,
            "JSESSIONID=abc.AgentGateway0".parse().unwrap(),
        );
        let session = session_handover(&metadata).unwrap().unwrap();
        assert_eq!(session.guid.expose(), "abc.AgentGateway0");
        assert_eq!(session.cookies.header_value().as_deref(), Some("a=b"));
    }
}
