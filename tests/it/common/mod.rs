//! Spawns a CC-Gateway simulator and the facade on ephemeral loopback ports, and a real tonic
//! client for the facade. The benchmarks include this module too (benches/support), so tests and
//! benchmarks start the app one way.
#![allow(dead_code)]

pub mod memory;
pub mod nats;
pub mod pki;
pub mod replicas;

use std::{net::SocketAddr, time::Duration};

use ccgw_callcontrol::{
    api::CallControlApi,
    config::Config,
    domain::AgentId,
    proto::{call_control_client::CallControlClient, ReleaseCallRequest},
    server, startup,
};
use ccgw_sim::{Fault, FaultRule, RecordedRequest, SimConfig, Simulator};
use clap::Parser;
use tokio::{net::TcpListener, sync::oneshot, time::Instant};
use tonic::transport::Channel;

pub mod tls;

pub struct TestApp {
    pub grpc_addr: SocketAddr,
    pub sim_addr: SocketAddr,
    pub sim: Simulator,
    pub api: CallControlApi,
    pub client: CallControlClient<Channel>,
    stop_server: Option<oneshot::Sender<()>>,
    stop_sim: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

/// A simulator with a real gateway's behaviour but a short long-poll wait.
pub fn sim_config() -> SimConfig {
    SimConfig {
        poll_wait: Duration::from_millis(300),
        ..SimConfig::default()
    }
}

/// [`sim_config`] with a simulator that refuses a rotated-away Guid at once: a request that
/// still carries it fails.
pub fn sim_refusing_rotated_guids() -> SimConfig {
    SimConfig {
        guid_timeout: Duration::ZERO,
        ..sim_config()
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(sim_config(), &[]).await
}

/// `flags` are extra command-line flags of the service, e.g. `["--legacy-release-path"]`.
pub async fn spawn_app_with(sim_config: SimConfig, flags: &[&str]) -> TestApp {
    let (sim, sim_addr, stop_sim) = spawn_sim(sim_config, None).await;
    let url = format!("http://{sim_addr}");
    spawn_facade(sim, sim_addr, &url, flags, Some(stop_sim)).await
}

/// The simulator serving HTTPS with `tls`, and the facade pointed at
/// `https://{gateway_host}:{port}` (`gateway_host` resolving to 127.0.0.1, e.g. `localhost`: the
/// name the facade verifies), with `flags` (e.g. `--gateway-ca-bundle`).
pub async fn spawn_app_tls(
    tls: std::sync::Arc<rustls::ServerConfig>,
    gateway_host: &str,
    flags: &[&str],
) -> TestApp {
    let (sim, sim_addr, stop_sim) = spawn_sim(sim_config(), Some(tls)).await;
    let url = format!("https://{gateway_host}:{}", sim_addr.port());
    spawn_facade(sim, sim_addr, &url, flags, Some(stop_sim)).await
}

/// A simulator on an ephemeral loopback port, over HTTPS when `tls` is given; it stops when
/// the sender is dropped or fired.
pub async fn spawn_sim(
    sim_config: SimConfig,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
) -> (Simulator, SocketAddr, oneshot::Sender<()>) {
    let sim = Simulator::new(sim_config);
    let sim_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim_addr = sim_listener.local_addr().unwrap();
    let (stop_sim, sim_stopped) = oneshot::channel::<()>();
    let stopped = async {
        let _ = sim_stopped.await;
    };
    match tls {
        None => tokio::spawn(sim.clone().serve(sim_listener, stopped)),
        Some(tls) => tokio::spawn(sim.clone().serve_tls(sim_listener, tls, stopped)),
    };
    (sim, sim_addr, stop_sim)
}

/// Tests of caller authorization pass --callers, which replaces --no-caller-auth.
fn open_unless_callers(flags: &[&str]) -> Option<&'static str> {
    (!flags.contains(&"--callers")).then_some("--no-caller-auth")
}

/// The facade pointed at `gateway_url` (which need not be the simulator's).
pub async fn spawn_facade(
    sim: Simulator,
    sim_addr: SocketAddr,
    gateway_url: &str,
    flags: &[&str],
    stop_sim: Option<oneshot::Sender<()>>,
) -> TestApp {
    let config = facade_config(gateway_url, flags);
    let app = startup::build_app(&config, gateway_url.to_owned(), &Default::default())
        .await
        .expect("facade builds");
    let tls = flags.contains(&"--tls-cert");
    serve_facade(app, &config, tls, sim, sim_addr, stop_sim).await
}

/// The configuration of a facade pointed at `gateway_url`, with `flags`.
pub fn facade_config(gateway_url: &str, flags: &[&str]) -> Config {
    let mut args = vec!["ccgw-callcontrol", "--gateway-url", gateway_url];
    args.extend(open_unless_callers(flags));
    args.extend_from_slice(flags);
    Config::try_parse_from(args).expect("test flags parse")
}

/// Serves `app` (built from `config`) on an ephemeral loopback port, with a client (which the
/// test's own TLS clients replace when the port is `tls`).
pub async fn serve_facade(
    app: ccgw_callcontrol::app::App,
    config: &Config,
    tls: bool,
    sim: Simulator,
    sim_addr: SocketAddr,
    stop_sim: Option<oneshot::Sender<()>>,
) -> TestApp {
    let api = app.api.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = listener.local_addr().unwrap();
    let (stop_server, server_stopped) = oneshot::channel::<()>();
    let server = tokio::spawn({
        let settings = config.server();
        async move {
            let health = server::HealthEndpoint::start(None, &settings, &Default::default())
                .await
                .serving(&app, &settings)
                .await;
            server::run(listener, health, app, settings, async {
                let _ = server_stopped.await;
            })
            .await
            .expect("server runs");
        }
    });
    // A TLS port is reached by the test's own TLS clients (common::pki).
    let client = if tls {
        CallControlClient::new(
            tonic::transport::Endpoint::from_shared(format!("http://{grpc_addr}"))
                .unwrap()
                .connect_lazy(),
        )
    } else {
        CallControlClient::connect(format!("http://{grpc_addr}"))
            .await
            .expect("client connects")
    };
    TestApp {
        grpc_addr,
        sim_addr,
        sim,
        api,
        client,
        stop_server: Some(stop_server),
        stop_sim,
        server: Some(server),
    }
}

impl TestApp {
    /// Signs the agent in through the gateway interface; the facade's registry learns the
    /// session from the answer's Set-GUID. Returns the Guid.
    pub async fn sign_in(&self, agent: &str) -> String {
        let id = agent_id(agent);
        let answer = self
            .api
            .sessions()
            .sign_in(id, "secret", "88001", false, deadline())
            .await
            .expect("sign-in answers");
        assert!(answer.is_ok(), "sign-in of {agent}: {answer:?}");
        self.guid_of(agent).expect("sign-in registered a session")
    }

    /// Signs the agent in the way an agent desktop does (see [`desktop_sign_in`]).
    pub async fn desktop_sign_in(&self, agent: &str, force: bool) -> DesktopSession {
        desktop_sign_in(self.sim_addr, agent, force).await
    }

    pub fn guid_of(&self, agent: &str) -> Option<String> {
        self.api
            .sessions()
            .registry()
            .get(agent_id(agent))
            .map(|s| s.guid.expose().to_owned())
    }

    /// Gateway requests the simulator received, minus sign-ins.
    pub fn upstream(&self) -> Vec<RecordedRequest> {
        self.sim
            .requests()
            .into_iter()
            .filter(|r| !r.path.contains("/onlineagent/"))
            .collect()
    }

    /// Releases of `agent`'s calls the simulator received.
    pub fn releases_of(&self, agent: &str) -> usize {
        let path = format!("/voicecall/{agent}/");
        self.upstream()
            .iter()
            .filter(|r| r.path.contains(&path))
            .count()
    }

    /// A ReleaseCall on its own task, answered within the wait bound.
    pub fn release_in_background(
        &self,
        request: tonic::Request<ccgw_callcontrol::proto::ReleaseCallRequest>,
    ) -> tokio::task::JoinHandle<Result<ccgw_callcontrol::proto::ReleaseOutcome, tonic::Status>>
    {
        let mut client = self.client.clone();
        tokio::spawn(async move {
            let answer = tokio::time::timeout(WAIT, client.release_call(request))
                .await
                .expect("ReleaseCall answers within the wait bound")?;
            Ok(answer.into_inner().outcome())
        })
    }

    /// Releases of the current call (`DELETE`) the simulator received.
    pub fn deletes(&self) -> Vec<RecordedRequest> {
        self.upstream()
            .into_iter()
            .filter(|r| r.method == "DELETE")
            .collect()
    }

    pub async fn release(
        &self,
        request: ReleaseCallRequest,
    ) -> Result<ccgw_callcontrol::proto::ReleaseCallResponse, tonic::Status> {
        self.release_with(tonic::Request::new(request)).await
    }

    pub async fn release_with(
        &self,
        mut request: tonic::Request<ReleaseCallRequest>,
    ) -> Result<ccgw_callcontrol::proto::ReleaseCallResponse, tonic::Status> {
        if request.metadata().get("grpc-timeout").is_none() {
            request.set_timeout(Duration::from_secs(10));
        }
        let mut client = self.client.clone();
        tokio::time::timeout(Duration::from_secs(30), client.release_call(request))
            .await
            .expect("ReleaseCall answers within 30 s")
            .map(tonic::Response::into_inner)
    }

    /// Triggers graceful shutdown and waits (bounded) for the server to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop_server.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(30), server)
                .await
                .expect("server stops within 30 s")
                .expect("server task");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop_server.take() {
            let _ = stop.send(());
        }
        if let Some(stop) = self.stop_sim.take() {
            let _ = stop.send(());
        }
    }
}

/// Whether a health check over `channel` answers SERVING (within a bound).
pub async fn serving(channel: Channel) -> Result<(), tonic::Status> {
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let check = client.check(tonic_health::pb::HealthCheckRequest::default());
    let answer = tokio::time::timeout(WAIT, check)
        .await
        .expect("the health check answered within the wait bound")?;
    assert_eq!(answer.into_inner().status, 1, "SERVING");
    Ok(())
}

/// The status `service` reports on the plaintext health service at `addr`, `None` when it does
/// not answer.
pub async fn health(
    addr: &str,
    service: &str,
) -> Option<tonic_health::pb::health_check_response::ServingStatus> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .ok()?;
    let answer = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .ok()?;
    Some(answer.into_inner().status())
}

/// Asks (bounded by `within`) until `service` on the health service at `addr` reads `wanted`.
pub async fn health_becomes(
    addr: &str,
    service: &str,
    wanted: tonic_health::pb::health_check_response::ServingStatus,
    within: Duration,
) {
    let became = tokio::time::timeout(within, async {
        while health(addr, service).await != Some(wanted) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        became.is_ok(),
        "{service:?} at {addr} did not become {wanted:?} within {within:?}"
    );
}

pub fn agent_id(raw: &str) -> AgentId {
    AgentId::parse("agent_id", raw, 999_999).unwrap()
}

pub fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

/// Resident memory of process `pid` (a number, or `self`), KiB, from /proc.
pub fn rss_kib_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let value = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
            value.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("VmRSS in /proc/{pid}/status"))
}

/// The service binary running the README's demo (`--simulate`, gRPC and simulator on ports the
/// system picks), with `flags` beside and `RUST_LOG` at `log_level`; its banner comes on a pipe
/// from stdout.
pub fn demo_command(flags: &[&str], log_level: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ccgw-callcontrol"));
    command
        .args([
            "--simulate",
            "--listen",
            "127.0.0.1:0",
            "--sim-listen",
            "127.0.0.1:0",
        ])
        .args(flags)
        .env("RUST_LOG", log_level)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    command
}

/// The demo (`--simulate`) with its metrics port, re-reading its files (which `flags` name)
/// every second, once it serves: the process, its metrics address and its logs.
pub async fn spawn_demo_reloading(flags: &[&str]) -> (tokio::process::Child, String, KeptLogs) {
    let demo = [
        "--simulate",
        "--sim-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--reload-secs",
        "1",
    ];
    let (service, serving, logs) = spawn_service_keeping_logs(&[&demo, flags].concat(), &[]).await;
    let metrics = serving["metrics"].as_str().unwrap().to_owned();
    (service, metrics, logs)
}

/// The service binary, started with `args` (plus `--listen 127.0.0.1:0 --log-format json`) and
/// `envs`, once it serves: the process and its gRPC address. Its logs are drained in the
/// background.
pub async fn spawn_service(
    args: &[&str],
    envs: &[(&str, &str)],
) -> (tokio::process::Child, String) {
    let (service, serving) = spawn_service_logging(args, envs).await;
    (service, serving["listen"].as_str().unwrap().to_owned())
}

/// [`spawn_service`], returning the "serving gRPC" log line (its addresses: `listen`, and
/// `metrics` and `health` when those ports are open).
pub async fn spawn_service_logging(
    args: &[&str],
    envs: &[(&str, &str)],
) -> (tokio::process::Child, serde_json::Value) {
    start_service(args, envs, None, SERVING).await
}

/// [`spawn_service_logging`], also keeping the log lines that follow "serving gRPC", for a test
/// to read.
pub async fn spawn_service_keeping_logs(
    args: &[&str],
    envs: &[(&str, &str)],
) -> (tokio::process::Child, serde_json::Value, KeptLogs) {
    spawn_service_until(args, envs, SERVING).await
}

/// [`spawn_service_keeping_logs`], returning once the service logged `message` (its line).
pub async fn spawn_service_until(
    args: &[&str],
    envs: &[(&str, &str)],
    message: &str,
) -> (tokio::process::Child, serde_json::Value, KeptLogs) {
    let kept = KeptLogs::default();
    let (service, line) = start_service(args, envs, Some(kept.clone()), message).await;
    (service, line, kept)
}

/// What the service logs once its gRPC port serves.
pub const SERVING: &str = "serving gRPC";

/// A service's log lines, as they arrive.
pub type KeptLogs = std::sync::Arc<std::sync::Mutex<String>>;

async fn start_service(
    args: &[&str],
    envs: &[(&str, &str)],
    kept: Option<KeptLogs>,
    until: &str,
) -> (tokio::process::Child, serde_json::Value) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let callers_in_env = envs.iter().any(|(name, _)| *name == "CCGW_CALLERS");
    let mut service = tokio::process::Command::new(env!("CARGO_BIN_EXE_ccgw-callcontrol"))
        .args(args)
        .args(open_unless_callers(args).filter(|_| !callers_in_env))
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .env("RUST_LOG", "info")
        .envs(envs.iter().copied())
        // The --simulate demo prints its banner there; nobody reads it here.
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the service binary starts");
    let mut logs = BufReader::new(service.stderr.take().unwrap()).lines();
    let serving = tokio::time::timeout(WAIT, async {
        let mut seen = Vec::new();
        while let Some(line) = logs.next_line().await.unwrap() {
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if entry["message"] == until {
                return entry;
            }
            seen.push(line);
        }
        panic!("the service exited before serving:\n{}", seen.join("\n"));
    })
    .await
    .expect("the service serves within the wait bound");
    // CCGW_TEST_LOG_DIR: keep each service's log in a file there (for debugging a test).
    let mut keep = std::env::var_os("CCGW_TEST_LOG_DIR").map(|dir| {
        let name = format!("service-{}.log", service.id().unwrap_or_default());
        std::fs::File::create(std::path::Path::new(&dir).join(name)).unwrap()
    });
    tokio::spawn(async move {
        while let Ok(Some(line)) = logs.next_line().await {
            if let Some(file) = &mut keep {
                use std::io::Write;
                let _ = writeln!(file, "{line}");
            }
            if let Some(kept) = &kept {
                kept.lock().unwrap().push_str(&line);
            }
        }
    });
    (service, serving)
}

/// A signal a test sends a child process (SIGKILL is tokio's `Child::kill`, which also reaps
/// it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: shut down cleanly, as Kubernetes asks a pod to.
    Term,
    /// SIGSTOP: frozen, its sockets open, as by a long GC pause or a VM stall.
    Stop,
    /// SIGCONT: running again after [`Signal::Stop`].
    Cont,
}

/// Sends `signal` to `process`, through kill(1) (no unsafe code for libc's).
pub async fn signal(process: &tokio::process::Child, signal: Signal) {
    let pid = process.id().expect("a running process").to_string();
    let name = match signal {
        Signal::Term => "-TERM",
        Signal::Stop => "-STOP",
        Signal::Cont => "-CONT",
    };
    let sent = tokio::process::Command::new("kill")
        .args([name, &pid])
        .status()
        .await
        .unwrap();
    assert!(sent.success(), "kill {name} {pid}");
}

/// Waits (bounded) for `process` to exit, and asserts it exited cleanly.
pub async fn exits_cleanly(mut process: tokio::process::Child) {
    let exit = tokio::time::timeout(WAIT, process.wait())
        .await
        .expect("the process exits")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

/// A session an agent desktop got from the gateway itself.
pub struct DesktopSession {
    pub guid: String,
    /// The load balancer's sticky cookie (`name=value`), when it set one.
    pub cookie: Option<String>,
}

/// Signs the agent in the way an agent desktop does, straight at the gateway (with `force`:
/// forcelogin, which replaces any session); no facade learns of it.
pub async fn desktop_sign_in(sim: SocketAddr, agent: &str, force: bool) -> DesktopSession {
    // One client for every sign-in: the pod benchmark signs in 10 000 agents.
    static HTTP: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let http = HTTP.get_or_init(|| {
        ccgw_callcontrol::install_crypto_provider();
        reqwest::Client::new()
    });
    desktop_sign_in_at(http, &format!("http://{sim}"), agent, force).await
}

/// [`desktop_sign_in`] at the gateway `base` (`https://...` with a client that trusts it).
pub async fn desktop_sign_in_at(
    http: &reqwest::Client,
    base: &str,
    agent: &str,
    force: bool,
) -> DesktopSession {
    let suffix = if force { "/forcelogin" } else { "" };
    let answer = http
        .put(format!(
            "{base}/agentgateway/resource/onlineagent/{agent}{suffix}"
        ))
        .json(&serde_json::json!({"password": "pw", "phonenum": "88003"}))
        .send()
        .await
        .expect("the simulator answers a sign-in");
    let headers = answer.headers();
    DesktopSession {
        guid: headers["set-guid"]
            .to_str()
            .unwrap()
            .trim_start_matches("JSESSIONID=")
            .to_owned(),
        cookie: headers
            .get("set-cookie")
            .and_then(|c| c.to_str().ok())
            .and_then(|c| c.split(';').next())
            .map(str::to_owned),
    }
}

/// A gateway that holds every request whose path contains `path_contains` for two minutes,
/// longer than any test waits.
pub fn hang(path_contains: &str) -> FaultRule {
    FaultRule {
        fault: Fault::Latency { ms: 120_000 },
        count: 1_000,
        method: None,
        path_contains: Some(path_contains.into()),
    }
}

/// A well-formed Guid no gateway issued, distinct for each `n`.
pub fn junk_guid(n: u32) -> String {
    format!("junk-{n:06}.AgentGateway0")
}

/// `message` with the session handed over in `x-ccgw-guid`.
pub fn handing_over<T>(message: T, guid: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "x-ccgw-guid",
        guid.parse().expect("a Guid is valid metadata"),
    );
    request
}

pub fn release_req(agent: &str) -> ReleaseCallRequest {
    ReleaseCallRequest {
        agent_id: agent.into(),
        ..Default::default()
    }
}

/// [`release_req`] under `request_id` (its release then runs on a task of its own, one that
/// outlives the caller, and a repeat is answered from what the first got).
pub fn release_with_id(agent: &str, request_id: &str) -> ReleaseCallRequest {
    ReleaseCallRequest {
        request_id: request_id.to_owned(),
        ..release_req(agent)
    }
}

/// Releases of the current call (`DELETE`) `sim` received.
pub fn releases_sent(sim: &Simulator) -> usize {
    sim.requests()
        .iter()
        .filter(|r| r.method == "DELETE")
        .count()
}

/// The most polls of `agent` `sim` had in flight at once since its sign-in.
pub fn max_polls_in_flight(sim: &Simulator, agent: &str) -> u32 {
    sim.agent(agent).map_or(0, |v| v.max_polls_in_flight)
}

// ---------------------------------------------------------------------------------------------
// WatchReleaseEvents helpers
// ---------------------------------------------------------------------------------------------

pub use ccgw_callcontrol::proto::{
    watch_release_events_response::Item, ReleaseEvent, ReleaseKind, WatchReleaseEventsRequest,
    WatchReleaseEventsResponse,
};

/// `ErrorInfo.domain` of every error the facade returns.
pub const ERROR_DOMAIN: &str = "ccgw-callcontrol";

/// Upper bound of every single wait in the watch tests (an item, a condition, an RPC).
pub const WAIT: Duration = Duration::from_secs(20);

/// A stream request for `agents`, all kinds, no resume token.
pub fn watch_req(agents: &[&str]) -> WatchReleaseEventsRequest {
    WatchReleaseEventsRequest {
        agent_ids: agents.iter().map(|a| (*a).to_owned()).collect(),
        ..Default::default()
    }
}

/// A stream request for `agents` that resumes after `token`.
pub fn resume_req(agents: &[&str], token: &str) -> WatchReleaseEventsRequest {
    WatchReleaseEventsRequest {
        resume_token: token.to_owned(),
        ..watch_req(agents)
    }
}

/// One open WatchReleaseEvents stream, read with bounded waits.
pub struct OpenStream {
    pub stream: tonic::Streaming<WatchReleaseEventsResponse>,
}

impl OpenStream {
    /// The next item: `Ok(Some(item))`, `Ok(None)` when the stream ended with OK, or the
    /// status it ended with. Panics when nothing comes within [`WAIT`].
    pub async fn next_item(&mut self) -> Result<Option<Item>, tonic::Status> {
        let message = tokio::time::timeout(WAIT, self.stream.message())
            .await
            .expect("the stream yielded nothing within the wait bound")?;
        Ok(message.map(|m| m.item.expect("a response without an item")))
    }

    /// The next item, which must exist (no end, no error).
    pub async fn item(&mut self) -> Item {
        match self.next_item().await {
            Ok(Some(item)) => item,
            Ok(None) => panic!("the stream ended with OK"),
            Err(status) => panic!("the stream failed: {status:?}"),
        }
    }

    /// The next item, which must be a release event.
    pub async fn event(&mut self) -> ReleaseEvent {
        match self.item().await {
            Item::Event(event) => event,
            other => panic!("expected a release event, got {other:?}"),
        }
    }

    /// The next `n` release events; heartbeats in between are skipped, anything else fails.
    /// The whole collection is bounded by [`WAIT`] (heartbeats must not keep it waiting).
    pub async fn events_of(&mut self, n: usize) -> Vec<ReleaseEvent> {
        let mut events = Vec::with_capacity(n);
        let collected = tokio::time::timeout(WAIT, async {
            while events.len() < n {
                match self.item().await {
                    Item::Event(event) => events.push(event),
                    Item::Heartbeat(_) => {}
                    other => panic!(
                        "expected release event {} of {n}, got {other:?}",
                        events.len() + 1
                    ),
                }
            }
        })
        .await;
        assert!(
            collected.is_ok(),
            "only {} of {n} release events within the wait bound: {:?}",
            events.len(),
            kinds_and_calls(&events)
        );
        events
    }

    /// Lets the customer of a new call on `agent` hang up and asserts this stream sees exactly
    /// that hang-up's two release events next; returns the call id.
    pub async fn sees_hang_up(&mut self, app: &TestApp, agent: &str) -> String {
        let call_id = app.hang_up(agent, CALLER);
        assert_eq!(
            kinds_and_calls(&self.events_of(2).await),
            hangup_pair(&call_id)
        );
        call_id
    }

    /// Reads (skipping heartbeats) until the stream fails; returns the events read before and
    /// the status. Panics when the stream ends with OK or yields a Gap / AgentSessionEnded, or
    /// when it has not failed within [`WAIT`].
    pub async fn until_error(&mut self) -> (Vec<ReleaseEvent>, tonic::Status) {
        let mut events = Vec::new();
        let status = tokio::time::timeout(WAIT, async {
            loop {
                match self.next_item().await {
                    Ok(Some(Item::Event(event))) => events.push(event),
                    Ok(Some(Item::Heartbeat(_))) => {}
                    Ok(Some(other)) => panic!("expected events then an error, got {other:?}"),
                    Ok(None) => panic!("the stream ended with OK after {} events", events.len()),
                    Err(status) => return status,
                }
            }
        })
        .await;
        match status {
            Ok(status) => (events, status),
            Err(_) => panic!(
                "the stream did not fail within the wait bound ({} events read)",
                events.len()
            ),
        }
    }
}

impl TestApp {
    /// Opens a stream on the app's client; the error when the RPC is refused at once.
    pub async fn try_watch(
        &self,
        request: impl tonic::IntoRequest<WatchReleaseEventsRequest>,
    ) -> Result<OpenStream, tonic::Status> {
        watch_on(self.client.clone(), request).await
    }

    /// Opens a stream that must be accepted.
    pub async fn watch(
        &self,
        request: impl tonic::IntoRequest<WatchReleaseEventsRequest>,
    ) -> OpenStream {
        self.try_watch(request)
            .await
            .unwrap_or_else(|status| panic!("WatchReleaseEvents refused: {status:?}"))
    }

    /// The status a stream that must be refused ends with. Whether the refusal comes as the
    /// RPC's answer or as the stream's first (and only) item, nothing may be streamed before.
    pub async fn watch_refused(
        &self,
        request: impl tonic::IntoRequest<WatchReleaseEventsRequest>,
    ) -> tonic::Status {
        match self.try_watch(request).await {
            Err(status) => status,
            Ok(mut watch) => match watch.next_item().await {
                Err(status) => status,
                Ok(item) => panic!("expected a refusal, the stream yielded {item:?}"),
            },
        }
    }

    /// Signs `agent` in and opens a stream watching it alone.
    pub async fn signed_in_watch(&self, agent: &str) -> OpenStream {
        self.sign_in(agent).await;
        self.watch(watch_req(&[agent])).await
    }

    /// [`hang_up`] on the app's simulator.
    pub fn hang_up(&self, agent: &str, caller: &str) -> String {
        hang_up(&self.sim, agent, caller)
    }

    /// Gateway event polls of `agent` the simulator received.
    pub fn polls_of(&self, agent: &str) -> usize {
        let path = format!("/agentgateway/resource/agentevent/{agent}");
        self.sim
            .requests()
            .iter()
            .filter(|r| r.path == path)
            .count()
    }

    /// Every `/agentevent/` request the simulator received (any agent).
    pub fn event_polls(&self) -> Vec<RecordedRequest> {
        self.sim
            .requests()
            .into_iter()
            .filter(|r| r.path.contains("/agentevent/"))
            .collect()
    }

    /// Agents whose poll loop runs, as strings, sorted.
    pub fn polling_agents(&self) -> Vec<String> {
        let mut agents: Vec<String> = self
            .api
            .events()
            .agents_to_poll()
            .iter()
            .map(ToString::to_string)
            .collect();
        agents.sort();
        agents
    }

    /// Waits until the gateway queue of `agent` is empty and the facade has counted
    /// `release_events` release events in total: everything produced so far was observed.
    pub async fn until_observed(&self, agent: &str, release_events: u64) {
        wait_until(
            &format!("agent {agent}'s queue polled and {release_events} release events observed"),
            || {
                self.sim.agent(agent).expect("agent view").queued_events == 0
                    && self.api.events().stats().release_events >= release_events
            },
        )
        .await;
        assert_eq!(
            self.api.events().stats().release_events,
            release_events,
            "release events observed"
        );
    }
}

/// Opens a stream on `client` (e.g. one on its own Channel).
pub async fn watch_on(
    mut client: CallControlClient<Channel>,
    request: impl tonic::IntoRequest<WatchReleaseEventsRequest>,
) -> Result<OpenStream, tonic::Status> {
    let response = tokio::time::timeout(WAIT, client.watch_release_events(request))
        .await
        .expect("WatchReleaseEvents answered within the wait bound")?;
    Ok(OpenStream {
        stream: response.into_inner(),
    })
}

/// Checks `condition` on this process's state (the simulator, a facade in this process) every
/// 10 ms until it holds; panics after [`WAIT`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    check_until(what, WAIT, Duration::from_millis(10), || {
        std::future::ready(condition())
    })
    .await;
}

/// Checks `condition` (which may ask another process: NATS, a replica's metrics) every 50 ms
/// until it holds; panics after `within`.
pub async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    within: Duration,
    condition: impl FnMut() -> F,
) {
    check_until(what, within, Duration::from_millis(50), condition).await;
}

/// Checks `condition` every `pause` until it holds; panics after `within`.
async fn check_until<F: std::future::Future<Output = bool>>(
    what: &str,
    within: Duration,
    pause: Duration,
    mut condition: impl FnMut() -> F,
) {
    let waited = tokio::time::timeout(within, async {
        while !condition().await {
            tokio::time::sleep(pause).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "timed out ({within:?}) waiting until {what}"
    );
}

/// Reads `read` (e.g. a scrape) every 200 ms until `done` holds of what it read, and returns
/// that; panics after [`WAIT`].
pub async fn read_until<T, F: std::future::Future<Output = T>>(
    what: &str,
    mut read: impl FnMut() -> F,
    done: impl Fn(&T) -> bool,
) -> T {
    let read = tokio::time::timeout(WAIT, async {
        loop {
            let now = read().await;
            if done(&now) {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    read.unwrap_or_else(|_| panic!("timed out ({WAIT:?}) waiting until {what}"))
}

/// The metrics endpoint's text at `addr`.
pub async fn scrape(addr: impl std::fmt::Display) -> String {
    ccgw_callcontrol::install_crypto_provider();
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("the metrics endpoint answers")
        .text()
        .await
        .unwrap()
}

/// The value of `series` on the metrics endpoint at `addr` (see [`sample`]).
pub async fn metric(addr: impl std::fmt::Display, series: &str) -> Option<f64> {
    sample(&scrape(addr).await, series)
}

/// The value of `series` in the metrics text `text`: a metric's name is the sum of its samples
/// over their label sets, a name with labels as the text format writes them
/// (`name{label="value"}`) is that one sample. `None` when there is no such sample, which the
/// caller says is a zero or a failure.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    let labelled = series.contains('{');
    let samples: Vec<f64> = text
        .lines()
        .filter(|line| {
            line.strip_prefix(series)
                .is_some_and(|rest| rest.starts_with(' ') || (!labelled && rest.starts_with('{')))
        })
        .map(|line| {
            let value = line.rsplit(' ').next().unwrap_or_default();
            value
                .parse()
                .unwrap_or_else(|_| panic!("a sample without a value: {line}"))
        })
        .collect();
    (!samples.is_empty()).then(|| samples.iter().sum())
}

/// Asserts code, ErrorInfo reason and domain; returns the details for more checks.
pub fn expect_status(
    status: &tonic::Status,
    code: tonic::Code,
    reason: &str,
) -> tonic_types::ErrorDetails {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), code, "{status:?}");
    let details = status.get_error_details();
    let info = details
        .error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo: {status:?}"));
    assert_eq!(info.reason, reason, "{status:?}");
    assert_eq!(info.domain, ERROR_DOMAIN, "{status:?}");
    assert!(
        details
            .request_info()
            .is_some_and(|r| !r.request_id.is_empty()),
        "no RequestInfo: {status:?}"
    );
    details
}

/// Asserts what a replica without its shared state (NATS down, or cut off) answers: UNAVAILABLE,
/// SHARED_STATE_UNAVAILABLE, to be retried, and nothing released.
pub fn expect_shared_state_unavailable(status: &tonic::Status) {
    let details = expect_status(status, tonic::Code::Unavailable, "SHARED_STATE_UNAVAILABLE");
    assert!(details.retry_info().is_some(), "{status:?}");
    assert!(
        !error_metadata(status).contains_key("may_have_released"),
        "{status:?}"
    );
}

/// `ErrorInfo.metadata` of a status (empty when there is no ErrorInfo).
pub fn error_metadata(status: &tonic::Status) -> std::collections::HashMap<String, String> {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .error_info()
        .map(|i| i.metadata.clone())
        .unwrap_or_default()
}

/// The fields of all BadRequest violations of a status.
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

/// The customer number of the calls the tests place.
pub const CALLER: &str = "70093";

/// Places a call on `agent` from `caller` (e.g. [`CALLER`]) and lets the customer hang up;
/// returns the call id. The gateway queues AgentEvent_Customer_Release then
/// AgentEvent_Call_Release.
pub fn hang_up(sim: &Simulator, agent: &str, caller: &str) -> String {
    let call_id = sim.place_call(agent, caller).expect("place_call");
    assert_eq!(
        sim.customer_hangup(agent).expect("customer_hangup"),
        call_id
    );
    call_id
}

/// (kind, call id) of each event: what the tests compare orders by.
pub fn kinds_and_calls(events: &[ReleaseEvent]) -> Vec<(ReleaseKind, String)> {
    events
        .iter()
        .map(|e| (e.kind(), e.call_id.clone()))
        .collect()
}

/// The release events a customer hang-up of `call_id` must produce, in the gateway's order.
pub fn hangup_pair(call_id: &str) -> Vec<(ReleaseKind, String)> {
    vec![
        (ReleaseKind::CustomerRelease, call_id.to_owned()),
        (ReleaseKind::CallRelease, call_id.to_owned()),
    ]
}

/// Asserts that sequence numbers strictly increase and every event carries a resume token.
pub fn assert_ordered(events: &[ReleaseEvent]) {
    for pair in events.windows(2) {
        assert!(
            pair[0].sequence < pair[1].sequence,
            "sequence does not increase: {:?}",
            kinds_and_calls(events)
                .iter()
                .zip(events.iter().map(|e| e.sequence))
                .collect::<Vec<_>>()
        );
    }
    for e in events {
        assert!(!e.resume_token.is_empty(), "no resume token: {e:?}");
    }
}

/// The program `name` on PATH. Without it a test skips (saying how to install it with
/// `install`), except under `CI=true`, where it fails: CI must run every check.
pub fn installed_tool(name: &str, install: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{name} is not installed; .ci/run must install it: {install}");
        }
        eprintln!("SKIPPED: {name} not found; install it with `{install}`");
    }
    found
}

/// A tonic client of the facade at `addr` (`host:port`).
pub async fn client_of(addr: &str) -> CallControlClient<Channel> {
    CallControlClient::connect(format!("http://{addr}"))
        .await
        .expect("the facade accepts connections")
}

/// Waits (bounded) until something accepts connections on 127.0.0.1:`port`.
pub async fn wait_until_listening(port: u16) {
    tokio::time::timeout(WAIT, async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("nothing listens on 127.0.0.1:{port}"));
}

/// The lines of a Markdown document outside its fenced code blocks, with their line numbers
/// (from 1); a fence's own lines and a block's lines come out empty, so numbers stay right.
pub fn markdown_prose(markdown: &str) -> Vec<(usize, &str)> {
    let mut in_code = false;
    markdown
        .lines()
        .enumerate()
        .map(|(index, line)| {
            let fence = line.trim_start().starts_with("```");
            let prose = !in_code && !fence;
            in_code ^= fence;
            (index + 1, if prose { line } else { "" })
        })
        .collect()
}

/// The anchors GitHub gives a Markdown document's headings, in order: each heading's
/// [`github_anchor`], with `-1`, `-2`, ... after the second and later uses of one anchor. A `#`
/// line in a fenced code block is no heading.
pub fn markdown_anchors(markdown: &str) -> Vec<String> {
    let mut uses = std::collections::HashMap::<String, usize>::new();
    let mut anchors = Vec::new();
    for (_, line) in markdown_prose(markdown) {
        let level = line.chars().take_while(|&c| c == '#').count();
        let Some(heading) = line[level..]
            .strip_prefix(' ')
            .filter(|_| (1..=6).contains(&level))
        else {
            continue;
        };
        let anchor = github_anchor(heading);
        let earlier = uses.entry(anchor.clone()).or_default();
        anchors.push(match *earlier {
            0 => anchor,
            n => format!("{anchor}-{n}"),
        });
        *earlier += 1;
    }
    anchors
}

/// The anchor GitHub gives a Markdown heading: lowercase, punctuation dropped (but `-` and
/// `_`), spaces made `-`.
pub fn github_anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}
