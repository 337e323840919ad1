//! The `ccgw-sim` binary's HTTPS listener: `--tls-cert` / `--tls-key` serve HTTPS, and
//! `--tls-client-ca` refuses clients without a certificate.
use std::{path::PathBuf, process::Stdio};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::BOUND;

struct Files {
    dir: PathBuf,
    ca_pem: String,
}

/// A CA and a certificate it issued for `localhost`, written as `ca.pem`, `cert.pem`,
/// `key.pem` in a directory of their own.
fn certificates(test: &str) -> Files {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let dir = std::env::temp_dir().join(format!("ccgw-sim-tls-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    Files {
        dir,
        ca_pem: ca.pem(),
    }
}

/// Starts the binary with `args` and returns it with the URL it prints.
async fn start(args: &[&str]) -> (tokio::process::Child, String) {
    let mut sim = tokio::process::Command::new(env!("CARGO_BIN_EXE_ccgw-sim"))
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(sim.stdout.take().unwrap()).lines();
    let url = tokio::time::timeout(BOUND, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.strip_prefix("ccgw-sim listening on ") {
                return rest.split_whitespace().next().unwrap().to_owned();
            }
        }
        panic!("ccgw-sim exited before listening");
    })
    .await
    .expect("ccgw-sim listens");
    (sim, url)
}

/// A client trusting `ca_pem`, for `https://localhost:{port}`.
fn client(ca_pem: &str) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .timeout(BOUND)
        .build()
        .unwrap()
}

fn localhost(url: &str) -> String {
    url.replace("127.0.0.1", "localhost")
}

fn path(files: &Files, name: &str) -> String {
    files.dir.join(name).display().to_string()
}

#[tokio::test]
async fn tls_flags_serve_https() {
    let files = certificates("https");
    let (_sim, url) = start(&[
        "--tls-cert",
        &path(&files, "cert.pem"),
        "--tls-key",
        &path(&files, "key.pem"),
    ])
    .await;
    assert!(url.starts_with("https://"), "{url}");
    let answer = client(&files.ca_pem)
        .get(format!("{}/sim/stats", localhost(&url)))
        .send()
        .await
        .expect("an HTTPS answer");
    assert!(answer.status().is_success(), "{answer:?}");
}

#[tokio::test]
async fn a_client_ca_refuses_clients_without_a_certificate() {
    let files = certificates("client-ca");
    let (_sim, url) = start(&[
        "--tls-cert",
        &path(&files, "cert.pem"),
        "--tls-key",
        &path(&files, "key.pem"),
        "--tls-client-ca",
        &path(&files, "ca.pem"),
    ])
    .await;
    let refused = client(&files.ca_pem)
        .get(format!("{}/sim/stats", localhost(&url)))
        .send()
        .await;
    assert!(refused.is_err(), "{refused:?}");
}
