//! Who is calling and what it may do: callers identified by a bearer token or a client
//! certificate's names, each granted agent id ranges and verbs (`grant`); the files that say
//! so, reloaded when they change ([`Callers`]); and how many event streams each caller may
//! hold open (`StreamSlots`). Knows nothing of gRPC: `api` turns its answers into statuses.
mod directory;
mod grant;
mod streams;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

pub use grant::{AgentRange, Denied, Grant, Verb};
pub(crate) use streams::{StreamSlot, StreamSlots};

use self::directory::Directory;
use crate::{
    domain::AgentId,
    reload::{utf8, Reloading},
};

/// A caller the service knows, with what it is granted. Cheap to clone. The request's
/// extensions carry the one that made the request.
#[derive(Debug, Clone)]
pub struct Caller {
    name: Arc<str>,
    grant: Arc<Grant>,
}

impl Caller {
    pub(crate) fn new(name: &str, grant: Grant) -> Self {
        Self {
            name: name.into(),
            grant: Arc::new(grant),
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
    /// The names that identify the client by its certificate: subject CN, DNS and URI SANs
    /// (empty without a client certificate).
    pub certificate_names: Arc<[String]>,
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
        "the client certificate's names (subject CN, DNS and URI SANs) are not in the callers file"
    )]
    UnknownCertificate,
    #[error("the client certificate's names belong to more than one caller")]
    AmbiguousCertificate,
}

/// The credential a request presents.
pub enum Credential<'a> {
    /// The value of `authorization` metadata (`Bearer <token>`, or not).
    Authorization(&'a str),
    Certificate(&'a Peer),
    None,
}

/// The callers and tokens files, reloaded by [`Callers::reload`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Callers(Reloading<Directory>);

impl Callers {
    /// Loads `callers` (and `tokens`); an error says which file and line is wrong (never a
    /// token).
    pub fn load(callers: PathBuf, tokens: Option<PathBuf>) -> Result<Self, String> {
        let paths = std::iter::once(callers).chain(tokens).collect();
        let files = Reloading::load("the callers and tokens files", paths, parse)?;
        let directory = files.current();
        tracing::info!(
            callers = directory.callers(),
            tokens = directory.tokens(),
            "caller authorization on"
        );
        Ok(Self(files))
    }

    /// Re-reads the files; swaps in their new contents if they changed and are valid, else
    /// keeps the callers it has and logs why.
    pub fn reload(&self) {
        self.0.reload();
    }

    /// Who `credential` identifies. A token, when sent, decides (a wrong one is not made good
    /// by a certificate); else the client certificate.
    pub fn authenticate(&self, credential: Credential<'_>) -> Result<Caller, Unauthenticated> {
        let directory = self.0.current();
        match credential {
            Credential::Authorization(value) => {
                let token = bearer_token(value).ok_or(Unauthenticated::Malformed)?;
                directory
                    .by_token(token)
                    .cloned()
                    .ok_or(Unauthenticated::UnknownToken)
            }
            Credential::Certificate(peer) => {
                match directory.by_certificate(&peer.certificate_names)[..] {
                    [caller] => Ok(caller.clone()),
                    [] => Err(Unauthenticated::UnknownCertificate),
                    _ => Err(Unauthenticated::AmbiguousCertificate),
                }
            }
            Credential::None => Err(Unauthenticated::Missing),
        }
    }
}

/// The callers file, then the tokens file if there is one.
fn parse(contents: &[Vec<u8>]) -> Result<Directory, String> {
    let callers = utf8(&contents[0], "the callers file")?;
    let tokens = contents
        .get(1)
        .map(|bytes| utf8(bytes, "the tokens file"))
        .transpose()?;
    Directory::parse(callers, tokens)
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
