//! Each caller's share of the request_ids remembered and pending, and of the release waiters,
//! so that one caller cannot use up what all callers share. Kept by each process for the
//! requests it serves (replicas count apart), whichever store holds the ids.
use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use super::Retention;
use crate::{
    lock,
    shares::{CallerName, Share, Shares},
};

/// Which of a caller's limits a request was over; nothing was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum CallerLimit {
    /// Request ids remembered (answers kept, releases under way).
    RequestIds,
    /// Releases with a request_id under way.
    PendingRequestIds,
    /// ReleaseCalls waiting for their release event.
    ReleaseWaiters,
}

impl CallerLimit {
    /// The flag that sets the limit.
    pub(crate) const fn flag(self) -> &'static str {
        match self {
            Self::RequestIds => "--max-request-ids-per-caller",
            Self::PendingRequestIds => "--max-pending-request-ids-per-caller",
            Self::ReleaseWaiters => "--max-release-waiters-per-caller",
        }
    }
}

/// How much of what callers share one caller may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CallerShareLimits {
    pub(crate) request_ids: usize,
    pub(crate) pending_request_ids: usize,
    pub(crate) release_waiters: usize,
}

/// The callers' shares of the request_ids: a share is taken before an id is claimed as its
/// owner, and kept, once answered, as long as the store keeps the answer.
#[derive(Debug, Clone)]
pub(crate) struct RequestIdShares {
    remembered: Shares,
    pending: Shares,
    /// Remembered shares of kept answers, in the order their windows end (one window for all).
    kept: Arc<Mutex<VecDeque<(Instant, Share)>>>,
    window: Duration,
    /// Whether answers that may be forgotten early hold their place all the same (the NATS
    /// bucket does not evict them; the in-memory cache does, for any caller's new id).
    evictable_answers_stay: bool,
}

/// A caller's share of one request_id it owns.
#[derive(Debug)]
pub(crate) struct RequestIdShare {
    remembered: Share,
    _pending: Share,
}

impl RequestIdShares {
    pub(crate) fn new(limits: CallerShareLimits, window: Duration) -> Self {
        Self {
            remembered: Shares::new(limits.request_ids),
            pending: Shares::new(limits.pending_request_ids),
            kept: Arc::default(),
            window,
            evictable_answers_stay: false,
        }
    }

    /// The same shares, for a store in which answers that may be forgotten early stay for
    /// their window all the same.
    pub(crate) fn keeping_evictable_answers(self) -> Self {
        Self {
            evictable_answers_stay: true,
            ..self
        }
    }

    /// A share of one more request_id for `caller`, or the limit it is over.
    pub(crate) fn take(&self, caller: &CallerName) -> Result<RequestIdShare, CallerLimit> {
        self.forget_ended(Instant::now());
        let pending = self
            .pending
            .take(caller)
            .ok_or(CallerLimit::PendingRequestIds)?;
        let remembered = self
            .remembered
            .take(caller)
            .ok_or(CallerLimit::RequestIds)?;
        Ok(RequestIdShare {
            remembered,
            _pending: pending,
        })
    }

    /// The id was answered and is kept as `retention` says: its share is held as long.
    pub(crate) fn settle(&self, share: RequestIdShare, retention: Retention) {
        let kept = match retention {
            Retention::Forget => false,
            Retention::Evictable => self.evictable_answers_stay,
            Retention::Pinned => true,
        };
        if kept {
            let until = Instant::now() + self.window;
            lock(&self.kept).push_back((until, share.remembered));
        }
    }

    /// Gives back the shares of answers whose window ended.
    fn forget_ended(&self, now: Instant) {
        let mut kept = lock(&self.kept);
        while kept.front().is_some_and(|(until, _)| *until <= now) {
            kept.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(request_ids: usize, pending_request_ids: usize) -> CallerShareLimits {
        CallerShareLimits {
            request_ids,
            pending_request_ids,
            release_waiters: 1,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn kept_answers_hold_their_callers_share_for_the_window() {
        let shares = RequestIdShares::new(limits(2, 2), Duration::from_secs(60));
        let (a, b): (CallerName, CallerName) = ("a".into(), "b".into());
        let first = shares.take(&a).unwrap();
        let second = shares.take(&a).unwrap();
        assert_eq!(shares.take(&a).unwrap_err(), CallerLimit::PendingRequestIds);
        shares.settle(first, Retention::Pinned);
        // Answered: no longer pending, still remembered.
        assert_eq!(shares.take(&a).unwrap_err(), CallerLimit::RequestIds);
        shares.settle(second, Retention::Evictable);
        shares.settle(shares.take(&a).unwrap(), Retention::Forget);
        let held = shares.take(&b).expect("b has its own share");
        tokio::time::advance(Duration::from_secs(60)).await;
        let _again = shares.take(&a).expect("the window ended");
        drop(held);
        assert_eq!(shares.remembered.held_by("b"), 0);
        assert_eq!(lock(&shares.kept).len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn where_evictable_answers_stay_they_hold_their_share_too() {
        let shares =
            RequestIdShares::new(limits(1, 1), Duration::from_secs(60)).keeping_evictable_answers();
        let a: CallerName = "a".into();
        shares.settle(shares.take(&a).unwrap(), Retention::Evictable);
        assert_eq!(shares.take(&a).unwrap_err(), CallerLimit::RequestIds);
        tokio::time::advance(Duration::from_secs(60)).await;
        shares.take(&a).unwrap();
    }
}
