//! A rolling restart under load: the deployed shape of `scale` (three replicas on NATS, the
//! simulator in a process of its own, this process the load client) while the replicas are
//! restarted one after another the way Kubernetes does it (SIGTERM, wait for the exit, start
//! again, wait for readiness), then the NATS servers (lame-duck mode first, as their
//! StatefulSet's preStop does). Every stream resumes on another replica with its last token
//! when it ends; every 100 ms a ReleaseCall (with a request_id) hangs up a call placed on a
//! random agent. Reported: the release events some stream missed after its resumes, Gaps,
//! duplicates, the longest an agent went unpolled and its most polls in flight at once (from the
//! simulator), agents signed out, and the ReleaseCalls' answers by code.
//!
//! `CCGW_RESTART_BINARY=<path>` restarts the replicas as another build (an upgrade rehearsal:
//! the old version runs first, the new one is what each replica comes back as).
use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Mutex,
    },
};

use crate::support::common::{error_metadata, health_becomes, nats::free_port, resume_req};
use ccgw_callcontrol::proto::ReleaseKind;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_check_response::ServingStatus;

use super::*;

/// One hang-up every this long, on a random agent without a call.
const HANG_UP_EVERY: Duration = Duration::from_millis(100);
/// How long the load runs before the first restart, and after the last one before it stops.
const STEADY: Duration = Duration::from_secs(20);
/// Bound of a replica's exit after SIGTERM: its drain (`--drain-timeout-secs`, 10 s) and more.
const EXIT_WITHIN: Duration = Duration::from_secs(60);
/// Bound of a nats-server's exit in lame-duck mode: the deployed grace period and duration
/// (10 s + 30 s) and more.
const LAME_DUCK_WITHIN: Duration = Duration::from_secs(90);
/// A stream silent this long (several heartbeats) is given up and resumed elsewhere.
const SILENT_STREAM: Duration = Duration::from_secs(60);
/// How long a client waits before it opens a stream again after one ended; each refusal in a
/// row doubles it, up to [`MAX_RESUME_BACKOFF`].
const RESUME_BACKOFF: Duration = Duration::from_millis(100);
const MAX_RESUME_BACKOFF: Duration = Duration::from_secs(5);

/// Whether a stream ending or refused with `status` can never be resumed: the agent's gateway
/// session is gone (signed out), and only its desktop signing in again would bring one.
fn session_gone(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition
        && matches!(
            reason(status).as_str(),
            "NO_SESSION" | "AGENT_NOT_SIGNED_IN"
        )
}

/// The reason of a status's ErrorInfo, empty when it has none.
fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
        .unwrap_or_default()
}

/// Which replicas a Kubernetes Service would send new connections and calls to: not one that
/// was sent SIGTERM (its endpoint is removed) and not one that is not ready yet.
struct Endpoints {
    up: Vec<AtomicBool>,
}

impl Endpoints {
    fn up(&self, replica: usize) -> bool {
        self.up[replica].load(Ordering::Relaxed)
    }

    fn set(&self, replica: usize, up: bool) {
        self.up[replica].store(up, Ordering::Relaxed);
    }

    /// `from` if it is up, else the next one that is.
    fn first_up_from(&self, from: usize) -> Option<usize> {
        (0..self.up.len())
            .map(|step| (from + step) % self.up.len())
            .find(|&replica| self.up(replica))
    }
}

/// What one stream received over all its resumes.
#[derive(Default)]
struct StreamLog {
    /// Call id and kind of every release event, in order of arrival.
    events: Mutex<Vec<(String, i32)>>,
    gaps: AtomicUsize,
    /// Times it was opened again with its last token.
    resumes: AtomicUsize,
}

/// The load client's shared state.
struct Load {
    endpoints: Endpoints,
    /// Per replica: connections enough to carry every stream on that replica alone (the
    /// facade takes 256 streams on one connection), so that a restart never queues a resume
    /// behind a full connection.
    channels: Vec<Vec<Channel>>,
    ids: Vec<String>,
    guids: Vec<String>,
    per_agent: usize,
    logs: Vec<StreamLog>,
    /// Streams opened at least once.
    opened: AtomicUsize,
    /// How streams ended, and why opening one was refused, by gRPC code and ErrorInfo reason.
    endings: Mutex<BTreeMap<String, usize>>,
    /// ReleaseCalls' answers by outcome or code and reason.
    answers: Mutex<BTreeMap<String, usize>>,
    /// Agents with a call placed and not yet ended.
    busy: Mutex<std::collections::HashSet<usize>>,
    /// Calls ended (by the ReleaseCall, or by the customer when it failed): agent, call id, when
    /// the hang-up was asked.
    hung_up: Mutex<Vec<(usize, String, Instant)>>,
    /// When each release event reached each stream: call id to arrival instants.
    arrivals: Mutex<HashMap<String, Vec<Instant>>>,
    /// Cancelled when the hang-ups stop, and when the streams do.
    hanging_up: CancellationToken,
    stop: CancellationToken,
}

impl Load {
    fn count(map: &Mutex<BTreeMap<String, usize>>, what: String) {
        *map.lock().unwrap().entry(what).or_default() += 1;
    }
}

/// `CODE REASON` of a status (the reason from its ErrorInfo, when it has one).
fn code_and_reason(status: &tonic::Status) -> String {
    format!("{:?} {}", status.code(), reason(status))
}

/// Stream `n` (agent `n / per_agent`) for as long as the load runs: opened on replica
/// `n % replicas` with the agent's Guid handed over, then, whenever it ends, opened again on
/// the next replica that is up with the last resume token it had.
async fn keep_watching(load: Arc<Load>, n: usize) {
    let agent = n / load.per_agent;
    let id = load.ids[agent].as_str();
    let log = &load.logs[n];
    let replicas = load.channels.len();
    let (mut replica, mut token, mut opened) = (n % replicas, None::<String>, false);
    let mut backoff = RESUME_BACKOFF;
    while !load.stop.is_cancelled() {
        let Some(up) = load.endpoints.first_up_from(replica) else {
            tokio::time::sleep(RESUME_BACKOFF).await;
            continue;
        };
        replica = up;
        let message = match &token {
            Some(token) => resume_req(&[id], token),
            None => watch_req(&[id]),
        };
        // The first open hands the desktop's Guid over; afterwards the replicas share it.
        let request = if opened {
            tonic::Request::new(message)
        } else {
            handing_over(message, &load.guids[agent])
        };
        let channels = &load.channels[replica];
        let channel = channels[(n / replicas) % channels.len()].clone();
        let mut client = CallControlClient::new(channel);
        let open = client.watch_release_events(request);
        match tokio::time::timeout(processes::WAIT, open).await {
            Ok(Ok(response)) => {
                backoff = RESUME_BACKOFF;
                if opened {
                    log.resumes.fetch_add(1, Ordering::Relaxed);
                } else {
                    opened = true;
                    load.opened.fetch_add(1, Ordering::Relaxed);
                }
                let mut stream = response.into_inner();
                let ending = loop {
                    let message = tokio::select! {
                        () = load.stop.cancelled() => return,
                        message = tokio::time::timeout(SILENT_STREAM, stream.message()) => message,
                    };
                    let item = match message {
                        Ok(Ok(Some(message))) => message.item,
                        Ok(Ok(None)) => break "ended without a status".to_owned(),
                        Ok(Err(status)) => {
                            if session_gone(&status) {
                                let ending = code_and_reason(&status);
                                Load::count(
                                    &load.endings,
                                    format!("stream ended for good: {ending}"),
                                );
                                return;
                            }
                            if let Some(resume) = error_metadata(&status).remove("resume_token") {
                                token = Some(resume);
                            }
                            break code_and_reason(&status);
                        }
                        Err(_) => break "silent, given up".to_owned(),
                    };
                    match item {
                        Some(Item::Event(event)) => {
                            token = Some(event.resume_token.clone());
                            load.arrivals
                                .lock()
                                .unwrap()
                                .entry(event.call_id.clone())
                                .or_default()
                                .push(Instant::now());
                            log.events.lock().unwrap().push((event.call_id, event.kind));
                        }
                        Some(Item::Heartbeat(heartbeat)) => token = Some(heartbeat.resume_token),
                        Some(Item::Gap(_)) => {
                            log.gaps.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(Item::SessionEnded(_)) | None => {}
                    }
                };
                Load::count(&load.endings, format!("stream ended: {ending}"));
            }
            Ok(Err(status)) => {
                let refusal = code_and_reason(&status);
                if session_gone(&status) {
                    Load::count(&load.endings, format!("open refused for good: {refusal}"));
                    return;
                }
                Load::count(&load.endings, format!("open refused: {refusal}"));
                backoff = (backoff * 2).min(MAX_RESUME_BACKOFF);
            }
            Err(_) => Load::count(&load.endings, "open timed out".to_owned()),
        }
        replica = (replica + 1) % replicas;
        tokio::time::sleep(backoff).await;
    }
}

/// One hang-up: a call placed on a random agent without one, then a ReleaseCall for it (with a
/// request_id) through a random replica that is up. When the ReleaseCall fails, the customer
/// hangs up instead, so that every placed call ends with its release events.
async fn hang_up(load: Arc<Load>, gateway: Arc<Gateway>, n: usize) {
    let agent = rand::random_range(0..load.ids.len());
    if !load.busy.lock().unwrap().insert(agent) {
        return;
    }
    let id = &load.ids[agent];
    let placed = gateway
        .http
        .post(format!("{}/sim/agents/{id}/calls", gateway.base))
        .send()
        .await
        .unwrap();
    if placed.status().is_success() {
        let placed: serde_json::Value = placed.json().await.unwrap();
        let call = placed["callid"].as_str().unwrap().to_owned();
        let replicas = load.channels.len();
        let replica = load
            .endpoints
            .first_up_from(rand::random_range(0..replicas));
        let asked = Instant::now();
        let answer = match replica {
            None => "no replica up".to_owned(),
            Some(replica) => {
                let channel = load.channels[replica][n % load.channels[replica].len()].clone();
                let request = ReleaseCallRequest {
                    agent_id: id.clone(),
                    call_id: call.clone(),
                    request_id: format!("rolling-{n}"),
                    ..Default::default()
                };
                let mut client = CallControlClient::new(channel);
                let release = client.release_call(request);
                match tokio::time::timeout(processes::WAIT, release).await {
                    Ok(Ok(answer)) => format!("{:?}", answer.into_inner().outcome()),
                    Ok(Err(status)) => code_and_reason(&status),
                    Err(_) => "timed out".to_owned(),
                }
            }
        };
        let released = answer == format!("{:?}", ReleaseOutcome::Released);
        Load::count(&load.answers, answer);
        if !released {
            let _ = gateway
                .http
                .post(format!("{}/sim/agents/{id}/customer-hangup", gateway.base))
                .send()
                .await;
        }
        load.hung_up.lock().unwrap().push((agent, call, asked));
    } else {
        Load::count(
            &load.answers,
            format!("call not placed: {}", placed.status()),
        );
    }
    load.busy.lock().unwrap().remove(&agent);
}

/// What the streams received against what the hang-ups should have delivered.
struct Tally {
    /// Release events some stream of the agent lacks, and the streams lacking any.
    missing: usize,
    streams_missing: usize,
    duplicates: usize,
    gaps: usize,
    resumes: usize,
}

fn tally(load: &Load) -> Tally {
    let mut calls: HashMap<usize, Vec<String>> = HashMap::new();
    for (agent, call, _) in load.hung_up.lock().unwrap().iter() {
        calls.entry(*agent).or_default().push(call.clone());
    }
    let mut tally = Tally {
        missing: 0,
        streams_missing: 0,
        duplicates: 0,
        gaps: 0,
        resumes: 0,
    };
    for (n, log) in load.logs.iter().enumerate() {
        let mut received: HashMap<(&str, i32), usize> = HashMap::new();
        let events = log.events.lock().unwrap();
        for (call, kind) in events.iter() {
            *received.entry((call.as_str(), *kind)).or_default() += 1;
        }
        let mut missing = 0;
        for call in calls.get(&(n / load.per_agent)).into_iter().flatten() {
            for kind in [ReleaseKind::CallRelease, ReleaseKind::CustomerRelease] {
                match received.get(&(call.as_str(), kind as i32)) {
                    None => missing += 1,
                    Some(&times) => tally.duplicates += times - 1,
                }
            }
        }
        tally.missing += missing;
        tally.streams_missing += usize::from(missing > 0);
        tally.gaps += log.gaps.load(Ordering::Relaxed);
        tally.resumes += log.resumes.load(Ordering::Relaxed);
    }
    tally
}

/// Waits (at most [`processes::DELIVERY_WAIT`]) until every hang-up's events reached every
/// stream of its agent; what arrived.
async fn settled_tally(load: &Load) -> Tally {
    let deadline = Instant::now() + processes::DELIVERY_WAIT;
    loop {
        let tally = tally(load);
        if tally.missing == 0 || Instant::now() >= deadline {
            return tally;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits (bounded) until every JetStream stream (the buckets are streams too) has a leader and
/// every copy current: the cluster healed after a server came back.
async fn until_jetstream_current(nats: &Nats) {
    let servers: Vec<async_nats::ServerAddr> = nats
        .servers
        .iter()
        .map(|server| server.url().parse().unwrap())
        .collect();
    let client = async_nats::connect(servers).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    processes::wait_for(
        "every stream's copies current",
        Duration::from_millis(500),
        || async {
            let mut streams = jetstream.streams();
            let mut current = true;
            while let Some(info) = streams.next().await {
                let Ok(info) = info else { return false };
                current &= info.cluster.as_ref().is_some_and(|cluster| {
                    cluster.leader.is_some()
                        && cluster
                            .replicas
                            .iter()
                            .all(|peer| peer.current && !peer.offline)
                });
            }
            current
        },
    )
    .await;
}

/// Prints `what` happened, when (since `started`), the longest any agent went unpolled so far,
/// how many agents had two polls waiting at once and how many polls were abandoned by their
/// client (the simulator's view): the step that made one grow shows where.
async fn checkpoint(gateway: &Gateway, started: Instant, what: String) {
    let stats = gateway.control(reqwest::Method::GET, "/stats").await;
    let count = |name: &str| stats[name].as_u64().unwrap_or_default();
    println!(
        "  {:>6.1} s  {what:55} longest unpolled so far {:.1} s, polled twice {}, polls abandoned {}",
        started.elapsed().as_secs_f64(),
        count("longest_unpolled_ms") as f64 / 1000.0,
        count("agents_polled_twice"),
        count("polls_abandoned"),
    );
}

/// A replica's listen address below the ephemeral port range, so that it is still free when
/// the replica starts again on it.
fn replica_listen() -> String {
    format!("127.0.0.1:{}", free_port())
}

pub async fn rolling(agents: usize, per_agent: usize, setup: NatsSetup, tls: bool) {
    let Some(mut nats) = Nats::start(setup).await else {
        return;
    };
    let gateway = Arc::new(Gateway::start(tls, true).await);
    let mut flags = nats.replica_flags();
    flags.extend(["--metrics-listen".to_owned(), "127.0.0.1:0".to_owned()]);
    let first_binary = env!("CARGO_BIN_EXE_ccgw-callcontrol").to_owned();
    let restart_binary = std::env::var("CCGW_RESTART_BINARY").unwrap_or(first_binary.clone());
    let listens: Vec<String> = (0..SCALE_REPLICAS).map(|_| replica_listen()).collect();
    let mut replicas = Vec::new();
    for listen in &listens {
        replicas.push(processes::spawn_facade_at(&first_binary, &gateway, listen, &flags).await);
    }
    shards_spread(&replicas).await;
    let ids = processes::agent_ids(agents);
    let guids = gateway.sign_in(&ids).await;
    let streams = agents * per_agent;
    println!(
        "\nrolling restart: {agents} agents x {per_agent} streams ({streams} streams) over {SCALE_REPLICAS} replicas at {listens:?}, gateway {}, NATS {}; replicas restart as {restart_binary}",
        gateway.base,
        nats.describe(),
    );

    let per_replica = streams.div_ceil(processes::STREAMS_PER_CONNECTION);
    let mut channels = Vec::new();
    for listen in &listens {
        let uri = format!("http://{listen}");
        let replica: Vec<Channel> = (0..per_replica)
            .map(|_| Channel::from_shared(uri.clone()).unwrap().connect_lazy())
            .collect();
        channels.push(replica);
    }
    let load = Arc::new(Load {
        endpoints: Endpoints {
            up: (0..SCALE_REPLICAS).map(|_| AtomicBool::new(true)).collect(),
        },
        channels,
        ids: ids.clone(),
        guids,
        per_agent,
        logs: (0..streams).map(|_| StreamLog::default()).collect(),
        opened: AtomicUsize::new(0),
        endings: Mutex::default(),
        answers: Mutex::default(),
        busy: Mutex::default(),
        hung_up: Mutex::default(),
        arrivals: Mutex::default(),
        hanging_up: CancellationToken::new(),
        stop: CancellationToken::new(),
    });
    let watchers: Vec<_> = (0..streams)
        .map(|n| tokio::spawn(keep_watching(load.clone(), n)))
        .collect();
    processes::wait_for("every stream open", Duration::from_millis(100), || async {
        load.opened.load(Ordering::Relaxed) == streams
    })
    .await;
    gateway.until_every_agent_polled(&ids).await;
    println!("  every stream open and every agent polled");

    let hang_ups = {
        let (load, gateway) = (load.clone(), gateway.clone());
        tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            let mut every = tokio::time::interval(HANG_UP_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for n in 0.. {
                tokio::select! {
                    () = load.hanging_up.cancelled() => break,
                    _ = every.tick() => {}
                }
                tasks.spawn(hang_up(load.clone(), gateway.clone(), n));
            }
            while tasks.join_next().await.is_some() {}
        })
    };
    let started = Instant::now();
    let at = |what: String| checkpoint(&gateway, started, what);
    tokio::time::sleep(STEADY).await;
    at("under load, nothing restarted yet".to_owned()).await;

    for (n, listen) in listens.iter().enumerate() {
        load.endpoints.set(n, false);
        at(format!("replica {}: SIGTERM", n + 1)).await;
        let exited = replicas.remove(n).terminate(EXIT_WITHIN).await;
        at(format!(
            "replica {}: exited after {:.1} s",
            n + 1,
            exited.as_secs_f64()
        ))
        .await;
        let restarted = processes::spawn_facade_at(&restart_binary, &gateway, listen, &flags).await;
        replicas.insert(n, restarted);
        health_becomes(listen, "", ServingStatus::Serving, processes::WAIT).await;
        load.endpoints.set(n, true);
        at(format!("replica {}: ready", n + 1)).await;
    }
    if nats.servers.len() > 1 {
        for n in 0..nats.servers.len() {
            let took = nats.servers[n].lame_duck_stop(LAME_DUCK_WITHIN).await;
            at(format!(
                "nats-server {}: exited after {:.1} s in lame-duck mode",
                n + 1,
                took.as_secs_f64()
            ))
            .await;
            nats.servers[n].restart().await;
            until_jetstream_current(&nats).await;
            at(format!("nats-server {}: back, every stream current", n + 1)).await;
        }
    } else {
        println!("  one NATS node: its restart would be an outage, not a rolling restart; skipped");
    }
    tokio::time::sleep(STEADY).await;
    load.hanging_up.cancel();
    hang_ups.await.unwrap();
    at("load stopped".to_owned()).await;
    let tally = settled_tally(&load).await;
    let after = readings(&replicas).await;
    load.stop.cancel();
    for watcher in watchers {
        watcher.abort();
    }
    report(&load, &tally, &gateway, &ids, &after, &nats).await;
    for replica in replicas {
        replica.stop().await;
    }
}

/// The simulator's view of every agent: the longest any went unpolled (max and p99, ms), the
/// agents it saw polled twice at once, and those it signed out.
async fn gateway_view(gateway: &Gateway, ids: &[String]) -> (u64, u64, usize, usize) {
    let views: Vec<serde_json::Value> = futures_util::stream::iter(ids)
        .map(|id| gateway.agent(id))
        .buffer_unordered(32)
        .collect()
        .await;
    let mut unpolled = Histogram::<u64>::new(3).unwrap();
    let (mut twice, mut signed_out) = (0, 0);
    for view in &views {
        unpolled
            .record(view["longest_unpolled_ms"].as_u64().unwrap())
            .unwrap();
        twice += usize::from(view["max_polls_in_flight"].as_u64().unwrap() > 1);
        signed_out += usize::from(view["signed_in"] != true);
    }
    (
        unpolled.max(),
        unpolled.value_at_quantile(0.99),
        twice,
        signed_out,
    )
}

async fn report(
    load: &Load,
    tally: &Tally,
    gateway: &Gateway,
    ids: &[String],
    after: &[ReplicaReading],
    nats: &Nats,
) {
    let mut latency = Histogram::<u64>::new(3).unwrap();
    let hung_up = load.hung_up.lock().unwrap().clone();
    {
        let arrivals = load.arrivals.lock().unwrap();
        for (_, call, asked) in &hung_up {
            for at in arrivals.get(call).into_iter().flatten() {
                latency
                    .record(at.saturating_duration_since(*asked).as_micros() as u64)
                    .unwrap();
            }
        }
    }
    let (unpolled_max, unpolled_p99, twice, signed_out) = gateway_view(gateway, ids).await;
    println!("\nafter the restarts:");
    for (n, reading) in after.iter().enumerate() {
        println!("  replica {}: {}", n + 1, reading.line());
    }
    println!("  how streams ended or were refused (each followed by a resume, except those for good: the agent was signed out):");
    for (ending, count) in load.endings.lock().unwrap().iter() {
        println!("    {count:>7}  {ending}");
    }
    println!("  ReleaseCall answers:");
    for (answer, count) in load.answers.lock().unwrap().iter() {
        println!("    {count:>7}  {answer}");
    }
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    let answers: usize = load.answers.lock().unwrap().values().sum();
    let released = load
        .answers
        .lock()
        .unwrap()
        .get(&format!("{:?}", ReleaseOutcome::Released))
        .copied()
        .unwrap_or_default();
    println!(
        "\n| streams | resumes | hang-ups | events missing (streams) | Gaps | duplicates | longest unpolled, max / p99 | agents polled twice at once | agents signed out | ReleaseCalls released / asked | delivery p50 / p99 / max |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    println!(
        "| {} | {} | {} | {} ({}) | {} | {} | {:.1} / {:.1} s | {twice} | {signed_out} | {released} / {answers} | {:.1} / {:.1} / {:.1} ms |",
        load.logs.len(),
        tally.resumes,
        hung_up.len(),
        tally.missing,
        tally.streams_missing,
        tally.gaps,
        tally.duplicates,
        unpolled_max as f64 / 1000.0,
        unpolled_p99 as f64 / 1000.0,
        ms(0.5),
        ms(0.99),
        latency.max() as f64 / 1000.0,
    );
    println!("NATS: {}", nats.describe());
}
