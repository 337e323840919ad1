//! Resume tokens: where a watcher stands in the process's sequence of release events.
use std::fmt;

/// A position: every release event with a larger sequence number (of this process lifetime)
/// comes after it. Clients see only the string form and must treat it as opaque.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeToken {
    /// Identifies the process lifetime: sequence numbers restart with the process.
    pub(crate) epoch: u64,
    pub(crate) sequence: u64,
}

const PREFIX: &str = "r1.";

impl ResumeToken {
    pub(crate) fn parse(raw: &str) -> Option<Self> {
        let (epoch, sequence) = raw.strip_prefix(PREFIX)?.split_once('.')?;
        let hex = |s: &str| {
            (!s.is_empty() && s.len() <= 16 && s.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| u64::from_str_radix(s, 16).ok())
                .flatten()
        };
        Some(Self {
            epoch: hex(epoch)?,
            sequence: hex(sequence)?,
        })
    }
}

impl fmt::Display for ResumeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{:016x}.{:x}", self.epoch, self.sequence)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Cases each property below runs (docs/layout.md's reliability section counts them).
    const TOKEN_CASES: u32 = 256;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(TOKEN_CASES))]

        #[test]
        fn round_trips(epoch: u64, sequence: u64) {
            let token = ResumeToken { epoch, sequence };
            prop_assert_eq!(ResumeToken::parse(&token.to_string()), Some(token));
        }

        /// Any text, near misses (signs, upper case, 17 digits, extra dots) and 16 KiB
        /// strings included: a token whose own text reads back the same, or nothing.
        #[test]
        fn any_text_is_a_token_or_nothing(raw in prop_oneof![
            ".{0,64}",
            "r[0-9]\\.[0-9a-fA-F+.-]{0,20}\\.[0-9a-fA-F+.-]{0,20}",
            (0usize..16 * 1024).prop_map(|len| format!("r1.1.{}", "f".repeat(len))),
        ]) {
            if let Some(token) = ResumeToken::parse(&raw) {
                prop_assert_eq!(ResumeToken::parse(&token.to_string()), Some(token));
                let (epoch, sequence) = raw[PREFIX.len()..].split_once('.').unwrap();
                prop_assert!(epoch.len() <= 16 && sequence.len() <= 16, "{raw}");
            }
        }
    }

    #[test]
    fn rejects_foreign_shapes() {
        for raw in [
            "", "xyz", "r1.", "r1.1", "r1..1", "r1.g.1", "r2.1.1", "r1.1.1.1", "r1.+1.1",
        ] {
            assert_eq!(ResumeToken::parse(raw), None, "{raw:?}");
        }
    }
}
