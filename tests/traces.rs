//! Issue 9, traces: a caller's W3C trace context continues on the gateway request made for its
//! call (the simulator records the headers), polls carry none, and with
//! OTEL_EXPORTER_OTLP_ENDPOINT set a real process exports its spans over OTLP/HTTP.
mod common;

use std::sync::{Arc, Mutex};

use axum::{body::Bytes, routing::post, Router};
use ccgw_callcontrol::proto::{call_control_client::CallControlClient, ReleaseCallRequest};
use common::{
    desktop_sign_in, handing_over, release_req, sim_config, spawn_app, spawn_sim, wait_until,
    watch_req, CALLER, WAIT,
};
use tokio::net::TcpListener;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN_ID: &str = "00f067aa0ba902b7";
const TRACESTATE: &str = "vendor=opaque-value";

fn caller_traceparent() -> String {
    format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01")
}

/// `request` with the caller's trace context in its metadata.
fn traced<T>(mut request: tonic::Request<T>, traceparent: &str) -> tonic::Request<T> {
    let metadata = request.metadata_mut();
    metadata.insert("traceparent", traceparent.parse().unwrap());
    metadata.insert("tracestate", TRACESTATE.parse().unwrap());
    request
}

/// A ReleaseCall with a request_id, so that its release runs on a task of its own (one that
/// outlives the caller).
fn release_with_id(agent: &str, request_id: &str) -> ReleaseCallRequest {
    ReleaseCallRequest {
        request_id: request_id.into(),
        ..release_req(agent)
    }
}

/// Without an exporter the caller's context goes to the gateway as it came: the caller's span
/// is the DELETE's parent. The agent's polls, which serve every watcher, carry none, though the
/// stream that started them had one.
#[tokio::test]
async fn the_callers_trace_continues_on_the_gateway_release_and_not_on_polls() {
    let app = spawn_app().await;
    app.sign_in("101").await;
    let _stream = app
        .watch(traced(
            tonic::Request::new(watch_req(&["101"])),
            &caller_traceparent(),
        ))
        .await;
    app.sim.place_call("101", CALLER).unwrap();
    let request = tonic::Request::new(release_with_id("101", "traced-1"));
    app.release_with(traced(request, &caller_traceparent()))
        .await
        .expect("released");

    let deletes = app.deletes();
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    assert_eq!(deletes[0].traceparent, Some(caller_traceparent()));
    assert_eq!(deletes[0].tracestate.as_deref(), Some(TRACESTATE));
    wait_until("the agent is polled", || !app.event_polls().is_empty()).await;
    for poll in app.event_polls() {
        assert_eq!((poll.traceparent, poll.tracestate), (None, None));
    }
}

/// A malformed traceparent is not passed on, nor is a tracestate without one.
#[tokio::test]
async fn a_malformed_trace_context_is_not_passed_on() {
    let app = spawn_app().await;
    app.sign_in("101").await;
    for (n, traceparent) in [
        "00-not-a-trace-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    ]
    .into_iter()
    .enumerate()
    {
        app.sim.place_call("101", CALLER).unwrap();
        let request = tonic::Request::new(release_with_id("101", &format!("bad-{n}")));
        app.release_with(traced(request, traceparent))
            .await
            .unwrap();
    }
    let deletes = app.deletes();
    assert_eq!(deletes.len(), 2, "{deletes:?}");
    for delete in deletes {
        assert_eq!((delete.traceparent, delete.tracestate), (None, None));
    }
}

/// A caller's trace context reaches the gateway rebuilt, never as its text: a 14 KiB
/// `traceparent` of a later version (`cc`; the server takes 16 KiB of metadata in all) is read
/// by its first 55 characters and sent as version 00; a `tracestate` over the W3C bounds
/// (750 characters, or 33 members) is left out, a valid one is sent with the whitespace between its
/// members removed.
#[tokio::test]
async fn the_gateway_gets_a_rebuilt_trace_context_never_the_callers_text() {
    let app = spawn_app().await;
    app.sign_in("101").await;
    let future = format!("cc-{TRACE_ID}-{CALLER_SPAN_ID}-01-");
    let traceparent = format!("{future}{}", "x".repeat(14 * 1024 - future.len()));
    let members = |n: usize| {
        (0..n)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let tracestates = [
        ["a", "b", "c"]
            .map(|key| format!("{key}={}", "v".repeat(250)))
            .join(","),
        members(33),
        " vendor=opaque-value ,\t other@sys=x ".into(),
    ];
    for (n, tracestate) in tracestates.iter().enumerate() {
        app.sim.place_call("101", CALLER).unwrap();
        let mut request = tonic::Request::new(release_with_id("101", &format!("long-{n}")));
        let metadata = request.metadata_mut();
        metadata.insert("traceparent", traceparent.parse().unwrap());
        metadata.insert("tracestate", tracestate.parse().unwrap());
        app.release_with(request).await.expect("released");
    }
    let deletes = app.deletes();
    assert_eq!(deletes.len(), tracestates.len(), "{deletes:?}");
    for delete in &deletes {
        let sent = delete.traceparent.as_deref();
        // Not the value itself: it may be 14 KiB.
        assert!(
            sent == Some(caller_traceparent().as_str()),
            "a traceparent of {:?} bytes",
            sent.map(str::len)
        );
    }
    let sent: Vec<_> = deletes.iter().map(|d| d.tracestate.as_deref()).collect();
    assert_eq!(sent, [None, None, Some("vendor=opaque-value,other@sys=x")]);
}

/// A stand-in OTLP/HTTP collector: keeps the body of every POST to /v1/traces.
async fn collector() -> (String, Arc<Mutex<Vec<Bytes>>>) {
    let exports = Arc::new(Mutex::new(Vec::new()));
    let router = Router::new().route(
        "/v1/traces",
        post({
            let exports = exports.clone();
            move |body: Bytes| async move {
                exports.lock().unwrap().push(body);
                // An empty ExportTraceServiceResponse.
                ([("content-type", "application/x-protobuf")], Bytes::new())
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, exports)
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

/// A real process with OTEL_EXPORTER_OTLP_ENDPOINT: the DELETE continues the caller's trace
/// from a span of the facade's own (same trace id, another parent span id), and the spans
/// reach the collector, in the caller's trace, by the time the process has exited: the batch
/// delay is set far beyond the test, so it is the flush at exit that exports them.
#[tokio::test]
async fn a_process_with_an_otlp_endpoint_exports_the_callers_trace() {
    let (sim, sim_addr, _stop_sim) = spawn_sim(sim_config(), None).await;
    let (endpoint, exports) = collector().await;
    let gateway_url = format!("http://{sim_addr}");
    let (service, addr) = common::spawn_service(
        &["--gateway-url", &gateway_url],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
            ("OTEL_SERVICE_NAME", "ccgw-trace-test"),
        ],
    )
    .await;
    let guid = desktop_sign_in(sim_addr, "101", false).await.guid;
    sim.place_call("101", CALLER).unwrap();
    let mut client = CallControlClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let request = traced(
        handing_over(release_with_id("101", "exported-1"), &guid),
        &caller_traceparent(),
    );
    tokio::time::timeout(WAIT, client.release_call(request))
        .await
        .expect("ReleaseCall answers")
        .expect("released");

    let deletes: Vec<_> = sim
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .collect();
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    let sent = deletes[0]
        .traceparent
        .clone()
        .expect("the DELETE carries a traceparent");
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!(parts.len(), 4, "{sent}");
    assert_eq!(parts[1], TRACE_ID, "{sent}");
    assert_ne!(
        parts[2], CALLER_SPAN_ID,
        "the facade's span is the parent: {sent}"
    );
    assert_eq!(parts[3], "01", "{sent}");
    assert!(
        exports.lock().unwrap().is_empty(),
        "exported before the flush at exit"
    );

    common::sigterm(&service).await;
    common::exits_cleanly(service).await;
    let exports = exports.lock().unwrap();
    assert!(!exports.is_empty(), "no export reached the collector");
    let trace_id = hex(TRACE_ID);
    let service_name = b"ccgw-trace-test";
    let in_trace = |body: &Bytes, needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    assert!(
        exports.iter().any(|body| in_trace(body, &trace_id)),
        "no span of the caller's trace"
    );
    assert!(
        exports.iter().any(|body| in_trace(body, service_name)),
        "OTEL_SERVICE_NAME not used"
    );
}

/// A collector that accepts connections and never answers (the kernel completes the
/// handshakes; nobody reads): exports hang until their own timeout. Calls go on regardless,
/// and the process still exits promptly: the flush at exit gives up after its bound.
#[tokio::test]
async fn a_collector_that_never_answers_neither_slows_calls_nor_holds_the_exit() {
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", black_hole.local_addr().unwrap());
    let (sim, sim_addr, _stop_sim) = spawn_sim(sim_config(), None).await;
    let gateway_url = format!("http://{sim_addr}");
    let (service, addr) = common::spawn_service(
        &["--gateway-url", &gateway_url],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "1"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "60000"),
        ],
    )
    .await;
    let guid = desktop_sign_in(sim_addr, "101", false).await.guid;
    let mut client = CallControlClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    for n in 0..20 {
        sim.place_call("101", CALLER).unwrap();
        let request = traced(
            handing_over(release_with_id("101", &format!("hole-{n}")), &guid),
            &caller_traceparent(),
        );
        // Far below the export's 60 s timeout: a call waiting on the exporter would miss it.
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            client.release_call(request),
        )
        .await
        .expect("ReleaseCall answers while exports hang")
        .expect("released");
    }
    common::sigterm(&service).await;
    let exited = std::time::Instant::now();
    common::exits_cleanly(service).await;
    assert!(
        exited.elapsed() < std::time::Duration::from_secs(15),
        "the exit waited {:?} for the collector",
        exited.elapsed()
    );
    drop(black_hole);
}
