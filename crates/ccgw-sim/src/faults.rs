//! Records gateway requests and injects faults in front of the gateway routes.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::gateway::{envelope, json_response};
use super::state::{Shared, MAX_RECORDED_REQUESTS};
use super::{Fault, RecordedRequest};

/// Generated oversized bodies go out in chunks of this size, so the producer only runs as fast
/// as the connection drains.
const CHUNK: usize = 16 * 1024;

pub(crate) async fn record_and_inject(
    State(sim): State<Arc<Shared>>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_owned();
    if path == "/sim" || path.starts_with("/sim/") {
        return next.run(req).await;
    }
    let method = req.method().as_str().to_owned();
    // Extracted in a plain fn: a borrow of the request (whose body is not Sync) must not live
    // across the awaits below, or the middleware future is not Send.
    let (guid, cookie) = session_headers(req.headers());
    let (traceparent, tracestate) = trace_headers(req.headers());
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| *peer);
    let fault = {
        let mut st = sim.lock();
        st.request_seq += 1;
        let seq = st.request_seq;
        if st.requests.len() >= MAX_RECORDED_REQUESTS {
            st.requests.pop_front();
        }
        st.requests.push_back(RecordedRequest {
            seq,
            method: method.clone(),
            path: path.clone(),
            guid,
            cookie,
            traceparent,
            tracestate,
            peer,
        });
        st.faults.take(&method, &path)
    };
    // Paths carry agent and call ids, never the Guid, so they are safe to log.
    tracing::debug!(%method, %path, fault = ?fault, "sim: gateway request");
    match fault {
        None => next.run(req).await,
        Some(Fault::Latency { ms }) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            next.run(req).await
        }
        Some(Fault::Retcode { retcode, message }) => envelope(&retcode, &message),
        Some(Fault::HttpStatus { status }) => http_status(status),
        Some(Fault::Malformed) => json_response(
            StatusCode::OK,
            br#"{"message":"","retcode":"0","event":{"eventType":"AgentEvent_Tal"#.to_vec(),
        ),
        Some(Fault::Drop) => dropped(),
        Some(Fault::LoseAnswer) => {
            // Executed in full (state changes, queued events), then the answer is thrown away.
            let answer = next.run(req).await;
            tracing::debug!(%method, %path, status = %answer.status(), "sim: answer lost");
            drop(answer);
            dropped()
        }
        Some(Fault::Oversized { bytes }) => oversized(sim, bytes),
    }
}

/// `Guid` and `Cookie` header values (several cookie headers joined with `; `).
pub(crate) fn session_headers(headers: &axum::http::HeaderMap) -> (Option<String>, Option<String>) {
    let guid = headers
        .get("guid")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let cookies: Vec<&str> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (guid, (!cookies.is_empty()).then(|| cookies.join("; ")))
}

/// The W3C trace context headers, as sent.
fn trace_headers(headers: &axum::http::HeaderMap) -> (Option<String>, Option<String>) {
    let value = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    (value("traceparent"), value("tracestate"))
}

/// What nginx / a load balancer answers when the gateway behind it is sick.
fn http_status(status: u16) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let line = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    let body = format!(
        "<html>\r\n<head><title>{line}</title></head>\r\n<body>\r\n<center><h1>{line}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    );
    let mut resp = (status, body).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    resp
}

/// A chunked 200 whose body stream fails at once: hyper aborts the connection without
/// finishing the message, so the client never gets a complete answer (`drop`, `lose_answer`).
fn dropped() -> Response {
    let stream = futures_util::stream::iter([Err::<Bytes, std::io::Error>(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "sim: drop fault",
    ))]);
    json_response_body(Body::from_stream(stream))
}

/// A chunked 200 carrying exactly `total` bytes: the start of an envelope, then padding, then
/// the closing of the envelope (JSON only when `total` leaves room for both ends).
fn oversized(sim: Arc<Shared>, total: u64) -> Response {
    const HEAD: &[u8] = br#"{"message":"","retcode":"0","result":{"pad":""#;
    const TAIL: &[u8] = br#""}}"#;
    let byte_at = move |i: u64| -> u8 {
        let head = HEAD.len() as u64;
        let tail = TAIL.len() as u64;
        if i < head {
            HEAD[i as usize]
        } else if total >= head + tail && i >= total - tail {
            TAIL[(i - (total - tail)) as usize]
        } else {
            b'x'
        }
    };
    let stream = futures_util::stream::unfold(0u64, move |offset| {
        let sim = sim.clone();
        async move {
            if offset >= total {
                return None;
            }
            let len = (total - offset).min(CHUNK as u64);
            let chunk: Vec<u8> = (offset..offset + len).map(byte_at).collect();
            // Counted when the connection pulls the chunk, i.e. as fast as the client reads.
            sim.oversized_bytes.fetch_add(len, Ordering::Relaxed);
            Some((Ok::<_, std::io::Error>(Bytes::from(chunk)), offset + len))
        }
    });
    json_response_body(Body::from_stream(stream))
}

fn json_response_body(body: Body) -> Response {
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    resp
}
