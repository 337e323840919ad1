//! The cap on gateway requests other than event polls (releases, dropcalls, sign-ins): at most
//! `max_in_flight` at once, at most `max_waiting` waiting for a turn. Event polls have their
//! own cap (one per polled agent, `--max-polled-agents`). A request made for a caller waits
//! only within that caller's share of the line, so that one caller cannot fill it for all. A
//! request refused here was never sent, so repeating it is safe.
use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

use super::GatewayError;
use crate::shares::{CallerName, Shares};

/// Cheap to clone; every clone is the same cap.
#[derive(Debug, Clone)]
pub struct GatewayAdmission {
    permits: Arc<Semaphore>,
    max_in_flight: usize,
    max_waiting: usize,
    waiting: Arc<AtomicUsize>,
    /// Each caller's places in the line.
    caller_places: Shares,
}

/// A turn to send one request; the next waiting request gets it when this is dropped.
#[derive(Debug)]
pub(crate) struct Turn {
    _permit: OwnedSemaphorePermit,
}

/// Why a request was refused a turn under the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BusyCause {
    /// `max_waiting` requests were waiting already.
    QueueFull,
    /// As many requests of the same caller as one caller may have were waiting already.
    CallerQueueFull,
    /// No turn came before the request's deadline (less the time a request needs).
    DeadlineWhileWaiting,
}

impl std::fmt::Display for BusyCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::QueueFull => "as many requests as --max-gateway-queue allows wait already",
            Self::CallerQueueFull => {
                "as many of the caller's requests as --max-gateway-queue-per-caller allows wait already"
            }
            Self::DeadlineWhileWaiting => "the deadline came while the request waited its turn",
        })
    }
}

impl GatewayAdmission {
    pub(crate) fn new(max_in_flight: usize, max_waiting: usize, per_caller: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            max_waiting,
            waiting: Arc::default(),
            caller_places: Shares::new(per_caller),
        }
    }

    /// Requests holding a turn now (sent, or about to be).
    pub fn in_flight(&self) -> usize {
        self.max_in_flight - self.permits.available_permits()
    }

    /// Requests waiting for a turn now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// A turn, at once or after waiting in line (first come, first served) until `give_up`.
    /// A request made for `caller` waits only within that caller's places in the line; one
    /// the facade makes for itself (None) only within the line's.
    pub(crate) async fn admit(
        &self,
        give_up: Instant,
        caller: Option<&CallerName>,
    ) -> Result<Turn, GatewayError> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(Turn { _permit: permit });
        }
        // The line's own limit first: a caller is told it is at its share only when that is
        // what keeps it out.
        let _in_line = self.join_line()?;
        let _caller_place = match caller {
            Some(caller) => Some(
                self.caller_places
                    .take(caller)
                    .ok_or(GatewayError::Busy(BusyCause::CallerQueueFull))?,
            ),
            None => None,
        };
        match tokio::time::timeout_at(give_up, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Turn { _permit: permit }),
            // The semaphore is never closed; treat it as no turn all the same.
            Ok(Err(_)) | Err(_) => Err(GatewayError::Busy(BusyCause::DeadlineWhileWaiting)),
        }
    }

    fn join_line(&self) -> Result<InLine<'_>, GatewayError> {
        let joined = self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_waiting).then_some(n + 1)
            });
        match joined {
            Ok(_) => Ok(InLine(&self.waiting)),
            Err(_) => Err(GatewayError::Busy(BusyCause::QueueFull)),
        }
    }
}

/// One place in the line; leaves it however the wait ends (turn, deadline, caller gone).
struct InLine<'a>(&'a AtomicUsize);

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// When a waiting request gives up: early enough that, had the turn come then, it could still
/// have been sent within its deadline.
pub(crate) fn give_up_at(deadline: Instant, min_budget: Duration) -> Instant {
    deadline.checked_sub(min_budget).unwrap_or(deadline)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    #[tokio::test(start_paused = true)]
    async fn beyond_the_line_requests_are_refused_and_a_freed_turn_goes_to_the_first_waiter() {
        let admission = GatewayAdmission::new(1, 1, 1);
        let first = admission.admit(far(), None).await.unwrap();
        assert_eq!((admission.in_flight(), admission.waiting()), (1, 0));
        let waiter = tokio::spawn({
            let admission = admission.clone();
            async move { admission.admit(far(), None).await.map(drop) }
        });
        while admission.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            admission.admit(far(), None).await.unwrap_err(),
            GatewayError::Busy(BusyCause::QueueFull)
        );
        drop(first);
        waiter.await.unwrap().unwrap();
        assert_eq!((admission.in_flight(), admission.waiting()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gives_up_at_its_deadline_and_leaves_the_line() {
        let admission = GatewayAdmission::new(1, 4, 4);
        let _held = admission.admit(far(), None).await.unwrap();
        let give_up = Instant::now() + Duration::from_secs(2);
        let refused = admission.admit(give_up, None).await.unwrap_err();
        assert_eq!(refused, GatewayError::Busy(BusyCause::DeadlineWhileWaiting));
        assert_eq!(Instant::now(), give_up);
        assert_eq!(admission.waiting(), 0);
    }

    /// Waits until `n` requests wait in line.
    async fn until_waiting(admission: &GatewayAdmission, n: usize) {
        while admission.waiting() < n {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_waits_only_within_its_places_and_leaves_the_rest_of_the_line_to_others() {
        let admission = GatewayAdmission::new(1, 4, 2);
        let held = admission.admit(far(), None).await.unwrap();
        let (a, b): (CallerName, CallerName) = ("a".into(), "b".into());
        let mut waiters = Vec::new();
        for (n, caller) in [a.clone(), a.clone(), b.clone()].into_iter().enumerate() {
            let line = admission.clone();
            waiters.push(tokio::spawn(async move {
                line.admit(far(), Some(&caller)).await.map(drop)
            }));
            until_waiting(&admission, n + 1).await;
        }
        assert_eq!(
            admission.admit(far(), Some(&a)).await.unwrap_err(),
            GatewayError::Busy(BusyCause::CallerQueueFull),
            "a's third request in line"
        );
        // b still has a place in the line.
        let b_again = tokio::spawn({
            let (admission, b) = (admission.clone(), b.clone());
            async move { admission.admit(far(), Some(&b)).await.map(drop) }
        });
        until_waiting(&admission, 4).await;
        drop(held);
        for waiter in waiters {
            waiter.await.unwrap().unwrap();
        }
        b_again.await.unwrap().unwrap();
        assert_eq!(admission.caller_places.holders(), 0);
    }
}
