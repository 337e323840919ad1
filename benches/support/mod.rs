//! What every benchmark needs: a simulator and the facade on loopback in this process (the
//! tests' own harness, so that both run the app the same way), latency reports and RSS.
#![allow(dead_code)]

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use ccgw_sim::SimConfig;
use hdrhistogram::Histogram;

#[path = "../../tests/it/common/mod.rs"]
pub mod common;
pub mod processes;
pub use common::TestApp;

/// Benchmarks run without caller authorization: all their clients are one caller, which alone
/// would get only its share (a quarter) of what callers share. These flags give it all of each
/// shared capacity at its default, so that the numbers mean what they meant before the shares.
pub const ONE_CALLER_GETS_ALL: [&str; 8] = [
    "--max-request-ids-per-caller",
    "100000",
    "--max-pending-request-ids-per-caller",
    "1088",
    "--max-gateway-queue-per-caller",
    "1024",
    "--max-release-waiters-per-caller",
    "1000",
];

/// The simulator with a real gateway's long-poll wait (its default) and no sign-out for missed
/// polls (an agent signed in for one measurement waits unpolled through the others), and the
/// facade with extra `flags`.
pub async fn spawn(flags: &[&str]) -> TestApp {
    let flags = [flags, &ONE_CALLER_GETS_ALL].concat();
    common::spawn_app_with(
        SimConfig {
            signout_after: None,
            ..SimConfig::default()
        },
        &flags,
    )
    .await
}

/// The numbers on the command line, in order, each defaulting to its entry of `defaults`;
/// other words (cargo's `--bench`) are skipped.
pub fn numbers_from_args<const N: usize>(defaults: [usize; N]) -> [usize; N] {
    let given: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    std::array::from_fn(|i| given.get(i).copied().unwrap_or(defaults[i]))
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

/// Resident memory of this process, KiB.
pub fn rss_kib() -> u64 {
    common::rss_kib_of("self")
}

/// CPU time process `pid` used so far, user and system, all threads (from /proc).
pub fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces:
    // state is field 3, utime 14 and stime 15.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_micros(ticks * 1_000_000 / per_second)
}

/// Runs `total` calls of `op`, `concurrency` at a time; returns latencies (µs) and wall time.
pub async fn load<F, Fut>(total: usize, concurrency: usize, op: F) -> (Histogram<u64>, Duration)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (op, next) = (op.clone(), next.clone());
            tokio::spawn(async move {
                let mut histogram = Histogram::<u64>::new(3).unwrap();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= total {
                        break histogram;
                    }
                    let t = Instant::now();
                    op(n).await;
                    histogram.record(t.elapsed().as_micros() as u64).unwrap();
                }
            })
        })
        .collect();
    let mut all = Histogram::<u64>::new(3).unwrap();
    for worker in workers {
        all.add(worker.await.unwrap()).unwrap();
    }
    (all, started.elapsed())
}
