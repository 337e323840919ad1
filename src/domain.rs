//! Validated identifiers. A value of these types has been checked once, at the edge, so nothing
//! downstream can put an unchecked string into a gateway URL.
use std::fmt;

/// What is wrong with one input field; `api` turns it into a google.rpc `BadRequest` violation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub(crate) field: &'static str,
    pub(crate) description: String,
}

impl FieldViolation {
    pub(crate) fn new(field: &'static str, description: impl Into<String>) -> Self {
        Self {
            field,
            description: description.into(),
        }
    }
}

/// Smallest agent id the gateway accepts.
pub(crate) const MIN_AGENT_ID: u32 = 101;
/// Largest `max_agent_id` a deployment may configure (pages updated 2025-11).
pub(crate) const MAX_AGENT_ID_LIMIT: u32 = 999_999;
/// The older reference's upper bound, our default.
pub(crate) const DEFAULT_MAX_AGENT_ID: u32 = 59_999;

/// An agent's work number, in `MIN_AGENT_ID..=max`. Kept (in a stored answer) as its number,
/// read back with the same rules and no upper bound beyond six digits.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "u32", into = "u32")]
pub struct AgentId(u32);

impl TryFrom<u32> for AgentId {
    type Error = String;

    fn try_from(number: u32) -> Result<Self, Self::Error> {
        Self::parse("agent_id", &number.to_string(), u32::MAX).map_err(|v| v.description)
    }
}

impl From<AgentId> for u32 {
    fn from(agent: AgentId) -> Self {
        agent.0
    }
}

/// The bare number, so that logged lists of agents read `[101, 102]`.
impl fmt::Debug for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl AgentId {
    /// Parses a decimal agent id: ASCII digits only (no sign, space or leading zero), in range.
    pub fn parse(field: &'static str, raw: &str, max: u32) -> Result<Self, FieldViolation> {
        let range = || format!("must be a decimal agent id from {MIN_AGENT_ID} to {max}");
        if raw.is_empty() {
            return Err(FieldViolation::new(
                field,
                format!("is required: {}", range()),
            ));
        }
        if raw.len() > 6 || !raw.bytes().all(|b| b.is_ascii_digit()) || raw.starts_with('0') {
            return Err(FieldViolation::new(field, range()));
        }
        let value: u32 = raw
            .parse()
            .map_err(|_| FieldViolation::new(field, range()))?;
        if !(MIN_AGENT_ID..=max).contains(&value) {
            return Err(FieldViolation::new(field, range()));
        }
        Ok(Self(value))
    }

    pub(crate) fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A gateway call id such as `1456403549-15`: digits and `-` only, so it cannot change the
/// shape of the dropcall URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CallId(String);

impl CallId {
    pub(crate) const MAX_LEN: usize = 64;

    pub(crate) fn parse(field: &'static str, raw: &str) -> Result<Self, FieldViolation> {
        let ok = !raw.is_empty()
            && raw.len() <= Self::MAX_LEN
            && raw.bytes().all(|b| b.is_ascii_digit() || b == b'-')
            && raw.bytes().any(|b| b.is_ascii_digit());
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(FieldViolation::new(
                field,
                format!(
                    "must be a gateway call id of digits and '-' (at most {} characters), e.g. 1456403549-15",
                    Self::MAX_LEN
                ),
            ))
        }
    }

    #[cfg(test)]
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CallId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A client's idempotency key: 1..=128 printable ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct RequestId(String);

impl RequestId {
    pub(crate) const MAX_LEN: usize = 128;

    pub(crate) fn parse(field: &'static str, raw: &str) -> Result<Self, FieldViolation> {
        if !raw.is_empty()
            && raw.len() <= Self::MAX_LEN
            && raw.bytes().all(|b| b.is_ascii_graphic())
        {
            Ok(Self(raw.to_owned()))
        } else {
            Err(FieldViolation::new(
                field,
                format!(
                    "must be 1 to {} printable ASCII characters without spaces, e.g. a UUID",
                    Self::MAX_LEN
                ),
            ))
        }
    }

    /// A fresh id for a request that came without one, so every answer can be traced.
    pub(crate) fn generate() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn agent_id_bounds() {
        assert!(AgentId::parse("a", "101", 59_999).is_ok());
        assert!(AgentId::parse("a", "59999", 59_999).is_ok());
        for bad in [
            "", "100", "60000", "0101", "+101", " 101", "10a", "1e3", "9999999", "-101",
        ] {
            assert!(
                AgentId::parse("a", bad, 59_999).is_err(),
                "{bad:?} accepted"
            );
        }
        assert!(AgentId::parse("a", "999999", 999_999).is_ok());
    }

    #[test]
    fn call_id_shapes() {
        assert!(CallId::parse("c", "1456403549-15").is_ok());
        for bad in [
            "",
            "-",
            "../x",
            "1/2",
            "1%2F2",
            "12 3",
            "abc",
            &"1".repeat(65),
        ] {
            assert!(CallId::parse("c", bad).is_err(), "{bad:?} accepted");
        }
    }

    proptest! {
        #[test]
        fn accepted_call_ids_are_path_safe(raw in "\\PC{0,80}") {
            if let Ok(id) = CallId::parse("c", &raw) {
                prop_assert!(id.as_str().bytes().all(|b| b.is_ascii_digit() || b == b'-'));
            }
        }

        #[test]
        fn accepted_agent_ids_are_in_range(raw in "\\PC{0,10}", max in 101u32..=999_999) {
            if let Ok(id) = AgentId::parse("a", &raw, max) {
                prop_assert!((MIN_AGENT_ID..=max).contains(&id.get()));
                prop_assert_eq!(id.to_string(), raw);
            }
        }

        #[test]
        fn accepted_request_ids_are_bounded(raw in "\\PC{0,200}") {
            if let Ok(id) = RequestId::parse("r", &raw) {
                prop_assert!(id.as_str().len() <= RequestId::MAX_LEN);
            }
        }
    }
}
