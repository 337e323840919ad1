//! Facade processes sharing one NATS and one simulator: the replication tests' harness.
//! Replicas are real processes (the service binary), so they can be killed (SIGKILL), paused
//! (SIGSTOP) and restarted; watchers are real gRPC clients that move to another replica with
//! their resume token when their stream breaks, as a client behind a Kubernetes Service would.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use ccgw_callcontrol::proto::{
    call_control_client::CallControlClient, watch_release_events_response::Item,
    ReleaseCallRequest, ReleaseCallResponse, ReleaseKind, ReleaseOutcome,
};
use ccgw_sim::{SimConfig, Simulator};
use tokio::{process::Child, sync::oneshot};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

use super::{
    client_of, desktop_sign_in, exits_cleanly, handing_over, health_becomes, metric,
    nats::NatsServer, release_req, resume_req, signal, sim_config, spawn_service_until, spawn_sim,
    watch_req, DesktopSession, KeptLogs, Signal, SERVING, WAIT,
};

/// Bound of the wait for a new replica's readiness: the replicas before it hand its shards back
/// once their polls in flight end (up to a poll timeout).
const READY_WITHIN: Duration = Duration::from_secs(60);

/// How replicas time their shard leases (`--poll-timeout-ms`, `--lease-renew-secs`,
/// `--lease-ttl-secs`).
#[derive(Debug, Clone, Copy)]
pub struct Leases {
    poll_timeout: Duration,
    renew: Duration,
    ttl: Duration,
}

impl Leases {
    /// Takeovers within seconds that stay valid (poll timeout + renew + margin < TTL): polls
    /// time out after 11 s, leases are renewed every second, and a replica gone for 15 s loses
    /// its shards.
    pub const fn fast() -> Self {
        Self {
            poll_timeout: Duration::from_secs(11),
            renew: Duration::from_secs(1),
            ttl: Duration::from_secs(15),
        }
    }

    /// These leases, renewed every `secs`.
    pub const fn renew_secs(self, secs: u64) -> Self {
        Self {
            renew: Duration::from_secs(secs),
            ..self
        }
    }

    /// These leases, expiring `secs` after their last renewal.
    pub const fn ttl_secs(self, secs: u64) -> Self {
        Self {
            ttl: Duration::from_secs(secs),
            ..self
        }
    }

    /// How often a held lease is renewed.
    pub const fn renew(&self) -> Duration {
        self.renew
    }

    /// How long a lease stays without renewal before another replica may take its shard.
    pub const fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How long a poll may stay at the gateway.
    pub const fn poll_timeout(&self) -> Duration {
        self.poll_timeout
    }

    /// The service's flags for these leases.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--poll-timeout-ms".into(),
            self.poll_timeout.as_millis().to_string(),
            "--lease-renew-secs".into(),
            self.renew.as_secs().to_string(),
            "--lease-ttl-secs".into(),
            self.ttl.as_secs().to_string(),
        ]
    }
}

/// The NATS replicas share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// One server.
    OneNode,
    /// Three servers in one JetStream cluster.
    Cluster,
    /// No server yet: the replicas are pointed at this loopback port, where the test may start
    /// one later (a replica waits for NATS).
    Later(u16),
}

/// How a [`ReplicaSet`] starts: its NATS, its simulator and the flags of its replicas.
#[must_use]
pub struct ReplicaSetBuilder {
    topology: Topology,
    nats_config: Option<String>,
    sim: SimConfig,
    leases: Option<Leases>,
    flags: Vec<String>,
}

impl ReplicaSetBuilder {
    /// NATS as three servers in one JetStream cluster, instead of one.
    pub fn cluster(self) -> Self {
        Self {
            topology: Topology::Cluster,
            ..self
        }
    }

    /// No NATS yet: replicas are pointed at `port` (from [`free_port`](super::nats::free_port)).
    pub fn nats_later(self, port: u16) -> Self {
        Self {
            topology: Topology::Later(port),
            ..self
        }
    }

    /// Each NATS server also reads `config` (nats-server configuration text).
    pub fn nats_config(self, config: &str) -> Self {
        Self {
            nats_config: Some(config.to_owned()),
            ..self
        }
    }

    /// The simulator's configuration, instead of [`sim_config`].
    pub fn sim(self, sim: SimConfig) -> Self {
        Self { sim, ..self }
    }

    /// The replicas' lease timing, instead of the service's defaults.
    pub fn leases(self, leases: Leases) -> Self {
        Self {
            leases: Some(leases),
            ..self
        }
    }

    /// Flags every replica gets on top of the gateway, NATS, metrics port and leases.
    pub fn flags(mut self, flags: &[&str]) -> Self {
        self.flags.extend(flags.iter().map(|f| (*f).to_owned()));
        self
    }

    /// NATS and the simulator, no replica yet; `None` (the test skips) when nats-server is not
    /// installed.
    pub async fn start(self) -> Option<ReplicaSet> {
        let config = self.nats_config.as_deref();
        let (nats, nats_url) = match self.topology {
            Topology::OneNode => {
                let server = NatsServer::start_configured(config).await?;
                let url = server.url();
                (vec![server], url)
            }
            Topology::Cluster => {
                let servers = NatsServer::cluster_configured(config).await?;
                let urls = NatsServer::urls(&servers);
                (servers, urls)
            }
            Topology::Later(port) => (Vec::new(), format!("nats://127.0.0.1:{port}")),
        };
        let (sim, sim_addr, stop_sim) = spawn_sim(self.sim, None).await;
        let mut flags = self.leases.map(|l| l.flags()).unwrap_or_default();
        flags.extend(self.flags);
        Some(ReplicaSet {
            sim,
            sim_addr,
            _stop_sim: stop_sim,
            nats,
            nats_url,
            flags,
            replicas: Vec::new(),
        })
    }

    /// [`start`](Self::start), then `n` replicas in [`ReplicaSet::replicas`], each started once
    /// the one before is ready.
    pub async fn start_ready(self, n: usize) -> Option<ReplicaSet> {
        let mut set = self.start().await?;
        for _ in 0..n {
            let replica = set.spawn_ready().await;
            set.replicas.push(replica);
        }
        Some(set)
    }
}

/// Facade processes on one simulator, sharing one NATS (one server or a cluster).
pub struct ReplicaSet {
    pub sim: Simulator,
    pub sim_addr: SocketAddr,
    _stop_sim: oneshot::Sender<()>,
    /// The NATS servers: one, the cluster's three, or none (started later by the test).
    pub nats: Vec<NatsServer>,
    /// What the replicas' `--nats-url` says.
    nats_url: String,
    /// The flags every replica gets (its leases' and the builder's).
    flags: Vec<String>,
    /// The replicas the set keeps: [`ReplicaSetBuilder::start_ready`]'s and
    /// [`restart`](Self::restart)'s (a test may keep its own from [`spawn`](Self::spawn)).
    pub replicas: Vec<Replica>,
}

impl ReplicaSet {
    /// One NATS server, [`sim_config`]'s simulator, the service's default leases.
    pub fn builder() -> ReplicaSetBuilder {
        ReplicaSetBuilder {
            topology: Topology::OneNode,
            nats_config: None,
            sim: sim_config(),
            leases: None,
            flags: Vec::new(),
        }
    }

    /// The simulator's URL, the replicas' `--gateway-url`.
    pub fn gateway_url(&self) -> String {
        format!("http://{}", self.sim_addr)
    }

    /// What the replicas' `--nats-url` says.
    pub fn nats_url(&self) -> &str {
        &self.nats_url
    }

    /// A replica with `flags` on top of the set's, once its gRPC port serves (ready or not:
    /// it may still wait for its shards, or for NATS).
    pub async fn spawn(&self, flags: &[&str]) -> Replica {
        self.spawn_until(flags, SERVING).await
    }

    /// [`spawn`](Self::spawn), returning once the replica logged `message` (e.g. that it waits
    /// for NATS).
    pub async fn spawn_until(&self, flags: &[&str], message: &str) -> Replica {
        self.spawn_on(&self.gateway_url(), &self.nats_url, flags, message)
            .await
    }

    /// A replica with `flags` on top of the set's, reaching its gateway at `gateway_url` and
    /// NATS at `nats_url` (e.g. through a [`NatsLink`](super::nats::NatsLink)), once it logged
    /// `message`.
    pub async fn spawn_on(
        &self,
        gateway_url: &str,
        nats_url: &str,
        flags: &[&str],
        message: &str,
    ) -> Replica {
        let mut args = vec![
            "--gateway-url",
            gateway_url,
            "--nats-url",
            nats_url,
            "--metrics-listen",
            "127.0.0.1:0",
        ];
        args.extend(self.flags.iter().map(String::as_str));
        args.extend_from_slice(flags);
        let (process, line, logs) = spawn_service_until(&args, &[], message).await;
        let addr = |name: &str| line[name].as_str().map(str::to_owned);
        let grpc = addr("listen");
        Replica {
            process: Some(process),
            metrics: addr("metrics").expect("the replica's metrics address"),
            health: addr("health").or_else(|| grpc.clone()),
            grpc,
            logs,
        }
    }

    /// A replica, once it is ready, as a Kubernetes rollout waits for it: then it has taken
    /// its share of the shards, so the replicas before it have handed theirs back and which
    /// replica polls an agent no longer changes under a test.
    async fn spawn_ready(&self) -> Replica {
        let replica = self.spawn(&[]).await;
        health_becomes(replica.health(), "", ServingStatus::Serving, READY_WITHIN).await;
        replica
    }

    /// Starts replica `i` again (after a kill or stop), on a new address, once it is ready.
    pub async fn restart(&mut self, i: usize) {
        assert!(!self.replicas[i].is_running(), "replica {i} still runs");
        self.replicas[i] = self.spawn_ready().await;
    }

    /// The addresses of the kept replicas running now.
    pub fn live_addrs(&self) -> Vec<String> {
        self.replicas
            .iter()
            .filter(|r| r.is_running())
            .map(|r| r.addr().to_owned())
            .collect()
    }

    /// The agent signs in at the gateway (as its desktop would) and its session is handed
    /// over to each of `replicas`; the others may learn it through NATS.
    pub async fn sign_in_and_hand_over(
        &self,
        agent: &str,
        replicas: &[&Replica],
    ) -> DesktopSession {
        let desktop = desktop_sign_in(self.sim_addr, agent, false).await;
        for replica in replicas {
            replica.hand_over(agent, &desktop.guid).await;
        }
        desktop
    }

    /// A call placed on `agent` that its customer hangs up: two release events.
    pub fn hang_up(&self, agent: &str) -> String {
        super::hang_up(&self.sim, agent, super::CALLER)
    }

    /// The most polls of `agent` the simulator had in flight at once since its sign-in.
    pub fn max_polls_in_flight(&self, agent: &str) -> u32 {
        super::max_polls_in_flight(&self.sim, agent)
    }
}

/// One facade process of a [`ReplicaSet`].
pub struct Replica {
    process: Option<Child>,
    /// Its gRPC address, once it serves.
    grpc: Option<String>,
    /// Its metrics endpoint's address.
    pub metrics: String,
    /// Its health service's address (`--health-listen`'s, else the gRPC port's), once known.
    health: Option<String>,
    /// Its log lines from the one its start waited for on.
    pub logs: KeptLogs,
}

impl Replica {
    /// Its gRPC address.
    pub fn addr(&self) -> &str {
        self.grpc.as_deref().expect("the replica serves gRPC")
    }

    /// Its health service's address.
    pub fn health(&self) -> &str {
        self.health
            .as_deref()
            .expect("the replica serves health checks")
    }

    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// Its process, while it runs.
    pub fn process(&mut self) -> &mut Child {
        self.process.as_mut().expect("a running replica")
    }

    /// A client of its gRPC port.
    pub async fn client(&self) -> CallControlClient<Channel> {
        client_of(self.addr()).await
    }

    /// The value of `series` on its metrics endpoint (see [`metric`]).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        metric(&self.metrics, series).await
    }

    /// How many of its log lines (since its start) contain `message`.
    pub fn times_logged(&self, message: &str) -> usize {
        self.logs.lock().unwrap().matches(message).count()
    }

    /// Hands `agent`'s session `guid` over with a release that finds no call.
    pub async fn hand_over(&self, agent: &str, guid: &str) {
        let answer = self
            .release(handing_over(release_req(agent), guid))
            .await
            .expect("the handed-over session is accepted");
        assert_eq!(answer.outcome(), ReleaseOutcome::NoActiveCall, "{answer:?}");
    }

    pub async fn release(
        &self,
        request: impl tonic::IntoRequest<ReleaseCallRequest>,
    ) -> Result<ReleaseCallResponse, tonic::Status> {
        self.client()
            .await
            .release_call(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// SIGKILL: no drain, nothing handed back; waits for the exit.
    pub async fn kill(&mut self) {
        let mut process = self.process.take().expect("a running replica");
        process.kill().await.unwrap();
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    pub async fn stop(&mut self) {
        let process = self.process.take().expect("a running replica");
        signal(&process, Signal::Term).await;
        exits_cleanly(process).await;
    }

    /// SIGSTOP: the replica frozen as by a long GC pause or a VM stall, its sockets open.
    pub async fn pause(&self) {
        signal(self.running(), Signal::Stop).await;
    }

    /// SIGCONT, after [`pause`](Self::pause).
    pub async fn resume(&self) {
        signal(self.running(), Signal::Cont).await;
    }

    fn running(&self) -> &Child {
        self.process.as_ref().expect("a running replica")
    }
}

/// What a roaming watcher saw, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Event(ReleaseKind, String),
    Gap(Vec<String>),
}

/// A watcher of `agents` that keeps a stream open on one of the live replicas and, when the
/// stream breaks (its replica killed, stopped or paused past the heartbeat), resumes with its
/// last token on the next replica in `targets`.
pub struct RoamingWatcher {
    seen: Arc<Mutex<Vec<Seen>>>,
    targets: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RoamingWatcher {
    /// Starts watching on `targets[0]`; returns once the first stream is open (its first
    /// heartbeat or event arrived is not waited for: subscribing happens when the call is
    /// answered).
    pub async fn start(agents: &[&str], targets: Vec<String>) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let targets = Arc::new(Mutex::new(targets));
        let agents: Vec<String> = agents.iter().map(|a| (*a).to_owned()).collect();
        let (opened, first_open) = oneshot::channel();
        let task = tokio::spawn(roam(agents, seen.clone(), targets.clone(), opened));
        tokio::time::timeout(WAIT, first_open)
            .await
            .expect("the first stream opens")
            .unwrap();
        Self {
            seen,
            targets,
            task,
        }
    }

    /// Where to go when the stream breaks.
    pub fn set_targets(&self, targets: Vec<String>) {
        *self.targets.lock().unwrap() = targets;
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits (bounded by `within`) until the watcher has seen `n` events.
    pub async fn until_events(&self, n: usize, within: Duration) -> Vec<Seen> {
        let waited = tokio::time::timeout(within, async {
            loop {
                let events = self
                    .seen()
                    .iter()
                    .filter(|s| matches!(s, Seen::Event(..)))
                    .count();
                if events >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let seen = self.seen();
        assert!(waited.is_ok(), "{n} events within {within:?}; saw {seen:?}");
        seen
    }
}

impl Drop for RoamingWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn roam(
    agents: Vec<String>,
    seen: Arc<Mutex<Vec<Seen>>>,
    targets: Arc<Mutex<Vec<String>>>,
    opened: oneshot::Sender<()>,
) {
    let agent_refs: Vec<&str> = agents.iter().map(String::as_str).collect();
    let mut token: Option<String> = None;
    let mut opened = Some(opened);
    let mut attempt = 0usize;
    loop {
        let target = {
            let targets = targets.lock().unwrap();
            targets[attempt % targets.len()].clone()
        };
        attempt += 1;
        let request = match &token {
            Some(token) => resume_req(&agent_refs, token),
            None => watch_req(&agent_refs),
        };
        let connected = tokio::time::timeout(WAIT, async {
            client_of(&target).await.watch_release_events(request).await
        })
        .await;
        let mut stream = match connected {
            Ok(Ok(response)) => response.into_inner(),
            _ => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if let Some(opened) = opened.take() {
            let _ = opened.send(());
        }
        // A paused replica sends nothing, not even heartbeats: a stream silent for longer than
        // a few heartbeat intervals (1 s in these tests) is given up.
        loop {
            let message = match tokio::time::timeout(Duration::from_secs(5), stream.message()).await
            {
                Ok(Ok(Some(message))) => message,
                // An ending stream's status carries where to resume (ErrorInfo metadata).
                Ok(Err(status)) => {
                    if let Some(resume) = super::error_metadata(&status).remove("resume_token") {
                        token = Some(resume);
                    }
                    break;
                }
                Ok(Ok(None)) | Err(_) => break,
            };
            match message.item {
                Some(Item::Event(event)) => {
                    token = Some(event.resume_token.clone());
                    let kind = event.kind();
                    seen.lock().unwrap().push(Seen::Event(kind, event.call_id));
                }
                Some(Item::Heartbeat(heartbeat)) => token = Some(heartbeat.resume_token),
                Some(Item::Gap(gap)) => seen.lock().unwrap().push(Seen::Gap(gap.agent_ids)),
                Some(Item::SessionEnded(_)) | None => {}
            }
        }
    }
}

/// Starts the service on `nats_url` with `flags`, expecting it to refuse: its stderr.
pub async fn refused_start(nats_url: &str, flags: &[&str]) -> String {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_ccgw-callcontrol"))
        .args(["--gateway-url", "http://127.0.0.1:9", "--no-caller-auth"])
        .args(["--listen", "127.0.0.1:0"])
        .args(["--nats-url", nats_url])
        .args(flags)
        .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(30), output)
        .await
        .expect("the process exits")
        .unwrap();
    assert!(!output.status.success());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A loopback NATS URL nothing listens on.
pub fn nobody_listening() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("nats://127.0.0.1:{port}")
}
