//! Traces: a caller's W3C trace context continues on the gateway request made for its call (the
//! simulator records the headers), polls carry none, with OTEL_EXPORTER_OTLP_ENDPOINT set a
//! real process exports its spans over OTLP/HTTP with the semantic conventions' attributes,
//! and a call's JSON log line carries its trace id.
use crate::common;

use std::sync::{Arc, Mutex};

use axum::{body::Bytes, routing::post, Router};
use ccgw_callcontrol::proto::call_control_client::CallControlClient;
use ccgw_sim::{Fault, FaultRule};
use common::{
    desktop_sign_in, handing_over, release_with_id, sim_config, spawn_app, spawn_sim, wait_until,
    watch_req, CALLER, WAIT,
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::any_value,
    trace::v1::{span::SpanKind, status::StatusCode, Span},
};
use prost::Message;
use tokio::net::TcpListener;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN_ID: &str = "00f067aa0ba902b7";
const TRACESTATE: &str = "vendor=opaque-value";
/// The trace of a call that fails.
const FAILED_TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";

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

/// Every span of every export.
fn exported_spans(exports: &[Bytes]) -> Vec<Span> {
    exports
        .iter()
        .flat_map(|body| {
            ExportTraceServiceRequest::decode(body.as_ref())
                .expect("an OTLP/protobuf export")
                .resource_spans
        })
        .flat_map(|resource| resource.scope_spans)
        .flat_map(|scope| scope.spans)
        .collect()
}

/// The span's attribute `key`, if it has it.
fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a any_value::Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn int(value: i64) -> Option<any_value::Value> {
    Some(any_value::Value::IntValue(value))
}

fn text(value: &str) -> Option<any_value::Value> {
    Some(any_value::Value::StringValue(value.into()))
}

fn is_error(span: &Span) -> bool {
    span.status
        .as_ref()
        .is_some_and(|status| status.code == StatusCode::Error as i32)
}

/// The one span of `kind` in the trace `trace_id`.
fn span_of<'a>(spans: &'a [Span], trace_id: &str, kind: SpanKind) -> &'a Span {
    let found: Vec<&Span> = spans
        .iter()
        .filter(|s| s.trace_id == hex(trace_id) && s.kind == kind as i32)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{kind:?} spans of trace {trace_id}: {found:?}"
    );
    found[0]
}

/// The JSON `rpc` line of the ReleaseCall with `request_id`.
fn rpc_line(logs: &common::KeptLogs, request_id: &str) -> serde_json::Value {
    let logs = logs.lock().unwrap();
    let lines: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&logs)
        .into_iter::<serde_json::Value>()
        .map(|line| line.expect("JSON log lines"))
        .filter(|line| line["message"] == "rpc" && line["request_id"] == request_id)
        .collect();
    assert_eq!(lines.len(), 1, "rpc lines of {request_id}: {lines:?}");
    lines[0].clone()
}

fn lower_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A real process with OTEL_EXPORTER_OTLP_ENDPOINT: the DELETE continues the caller's trace
/// from a span of the facade's own (same trace id, another parent span id), and the spans
/// reach the collector, in the caller's trace, by the time the process has exited: the batch
/// delay is set far beyond the test, so it is the flush at exit that exports them. The spans
/// follow OpenTelemetry's conventions: the server span has the call's numeric gRPC code and an
/// error status when it is not OK; the gateway request's client span has the gateway's address,
/// the HTTP method and status (an error status for a 5xx), and no attribute holds the Guid.
/// The call's JSON log line carries the trace id and the id of the call's server span.
#[tokio::test]
async fn a_process_with_an_otlp_endpoint_exports_the_callers_trace() {
    let (sim, sim_addr, _stop_sim) = spawn_sim(sim_config(), None).await;
    let (endpoint, exports) = collector().await;
    let gateway_url = format!("http://{sim_addr}");
    let (service, serving, logs) = common::spawn_service_keeping_logs(
        &["--gateway-url", &gateway_url],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
            ("OTEL_SERVICE_NAME", "ccgw-trace-test"),
        ],
    )
    .await;
    let addr = serving["listen"].as_str().unwrap();
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

    // A release the load balancer answers with 503, in a trace of its own.
    sim.place_call("101", CALLER).unwrap();
    sim.push_fault(FaultRule::once(Fault::HttpStatus { status: 503 }));
    let request = traced(
        handing_over(release_with_id("101", "exported-2"), &guid),
        &format!("00-{FAILED_TRACE_ID}-{CALLER_SPAN_ID}-01"),
    );
    let failed = tokio::time::timeout(WAIT, client.release_call(request))
        .await
        .expect("ReleaseCall answers")
        .expect_err("a 503 is no release");
    assert!(
        exports.lock().unwrap().is_empty(),
        "exported before the flush at exit"
    );

    common::signal(&service, common::Signal::Term).await;
    common::exits_cleanly(service).await;
    let exports = exports.lock().unwrap();
    assert!(!exports.is_empty(), "no export reached the collector");
    let service_name = b"ccgw-trace-test";
    let in_export = |body: &Bytes, needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    assert!(
        exports.iter().any(|body| in_export(body, service_name)),
        "OTEL_SERVICE_NAME not used"
    );
    assert!(
        !exports.iter().any(|body| in_export(body, guid.as_bytes())),
        "the Guid was exported"
    );

    let spans = exported_spans(&exports);
    let server = span_of(&spans, TRACE_ID, SpanKind::Server);
    assert_eq!(server.parent_span_id, hex(CALLER_SPAN_ID));
    assert_eq!(attribute(server, "rpc.grpc.status_code"), int(0).as_ref());
    assert!(!is_error(server), "{server:?}");
    let gateway = span_of(&spans, TRACE_ID, SpanKind::Client);
    assert_eq!(gateway.parent_span_id, server.span_id);
    assert_eq!(lower_hex(&gateway.span_id), parts[2], "the DELETE's parent");
    for (key, value) in [
        ("server.address", text("127.0.0.1")),
        ("server.port", int(sim_addr.port().into())),
        ("http.request.method", text("DELETE")),
        ("http.response.status_code", int(200)),
    ] {
        assert_eq!(
            attribute(gateway, key),
            value.as_ref(),
            "{key}: {gateway:?}"
        );
    }
    assert!(!is_error(gateway), "{gateway:?}");

    let server = span_of(&spans, FAILED_TRACE_ID, SpanKind::Server);
    assert_eq!(
        attribute(server, "rpc.grpc.status_code"),
        int(failed.code() as i64).as_ref()
    );
    assert!(is_error(server), "{server:?}");
    let gateway = span_of(&spans, FAILED_TRACE_ID, SpanKind::Client);
    assert_eq!(
        attribute(gateway, "http.response.status_code"),
        int(503).as_ref()
    );
    assert!(is_error(gateway), "{gateway:?}");

    // The call's log line finds its trace and its server span.
    let line = rpc_line(&logs, "exported-1");
    assert_eq!(line["trace_id"], TRACE_ID, "{line}");
    let server = span_of(&spans, TRACE_ID, SpanKind::Server);
    assert_eq!(line["span_id"], lower_hex(&server.span_id), "{line}");
}

/// Without an exporter there is no span of the facade's own: a call's JSON log line carries
/// the caller's trace id and span id (the parent of its gateway requests); a call without a
/// trace context has neither field.
#[tokio::test]
async fn the_log_line_of_a_traced_call_carries_the_callers_trace_id() {
    let (sim, sim_addr, _stop_sim) = spawn_sim(sim_config(), None).await;
    let gateway_url = format!("http://{sim_addr}");
    let (_service, serving, logs) =
        common::spawn_service_keeping_logs(&["--gateway-url", &gateway_url], &[]).await;
    let mut client = common::client_of(serving["listen"].as_str().unwrap()).await;
    let guid = desktop_sign_in(sim_addr, "101", false).await.guid;
    for (request_id, traceparent) in [("logged-1", Some(caller_traceparent())), ("logged-2", None)]
    {
        sim.place_call("101", CALLER).unwrap();
        let request = handing_over(release_with_id("101", request_id), &guid);
        let request = match &traceparent {
            Some(traceparent) => traced(request, traceparent),
            None => request,
        };
        tokio::time::timeout(WAIT, client.release_call(request))
            .await
            .expect("ReleaseCall answers")
            .expect("released");
    }
    // The line is written once the answer's last frame went, a moment after the client has it.
    wait_until("both calls are logged", || {
        let logs = logs.lock().unwrap();
        logs.contains("logged-1") && logs.contains("logged-2")
    })
    .await;
    let traced_line = rpc_line(&logs, "logged-1");
    assert_eq!(traced_line["trace_id"], TRACE_ID, "{traced_line}");
    assert_eq!(traced_line["span_id"], CALLER_SPAN_ID, "{traced_line}");
    let untraced = rpc_line(&logs, "logged-2");
    assert!(untraced.get("trace_id").is_none(), "{untraced}");
    assert!(untraced.get("span_id").is_none(), "{untraced}");
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
    common::signal(&service, common::Signal::Term).await;
    let exited = std::time::Instant::now();
    common::exits_cleanly(service).await;
    assert!(
        exited.elapsed() < std::time::Duration::from_secs(15),
        "the exit waited {:?} for the collector",
        exited.elapsed()
    );
    drop(black_hole);
}
