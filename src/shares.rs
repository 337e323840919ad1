//! Each caller's share of something all callers share (the gateway queue, release waiters,
//! request_ids): at most `per_caller` held by one caller at once, so that one caller cannot
//! use up what the others need. The map has an entry per caller holding anything: at most the
//! callers of the callers file (one without caller authorization).
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use crate::lock;

/// The name of the caller a request is made for.
pub type CallerName = Arc<str>;

#[derive(Debug, Clone)]
pub(crate) struct Shares {
    held: Arc<Mutex<HashMap<CallerName, usize>>>,
    per_caller: usize,
}

/// One unit of a caller's share; dropping it gives the unit back.
#[derive(Debug)]
pub(crate) struct Share {
    held: Arc<Mutex<HashMap<CallerName, usize>>>,
    caller: CallerName,
}

impl Shares {
    pub(crate) fn new(per_caller: usize) -> Self {
        Self {
            held: Arc::default(),
            per_caller,
        }
    }

    /// One more unit for `caller`, or None when it holds `per_caller` already.
    pub(crate) fn take(&self, caller: &CallerName) -> Option<Share> {
        let mut held = lock(&self.held);
        let count = held.entry(caller.clone()).or_insert(0);
        if *count >= self.per_caller {
            if *count == 0 {
                held.remove(caller);
            }
            return None;
        }
        *count += 1;
        Some(Share {
            held: self.held.clone(),
            caller: caller.clone(),
        })
    }

    /// The units `caller` holds.
    #[cfg(test)]
    pub(crate) fn held_by(&self, caller: &str) -> usize {
        lock(&self.held).get(caller).copied().unwrap_or(0)
    }

    /// Callers holding anything.
    #[cfg(test)]
    pub(crate) fn holders(&self) -> usize {
        lock(&self.held).len()
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut held = lock(&self.held);
        if let Some(count) = held.get_mut(&self.caller) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_caller_has_its_own_share_and_units_come_back_when_dropped() {
        let shares = Shares::new(2);
        let (a, b): (CallerName, CallerName) = ("a".into(), "b".into());
        let first = shares.take(&a).unwrap();
        let _second = shares.take(&a).unwrap();
        assert!(shares.take(&a).is_none());
        let other = shares.take(&b).expect("b has its own share");
        drop(first);
        let _third = shares.take(&a).expect("a unit given back is free again");
        assert_eq!(shares.held_by("a"), 2);
        drop(other);
        assert_eq!(shares.holders(), 1, "a caller holding nothing has no entry");
        let none = Shares::new(0);
        assert!(none.take(&a).is_none());
        assert_eq!(none.holders(), 0, "a refusal leaves no entry behind");
    }
}
