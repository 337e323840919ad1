//! ReleaseCall: how long one may run, and how long its request_id is remembered.
use std::time::Duration;

use clap::Args;

use crate::release::{CallerShareLimits, ReleasePolicy};

/// Flags of the release use case: its timeout and the idempotency store.
#[derive(Debug, Clone, Args)]
pub(crate) struct ReleaseFlags {
    /// Upper bound of one ReleaseCall, in milliseconds; a shorter gRPC deadline wins.
    #[arg(long, env = "CCGW_REQUEST_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub(crate) request_timeout_ms: u64,

    /// How long a request_id's answer is remembered, in seconds; at least the request timeout
    /// (with --nats-url, 10 s more: a claim must outlive its answer).
    #[arg(long, env = "CCGW_IDEMPOTENCY_WINDOW_SECS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub(crate) idempotency_window_secs: u64,

    /// How many request_ids are remembered at most. The oldest dropcall answers are forgotten
    /// first; a pending id or an answer to a release of the current call never is (new ids are
    /// refused instead: RESOURCE_EXHAUSTED, TOO_MANY_PENDING_RELEASES).
    #[arg(long, env = "CCGW_IDEMPOTENCY_CAPACITY", default_value_t = 100_000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub(crate) idempotency_capacity: u32,
}

impl ReleaseFlags {
    /// The upper bound of one ReleaseCall.
    pub(super) fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// The hang-up policy, with what one caller may hold of what callers share.
    pub(super) fn policy(
        &self,
        caller_shares: CallerShareLimits,
        release_while_unreachable: bool,
    ) -> ReleasePolicy {
        ReleasePolicy {
            dropcall_attempts: 3,
            connect_attempts: 3,
            retry_base_delay: Duration::from_millis(100),
            idempotency_window: Duration::from_secs(self.idempotency_window_secs),
            idempotency_capacity: self.idempotency_capacity as usize,
            caller_shares,
            release_while_unreachable,
        }
    }
}
