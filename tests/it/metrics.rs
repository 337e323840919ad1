//! Through the real binary: the metrics endpoint of a real process (`--simulate
//! --metrics-listen`), scraped with a real HTTP client and checked by `promtool check metrics`;
//! the counters move by exactly the traffic this test sends; each call writes one JSON log line
//! with what its handler learned; the Grafana dashboard's queries run against a real
//! Prometheus scraping a real process.
#![cfg(feature = "simulator")]
use crate::common;

use std::{
    process::Stdio,
    sync::{Arc, Mutex},
};

use ccgw_callcontrol::proto::{
    call_control_client::CallControlClient, ReleaseCallRequest, ReleaseOutcome,
};
use common::{installed_tool, release_req, sample, watch_on, watch_req, OpenStream, WAIT};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, Command},
};
use tonic::Code;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

const RELEASE: &str =
    r#"grpc_service="ccgw.callcontrol.v1.CallControl",grpc_method="ReleaseCall",grpc_type="unary""#;
const HEALTH: &str =
    r#"grpc_service="grpc.health.v1.Health",grpc_method="Check",grpc_type="unary""#;
const WATCH: &str = r#"grpc_service="ccgw.callcontrol.v1.CallControl",grpc_method="WatchReleaseEvents",grpc_type="server_stream""#;

/// The binary running the demo, with its gRPC, metrics and simulator addresses and the JSON
/// log lines it wrote after it started serving.
struct Service {
    _child: Child,
    grpc: String,
    metrics: String,
    sim: String,
    logs: Arc<Mutex<Vec<Value>>>,
}

async fn start_service() -> Service {
    // No --log-format: stderr is a pipe, so `auto` must pick JSON.
    let mut child = common::demo_command(&["--metrics-listen", "127.0.0.1:0"], "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("the service binary starts");
    let mut banner = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut logs = BufReader::new(child.stderr.take().unwrap()).lines();
    let serving = tokio::time::timeout(WAIT, async {
        while let Some(line) = logs.next_line().await.unwrap() {
            let entry: Value = serde_json::from_str(&line)
                .unwrap_or_else(|_| panic!("a log line that is not JSON: {line}"));
            if entry["message"] == "serving gRPC" {
                return entry;
            }
        }
        panic!("the service exited before serving");
    })
    .await
    .expect("the service serves within the wait bound");
    let sim = tokio::time::timeout(WAIT, async {
        while let Some(line) = banner.next_line().await.unwrap() {
            if let Some(rest) = line.split("simulator on http://").nth(1) {
                return rest.trim_end_matches('.').to_owned();
            }
        }
        panic!("no demo banner");
    })
    .await
    .expect("the demo banner within the wait bound");
    tokio::spawn(async move { while let Ok(Some(_)) = banner.next_line().await {} });
    let collected = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn({
        let collected = collected.clone();
        async move {
            while let Ok(Some(line)) = logs.next_line().await {
                let entry = serde_json::from_str(&line)
                    .unwrap_or_else(|_| panic!("a log line that is not JSON: {line}"));
                collected.lock().unwrap().push(entry);
            }
        }
    });
    Service {
        _child: child,
        grpc: serving["listen"].as_str().unwrap().to_owned(),
        metrics: serving["metrics"]
            .as_str()
            .expect("the serving line names the metrics address")
            .to_owned(),
        sim,
        logs: collected,
    }
}

impl Service {
    async fn scrape(&self) -> String {
        let response = tokio::time::timeout(
            WAIT,
            reqwest::get(format!("http://{}/metrics", self.metrics)),
        )
        .await
        .expect("a scrape within the wait bound")
        .expect("the metrics endpoint answers");
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        response.text().await.unwrap()
    }

    async fn samples(&self) -> Samples {
        Samples::parse(&self.scrape().await)
    }

    /// Scrapes until `done` holds for the samples (a stream's end is counted once the server
    /// saw it, a moment after the client went).
    async fn samples_when(&self, what: &str, done: impl Fn(&Samples) -> bool) -> Samples {
        tokio::time::timeout(WAIT, async {
            loop {
                let samples = self.samples().await;
                if done(&samples) {
                    return samples;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting until {what}"))
    }

    /// The one `rpc` log line of `rpc` whose field `key` is `value`, once it is written.
    async fn rpc_line(&self, rpc: &str, key: &str, value: &str) -> Value {
        let find = || {
            let logs = self.logs.lock().unwrap();
            let lines: Vec<Value> = logs
                .iter()
                .filter(|l| l["message"] == "rpc" && l["rpc"] == rpc && l[key] == value)
                .cloned()
                .collect();
            assert!(lines.len() <= 1, "more than one line per call: {lines:?}");
            lines.into_iter().next()
        };
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(line) = find() {
                    return line;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no rpc line for {rpc} with {key}={value}"))
    }

    async fn sim_post(&self, path: &str, body: Option<Value>) -> reqwest::Response {
        let request = reqwest::Client::new().post(format!("http://{}{path}", self.sim));
        let request = match body {
            Some(body) => request.json(&body),
            None => request,
        };
        let response = tokio::time::timeout(WAIT, request.send())
            .await
            .expect("the simulator answers within the wait bound")
            .unwrap();
        assert!(response.status().is_success(), "{path}: {response:?}");
        response
    }
}

/// A scrape's text, read by series (`name{labels}` as the endpoint writes it).
struct Samples(String);

impl Samples {
    /// The scrape `text`, every sample of which must be a series and a number.
    fn parse(text: &str) -> Self {
        for line in text.lines() {
            if !line.starts_with('#') && !line.is_empty() {
                let (_, value) = line.rsplit_once(' ').expect("series value");
                value.parse::<f64>().expect("a number");
            }
        }
        Self(text.to_owned())
    }

    /// The series' value, `None` when it is not exposed.
    fn value(&self, series: &str) -> Option<f64> {
        sample(&self.0, series)
    }

    /// The series' value; a series not written yet (a label set nothing counted yet) is 0.
    fn get(&self, name: &str, labels: &str) -> f64 {
        let series = if labels.is_empty() {
            name.to_owned()
        } else {
            format!("{name}{{{labels}}}")
        };
        self.value(&series).unwrap_or(0.0)
    }

    fn handled(&self, method: &str, code: &str) -> f64 {
        self.get(
            "grpc_server_handled_total",
            &format!(r#"{method},grpc_code="{code}""#),
        )
    }

    fn gateway_releases_ok(&self) -> f64 {
        self.get(
            "ccgw_gateway_requests_total",
            r#"operation="release",outcome="0""#,
        )
    }
}

/// `promtool check metrics` on `text`: `None` when promtool is not installed (skipped).
async fn promtool_check(text: &str) -> Option<(bool, String)> {
    let promtool = installed_tool("promtool", "apt-get install prometheus")?;
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("promtool starts");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("promtool ends within the wait bound")
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), printed))
}

/// The standard process metrics are the service process's own: its resident memory as /proc
/// says (within a factor of two: it moves between the scrape and the read), open descriptors
/// within their limit, CPU time spent, a start within the last minutes.
fn process_metrics_read_the_process(samples: &Samples, pid: u32) {
    let value = |name: &str| {
        samples
            .value(name)
            .unwrap_or_else(|| panic!("{name} is not exposed"))
    };
    let rss = value("process_resident_memory_bytes");
    let from_proc = common::rss_kib_of(&pid.to_string()) as f64 * 1024.0;
    assert!(
        rss > from_proc / 2.0 && rss < from_proc * 2.0,
        "resident memory {rss} bytes, /proc says {from_proc}"
    );
    assert!(value("process_virtual_memory_bytes") >= rss);
    let open = value("process_open_fds");
    assert!(
        open >= 3.0 && open <= value("process_max_fds"),
        "{open} fds"
    );
    assert!(value("process_cpu_seconds_total") > 0.0);
    assert!(value("process_threads") >= 1.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = value("process_start_time_seconds");
    assert!(
        started > now - 300.0 && started <= now + 1.0,
        "started at {started}, now {now}"
    );
}

async fn open_watch(service: &Service, agent: &str) -> OpenStream {
    let client = CallControlClient::connect(format!("http://{}", service.grpc))
        .await
        .unwrap();
    watch_on(client, watch_req(&[agent]))
        .await
        .expect("the stream opens")
}

#[tokio::test]
async fn the_metrics_of_a_real_process_pass_promtool_and_count_the_traffic_sent() {
    ccgw_callcontrol::install_crypto_provider();
    let service = start_service().await;
    let before = service.samples().await;
    assert_eq!(
        before.get(
            "ccgw_build_info",
            &format!(r#"version="{}""#, env!("CARGO_PKG_VERSION"))
        ),
        1.0
    );
    assert_eq!(before.get("ccgw_sessions_held", ""), 3.0, "the demo agents");

    // A stream that gets the customer hang-up of the demo call on agent 101 (two events),
    // then is cancelled by its client.
    let mut stream = open_watch(&service, "101").await;
    service
        .sim_post("/sim/agents/101/customer-hangup", None)
        .await;
    let events = stream.events_of(2).await;
    assert!(events.iter().all(|e| e.agent_id == "101"));
    let open = service.samples().await;
    assert_eq!(open.get("ccgw_streams_open", ""), 1.0);
    assert_eq!(open.get("ccgw_poll_loops_running", ""), 1.0);
    drop(stream);
    // The stream is counted when hyper drops it; its watcher is freed once the forwarding task
    // notices, a moment later.
    service
        .samples_when(
            "the cancelled stream is counted and its watcher freed",
            |s| {
                s.handled(WATCH, "Canceled") == before.handled(WATCH, "Canceled") + 1.0
                    && s.get("ccgw_streams_open", "") == 0.0
            },
        )
        .await;

    // A health check: counted, logged at debug level only (not at RUST_LOG=info).
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", service.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    health
        .check(HealthCheckRequest::default())
        .await
        .expect("the service is healthy");

    // A ReleaseCall that releases a new call on agent 102, and one refused before anything is
    // sent.
    service
        .sim_post(
            "/sim/agents/102/calls",
            Some(serde_json::json!({"caller": "70094"})),
        )
        .await;
    let mut client = CallControlClient::connect(format!("http://{}", service.grpc))
        .await
        .unwrap();
    let released = client
        .release_call(ReleaseCallRequest {
            request_id: "metrics-test-1".into(),
            ..release_req("102")
        })
        .await
        .expect("the release succeeds")
        .into_inner();
    assert_eq!(released.outcome(), ReleaseOutcome::Released);
    let refused = client.release_call(release_req("42")).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);

    // A trailers-only answer (the refusal) is counted when hyper drops its empty body, which
    // may be a moment after the client has the answer.
    let after = service
        .samples_when("both ReleaseCalls are counted", |s| {
            s.handled(RELEASE, "InvalidArgument") > before.handled(RELEASE, "InvalidArgument")
        })
        .await;
    let delta = |name: &str, labels: &str| after.get(name, labels) - before.get(name, labels);
    assert_eq!(
        after.handled(RELEASE, "OK") - before.handled(RELEASE, "OK"),
        1.0
    );
    assert_eq!(
        after.handled(RELEASE, "InvalidArgument") - before.handled(RELEASE, "InvalidArgument"),
        1.0
    );
    assert_eq!(delta("grpc_server_started_total", RELEASE), 2.0);
    assert_eq!(delta("grpc_server_handling_seconds_count", RELEASE), 2.0);
    assert_eq!(delta("grpc_server_started_total", WATCH), 1.0);
    // Both ReleaseCalls' requests came in; only the release got an answer message back.
    assert_eq!(delta("grpc_server_msg_received_total", RELEASE), 2.0);
    assert_eq!(delta("grpc_server_msg_sent_total", RELEASE), 1.0);
    // The stream's request, and each of its messages: the two events, and any heartbeat.
    assert_eq!(delta("grpc_server_msg_received_total", WATCH), 1.0);
    assert!(delta("grpc_server_msg_sent_total", WATCH) >= 2.0);
    let reason = |reason: &str| {
        let release = r#"grpc_service="ccgw.callcontrol.v1.CallControl",grpc_method="ReleaseCall""#;
        delta(
            "ccgw_rpc_reasons_total",
            &format!(r#"{release},reason="{reason}""#),
        )
    };
    assert_eq!(reason("RELEASED"), 1.0);
    assert_eq!(reason("INVALID_ARGUMENT"), 1.0);
    assert_eq!(delta("grpc_server_msg_received_total", HEALTH), 1.0);
    assert_eq!(delta("grpc_server_msg_sent_total", HEALTH), 1.0);
    assert_eq!(
        after.handled(HEALTH, "OK") - before.handled(HEALTH, "OK"),
        1.0
    );
    assert_eq!(delta("ccgw_events_delivered_total", ""), 2.0);
    assert_eq!(
        after.gateway_releases_ok() - before.gateway_releases_ok(),
        1.0
    );
    assert_eq!(delta("ccgw_idempotency_entries", ""), 1.0, "metrics-test-1");
    assert!(delta("ccgw_release_events_observed_total", "") >= 2.0);
    // The release reached the simulator, so the gateway is up, and nothing is in flight.
    // (Read from the map itself: `get` would take a missing series for 0.)
    assert_eq!(after.value("ccgw_gateway_up"), Some(1.0));
    assert_eq!(after.value("ccgw_gateway_requests_in_flight"), Some(0.0));
    assert_eq!(after.value("ccgw_gateway_requests_waiting"), Some(0.0));
    assert_eq!(after.value("ccgw_event_fields_dropped_total"), Some(0.0));

    process_metrics_read_the_process(&after, service._child.id().expect("running"));

    match promtool_check(&service.scrape().await).await {
        Some((passed, printed)) => assert!(passed, "promtool check metrics: {printed}"),
        None => eprintln!("promtool check skipped"),
    }

    // One line per call, with what the handler learned.
    let ok = service
        .rpc_line(
            "ccgw.callcontrol.v1.CallControl/ReleaseCall",
            "request_id",
            "metrics-test-1",
        )
        .await;
    assert_eq!(ok["code"], "OK");
    assert_eq!(ok["agents"], "102");
    assert_eq!(ok["retcode"], "0");
    assert_eq!(ok["reason"], "RELEASED");
    assert!(ok["latency_ms"].as_f64().unwrap() > 0.0, "{ok}");
    let invalid = service
        .rpc_line(
            "ccgw.callcontrol.v1.CallControl/ReleaseCall",
            "agents",
            "42",
        )
        .await;
    assert_eq!(invalid["code"], "InvalidArgument");
    assert_eq!(invalid["reason"], "INVALID_ARGUMENT");
    assert_eq!(invalid["level"], "INFO");
    let stream_line = service
        .rpc_line(
            "ccgw.callcontrol.v1.CallControl/WatchReleaseEvents",
            "agents",
            "101",
        )
        .await;
    assert_eq!(stream_line["code"], "Canceled");
    // The health check ended before the ReleaseCalls, whose lines are written: it has none.
    let logs = service.logs.lock().unwrap();
    assert!(
        !logs.iter().any(|l| l["message"] == "rpc"
            && l["rpc"]
                .as_str()
                .is_some_and(|rpc| rpc.starts_with("grpc.health"))),
        "a health check logged at info"
    );
    assert!(stream_line["request_id"]
        .as_str()
        .is_some_and(|id| !id.is_empty()));
}

/// The Grafana dashboard's panels, each query run by a real Prometheus (Debian's `prometheus`)
/// scraping a real `--simulate` service that shares its state through a real nats-server:
/// every query parses and, once the service has had traffic of every kind the dashboard shows
/// (a release, a refused one, one whose outcome is unknown, an open stream), returns a series.
/// The template variables' label queries find the scraped job and namespace.
#[tokio::test]
async fn every_dashboard_query_returns_a_series_from_a_real_prometheus() {
    ccgw_callcontrol::install_crypto_provider();
    let Some(prometheus) = installed_tool("prometheus", "apt-get install prometheus") else {
        return;
    };
    let Some(nats) = common::nats::NatsServer::start().await else {
        return;
    };
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/grafana/ccgw-callcontrol.json"
        ))
        .unwrap(),
    )
    .expect("the dashboard is JSON");
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(variables, ["datasource", "namespace", "job"]);

    let sim_port = common::nats::free_port().to_string();
    let sim_listen = format!("127.0.0.1:{sim_port}");
    let (_service, serving) = common::spawn_service_logging(
        &[
            "--simulate",
            "--sim-listen",
            &sim_listen,
            "--metrics-listen",
            "127.0.0.1:0",
            "--nats-url",
            &nats.url(),
        ],
        &[],
    )
    .await;
    let metrics = serving["metrics"].as_str().expect("the metrics address");
    let server = Prometheus::start(&prometheus, metrics).await;
    let _stream = traffic_of_every_kind(serving["listen"].as_str().unwrap(), &sim_listen).await;

    for variable in &dashboard["templating"]["list"].as_array().unwrap()[1..] {
        let query = variable["query"]["query"].as_str().unwrap();
        let (selector, label) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(", "))
            .unwrap_or_else(|| panic!("not label_values(selector, label): {query}"));
        let values = server.label_values(label, &substituted(selector)).await;
        assert!(!values.is_empty(), "{query} finds nothing");
    }
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = substituted(target["expr"].as_str().unwrap());
            server
                .series_of(&expr, &format!("panel {:?}", panel["title"]))
                .await;
            queries += 1;
        }
    }
    assert!(queries >= 20, "{queries} queries");
}

/// What the scrape configuration labels the target with.
const JOB: &str = "ccgw-callcontrol";
const NAMESPACE: &str = "ccgw-test";

/// `expr` with the dashboard's variables as Grafana would fill them in for the test's target
/// (a rate interval of 10 scrapes).
fn substituted(expr: &str) -> String {
    expr.replace("$__rate_interval", "10s")
        .replace("$namespace", NAMESPACE)
        .replace("$job", JOB)
}

/// A ReleaseCall that releases the demo call, one refused, one whose outcome is unknown (the
/// simulator loses the answer to the DELETE), and a stream on agent 103, returned to be kept
/// open while the panels of open streams are read.
async fn traffic_of_every_kind(grpc: &str, sim: &str) -> OpenStream {
    let mut client = common::client_of(grpc).await;
    let released = client.release_call(release_req("101")).await.unwrap();
    assert_eq!(released.into_inner().outcome(), ReleaseOutcome::Released);
    let refused = client.release_call(release_req("42")).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let http = reqwest::Client::new();
    for (path, body) in [
        (
            "/sim/agents/102/calls",
            serde_json::json!({"caller": "70094"}),
        ),
        (
            "/sim/faults",
            serde_json::json!({"fault": {"kind": "lose_answer"}, "method": "DELETE"}),
        ),
    ] {
        let response = tokio::time::timeout(
            WAIT,
            http.post(format!("http://{sim}{path}")).json(&body).send(),
        )
        .await
        .expect("the simulator answers within the wait bound")
        .unwrap();
        assert!(response.status().is_success(), "{path}: {response:?}");
    }
    let unknown = client.release_call(release_req("102")).await.unwrap_err();
    common::expect_status(&unknown, Code::Unknown, "RELEASE_OUTCOME_UNKNOWN");
    watch_on(client, watch_req(&["103"]))
        .await
        .expect("the stream opens")
}

/// A real Prometheus scraping the service's metrics port every second, its data in a
/// directory of its own.
struct Prometheus {
    _process: Child,
    api: String,
    dir: std::path::PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The longest the test waits for Prometheus to start or for a query's series.
const PROMETHEUS_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

impl Prometheus {
    async fn start(binary: &std::path::Path, target: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "ccgw-prometheus-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      \
                 - targets: ['{target}']\n        labels: {{namespace: {NAMESPACE}}}\n"
            ),
        )
        .unwrap();
        let port = common::nats::free_port();
        let process = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("prometheus starts");
        let server = Self {
            _process: process,
            api: format!("http://127.0.0.1:{port}"),
            dir,
        };
        tokio::time::timeout(PROMETHEUS_WAIT, async {
            loop {
                let ready = reqwest::get(format!("{}/-/ready", server.api)).await;
                if ready.is_ok_and(|r| r.status().is_success()) {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        })
        .await
        .expect("prometheus is ready within the wait bound");
        server
    }

    /// The answer of `GET {path}` with `query`, which must be a success.
    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let response = tokio::time::timeout(
            WAIT,
            reqwest::get(
                reqwest::Url::parse_with_params(&format!("{}{path}", self.api), query).unwrap(),
            ),
        )
        .await
        .expect("prometheus answers within the wait bound")
        .unwrap();
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["status"], "success", "{path} {query:?}: {answer}");
        answer
    }

    /// Queries `expr` until it returns a series (it must parse at once); panics with `what`
    /// after the wait bound.
    async fn series_of(&self, expr: &str, what: &str) {
        let found = tokio::time::timeout(PROMETHEUS_WAIT, async {
            loop {
                let answer = self.get("/api/v1/query", &[("query", expr)]).await;
                if answer["data"]["result"]
                    .as_array()
                    .is_some_and(|series| !series.is_empty())
                {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        })
        .await;
        assert!(found.is_ok(), "{what}: no series for {expr}");
    }

    /// The values of `label` on series matching `selector`, once there are some (bounded).
    async fn label_values(&self, label: &str, selector: &str) -> Vec<Value> {
        let path = format!("/api/v1/label/{label}/values");
        tokio::time::timeout(PROMETHEUS_WAIT, async {
            loop {
                let answer = self.get(&path, &[("match[]", selector)]).await;
                let values = answer["data"].as_array().cloned().unwrap_or_default();
                if !values.is_empty() {
                    return values;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        })
        .await
        .unwrap_or_default()
    }
}
