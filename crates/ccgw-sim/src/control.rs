//! The `/sim` control API (see the module doc of `sim` for the routes and curl examples).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::state::Shared;
use super::{FaultRule, SimError};

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/sim/agents/{agentid}", get(agent))
        .route("/sim/agents/{agentid}/calls", post(place_call))
        .route(
            "/sim/agents/{agentid}/customer-hangup",
            post(customer_hangup),
        )
        .route("/sim/agents/{agentid}/rotate-guid", post(rotate_guid))
        .route("/sim/agents/{agentid}/force-signout", post(force_signout))
        .route("/sim/agents/{agentid}/events", post(queue_event))
        .route("/sim/faults", post(push_fault).delete(clear_faults))
        .route("/sim/requests", get(requests).delete(clear_requests))
        .route("/sim/stats", get(stats))
}

/// Caller used when a control request names none.
const DEFAULT_CALLER: &str = "70093";

fn error(status: StatusCode, msg: impl ToString) -> Response {
    (status, Json(json!({"error": msg.to_string()}))).into_response()
}

fn sim_error(e: SimError) -> Response {
    let status = match e {
        SimError::BadAgentId(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::CONFLICT,
    };
    error(status, e)
}

#[derive(Deserialize, Default)]
struct CallRequest {
    caller: Option<String>,
}

async fn place_call(
    State(sim): State<Arc<Shared>>,
    Path(agentid): Path<String>,
    body: Bytes,
) -> Response {
    // An empty body is fine: the caller is optional.
    let req: CallRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CallRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        }
    };
    let caller = req.caller.as_deref().unwrap_or(DEFAULT_CALLER);
    match sim.place_call(&agentid, caller) {
        Ok(callid) => Json(json!({"callid": callid})).into_response(),
        Err(e) => sim_error(e),
    }
}

async fn customer_hangup(State(sim): State<Arc<Shared>>, Path(agentid): Path<String>) -> Response {
    match sim.customer_hangup(&agentid) {
        Ok(callid) => Json(json!({"callid": callid})).into_response(),
        Err(e) => sim_error(e),
    }
}

async fn rotate_guid(State(sim): State<Arc<Shared>>, Path(agentid): Path<String>) -> Response {
    match sim.rotate_guid(&agentid) {
        Ok(()) => Json(json!({})).into_response(),
        Err(e) => sim_error(e),
    }
}

async fn force_signout(State(sim): State<Arc<Shared>>, Path(agentid): Path<String>) -> Response {
    match sim.force_signout(&agentid) {
        Ok(()) => Json(json!({})).into_response(),
        Err(e) => sim_error(e),
    }
}

async fn queue_event(
    State(sim): State<Arc<Shared>>,
    Path(agentid): Path<String>,
    body: Bytes,
) -> Response {
    let event = match serde_json::from_slice::<Value>(&body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match sim.queue_event(&agentid, event) {
        Ok(()) => Json(json!({})).into_response(),
        Err(e) => sim_error(e),
    }
}

async fn agent(State(sim): State<Arc<Shared>>, Path(agentid): Path<String>) -> Response {
    match sim.agent_view(&agentid) {
        Ok(view) => Json(view).into_response(),
        Err(e) => sim_error(e),
    }
}

async fn push_fault(State(sim): State<Arc<Shared>>, body: Bytes) -> Response {
    match serde_json::from_slice::<FaultRule>(&body) {
        Ok(rule) => {
            sim.lock().faults.push_rule(rule);
            Json(json!({})).into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn clear_faults(State(sim): State<Arc<Shared>>) -> Response {
    sim.lock().faults.clear();
    Json(json!({})).into_response()
}

async fn requests(State(sim): State<Arc<Shared>>) -> Response {
    let list: Vec<_> = sim.lock().requests.iter().cloned().collect();
    Json(list).into_response()
}

async fn clear_requests(State(sim): State<Arc<Shared>>) -> Response {
    sim.lock().requests.clear();
    Json(json!({})).into_response()
}

async fn stats(State(sim): State<Arc<Shared>>) -> Response {
    let (requests, polls_in_flight, longest_unpolled, polled_twice, abandoned) = {
        let st = sim.lock();
        (
            st.request_seq,
            st.polls_in_flight(),
            st.longest_unpolled(tokio::time::Instant::now()),
            st.agents_polled_twice(),
            st.polls_abandoned(),
        )
    };
    Json(json!({
        "agents_polled_twice": polled_twice,
        "longest_unpolled_ms": longest_unpolled.as_millis() as u64,
        "oversized_bytes_sent": sim.oversized_bytes.load(Ordering::Relaxed),
        "polls_abandoned": abandoned,
        "polls_in_flight": polls_in_flight,
        "requests": requests,
    }))
    .into_response()
}
