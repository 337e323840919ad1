//! Replication: the NATS servers the replicas share state through, and the poll leases.
use std::{path::PathBuf, time::Duration};

use clap::Args;

use crate::nats::NatsSettings;

/// Flags of replication through NATS JetStream.
#[derive(Debug, Clone, Args)]
pub(crate) struct NatsFlags {
    /// NATS server(s) with JetStream, e.g. `tls://nats-0.nats:4222,tls://nats-1.nats:4222`:
    /// switches replication on. Every replica of one install shares agents' sessions, the poll
    /// ownership, the release event log and request_ids through it (see docs/replicas.md).
    /// Without it the process keeps everything in memory and must run alone.
    #[arg(long, env = "CCGW_NATS_URL")]
    pub(crate) nats_url: Option<String>,

    /// NATS credentials file (a user JWT and its NKey seed, `nsc generate creds`).
    #[arg(long, env = "CCGW_NATS_CREDS", requires = "nats_url")]
    pub(crate) nats_creds: Option<PathBuf>,

    /// PEM CA certificate(s) the NATS servers' certificates are verified with (system roots
    /// otherwise); also turns TLS on for `nats://` URLs.
    #[arg(long, env = "CCGW_NATS_TLS_CA", requires = "nats_url")]
    pub(crate) nats_tls_ca: Option<PathBuf>,

    /// PEM client certificate presented to NATS servers that require one (needs
    /// --nats-tls-key).
    #[arg(long, env = "CCGW_NATS_TLS_CERT", requires_all = ["nats_url", "nats_tls_key"])]
    pub(crate) nats_tls_cert: Option<PathBuf>,

    /// PEM private key of --nats-tls-cert.
    #[arg(long, env = "CCGW_NATS_TLS_KEY", requires_all = ["nats_url", "nats_tls_cert"])]
    pub(crate) nats_tls_key: Option<PathBuf>,

    /// Prefix of the NATS buckets, stream and subjects this install uses, so that two installs
    /// can share one NATS.
    #[arg(long, env = "CCGW_NATS_PREFIX", default_value = "ccgw", value_parser = nats_prefix)]
    pub(crate) nats_prefix: String,

    /// Copies JetStream keeps of each bucket and of the event stream (the NATS cluster's
    /// size, at most 5); 3 survives the loss of one NATS server.
    #[arg(long, env = "CCGW_NATS_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=5))]
    pub(crate) nats_replicas: u8,

    /// A replica that holds a shard's poll lease renews it this often, in seconds.
    #[arg(long, env = "CCGW_LEASE_RENEW_SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=600))]
    pub(crate) lease_renew_secs: u64,

    /// A shard's poll lease not renewed for this long (on the taker's own clock) may be taken
    /// over by another replica, in seconds. Must exceed --poll-timeout-ms plus
    /// --lease-renew-secs plus a 2 s margin: a replica stops starting polls once its last
    /// renewal is older than this minus the margin and the poll timeout, so a paused or cut-off
    /// replica's polls have ended before another takes over.
    #[arg(long, env = "CCGW_LEASE_TTL_SECS", default_value_t = 45,
          value_parser = clap::value_parser!(u64).range(3..=3_600))]
    pub(crate) lease_ttl_secs: u64,

    /// While NATS is unreachable, ReleaseCall still sends releases with the sessions this
    /// replica last knew (a session rotated meanwhile on another replica is refused by the
    /// gateway, which changes nothing). Without it such a ReleaseCall answers UNAVAILABLE
    /// with nothing sent.
    #[arg(long, env = "CCGW_RELEASE_WITHOUT_NATS", requires = "nats_url")]
    pub(crate) release_without_nats: bool,
}

/// How long before its lease could be taken over a replica stops starting polls: covers the
/// clock drift between replicas over one TTL and the time a poll takes to leave.
pub(super) const LEASE_MARGIN_SECS: u64 = 2;

/// A prefix NATS accepts in bucket, stream and subject names alike.
fn nats_prefix(raw: &str) -> Result<String, String> {
    let ok = !raw.is_empty()
        && raw.len() <= 32
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(raw.to_owned())
    } else {
        Err("1 to 32 of A-Z, a-z, 0-9, '-' and '_'".to_owned())
    }
}

/// Whether the server address `server` (`[scheme://][user[:password]@]host[:port]`) names a user.
fn holds_user_info(server: &str) -> bool {
    let server = server.trim();
    let authority = server.split_once("://").map_or(server, |(_, rest)| rest);
    authority
        .split('/')
        .next()
        .unwrap_or_default()
        .contains('@')
}

impl NatsFlags {
    /// Whether one of the `--nats-url` servers names a user (or a password).
    pub(super) fn url_holds_user_info(&self) -> bool {
        self.nats_url
            .as_deref()
            .is_some_and(|urls| urls.split(',').any(holds_user_info))
    }

    /// How replicas share state, when `--nats-url` is given; a poll runs up to `poll_timeout`.
    pub(super) fn settings(&self, poll_timeout: Duration) -> Option<NatsSettings> {
        Some(NatsSettings {
            url: self.nats_url.clone()?,
            creds: self.nats_creds.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_client: self.nats_tls_cert.clone().zip(self.nats_tls_key.clone()),
            prefix: self.nats_prefix.clone(),
            replicas: usize::from(self.nats_replicas),
            lease_renew: Duration::from_secs(self.lease_renew_secs),
            lease_ttl: Duration::from_secs(self.lease_ttl_secs),
            lease_margin: Duration::from_secs(LEASE_MARGIN_SECS),
            poll_timeout,
            release_without_nats: self.release_without_nats,
        })
    }
}
