//! Proto requests and metadata -> validated domain values. Nothing here talks to the gateway.
use std::time::Duration;

use tokio::time::Instant;
use tonic::metadata::MetadataMap;

use crate::{
    domain::{AgentId, CallId, FieldViolation, RequestId},
    gateway::{Cookies, Guid, ReleaseTarget},
    proto,
    release::ReleaseCommand,
};

/// Metadata key carrying the agent's gateway Guid (a session handover).
pub const GUID_METADATA: &str = "x-ccgw-guid";
/// Metadata key carrying the load balancer's cookies for that session.
pub const COOKIE_METADATA: &str = "x-ccgw-cookie";

pub struct ValidRelease {
    pub command: ReleaseCommand,
    /// The caller's idempotency key, if it sent one.
    pub request_id: Option<RequestId>,
}

/// Checks every field and reports every violation at once.
pub fn release_request(
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

/// A session handed over in metadata: `x-ccgw-guid` and optionally `x-ccgw-cookie`.
pub fn session_handover(
    metadata: &MetadataMap,
) -> Result<Option<(Guid, Option<Cookies>)>, FieldViolation> {
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
                .transpose()?;
            Ok(Some((guid, cookies)))
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

/// When the facade must have answered: the caller's `grpc-timeout`, capped by `ceiling`, less
/// a small margin so our DEADLINE_EXCEEDED (with details) reaches the caller before its own
/// timer fires.
pub fn deadline(metadata: &MetadataMap, ceiling: Duration) -> Instant {
    let budget = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map_or(ceiling, |t| t.min(ceiling));
    let margin = (budget / 20).min(Duration::from_millis(50));
    Instant::now() + (budget - margin)
}

/// `grpc-timeout`: at most 8 digits and a unit (H, M, S, m, u, n), per the gRPC HTTP/2 spec.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
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
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "10", "123456789m", "-1S", "1x", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn all_violations_are_reported_together() {
        let request = proto::ReleaseCallRequest {
            agent_id: "12".into(),
            call_id: "../../x".into(),
            request_id: "has space".into(),
            require_active_call: false,
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
    fn cookie_needs_a_guid() {
        let mut metadata = MetadataMap::new();
        metadata.insert(COOKIE_METADATA, "a=b".parse().unwrap());
        assert!(session_handover(&metadata).is_err());
        metadata.insert(
            GUID_METADATA,
            "JSESSIONID=abc.AgentGateway0".parse().unwrap(),
        );
        let (guid, cookies) = session_handover(&metadata).unwrap().unwrap();
        assert_eq!(guid.expose(), "abc.AgentGateway0");
        assert_eq!(cookies.unwrap().header_value().as_deref(), Some("a=b"));
    }
}
