//! Who is calling and what it may do: callers identified by a bearer token or a client
//! certificate's names, each granted agent id ranges and verbs (`grant`); the files that say
//! so, reloaded when they change ([`Callers`]); and the WatchReleaseEvents streams each caller
//! holds open (`StreamSlots`), which a reload that takes a caller's access away ends. Knows
//! nothing of gRPC: `api` turns its answers into statuses.
mod certificate;
mod directory;
mod grant;
mod streams;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
};

pub use certificate::{certificate_names, CertificateName};
pub use grant::{AgentRange, Denied, Grant, Verb};
pub(crate) use streams::{Revoked, StreamSlot, StreamSlots};

use self::directory::{parse_tokens, Directory, Roster, TokenDigest, TokenLine};
use crate::{
    domain::AgentId,
    lock,
    reload::{self, utf8, WatchedFiles},
};

/// A caller the service knows, with what it is granted. Cheap to clone. The request's
/// extensions carry the one that made the request, with the credential that identified it.
#[derive(Debug, Clone)]
pub struct Caller {
    name: Arc<str>,
    grant: Arc<Grant>,
    /// What identified the caller (None for [`Caller::anyone`]): a reload checks an open
    /// stream's caller by it again.
    identified_by: Option<Identification>,
}

/// The credential that identified a caller, as kept after the request (no token: its digest).
#[derive(Debug, Clone)]
enum Identification {
    Token(TokenDigest),
    Certificate(Arc<[CertificateName]>),
}

impl Caller {
    pub(crate) fn new(name: &str, grant: Grant) -> Self {
        Self {
            name: name.into(),
            grant: Arc::new(grant),
            identified_by: None,
        }
    }

    /// Every caller when caller authorization is off: one caller, allowed everything, so one
    /// request_id namespace and one stream budget.
    pub(crate) fn anyone() -> Self {
        // Made once: every request of a service without caller authorization gets a clone.
        static ANYONE: std::sync::OnceLock<Caller> = std::sync::OnceLock::new();
        ANYONE
            .get_or_init(|| Self::new("", Grant::everything()))
            .clone()
    }

    fn identified_by(&self, identification: Identification) -> Self {
        Self {
            identified_by: Some(identification),
            ..self.clone()
        }
    }

    /// The name from the callers file (empty for `Caller::anyone`).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn shared_name(&self) -> Arc<str> {
        self.name.clone()
    }

    /// Whether the caller may use all of `verbs` on all of `agents`.
    pub fn allows(&self, verbs: &[Verb], agents: &[AgentId]) -> Result<(), Denied> {
        self.grant.allows(verbs, agents)
    }
}

/// What the server learned about a TLS connection's client; it is in the extensions of every
/// request that came over TLS.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub remote_addr: Option<SocketAddr>,
    /// The names that identify the client by its certificate: DNS and URI SANs, or the
    /// subject CN of a certificate without SANs (empty without a client certificate).
    pub certificate_names: Arc<[CertificateName]>,
}

/// Why a request's credentials identify nobody.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unauthenticated {
    #[error("no credentials: send `authorization: Bearer <token>` metadata, or a client certificate the callers file names")]
    Missing,
    #[error("the authorization metadata is not `Bearer <token>`")]
    Malformed,
    #[error("the bearer token is not one of the tokens file")]
    UnknownToken,
    #[error(
        "the client certificate's names (DNS and URI SANs; the subject CN only without SANs) are not in the callers file"
    )]
    UnknownCertificate,
    #[error("the client certificate's names belong to more than one caller")]
    AmbiguousCertificate,
    #[error("the credential now identifies another caller of the callers file")]
    OtherCaller,
}

/// The credential a request presents.
pub enum Credential<'a> {
    /// The value of `authorization` metadata (`Bearer <token>`, or not).
    Authorization(&'a str),
    Certificate(&'a Peer),
    None,
}

/// The two files, as `ccgw_caller_files_*` metrics label them.
#[derive(Debug, Clone, Copy)]
enum CallerFile {
    Callers,
    Tokens,
}

impl CallerFile {
    const ALL: [Self; 2] = [Self::Callers, Self::Tokens];

    fn label(self) -> &'static str {
        match self {
            Self::Callers => "callers",
            Self::Tokens => "tokens",
        }
    }
}

/// A ConfigMap or a Secret holds at most 1 MiB: a bigger file is not what Kubernetes mounted.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// The callers and tokens files, reloaded by [`Callers::reload`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Callers {
    current: Arc<RwLock<Arc<Directory>>>,
    files: Arc<Mutex<Files>>,
    stats: Arc<ReloadStats>,
    /// The open streams a reload checks again (set by the API that opens them).
    streams: Option<StreamSlots>,
}

/// The files and what of them is in force: the callers file is applied whole or not at all;
/// the tokens file line by line against the callers in force.
#[derive(Debug)]
struct Files {
    callers: WatchedFiles,
    tokens: Option<WatchedFiles>,
    roster: Arc<Roster>,
    token_lines: Vec<TokenLine>,
    /// What was wrong with the tokens file when it was last read (already logged).
    token_problems: Vec<String>,
}

/// Per file: reloads that failed, and when its contents were last applied in full.
#[derive(Debug, Default)]
struct ReloadStats([reload::ReloadStats; 2]);

impl ReloadStats {
    fn failed(&self, file: CallerFile) {
        self.0[file as usize].failed();
    }

    fn loaded(&self, file: CallerFile) {
        self.0[file as usize].loaded();
    }
}

impl Callers {
    /// Loads `callers` (and `tokens`); an error says which file and line is wrong (never a
    /// token). A token line whose caller the callers file lacks is left out with a warning: a
    /// caller removed from the ConfigMap before its line left the Secret is revoked, not a
    /// reason to stop.
    pub fn load(callers: PathBuf, tokens: Option<PathBuf>) -> Result<Self, String> {
        let stats = Arc::new(ReloadStats::default());
        let mut callers = WatchedFiles::bounded(vec![callers], MAX_FILE_BYTES);
        let roster = Roster::parse(utf8(&read_first(&mut callers)?, "the callers file")?)?;
        stats.loaded(CallerFile::Callers);
        let mut token_lines = Vec::new();
        let tokens = match tokens {
            None => None,
            Some(path) => {
                let mut tokens = WatchedFiles::bounded(vec![path], MAX_FILE_BYTES);
                let (lines, problems) = parse_tokens(&read_first(&mut tokens)?);
                if !problems.is_empty() {
                    return Err(problems.join("; "));
                }
                stats.loaded(CallerFile::Tokens);
                token_lines = lines;
                Some(tokens)
            }
        };
        let roster = Arc::new(roster);
        let directory = joined(&roster, &token_lines);
        tracing::info!(
            callers = directory.callers(),
            tokens = directory.tokens(),
            "caller authorization on"
        );
        let files = Files {
            callers,
            tokens,
            roster,
            token_lines,
            token_problems: Vec::new(),
        };
        Ok(Self {
            current: Arc::new(RwLock::new(Arc::new(directory))),
            files: Arc::new(Mutex::new(files)),
            stats,
            streams: None,
        })
    }

    /// These callers, checking `streams` again at every reload that changes them.
    pub(crate) fn checking_streams(self, streams: StreamSlots) -> Self {
        Self {
            streams: Some(streams),
            ..self
        }
    }

    /// Re-reads the files and applies what can be applied: a new callers file if it is valid
    /// (else the callers in force stay, and a warning says why); the tokens file's valid lines
    /// of callers in force (a bad line is left out and named, never its token). Revocation
    /// never waits for the other file: a token whose caller left the callers file goes with it.
    /// Then every open stream whose caller or grant is gone ends.
    pub fn reload(&self) {
        let mut files = lock(&self.files);
        let callers_changed = match files.callers.read_if_changed() {
            Ok(None) => false,
            Ok(Some(contents)) => {
                match utf8(&contents[0], "the callers file").and_then(Roster::parse) {
                    Ok(roster) => {
                        files.roster = Arc::new(roster);
                        self.stats.loaded(CallerFile::Callers);
                        tracing::info!("the callers file changed: reloaded");
                        true
                    }
                    Err(error) => {
                        // Tried again at the next reload: counted and logged until fixed.
                        files.callers.forget();
                        self.stats.failed(CallerFile::Callers);
                        tracing::warn!(%error, "the callers file changed but cannot be used; the callers loaded before stay in force");
                        false
                    }
                }
            }
            Err(error) => {
                self.stats.failed(CallerFile::Callers);
                tracing::warn!(%error, "could not re-read the callers file; the callers loaded before stay in force");
                false
            }
        };
        let tokens_changed = match files.tokens.as_mut().map(WatchedFiles::read_if_changed) {
            None | Some(Ok(None)) => false,
            Some(Ok(Some(contents))) => {
                let (lines, problems) = parse_tokens(&contents[0]);
                if problems.is_empty() {
                    self.stats.loaded(CallerFile::Tokens);
                    tracing::info!("the tokens file changed: reloaded");
                } else {
                    files.tokens.as_mut().map(WatchedFiles::forget);
                    self.stats.failed(CallerFile::Tokens);
                    // A file that keeps failing is read again at every reload: its lines are
                    // named again only when what is wrong with it changes.
                    if problems != files.token_problems {
                        for error in &problems {
                            tracing::warn!(%error, "the tokens file changed: this line is left out, the valid lines apply");
                        }
                    }
                }
                files.token_problems = problems;
                // The same lines make the same callers: nothing to rebuild or check again.
                let changed = lines != files.token_lines;
                files.token_lines = lines;
                changed
            }
            Some(Err(error)) => {
                self.stats.failed(CallerFile::Tokens);
                tracing::warn!(%error, "could not re-read the tokens file; the tokens loaded before stay in force");
                false
            }
        };
        if !(callers_changed || tokens_changed) {
            return;
        }
        let directory = Arc::new(joined(&files.roster, &files.token_lines));
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = directory.clone();
        drop(files);
        if let Some(streams) = &self.streams {
            streams.recheck(|caller| reidentify(&directory, caller));
        }
    }

    /// Who `credential` identifies. A token, when sent, decides (a wrong one is not made good
    /// by a certificate); else the client certificate.
    pub fn authenticate(&self, credential: Credential<'_>) -> Result<Caller, Unauthenticated> {
        let directory = self.current();
        match credential {
            Credential::Authorization(value) => {
                let token = bearer_token(value).ok_or(Unauthenticated::Malformed)?;
                let digest = directory::token_digest(token);
                identify(&directory, &Identification::Token(digest))
            }
            Credential::Certificate(peer) => identify(
                &directory,
                &Identification::Certificate(peer.certificate_names.clone()),
            ),
            Credential::None => Err(Unauthenticated::Missing),
        }
    }

    /// `caller` as the callers in force now know it (its grant may have changed), identified
    /// by the same credential; an error when that credential no longer identifies it.
    pub(crate) fn current_caller(&self, caller: &Caller) -> Result<Caller, Unauthenticated> {
        reidentify(&self.current(), caller)
    }

    /// Per file, reloads that failed: `(file, count)`.
    pub fn reload_failures(&self) -> Vec<(String, u64)> {
        self.per_file(|stats, i| stats.0[i].failures())
    }

    /// Per file, when its contents were last applied in full (Unix seconds).
    pub fn loaded_at(&self) -> Vec<(String, i64)> {
        self.per_file(|stats, i| stats.0[i].loaded_at())
    }

    fn per_file<T>(&self, read: impl Fn(&ReloadStats, usize) -> T) -> Vec<(String, T)> {
        let has_tokens = lock(&self.files).tokens.is_some();
        CallerFile::ALL
            .iter()
            .filter(|file| has_tokens || matches!(file, CallerFile::Callers))
            .map(|&file| (file.label().to_owned(), read(&self.stats, file as usize)))
            .collect()
    }

    fn current(&self) -> Arc<Directory> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The first read of a watched file.
fn read_first(file: &mut WatchedFiles) -> Result<Vec<u8>, String> {
    let mut contents = file
        .read_if_changed()?
        .expect("a first read returns contents");
    Ok(contents.swap_remove(0))
}

/// The directory of `roster` and `tokens`; each token line whose caller is gone is logged.
fn joined(roster: &Arc<Roster>, tokens: &[TokenLine]) -> Directory {
    let (directory, dropped) = Directory::join(roster.clone(), tokens);
    for warning in dropped {
        tracing::warn!(%warning, "a token line is left out");
    }
    directory
}

fn identify(
    directory: &Directory,
    identification: &Identification,
) -> Result<Caller, Unauthenticated> {
    let caller = match identification {
        Identification::Token(digest) => directory
            .by_digest(digest)
            .ok_or(Unauthenticated::UnknownToken)?,
        Identification::Certificate(names) => match directory.by_certificate(names)[..] {
            [caller] => caller,
            [] => return Err(Unauthenticated::UnknownCertificate),
            _ => return Err(Unauthenticated::AmbiguousCertificate),
        },
    };
    Ok(caller.identified_by(identification.clone()))
}

/// `caller` in `directory`, by the credential that identified it; [`Caller::anyone`] stays.
fn reidentify(directory: &Directory, caller: &Caller) -> Result<Caller, Unauthenticated> {
    let Some(identification) = &caller.identified_by else {
        return Ok(caller.clone());
    };
    let now = identify(directory, identification)?;
    if now.name() != caller.name() {
        return Err(Unauthenticated::OtherCaller);
    }
    Ok(now)
}

/// The token of `Bearer <token>` (the scheme in any case, as RFC 7235 says).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_from_the_authorization_value() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("abc"), None);
    }
}
