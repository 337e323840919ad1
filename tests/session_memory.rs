//! What callers can make the facade hold is bounded, measured by the process's RSS: alone in
//! its binary so that no other test's allocations move the RSS it measures.
#[path = "it/common/mod.rs"]
mod common;

use common::{
    expect_status, handing_over, junk_guid, release_req, rss_kib_of, sim_config, spawn_app_with,
    watch_req,
};
use tonic::Code;

/// Requests refused before they reach the gateway (DEADLINE_TOO_SHORT,
/// TOO_MANY_WATCHERS) leave nothing behind, however many agents they name, and memory stays
/// flat. (Before, each of them installed its handover.)
#[tokio::test]
async fn handovers_on_requests_refused_before_the_gateway_leave_nothing() {
    let app = spawn_app_with(
        sim_config(),
        &["--request-timeout-ms", "10", "--max-watchers", "1"],
    )
    .await;
    app.sign_in("101").await;
    let _only_watcher = app.watch(watch_req(&["101"])).await;
    let app = &app;
    let refused_before_the_gateway = |n: u32| async move {
        let agent = (1000 + n).to_string();
        let status = app
            .release_with(handing_over(release_req(&agent), &junk_guid(n)))
            .await
            .unwrap_err();
        expect_status(&status, Code::DeadlineExceeded, "DEADLINE_TOO_SHORT");
        let status = app
            .watch_refused(handing_over(watch_req(&[&agent]), &junk_guid(n)))
            .await;
        expect_status(&status, Code::ResourceExhausted, "TOO_MANY_WATCHERS");
    };
    for n in 0..300 {
        refused_before_the_gateway(n).await;
    }
    let rss_before = rss_kib_of("self");
    for n in 300..3000 {
        refused_before_the_gateway(n).await;
    }
    let grown = rss_kib_of("self").saturating_sub(rss_before);
    assert_eq!(app.api.sessions().registry().len(), 1, "only 101's session");
    assert!(grown < 8 * 1024, "RSS grew {grown} KiB");
    assert!(app.upstream().iter().all(|r| r.path.ends_with("/101")));
}
