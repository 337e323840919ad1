//! Replication on NATS JetStream (`--nats-url`): the NATS implementations of the narrow traits
//! the other rooms define for what replicas share (sessions, poll ownership, the release event
//! log, request ids). Knows NATS; the rooms do not know it is there. Everything this room
//! writes is named by agent ids, shard numbers, replica ids and hashes: never a Guid, cookie or
//! token, which appear only in the values of the sessions bucket (so NATS must be reached over
//! TLS and access controlled, as the README says; the event stream's values hold customer
//! numbers too).
mod event_log;
mod ownership;
mod request_ids;
pub(crate) mod sessions;

pub(crate) use event_log::StreamLog;

use std::{path::PathBuf, sync::Arc, time::Duration};

use async_nats::jetstream::{self, kv};

pub(crate) use ownership::NatsOwnership;
pub use ownership::{desired_owner, shard_of, SHARDS};
pub(crate) use request_ids::NatsRequestIds;
pub use request_ids::CLAIM_OUTLIVES_REQUEST;

/// How long connecting (and each JetStream request) may take.
const NATS_TIMEOUT: Duration = Duration::from_secs(5);

/// How the replicas reach NATS and share state through it.
#[derive(Debug, Clone)]
pub struct NatsSettings {
    /// Comma-separated server URLs.
    pub url: String,
    pub creds: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key.
    pub tls_client: Option<(PathBuf, PathBuf)>,
    /// Of every bucket, stream and subject name.
    pub prefix: String,
    /// JetStream replicas of each bucket and of the stream.
    pub replicas: usize,
    /// How often a held shard lease is renewed.
    pub lease_renew: Duration,
    /// A lease not renewed for this long may be taken over.
    pub lease_ttl: Duration,
    /// Before the TTL runs out, a holder's polls have ended this early.
    pub lease_margin: Duration,
    /// The longest one poll runs: a holder stops starting polls this long before its margin.
    pub poll_timeout: Duration,
    /// ReleaseCall may use the last known sessions while NATS is unreachable.
    pub release_without_nats: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("--nats-creds {path}: {source}")]
    Creds {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot connect to NATS at --nats-url: {0}")]
    Connect(#[from] async_nats::ConnectError),
    #[error("NATS JetStream: {what}: {detail}")]
    JetStream { what: String, detail: String },
}

impl NatsError {
    pub(crate) fn jetstream(what: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Self::JetStream {
            what: what.into(),
            detail: detail.to_string(),
        }
    }
}

/// One replica's connection to NATS, and who it is among the replicas. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Cluster {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    settings: Arc<NatsSettings>,
    /// This replica's id among the replicas: random per process lifetime, so a restarted
    /// replica is a new member (what it held before must be taken over, not assumed).
    replica: Arc<str>,
}

impl Cluster {
    /// Connects (TLS and credentials as configured). The client reconnects by itself after;
    /// what depends on NATS reads [`is_connected`](Self::is_connected).
    pub async fn connect(settings: NatsSettings) -> Result<Self, NatsError> {
        crate::install_crypto_provider();
        let mut options = async_nats::ConnectOptions::new()
            .name("ccgw-callcontrol")
            .connection_timeout(NATS_TIMEOUT)
            .request_timeout(Some(NATS_TIMEOUT))
            // Unbounded reconnects: a replica outlives a NATS outage and resumes after it.
            .max_reconnects(None);
        if let Some(path) = &settings.creds {
            options = options
                .credentials_file(path)
                .await
                .map_err(|source| NatsError::Creds {
                    path: path.clone(),
                    source,
                })?;
        }
        if let Some(ca) = &settings.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((cert, key)) = &settings.tls_client {
            options = options
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        // Every server of a cluster, so the client fails over without learning them first.
        let servers: Vec<&str> = settings
            .url
            .split(',')
            .map(str::trim)
            .filter(|server| !server.is_empty())
            .collect();
        let client = options.connect(servers).await?;
        let mut jetstream = jetstream::new(client.clone());
        jetstream.set_timeout(NATS_TIMEOUT);
        let replica: Arc<str> = uuid::Uuid::new_v4().simple().to_string().into();
        tracing::info!(%replica, prefix = %settings.prefix, "connected to NATS: replicated mode");
        Ok(Self {
            client,
            jetstream,
            settings: Arc::new(settings),
            replica,
        })
    }

    pub(crate) fn settings(&self) -> &NatsSettings {
        &self.settings
    }

    pub(crate) fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// This replica's id (a key and subject token: lowercase hex).
    pub(crate) fn replica(&self) -> &str {
        &self.replica
    }

    /// `<prefix>-<what>`: the name of one of this install's buckets or streams.
    pub(crate) fn name(&self, what: &str) -> String {
        format!("{}-{what}", self.settings.prefix)
    }

    /// `<prefix>.<what>`: the root of one of this install's subjects.
    pub(crate) fn subject(&self, what: &str) -> String {
        format!("{}.{what}", self.settings.prefix)
    }

    /// Whether the client is connected to a NATS server right now.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The bucket `<prefix>-<what>`, created with `config` (name, replicas filled in) when
    /// missing; an existing bucket is used as it is.
    pub(crate) async fn key_value(
        &self,
        what: &str,
        config: kv::Config,
    ) -> Result<kv::Store, NatsError> {
        let bucket = self.name(what);
        if let Ok(store) = self.jetstream.get_key_value(&bucket).await {
            return Ok(store);
        }
        let created = self
            .jetstream
            .create_key_value(kv::Config {
                bucket: bucket.clone(),
                num_replicas: self.settings.replicas,
                ..config
            })
            .await;
        match created {
            Ok(store) => Ok(store),
            // Replicas starting together race to create it: one that lost finds the
            // winner's (whose limits may already differ from a fresh bucket's).
            Err(error) => self
                .jetstream
                .get_key_value(&bucket)
                .await
                .map_err(|_| NatsError::jetstream(format!("bucket {bucket}"), error)),
        }
    }
}
