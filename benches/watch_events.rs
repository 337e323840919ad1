//! WatchReleaseEvents over loopback against the simulator: how fast a customer hang-up reaches
//! many watchers, how many events one agent's poll loop carries, and what a watcher costs.
//!
//! `cargo bench --bench watch_events [-- WATCHERS HANGUPS]`. Numbers go in BENCHMARKS.md.
use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use ccgw_callcontrol::{
    domain::AgentId,
    events::KindFilter,
    proto::{call_control_client::CallControlClient, watch_release_events_response::Item},
};
use hdrhistogram::Histogram;
use support::{common::watch_req, numbers_from_args, report, rss_kib, TestApp};
use tonic::transport::Channel;

mod support;

/// HTTP/2 streams per connection the facade allows is 256; stay under it.
const STREAMS_PER_CONNECTION: usize = 200;

#[tokio::main]
async fn main() {
    let [watchers, hangups] = numbers_from_args([1000, 200]);
    let bench = support::spawn(&[
        "--max-watchers",
        "100000",
        "--max-streams-per-caller",
        "100000",
    ])
    .await;
    for agent in ["1000", "1001", "1002"] {
        bench.sign_in(agent).await;
    }

    fan_out(&bench, 1, hangups).await;
    fan_out(&bench, watchers, hangups).await;
    one_agent_throughput(&bench, 1000).await;
    many_agents(&bench, watchers, hangups).await;
    memory(&bench).await;
}

/// `agents` agents with one stream each, so as many poll loops long-poll the simulator at
/// once: what an agent costs, and how fast a hang-up on one of them arrives meanwhile.
async fn many_agents(bench: &TestApp, agents: usize, hangups: usize) {
    let first = 2000;
    for n in 0..agents {
        bench.sign_in(&(first + n).to_string()).await;
    }
    let channels = connect(bench, agents.div_ceil(STREAMS_PER_CONNECTION)).await;
    let base = Instant::now();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, u64)>();
    let before = rss_kib();
    for n in 0..agents {
        let mut client = CallControlClient::new(channels[n / STREAMS_PER_CONNECTION].clone());
        let seen = seen_tx.clone();
        let mut stream = client
            .watch_release_events(watch_req(&[&(first + n).to_string()]))
            .await
            .unwrap()
            .into_inner();
        tokio::spawn(async move {
            while let Ok(Some(message)) = stream.message().await {
                if let Some(Item::Event(_)) = message.item {
                    let _ = seen.send((n, base.elapsed().as_micros() as u64));
                }
            }
        });
    }
    wait_for(|| {
        bench
            .sim
            .agent(&(first + agents - 1).to_string())
            .unwrap()
            .polls_in_flight
            == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let grown = rss_kib().saturating_sub(before);
    println!(
        "{agents} agents polled at once, one stream each: RSS +{grown} KiB (~{} KiB per agent: poll loop, gateway connection, feed, stream)",
        grown / agents as u64
    );

    let mut histogram = Histogram::<u64>::new(3).unwrap();
    let started = Instant::now();
    for round in 0..hangups {
        let n = round * 7919 % agents;
        let agent = (first + n).to_string();
        bench.sim.place_call(&agent, "70093").unwrap();
        wait_for(|| bench.sim.agent(&agent).unwrap().queued_events == 0).await;
        let hung_up_at = base.elapsed().as_micros() as u64;
        bench.sim.customer_hangup(&agent).unwrap();
        for _ in 0..2 {
            let (who, at) = tokio::time::timeout(Duration::from_secs(30), seen_rx.recv())
                .await
                .expect("the event arrives within 30 s")
                .unwrap();
            assert_eq!(who, n);
            histogram.record(at - hung_up_at).unwrap();
        }
    }
    println!("{hangups} hang-ups, each on one of {agents} polled agents");
    report(
        "hang-up -> its agent's watcher",
        &histogram,
        started.elapsed(),
    );
}

/// `watchers` streams on agent 1000; each hang-up's two release events must reach all of them
/// before the next. Latency: from the hang-up in the simulator to each delivery.
async fn fan_out(bench: &TestApp, watchers: usize, hangups: usize) {
    let base = Instant::now();
    let hung_up_at = Arc::new(AtomicU64::new(0));
    let delivered = Arc::new(AtomicU64::new(0));
    let channels = connect(bench, watchers.div_ceil(STREAMS_PER_CONNECTION)).await;
    let mut tasks = Vec::new();
    for n in 0..watchers {
        let mut client = CallControlClient::new(channels[n / STREAMS_PER_CONNECTION].clone());
        let (hung_up_at, delivered) = (hung_up_at.clone(), delivered.clone());
        tasks.push(tokio::spawn(async move {
            let mut stream = client
                .watch_release_events(watch_req(&["1000"]))
                .await
                .unwrap()
                .into_inner();
            let mut histogram = Histogram::<u64>::new(3).unwrap();
            while histogram.len() < 2 * hangups as u64 {
                let message = stream.message().await.unwrap().expect("stream open");
                if let Some(Item::Event(_)) = message.item {
                    let now = base.elapsed().as_micros() as u64;
                    histogram
                        .record(now.saturating_sub(hung_up_at.load(Ordering::SeqCst)))
                        .unwrap();
                    delivered.fetch_add(1, Ordering::SeqCst);
                }
            }
            histogram
        }));
    }
    wait_for(|| bench.api.events().watchers() >= watchers).await;
    let started = Instant::now();
    for round in 1..=hangups as u64 {
        bench.sim.place_call("1000", "70093").unwrap();
        // Hang up only once the poll loop is back in its long poll, as in production, where
        // talking takes longer than two polls.
        wait_for(|| bench.sim.agent("1000").unwrap().queued_events == 0).await;
        hung_up_at.store(base.elapsed().as_micros() as u64, Ordering::SeqCst);
        bench.sim.customer_hangup("1000").unwrap();
        wait_for(|| delivered.load(Ordering::SeqCst) >= 2 * watchers as u64 * round).await;
    }
    let wall = started.elapsed();
    let mut all = Histogram::<u64>::new(3).unwrap();
    for task in tasks {
        all.add(task.await.unwrap()).unwrap();
    }
    println!("{hangups} customer hang-ups (2 release events each) to {watchers} watchers of one agent; rate = deliveries");
    report("hang-up -> every watcher", &all, wall);
}

/// A burst queued at the gateway at once: how many events per second one poll loop carries
/// (one event per poll, as the gateway answers).
async fn one_agent_throughput(bench: &TestApp, calls: usize) {
    let mut client = CallControlClient::new(connect(bench, 1).await.remove(0));
    let mut stream = client
        .watch_release_events(watch_req(&["1001"]))
        .await
        .unwrap()
        .into_inner();
    let before = bench.api.events().stats();
    let started = Instant::now();
    for _ in 0..calls {
        bench.sim.place_call("1001", "70093").unwrap();
        bench.sim.customer_hangup("1001").unwrap();
    }
    let mut received = 0;
    while received < 2 * calls {
        let message = stream.message().await.unwrap().expect("stream open");
        received += usize::from(matches!(message.item, Some(Item::Event(_))));
    }
    let wall = started.elapsed();
    let after = bench.api.events().stats();
    let polled = (after.release_events + after.skipped_events)
        - (before.release_events + before.skipped_events);
    println!(
        "one agent, {calls} calls queued at once: {received} release events of {polled} polled in {wall:?} ({:.0} polled events/s)",
        polled as f64 / wall.as_secs_f64()
    );
}

/// RSS per watcher: hub subscriptions alone, then whole gRPC streams (this process holds both
/// the server and the client end). Nothing is freed in between, so that each figure is fresh
/// growth rather than reused memory.
async fn memory(bench: &TestApp) {
    let agent = AgentId::parse("a", "1002", 59_999).unwrap();
    let n = 10_000;
    let before = rss_kib();
    let held: Vec<_> = (0..n)
        .map(|_| {
            bench
                .api
                .events()
                .subscribe(&[agent], None, KindFilter::default(), None)
                .unwrap()
        })
        .collect();
    let grown = rss_kib().saturating_sub(before);
    println!(
        "{n} hub subscriptions: RSS +{grown} KiB (~{} bytes each)",
        grown * 1024 / n as u64
    );

    let n = 5_000;
    let channels = connect(bench, n / STREAMS_PER_CONNECTION).await;
    let open_before = bench.api.events().watchers();
    let before = rss_kib();
    let mut streams = Vec::new();
    for i in 0..n {
        let mut client = CallControlClient::new(channels[i / STREAMS_PER_CONNECTION].clone());
        streams.push(
            client
                .watch_release_events(watch_req(&["1002"]))
                .await
                .unwrap(),
        );
    }
    wait_for(|| bench.api.events().watchers() >= open_before + n).await;
    let grown = rss_kib().saturating_sub(before);
    println!(
        "{n} open gRPC streams (server and client side): RSS +{grown} KiB (~{} bytes each)",
        grown * 1024 / n as u64
    );
    drop(held);
}

async fn connect(bench: &TestApp, connections: usize) -> Vec<Channel> {
    let mut channels = Vec::new();
    for _ in 0..connections.max(1) {
        channels.push(
            Channel::from_shared(format!("http://{}", bench.grpc_addr))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    channels
}

/// Polls `done` every 100 µs, for at most 60 s. Not the tests' `wait_until`: its 10 ms tick
/// would be part of every round this waits out, and so of the rates measured.
async fn wait_for(done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "condition not met within 60 s");
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
}
