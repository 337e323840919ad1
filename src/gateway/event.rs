//! The `event` member of a poll answer: `{"eventType", "workNo", "content", "eventGenTime"?}`.
//! Only the two release events are read closely; every other type is recognised by name and
//! skipped.
use serde_json::Value;

use crate::domain::{AgentId, CallId};

pub(crate) const CALL_RELEASE: &str = "AgentEvent_Call_Release";
pub(crate) const CUSTOMER_RELEASE: &str = "AgentEvent_Customer_Release";

/// Longest customer number kept; real ones are far shorter.
const MAX_NUMBER_LEN: usize = 64;
/// The customer number's member of an `AgentEvent_Customer_Release`'s content.
const NUMBER_FIELD: &str = "number";
/// The event's time member.
const GEN_TIME_FIELD: &str = "eventGenTime";
/// The latest event time kept (9999-12-31T23:59:59.999Z, in ms since the Unix epoch): the end
/// of the range of protobuf's Timestamp, which strict JSON clients refuse beyond.
pub(crate) const MAX_GEN_TIME_MS: u64 = 253_402_300_799_999;
/// Longest event type name kept in logs.
const MAX_TYPE_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EventBody {
    /// `AgentEvent_Call_Release`: the agent left the call.
    CallRelease { call_id: CallId },
    /// `AgentEvent_Customer_Release`: the customer left the call.
    CustomerRelease { call_id: CallId, number: String },
    /// Any other event type.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PolledEvent {
    pub(crate) event_type: String,
    pub(crate) body: EventBody,
    /// `eventGenTime` (ms since the Unix epoch), sent by newer gateways; at most
    /// [`MAX_GEN_TIME_MS`].
    pub(crate) gen_time_ms: Option<u64>,
    /// Optional fields that failed validation and were left out of `body`, by name. Their
    /// values are not kept: nothing can log them.
    pub(crate) dropped_fields: Vec<&'static str>,
}

/// Why an event could not be read. Never carries the event's text: it is logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {event_type} event: {problem}")]
pub(crate) struct MalformedEvent {
    pub(crate) event_type: String,
    pub(crate) problem: &'static str,
}

/// Reads one polled event of `agent`.
pub(crate) fn parse_event(agent: AgentId, event: &Value) -> Result<PolledEvent, MalformedEvent> {
    let malformed = |event_type: &str, problem| MalformedEvent {
        event_type: event_type.to_owned(),
        problem,
    };
    let Some(object) = event.as_object() else {
        return Err(malformed("(unknown)", "the event is not a JSON object"));
    };
    let event_type = match object.get("eventType").and_then(Value::as_str) {
        Some(t)
            if !t.is_empty()
                && t.len() <= MAX_TYPE_LEN
                && t.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            t
        }
        _ => return Err(malformed("(unknown)", "eventType is missing or not a name")),
    };
    // An event of another agent in this agent's poll would be attributed to the wrong agent.
    if let Some(work_no) = object.get("workNo") {
        if text_or_number(work_no).as_deref() != Some(agent.to_string().as_str()) {
            return Err(malformed(event_type, "workNo is not the polled agent"));
        }
    }
    let content = object.get("content").unwrap_or(&Value::Null);
    let mut dropped_fields = Vec::new();
    let body = match event_type {
        CALL_RELEASE => {
            // The reference says a string; the casing-varying object form is tolerated.
            let call_id = match content {
                Value::String(s) => Some(s.as_str()),
                Value::Object(_) => call_id_member(content),
                _ => None,
            };
            EventBody::CallRelease {
                call_id: parse_call_id(call_id)
                    .ok_or_else(|| malformed(event_type, "content is not a call id"))?,
            }
        }
        CUSTOMER_RELEASE => {
            let call_id = parse_call_id(call_id_member(content))
                .ok_or_else(|| malformed(event_type, "content has no valid callid"))?;
            // The release matters more than who the customer was: a bad number is left out,
            // not the event.
            let number = match content.get("number") {
                None | Some(Value::Null) => String::new(),
                Some(n) => text_or_number(n)
                    .filter(|n| {
                        n.len() <= MAX_NUMBER_LEN && n.bytes().all(|b| b.is_ascii_graphic())
                    })
                    .unwrap_or_else(|| {
                        dropped_fields.push(NUMBER_FIELD);
                        String::new()
                    }),
            };
            EventBody::CustomerRelease { call_id, number }
        }
        _ => EventBody::Other,
    };
    // A bad timestamp is not worth losing a release event over: it is left out, like a bad
    // number. A time past protobuf Timestamp's range would make the event unreadable to strict
    // clients; one before 1970 is not a number of ms since the epoch the gateway sends.
    // Read on release events only: the time of a skipped event is not worth a warning.
    let gen_time_ms = match object.get(GEN_TIME_FIELD) {
        _ if body == EventBody::Other => None,
        None | Some(Value::Null) => None,
        Some(time) => match time {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
        .filter(|ms| *ms <= MAX_GEN_TIME_MS)
        .or_else(|| {
            dropped_fields.push(GEN_TIME_FIELD);
            None
        }),
    };
    Ok(PolledEvent {
        event_type: event_type.to_owned(),
        body,
        gen_time_ms,
        dropped_fields,
    })
}

/// `callid` or `callId`: the reference notes the casing varies by event.
fn call_id_member(content: &Value) -> Option<&str> {
    content
        .get("callid")
        .or_else(|| content.get("callId"))
        .and_then(Value::as_str)
}

fn parse_call_id(raw: Option<&str>) -> Option<CallId> {
    CallId::parse("callid", raw?.trim()).ok()
}

fn text_or_number(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::gateway::testing::{any_json, or_any_json};

    /// Cases each property below runs (docs/layout.md's reliability section counts them).
    const EVENT_CASES: u32 = 256;

    fn agent() -> AgentId {
        AgentId::parse("agent", "101", 59_999).unwrap()
    }

    #[test]
    fn reads_the_reference_release_events() {
        let call = parse_event(
            agent(),
            &json!({"eventType": CALL_RELEASE, "workNo": "101", "content": "1456403549-15"}),
        )
        .unwrap();
        assert_eq!(
            call.body,
            EventBody::CallRelease {
                call_id: CallId::parse("c", "1456403549-15").unwrap()
            }
        );
        assert_eq!(call.gen_time_ms, None);
        let customer = parse_event(
            agent(),
            &json!({"eventType": CUSTOMER_RELEASE, "workNo": 101, "eventGenTime": 1_700_000_000_123u64,
                    "content": {"callId": "1456404171-43", "number": "70093"}}),
        )
        .unwrap();
        assert_eq!(
            customer.body,
            EventBody::CustomerRelease {
                call_id: CallId::parse("c", "1456404171-43").unwrap(),
                number: "70093".into()
            }
        );
        assert_eq!(customer.gen_time_ms, Some(1_700_000_000_123));
    }

    #[test]
    fn other_types_are_skipped_whatever_their_content() {
        for event in [
            json!({"eventType": "AgentOther_InService", "workNo": "101", "content": null}),
            json!({"eventType": "AgentEvent_Talking", "workNo": "101", "content": {"callid": "x"}}),
            json!({"eventType": "AgentState_Ready"}),
        ] {
            assert_eq!(parse_event(agent(), &event).unwrap().body, EventBody::Other);
        }
    }

    #[test]
    fn malformed_events_are_errors() {
        for event in [
            json!([1, 2]),
            json!({"workNo": "101"}),
            json!({"eventType": CALL_RELEASE, "workNo": "101", "content": {"not": "a call"}}),
            json!({"eventType": CALL_RELEASE, "workNo": "101", "content": "../../x"}),
            json!({"eventType": CALL_RELEASE, "workNo": "102", "content": "1-1"}),
            json!({"eventType": CUSTOMER_RELEASE, "workNo": "101", "content": "1-1"}),
            json!({"eventType": CUSTOMER_RELEASE, "content": {"number": "70093"}}),
        ] {
            assert!(parse_event(agent(), &event).is_err(), "{event}");
        }
    }

    /// A customer release whose `number` fails validation is
    /// still read, without the number, and says which field it dropped (not its value).
    #[test]
    fn a_customer_release_with_a_bad_number_is_read_without_it() {
        for number in [
            json!({}),
            json!([7, 0, 0, 9, 3]),
            json!(true),
            json!("7".repeat(200)),
            json!("700 93"),
            json!("70093\u{0}"),
        ] {
            let event = json!({"eventType": CUSTOMER_RELEASE, "workNo": "101",
                               "content": {"callid": "1456404171-43", "number": number}});
            let read = parse_event(agent(), &event).unwrap_or_else(|e| panic!("{e}: {event}"));
            assert_eq!(
                read.body,
                EventBody::CustomerRelease {
                    call_id: CallId::parse("c", "1456404171-43").unwrap(),
                    number: String::new(),
                },
                "{event}"
            );
            assert_eq!(read.dropped_fields, [NUMBER_FIELD], "{event}");
        }
        for number in [json!(null), json!(""), json!("70093"), json!(70093)] {
            let event = json!({"eventType": CUSTOMER_RELEASE, "workNo": "101",
                               "content": {"callid": "1-1", "number": number}});
            let read = parse_event(agent(), &event).unwrap();
            assert!(read.dropped_fields.is_empty(), "{event}: {read:?}");
        }
        let without = parse_event(
            agent(),
            &json!({"eventType": CUSTOMER_RELEASE, "content": {"callid": "1-1"}}),
        )
        .unwrap();
        assert!(without.dropped_fields.is_empty(), "{without:?}");
    }

    fn with_gen_time(time: Value) -> Value {
        json!({"eventType": CALL_RELEASE, "workNo": "101", "content": "1-1", "eventGenTime": time})
    }

    /// A release whose `eventGenTime` is past protobuf Timestamp's range (u64::MAX ms, the
    /// year 10000), negative, or not a whole number is read without it, and says so.
    #[test]
    fn an_event_time_out_of_range_is_left_out_and_named() {
        for time in [
            json!(u64::MAX),
            json!(u64::MAX.to_string()),
            json!(MAX_GEN_TIME_MS + 1),
            json!(-1),
            json!(1.7e12),
            json!("soon"),
            json!({}),
        ] {
            let read = parse_event(agent(), &with_gen_time(time.clone())).unwrap();
            assert_eq!(
                (read.gen_time_ms, read.dropped_fields),
                (None, vec![GEN_TIME_FIELD]),
                "{time}"
            );
        }
        for (time, ms) in [
            (json!(0), 0),
            (json!(MAX_GEN_TIME_MS), MAX_GEN_TIME_MS),
            (json!(" 1700000000123 "), 1_700_000_000_123),
        ] {
            let read = parse_event(agent(), &with_gen_time(time.clone())).unwrap();
            assert_eq!(
                (read.gen_time_ms, read.dropped_fields),
                (Some(ms), vec![]),
                "{time}"
            );
        }
        let null = parse_event(agent(), &with_gen_time(Value::Null)).unwrap();
        assert_eq!((null.gen_time_ms, null.dropped_fields), (None, vec![]));
        // The time of an event that is skipped is not looked at.
        let other = json!({"eventType": "AgentState_Ready", "eventGenTime": u64::MAX});
        assert!(parse_event(agent(), &other)
            .unwrap()
            .dropped_fields
            .is_empty());
    }

    /// What each documented refusal says.
    const PROBLEMS: [&str; 5] = [
        "the event is not a JSON object",
        "eventType is missing or not a name",
        "workNo is not the polled agent",
        "content is not a call id",
        "content has no valid callid",
    ];

    /// Events near the two the facade reads: each member right or anything at all.
    fn release_like() -> impl Strategy<Value = Value> {
        let event_type = or_any_json(
            prop_oneof![
                Just(CALL_RELEASE.to_owned()),
                Just(CUSTOMER_RELEASE.to_owned()),
                "[!-~]{1,70}",
            ]
            .prop_map(Value::from),
        );
        let call_id = || or_any_json("[0-9-]{1,70}".prop_map(Value::from));
        let number = or_any_json(prop_oneof![
            "[ -~]{0,70}".prop_map(Value::from),
            any::<u64>().prop_map(Value::from)
        ]);
        let content = prop_oneof![
            call_id(),
            (call_id(), number, any::<bool>()).prop_map(|(id, number, upper)| {
                let key = if upper { "callId" } else { "callid" };
                json!({ key: id, "number": number })
            }),
        ];
        let work_no = or_any_json(prop_oneof![
            Just(json!("101")),
            Just(json!(101)),
            Just(json!(" 101 "))
        ]);
        let time = or_any_json(any::<u64>().prop_map(Value::from));
        (event_type, work_no, content, time).prop_map(|(event_type, work_no, content, time)| {
            json!({"eventType": event_type, "workNo": work_no, "content": content, "eventGenTime": time})
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(EVENT_CASES))]

        /// Any event either reads, with every kept field within its bounds and only the two
        /// optional fields ever dropped, or is refused for one of the documented reasons, its
        /// text never repeated.
        #[test]
        fn any_event_reads_within_its_bounds_or_is_refused(event in prop_oneof![any_json(), release_like()]) {
            let graphic = |text: &str| text.bytes().all(|b| b.is_ascii_graphic());
            match parse_event(agent(), &event) {
                Ok(read) => {
                    prop_assert!(!read.event_type.is_empty() && read.event_type.len() <= MAX_TYPE_LEN);
                    prop_assert!(graphic(&read.event_type));
                    if let EventBody::CustomerRelease { number, .. } = &read.body {
                        prop_assert!(number.len() <= MAX_NUMBER_LEN && graphic(number), "{number:?}");
                    }
                    prop_assert!(read.gen_time_ms.is_none_or(|ms| ms <= MAX_GEN_TIME_MS));
                    for field in &read.dropped_fields {
                        prop_assert!([NUMBER_FIELD, GEN_TIME_FIELD].contains(field), "{field}");
                    }
                }
                Err(malformed) => {
                    prop_assert!(PROBLEMS.contains(&malformed.problem), "{malformed}");
                    let named = &malformed.event_type;
                    prop_assert!(named == "(unknown)" || (named.len() <= MAX_TYPE_LEN && graphic(named)));
                }
            }
        }

        /// A release with a valid call id, number and time is read exactly.
        #[test]
        fn a_valid_release_is_read_exactly(
            call in "[0-9]{1,20}-[0-9]{1,20}",
            number in proptest::option::of("[!-~]{1,64}"),
            time in 0..=MAX_GEN_TIME_MS,
        ) {
            let event = match &number {
                None => json!({"eventType": CALL_RELEASE, "workNo": "101", "content": call, "eventGenTime": time}),
                Some(number) => json!({"eventType": CUSTOMER_RELEASE, "workNo": 101, "eventGenTime": time.to_string(),
                                       "content": {"callId": call, "number": number}}),
            };
            let read = parse_event(agent(), &event).unwrap();
            let call_id = CallId::parse("c", &call).unwrap();
            let body = match number {
                None => EventBody::CallRelease { call_id },
                Some(number) => EventBody::CustomerRelease { call_id, number },
            };
            prop_assert_eq!(read.body, body);
            prop_assert_eq!(read.gen_time_ms, Some(time));
            prop_assert!(read.dropped_fields.is_empty());
        }
    }
}
