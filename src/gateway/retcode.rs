//! Gateway retcodes: read once from an answer's envelope, then compared as values. The codes the
//! facade acts on have names; every code the reference documents is a [`KnownRetcode`], so that
//! a mapping over them can be an exhaustive `match`.
use std::fmt;

/// The retcode of success.
const SUCCESS: &str = "0";
/// Longest retcode accepted (in bytes). Real ones are `NNN-NNN`; the code ends up in statuses,
/// logs and metadata, so a gateway or proxy must not be able to put anything large there.
const MAX_LEN: usize = 32;
/// The family (the digits before the dash) of the call-state retcodes: `200-017` "no call",
/// and, for operations this facade does not use, the call states that keep them from running.
const CALL_STATE_FAMILY: &str = "200";

/// A retcode as a gateway answer carried it: trimmed, never empty, at most 32 bytes. Displays
/// as the code, and is kept (in a stored answer) as the code.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub(crate) struct Retcode(Parsed);

impl TryFrom<String> for Retcode {
    type Error = InvalidRetcode;

    fn try_from(code: String) -> Result<Self, Self::Error> {
        Self::parse(&code)
    }
}

impl From<Retcode> for String {
    fn from(retcode: Retcode) -> Self {
        retcode.to_string()
    }
}

// Equality compares variants: `Other` never holds success or a known code.
#[derive(Clone, PartialEq, Eq)]
enum Parsed {
    Success,
    Known(KnownRetcode),
    Other(Box<str>),
}

/// Why a retcode was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("retcode is empty or implausibly long")]
pub(crate) struct InvalidRetcode;

impl Retcode {
    #[cfg(test)]
    pub(crate) const OK: Self = Self(Parsed::Success);
    pub(crate) const WRONG_EVENT_METHOD: Self = Self::of(KnownRetcode::WrongEventMethod);
    pub(crate) const INVALID_PARAMETER: Self = Self::of(KnownRetcode::InvalidParameter);
    pub(crate) const NO_RIGHT: Self = Self::of(KnownRetcode::NoRight);
    pub(crate) const AGENT_NOT_SIGNED_IN: Self = Self::of(KnownRetcode::AgentNotSignedIn);
    #[cfg(test)]
    pub(crate) const OPERATION_EXCEPTION: Self = Self::of(KnownRetcode::OperationException);
    pub(crate) const NO_CALL_TO_RELEASE: Self = Self::of(KnownRetcode::NoCallToRelease);
    pub(crate) const NO_CALL_TO_DROP: Self = Self::of(KnownRetcode::NoCallToDrop);

    const fn of(code: KnownRetcode) -> Self {
        Self(Parsed::Known(code))
    }

    /// Reads a retcode as the envelope carries it (surrounding whitespace ignored).
    pub(crate) fn parse(raw: &str) -> Result<Self, InvalidRetcode> {
        let code = raw.trim();
        if code.is_empty() || code.len() > MAX_LEN {
            return Err(InvalidRetcode);
        }
        let parsed = if code == SUCCESS {
            Parsed::Success
        } else if let Some(known) = KnownRetcode::ALL.iter().find(|k| k.code() == code) {
            Parsed::Known(*known)
        } else {
            Parsed::Other(code.into())
        };
        Ok(Self(parsed))
    }

    pub(crate) fn as_str(&self) -> &str {
        match &self.0 {
            Parsed::Success => SUCCESS,
            Parsed::Known(known) => known.code(),
            Parsed::Other(code) => code,
        }
    }

    /// The documented failure this retcode is, if the reference documents it.
    pub(crate) fn known(&self) -> Option<KnownRetcode> {
        match self.0 {
            Parsed::Known(known) => Some(known),
            Parsed::Success | Parsed::Other(_) => None,
        }
    }

    pub(crate) fn is_ok(&self) -> bool {
        self.0 == Parsed::Success
    }

    /// The gateway does not accept the Guid: a wrong, expired or unknown one answers 100-006
    /// (agent not signed in) or 000-003 (no right).
    pub(crate) fn session_gone(&self) -> bool {
        *self == Self::AGENT_NOT_SIGNED_IN || *self == Self::NO_RIGHT
    }

    /// A 200-xxx retcode: the gateway looked at the agent's call to answer.
    pub(crate) fn is_call_state(&self) -> bool {
        self.as_str()
            .split_once('-')
            .is_some_and(|(family, _)| family == CALL_STATE_FAMILY)
    }
}

impl fmt::Display for Retcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Retcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

enum_with_all! {
    /// The failure retcodes the reference documents, in code order.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum KnownRetcode {
        /// 000-001: the gateway is configured for another way of delivering events (push, or
        /// all agents at once): polling this agent will never work.
        WrongEventMethod,
        /// 000-002: invalid parameter or URL.
        InvalidParameter,
        /// 000-003: no right to invoke; the session may have expired.
        NoRight,
        /// 000-004: the agent is being switched over to another gateway (DR).
        SwitchingOver,
        /// 000-005: the inspected agent is the inspector itself.
        InspectorIsAgent,
        /// 000-006: message parameter error.
        MessageParameterError,
        /// 000-007: the interface was invoked again while the same operation is in progress.
        DuplicateInProgress,
        /// 100-001: a sign-in parameter is empty or invalid.
        SignInParameterEmptyOrInvalid,
        /// 100-002: the agent is already signed in.
        AlreadySignedIn,
        /// 100-003: a resource or provider was unavailable during sign-in.
        SignInResourceUnavailable,
        /// 100-004: wrong user name or password.
        WrongCredentials,
        /// 100-005: a sign-out parameter is invalid.
        SignOutParameterInvalid,
        /// 100-006: the agent is not signed in (also a wrong or expired Guid).
        AgentNotSignedIn,
        /// 100-007: exception during the agent operation (internal error, backend unreachable).
        OperationException,
        /// 100-008: the agent is already signed out.
        AlreadySignedOut,
        /// 100-009: setting the agent's state failed.
        StateChangeFailed,
        /// 100-010: state error at sign-out.
        StateError,
        /// 100-011: invalid sign-in parameter.
        SignInParameterInvalid,
        /// 100-012: wrong agent type at sign-in.
        WrongAgentType,
        /// 200-017: release: the agent has no call.
        NoCallToRelease,
        /// 200-023: disconnect: the number cannot be released (the reference does not say how
        /// this differs from 200-024).
        NumberCannotBeReleased023,
        /// 200-024: disconnect: the number cannot be released (see 200-023).
        NumberCannotBeReleased024,
        /// 200-025: dropcall: no call can be dropped.
        NoCallToDrop,
        /// 200-204: disconnect: the number is not in the agent's last call.
        NumberNotInCall,
    }
}

impl KnownRetcode {
    /// The code as the gateway sends it.
    pub(crate) const fn code(self) -> &'static str {
        match self {
            Self::WrongEventMethod => "000-001",
            Self::InvalidParameter => "000-002",
            Self::NoRight => "000-003",
            Self::SwitchingOver => "000-004",
            Self::InspectorIsAgent => "000-005",
            Self::MessageParameterError => "000-006",
            Self::DuplicateInProgress => "000-007",
            Self::SignInParameterEmptyOrInvalid => "100-001",
            Self::AlreadySignedIn => "100-002",
            Self::SignInResourceUnavailable => "100-003",
            Self::WrongCredentials => "100-004",
            Self::SignOutParameterInvalid => "100-005",
            Self::AgentNotSignedIn => "100-006",
            Self::OperationException => "100-007",
            Self::AlreadySignedOut => "100-008",
            Self::StateChangeFailed => "100-009",
            Self::StateError => "100-010",
            Self::SignInParameterInvalid => "100-011",
            Self::WrongAgentType => "100-012",
            Self::NoCallToRelease => "200-017",
            Self::NumberCannotBeReleased023 => "200-023",
            Self::NumberCannotBeReleased024 => "200-024",
            Self::NoCallToDrop => "200-025",
            Self::NumberNotInCall => "200-204",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Retcode {
        Retcode::parse(raw).unwrap()
    }

    #[test]
    fn every_known_code_parses_back_to_itself() {
        for &known in KnownRetcode::ALL {
            let retcode = parse(known.code());
            assert_eq!(retcode.known(), Some(known), "{}", known.code());
            assert_eq!(retcode.as_str(), known.code());
        }
    }

    #[test]
    fn named_codes_are_their_wire_text() {
        assert_eq!(parse("0"), Retcode::OK);
        assert_eq!(parse(" 100-006 "), Retcode::AGENT_NOT_SIGNED_IN);
        assert_eq!(Retcode::NO_CALL_TO_DROP.to_string(), "200-025");
        assert_eq!(format!("{:?}", Retcode::OK), r#""0""#);
    }

    #[test]
    fn other_codes_are_kept_as_sent() {
        let other = parse("321-999");
        assert_eq!((other.as_str(), other.known()), ("321-999", None));
        assert!(!other.is_ok() && !other.session_gone() && !other.is_call_state());
        assert_eq!(parse("321-999"), other);
        assert_ne!(parse("7"), other);
    }

    #[test]
    fn families() {
        assert!(Retcode::OK.is_ok());
        assert!(Retcode::NO_RIGHT.session_gone() && Retcode::AGENT_NOT_SIGNED_IN.session_gone());
        assert!(!Retcode::OPERATION_EXCEPTION.session_gone());
        for code in ["200-017", "200-204", "200-001"] {
            assert!(parse(code).is_call_state(), "{code}");
        }
        for code in ["0", "100-007", "2000-1", "200", "x200-1"] {
            assert!(!parse(code).is_call_state(), "{code}");
        }
    }

    #[test]
    fn rejects_empty_and_oversized_codes() {
        for raw in ["", "  ", &"1".repeat(MAX_LEN + 1)] {
            assert_eq!(Retcode::parse(raw), Err(InvalidRetcode), "{raw:?}");
        }
        assert!(Retcode::parse(&"1".repeat(MAX_LEN)).is_ok());
    }
}
