//! The replay ring: an agent's recent release events, bounded in count and age.
use std::{collections::VecDeque, sync::Arc, time::Duration};

use tokio::time::Instant;

use super::ReleaseEvent;

#[derive(Debug)]
pub(super) struct ReplayRing {
    events: VecDeque<(Instant, Arc<ReleaseEvent>)>,
    capacity: usize,
    max_age: Duration,
    /// Highest sequence of an event that was observed but is no longer kept (0: none). A
    /// watcher resuming from before it has missed something.
    floor: u64,
}

impl ReplayRing {
    pub fn new(capacity: usize, max_age: Duration, floor: u64) -> Self {
        Self {
            // Empty until the first event: an idle agent's ring cost 1.5 KiB up front, 15 MiB
            // at 10 000 polled agents (BENCHMARKS.md).
            events: VecDeque::new(),
            capacity,
            max_age,
            floor,
        }
    }

    pub fn push(&mut self, event: Arc<ReleaseEvent>, now: Instant) {
        self.expire(now);
        if self.capacity == 0 {
            self.floor = self.floor.max(event.token.sequence);
            return;
        }
        if self.events.len() == self.capacity {
            self.evict_oldest();
        }
        self.events.push_back((now, event));
    }

    /// Drops events older than the age limit.
    pub fn expire(&mut self, now: Instant) {
        while self
            .events
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= self.max_age)
        {
            self.evict_oldest();
        }
    }

    fn evict_oldest(&mut self) {
        if let Some((_, event)) = self.events.pop_front() {
            self.floor = self.floor.max(event.token.sequence);
        }
    }

    /// Kept events after `sequence`, oldest first.
    pub fn after(&self, sequence: u64) -> impl Iterator<Item = &Arc<ReleaseEvent>> {
        self.events
            .iter()
            .map(|(_, e)| e)
            .filter(move |e| e.token.sequence > sequence)
    }

    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// The highest sequence this ring ever saw, kept or not.
    pub fn high_water(&self) -> u64 {
        self.events
            .back()
            .map_or(self.floor, |(_, e)| e.token.sequence.max(self.floor))
    }

    /// When the newest kept event ages out, if any is kept.
    pub fn empty_at(&self) -> Option<Instant> {
        self.events.back().map(|(at, _)| *at + self.max_age)
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{
        testing::{agent, call_release},
        ResumeToken,
    };

    fn event(sequence: u64) -> Arc<ReleaseEvent> {
        Arc::new(call_release(agent(0), ResumeToken { epoch: 1, sequence }))
    }

    fn sequences(ring: &ReplayRing, after: u64) -> Vec<u64> {
        ring.after(after).map(|e| e.token.sequence).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn count_bound_raises_the_floor() {
        let mut ring = ReplayRing::new(2, Duration::from_secs(60), 0);
        for s in [3, 5, 9] {
            ring.push(event(s), Instant::now());
        }
        assert_eq!(sequences(&ring, 0), [5, 9]);
        assert_eq!(sequences(&ring, 5), [9]);
        assert_eq!(ring.floor(), 3);
        assert_eq!(ring.high_water(), 9);
    }

    #[tokio::test(start_paused = true)]
    async fn age_bound_raises_the_floor() {
        let mut ring = ReplayRing::new(10, Duration::from_secs(60), 0);
        ring.push(event(1), Instant::now());
        tokio::time::advance(Duration::from_secs(30)).await;
        ring.push(event(2), Instant::now());
        tokio::time::advance(Duration::from_secs(30)).await;
        ring.expire(Instant::now());
        assert_eq!(sequences(&ring, 0), [2]);
        assert_eq!(ring.floor(), 1);
        assert_eq!(
            ring.empty_at(),
            Some(Instant::now() + Duration::from_secs(30))
        );
        tokio::time::advance(Duration::from_secs(30)).await;
        ring.expire(Instant::now());
        assert!(ring.is_empty());
        assert_eq!((ring.floor(), ring.high_water()), (2, 2));
    }
}
