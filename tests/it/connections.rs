//! Nobody can lock callers out before authenticating: silent sockets on the service's ports,
//! through the real binary. Its listeners accept first and admit under caps per source address
//! and in total; a connection that does not get through its handshake (TLS, HTTP/2 preface,
//! HTTP/1 request head) in time is closed; every count is on /metrics.
use crate::common;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use common::{
    metric,
    pki::{tls_channel, Ca, Files},
    serving, sim_config, spawn_service_logging, WAIT,
};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    process::Child,
    time::Instant,
};
use tonic::transport::Channel;

/// Where the silent sockets come from: another address than the clients' (127.0.0.1), on
/// loopback all the same.
const ELSEWHERE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const HERE: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// The binary against a simulator, with `flags` and open metrics and health ports; its
/// process (killed when dropped) and the addresses of its ports.
struct Service {
    _process: Child,
    _sim: tokio::sync::oneshot::Sender<()>,
    grpc: SocketAddr,
    metrics: SocketAddr,
    health: SocketAddr,
}

async fn start(flags: &[&str]) -> Service {
    let (_, sim_addr, stop_sim) = common::spawn_sim(sim_config(), None).await;
    let gateway = format!("http://{sim_addr}");
    let mut args = vec![
        "--gateway-url",
        &gateway,
        "--metrics-listen",
        "127.0.0.1:0",
        "--health-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(flags);
    let (process, serving) = spawn_service_logging(&args, &[]).await;
    let addr = |name: &str| -> SocketAddr {
        let value: &Value = &serving[name];
        value.as_str().unwrap().parse().unwrap()
    };
    Service {
        grpc: addr("listen"),
        metrics: addr("metrics"),
        health: addr("health"),
        _process: process,
        _sim: stop_sim,
    }
}

/// A TCP connection to `to` from `from`, which then says nothing.
async fn silent(to: SocketAddr, from: IpAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(to).await.unwrap()
}

async fn silent_sockets(n: usize, to: SocketAddr, from: IpAddr) -> Vec<TcpStream> {
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        sockets.push(silent(to, from).await);
    }
    sockets
}

/// Whether the server closed (or reset) `socket` by `deadline`; it sends nothing first.
async fn closed_by(socket: &mut TcpStream, deadline: Instant) -> bool {
    let mut buf = [0; 1024];
    tokio::time::timeout_at(deadline, async {
        loop {
            match socket.read(&mut buf).await {
                // The server's own HTTP/2 SETTINGS come first.
                Ok(n) if n > 0 => continue,
                Ok(_) | Err(_) => return,
            }
        }
    })
    .await
    .is_ok()
}

/// How many of `sockets` the server closed by `deadline`.
async fn closed_of(sockets: &mut [TcpStream], deadline: Instant) -> usize {
    let mut closed = 0;
    for socket in sockets {
        closed += usize::from(closed_by(socket, deadline).await);
    }
    closed
}

/// Waits (bounded) until the series `series` (name and labels, as the text format writes them)
/// reads `wanted`.
async fn until_metric(service: &Service, series: &str, wanted: f64) {
    let reached = tokio::time::timeout(WAIT, async {
        while metric(service.metrics, series).await != Some(wanted) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let now = metric(service.metrics, series).await;
    assert!(reached.is_ok(), "{series} is {now:?}, not {wanted}");
}

async fn plaintext_channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(WAIT)
        .connect()
        .await
        .expect("the plaintext port accepts a client")
}

/// 300 silent sockets on the TLS port held the accept loop for 10 s: an mTLS client is now
/// served at once, from the silent sockets' address too (the default caps leave room for
/// them).
#[tokio::test]
async fn silent_sockets_on_the_tls_port_do_not_keep_an_mtls_client_out() {
    let (ca, client_ca, files) = (Ca::new("server CA"), Ca::new("client CA"), Files::new());
    let (cert, key) = files.write_server(&ca.server(1));
    let client_ca_file = files.write("client-ca.crt", &client_ca.pem);
    let service = start(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &client_ca_file,
        // Long enough that none times out before they are counted below, however slow the
        // machine; the client's 3 s owe nothing to it.
        "--handshake-timeout-ms",
        "10000",
    ])
    .await;
    let client = client_ca.issue_for(&["billing.prod.svc"]);

    let _silent = silent_sockets(300, service.grpc, HERE).await;
    let start = Instant::now();
    let served = tokio::time::timeout(Duration::from_secs(3), async {
        let channel = tls_channel(service.grpc, &ca, Some(&client)).await.unwrap();
        serving(channel).await
    })
    .await;
    assert!(
        served.is_ok(),
        "the mTLS client was not served within 3 s of the silent sockets"
    );
    served.unwrap().unwrap();
    assert!(start.elapsed() < Duration::from_secs(3));

    // Taken in order: all 300 were admitted before the client, and are in their handshake.
    let handshakes = r#"ccgw_connection_handshakes{listener="grpc"}"#;
    assert_eq!(metric(service.metrics, handshakes).await, Some(300.0));
    // Their handshake time runs out.
    until_metric(
        &service,
        r#"ccgw_connections_closed_total{listener="grpc",reason="tls_handshake_timeout"}"#,
        300.0,
    )
    .await;
    assert_eq!(metric(service.metrics, handshakes).await, Some(0.0));
    // The client's connection closed with its channel.
    until_metric(&service, r#"ccgw_connections_open{listener="grpc"}"#, 0.0).await;
}

/// Sockets that never send the HTTP/2 preface stayed open until the maximum connection age
/// plus its grace (~930 s); now each port closes them at the handshake timeout: the gRPC and
/// health ports without a preface, the metrics port without a request head (also after an
/// answered request on a kept-alive connection).
#[tokio::test]
async fn silent_sockets_on_the_plaintext_ports_are_closed() {
    let service = start(&["--handshake-timeout-ms", "1000"]).await;
    let mut grpc = silent_sockets(200, service.grpc, HERE).await;
    // Under the side ports' per-address cap (16).
    let mut health = silent_sockets(10, service.health, HERE).await;
    let mut metrics = silent_sockets(10, service.metrics, HERE).await;
    // A scrape on a kept-alive connection, which then stays idle.
    let mut kept_alive = silent(service.metrics, HERE).await;
    kept_alive
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: ccgw\r\n\r\n")
        .await
        .unwrap();
    metrics.push(kept_alive);

    let deadline = Instant::now() + Duration::from_secs(25);
    assert_eq!(closed_of(&mut grpc, deadline).await, 200, "gRPC port");
    assert_eq!(closed_of(&mut health, deadline).await, 10, "health port");
    assert_eq!(closed_of(&mut metrics, deadline).await, 11, "metrics port");

    let preface_timeouts = |listener| {
        format!(
            r#"ccgw_connections_closed_total{{listener="{listener}",reason="preface_timeout"}}"#
        )
    };
    let grpc_timeouts = metric(service.metrics, &preface_timeouts("grpc")).await;
    assert_eq!(grpc_timeouts, Some(200.0));
    let health_timeouts = metric(service.metrics, &preface_timeouts("health")).await;
    assert_eq!(health_timeouts, Some(10.0));
    // The scrapes' own kept-alive connections may have timed out too.
    let head_timeouts = metric(
        service.metrics,
        r#"ccgw_connections_closed_total{listener="metrics",reason="request_head_timeout"}"#,
    )
    .await
    .expect("the metrics port's request head timeouts");
    assert!(head_timeouts >= 11.0, "{head_timeouts}");
    for listener in ["grpc", "health"] {
        let open = format!(r#"ccgw_connections_open{{listener="{listener}"}}"#);
        assert_eq!(
            metric(service.metrics, &open).await,
            Some(0.0),
            "{listener}"
        );
    }
    // The ports serve real clients.
    serving(plaintext_channel(service.grpc).await)
        .await
        .unwrap();
    serving(plaintext_channel(service.health).await)
        .await
        .unwrap();
}

/// One address holds at most --max-connections-per-address connections: one more is reset at
/// once, while another address is served; a freed place can be taken again.
#[tokio::test]
async fn beyond_the_per_address_cap_a_connection_is_reset_at_once() {
    let service = start(&[
        "--max-connections-per-address",
        "4",
        // Far beyond the wait bound: only the cap can close a socket here.
        "--handshake-timeout-ms",
        "60000",
    ])
    .await;
    let open = r#"ccgw_connections_open{listener="grpc"}"#;
    let refused =
        r#"ccgw_connections_refused_total{listener="grpc",limit="max_connections_per_address"}"#;
    let mut held = silent_sockets(4, service.grpc, ELSEWHERE).await;
    let mut beyond = silent(service.grpc, ELSEWHERE).await;
    assert!(
        closed_by(&mut beyond, Instant::now() + WAIT).await,
        "the fifth connection from one address was not closed"
    );
    assert_eq!(metric(service.metrics, refused).await, Some(1.0));
    assert_eq!(metric(service.metrics, open).await, Some(4.0));
    // Another address is served meanwhile.
    let channel = plaintext_channel(service.grpc).await;
    serving(channel.clone()).await.unwrap();
    assert_eq!(metric(service.metrics, open).await, Some(5.0));

    // One of the four leaves; its place is free for the same address again.
    drop(held.pop());
    until_metric(&service, open, 4.0).await;
    held.push(silent(service.grpc, ELSEWHERE).await);
    until_metric(&service, open, 5.0).await;
    assert_eq!(metric(service.metrics, refused).await, Some(1.0));
    serving(channel).await.unwrap();
}
