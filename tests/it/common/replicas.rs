//! Several facade processes sharing one NATS and one simulator: the replication scenarios'
//! harness. Replicas are real processes (the service binary), so they can be killed (SIGKILL),
//! paused (SIGSTOP) and restarted; watchers are real gRPC clients that move to another replica
//! with their resume token when their stream breaks, as a client behind a Kubernetes Service
//! would.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use ccgw_callcontrol::proto::{
    watch_release_events_response::Item, ReleaseCallRequest, ReleaseCallResponse, ReleaseKind,
};
use ccgw_sim::Simulator;
use tokio::{process::Child, sync::oneshot};

use super::{
    client_of, desktop_sign_in, handing_over, health_becomes, release_req, resume_req, sim_config,
    spawn_service_logging, spawn_sim, watch_req, WAIT,
};
use tonic_health::pb::health_check_response::ServingStatus;

/// Bound of the wait for a new replica's readiness: the replicas before it hand its shards back
/// once their polls in flight end (up to a poll timeout).
const READY_WITHIN: Duration = Duration::from_secs(60);

/// Lease settings that make takeovers quick but stay valid (poll timeout + renew + margin <
/// TTL): a replica gone for 15 s loses its shards.
pub const FAST_LEASES: [&str; 6] = [
    "--poll-timeout-ms",
    "11000",
    "--lease-renew-secs",
    "1",
    "--lease-ttl-secs",
    "15",
];

pub struct Replica {
    child: Option<Child>,
    /// Its gRPC address (a new one after each start).
    pub addr: String,
    pub metrics: String,
}

pub struct ReplicaSet {
    pub sim: Simulator,
    pub sim_addr: SocketAddr,
    _stop_sim: oneshot::Sender<()>,
    args: Vec<String>,
    pub replicas: Vec<Replica>,
}

impl Replica {
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl ReplicaSet {
    /// `n` replicas on one simulator, sharing `nats_url`, with `flags` on top of the defaults.
    pub async fn start(nats_url: &str, n: usize, flags: &[&str]) -> Self {
        let (sim, sim_addr, stop_sim) = spawn_sim(sim_config(), None).await;
        let mut args: Vec<String> = vec![
            "--gateway-url".into(),
            format!("http://{sim_addr}"),
            "--nats-url".into(),
            nats_url.into(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
        ];
        args.extend(flags.iter().map(|f| (*f).to_owned()));
        let mut set = Self {
            sim,
            sim_addr,
            _stop_sim: stop_sim,
            args,
            replicas: Vec::new(),
        };
        for _ in 0..n {
            let replica = set.spawn().await;
            set.replicas.push(replica);
        }
        set
    }

    /// A new replica, once it is ready, as a Kubernetes rollout waits for it: then it has taken
    /// its share of the shards, so the replicas before it have handed theirs back and which
    /// replica polls an agent no longer changes under a test.
    async fn spawn(&self) -> Replica {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let (child, serving) = spawn_service_logging(&args, &[]).await;
        let addr = serving["listen"].as_str().unwrap().to_owned();
        health_becomes(&addr, "", ServingStatus::Serving, READY_WITHIN).await;
        Replica {
            child: Some(child),
            addr,
            metrics: serving["metrics"].as_str().unwrap().to_owned(),
        }
    }

    /// The addresses of the replicas running now.
    pub fn live_addrs(&self) -> Vec<String> {
        self.replicas
            .iter()
            .filter(|r| r.child.is_some())
            .map(|r| r.addr.clone())
            .collect()
    }

    /// Starts replica `i` again (after a kill or stop), on a new address.
    pub async fn restart(&mut self, i: usize) {
        assert!(self.replicas[i].child.is_none(), "replica {i} still runs");
        self.replicas[i] = self.spawn().await;
    }

    /// SIGKILL: no drain, nothing handed back.
    pub async fn kill(&mut self, i: usize) {
        let mut child = self.replicas[i].child.take().expect("a running replica");
        child.kill().await.unwrap();
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    pub async fn stop(&mut self, i: usize) {
        let child = self.replicas[i].child.take().expect("a running replica");
        super::sigterm(&child).await;
        super::exits_cleanly(child).await;
    }

    /// SIGSTOP (`pause: true`) or SIGCONT: a replica frozen as by a long GC pause or a VM
    /// stall, its sockets open.
    pub async fn signal_pause(&self, i: usize, pause: bool) {
        let pid = self.replicas[i].child.as_ref().unwrap().id().unwrap();
        let signal = if pause { "-STOP" } else { "-CONT" };
        let status = tokio::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .await
            .unwrap();
        assert!(status.success());
    }

    /// The agent signs in at the gateway (as its desktop would) and its session is handed over
    /// once, on replica `i`; the other replicas learn it through NATS.
    pub async fn sign_in_on(&self, i: usize, agent: &str) {
        let desktop = desktop_sign_in(self.sim_addr, agent, false).await;
        client_of(&self.replicas[i].addr)
            .await
            .release_call(handing_over(release_req(agent), &desktop.guid))
            .await
            .expect("the handed-over session is accepted");
    }

    pub async fn release_on(
        &self,
        i: usize,
        request: ReleaseCallRequest,
    ) -> Result<ReleaseCallResponse, tonic::Status> {
        client_of(&self.replicas[i].addr)
            .await
            .release_call(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// A call placed on `agent` that its customer hangs up: two release events.
    pub fn hang_up(&self, agent: &str) -> String {
        let call_id = self.sim.place_call(agent, super::CALLER).unwrap();
        assert_eq!(self.sim.customer_hangup(agent).unwrap(), call_id);
        call_id
    }

    /// The most polls of `agent` the simulator had in flight at once since its sign-in.
    pub fn max_polls_in_flight(&self, agent: &str) -> u32 {
        self.sim.agent(agent).map_or(0, |v| v.max_polls_in_flight)
    }

    /// A metric's value on replica `i` (summed over its label sets), 0 when absent.
    pub async fn metric(&self, i: usize, name: &str) -> f64 {
        metric_at(&self.replicas[i].metrics, name).await
    }
}

/// A metric's value on the metrics endpoint at `addr` (summed over its label sets), 0 when
/// absent.
pub async fn metric_at(addr: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
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
