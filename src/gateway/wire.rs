//! The gateway's JSON envelope: `{"message": "...", "retcode": "...", "result": ..., "event": ...}`.
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Body;
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

/// Reads a body without ever holding more than `limit` bytes of it (nor allocating more): a
/// broken gateway or proxy must not be able to make the facade allocate without bound. A body
/// longer than `limit` is `Oversized`, whether its length is announced or found by reading.
pub(crate) async fn read_bounded<B>(mut body: B, limit: usize) -> Result<Bytes, GatewayError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + 'static,
{
    if body
        .size_hint()
        .exact()
        .is_some_and(|len| len > limit as u64)
    {
        return Err(GatewayError::Oversized { limit });
    }
    let mut read = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| GatewayError::Transport(super::client::describe(&e)))?;
        // Trailers, should a gateway send any, say nothing the facade reads.
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        append_bounded(&mut read, &chunk, limit)?;
    }
    Ok(read.into())
}

/// Appends `chunk` to `read`, whose capacity grows by doubling but never past `limit`.
fn append_bounded(read: &mut Vec<u8>, chunk: &[u8], limit: usize) -> Result<(), GatewayError> {
    let len = read.len() + chunk.len();
    if len > limit {
        return Err(GatewayError::Oversized { limit });
    }
    if len > read.capacity() {
        let capacity = len.max(read.capacity() * 2).min(limit);
        read.reserve_exact(capacity - read.len());
    }
    read.extend_from_slice(chunk);
    Ok(())
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;
    use http_body_util::{Full, StreamBody};
    use hyper::{body::Frame, HeaderMap};
    use proptest::{collection::vec, prelude::*};
    use serde_json::{json, Value};

    use super::*;
    use crate::gateway::testing::any_json;

    /// Cases each property below runs (docs/layout.md's reliability section counts them).
    const WIRE_CASES: u32 = 256;

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

    /// `body` read with `limit`; every test body is ready at once.
    fn read<B>(body: B, limit: usize) -> Result<Bytes, GatewayError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::error::Error + 'static,
    {
        read_bounded(body, limit)
            .now_or_never()
            .expect("a ready body is read at once")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(WIRE_CASES))]

        /// Any bytes, and any JSON: an answer or `Malformed`, nothing else.
        #[test]
        fn any_body_is_an_answer_or_malformed(body in prop_oneof![
            vec(any::<u8>(), 0..512),
            any_json().prop_map(|json| json.to_string().into_bytes()),
        ]) {
            match parse_answer(&body) {
                Ok(_) | Err(GatewayError::Malformed(_)) => {}
                Err(other) => prop_assert!(false, "{other:?}"),
            }
        }

        /// An envelope of any members is read when its retcode reads, with its message cut to
        /// 256 characters and a null result or event taken as absent.
        #[test]
        fn an_envelope_is_read_with_its_message_bounded(
            retcode in prop_oneof![" ?[ -~]{0,40}".prop_map(Value::from), any::<i64>().prop_map(Value::from)],
            message in proptest::option::of(".{0,400}"),
            result in any_json(),
            event in any_json(),
        ) {
            let mut envelope = json!({"retcode": retcode, "result": result, "event": event});
            if let Some(message) = &message {
                envelope["message"] = json!(message);
            }
            let text = envelope.to_string();
            let parsed = parse_answer(text.as_bytes());
            // Floats need not survive a round trip through text: compare with what was sent.
            let sent: Value = serde_json::from_str(&text).unwrap();
            let code = match &retcode {
                Value::String(code) => code.clone(),
                number => number.to_string(),
            };
            let Ok(expected) = Retcode::parse(&code) else {
                prop_assert!(matches!(parsed, Err(GatewayError::Malformed(_))), "{parsed:?}");
                return Ok(());
            };
            let answer = parsed.unwrap();
            prop_assert_eq!(answer.retcode, expected);
            prop_assert!(answer.message.chars().count() <= MAX_MESSAGE_CHARS + 1);
            prop_assert!(message.unwrap_or_default().starts_with(answer.message.trim_end_matches('…')));
            prop_assert_eq!(answer.result, Some(sent["result"].clone()).filter(|v| !v.is_null()));
            prop_assert_eq!(answer.event, Some(sent["event"].clone()).filter(|v| !v.is_null()));
        }

        /// A body in chunks (trailers among them, maybe a failure at the end) is read whole
        /// when it fits `limit`, and is `Oversized` as soon as it does not: a failure after
        /// more than `limit` bytes is never waited for.
        #[test]
        fn a_body_is_read_whole_or_oversized(
            chunks in vec(vec(any::<u8>(), 0..200), 0..20),
            limit in 0usize..2048,
            trailers_at in proptest::option::of(0usize..20),
            fails in any::<bool>(),
        ) {
            let total: usize = chunks.iter().map(Vec::len).sum();
            let mut frames: Vec<Result<Frame<Bytes>, std::io::Error>> = chunks
                .iter()
                .map(|chunk| Ok(Frame::data(Bytes::from(chunk.clone()))))
                .collect();
            if let Some(at) = trailers_at {
                frames.insert(at.min(frames.len()), Ok(Frame::trailers(HeaderMap::new())));
            }
            if fails {
                frames.push(Err(std::io::Error::other("connection reset")));
            }
            match read(StreamBody::new(futures_util::stream::iter(frames)), limit) {
                Ok(bytes) => {
                    prop_assert!(!fails && total <= limit);
                    prop_assert_eq!(bytes, chunks.concat());
                }
                Err(GatewayError::Oversized { limit: said }) => {
                    prop_assert_eq!(said, limit);
                    prop_assert!(total > limit);
                }
                Err(GatewayError::Transport(_)) => prop_assert!(fails && total <= limit),
                Err(other) => prop_assert!(false, "{other:?}"),
            }
        }

        /// A body whose announced length is over `limit` is refused before it is read.
        #[test]
        fn an_announced_length_over_the_limit_is_oversized(body in vec(any::<u8>(), 0..4096), limit in 0usize..4096) {
            let read = read(Full::new(Bytes::from(body.clone())), limit);
            if body.len() > limit {
                prop_assert!(matches!(read, Err(GatewayError::Oversized { .. })), "{read:?}");
            } else {
                prop_assert_eq!(read.unwrap(), body);
            }
        }

        /// Reading never allocates more than `limit` bytes, however the body is cut up.
        #[test]
        fn reading_never_allocates_past_the_limit(chunks in vec(vec(any::<u8>(), 0..300), 0..30), limit in 0usize..4096) {
            let mut read = Vec::new();
            for chunk in &chunks {
                let before = read.len();
                if append_bounded(&mut read, chunk, limit).is_err() {
                    prop_assert!(before + chunk.len() > limit);
                    prop_assert_eq!(read.len(), before);
                    break;
                }
                prop_assert_eq!(read.len(), before + chunk.len());
                prop_assert!(read.capacity() <= limit, "{} > {limit}", read.capacity());
            }
        }
    }
}
