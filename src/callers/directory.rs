//! The callers file (TOML, from a ConfigMap: names, grants, certificate names) and the tokens
//! file (from a Secret: `NAME TOKEN` lines) -> who a credential identifies. The two files are
//! read apart: a [`Roster`] from the callers file, [`TokenLine`]s from the tokens file, joined
//! into a [`Directory`] where a token line whose caller the roster lacks is dropped, so that
//! removing a caller from the callers file revokes its tokens too. Error messages name lines
//! and callers, never a token.
use std::{collections::HashMap, sync::Arc};

use serde::Deserialize;

use super::{certificate::CertificateName, grant::Grant, Caller};

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
    /// Typed names (`dns:`, `uri:`, `cn:`) of client certificates that identify this caller.
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

/// The callers file: every caller by name and by certificate name.
#[derive(Debug, Default)]
pub(crate) struct Roster {
    by_name: HashMap<String, Caller>,
    by_certificate_name: HashMap<CertificateName, Caller>,
}

impl Roster {
    /// Parses the callers file; the whole file or nothing.
    pub(crate) fn parse(callers_toml: &str) -> Result<Self, String> {
        let file: CallersFile =
            toml::from_str(callers_toml).map_err(|e| format!("callers file: {e}"))?;
        let mut by_name = HashMap::new();
        let mut by_certificate_name = HashMap::new();
        for entry in file.caller {
            let caller = caller_of(&entry)?;
            for raw in &entry.certificate_names {
                let name = CertificateName::parse(raw)
                    .map_err(|e| format!("callers file: caller {:?}: {e}", entry.name))?;
                if let Some(other) = by_certificate_name.insert(name.clone(), caller.clone()) {
                    return Err(format!(
                        "callers file: certificate name \"{name}\" is claimed by both {:?} and {:?}",
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
        Ok(Self {
            by_name,
            by_certificate_name,
        })
    }
}

/// One usable line of the tokens file: whose token, and its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TokenLine {
    line_no: usize,
    name: String,
    digest: TokenDigest,
}

/// The tokens file's usable lines, and what is wrong with the others (each names its line,
/// never a token). A bad line is left out, never guessed at: leaving out a token grants
/// nothing. A token on several lines is left out on all of them: which caller it is for is
/// not clear.
pub(crate) fn parse_tokens(tokens: &[u8]) -> (Vec<TokenLine>, Vec<String>) {
    let mut lines = Vec::new();
    let mut problems = Problems::default();
    let mut first_line_of: HashMap<TokenDigest, usize> = HashMap::new();
    let mut repeated = Vec::new();
    for (index, line) in tokens.split(|&b| b == b'\n').enumerate() {
        let line_no = index + 1;
        let Ok(line) = std::str::from_utf8(line) else {
            problems.push(format!("tokens file line {line_no}: not UTF-8"));
            continue;
        };
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(name), Some(token), None) = (fields.next(), fields.next(), fields.next()) else {
            problems.push(format!(
                "tokens file line {line_no}: expected `NAME TOKEN` (two fields)"
            ));
            continue;
        };
        if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
            problems.push(format!(
                "tokens file line {line_no}: the token must be at least {MIN_TOKEN_LEN} printable ASCII characters"
            ));
            continue;
        }
        let digest = token_digest(token);
        if let Some(&first) = first_line_of.get(&digest) {
            problems.push(format!(
                "tokens file line {line_no}: this token appears on line {first} too; neither line is used"
            ));
            repeated.push(digest);
            continue;
        }
        first_line_of.insert(digest, line_no);
        lines.push(TokenLine {
            line_no,
            name: name.to_owned(),
            digest,
        });
    }
    lines.retain(|line| !repeated.contains(&line.digest));
    (lines, problems.into_messages())
}

/// What is wrong with a file's lines: the first [`REPORTED_PROBLEMS`], then how many more, so
/// that a file of bad lines makes a short log.
#[derive(Default)]
struct Problems {
    reported: Vec<String>,
    more: usize,
}

/// Problems of one file reported one by one.
const REPORTED_PROBLEMS: usize = 10;

impl Problems {
    fn push(&mut self, problem: String) {
        if self.reported.len() < REPORTED_PROBLEMS {
            self.reported.push(problem);
        } else {
            self.more += 1;
        }
    }

    fn into_messages(mut self) -> Vec<String> {
        if self.more > 0 {
            self.reported.push(format!(
                "tokens file: {} more lines cannot be used",
                self.more
            ));
        }
        self.reported
    }
}

/// Every caller, by token digest and by certificate name.
#[derive(Debug, Default)]
pub(crate) struct Directory {
    roster: Arc<Roster>,
    by_token: HashMap<TokenDigest, Caller>,
}

impl Directory {
    /// The roster's callers with the tokens of `tokens` whose caller it has; a warning for
    /// each line whose caller it lacks, which is left out.
    pub(crate) fn join(roster: Arc<Roster>, tokens: &[TokenLine]) -> (Self, Vec<String>) {
        let mut by_token = HashMap::new();
        let mut dropped = Vec::new();
        for line in tokens {
            match roster.by_name.get(&line.name) {
                Some(caller) => {
                    by_token.insert(line.digest, caller.clone());
                }
                // Named by its line only: a line whose fields were swapped would put its token
                // where the name goes.
                None => dropped.push(format!(
                    "tokens file line {}: its caller is not in the callers file; its token is not accepted",
                    line.line_no
                )),
            }
        }
        (Self { roster, by_token }, dropped)
    }

    pub(crate) fn callers(&self) -> usize {
        self.roster.by_name.len()
    }

    pub(crate) fn tokens(&self) -> usize {
        self.by_token.len()
    }

    #[cfg(test)]
    fn by_token(&self, token: &str) -> Option<&Caller> {
        self.by_digest(&token_digest(token))
    }

    pub(crate) fn by_digest(&self, digest: &TokenDigest) -> Option<&Caller> {
        self.by_token.get(digest)
    }

    /// The callers that any of a certificate's names identifies (none, one, or, when its names
    /// belong to different callers, several).
    pub(crate) fn by_certificate(&self, names: &[CertificateName]) -> Vec<&Caller> {
        let mut found: Vec<&Caller> = Vec::new();
        for caller in names
            .iter()
            .filter_map(|n| self.roster.by_certificate_name.get(n))
        {
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::callers::Verb;

    const CALLERS: &str = r#"
        [[caller]]
        name = "billing"
        agents = ["101-199", "500"]
        verbs = ["release", "watch"]
        certificate_names = ["dns:billing.prod.svc", "uri:spiffe://prod/billing"]

        [[caller]]
        name = "wallboard"
        agents = ["*"]
        verbs = ["watch"]
        certificate_names = ["cn:wallboard"]
    "#;

    fn directory(tokens: &str) -> (Directory, Vec<String>, Vec<String>) {
        let (lines, problems) = parse_tokens(tokens.as_bytes());
        let roster = Arc::new(Roster::parse(CALLERS).unwrap());
        let (directory, dropped) = Directory::join(roster, &lines);
        (directory, problems, dropped)
    }

    #[test]
    fn tokens_and_certificate_names_identify_callers() {
        let tokens = "# rotated 2026-11\nbilling aaaaaaaaaaaaaaaa1\nbilling bbbbbbbbbbbbbbbb2\n\nwallboard cccccccccccccccc3\n";
        let (directory, problems, dropped) = directory(tokens);
        assert!(problems.is_empty() && dropped.is_empty());
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
        let uri = CertificateName::Uri("spiffe://prod/billing".into());
        let found = directory.by_certificate(&[CertificateName::Dns("x".into()), uri]);
        assert_eq!(found.len(), 1);
        assert!(found[0].allows(&[Verb::Watch], &[]).is_ok());
        // A name of one type is no name of another.
        for other_type in [
            CertificateName::CommonName("billing.prod.svc".into()),
            CertificateName::Uri("billing.prod.svc".into()),
            CertificateName::Dns("wallboard".into()),
        ] {
            assert!(directory.by_certificate(&[other_type]).is_empty());
        }
        let cn = CertificateName::CommonName("wallboard".into());
        assert_eq!(directory.by_certificate(&[cn])[0].name(), "wallboard");
    }

    #[test]
    fn a_token_whose_caller_is_gone_is_dropped_and_the_rest_apply() {
        let secret = "s3cr3t-t0k3n-value";
        let (directory, problems, dropped) =
            directory(&format!("nobody {secret}\nbilling aaaaaaaaaaaaaaaa1\n"));
        assert!(problems.is_empty());
        assert_eq!(dropped.len(), 1);
        assert!(
            dropped[0].contains("line 1: its caller is not in the callers file"),
            "{dropped:?}"
        );
        assert!(!dropped[0].contains(secret));
        assert!(directory.by_token(secret).is_none());
        assert_eq!(
            directory.by_token("aaaaaaaaaaaaaaaa1").unwrap().name(),
            "billing"
        );
    }

    #[test]
    fn bad_token_lines_are_left_out_and_named_without_showing_tokens() {
        let secret = "s3cr3t-t0k3n-value";
        for (tokens, expected) in [
            (
                format!("billing {secret} extra"),
                "line 1: expected `NAME TOKEN`",
            ),
            ("billing short".to_owned(), "at least 16"),
            (
                format!("billing {secret}\nwallboard {secret}"),
                "line 2: this token appears on line 1 too",
            ),
        ] {
            let (directory, problems, _) = directory(&tokens);
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(problems[0].contains(expected), "{problems:?}");
            assert!(
                !problems[0].contains(secret) && !problems[0].contains("short"),
                "{problems:?}"
            );
            assert_eq!(directory.tokens(), 0, "a bad line grants nothing");
        }
        let many_bad = "x\n".repeat(25);
        let (_, problems) = parse_tokens(many_bad.as_bytes());
        assert_eq!(problems.len(), REPORTED_PROBLEMS + 1);
        assert!(problems[REPORTED_PROBLEMS].contains("15 more lines"));
    }

    #[test]
    fn bad_callers_files_are_refused_naming_the_entry() {
        for (callers, expected) in [
            ("[[caller]]\nname = \"a b\"\nagents = []\nverbs = []", "caller name \"a b\""),
            ("[[caller]]\nname = \"a\"\nagents = [\"9-1\"]\nverbs = []", "ends before it starts"),
            ("[[caller]]\nname = \"a\"\nagents = []\nverbs = []\n[[caller]]\nname = \"a\"\nagents = []\nverbs = []", "appears twice"),
            ("[[caller]]\nname = \"a\"\nagents = []\nverbs = []\ncertificate_names = [\"dns:x\"]\n[[caller]]\nname = \"b\"\nagents = []\nverbs = []\ncertificate_names = [\"DNS:X\"]", "\"dns:x\" is claimed by both"),
            ("[[caller]]\nname = \"a\"\nagent = []\nverbs = []", "callers file:"),
            ("[[caller]]\nname = \"billing\"\nagents = []\nverbs = []\ncertificate_names = [\"billing.prod.svc\"]", "caller \"billing\": certificate name \"billing.prod.svc\" has no type: write \"dns:billing.prod.svc\""),
        ] {
            let error = Roster::parse(callers).unwrap_err();
            assert!(error.contains(expected), "{error}");
        }
    }

    fn token_line() -> impl Strategy<Value = String> {
        prop_oneof![
            // Well formed, of a known caller or not.
            ("(billing|wallboard|nobody)", "[!-~]{16,40}").prop_map(|(n, t)| format!("{n} {t}")),
            // Short tokens, extra fields, comments, blanks, spaces.
            ("[a-z]{1,8}", "[!-~]{0,15}").prop_map(|(n, t)| format!("{n} {t}")),
            "[ -~]{0,60}",
            "#[ -~]{0,20}",
            Just(String::new()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any bytes: no panic; every line is used, skipped or reported, and the report is
        /// bounded whatever the size of the file.
        #[test]
        fn any_tokens_file_parses_into_lines_and_bounded_problems(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096)
        ) {
            let (lines, problems) = parse_tokens(&bytes);
            let line_count = bytes.split(|&b| b == b'\n').count();
            prop_assert!(lines.len() <= line_count);
            prop_assert!(problems.len() <= REPORTED_PROBLEMS + 1);
        }

        /// Files of plausible lines: every well-formed line of a known caller with a token
        /// seen once identifies its caller; no message ever holds a token.
        #[test]
        fn token_lines_apply_exactly_when_valid_and_messages_hold_no_token(
            written in proptest::collection::vec(token_line(), 0..40)
        ) {
            let file = written.join("\n");
            let (directory, problems, dropped) = directory(&file);
            let mut valid = Vec::new();
            for line in &written {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if let [name, token] = fields[..] {
                    if !name.starts_with('#')
                        && token.len() >= MIN_TOKEN_LEN
                        && token.bytes().all(|b| b.is_ascii_graphic())
                    {
                        valid.push((name, token));
                    }
                }
            }
            for &(name, token) in &valid {
                let once = valid.iter().filter(|(_, t)| *t == token).count() == 1;
                let known = ["billing", "wallboard"].contains(&name);
                let found = directory.by_token(token).map(Caller::name);
                prop_assert_eq!(found, (once && known).then_some(name), "{}", line_of(&written, token));
                for message in problems.iter().chain(&dropped) {
                    prop_assert!(!message.contains(token), "{}", message);
                }
            }
        }

        /// Any text as a callers file: no panic; a roster or an error naming the callers file.
        #[test]
        fn any_callers_file_parses_or_says_why_not(text in "[ -~\n]{0,512}") {
            if let Err(error) = Roster::parse(&text) {
                prop_assert!(error.starts_with("callers file"), "{}", error);
            }
        }

        /// Callers files built from plausible pieces: each parses, or is refused naming the
        /// callers file; every typed certificate name of a parsed file identifies its caller.
        #[test]
        fn structured_callers_files_parse_or_say_why_not(
            entries in proptest::collection::vec(
                ("[a-c]{1,2}", "(\\*|[0-9]{1,3}|[0-9]{1,3}-[0-9]{1,3}|x)", "(release|watch|handover|hangup)", "(dns|uri|cn|DNS|)[:]?[a-c.]{0,4}"),
                0..6,
            )
        ) {
            let text: String = entries
                .iter()
                .map(|(name, agents, verb, cert)| format!(
                    "[[caller]]\nname = {name:?}\nagents = [{agents:?}]\nverbs = [{verb:?}]\ncertificate_names = [{cert:?}]\n"
                ))
                .collect();
            match Roster::parse(&text) {
                Ok(roster) => {
                    for (name, _, _, cert) in &entries {
                        let typed = CertificateName::parse(cert).unwrap();
                        let (directory, _) = Directory::join(Arc::new(Roster::parse(&text).unwrap()), &[]);
                        prop_assert_eq!(directory.by_certificate(&[typed])[0].name(), name.as_str());
                        prop_assert!(roster.by_name.contains_key(name));
                    }
                }
                Err(error) => prop_assert!(error.starts_with("callers file"), "{}", error),
            }
        }
    }

    fn line_of<'a>(written: &'a [String], token: &str) -> &'a str {
        written
            .iter()
            .find(|l| l.contains(token))
            .map_or("", String::as_str)
    }
}
