//! The `--simulate` demo: the embedded CC-Gateway simulator.
use std::net::SocketAddr;

use clap::Args;

/// Flags of the demo mode.
#[derive(Debug, Clone, Args)]
pub(crate) struct DemoFlags {
    /// Run on an embedded CC-Gateway simulator with demo agents 101, 102 and 103 signed in.
    // Kept in builds without the simulator so that asking for it gets a clear refusal rather
    // than clap's "unexpected argument".
    #[arg(long, hide = cfg!(not(feature = "simulator")))]
    pub(crate) simulate: bool,

    /// Where the embedded simulator listens (gateway interface and /sim control API).
    #[arg(long, env = "CCGW_SIM_LISTEN", default_value = "127.0.0.1:8043",
          hide = cfg!(not(feature = "simulator")))]
    pub(crate) sim_listen: SocketAddr,
}
