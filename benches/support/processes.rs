//! The deployed shape in processes: the simulator in a process of its own (the bench binary
//! re-run in its `role-sim` role), facades (the service's release binary), what /proc says
//! about each, and the load client's streams and hang-ups. Every wait is bounded; every child
//! is killed when its handle drops.
use std::{
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use ccgw_callcontrol::proto::call_control_client::CallControlClient;
use futures_util::{stream, StreamExt};
use hdrhistogram::Histogram;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::mpsc,
    task::JoinHandle,
};
use tonic::transport::Channel;

use super::common::{
    desktop_sign_in_at, handing_over,
    pki::{Ca, Files},
    rss_kib_of, watch_req, Item,
};

/// The facade allows 256 HTTP/2 streams per connection; the load client stays under it.
pub const STREAMS_PER_CONNECTION: usize = 200;
/// First agent id the benchmarks sign in (agent ids are 101..999999 here).
pub const FIRST_AGENT: usize = 100_000;
/// Bound of every single wait on a process or a condition (a start, everything polled).
pub const WAIT: Duration = Duration::from_secs(120);
/// How long every stream may take to receive one hang-up's two release events before the
/// ones missing are counted as missed.
pub const DELIVERY_WAIT: Duration = Duration::from_secs(30);
/// The bench binary's role that runs the simulator: `role-sim [sign-out] [CERT KEY]` (HTTPS
/// with them; see [`role_sim`]).
pub const ROLE_SIM: &str = "role-sim";
/// The [`ROLE_SIM`] word that has the simulator sign out agents that miss their polls.
const SIGN_OUT: &str = "sign-out";

/// A child process serving on `addr`, killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    /// Its metrics port, when it opened one.
    pub metrics: Option<String>,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the process runs")
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib_of(&self.pid().to_string())
    }

    /// CPU time used so far, user and system, all threads.
    pub fn cpu(&self) -> Duration {
        super::cpu_of(self.pid())
    }

    pub fn open_fds(&self) -> usize {
        open_fds_of(self.pid())
    }

    /// Kills it (SIGKILL) and reaps it.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }

    /// Stops it as Kubernetes stops a pod: SIGTERM, then waits for it to exit (its drain),
    /// panicking after `within`. How long it took.
    pub async fn terminate(mut self, within: Duration) -> Duration {
        let asked = Instant::now();
        // SAFETY: kill only sends a signal to the child this handle owns, which has not been
        // reaped yet (it is reaped below).
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        tokio::time::timeout(within, self.child.wait())
            .await
            .expect("the process exits after SIGTERM in time")
            .unwrap();
        asked.elapsed()
    }

    /// The value of `series` on its metrics port (0 when it has no sample).
    pub async fn metric(&self, series: &str) -> f64 {
        let metrics = self.metrics.as_ref().expect("a metrics port");
        super::common::metric(metrics, series)
            .await
            .unwrap_or_default()
    }
}

/// File descriptors process `pid` holds open.
pub fn open_fds_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// This binary again, in `role`; it prints the address it serves on as its first line.
pub async fn spawn_role(role: &[&str]) -> Server {
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
    Server {
        child,
        addr,
        metrics: None,
    }
}

/// The simulator (the [`ROLE_SIM`] role, with the words after it): a real gateway's 10 s
/// long-poll wait and Guids rotating on poll answers every 60 s; no sign-out for missed polls
/// (agents wait unpolled between measurements) unless the first word is `sign-out`, which
/// keeps the gateway's 2 minutes; HTTPS when given a certificate and key file.
pub async fn role_sim(words: &[String]) {
    ccgw_callcontrol::install_crypto_provider();
    let (signs_out, tls_files) = match words {
        [first, rest @ ..] if first == SIGN_OUT => (true, rest),
        all => (false, all),
    };
    let defaults = ccgw_sim::SimConfig::default();
    let sim = ccgw_sim::Simulator::new(ccgw_sim::SimConfig {
        signout_after: defaults.signout_after.filter(|_| signs_out),
        ..defaults
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", listener.local_addr().unwrap());
    let served = match tls_files {
        [] => sim.serve(listener, std::future::pending()).await,
        [cert, key] => {
            let tls = ccgw_sim::tls::server_config(
                &std::fs::read(cert).unwrap(),
                &std::fs::read(key).unwrap(),
                None,
            )
            .expect("the simulator's certificate");
            sim.serve_tls(listener, tls, std::future::pending()).await
        }
        other => panic!("{ROLE_SIM} takes a certificate and a key file, not {other:?}"),
    };
    served.unwrap();
}

/// The gateway's certificate (for `localhost`, by a CA of its own) and the files that carry it
/// to the simulator and the facades.
struct GatewayCertificates {
    ca_pem: String,
    files: Files,
    cert: String,
    key: String,
    ca_bundle: String,
}

impl GatewayCertificates {
    fn new() -> Self {
        let ca = Ca::new("gateway CA");
        let files = Files::new();
        let (cert, key) = files.write_server(&ca.issue_for(&["localhost"]));
        let ca_bundle = files.write("ca.pem", &ca.pem);
        Self {
            ca_pem: ca.pem,
            files,
            cert,
            key,
            ca_bundle,
        }
    }
}

/// The simulator in its own process, and its REST and control API as a desktop and a test
/// operator use them (over HTTPS when it serves TLS).
pub struct Gateway {
    pub server: Server,
    /// `http://127.0.0.1:<port>`, or `https://localhost:<port>` (the name its certificate has).
    pub base: String,
    pub http: reqwest::Client,
    certificates: Option<GatewayCertificates>,
}

impl Gateway {
    /// The simulator, on HTTPS when `tls`; when `signs_out`, agents that miss their polls for
    /// the gateway's 2 minutes are signed out, as a real gateway does.
    pub async fn start(tls: bool, signs_out: bool) -> Self {
        let certificates = tls.then(GatewayCertificates::new);
        let mut role = vec![ROLE_SIM];
        if signs_out {
            role.push(SIGN_OUT);
        }
        if let Some(c) = &certificates {
            role.extend([c.cert.as_str(), c.key.as_str()]);
        }
        let server = spawn_role(&role).await;
        let (base, http) = match &certificates {
            None => (format!("http://{}", server.addr), reqwest::Client::new()),
            Some(c) => (
                format!("https://localhost:{}", server.addr.port()),
                reqwest::Client::builder()
                    .tls_certs_only([reqwest::Certificate::from_pem(c.ca_pem.as_bytes()).unwrap()])
                    .build()
                    .unwrap(),
            ),
        };
        Self {
            server,
            base,
            http,
            certificates,
        }
    }

    /// Whether it serves HTTPS.
    pub fn tls(&self) -> bool {
        self.certificates.is_some()
    }

    /// A facade's flags that point it at this gateway (and make it trust its certificate).
    pub fn facade_flags(&self) -> Vec<String> {
        let mut flags = vec!["--gateway-url".to_owned(), self.base.clone()];
        if let Some(c) = &self.certificates {
            flags.extend(["--gateway-ca-bundle".to_owned(), c.ca_bundle.clone()]);
        }
        flags
    }

    pub async fn control(&self, method: reqwest::Method, path: &str) -> serde_json::Value {
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
    pub async fn until_polls_in_flight(&self, polls: usize) {
        let deadline = Instant::now() + WAIT;
        loop {
            let stats = self.control(reqwest::Method::GET, "/stats").await;
            let in_flight = stats["polls_in_flight"].as_u64().unwrap_or_default();
            if in_flight == polls as u64 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{polls} polls in flight at the simulator within {WAIT:?}: {in_flight}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The simulator's view of agent `id` (its queued events, its polls in flight).
    pub async fn agent(&self, id: &str) -> serde_json::Value {
        self.control(reqwest::Method::GET, &format!("/agents/{id}"))
            .await
    }

    /// Waits until each of `ids` has been polled in its current session. Where polls are
    /// answered faster than they come back (many agents on a busy machine) the polls in flight
    /// seldom all wait at once, so each agent is asked about instead.
    pub async fn until_every_agent_polled(&self, ids: &[String]) {
        for id in ids {
            wait_for("the agent polled", Duration::from_millis(100), || async {
                self.agent(id).await["max_polls_in_flight"]
                    .as_u64()
                    .is_some_and(|polls| polls >= 1)
            })
            .await;
        }
    }

    /// How many of `ids` had more than one poll in flight at once since they signed in (two
    /// pollers stealing each other's events).
    pub async fn agents_polled_twice_at_once(&self, ids: &[String]) -> usize {
        stream::iter(ids.iter().map(|id| async move {
            self.agent(id).await["max_polls_in_flight"]
                .as_u64()
                .is_some_and(|polls| polls > 1)
        }))
        .buffer_unordered(32)
        .filter(|twice| std::future::ready(*twice))
        .count()
        .await
    }

    /// Signs `ids` in as their desktops would; their Guids, in order.
    pub async fn sign_in(&self, ids: &[String]) -> Vec<String> {
        stream::iter(ids.iter().map(|id| async move {
            desktop_sign_in_at(&self.http, &self.base, id, false)
                .await
                .guid
        }))
        .buffered(32)
        .collect()
        .await
    }
}

/// `count` agent ids from [`FIRST_AGENT`] on.
pub fn agent_ids(count: usize) -> Vec<String> {
    (FIRST_AGENT..FIRST_AGENT + count)
        .map(|n| n.to_string())
        .collect()
}

/// The facade's release binary on `gateway`, with the limits an operator sizing a pod for many
/// agents sets, one caller getting all of each shared capacity, and `flags` beside. Its
/// warnings and errors are echoed here.
pub async fn spawn_facade(gateway: &Gateway, flags: &[String]) -> Server {
    spawn_facade_at(
        env!("CARGO_BIN_EXE_ccgw-callcontrol"),
        gateway,
        "127.0.0.1:0",
        flags,
    )
    .await
}

/// [`spawn_facade`] with the facade binary at `binary`, listening on `listen`.
pub async fn spawn_facade_at(
    binary: &str,
    gateway: &Gateway,
    listen: &str,
    flags: &[String],
) -> Server {
    let mut child = Command::new(binary)
        .args(gateway.facade_flags())
        .arg("--no-caller-auth")
        .args(["--listen", listen, "--log-format", "json"])
        .args(["--max-watchers", "100000", "--max-agent-id", "999999"])
        .args(["--max-streams-per-caller", "100000"])
        .args(super::ONE_CALLER_GETS_ALL)
        .args(flags)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut logs = BufReader::new(child.stderr.take().unwrap()).lines();
    let serving = tokio::time::timeout(WAIT, async {
        while let Some(line) = logs.next_line().await.unwrap() {
            let entry: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if entry["message"] == super::common::SERVING {
                return entry;
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
    Server {
        child,
        addr: serving["listen"].as_str().unwrap().parse().unwrap(),
        metrics: serving["metrics"].as_str().map(str::to_owned),
    }
}

/// Polls `done` every `every` until it holds; panics after [`WAIT`].
pub async fn wait_for<F: std::future::Future<Output = bool>>(
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

pub fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// A release event a stream received: the index of its agent, the call, when.
pub type Delivery = (usize, String, Instant);

/// Streams open at the facades, each read by a task of its own that reports every release
/// event it receives.
pub struct OpenStreams {
    readers: Vec<JoinHandle<()>>,
}

impl OpenStreams {
    /// Cancels every stream (the client resets it) and drops the connections.
    pub fn close(self) {
        for reader in self.readers {
            reader.abort();
        }
    }
}

/// `per_agent` single-agent streams for each of `ids` (the Guid `guids[n]` handed over), over
/// HTTP/2 connections of at most [`STREAMS_PER_CONNECTION`] streams that take turns over
/// `facades` (as a Kubernetes Service spreads connections over its pods); stream n (agent
/// n / per_agent) on connection n % connections, so that one agent's streams are on different
/// facades.
// Each opened stream yields its reader task's handle: kept, not awaited, until the round ends.
#[allow(clippy::async_yields_async)]
pub async fn open_streams(
    facades: &[SocketAddr],
    ids: &[String],
    guids: &[String],
    per_agent: usize,
    delivered: mpsc::UnboundedSender<Delivery>,
) -> OpenStreams {
    let total = ids.len() * per_agent;
    let connections = total
        .div_ceil(STREAMS_PER_CONNECTION)
        .next_multiple_of(facades.len());
    let mut channels = Vec::new();
    for c in 0..connections {
        channels.push(
            Channel::from_shared(format!("http://{}", facades[c % facades.len()]))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    let readers = stream::iter(0..total)
        .map(|n| {
            let agent = n / per_agent;
            let request = handing_over(watch_req(&[&ids[agent]]), &guids[agent]);
            let mut client = CallControlClient::new(channels[n % connections].clone());
            let delivered = delivered.clone();
            async move {
                let mut stream = client
                    .watch_release_events(request)
                    .await
                    .expect("the facade opens the stream")
                    .into_inner();
                tokio::spawn(async move {
                    while let Ok(Some(message)) = stream.message().await {
                        if let Some(Item::Event(event)) = message.item {
                            let _ = delivered.send((agent, event.call_id, Instant::now()));
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

/// A run of hang-ups stops once this many missed a delivery: the shape does not work.
const HANG_UPS_MISSED_TO_GIVE_UP: usize = 5;

/// What the hang-ups delivered.
pub struct Delivered {
    /// From just before each hang-up request left this process to each stream receiving each
    /// of its release events, µs.
    pub latency: Histogram<u64>,
    /// Events some stream lacked when [`DELIVERY_WAIT`] ran out, and the hang-ups they were of.
    pub events_missed: usize,
    pub hang_ups_missed: usize,
    /// Hang-ups carried out (fewer than asked when the run gave up).
    pub hang_ups: usize,
    /// Events of another call or agent (a late one of an earlier hang-up).
    pub strays: usize,
}

/// `count` customer hang-ups, one at a time, each on a watched agent chosen at random: a call
/// is placed, its first events polled, then the customer hangs up; every one of the agent's
/// `per_agent` streams should receive the hang-up's two release events. Gives up after
/// [`HANG_UPS_MISSED_TO_GIVE_UP`] hang-ups with events missing.
pub async fn hang_ups(
    gateway: &Gateway,
    ids: &[String],
    per_agent: usize,
    count: usize,
    deliveries: &mut mpsc::UnboundedReceiver<Delivery>,
) -> Delivered {
    let mut result = Delivered {
        latency: Histogram::new(3).unwrap(),
        events_missed: 0,
        hang_ups_missed: 0,
        hang_ups: 0,
        strays: 0,
    };
    for _ in 0..count {
        let agent = rand::random_range(0..ids.len());
        let id = &ids[agent];
        gateway
            .control(reqwest::Method::POST, &format!("/agents/{id}/calls"))
            .await;
        // Hang up only once the poll loop is back in its long poll, as in production, where
        // talking takes longer than two polls.
        wait_for(
            "the call's events polled",
            Duration::from_millis(1),
            || async {
                let view = gateway.agent(id).await;
                view["queued_events"].as_u64() == Some(0)
                    && view["polls_in_flight"].as_u64().unwrap_or_default() >= 1
            },
        )
        .await;
        let hung_up = Instant::now();
        let answer = gateway
            .control(
                reqwest::Method::POST,
                &format!("/agents/{id}/customer-hangup"),
            )
            .await;
        let call = answer["callid"].as_str().unwrap().to_owned();
        let deadline = tokio::time::Instant::from_std(hung_up + DELIVERY_WAIT);
        let mut missing = 2 * per_agent;
        while missing > 0 {
            let Ok(Some((who, call_id, at))) =
                tokio::time::timeout_at(deadline, deliveries.recv()).await
            else {
                break;
            };
            if who == agent && call_id == call {
                result
                    .latency
                    .record((at - hung_up).as_micros() as u64)
                    .unwrap();
                missing -= 1;
            } else {
                result.strays += 1;
            }
        }
        result.hang_ups += 1;
        if missing > 0 {
            result.events_missed += missing;
            result.hang_ups_missed += 1;
            if result.hang_ups_missed >= HANG_UPS_MISSED_TO_GIVE_UP {
                println!("  giving up: {HANG_UPS_MISSED_TO_GIVE_UP} hang-ups missed deliveries");
                break;
            }
        }
    }
    result
}
