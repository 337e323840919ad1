//! Several facades (replicas) in this test process sharing one simulator and one
//! [`SharedMemory`]: the replication scenarios without nats-server, fast.
use std::net::SocketAddr;

use ccgw_callcontrol::{
    events::{desired_owner, shard_of},
    shared_state::SharedMemory,
    startup,
};
use ccgw_sim::Simulator;
use tokio::sync::oneshot;

use tonic_health::pb::health_check_response::ServingStatus;

use super::{
    agent_id, facade_config, health_becomes, replicas::Leases, serve_facade, sim_config, spawn_sim,
    TestApp, WAIT,
};

/// Replicas in this process; replica `i` is member `i` of [`shared`](Self::shared).
pub struct MemoryReplicas {
    pub sim: Simulator,
    pub sim_addr: SocketAddr,
    pub shared: SharedMemory,
    /// `None` once stopped.
    pub replicas: Vec<Option<TestApp>>,
    _stop_sim: oneshot::Sender<()>,
}

/// `n` facades on one simulator sharing one [`SharedMemory`], their shard leases timed as
/// `leases` says; returns once each is ready (it holds its share of the shards), as a rollout
/// waits for each.
pub async fn spawn_replicas_in_memory(n: usize, leases: Leases) -> MemoryReplicas {
    let (sim, sim_addr, stop_sim) = spawn_sim(sim_config(), None).await;
    let gateway_url = format!("http://{sim_addr}");
    let flags = leases.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let config = facade_config(&gateway_url, &flags);
    let shared = startup::shared_memory(&config);
    let mut replicas = Vec::with_capacity(n);
    for _ in 0..n {
        let app = startup::build_app_on(&config, gateway_url.clone(), &Default::default(), &shared)
            .await
            .expect("facade builds");
        let replica = serve_facade(app, &config, false, sim.clone(), sim_addr, None).await;
        let addr = replica.grpc_addr.to_string();
        health_becomes(&addr, "", ServingStatus::Serving, WAIT).await;
        replicas.push(Some(replica));
    }
    MemoryReplicas {
        sim,
        sim_addr,
        shared,
        replicas,
        _stop_sim: stop_sim,
    }
}

impl MemoryReplicas {
    /// Replica `i`, which must be running.
    pub fn replica(&self, i: usize) -> &TestApp {
        self.replicas[i].as_ref().expect("a running replica")
    }

    /// Stops replica `i` gracefully (it hands its leases back), waiting for it.
    pub async fn stop(&mut self, i: usize) {
        self.replicas[i]
            .take()
            .expect("a running replica")
            .shutdown()
            .await;
    }

    /// The replica the shards' spread gives `agent`'s polling to, among the first `members`.
    pub fn desired_poller(&self, agent: &str, members: usize) -> usize {
        let ids: Vec<String> = (0..members).map(|i| self.shared.member_id(i)).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let shard = shard_of(agent_id(agent));
        let owner = desired_owner(shard, &ids).expect("members");
        ids.iter().position(|id| *id == owner).unwrap()
    }

    /// An agent id from 101 up whose polling the spread gives to replica `i` of `members`.
    pub fn agent_polled_by(&self, i: usize, members: usize) -> String {
        (101..)
            .map(|n: u32| n.to_string())
            .find(|agent| self.desired_poller(agent, members) == i)
            .unwrap()
    }

    /// The replica holding the lease of `agent`'s shard now.
    pub fn poller_of(&self, agent: &str) -> Option<usize> {
        self.shared.poller_of(agent_id(agent))
    }

    /// The most polls of `agent` the simulator had in flight at once since its sign-in.
    pub fn max_polls_in_flight(&self, agent: &str) -> u32 {
        super::max_polls_in_flight(&self.sim, agent)
    }

    /// `DELETE`s (releases of the current call) the simulator received.
    pub fn deletes(&self) -> usize {
        super::releases_sent(&self.sim)
    }
}
