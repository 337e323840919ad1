//! Strategies for the property tests of the gateway's answers: what a broken or hostile
//! gateway (or a proxy in front of it) could send.
use proptest::{collection, prelude::*};
use serde_json::Value;

/// Any JSON value: scalars (large, negative and fractional numbers, strings of any characters)
/// nested up to a few levels in arrays and objects.
pub(crate) fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            collection::btree_map(".{0,12}", inner, 0..6)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// `value`, or any JSON value instead.
pub(crate) fn or_any_json(value: impl Strategy<Value = Value>) -> impl Strategy<Value = Value> {
    prop_oneof![3 => value, 1 => any_json()]
}
