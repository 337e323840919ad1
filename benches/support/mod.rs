//! What every benchmark needs: a simulator and the facade on loopback in this process, signed-in
//! agents, latency reports and RSS.
#![allow(dead_code)]

use std::time::Duration;

use ccgw_callcontrol::{api::CallControlApi, config::Config, domain::AgentId, server, startup};
use ccgw_sim::{SimConfig, Simulator};
use clap::Parser;
use hdrhistogram::Histogram;
use tokio::net::TcpListener;

pub struct Bench {
    pub sim: Simulator,
    pub sim_url: String,
    pub api: CallControlApi,
    /// `http://127.0.0.1:PORT` of the facade's gRPC server.
    pub grpc: String,
}

/// The simulator (no sign-out for missed polls) and the facade with extra `flags`.
pub async fn spawn(flags: &[&str]) -> Bench {
    let sim = Simulator::new(SimConfig {
        signout_after: None,
        ..SimConfig::default()
    });
    let sim_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim_url = format!("http://{}", sim_listener.local_addr().unwrap());
    tokio::spawn(sim.clone().serve(sim_listener, std::future::pending()));

    let mut args = vec!["bench", "--gateway-url", &sim_url];
    args.extend_from_slice(flags);
    let config = Config::try_parse_from(args).unwrap();
    let api = startup::build_api(&config, sim_url.clone()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(server::run(
        listener,
        api.clone(),
        config.server(),
        std::future::pending(),
    ));
    Bench {
        sim,
        sim_url,
        api,
        grpc,
    }
}

impl Bench {
    /// Signs `agent` in through the facade's gateway client; returns its Guid.
    pub async fn sign_in(&self, agent: u32) -> String {
        let agent = AgentId::parse("a", &agent.to_string(), 59_999).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let answer = self
            .api
            .gateway()
            .sign_in(agent, "pw", "1", false, deadline)
            .await
            .unwrap();
        assert_eq!(answer.retcode, "0");
        self.api
            .gateway()
            .sessions()
            .get(agent)
            .unwrap()
            .guid
            .expose()
            .to_owned()
    }
}

/// One line: count per second over `wall`, then latency quantiles (µs).
pub fn report(name: &str, histogram: &Histogram<u64>, wall: Duration) {
    println!(
        "{name:45} {:>8.0} /s  p50 {:>6} µs  p99 {:>6} µs  p99.9 {:>6} µs  max {:>6} µs",
        histogram.len() as f64 / wall.as_secs_f64(),
        histogram.value_at_quantile(0.5),
        histogram.value_at_quantile(0.99),
        histogram.value_at_quantile(0.999),
        histogram.max(),
    );
}

pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
