//! Who may call (the callers and tokens files, or nobody checked), and how much of what
//! callers share one caller may hold.
use std::path::PathBuf;

use clap::Args;

use crate::release::CallerShareLimits;

/// Flags of caller authorization and of the callers' shares.
#[derive(Debug, Clone, Args)]
pub(crate) struct CallerFlags {
    /// Callers file (TOML, e.g. from a ConfigMap): each caller's name, the agent id ranges and
    /// verbs (release, watch, handover) it is granted, and the client-certificate names that
    /// identify it. Re-read every --reload-secs. Without --simulate, this or --no-caller-auth
    /// is required.
    #[arg(long, env = "CCGW_CALLERS", conflicts_with = "no_caller_auth")]
    pub(crate) callers: Option<PathBuf>,

    /// Caller tokens file (e.g. from a Secret): one `NAME TOKEN` per line, NAME a caller of
    /// --callers, several lines per name for rotation; `#` starts a comment line. Callers send
    /// `authorization: Bearer TOKEN`. Re-read every --reload-secs.
    #[arg(
        long,
        env = "CCGW_CALLER_TOKENS",
        requires = "callers",
        conflicts_with = "no_caller_auth"
    )]
    pub(crate) caller_tokens: Option<PathBuf>,

    /// No caller authorization: anyone who reaches the port may release and watch any agent's
    /// calls. Only for a port nothing untrusted can reach.
    #[arg(long, env = "CCGW_NO_CALLER_AUTH")]
    pub(crate) no_caller_auth: bool,

    /// Open WatchReleaseEvents streams one caller may hold (RESOURCE_EXHAUSTED beyond), so that
    /// one caller cannot take all of --max-watchers. Without caller authorization, all
    /// clients are one caller.
    #[arg(long, env = "CCGW_MAX_STREAMS_PER_CALLER", default_value_t = 1_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(crate) max_streams_per_caller: u32,

    /// request_ids one caller may have remembered at once (releases under way, and answers
    /// the store keeps for the window), so that one caller cannot fill
    /// --idempotency-capacity for all (RESOURCE_EXHAUSTED CALLER_LIMIT_REACHED beyond; a
    /// request_id already answered is still replayed). Counted by each replica for the
    /// requests it serves [default: a quarter of --idempotency-capacity]
    #[arg(long, env = "CCGW_MAX_REQUEST_IDS_PER_CALLER",
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub(crate) max_request_ids_per_caller: Option<u32>,

    /// Releases with a request_id one caller may have under way at once (RESOURCE_EXHAUSTED
    /// CALLER_LIMIT_REACHED beyond) [default: a quarter of --max-gateway-requests plus
    /// --max-gateway-queue]
    #[arg(long, env = "CCGW_MAX_PENDING_REQUEST_IDS_PER_CALLER",
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub(crate) max_pending_request_ids_per_caller: Option<u32>,

    /// Gateway requests made for one caller that may wait for their turn at once, so that one
    /// caller cannot fill --max-gateway-queue for all (RESOURCE_EXHAUSTED CALLER_LIMIT_REACHED
    /// beyond, nothing sent) [default: a quarter of --max-gateway-queue]
    #[arg(long, env = "CCGW_MAX_GATEWAY_QUEUE_PER_CALLER",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(crate) max_gateway_queue_per_caller: Option<u32>,

    /// ReleaseCalls of one caller that may wait for their release event at once, so that one
    /// caller cannot take all of --max-release-waiters (RESOURCE_EXHAUSTED
    /// CALLER_LIMIT_REACHED beyond, nothing sent) [default: a quarter of
    /// --max-release-waiters]
    #[arg(long, env = "CCGW_MAX_RELEASE_WAITERS_PER_CALLER",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(crate) max_release_waiters_per_caller: Option<u32>,
}

/// The part of a shared capacity one caller may hold when its flag is not given: a quarter,
/// so that a caller who takes all of its share leaves three quarters to the others, and at
/// least four callers fill the capacity only together.
const DEFAULT_CALLER_SHARE_DIVISOR: u32 = 4;

/// A caller's share: `flag` when given, else a quarter of `shared` (at least one).
fn caller_share(flag: Option<u32>, shared: u32) -> usize {
    flag.unwrap_or_else(|| shared.div_ceil(DEFAULT_CALLER_SHARE_DIVISOR).max(1)) as usize
}

impl CallerFlags {
    /// The callers and tokens files, when caller authorization is on.
    pub(super) fn files(&self) -> Option<(PathBuf, Option<PathBuf>)> {
        self.callers
            .clone()
            .map(|callers| (callers, self.caller_tokens.clone()))
    }

    /// What one caller may hold of the `idempotency_capacity` request_ids, of the releases
    /// the gateway may have under way or queued (`gateway_requests`), and of the
    /// `release_waiters`.
    pub(super) fn release_shares(
        &self,
        idempotency_capacity: u32,
        gateway_requests: u32,
        release_waiters: u32,
    ) -> CallerShareLimits {
        CallerShareLimits {
            request_ids: caller_share(self.max_request_ids_per_caller, idempotency_capacity),
            pending_request_ids: caller_share(
                self.max_pending_request_ids_per_caller,
                gateway_requests,
            ),
            release_waiters: caller_share(self.max_release_waiters_per_caller, release_waiters),
        }
    }

    /// Of the `max_gateway_queue` gateway requests waiting their turn, those of one caller.
    pub(super) fn gateway_queue_share(&self, max_gateway_queue: u32) -> usize {
        caller_share(self.max_gateway_queue_per_caller, max_gateway_queue)
    }
}
