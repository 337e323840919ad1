//! The numbering of the room's records: one sequence, the event log's, and the publish lock
//! under which a record is numbered and delivered, and under which a watcher subscribes, so
//! that every watcher receives events in sequence order and its replay ends where its live
//! part begins. Knows neither feeds nor watchers.
//!
//! Lock order: the publish lock, then the feed registry's lock, then any feed's state. The
//! position moves only through a [`Publishing`] guard, so nothing can deliver without the
//! publish lock; and a thread holding the feed registry's lock (a [`BelowPublish`] mark) may
//! not take the publish lock, which debug builds check.
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Mutex, MutexGuard,
};

use super::{log::EventLog, ResumeToken};
use crate::lock;

/// Where the room stands in the log's sequence.
#[derive(Debug)]
pub(super) struct Numbering {
    /// Tells tokens of this log's sequence (process lifetime, or shared stream) from others.
    epoch: u64,
    /// The last sequence delivered here (numbered here, or followed from a shared log).
    delivered: AtomicU64,
    /// The highest sequence a shared log said it holds (its followers may lag it), or a token
    /// trusted when it could not tell.
    log_end: AtomicU64,
    publish: Mutex<()>,
}

/// The publish lock, held: records are numbered and delivered, or a watcher subscribes.
pub(super) struct Publishing<'a> {
    numbering: &'a Numbering,
    _lock: MutexGuard<'a, ()>,
}

impl Numbering {
    /// Where `log` stood when it was opened.
    pub fn new(log: &dyn EventLog) -> Self {
        Self {
            epoch: log.epoch(),
            delivered: AtomicU64::new(log.opened_at()),
            log_end: AtomicU64::new(log.opened_at()),
            publish: Mutex::new(()),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The position of `sequence` in this log.
    pub fn token(&self, sequence: u64) -> ResumeToken {
        ResumeToken {
            epoch: self.epoch,
            sequence,
        }
    }

    /// The last sequence delivered here; under [`publish`](Self::publish) it cannot move.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::SeqCst)
    }

    /// The highest sequence known to be in the log: what was delivered here, or what a shared
    /// log said it holds.
    pub fn known_end(&self) -> u64 {
        self.delivered().max(self.log_end.load(Ordering::SeqCst))
    }

    /// A shared log holds at least `end`.
    pub fn raise_log_end(&self, end: u64) {
        self.log_end.fetch_max(end, Ordering::SeqCst);
    }

    /// Takes the publish lock. Not while this thread holds a lock that comes after it.
    pub fn publish(&self) -> Publishing<'_> {
        #[cfg(debug_assertions)]
        BELOW_PUBLISH_HELD.with(|held| {
            assert_eq!(
                held.get(),
                0,
                "the publish lock taken under the feed registry's lock"
            );
        });
        Publishing {
            numbering: self,
            _lock: lock(&self.publish),
        }
    }
}

impl Publishing<'_> {
    /// The last sequence delivered here.
    pub fn delivered(&self) -> u64 {
        self.numbering.delivered()
    }

    /// The record numbered `sequence` is being delivered: everything up to it is.
    pub fn advance(&self, sequence: u64) {
        self.numbering.delivered.store(sequence, Ordering::SeqCst);
    }
}

#[cfg(debug_assertions)]
thread_local! {
    /// How many [`BelowPublish`] marks this thread holds.
    static BELOW_PUBLISH_HELD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Held with a lock that comes after the publish lock (the feed registry's): while it lives,
/// [`Numbering::publish`] on this thread is a lock-order violation.
#[derive(Debug)]
pub(super) struct BelowPublish(());

impl BelowPublish {
    pub fn mark() -> Self {
        #[cfg(debug_assertions)]
        BELOW_PUBLISH_HELD.with(|held| held.set(held.get() + 1));
        Self(())
    }
}

impl Drop for BelowPublish {
    fn drop(&mut self) {
        #[cfg(debug_assertions)]
        BELOW_PUBLISH_HELD.with(|held| held.set(held.get() - 1));
    }
}

/// Only debug builds check the lock order.
#[cfg(all(test, debug_assertions))]
mod tests {
    use super::{BelowPublish, Numbering};
    use crate::events::ProcessLog;

    /// The registry's lock comes after the publish lock: taking the publish lock under it is
    /// caught, and taking it after the mark is gone is not.
    #[test]
    fn the_publish_lock_is_refused_under_the_feed_registrys_lock() {
        let numbering = Numbering::new(&ProcessLog::new());
        drop(BelowPublish::mark());
        drop(numbering.publish());
        let _registry = BelowPublish::mark();
        let taken = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            drop(numbering.publish());
        }));
        assert!(taken.is_err());
    }
}
