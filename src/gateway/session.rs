//! Gateway sessions: the Guid (a credential) and the load balancer's cookies, per agent.
use std::fmt;

use crate::domain::FieldViolation;

/// The gateway's session token. Debug and Display never show it, so it cannot leak into logs,
/// error messages or metrics by accident; `expose` is the one way to read it.
#[derive(Clone, PartialEq, Eq)]
pub struct Guid(String);

impl Guid {
    pub(crate) const MAX_LEN: usize = 256;

    /// Accepts the bare Guid or the `JSESSIONID=<guid>` form of a `Set-GUID` header. The
    /// violation never repeats the value.
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, FieldViolation> {
        let raw = raw.trim();
        let value = raw.strip_prefix("JSESSIONID=").unwrap_or(raw);
        let ok = !value.is_empty()
            && value.len() <= Self::MAX_LEN
            && value
                .bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b';' | b',' | b'"' | b'\\'));
        if ok {
            Ok(Self(value.to_owned()))
        } else {
            Err(FieldViolation::new(
                field,
                format!(
                    "must be the gateway's Guid (1 to {} printable ASCII characters, optionally prefixed with JSESSIONID=)",
                    Self::MAX_LEN
                ),
            ))
        }
    }

    /// Reads a `Set-GUID: JSESSIONID=<guid>` header value; attributes after the first `;`
    /// (`Path=/; Secure`, as on a Set-Cookie) are not part of the Guid.
    pub(crate) fn from_set_guid(header: &str) -> Option<Self> {
        let value = header.split(';').next().unwrap_or_default();
        Self::parse("Set-GUID", value).ok()
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Guid(<redacted>)")
    }
}

/// Cookies the load balancer set (session stickiness), sent back on every later call. Values
/// are credentials too, so Debug shows names only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Cookies(Vec<(String, String)>);

impl Cookies {
    /// Longest `Cookie` header a session sends (and a caller may hand over).
    pub(crate) const MAX_HEADER_LEN: usize = 4096;
    /// Most cookies a session holds: a load balancer sets one or two.
    pub(crate) const MAX_COOKIES: usize = 16;

    /// Parses a `Cookie` request-header value: `name=value; name2=value2`.
    pub(crate) fn parse_header(field: &'static str, raw: &str) -> Result<Self, FieldViolation> {
        let invalid = || {
            FieldViolation::new(
                field,
                format!(
                    "must be a Cookie header value `name=value; name2=value2` of at most {} bytes and {} cookies",
                    Self::MAX_HEADER_LEN, Self::MAX_COOKIES
                ),
            )
        };
        if raw.len() > Self::MAX_HEADER_LEN {
            return Err(invalid());
        }
        let mut cookies = Self::default();
        for pair in raw.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = split_pair(pair).ok_or_else(invalid)?;
            let known = cookies.0.iter().any(|(n, _)| n == name);
            if !known && cookies.0.len() == Self::MAX_COOKIES {
                return Err(invalid());
            }
            cookies.set(name, value);
        }
        if cookies.0.is_empty() {
            return Err(invalid());
        }
        Ok(cookies)
    }

    /// Applies one `Set-Cookie` response header (attributes after the first `;` are ignored:
    /// the facade talks to one gateway, so Domain/Path scoping does not apply).
    pub(crate) fn apply_set_cookie(&mut self, header: &str) -> bool {
        let first = header.split(';').next().unwrap_or("").trim();
        match split_pair(first) {
            Some((name, value)) => self.set(name, value),
            None => false,
        }
    }

    /// Sets one cookie; false when nothing changed, or when it would take the session past
    /// `MAX_COOKIES` or `MAX_HEADER_LEN` (a misbehaving gateway must not grow it without bound).
    fn set(&mut self, name: &str, value: &str) -> bool {
        let len = self.header_len();
        let full = self.0.len() == Self::MAX_COOKIES;
        match self.0.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) if v == value => false,
            Some((_, v)) if len - v.len() + value.len() > Self::MAX_HEADER_LEN => false,
            Some((_, v)) => {
                *v = value.to_owned();
                true
            }
            None if full || len + 2 + name.len() + 1 + value.len() > Self::MAX_HEADER_LEN => false,
            None => {
                self.0.push((name.to_owned(), value.to_owned()));
                true
            }
        }
    }

    /// The length of `header_value()`.
    fn header_len(&self) -> usize {
        let pairs: usize = self.0.iter().map(|(n, v)| n.len() + 1 + v.len()).sum();
        pairs + 2 * self.0.len().saturating_sub(1)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `Cookie` header to send, or None when there is nothing to send.
    pub fn header_value(&self) -> Option<String> {
        (!self.0.is_empty()).then(|| {
            self.0
                .iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join("; ")
        })
    }
}

fn split_pair(pair: &str) -> Option<(&str, &str)> {
    let (name, value) = pair.split_once('=')?;
    let name = name.trim();
    let token = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b';' | b',' | b'='))
    };
    let value = value.trim();
    (!name.is_empty() && token(name) && value.bytes().all(|b| b.is_ascii_graphic() && b != b';'))
        .then_some((name, value))
}

impl fmt::Debug for Cookies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(n, _)| n))
            .finish()
    }
}

/// One agent's session with the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub guid: Guid,
    pub cookies: Cookies,
}

impl Session {
    /// Applies an answer's `Set-GUID` and `Set-Cookie` headers. True when the Guid changed.
    pub(crate) fn absorb(&mut self, headers: SessionHeaders) -> bool {
        for header in &headers.set_cookies {
            self.cookies.apply_set_cookie(header);
        }
        match headers.set_guid {
            Some(new) if new != self.guid => {
                self.guid = new;
                true
            }
            _ => false,
        }
    }
}

/// The session headers of one gateway answer.
#[derive(Debug, Default)]
pub(crate) struct SessionHeaders {
    pub(crate) set_guid: Option<Guid>,
    pub(crate) set_cookies: Vec<String>,
}

impl SessionHeaders {
    pub(crate) fn is_empty(&self) -> bool {
        self.set_guid.is_none() && self.set_cookies.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use proptest::{collection::vec, prelude::*};

    use super::*;

    /// Cases each property below runs (docs/layout.md's reliability section counts them).
    const SESSION_CASES: u32 = 256;
    const COOKIE_CASES: u32 = 128;

    #[test]
    fn guid_never_prints() {
        let guid = Guid::parse("g", "JSESSIONID=279fe21d-2caa.AgentGateway0").unwrap();
        assert_eq!(guid.expose(), "279fe21d-2caa.AgentGateway0");
        let session = Session {
            guid,
            cookies: Cookies::parse_header("c", "route=secret-node").unwrap(),
        };
        let shown = format!("{session:?}");
        assert!(!shown.contains("279fe21d"), "{shown}");
        assert!(!shown.contains("secret-node"), "{shown}");
    }

    /// A Set-GUID with attributes is read.
    #[test]
    fn set_guid_attributes_are_not_part_of_the_guid() {
        let guid =
            Guid::from_set_guid("JSESSIONID=279fe21d.AgentGateway0; Path=/; Secure").unwrap();
        assert_eq!(guid.expose(), "279fe21d.AgentGateway0");
        assert_eq!(
            Guid::from_set_guid(" JSESSIONID=abc ").unwrap().expose(),
            "abc"
        );
        for unreadable in ["", "; Path=/", "JSESSIONID=; Secure", "a b"] {
            assert!(Guid::from_set_guid(unreadable).is_none(), "{unreadable:?}");
        }
    }

    /// A handover's cookies are bounded in number and size, and so is what
    /// Set-Cookie can grow a session to.
    #[test]
    fn cookies_are_bounded() {
        let many = (0..=Cookies::MAX_COOKIES)
            .map(|n| format!("c{n}=v"))
            .collect::<Vec<_>>()
            .join("; ");
        assert!(Cookies::parse_header("c", &many).is_err());
        let mut cookies = Cookies::parse_header("c", "a=b").unwrap();
        for n in 0..100 {
            cookies.apply_set_cookie(&format!("n{n}={}; Path=/", "v".repeat(300)));
        }
        let header = cookies.header_value().unwrap();
        assert!(header.len() <= Cookies::MAX_HEADER_LEN, "{}", header.len());
        assert!(cookies.0.len() <= Cookies::MAX_COOKIES);
        assert_eq!(header.len(), cookies.header_len());
    }

    #[test]
    fn guid_rejects_header_breakers() {
        for bad in ["", "a b", "a\r\nb", "a;b", &"x".repeat(300), "JSESSIONID="] {
            assert!(Guid::parse("g", bad).is_err(), "{bad:?}");
        }
        let err = Guid::parse("g", "secret value").unwrap_err();
        assert!(!err.description.contains("secret"), "{}", err.description);
    }

    /// Text near a Guid, a Set-GUID or a Cookie header: their separators, spaces, controls and
    /// a non-ASCII letter among printable characters, or anything at all.
    fn header_like(max: usize) -> impl Strategy<Value = String> {
        let near = vec(
            prop_oneof![
                4 => prop::char::range('!', '~'),
                1 => prop::sample::select(vec![' ', ';', '=', ',', '"', '\\', '\t', '\r', '\n', '\0', 'é']),
            ],
            0..max,
        )
        .prop_map(|chars| chars.into_iter().collect::<String>());
        prop_oneof![
            near.clone(),
            near.clone().prop_map(|text| format!("JSESSIONID={text}")),
            vec(any::<char>(), 0..max).prop_map(|chars| chars.into_iter().collect()),
        ]
    }

    /// A Guid that reads: printable ASCII but `;`, `,`, `"` and `\`.
    fn valid_guid() -> impl Strategy<Value = String> {
        "[!#-+\\--:<-\\[\\]-~]{1,256}"
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(SESSION_CASES))]

        /// Any text is a Guid within its bounds that reads back the same, or the one fixed
        /// violation (never the value).
        #[test]
        fn a_guid_reads_within_its_bounds_or_is_refused_without_its_value(raw in header_like(300)) {
            let refusal = Guid::parse("g", "").unwrap_err();
            match Guid::parse("g", &raw) {
                Ok(guid) => {
                    let value = guid.expose();
                    prop_assert!(!value.is_empty() && value.len() <= Guid::MAX_LEN);
                    prop_assert!(value.bytes().all(|b| b.is_ascii_graphic() && !b";,\"\\".contains(&b)));
                    prop_assert_eq!(Guid::parse("g", value), Ok(guid.clone()));
                }
                Err(violation) => prop_assert_eq!(violation, refusal),
            }
            if let Some(guid) = Guid::from_set_guid(&raw) {
                prop_assert_eq!(Guid::parse("g", guid.expose()), Ok(guid.clone()));
            }
        }

        /// A valid Guid round-trips through a Set-GUID header, whatever its attributes.
        #[test]
        fn a_set_guid_round_trips(guid in valid_guid(), attributes in "(; [ -~]{0,30}){0,3}") {
            let header = format!("JSESSIONID={guid}{attributes}");
            prop_assert_eq!(Guid::from_set_guid(&header).map(|g| g.expose().to_owned()), Some(guid));
        }

    }

    proptest! {
        // Headers of up to 6 KB: slower to make, so fewer cases.
        #![proptest_config(ProptestConfig::with_cases(COOKIE_CASES))]

        /// Any Cookie header is cookies within both bounds that read back the same, or the one
        /// fixed violation.
        #[test]
        fn a_cookie_header_reads_within_its_bounds_or_is_refused(raw in prop_oneof![
            header_like(300),
            vec("[a-z]{1,3}=[!-:<-~]{0,300}", 0..20).prop_map(|pairs| pairs.join("; ")),
        ]) {
            let refusal = Cookies::parse_header("c", "").unwrap_err();
            match Cookies::parse_header("c", &raw) {
                Ok(cookies) => {
                    let header = cookies.header_value().expect("at least one cookie");
                    prop_assert!(header.len() <= Cookies::MAX_HEADER_LEN);
                    prop_assert!(cookies.0.len() <= Cookies::MAX_COOKIES);
                    prop_assert_eq!(Cookies::parse_header("c", &header), Ok(cookies.clone()));
                }
                Err(violation) => prop_assert_eq!(violation, refusal),
            }
        }

        /// However many Set-Cookie headers a gateway sends, of whatever text, a session's
        /// cookies stay within both bounds and make a Cookie header that reads back the same.
        #[test]
        fn set_cookies_never_grow_a_session_past_its_bounds(headers in vec(prop_oneof![
            header_like(40),
            ("[a-z]{1,2}", 0usize..1200).prop_map(|(name, len)| format!("{name}={}; Path=/", "v".repeat(len))),
        ], 0..60)) {
            let mut cookies = Cookies::default();
            for header in &headers {
                cookies.apply_set_cookie(header);
                prop_assert!(cookies.0.len() <= Cookies::MAX_COOKIES);
                prop_assert!(cookies.header_len() <= Cookies::MAX_HEADER_LEN);
            }
            if let Some(header) = cookies.header_value() {
                prop_assert_eq!(header.len(), cookies.header_len());
                prop_assert_eq!(Cookies::parse_header("c", &header), Ok(cookies.clone()));
            }
        }
    }
}
