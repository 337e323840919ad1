//! Remembers answers by request id for a window, so a client's retry of a hang-up gets the first
//! answer instead of a second hang-up. Concurrent duplicates wait for the first one's answer.
//! Keys are whatever makes two requests the same one (for releases: the caller and its
//! request_id, so that callers cannot replay each other's answers).
use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};

use crate::lock;

#[derive(Debug, Clone)]
pub(crate) struct IdempotencyCache<K, F, V> {
    inner: Arc<Mutex<Inner<K, F, V>>>,
    window: Duration,
    capacity: usize,
}

#[derive(Debug)]
struct Inner<K, F, V> {
    entries: HashMap<K, Entry<F, V>>,
    /// Insertion order, for expiry and eviction; stale rows are skipped by generation.
    order: VecDeque<(Instant, K, u64)>,
    next_generation: u64,
}

#[derive(Debug)]
struct Entry<F, V> {
    fingerprint: F,
    generation: u64,
    answer: watch::Receiver<Option<V>>,
    /// Set with the answer when it must outlive cache pressure.
    pinned: bool,
}

impl<F, V> Entry<F, V> {
    fn answered(&self) -> bool {
        self.answer.borrow().is_some()
    }

    /// Answered, and free to be forgotten before its window ends.
    fn evictable(&self) -> bool {
        !self.pinned && self.answered()
    }
}

/// How long an answer is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retention {
    /// Forgotten at once: the work provably had no effect, so a retry may do it again.
    Forget,
    /// Kept for the window, unless room is needed for a new id (oldest first).
    Evictable,
    /// Kept for the whole window, whatever the pressure: forgetting it could make a duplicate
    /// act a second time. When only such answers (and pending ones) fill the cache, new ids
    /// are refused.
    Pinned,
}

/// The outcome of claiming a request id.
pub(crate) enum Claim<K: Hash + Eq, F, V> {
    /// First of its id: do the work and `complete` the ticket.
    Owner(Ticket<K, F, V>),
    /// Seen before (maybe still running): wait for that answer.
    Follower(Pending<V>),
    /// Seen before with different parameters.
    Conflict,
    /// Every remembered id is still waiting for its answer or pinned: none can be forgotten
    /// safely.
    Full,
}

pub(crate) struct Ticket<K: Hash + Eq, F, V> {
    inner: Arc<Mutex<Inner<K, F, V>>>,
    key: K,
    generation: u64,
    answer: Option<watch::Sender<Option<V>>>,
}

pub(crate) struct Pending<V>(watch::Receiver<Option<V>>);

impl<K: Hash + Eq + Clone, F: PartialEq, V: Clone> IdempotencyCache<K, F, V> {
    pub(crate) fn new(window: Duration, capacity: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                entries: HashMap::new(),
                order: VecDeque::new(),
                next_generation: 0,
            })),
            window,
            capacity: capacity.max(1),
        }
    }

    pub(crate) fn claim(&self, key: &K, fingerprint: F) -> Claim<K, F, V> {
        let now = Instant::now();
        let mut inner = lock(&self.inner);
        inner.expire(now, self.window);
        if let Some(entry) = inner.entries.get(key) {
            return if entry.fingerprint == fingerprint {
                Claim::Follower(Pending(entry.answer.clone()))
            } else {
                Claim::Conflict
            };
        }
        if inner.entries.len() >= self.capacity && !inner.evict_oldest_evictable() {
            return Claim::Full;
        }
        if inner.order.len() > 2 * self.capacity {
            inner.compact();
        }
        let generation = inner.next_generation;
        inner.next_generation += 1;
        let (tx, rx) = watch::channel(None);
        inner.entries.insert(
            key.clone(),
            Entry {
                fingerprint,
                generation,
                answer: rx,
                pinned: false,
            },
        );
        inner.order.push_back((now, key.clone(), generation));
        Claim::Owner(Ticket {
            inner: self.inner.clone(),
            key: key.clone(),
            generation,
            answer: Some(tx),
        })
    }

    /// Whether `key` has an answer, or one on the way, within the window.
    pub(crate) fn contains(&self, key: &K) -> bool {
        let mut inner = lock(&self.inner);
        inner.expire(Instant::now(), self.window);
        inner.entries.contains_key(key)
    }

    /// Entries held: answers within the window and releases under way.
    pub(crate) fn len(&self) -> usize {
        lock(&self.inner).entries.len()
    }
}

impl<K: Hash + Eq, F, V> Inner<K, F, V> {
    fn expire(&mut self, now: Instant, window: Duration) {
        while let Some((created, _, _)) = self.order.front() {
            if now.duration_since(*created) < window {
                break;
            }
            let (_, key, generation) = self.order.pop_front().expect("front exists");
            // The window is longer than any request's deadline (checked at start-up), so an
            // expired id has its answer; a pending one would be kept regardless.
            if self
                .entries
                .get(&key)
                .is_some_and(|e| e.generation == generation && !e.answered())
            {
                self.order.push_back((now, key, generation));
                break;
            }
            self.remove_if(&key, generation);
        }
    }

    /// Forgets the oldest evictable id, so that memory stays bounded; an id still waiting, or
    /// pinned, is never forgotten early, or its duplicate could act a second time.
    fn evict_oldest_evictable(&mut self) -> bool {
        let position = self.order.iter().position(|(_, key, generation)| {
            self.entries
                .get(key)
                .is_some_and(|e| e.generation == *generation && e.evictable())
        });
        match position.and_then(|p| self.order.remove(p)) {
            Some((_, key, generation)) => {
                self.remove_if(&key, generation);
                true
            }
            None => false,
        }
    }

    /// Drops order rows whose entry is gone (forgotten early), so the queue tracks the map.
    fn compact(&mut self) {
        let entries = &self.entries;
        self.order.retain(|(_, key, generation)| {
            entries
                .get(key)
                .is_some_and(|e| e.generation == *generation)
        });
    }

    fn remove_if(&mut self, key: &K, generation: u64) {
        if self
            .entries
            .get(key)
            .is_some_and(|e| e.generation == generation)
        {
            self.entries.remove(key);
        }
    }
}

impl<K: Hash + Eq, F, V> Ticket<K, F, V> {
    /// Publishes the answer to everyone waiting and keeps it as `retention` says.
    pub(crate) fn complete(mut self, value: V, retention: Retention) {
        let mut inner = lock(&self.inner);
        match retention {
            Retention::Forget => inner.remove_if(&self.key, self.generation),
            Retention::Evictable => {}
            Retention::Pinned => {
                if let Some(entry) = inner
                    .entries
                    .get_mut(&self.key)
                    .filter(|e| e.generation == self.generation)
                {
                    entry.pinned = true;
                }
            }
        }
        // Published under the lock, so no eviction sees the answer before its pin.
        if let Some(tx) = self.answer.take() {
            tx.send_replace(Some(value));
        }
    }
}

impl<K: Hash + Eq, F, V> Drop for Ticket<K, F, V> {
    fn drop(&mut self) {
        // Dropped without an answer (the work panicked or was cancelled): forget the id so
        // waiters see the channel close and a retry is not stuck behind a dead entry.
        if self.answer.is_some() {
            lock(&self.inner).remove_if(&self.key, self.generation);
        }
    }
}

impl<V: Clone> Pending<V> {
    /// The first request's answer, or None if it ended without one.
    pub(crate) async fn wait(mut self) -> Option<V> {
        if let Ok(value) = self.0.wait_for(Option::is_some).await {
            return value.clone();
        }
        // The sender is gone; it may still have published before it went.
        self.0.borrow().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::RequestId;

    fn id(s: &str) -> RequestId {
        RequestId::parse("r", s).unwrap()
    }

    fn owner(claim: Claim<RequestId, u8, u32>) -> Ticket<RequestId, u8, u32> {
        match claim {
            Claim::Owner(t) => t,
            _ => panic!("expected owner"),
        }
    }

    fn follower(claim: Claim<RequestId, u8, u32>) -> Pending<u32> {
        match claim {
            Claim::Follower(p) => p,
            _ => panic!("expected follower"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn duplicates_get_the_first_answer_within_the_window() {
        let cache = IdempotencyCache::new(Duration::from_secs(60), 100);
        let ticket = owner(cache.claim(&id("a"), 1));
        let waiting = follower(cache.claim(&id("a"), 1));
        ticket.complete(7, Retention::Evictable);
        assert_eq!(waiting.wait().await, Some(7));
        assert_eq!(follower(cache.claim(&id("a"), 1)).wait().await, Some(7));
        assert!(matches!(cache.claim(&id("a"), 2), Claim::Conflict));

        tokio::time::advance(Duration::from_secs(61)).await;
        owner(cache.claim(&id("a"), 2));
    }

    #[tokio::test(start_paused = true)]
    async fn unremembered_and_abandoned_answers_free_the_id() {
        let cache = IdempotencyCache::new(Duration::from_secs(60), 100);
        let ticket = owner(cache.claim(&id("a"), 1));
        let waiting = follower(cache.claim(&id("a"), 1));
        ticket.complete(1, Retention::Forget);
        assert_eq!(waiting.wait().await, Some(1));
        let ticket = owner(cache.claim(&id("a"), 1));
        let waiting = follower(cache.claim(&id("a"), 1));
        drop(ticket);
        assert_eq!(waiting.wait().await, None);
        owner(cache.claim(&id("a"), 1));
    }

    #[tokio::test(start_paused = true)]
    async fn pending_ids_are_never_forgotten() {
        let cache: IdempotencyCache<RequestId, u8, u32> =
            IdempotencyCache::new(Duration::from_secs(1), 2);
        let first = owner(cache.claim(&id("a"), 0));
        let _second = owner(cache.claim(&id("b"), 0));
        assert!(matches!(cache.claim(&id("c"), 0), Claim::Full));
        tokio::time::advance(Duration::from_secs(5)).await;
        // Past the window but still waiting: a duplicate must still wait, not act.
        let waiting = follower(cache.claim(&id("a"), 0));
        first.complete(1, Retention::Evictable);
        assert_eq!(waiting.wait().await, Some(1));
        owner(cache.claim(&id("c"), 0));
    }

    /// Issue 7, point 3: an unknown-outcome answer outlives cache pressure for its window;
    /// when only such answers are left, new ids are refused instead.
    #[tokio::test(start_paused = true)]
    async fn pinned_answers_are_never_evicted_within_their_window() {
        let cache: IdempotencyCache<RequestId, u8, u32> =
            IdempotencyCache::new(Duration::from_secs(60), 2);
        owner(cache.claim(&id("unknown"), 0)).complete(1, Retention::Pinned);
        owner(cache.claim(&id("settled"), 0)).complete(2, Retention::Evictable);
        // Room is made by forgetting the settled answer, not the pinned one.
        owner(cache.claim(&id("next"), 0)).complete(3, Retention::Pinned);
        assert_eq!(
            follower(cache.claim(&id("unknown"), 0)).wait().await,
            Some(1)
        );
        assert!(matches!(cache.claim(&id("settled"), 0), Claim::Full));
        tokio::time::advance(Duration::from_secs(61)).await;
        owner(cache.claim(&id("settled"), 0));
    }

    #[tokio::test(start_paused = true)]
    async fn forgotten_ids_do_not_pile_up_in_the_order_queue() {
        let cache: IdempotencyCache<RequestId, u8, u32> =
            IdempotencyCache::new(Duration::from_secs(600), 4);
        for n in 0..1000 {
            owner(cache.claim(&id(&n.to_string()), 0)).complete(n, Retention::Forget);
        }
        assert_eq!(cache.len(), 0);
        assert!(lock(&cache.inner).order.len() <= 2 * 4 + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_bounds_memory() {
        let cache: IdempotencyCache<RequestId, u8, u32> =
            IdempotencyCache::new(Duration::from_secs(60), 3);
        for n in 0..10 {
            owner(cache.claim(&id(&n.to_string()), 0)).complete(n, Retention::Evictable);
        }
        assert_eq!(cache.len(), 3);
        // The newest survive.
        assert_eq!(follower(cache.claim(&id("9"), 0)).wait().await, Some(9));
    }
}
