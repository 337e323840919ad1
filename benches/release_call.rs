//! ReleaseCall through the facade vs the same gateway request made by hand, over loopback
//! against the simulator; plus the memory the request-id cache costs.
//!
//! `cargo bench --bench release_call [-- REQUESTS CONCURRENCY]`. Numbers go in BENCHMARKS.md.
use std::sync::Arc;

use ccgw_callcontrol::proto::{call_control_client::CallControlClient, ReleaseCallRequest};
use support::{load, numbers_from_args, report, rss_kib};

mod support;

const AGENTS: usize = 50;

#[tokio::main]
async fn main() {
    let [requests, concurrency] = numbers_from_args([20_000, 32]);

    let bench = support::spawn(&[]).await;
    let sim_url = format!("http://{}", bench.sim_addr);
    let grpc = format!("http://{}", bench.grpc_addr);
    let mut guids = Vec::new();
    for n in 0..AGENTS {
        guids.push(bench.sign_in(&(1000 + n).to_string()).await);
    }
    let rss_start = rss_kib();
    println!("ReleaseCall(call_id) answering NO_ACTIVE_CALL (dropcall 200-025), {requests} requests, {concurrency} concurrent, {AGENTS} agents");

    // By hand: the same dropcall with reqwest, Guid header and all.
    ccgw_callcontrol::install_crypto_provider();
    let http = reqwest::Client::new();
    let guids = Arc::new(guids);
    let by_hand = load(requests, concurrency, move |n| {
        let http = http.clone();
        let guids = guids.clone();
        let url = format!(
            "{sim_url}/agentgateway/resource/voicecall/{}/dropcall/1-1",
            1000 + n % AGENTS
        );
        async move {
            let answer = http
                .post(url)
                .header("Guid", &guids[n % AGENTS])
                .send()
                .await
                .unwrap();
            assert!(answer.text().await.unwrap().contains("200-025"));
        }
    })
    .await;
    report("gateway REST by hand (reqwest)", &by_hand.0, by_hand.1);

    let client = CallControlClient::connect(grpc.clone()).await.unwrap();
    let facade = load(requests, concurrency, move |n| {
        let mut client = client.clone();
        async move {
            let request = ReleaseCallRequest {
                agent_id: (1000 + n % AGENTS).to_string(),
                call_id: "1-1".into(),
                ..Default::default()
            };
            let answer = client.release_call(request).await.unwrap().into_inner();
            assert_eq!(answer.retcode, "200-025");
        }
    })
    .await;
    report("ReleaseCall through the facade", &facade.0, facade.1);
    println!(
        "RSS after both runs: {} KiB (start {} KiB)",
        rss_kib(),
        rss_start
    );

    // Memory of the idempotency cache: distinct request ids, each remembered.
    let ids = 20_000;
    let before = rss_kib();
    let client = CallControlClient::connect(grpc).await.unwrap();
    let remembered = load(ids, concurrency, move |n| {
        let mut client = client.clone();
        async move {
            let request = ReleaseCallRequest {
                agent_id: (1000 + n % AGENTS).to_string(),
                call_id: "1-1".into(),
                request_id: format!("bench-{n:08}-7c9e6679-7425-40de-944b-e07fc1f90ae7"),
                ..Default::default()
            };
            client.release_call(request).await.unwrap();
        }
    })
    .await;
    report(
        "ReleaseCall with a fresh request_id each",
        &remembered.0,
        remembered.1,
    );
    let grown = rss_kib().saturating_sub(before);
    println!(
        "RSS growth for {ids} remembered request ids: {grown} KiB (~{} bytes each)",
        grown * 1024 / ids as u64
    );
}
