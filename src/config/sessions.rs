//! The agents' gateway sessions the facade holds.
use std::time::Duration;

use clap::Args;

use crate::sessions::SessionLimits;

/// Flags of the session registry: how many agents' sessions it holds, and for how long unused.
#[derive(Debug, Clone, Args)]
pub(crate) struct SessionFlags {
    /// Agents whose gateway session the facade holds at most; a handover for one more is
    /// refused (RESOURCE_EXHAUSTED) unless a session has been idle for --session-idle-secs.
    #[arg(long, env = "CCGW_MAX_SESSIONS", default_value_t = 50_000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub(crate) max_sessions: u32,

    /// A session no release and no poll used for this long is forgotten, in seconds (the
    /// gateway signs an agent out after 2 minutes without a poll anyway). At least 600, so a
    /// polled agent's session, used every poll, never is.
    #[arg(long, env = "CCGW_SESSION_IDLE_SECS", default_value_t = 3_600,
          value_parser = clap::value_parser!(u64).range(600..=604_800))]
    pub(crate) session_idle_secs: u64,
}

impl SessionFlags {
    pub(super) fn limits(&self) -> SessionLimits {
        SessionLimits {
            max_sessions: self.max_sessions as usize,
            idle: Duration::from_secs(self.session_idle_secs),
        }
    }
}
