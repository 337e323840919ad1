//! The integration tests, one module per subject, in one test binary: linking the facade and
//! this harness once instead of once per subject is most of what a test build spends. Tests
//! that need a process to themselves are binaries of their own: `tests/session_memory.rs`
//! (measures the process's RSS) and `tests/secrets.rs` (installs a global tracing subscriber
//! that captures every log line of the process).
mod common;

mod caller_shares;
mod callers;
mod cleartext;
mod connections;
mod deploy;
mod gateway_tls;
mod grpcurl;
mod health_shutdown;
mod limits;
mod metrics;
mod readme;
mod reflection;
mod release_call;
mod replicas;
mod replicas_events;
mod replicas_in_memory;
mod replicas_ownership;
mod replicas_requests;
mod replicas_sessions;
mod replicas_startup;
mod retry_safety;
mod sessions;
mod tls;
mod traces;
mod watch_events;
