//! Limits: the cap on gateway requests other than event polls (in flight and waiting), and the
//! maximum age of client connections.
use crate::common;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use ccgw_callcontrol::proto::ReleaseOutcome;
use common::{
    expect_status, hang, release_req, sim_config, spawn_app_with, wait_until, watch_on, watch_req,
    TestApp, WAIT,
};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

fn hang_releases_of(app: &TestApp, agent: &str) {
    app.sim.push_fault(hang(&format!("/voicecall/{agent}/")));
}

fn gateway_busy(status: &tonic::Status) {
    let details = expect_status(status, tonic::Code::ResourceExhausted, "GATEWAY_BUSY");
    assert!(details.retry_info().is_some(), "no RetryInfo: {status:?}");
    let metadata = common::error_metadata(status);
    assert!(
        !metadata.contains_key("may_have_released"),
        "a refusal that sent nothing says nothing was released: {status:?}"
    );
}

/// Two releases hang at the gateway (the cap), a third waits (the queue): a fourth is refused at
/// once, RESOURCE_EXHAUSTED GATEWAY_BUSY with RetryInfo, and never reaches the gateway. When
/// one of the hanging releases goes away (its caller cancels), the waiting one is sent.
#[tokio::test]
async fn beyond_the_cap_and_the_queue_a_release_is_refused_with_nothing_sent() {
    let app = spawn_app_with(
        sim_config(),
        &["--max-gateway-requests", "2", "--max-gateway-queue", "1"],
    )
    .await;
    for agent in ["101", "102", "103", "104"] {
        app.sign_in(agent).await;
    }
    let admission = app.api.sessions().gateway().admission().clone();
    hang_releases_of(&app, "101");
    hang_releases_of(&app, "102");
    app.sim.place_call("103", "70093").unwrap();
    let first = app.release_in_background(tonic::Request::new(release_req("101")));
    let _second = app.release_in_background(tonic::Request::new(release_req("102")));
    wait_until("both hanging releases reached the gateway", || {
        app.releases_of("101") == 1 && app.releases_of("102") == 1
    })
    .await;
    assert_eq!(admission.in_flight(), 2);

    let queued = app.release_in_background(tonic::Request::new(release_req("103")));
    wait_until("the third release waits its turn", || {
        admission.waiting() == 1
    })
    .await;

    let refused = app.release(release_req("104")).await.unwrap_err();
    gateway_busy(&refused);
    assert_eq!(app.releases_of("104"), 0, "the refused release was sent");
    assert_eq!(
        app.releases_of("103"),
        0,
        "the queued release jumped the cap"
    );

    // The first caller goes away: its gateway request is dropped, its turn passes on.
    first.abort();
    let outcome = tokio::time::timeout(WAIT, queued)
        .await
        .expect("the queued release answers")
        .unwrap()
        .expect("the queued release succeeds");
    assert_eq!(outcome, ReleaseOutcome::Released);
    assert_eq!(app.releases_of("103"), 1);
    assert_eq!(admission.waiting(), 0);
}

/// A release waiting for its turn gives up when its deadline comes, with nothing sent:
/// GATEWAY_BUSY with RetryInfo, not a timeout whose outcome is unknown.
#[tokio::test]
async fn a_release_whose_deadline_comes_while_it_waits_is_refused_with_nothing_sent() {
    let app = spawn_app_with(sim_config(), &["--max-gateway-requests", "1"]).await;
    app.sign_in("101").await;
    app.sign_in("102").await;
    hang_releases_of(&app, "101");
    let _hanging = app.release_in_background(tonic::Request::new(release_req("101")));
    wait_until("the hanging release reached the gateway", || {
        app.releases_of("101") == 1
    })
    .await;
    let mut short = tonic::Request::new(release_req("102"));
    short.set_timeout(Duration::from_millis(1500));
    let refused = app.release_with(short).await.unwrap_err();
    gateway_busy(&refused);
    assert_eq!(app.releases_of("102"), 0, "the refused release was sent");
    let admission = app.api.sessions().gateway().admission();
    assert_eq!((admission.in_flight(), admission.waiting()), (1, 0));
}

/// Client connections the test's channel opened, and which of them ended (1 is the first).
#[derive(Default)]
struct Connections {
    opened: AtomicUsize,
    closed: std::sync::Mutex<Vec<usize>>,
}

impl Connections {
    fn is_closed(&self, number: usize) -> bool {
        self.closed.lock().unwrap().contains(&number)
    }
}

/// A client socket that records itself closed when the client lets go of it.
struct Counted {
    tcp: tokio::net::TcpStream,
    number: usize,
    connections: Arc<Connections>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.connections.closed.lock().unwrap().push(self.number);
    }
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// A tonic channel to the facade whose connections are counted.
async fn counted_channel(app: &TestApp) -> (Channel, Arc<Connections>) {
    let connections = Arc::new(Connections::default());
    let addr = app.grpc_addr;
    let counter = connections.clone();
    let connector = tower::service_fn(move |_: Uri| {
        let connections = counter.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let number = connections.opened.fetch_add(1, Ordering::SeqCst) + 1;
            Ok::<_, std::io::Error>(TokioIo::new(Counted {
                tcp,
                number,
                connections,
            }))
        }
    });
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(connector)
        .await
        .expect("the channel connects");
    (channel, connections)
}

/// With a short maximum age, the server asks a connection to go away (GOAWAY): new calls go
/// over a new connection while a stream keeps the old one; at age + grace the old connection
/// is closed and the stream on it ends (with an error: its client resumes from the last
/// resume_token it got).
#[tokio::test]
async fn old_connections_are_asked_to_go_away_then_closed_with_their_streams() {
    let app = spawn_app_with(
        sim_config(),
        &[
            "--max-connection-age-secs",
            "1",
            "--max-connection-age-grace-secs",
            "10",
            "--request-timeout-ms",
            "1000",
        ],
    )
    .await;
    app.sign_in("101").await;
    let (channel, connections) = counted_channel(&app).await;
    let mut stream = watch_on(
        ccgw_callcontrol::proto::call_control_client::CallControlClient::new(channel.clone()),
        watch_req(&["101"]),
    )
    .await
    .expect("the stream opens");
    assert_eq!(connections.opened.load(Ordering::SeqCst), 1);

    // Past the age, unary calls move to a new connection; the stream holds the old one open.
    let mut health = HealthClient::new(channel);
    let moved = tokio::time::timeout(WAIT, async {
        loop {
            let answer = health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            if connections.opened.load(Ordering::SeqCst) >= 2 {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("a new connection within the wait bound");
    if moved.is_err() {
        // The call that found the old connection going away may fail; the next one may not.
        health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("a call on the new connection works");
    }
    assert!(
        !connections.is_closed(1),
        "the stream's connection closed before its grace was over"
    );

    // Cut at age + grace: the client sees the broken connection (tonic: UNKNOWN, "h2 protocol
    // error"), not an end with OK, which would tell it nothing is missing.
    let (_, status) = stream.until_error().await;
    assert_ne!(status.code(), tonic::Code::Ok, "{status:?}");
    wait_until("the stream's connection is closed", || {
        connections.is_closed(1)
    })
    .await;
    health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("the new connection still serves");
}
