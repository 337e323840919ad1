//! What an operator sizing a pod sees. The facade runs in its own process (this package's
//! release binary, as deployed), the simulator in a second, the floors of the ReleaseCall
//! comparison in others (this binary, re-run in a role) and this process is the load client.
//! The facade's RSS, CPU time and open file descriptors are read from /proc. Loopback only;
//! every wait is bounded.
//!
//! ```text
//! cargo bench --bench pod                                  # everything below, defaults
//! cargo bench --bench pod -- watch AGENTS STREAMS ROUNDS [tls]   # one row of the watch table
//! cargo bench --bench pod -- soak AGENTS STREAMS MINUTES WARM_UP_MINUTES   # idle RSS
//! cargo bench --bench pod -- release REQUESTS CONCURRENCY ROUNDS
//! ```
//! `tls` runs the simulator on HTTPS (a certificate for `localhost` by a CA the facade is given
//! with `--gateway-ca-bundle`), so that every polled agent holds a TLS connection. Numbers go in
//! BENCHMARKS.md.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use ccgw_callcontrol::proto::{
    call_control_client::CallControlClient,
    call_control_server::{CallControl, CallControlServer},
    ReleaseCallRequest, ReleaseCallResponse, WatchReleaseEventsRequest, WatchReleaseEventsResponse,
};
use hdrhistogram::Histogram;
use support::{
    common::handing_over,
    load,
    processes::{
        agent_ids, hang_ups, mib, open_streams, role_sim, spawn_facade, spawn_role, wait_for,
        Gateway, Server, ROLE_SIM,
    },
    report,
};
use tokio::sync::mpsc;

mod support;

/// How long the facade keeps polling an agent nobody watches any more. Short, so that a round
/// ends soon after its streams close; the behaviour is the default's.
const GRACE_SECS: u64 = 5;

#[tokio::main]
async fn main() {
    let mut args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    match args.first().map(String::as_str) {
        Some(ROLE_SIM) => return role_sim(&args[1..]).await,
        Some("role-floor") => return role_floor(Some(args[1].clone())).await,
        Some("role-bare") => return role_floor(None).await,
        _ => {}
    }
    let tls = args.last().is_some_and(|word| word == "tls");
    if tls {
        args.pop();
    }
    let number = |i: usize, default: usize| {
        args.get(i)
            .map(|a| a.parse().expect("a number"))
            .unwrap_or(default)
    };
    ccgw_callcontrol::install_crypto_provider();
    match args.first().map(String::as_str) {
        Some("watch") => watch(number(1, 10_000), number(2, 3), number(3, 2), tls).await,
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
                watch(agents, streams, rounds, false).await;
            }
            watch(10_000, 3, 2, false).await;
            release(20_000, 64, 3).await;
        }
        Some(other) => panic!("unknown command {other}: watch, soak or release"),
    }
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

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

/// The simulator and the facade in processes of their own, with `agents` agents signed in at
/// the simulator as their desktops would (`ids[n]` holds the Guid `guids[n]`).
struct Pod {
    gateway: Gateway,
    facade: Server,
    ids: Vec<String>,
    guids: Vec<String>,
}

impl Pod {
    /// The simulator on HTTPS when `tls`.
    async fn start(agents: usize, tls: bool) -> Self {
        let gateway = Gateway::start(tls, false).await;
        let grace = ["--watch-grace-secs".to_owned(), GRACE_SECS.to_string()];
        let facade = spawn_facade(&gateway, &grace).await;
        let ids = agent_ids(agents);
        let guids = gateway.sign_in(&ids).await;
        Self {
            gateway,
            facade,
            ids,
            guids,
        }
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
/// times on one facade process: RSS before, open and after close, idle CPU, delivery latency;
/// the gateway on HTTPS when `tls`.
async fn watch(agents: usize, per_agent: usize, rounds: usize, tls: bool) {
    let Pod {
        gateway,
        facade,
        ids,
        guids,
    } = Pod::start(agents, tls).await;
    println!(
        "\n{agents} agents x {per_agent} streams each ({} streams), facade pid {}, gateway {}",
        agents * per_agent,
        facade.pid(),
        gateway.base,
    );
    for round in 1..=rounds {
        let (before, fds_before) = (facade.rss_kib(), facade.open_fds());
        let (delivered, mut deliveries) = mpsc::unbounded_channel();
        let open = open_streams(&[facade.addr], &ids, &guids, per_agent, delivered).await;
        gateway.until_polls_in_flight(agents).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (opened, fds) = (facade.rss_kib(), facade.open_fds());

        let (cpu, sim_cpu) = (facade.cpu(), gateway.server.cpu());
        tokio::time::sleep(IDLE_WINDOW).await;
        let idle_cpu = (facade.cpu() - cpu).as_secs_f64() / IDLE_WINDOW.as_secs_f64();
        let sim_idle_cpu =
            (gateway.server.cpu() - sim_cpu).as_secs_f64() / IDLE_WINDOW.as_secs_f64();
        let after_idle = facade.rss_kib();

        let delivered = hang_ups(&gateway, &ids, per_agent, HANGUPS, &mut deliveries).await;
        assert_eq!(
            delivered.events_missed, 0,
            "every stream gets the release events"
        );
        let latency = delivered.latency;

        open.close();
        gateway.until_polls_in_flight(0).await;
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
        gateway,
        facade,
        ids,
        guids,
    } = Pod::start(agents, false).await;
    let (delivered, _deliveries) = mpsc::unbounded_channel();
    let _open = open_streams(&[facade.addr], &ids, &guids, per_agent, delivered).await;
    gateway.until_polls_in_flight(agents).await;
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
        gateway,
        facade,
        ids,
        guids,
    } = Pod::start(RELEASE_AGENTS, false).await;
    let zero_logic = spawn_role(&["role-floor", &gateway.base]).await;
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
                None => rest_load(&gateway, &work, requests, concurrency).await,
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
    gateway: &Gateway,
    work: &Work,
    requests: usize,
    concurrency: usize,
) -> (Histogram<u64>, Duration) {
    let (base, http) = (Arc::new(gateway.base.clone()), gateway.http.clone());
    let work = work.clone();
    load(requests, concurrency, move |n| {
        let (base, http, work) = (base.clone(), http.clone(), work.clone());
        async move {
            let agent = n % RELEASE_AGENTS;
            let answer = http
                .post(format!(
                    "{base}/agentgateway/resource/voicecall/{}/dropcall/1-1",
                    work.0[agent]
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
