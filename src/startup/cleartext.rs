//! Startup warnings where secrets would cross the network in clear: the service still starts
//! (a service mesh may encrypt the pod network), but the operator is told what is exposed.
use std::net::SocketAddr;

use crate::{config::Config, gateway::is_loopback};

/// Warns about each way `config` sends secrets in clear, the gRPC port being `grpc`.
pub(super) fn warn(config: &Config, grpc: SocketAddr) {
    if let Some(secrets) = cleartext_grpc(
        grpc,
        config.server.tls_cert.is_some(),
        config.callers.caller_tokens.is_some(),
    ) {
        tracing::warn!(
            listen = %grpc,
            "the gRPC port speaks plaintext on an address other machines can reach: {secrets} \
             cross the network in clear; serve TLS (--tls-cert, --tls-key) or listen on \
             loopback behind a proxy that does"
        );
    }
    if let Some(url) = &config.nats.nats_url {
        let tls = config.nats.nats_tls_ca.is_some() || config.nats.nats_tls_cert.is_some();
        let hosts = cleartext_nats_hosts(url, tls);
        if !hosts.is_empty() {
            tracing::warn!(
                hosts = %hosts.join(","),
                "NATS servers on other machines are reached without TLS (nats:// or ws:// \
                 URLs, no --nats-tls-ca): the sessions bucket's gateway Guids and cookies cross \
                 the network in clear, unless the server itself requires TLS; use tls:// URLs \
                 or --nats-tls-ca"
            );
        }
    }
}

/// What a plaintext gRPC port on `listen` carries in clear to other machines, if it does: a
/// port with TLS, or on loopback, carries nothing off the machine. Session handovers
/// (`x-ccgw-guid`, `x-ccgw-cookie`) cannot be switched off, and a client sends them before the
/// facade decides whether it may: a plaintext port reachable from elsewhere always carries them.
fn cleartext_grpc(listen: SocketAddr, tls: bool, bearer_tokens: bool) -> Option<String> {
    if tls || listen.ip().is_loopback() {
        return None;
    }
    let handovers = "gateway Guids and cookies handed over in x-ccgw-guid / x-ccgw-cookie";
    Some(if bearer_tokens {
        format!("callers' bearer tokens (--caller-tokens) and {handovers}")
    } else {
        handovers.to_owned()
    })
}

/// The hosts of the comma-separated NATS `urls` reached without TLS that are not this machine.
/// `tls`: TLS is required of every server (--nats-tls-ca or a client certificate). A URL that
/// does not parse is left to the connection to report; its text, which may hold a password,
/// is never repeated.
fn cleartext_nats_hosts(urls: &str, tls: bool) -> Vec<String> {
    if tls {
        return Vec::new();
    }
    urls.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .filter_map(|url| url.parse::<async_nats::ServerAddr>().ok())
        .filter(|server| !matches!(server.scheme(), "tls" | "wss"))
        .map(|server| server.host().to_owned())
        .filter(|host| !is_loopback(host))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plaintext_grpc_port_reachable_from_elsewhere_carries_handovers_and_tokens() {
        let addr = |text: &str| text.parse::<SocketAddr>().unwrap();
        for listen in ["0.0.0.0:50051", "[::]:50051", "10.1.2.3:50051"] {
            let handovers = cleartext_grpc(addr(listen), false, false).expect(listen);
            assert!(
                handovers.contains("x-ccgw-guid") && !handovers.contains("bearer"),
                "{handovers}"
            );
            let both = cleartext_grpc(addr(listen), false, true).expect(listen);
            assert!(
                both.contains("x-ccgw-guid") && both.contains("bearer tokens"),
                "{both}"
            );
            assert_eq!(
                cleartext_grpc(addr(listen), true, true),
                None,
                "{listen} with TLS"
            );
        }
        for listen in ["127.0.0.1:50051", "127.9.9.9:1", "[::1]:50051"] {
            assert_eq!(cleartext_grpc(addr(listen), false, true), None, "{listen}");
        }
    }

    #[test]
    fn nats_servers_elsewhere_without_tls_are_named() {
        assert_eq!(
            cleartext_nats_hosts(
                "nats://nats-0.nats:4222, nats-1.nats:4222,tls://nats-2.nats:4222",
                false
            ),
            ["nats-0.nats", "nats-1.nats"]
        );
        assert_eq!(
            cleartext_nats_hosts(
                "nats://user:secret@10.0.0.7:4222,ws://[fd00::1]:8080,wss://w:443",
                false
            ),
            ["10.0.0.7", "fd00::1"]
        );
        for local in [
            "nats://127.0.0.1:4222",
            "nats://localhost:4222",
            "nats://[::1]:4222",
            "tls://nats-0.nats:4222,tls://nats-1.nats:4222",
            "nats://[fd00::1",
            "http://nats-0.nats:4222",
            "",
        ] {
            assert!(cleartext_nats_hosts(local, false).is_empty(), "{local}");
        }
        // --nats-tls-ca (or a client certificate) makes the client require TLS of every URL.
        assert!(cleartext_nats_hosts("nats://nats-0.nats:4222", true).is_empty());
    }
}
