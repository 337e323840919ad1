//! Spawns a CC-Gateway simulator and the facade on ephemeral loopback ports, and a real tonic
//! client for the facade.
#![allow(dead_code)]

use std::{net::SocketAddr, time::Duration};

use ccgw_callcontrol::{
    api::CallControlApi,
    config::Config,
    domain::AgentId,
    proto::{call_control_client::CallControlClient, ReleaseCallRequest},
    server,
    sim::{RecordedRequest, SimConfig, Simulator},
    startup,
};
use clap::Parser;
use tokio::{net::TcpListener, sync::oneshot, time::Instant};
use tonic::transport::Channel;

pub struct TestApp {
    pub grpc_addr: SocketAddr,
    pub sim_addr: SocketAddr,
    pub sim: Simulator,
    pub api: CallControlApi,
    pub client: CallControlClient<Channel>,
    stop_server: Option<oneshot::Sender<()>>,
    stop_sim: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

/// A simulator with the reference's behaviour but a short long-poll wait.
pub fn sim_config() -> SimConfig {
    SimConfig {
        poll_wait: Duration::from_millis(300),
        ..SimConfig::default()
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(sim_config(), &[]).await
}

/// `flags` are extra command-line flags of the service, e.g. `["--legacy-release-path"]`.
pub async fn spawn_app_with(sim_config: SimConfig, flags: &[&str]) -> TestApp {
    let sim = Simulator::new(sim_config);
    let sim_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim_addr = sim_listener.local_addr().unwrap();
    let (stop_sim, sim_stopped) = oneshot::channel::<()>();
    tokio::spawn(sim.clone().serve(sim_listener, async {
        let _ = sim_stopped.await;
    }));
    spawn_facade(
        sim,
        sim_addr,
        &format!("http://{sim_addr}"),
        flags,
        Some(stop_sim),
    )
    .await
}

/// The facade pointed at `gateway_url` (which need not be the simulator's).
pub async fn spawn_facade(
    sim: Simulator,
    sim_addr: SocketAddr,
    gateway_url: &str,
    flags: &[&str],
    stop_sim: Option<oneshot::Sender<()>>,
) -> TestApp {
    let mut args = vec!["ccgw-callcontrol", "--gateway-url", gateway_url];
    args.extend_from_slice(flags);
    let config = Config::try_parse_from(args).expect("test flags parse");
    let api = startup::build_api(&config, gateway_url.to_owned()).expect("facade builds");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = listener.local_addr().unwrap();
    let (stop_server, server_stopped) = oneshot::channel::<()>();
    let server = tokio::spawn({
        let api = api.clone();
        let settings = config.server();
        async move {
            server::run(listener, api, settings, async {
                let _ = server_stopped.await;
            })
            .await
            .expect("server runs");
        }
    });
    let client = CallControlClient::connect(format!("http://{grpc_addr}"))
        .await
        .expect("client connects");
    TestApp {
        grpc_addr,
        sim_addr,
        sim,
        api,
        client,
        stop_server: Some(stop_server),
        stop_sim,
        server: Some(server),
    }
}

impl TestApp {
    /// Signs the agent in through the gateway interface; the facade's registry learns the
    /// session from the answer's Set-GUID. Returns the Guid.
    pub async fn sign_in(&self, agent: &str) -> String {
        let id = agent_id(agent);
        let answer = self
            .api
            .gateway()
            .sign_in(id, "secret", "88001", false, deadline())
            .await
            .expect("sign-in answers");
        assert_eq!(answer.retcode, "0", "sign-in of {agent}: {answer:?}");
        self.guid_of(agent).expect("sign-in registered a session")
    }

    pub fn guid_of(&self, agent: &str) -> Option<String> {
        self.api
            .gateway()
            .sessions()
            .get(agent_id(agent))
            .map(|s| s.guid.expose().to_owned())
    }

    /// Gateway requests the simulator received, minus sign-ins.
    pub fn upstream(&self) -> Vec<RecordedRequest> {
        self.sim
            .requests()
            .into_iter()
            .filter(|r| !r.path.contains("/onlineagent/"))
            .collect()
    }

    pub async fn release(
        &self,
        request: ReleaseCallRequest,
    ) -> Result<ccgw_callcontrol::proto::ReleaseCallResponse, tonic::Status> {
        self.release_with(tonic::Request::new(request)).await
    }

    pub async fn release_with(
        &self,
        mut request: tonic::Request<ReleaseCallRequest>,
    ) -> Result<ccgw_callcontrol::proto::ReleaseCallResponse, tonic::Status> {
        if request.metadata().get("grpc-timeout").is_none() {
            request.set_timeout(Duration::from_secs(10));
        }
        let mut client = self.client.clone();
        tokio::time::timeout(Duration::from_secs(30), client.release_call(request))
            .await
            .expect("ReleaseCall answers within 30 s")
            .map(tonic::Response::into_inner)
    }

    /// Triggers graceful shutdown and waits (bounded) for the server to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop_server.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(30), server)
                .await
                .expect("server stops within 30 s")
                .expect("server task");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop_server.take() {
            let _ = stop.send(());
        }
        if let Some(stop) = self.stop_sim.take() {
            let _ = stop.send(());
        }
    }
}

pub fn agent_id(raw: &str) -> AgentId {
    AgentId::parse("agent_id", raw, 999_999).unwrap()
}

pub fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

pub fn release_req(agent: &str) -> ReleaseCallRequest {
    ReleaseCallRequest {
        agent_id: agent.into(),
        ..Default::default()
    }
}
