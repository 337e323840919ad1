//! wait_for_release_event: the agent's call releases watched from before the release is sent,
//! until the one of this release comes.
use std::sync::Arc;

use tokio::time::Instant;

use crate::{
    domain::AgentId,
    events::{
        EventHub, KindFilter, ReleaseEvent, ReleaseKind, SubscribeError, Watcher, WatcherEnd,
    },
    gateway::ReleaseTarget,
};

/// What became of the wait for a release's event. The call was released in every case but
/// `NotAsked`, where no wait was asked for or there was nothing to wait for (no call, or a
/// replayed answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Confirmation {
    NotAsked,
    Confirmed(Arc<ReleaseEvent>),
    /// The deadline passed first.
    NotObserved,
    /// The facade began shutting down first.
    ShuttingDown,
    /// The gateway stopped delivering the agent's events first.
    SessionEnded,
}

/// A watcher of the agent's call releases, with a release waiter's permit.
pub(super) async fn watch_releases(
    events: &EventHub,
    agent: AgentId,
) -> Result<Watcher, SubscribeError> {
    events
        .subscribe_release_waiter(agent, KindFilter::only(ReleaseKind::CallRelease))
        .await
}

/// Waits until `deadline` for the release event of a call just released: with a call id, that
/// call's; without, the agent's first.
pub(super) async fn wait_for_release(
    watcher: Result<Watcher, SubscribeError>,
    target: &ReleaseTarget,
    deadline: Instant,
) -> Confirmation {
    let wanted = |event: &ReleaseEvent| match target {
        ReleaseTarget::Call(call) => event.call_id == *call,
        ReleaseTarget::Current => true,
    };
    let mut watcher = match watcher {
        Ok(watcher) => watcher,
        Err(SubscribeError::ShuttingDown) => return Confirmation::ShuttingDown,
        Err(SubscribeError::NoSession(_)) => return Confirmation::SessionEnded,
        Err(_) => return Confirmation::NotObserved,
    };
    match watcher.next_event(wanted, deadline).await {
        Ok(Some(event)) => Confirmation::Confirmed(event),
        Ok(None) | Err(WatcherEnd::TooSlow { .. }) => Confirmation::NotObserved,
        Err(WatcherEnd::ShuttingDown { .. }) => Confirmation::ShuttingDown,
        Err(WatcherEnd::SessionEnded { .. }) => Confirmation::SessionEnded,
    }
}
