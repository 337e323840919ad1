//! How many WatchReleaseEvents streams each caller holds open, so that one caller cannot use up
//! the process's --max-watchers. The map has an entry per caller with a stream open: at most
//! the callers of the callers file (one without caller authorization).
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use super::Caller;
use crate::lock;

#[derive(Debug, Clone)]
pub(crate) struct StreamSlots {
    open: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    per_caller: usize,
}

/// One open stream of a caller; dropping it (when the stream ends) frees the slot.
#[derive(Debug)]
pub(crate) struct StreamSlot {
    open: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    caller: Arc<str>,
}

impl StreamSlots {
    pub(crate) fn new(per_caller: usize) -> Self {
        Self {
            open: Arc::default(),
            per_caller,
        }
    }

    /// A slot for one more stream of `caller`, or None when it holds `per_caller` already.
    pub(crate) fn take(&self, caller: &Caller) -> Option<StreamSlot> {
        let mut open = lock(&self.open);
        let count = open.entry(caller.shared_name()).or_insert(0);
        if *count >= self.per_caller {
            return None;
        }
        *count += 1;
        Some(StreamSlot {
            open: self.open.clone(),
            caller: caller.shared_name(),
        })
    }

    /// The streams `caller` holds open.
    #[cfg(test)]
    fn open_of(&self, caller: &str) -> usize {
        lock(&self.open).get(caller).copied().unwrap_or(0)
    }

    #[cfg(test)]
    fn callers_with_streams(&self) -> usize {
        lock(&self.open).len()
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = lock(&self.open);
        if let Some(count) = open.get_mut(&self.caller) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::callers::Grant;

    #[test]
    fn each_caller_has_its_own_cap_and_slots_come_back_when_dropped() {
        let slots = StreamSlots::new(2);
        let (a, b) = (
            Caller::new("a", Grant::everything()),
            Caller::new("b", Grant::everything()),
        );
        let first = slots.take(&a).unwrap();
        let _second = slots.take(&a).unwrap();
        assert!(slots.take(&a).is_none());
        let _other = slots.take(&b).expect("b has its own cap");
        drop(first);
        let _third = slots.take(&a).expect("a freed slot is back");
        assert_eq!(slots.open_of("a"), 2);
        drop(_other);
        assert_eq!(
            slots.callers_with_streams(),
            1,
            "a caller without streams has no entry"
        );
    }
}
