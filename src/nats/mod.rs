//! Replication on NATS JetStream (`--nats-url`): the NATS implementations of the narrow traits
//! the other rooms define for what replicas share (sessions, poll ownership, the release event
//! log, request ids). Knows NATS; the rooms do not know it is there. Everything this room
//! writes is named by agent ids, shard numbers, replica ids and hashes: never a Guid, cookie or
//! token, which appear only in the values of the sessions bucket (so NATS must be reached over
//! TLS and access controlled, as docs/replicas.md says; the event stream's values hold customer
//! numbers too).
mod event_log;
mod ownership;
mod request_ids;
pub(crate) mod sessions;

pub(crate) use event_log::StreamLog;

use std::{path::PathBuf, sync::Arc, time::Duration};

use async_nats::jetstream::{self, kv, stream};

use crate::{
    lifecycle::Lifecycle,
    sessions::SessionLimits,
    shared_state::{self, SharedState},
};

pub use crate::events::{desired_owner, shard_of, SHARDS};
pub(crate) use ownership::NatsOwnership;
pub(crate) use request_ids::NatsRequestIds;
pub use request_ids::CLAIM_OUTLIVES_REQUEST;

/// How long connecting (and each JetStream request) may take.
const NATS_TIMEOUT: Duration = Duration::from_secs(5);
/// The first connection is tried again after this long, doubling with each failure...
const FIRST_RETRY: Duration = Duration::from_millis(250);
/// ...up to this long.
const MAX_RETRY: Duration = Duration::from_secs(10);

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
    #[error("NATS JetStream: {what}: its settings differ from the configured ones: {detail}")]
    Settings { what: String, detail: String },
}

impl NatsError {
    pub(crate) fn jetstream(what: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Self::JetStream {
            what: what.into(),
            detail: detail.to_string(),
        }
    }
}

/// What this replica keeps in NATS beside the lease settings: the event stream's retention
/// and the request_ids' window and capacity.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub(crate) events: crate::events::EventSettings,
    pub(crate) idempotency_window: Duration,
    pub(crate) idempotency_capacity: usize,
}

/// The state the replicas share, kept in NATS as `settings` and `layout` say: connects (waiting
/// for NATS as [`Cluster::connect_retrying`] does), then opens the sessions bucket (sessions
/// within `session_limits`), the poll leases, the event stream and the request_ids bucket.
pub(crate) async fn shared_state(
    settings: NatsSettings,
    layout: &Layout,
    session_limits: SessionLimits,
    lifecycle: &Lifecycle,
) -> Result<SharedState, NatsError> {
    let cluster = Cluster::connect_retrying(settings, layout).await?;
    let sessions = sessions::shared_registry(&cluster, session_limits, lifecycle).await?;
    let shutdown = lifecycle.shutdown().child_token();
    let ownership = NatsOwnership::start(&cluster, shutdown, lifecycle.tasks()).await?;
    let log = StreamLog::open(&cluster, &layout.events, lifecycle.shutdown().clone()).await?;
    let request_ids = NatsRequestIds::open(
        &cluster,
        layout.idempotency_window,
        layout.idempotency_capacity,
    )
    .await?;
    Ok(SharedState::new(
        sessions,
        ownership,
        Arc::new(log),
        Arc::new(request_ids),
        Arc::new(cluster),
    ))
}

/// A bucket as this replica wants it: `<prefix>-<what>`, made with `config`, holding at most
/// `max_messages` entries when given.
pub(crate) struct Bucket {
    pub(crate) what: &'static str,
    pub(crate) config: kv::Config,
    pub(crate) max_messages: Option<i64>,
}

/// The shared state is within reach while the client is connected.
impl shared_state::Link for Cluster {
    fn reachable(&self) -> bool {
        self.is_connected()
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
    /// [`connect`](Self::connect)s and makes the buckets and the stream as `layout` says
    /// ([`prepare`](Self::prepare)) until both succeed, waiting a capped,
    /// jittered, doubling pause after each failure (logged), forever: a replica started before
    /// NATS (or while it elects its leader) waits, alive and not ready, instead of exiting into
    /// a restart loop; `ccgw_nats_connected` and readiness tell an operator it waits. A
    /// credentials file that cannot be read, or settings JetStream will not change, end it (no
    /// wait mends them).
    pub(crate) async fn connect_retrying(
        settings: NatsSettings,
        layout: &Layout,
    ) -> Result<Self, NatsError> {
        for attempt in 0u32.. {
            let error = match Self::connect(settings.clone()).await {
                Ok(cluster) => match cluster.prepare(layout).await {
                    Ok(()) => return Ok(cluster),
                    Err(error @ NatsError::Settings { .. }) => return Err(error),
                    Err(error) => error,
                },
                Err(error @ NatsError::Creds { .. }) => return Err(error),
                Err(error) => error,
            };
            let pause = retry_pause(attempt);
            tracing::warn!(%error, attempt = attempt + 1, retry_in = ?pause, "NATS cannot be used yet; trying again (not ready meanwhile)");
            tokio::time::sleep(pause).await;
        }
        unreachable!("the attempts never run out")
    }

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

    /// Makes every bucket and the stream (or brings them to the configured settings), so that
    /// what follows only opens them.
    async fn prepare(&self, layout: &Layout) -> Result<(), NatsError> {
        let window = layout.idempotency_window;
        let buckets = ownership::buckets(&self.settings).into_iter().chain([
            sessions::bucket(),
            request_ids::bucket(window, layout.idempotency_capacity),
        ]);
        for bucket in buckets {
            self.key_value(bucket).await?;
        }
        self.stream(event_log::stream_config(self, &layout.events))
            .await?;
        Ok(())
    }

    /// The bucket `<prefix>-<what>`, created as `bucket` says (name, replicas filled in) when
    /// missing; an existing bucket whose settings differ is brought to these (see
    /// [`reconcile`](Self::reconcile)).
    pub(crate) async fn key_value(&self, bucket: Bucket) -> Result<kv::Store, NatsError> {
        let Bucket {
            what,
            config,
            max_messages,
        } = bucket;
        let bucket = self.name(what);
        let config = kv::Config {
            bucket: bucket.clone(),
            num_replicas: self.settings.replicas,
            ..config
        };
        let store = match self.jetstream.get_key_value(&bucket).await {
            Ok(store) => store,
            Err(_) => match self.jetstream.create_key_value(config.clone()).await {
                Ok(store) => store,
                // Replicas starting together race to create it: one that lost finds the
                // winner's.
                Err(error) => self
                    .jetstream
                    .get_key_value(&bucket)
                    .await
                    .map_err(|_| NatsError::jetstream(format!("bucket {bucket}"), error))?,
            },
        };
        let wanted = stream::Config {
            num_replicas: config.num_replicas,
            storage: config.storage,
            max_age: config.max_age,
            // What JetStream keeps per key: the history (zero means one to a bucket).
            max_messages_per_subject: config.history.max(1),
            max_messages: max_messages.unwrap_or(-1),
            max_bytes: config.max_bytes,
            max_message_size: config.max_value_size,
            ..Default::default()
        };
        let mut stream = store.stream.clone();
        let found = stream
            .info()
            .await
            .map_err(|e| NatsError::jetstream(format!("bucket {bucket}"), e))?
            .config
            .clone();
        self.reconcile(&format!("bucket {bucket}"), &found, &wanted)
            .await?;
        Ok(store)
    }

    /// The stream `config` names, created when missing, brought to `config`'s settings when it
    /// exists with others; with its information as found.
    pub(crate) async fn stream(
        &self,
        config: stream::Config,
    ) -> Result<(stream::Stream, stream::Info), NatsError> {
        let what = format!("stream {}", config.name);
        let failed = |e: &dyn std::fmt::Display| NatsError::jetstream(what.clone(), e);
        let mut stream = self
            .jetstream
            .get_or_create_stream(config.clone())
            .await
            .map_err(|e| failed(&e))?;
        let info = stream.info().await.map_err(|e| failed(&e))?.clone();
        self.reconcile(&what, &info.config, &config).await?;
        Ok((stream, info))
    }

    /// Brings the stream configured `found` (a bucket's, or the event stream) to the settings
    /// of `wanted` this service chooses, when they differ and JetStream allows the change;
    /// refuses (naming each setting, the value found and the value wanted) when it does not.
    /// An existing stream made by another version or by hand would otherwise keep limits
    /// nobody chose (a history that keeps stale sessions, a max age that drops leases).
    async fn reconcile(
        &self,
        what: &str,
        found: &stream::Config,
        wanted: &stream::Config,
    ) -> Result<(), NatsError> {
        let differences = differences(found, wanted);
        if differences.is_empty() {
            return Ok(());
        }
        let listed = differences
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        if differences.iter().any(|d| d.setting == STORAGE) {
            return Err(NatsError::Settings {
                what: what.to_owned(),
                detail: format!(
                    "{listed}: JetStream cannot change the storage of an existing stream \
                     (delete it, or give this install another --nats-prefix)"
                ),
            });
        }
        let update = stream::Config {
            num_replicas: wanted.num_replicas,
            max_age: wanted.max_age,
            max_messages_per_subject: wanted.max_messages_per_subject,
            max_messages: wanted.max_messages,
            max_bytes: wanted.max_bytes,
            max_message_size: wanted.max_message_size,
            duplicate_window: if wanted.duplicate_window.is_zero() {
                found.duplicate_window
            } else {
                wanted.duplicate_window
            },
            ..found.clone()
        };
        match self.jetstream.update_stream(update).await {
            Ok(_) => {
                tracing::info!(stream = %what, changed = %listed, "brought NATS settings to the configured ones");
                Ok(())
            }
            Err(error) => Err(NatsError::Settings {
                what: what.to_owned(),
                detail: format!("{listed}; NATS refused to change them: {error}"),
            }),
        }
    }
}

/// The JetStream API error code behind a client error, if the server answered with one.
fn jetstream_error_code(error: &(dyn std::error::Error + 'static)) -> Option<jetstream::ErrorCode> {
    let mut source = Some(error);
    while let Some(error) = source {
        if let Some(jetstream) = error.downcast_ref::<jetstream::Error>() {
            return Some(jetstream.error_code());
        }
        source = error.source();
    }
    None
}

/// The pause after the `attempt`th failure (from 0): [`FIRST_RETRY`] doubling up to
/// [`MAX_RETRY`], of which a random half (so that replicas started together spread out).
fn retry_pause(attempt: u32) -> Duration {
    let ceiling = FIRST_RETRY
        .saturating_mul(1 << attempt.min(16))
        .min(MAX_RETRY);
    ceiling / 2 + ceiling.mul_f64(rand::random::<f64>() / 2.0)
}

const STORAGE: &str = "storage";

/// One setting of a stream that differs from what this service wants.
#[derive(Debug, PartialEq, Eq)]
struct Difference {
    setting: &'static str,
    found: String,
    wanted: String,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            setting,
            found,
            wanted,
        } = self;
        write!(f, "{setting} is {found}, wanted {wanted}")
    }
}

/// The settings this service chooses that differ between `found` and `wanted`, each as
/// JetStream means it (zero or a negative number is no limit).
fn differences(found: &stream::Config, wanted: &stream::Config) -> Vec<Difference> {
    let limit = |n: i64| {
        if n > 0 {
            n.to_string()
        } else {
            "unlimited".to_owned()
        }
    };
    let age = |d: Duration| {
        if d.is_zero() {
            "unlimited".to_owned()
        } else {
            format!("{d:?}")
        }
    };
    let mut settings = vec![
        (
            "replicas",
            found.num_replicas.max(1).to_string(),
            wanted.num_replicas.max(1).to_string(),
        ),
        (
            STORAGE,
            format!("{:?}", found.storage),
            format!("{:?}", wanted.storage),
        ),
        ("max age", age(found.max_age), age(wanted.max_age)),
        (
            "history (messages per subject)",
            limit(found.max_messages_per_subject),
            limit(wanted.max_messages_per_subject),
        ),
        (
            "max messages",
            limit(found.max_messages),
            limit(wanted.max_messages),
        ),
        ("max bytes", limit(found.max_bytes), limit(wanted.max_bytes)),
        (
            "max message size",
            limit(found.max_message_size.into()),
            limit(wanted.max_message_size.into()),
        ),
    ];
    // JetStream picks a duplicate window when none is asked for.
    if !wanted.duplicate_window.is_zero() {
        settings.push((
            "duplicate window",
            age(found.duplicate_window),
            age(wanted.duplicate_window),
        ));
    }
    settings
        .into_iter()
        .filter(|(_, found, wanted)| found != wanted)
        .map(|(setting, found, wanted)| Difference {
            setting,
            found,
            wanted,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use async_nats::jetstream::stream::StorageType;

    use super::*;

    /// Each pause is half its ceiling at least and the ceiling at most: 250 ms doubling, 10 s
    /// at most, however many attempts failed.
    #[test]
    fn retry_pauses_double_up_to_their_cap_with_jitter() {
        for (attempt, ceiling_ms) in [(0, 250), (1, 500), (2, 1000), (5, 8000), (6, 10_000)] {
            let ceiling = Duration::from_millis(ceiling_ms);
            for _ in 0..100 {
                let pause = retry_pause(attempt);
                assert!(
                    ceiling / 2 <= pause && pause <= ceiling,
                    "{attempt}: {pause:?}"
                );
            }
        }
        assert!(retry_pause(u32::MAX) <= MAX_RETRY);
    }

    /// Limits JetStream writes as zero or -1 read alike; what differs is named with both values.
    #[test]
    fn differences_name_the_setting_and_both_values() {
        let wanted = stream::Config {
            num_replicas: 3,
            max_age: Duration::from_secs(60),
            max_messages_per_subject: 1,
            max_messages: 0,
            duplicate_window: Duration::from_secs(30),
            ..Default::default()
        };
        let found = stream::Config {
            num_replicas: 1,
            max_age: Duration::from_secs(60),
            max_messages_per_subject: 5,
            max_messages: -1,
            max_bytes: -1,
            max_message_size: -1,
            storage: StorageType::Memory,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        let listed: Vec<String> = differences(&found, &wanted)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            listed,
            [
                "replicas is 1, wanted 3",
                "storage is Memory, wanted File",
                "history (messages per subject) is 5, wanted 1",
                "duplicate window is 120s, wanted 30s",
            ]
        );
        assert!(differences(&wanted, &wanted).is_empty());
    }
}
