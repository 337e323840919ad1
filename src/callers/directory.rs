//! The callers file (TOML, from a ConfigMap: names, grants, certificate names) and the tokens
//! file (from a Secret: `NAME TOKEN` lines) -> who a credential identifies. Error messages name
//! lines and callers, never a token.
use std::collections::HashMap;

use serde::Deserialize;

use super::{grant::Grant, Caller};

/// Tokens shorter than this are refused: a bearer token is the whole credential.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallersFile {
    #[serde(default)]
    caller: Vec<CallerEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallerEntry {
    name: String,
    agents: Vec<String>,
    verbs: Vec<String>,
    /// Subject CNs, DNS or URI SANs of client certificates that identify this caller.
    #[serde(default)]
    certificate_names: Vec<String>,
}

/// A token's SHA-256: tokens are looked up by digest, so how long a lookup takes says nothing
/// about how much of a token was right, and the tokens themselves are not kept.
pub(crate) type TokenDigest = [u8; 32];

pub(crate) fn token_digest(token: &str) -> TokenDigest {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// Every caller, by token digest and by certificate name.
#[derive(Debug, Default)]
pub(crate) struct Directory {
    callers: usize,
    by_token: HashMap<TokenDigest, Caller>,
    by_certificate_name: HashMap<String, Caller>,
}

impl Directory {
    /// Parses the callers file and, if there is one, the tokens file.
    pub(crate) fn parse(callers_toml: &str, tokens: Option<&str>) -> Result<Self, String> {
        let file: CallersFile =
            toml::from_str(callers_toml).map_err(|e| format!("callers file: {e}"))?;
        let mut by_name = HashMap::new();
        let mut by_certificate_name = HashMap::new();
        for entry in file.caller {
            let caller = caller_of(&entry)?;
            for cert_name in entry.certificate_names {
                if let Some(other) = by_certificate_name.insert(cert_name.clone(), caller.clone()) {
                    return Err(format!(
                        "callers file: certificate name {cert_name:?} is claimed by both {:?} and {:?}",
                        other.name(),
                        caller.name()
                    ));
                }
            }
            if by_name.insert(entry.name.clone(), caller).is_some() {
                return Err(format!(
                    "callers file: caller {:?} appears twice",
                    entry.name
                ));
            }
        }
        let by_token = match tokens {
            Some(tokens) => parse_tokens(tokens, &by_name)?,
            None => HashMap::new(),
        };
        Ok(Self {
            callers: by_name.len(),
            by_token,
            by_certificate_name,
        })
    }

    pub(crate) fn callers(&self) -> usize {
        self.callers
    }

    pub(crate) fn tokens(&self) -> usize {
        self.by_token.len()
    }

    pub(crate) fn by_token(&self, token: &str) -> Option<&Caller> {
        self.by_token.get(&token_digest(token))
    }

    /// The callers that any of a certificate's names identifies (none, one, or, when its names
    /// belong to different callers, several).
    pub(crate) fn by_certificate(&self, names: &[String]) -> Vec<&Caller> {
        let mut found: Vec<&Caller> = Vec::new();
        for caller in names.iter().filter_map(|n| self.by_certificate_name.get(n)) {
            if !found.iter().any(|c| c.name() == caller.name()) {
                found.push(caller);
            }
        }
        found
    }
}

fn caller_of(entry: &CallerEntry) -> Result<Caller, String> {
    let valid_name = !entry.name.is_empty()
        && entry.name.len() <= 64
        && entry
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !valid_name {
        return Err(format!(
            "callers file: caller name {:?} must be 1 to 64 letters, digits, '.', '_' or '-'",
            entry.name
        ));
    }
    let grant = Grant::parse(&entry.agents, &entry.verbs)
        .map_err(|e| format!("callers file: caller {:?}: {e}", entry.name))?;
    Ok(Caller::new(&entry.name, grant))
}

/// `NAME TOKEN` per line; blank lines and lines starting with `#` are skipped. A name may have
/// several tokens (rotation: add the new one, move the callers over, remove the old one).
fn parse_tokens(
    tokens: &str,
    by_name: &HashMap<String, Caller>,
) -> Result<HashMap<TokenDigest, Caller>, String> {
    let mut by_token = HashMap::new();
    for (index, line) in tokens.lines().enumerate() {
        let line_no = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(name), Some(token), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(format!(
                "tokens file line {line_no}: expected `NAME TOKEN` (two fields)"
            ));
        };
        let caller = by_name.get(name).ok_or_else(|| {
            format!("tokens file line {line_no}: caller {name:?} is not in the callers file")
        })?;
        if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "tokens file line {line_no}: the token of {name:?} must be at least {MIN_TOKEN_LEN} printable ASCII characters"
            ));
        }
        if by_token
            .insert(token_digest(token), caller.clone())
            .is_some()
        {
            return Err(format!(
                "tokens file line {line_no}: this token (of {name:?}) appears twice"
            ));
        }
    }
    Ok(by_token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::callers::Verb;

    const CALLERS: &str = r#"
        [[caller]]
        name = "billing"
        agents = ["101-199", "500"]
        verbs = ["release", "watch"]
        certificate_names = ["billing.prod.svc", "spiffe://prod/billing"]

        [[caller]]
        name = "wallboard"
        agents = ["*"]
        verbs = ["watch"]
    "#;

    #[test]
    fn tokens_and_certificate_names_identify_callers() {
        let tokens = "# rotated 2026-11\nbilling aaaaaaaaaaaaaaaa1\nbilling bbbbbbbbbbbbbbbb2\n\nwallboard cccccccccccccccc3\n";
        let directory = Directory::parse(CALLERS, Some(tokens)).unwrap();
        assert_eq!((directory.callers(), directory.tokens()), (2, 3));
        assert_eq!(
            directory.by_token("bbbbbbbbbbbbbbbb2").unwrap().name(),
            "billing"
        );
        assert_eq!(
            directory.by_token("cccccccccccccccc3").unwrap().name(),
            "wallboard"
        );
        assert!(directory.by_token("cccccccccccccccc").is_none());
        let found = directory.by_certificate(&["x".into(), "spiffe://prod/billing".into()]);
        assert_eq!(found.len(), 1);
        assert!(found[0].allows(&[Verb::Watch], &[]).is_ok());
        assert!(directory.by_certificate(&["wallboard".into()]).is_empty());
    }

    #[test]
    fn bad_files_are_refused_without_showing_tokens() {
        let secret = "s3cr3t-t0k3n-value";
        for (tokens, expected) in [
            (
                format!("billing {secret} extra"),
                "line 1: expected `NAME TOKEN`",
            ),
            (
                format!("\nnobody {secret}"),
                "line 2: caller \"nobody\" is not",
            ),
            ("billing short".to_owned(), "at least 16"),
            (
                format!("billing {secret}\nwallboard {secret}"),
                "line 2: this token",
            ),
        ] {
            let error = Directory::parse(CALLERS, Some(&tokens)).unwrap_err();
            assert!(error.contains(expected), "{error}");
            assert!(
                !error.contains(secret) && !error.contains("short"),
                "{error}"
            );
        }
        for (callers, expected) in [
            ("[[caller]]\nname = \"a b\"\nagents = []\nverbs = []", "caller name \"a b\""),
            ("[[caller]]\nname = \"a\"\nagents = [\"9-1\"]\nverbs = []", "ends before it starts"),
            ("[[caller]]\nname = \"a\"\nagents = []\nverbs = []\n[[caller]]\nname = \"a\"\nagents = []\nverbs = []", "appears twice"),
            ("[[caller]]\nname = \"a\"\nagents = []\nverbs = []\ncertificate_names = [\"x\"]\n[[caller]]\nname = \"b\"\nagents = []\nverbs = []\ncertificate_names = [\"x\"]", "claimed by both"),
            ("[[caller]]\nname = \"a\"\nagent = []\nverbs = []", "callers file:"),
        ] {
            let error = Directory::parse(callers, None).unwrap_err();
            assert!(error.contains(expected), "{error}");
        }
    }
}
