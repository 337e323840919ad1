//! What an operator sizing a pod sees. The facade runs in its own process (this package's
//! release binary, as deployed), the simulator in a second, the floors of the ReleaseCall
//! comparison in others (this binary, re-run in a role) and this process is the load client.
//! The facade's RSS, CPU time and open file descriptors are read from /proc. Loopback only;
//! every wait is bounded.
//!
//! ```text
//! cargo bench --bench pod                                  # everything below, defaults
//! cargo bench --bench pod -- watch AGENTS STREAMS ROUNDS   # one row of the watch table
//! cargo bench --bench pod -- soak AGENTS STREAMS MINUTES WARM_UP_MINUTES   # idle RSS
//! cargo bench --bench pod -- release REQUESTS CONCURRENCY ROUNDS
//! ```
//! Numbers go in BENCHMARKS.md.
use std::{
    net::SocketAddr,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use ccgw_callcontrol::proto::{
    call_control_client::CallControlClient,
    call_control_server::{CallControl, CallControlServer},
    ReleaseCallRequest, ReleaseCallResponse, WatchReleaseEventsRequest, WatchReleaseEventsResponse,
};
use futures_util::{stream, StreamExt};
use hdrhistogram::Histogram;
use support::{
    common::{desktop_sign_in, handing_over, rss_kib_of, watch_req, Item},
    load, report,
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::mpsc,
    task::JoinHandle,
};
use tonic::transport::Channel;

mod support;

/// The facade allows 256 HTTP/2 streams per connection; the load client stays under it.
const STREAMS_PER_CONNECTION: usize = 200;
/// First agent id the watch runs sign in (agent ids are 101..999999 here).
const FIRST_AGENT: usize = 100_000;
/// How long the facade keeps polling an agent nobody watches any more. Short, so that a round
/// ends soon after its streams close; the behaviour is the default's.
const GRACE_SECS: u64 = 5;
/// Bound of every single wait (a process start, a delivery, a condition).
const WAIT: Duration = Duration::from_secs(120);

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let number = |i: usize, default: usize| {
        args.get(i)
            .map(|a| a.parse().expect("a number"))
            .unwrap_or(default)
    };
    match args.first().map(String::as_str) {
        Some("role-sim") => return role_sim().await,
        Some("role-floor") => return role_floor(Some(args[1].clone())).await,
        Some("role-bare") => return role_floor(None).await,
        _ => {}
    }
    ccgw_callcontrol::install_crypto_provider();
    match args.first().map(String::as_str) {
        Some("watch") => watch(number(1, 10_000), number(2, 3), number(3, 2)).await,
        Some("soak") => {
            soak(
                number(1, 10_000),
                number(2, 3),
                number(3, 10),
                number(4, 11),
            )
            .await
        }
        Some("release") => release(number(1, 20_000), number(2, 64), number(3, 3)).await,
        None => {
            for (agents, streams, rounds) in [(1000, 1, 1), (1000, 3, 1), (10_000, 1, 1)] {
                watch(agents, streams, rounds).await;
            }
            watch(10_000, 3, 2).await;
            release(20_000, 64, 3).await;
        }
        Some(other) => panic!("unknown command {other}: watch, soak or release"),
    }
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// A child process serving on `addr`, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id().expect("the process runs")
    }

    /// Resident memory, KiB.
    fn rss_kib(&self) -> u64 {
        rss_kib_of(&self.pid().to_string())
    }

    /// CPU time used so far, user and system, all threads.
    fn cpu(&self) -> Duration {
        support::cpu_of(self.pid())
    }

    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }
}

/// This binary again, in `role`; it prints the address it serves on as its first line.
async fn spawn_role(role: &[&str]) -> Server {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(role)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("the role serves in time")
        .unwrap()
        .expect("the role prints its address")
        .parse()
        .unwrap();
    Server { child, addr }
}

/// The facade's release binary on the simulator at `sim`, with the limits an operator sizing
/// a pod for many agents sets. Its warnings and errors are echoed here.
async fn spawn_facade(sim: SocketAddr) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ccgw-callcontrol"))
        .args([
            "--gateway-url",
            &format!("http://{sim}"),
            "--no-caller-auth",
        ])
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(["--max-watchers", "100000", "--max-agent-id", "999999"])
        .args(["--max-streams-per-caller", "100000"])
        .args(support::ONE_CALLER_GETS_ALL)
        .args(["--watch-grace-secs", &GRACE_SECS.to_string()])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut logs = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(WAIT, async {
        while let Some(line) = logs.next_line().await.unwrap() {
            let entry: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if entry["message"] == "serving gRPC" {
                return entry["listen"].as_str().unwrap().parse().unwrap();
            }
        }
        panic!("the facade exited before serving");
    })
    .await
    .expect("the facade serves in time");
    // The pipe must be read, or the facade blocks on a full one.
    tokio::spawn(async move {
        let mut echoed = 0;
        while let Ok(Some(line)) = logs.next_line().await {
            if echoed < 20 && (line.contains("\"WARN\"") || line.contains("\"ERROR\"")) {
                eprintln!("facade: {line}");
                echoed += 1;
            }
        }
    });
    Server { child, addr }
}

/// The simulator: a real gateway's 10 s long-poll wait, Guids rotating on poll answers every
/// 60 s, and no sign-out for missed polls (agents wait unpolled between the rounds).
async fn role_sim() {
    let sim = ccgw_sim::Simulator::new(ccgw_sim::SimConfig {
        signout_after: None,
        ..ccgw_sim::SimConfig::default()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", listener.local_addr().unwrap());
    sim.serve(listener, std::future::pending()).await.unwrap();
}

/// A ReleaseCall floor: with a gateway, a zero-logic facade (the tonic handler makes one
/// reqwest call with the handed-over Guid and answers the retcode); without, a bare tonic hop
/// that answers at once.
async fn role_floor(gateway: Option<String>) {
    ccgw_callcontrol::install_crypto_provider();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", listener.local_addr().unwrap());
    let floor = Floor {
        gateway,
        http: reqwest::Client::new(),
    };
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(CallControlServer::new(floor))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
        .unwrap();
}

struct Floor {
    gateway: Option<String>,
    http: reqwest::Client,
}

#[tonic::async_trait]
impl CallControl for Floor {
    async fn release_call(
        &self,
        request: tonic::Request<ReleaseCallRequest>,
    ) -> Result<tonic::Response<ReleaseCallResponse>, tonic::Status> {
        let Some(gateway) = &self.gateway else {
            return Ok(tonic::Response::new(ReleaseCallResponse::default()));
        };
        let guid = request.metadata().get("x-ccgw-guid").unwrap().clone();
        let request = request.into_inner();
        let answer = self
            .http
            .post(format!(
                "{gateway}/agentgateway/resource/voicecall/{}/dropcall/{}",
                request.agent_id, request.call_id
            ))
            .header("Guid", guid.to_str().unwrap())
            .send()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let envelope: serde_json::Value = answer
            .json()
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(tonic::Response::new(ReleaseCallResponse {
            retcode: envelope["retcode"].as_str().unwrap_or_default().to_owned(),
            ..Default::default()
        }))
    }

    type WatchReleaseEventsStream =
        futures_util::stream::Empty<Result<WatchReleaseEventsResponse, tonic::Status>>;

    async fn watch_release_events(
        &self,
        _: tonic::Request<WatchReleaseEventsRequest>,
    ) -> Result<tonic::Response<Self::WatchReleaseEventsStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("a floor only releases"))
    }
}

/// The simulator's REST and control API, as a desktop and a test operator use them.
#[derive(Clone)]
struct Sim {
    base: String,
    http: reqwest::Client,
}

impl Sim {
    fn new(addr: SocketAddr) -> Self {
        Self {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
        }
    }

    async fn control(&self, method: reqwest::Method, path: &str) -> serde_json::Value {
        let answer = self
            .http
            .request(method, format!("{}/sim{path}", self.base))
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success(), "{path}: {}", answer.status());
        answer.json().await.unwrap()
    }

    /// Waits until `polls` long polls wait at the simulator: every watched agent polled, or
    /// (0) none any more.
    async fn until_polls_in_flight(&self, polls: usize) {
        wait_for(
            "the polls in flight",
            Duration::from_millis(100),
            || async {
                let stats = self.control(reqwest::Method::GET, "/stats").await;
                stats["polls_in_flight"].as_u64() == Some(polls as u64)
            },
        )
        .await;
    }

    async fn queued_events(&self, agent: &str) -> u64 {
        let view = self
            .control(reqwest::Method::GET, &format!("/agents/{agent}"))
            .await;
        view["queued_events"].as_u64().unwrap()
    }
}

/// The simulator and the facade in processes of their own, with `agents` agents signed in at
/// the simulator as their desktops would (`ids[n]` holds the Guid `guids[n]`).
struct Pod {
    sim_server: Server,
    sim: Sim,
    facade: Server,
    ids: Vec<String>,
    guids: Vec<String>,
}

impl Pod {
    async fn start(agents: usize) -> Self {
        let sim_server = spawn_role(&["role-sim"]).await;
        let sim = Sim::new(sim_server.addr);
        let facade = spawn_facade(sim_server.addr).await;
        let ids: Vec<String> = (FIRST_AGENT..FIRST_AGENT + agents)
            .map(|n| n.to_string())
            .collect();
        let guids = stream::iter(
            ids.iter()
                .map(|id| async move { desktop_sign_in(sim_server.addr, id, false).await.guid }),
        )
        .buffered(32)
        .collect()
        .await;
        Self {
            sim_server,
            sim,
            facade,
            ids,
            guids,
        }
    }
}

/// Polls `done` every `every` until it holds; panics after [`WAIT`].
async fn wait_for<F: std::future::Future<Output = bool>>(
    what: &str,
    every: Duration,
    mut done: impl FnMut() -> F,
) {
    let deadline = Instant::now() + WAIT;
    while !done().await {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(every).await;
    }
}

// ---------------------------------------------------------------------------------------------
// WatchReleaseEvents: memory, idle CPU, delivery latency, memory return
// ---------------------------------------------------------------------------------------------

/// How long the idle CPU is measured: three long polls per agent and two heartbeats per stream.
const IDLE_WINDOW: Duration = Duration::from_secs(30);
/// Customer hang-ups per round, one at a time, each on one of the watched agents.
const HANGUPS: usize = 200;

/// `agents` agents with `per_agent` single-agent streams each (Guid handed over), `rounds`
/// times on one facade process: RSS before, open and after close, idle CPU, delivery latency.
async fn watch(agents: usize, per_agent: usize, rounds: usize) {
    let Pod {
        sim_server,
        sim,
        facade,
        ids,
        guids,
    } = Pod::start(agents).await;
    println!(
        "\n{agents} agents x {per_agent} streams each ({} streams), facade pid {}",
        agents * per_agent,
        facade.pid()
    );
    for round in 1..=rounds {
        let (before, fds_before) = (facade.rss_kib(), facade.open_fds());
        let (delivered, mut deliveries) = mpsc::unbounded_channel();
        let open = open_streams(facade.addr, &ids, &guids, per_agent, delivered).await;
        sim.until_polls_in_flight(agents).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (opened, fds) = (facade.rss_kib(), facade.open_fds());

        let (cpu, sim_cpu) = (facade.cpu(), sim_server.cpu());
        tokio::time::sleep(IDLE_WINDOW).await;
        let idle_cpu = (facade.cpu() - cpu).as_secs_f64() / IDLE_WINDOW.as_secs_f64();
        let sim_idle_cpu = (sim_server.cpu() - sim_cpu).as_secs_f64() / IDLE_WINDOW.as_secs_f64();
        let after_idle = facade.rss_kib();

        let latency = hang_ups(&sim, &ids, per_agent, &mut deliveries).await;

        open.close();
        sim.until_polls_in_flight(0).await;
        // Idle gateway connections close after the client pool's idle timeout (30 s).
        wait_for(
            "the gateway connections closed",
            Duration::from_millis(500),
            || {
                let fds = facade.open_fds();
                async move { fds <= fds_before + 8 }
            },
        )
        .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (closed, fds_closed) = (facade.rss_kib(), facade.open_fds());
        println!(
            "round {round}: RSS {} -> {} MiB open ({:.1} KiB per agent with its streams), {} MiB after {}s idle, {} MiB after close ({:+.1} MiB on before, {fds_closed} fds)",
            mib(before),
            mib(opened),
            (opened - before) as f64 / agents as f64,
            mib(after_idle),
            IDLE_WINDOW.as_secs(),
            mib(closed),
            (closed as f64 - before as f64) / 1024.0,
        );
        println!(
            "  idle CPU {:.1}% of one core (simulator {:.1}%); open fds {fds}; delivery p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} deliveries)",
            idle_cpu * 100.0,
            sim_idle_cpu * 100.0,
            latency.value_at_quantile(0.5) as f64 / 1000.0,
            latency.value_at_quantile(0.99) as f64 / 1000.0,
            latency.max() as f64 / 1000.0,
            latency.len(),
        );
        println!(
            "| {agents} x {per_agent} | {} MiB | {:.1}% | {:.2} / {:.2} ms |",
            mib(opened),
            idle_cpu * 100.0,
            latency.value_at_quantile(0.5) as f64 / 1000.0,
            latency.value_at_quantile(0.99) as f64 / 1000.0,
        );
    }
}

/// Idle RSS of `agents` x `per_agent` streams, sampled each minute for `minutes` after
/// `warm_up` minutes.
async fn soak(agents: usize, per_agent: usize, minutes: usize, warm_up: usize) {
    let Pod {
        sim_server: _sim_server,
        sim,
        facade,
        ids,
        guids,
    } = Pod::start(agents).await;
    let (delivered, _deliveries) = mpsc::unbounded_channel();
    let _open = open_streams(facade.addr, &ids, &guids, per_agent, delivered).await;
    sim.until_polls_in_flight(agents).await;
    let opened = facade.rss_kib();
    // Until every channel on the idle path has its steady-state blocks (BENCHMARKS.md): tokio
    // allocates a channel's slots 32 at a time and a second block at the 33rd item, which is
    // the 33rd long poll of a gateway connection (330 s at the gateway's 10 s wait) and the 33rd
    // heartbeat of a stream (495 s); their pages become resident as they are written.
    tokio::time::sleep(Duration::from_secs(60 * warm_up as u64)).await;
    let (start, cpu) = (facade.rss_kib(), facade.cpu());
    println!(
        "\nsoak, {agents} agents x {per_agent} streams: RSS {} MiB with every stream open, {} MiB after {warm_up} minutes (start)",
        mib(opened),
        mib(start)
    );
    for minute in 1..=minutes {
        tokio::time::sleep(Duration::from_secs(60)).await;
        println!(
            "  minute {minute}: RSS {} MiB ({:+.2} MiB), CPU {:.1}% of one core on average",
            mib(facade.rss_kib()),
            (facade.rss_kib() as f64 - start as f64) / 1024.0,
            (facade.cpu() - cpu).as_secs_f64() / (60.0 * minute as f64) * 100.0,
        );
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// Streams open at the facade, each read by a task of its own that reports its agent's index
/// on every release event.
struct OpenStreams {
    readers: Vec<JoinHandle<()>>,
}

impl OpenStreams {
    /// Cancels every stream (the client resets it) and drops the connections.
    fn close(self) {
        for reader in self.readers {
            reader.abort();
        }
    }
}

// Each opened stream yields its reader task's handle: kept, not awaited, until the round ends.
#[allow(clippy::async_yields_async)]
async fn open_streams(
    facade: SocketAddr,
    ids: &[String],
    guids: &[String],
    per_agent: usize,
    delivered: mpsc::UnboundedSender<(usize, Instant)>,
) -> OpenStreams {
    let total = ids.len() * per_agent;
    let mut channels = Vec::new();
    for _ in 0..total.div_ceil(STREAMS_PER_CONNECTION) {
        channels.push(
            Channel::from_shared(format!("http://{facade}"))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    let readers = stream::iter(0..total)
        .map(|n| {
            let agent = n % ids.len();
            let request = handing_over(watch_req(&[&ids[agent]]), &guids[agent]);
            let mut client = CallControlClient::new(channels[n / STREAMS_PER_CONNECTION].clone());
            let delivered = delivered.clone();
            async move {
                let mut stream = client
                    .watch_release_events(request)
                    .await
                    .expect("the facade opens the stream")
                    .into_inner();
                tokio::spawn(async move {
                    while let Ok(Some(message)) = stream.message().await {
                        if let Some(Item::Event(_)) = message.item {
                            let _ = delivered.send((agent, Instant::now()));
                        }
                    }
                })
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    OpenStreams { readers }
}

/// [`HANGUPS`] customer hang-ups, one at a time: a call is placed, its events polled, then the
/// customer hangs up; latency runs from just before the hang-up request leaves this process to
/// each of the agent's streams receiving each of its two release events.
async fn hang_ups(
    sim: &Sim,
    ids: &[String],
    per_agent: usize,
    deliveries: &mut mpsc::UnboundedReceiver<(usize, Instant)>,
) -> Histogram<u64> {
    let mut latency = Histogram::<u64>::new(3).unwrap();
    for round in 0..HANGUPS {
        let agent = round * 7919 % ids.len();
        let id = &ids[agent];
        sim.control(reqwest::Method::POST, &format!("/agents/{id}/calls"))
            .await;
        // Hang up only once the poll loop is back in its long poll, as in production, where
        // talking takes longer than two polls.
        wait_for("the call's events polled", Duration::from_millis(1), || {
            let sim = sim.clone();
            async move { sim.queued_events(id).await == 0 }
        })
        .await;
        let hung_up = Instant::now();
        sim.control(
            reqwest::Method::POST,
            &format!("/agents/{id}/customer-hangup"),
        )
        .await;
        for _ in 0..2 * per_agent {
            let (who, at) = tokio::time::timeout(WAIT, deliveries.recv())
                .await
                .expect("every stream gets the release events")
                .unwrap();
            assert_eq!(who, agent, "an event for the agent hung up");
            latency.record((at - hung_up).as_micros() as u64).unwrap();
        }
    }
    latency
}

// ---------------------------------------------------------------------------------------------
// ReleaseCall against its floors
// ---------------------------------------------------------------------------------------------

const RELEASE_AGENTS: usize = 50;

/// One path of the ReleaseCall comparison: what it is and, for the gRPC ones, the process
/// whose CPU it costs.
struct Measured<'a> {
    name: &'a str,
    server: Option<&'a Server>,
    latency: Histogram<u64>,
    wall: Duration,
    cpu: Duration,
}

/// `ReleaseCall(call_id)` of a call the agent does not have (the gateway answers 200-025 to
/// the dropcall, so nothing changes and every request is alike), `rounds` times over four
/// paths in turn: the REST request by hand, a bare tonic hop, a zero-logic facade and the
/// facade.
async fn release(requests: usize, concurrency: usize, rounds: usize) {
    let Pod {
        sim_server,
        sim,
        facade,
        ids,
        guids,
    } = Pod::start(RELEASE_AGENTS).await;
    let gateway = format!("http://{}", sim_server.addr);
    let zero_logic = spawn_role(&["role-floor", &gateway]).await;
    let bare = spawn_role(&["role-bare"]).await;
    let work = Arc::new((ids, guids));
    let mut paths = [
        ("gateway REST by hand (reqwest)", None),
        ("bare tonic hop (answers at once)", Some(&bare)),
        ("zero-logic facade (tonic -> reqwest)", Some(&zero_logic)),
        ("ReleaseCall through the facade", Some(&facade)),
    ]
    .map(|(name, server)| Measured {
        name,
        server,
        latency: Histogram::new(3).unwrap(),
        wall: Duration::ZERO,
        cpu: Duration::ZERO,
    });
    println!("\nReleaseCall(call_id) answered NO_ACTIVE_CALL (dropcall 200-025): {requests} requests x {rounds} rounds per path, {concurrency} concurrent, {RELEASE_AGENTS} agents; paths alternate");
    for _ in 0..rounds {
        for path in &mut paths {
            let cpu = path.server.map(Server::cpu).unwrap_or_default();
            let (latency, wall) = match path.server {
                None => rest_load(&sim, &work, requests, concurrency).await,
                Some(server) => grpc_load(server.addr, &work, requests, concurrency).await,
            };
            path.latency.add(latency).unwrap();
            path.wall += wall;
            path.cpu += path.server.map(Server::cpu).unwrap_or_default() - cpu;
        }
    }
    for path in &paths {
        report(path.name, &path.latency, path.wall);
        if path.server.is_some() {
            println!(
                "{:45} CPU per request {:.1} µs",
                "",
                path.cpu.as_secs_f64() * 1e6 / path.latency.len() as f64
            );
        }
    }
    let [_, _, floor, ours] = &paths;
    let q = |p: &Measured, q: f64| p.latency.value_at_quantile(q) as f64;
    let rate = |p: &Measured| p.latency.len() as f64 / p.wall.as_secs_f64();
    let cpu = |p: &Measured| p.cpu.as_secs_f64() / p.latency.len() as f64;
    println!(
        "facade / zero-logic: p50 {:.2}x (target <= 1.2), p99 {:.2}x (<= 1.5), CPU per request {:.2}x (<= 1.25), throughput {:.2}x (>= 0.8)",
        q(ours, 0.5) / q(floor, 0.5),
        q(ours, 0.99) / q(floor, 0.99),
        cpu(ours) / cpu(floor),
        rate(ours) / rate(floor),
    );
    println!("facade RSS {} MiB", mib(facade.rss_kib()));
}

type Work = Arc<(Vec<String>, Vec<String>)>;

async fn rest_load(
    sim: &Sim,
    work: &Work,
    requests: usize,
    concurrency: usize,
) -> (Histogram<u64>, Duration) {
    let (sim, work) = (sim.clone(), work.clone());
    load(requests, concurrency, move |n| {
        let (sim, work) = (sim.clone(), work.clone());
        async move {
            let agent = n % RELEASE_AGENTS;
            let answer = sim
                .http
                .post(format!(
                    "{}/agentgateway/resource/voicecall/{}/dropcall/1-1",
                    sim.base, work.0[agent]
                ))
                .header("Guid", &work.1[agent])
                .send()
                .await
                .unwrap();
            assert!(answer.text().await.unwrap().contains("200-025"));
        }
    })
    .await
}

/// The same ReleaseCalls, Guid handed over on each, over four connections.
async fn grpc_load(
    addr: SocketAddr,
    work: &Work,
    requests: usize,
    concurrency: usize,
) -> (Histogram<u64>, Duration) {
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(
            CallControlClient::connect(format!("http://{addr}"))
                .await
                .unwrap(),
        );
    }
    let (clients, work) = (Arc::new(clients), work.clone());
    load(requests, concurrency, move |n| {
        let mut client = clients[n % clients.len()].clone();
        let work = work.clone();
        async move {
            let agent = n % RELEASE_AGENTS;
            let request = ReleaseCallRequest {
                agent_id: work.0[agent].clone(),
                call_id: "1-1".into(),
                ..Default::default()
            };
            // The bare hop answers an empty response; the others the gateway's retcode.
            match client
                .release_call(handing_over(request, &work.1[agent]))
                .await
            {
                Ok(answer) => assert!(matches!(answer.get_ref().retcode.as_str(), "" | "200-025")),
                Err(status) => panic!("{status:?}"),
            }
        }
    })
    .await
}
