//! One lifecycle for the service: when shutdown begins, when the drain gives up, and every task
//! the service spawns. Rooms take child tokens of the two moments and spawn through the one
//! tracker; `server::run` is the one place that says in which order they happen.
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Cheap to clone; every clone is the same lifecycle.
#[derive(Debug, Clone, Default)]
pub(crate) struct Lifecycle {
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
    tasks: TaskTracker,
}

impl Lifecycle {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Cancelled when shutdown begins (SIGTERM): streams deliver what they hold and end, poll
    /// loops stop, no new watcher is admitted.
    pub(crate) fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Cancelled when the drain gives up: calls still running answer at once with what they
    /// know.
    pub(crate) fn hard_stop(&self) -> &CancellationToken {
        &self.hard_stop
    }

    /// Every task the service spawns (poll loops, stream forwarders, releases that must outlive
    /// their caller), so that shutdown can wait for them, bounded.
    pub(crate) fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }
}
