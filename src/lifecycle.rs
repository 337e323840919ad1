//! One lifecycle for the service: when shutdown begins, when the drain gives up, and every task
//! the service spawns. Rooms take child tokens of the two moments and spawn through the one
//! tracker; `server::run` is the one place that says in which order they happen.
use std::{fmt::Display, future::Future, time::Duration};

use tokio::task::JoinHandle;
use tokio_util::{
    sync::{CancellationToken, WaitForCancellationFutureOwned},
    task::TaskTracker,
};

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

    /// Resolves once the service has drained (shutdown began and the server closed the task
    /// tracker), so that what draining calls change can still be shared with other replicas.
    pub(crate) fn drained(&self) -> impl Future<Output = ()> + Send + 'static {
        let lifecycle = self.clone();
        async move {
            lifecycle.shutdown.cancelled().await;
            while !lifecycle.tasks.is_closed() {
                tokio::time::sleep(DRAINED_CHECK).await;
            }
        }
    }
}

/// How often a stopping service is checked for having drained.
const DRAINED_CHECK: Duration = Duration::from_millis(100);

/// A server beside the gRPC server (the metrics endpoint, the plaintext health port), running
/// until [`SideServer::stop`]. Each is stopped once the gRPC server has drained, so that
/// scrapes and probes still see a draining replica.
pub(crate) struct SideServer<E> {
    /// What it is, for the log.
    what: &'static str,
    stop: CancellationToken,
    task: JoinHandle<Result<(), E>>,
}

/// How long a side server's last request (a scrape, a probe) gets once it is told to stop.
const SIDE_SERVER_STOP: Duration = Duration::from_secs(1);

impl<E: Display + Send + 'static> SideServer<E> {
    /// Spawns `serve`, which must end when the future it is given resolves.
    pub(crate) fn spawn<F>(
        what: &'static str,
        serve: impl FnOnce(WaitForCancellationFutureOwned) -> F,
    ) -> Self
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(stop.clone().cancelled_owned()));
        Self { what, stop, task }
    }

    /// Stops serving; a request under way gets a second to finish (streams are cut).
    pub(crate) async fn stop(self) {
        let what = self.what;
        self.stop.cancel();
        match tokio::time::timeout(SIDE_SERVER_STOP, self.task).await {
            Ok(Ok(Err(error))) => tracing::warn!(%error, "{what} failed"),
            Ok(_) => {}
            Err(_) => tracing::warn!("{what} did not stop within a second"),
        }
    }
}
