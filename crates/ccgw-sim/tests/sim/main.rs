//! The simulator's integration tests, one binary: the library over real sockets (`sockets`)
//! and the `ccgw-sim` binary's HTTPS listener (`tls_binary`).
use std::time::Duration;

mod sockets;
mod tls_binary;

/// Upper bound of every single wait: generous, since it only decides when a broken simulator
/// fails a test, never whether a working one passes on a loaded machine.
const BOUND: Duration = Duration::from_secs(20);
