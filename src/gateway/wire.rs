//! The gateway's JSON envelope: `{"message": "...", "retcode": "...", "result": ..., "event": ...}`.
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use serde::Deserialize;

use super::{GatewayError, Retcode};

/// A well-formed gateway answer. `retcode` may still be a failure; deciding what a failure
/// means is the caller's business.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub(crate) retcode: Retcode,
    pub(crate) message: String,
    pub(crate) result: Option<serde_json::Value>,
    /// Present on event-poll answers that carry an event.
    pub(crate) event: Option<serde_json::Value>,
}

impl Answer {
    pub fn is_ok(&self) -> bool {
        self.retcode.is_ok()
    }

    /// See [`Retcode::session_gone`].
    pub(crate) fn session_gone(&self) -> bool {
        self.retcode.session_gone()
    }

    /// Whether the gateway carried the operation out (or looked at it as the agent's: a 200-
    /// call-state answer), which proves the session's Guid. Other refusals (000-002, 000-004,
    /// 100-007...) may come before the gateway looks at the Guid.
    pub(crate) fn proves_session(&self) -> bool {
        self.is_ok() || self.retcode.is_call_state()
    }
}

#[derive(Deserialize)]
struct RawEnvelope {
    retcode: RawRetcode,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    result: Option<serde_json::Value>,
    #[serde(default)]
    event: Option<serde_json::Value>,
}

/// The reference says a string; tolerate a bare number rather than fail a whole answer on it.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawRetcode {
    Text(String),
    Number(i64),
}

pub(crate) fn parse_answer(body: &[u8]) -> Result<Answer, GatewayError> {
    // serde would also accept a JSON array as a struct; the envelope is always an object.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(GatewayError::Malformed("not a JSON object".into()));
    }
    let raw: RawEnvelope = serde_json::from_slice(body)
        .map_err(|e| GatewayError::Malformed(format!("not a gateway envelope: {e}")))?;
    let retcode = match raw.retcode {
        RawRetcode::Text(text) => Retcode::parse(&text),
        RawRetcode::Number(number) => Retcode::parse(&number.to_string()),
    }
    .map_err(|e| GatewayError::Malformed(e.to_string()))?;
    Ok(Answer {
        retcode,
        message: truncate(raw.message.unwrap_or_default()),
        result: raw.result.filter(|v| !v.is_null()),
        event: raw.event.filter(|v| !v.is_null()),
    })
}

/// Longest gateway message kept: it ends up in statuses and logs.
pub(crate) const MAX_MESSAGE_CHARS: usize = 256;

fn truncate(message: String) -> String {
    match message.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}…", &message[..cut]),
        None => message,
    }
}

/// Reads a body without ever holding more than `limit` bytes of it: a broken gateway or proxy
/// must not be able to make the facade allocate without bound.
pub(crate) async fn read_bounded(mut body: Incoming, limit: usize) -> Result<Bytes, GatewayError> {
    if body
        .size_hint()
        .exact()
        .is_some_and(|len| len > limit as u64)
    {
        return Err(GatewayError::Oversized { limit });
    }
    let mut read = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| GatewayError::Transport(super::client::describe(&e)))?;
        // Trailers, should a gateway send any, say nothing the facade reads.
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        if read.len() + chunk.len() > limit {
            return Err(GatewayError::Oversized { limit });
        }
        read.extend_from_slice(&chunk);
    }
    Ok(read.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_reference_shapes() {
        let empty = parse_answer(br#"{"message":"","retcode":"0"}"#).unwrap();
        assert!(empty.is_ok() && empty.event.is_none() && empty.result.is_none());
        let release = parse_answer(br#"{"message":"success","retcode":"0","result":{}}"#).unwrap();
        assert_eq!(release.message, "success");
        let event = parse_answer(
            br#"{"message":"","retcode":"0","event":{"eventType":"AgentEvent_Call_Release","workNo":"101","content":"1456403549-15"}}"#,
        )
        .unwrap();
        assert_eq!(event.event.unwrap()["content"], "1456403549-15");
        let gone = parse_answer(br#"{"message":"agent not login","retcode":"100-006"}"#).unwrap();
        assert!(gone.session_gone());
        assert_eq!(
            parse_answer(br#"{"retcode":7}"#).unwrap().retcode.as_str(),
            "7"
        );
    }

    #[test]
    fn rejects_what_is_not_an_envelope() {
        for body in [
            &b""[..],
            b"<html>502</html>",
            b"{\"message\":\"x\"}",
            b"{\"retcode\":\"\"}",
            b"[1]",
        ] {
            let parsed = parse_answer(body);
            assert!(
                matches!(parsed, Err(GatewayError::Malformed(_))),
                "{body:?}: {parsed:?}"
            );
        }
    }
}
