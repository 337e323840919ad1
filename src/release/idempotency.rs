//! Remembers answers by request id for a window, so a client's retry of a hang-up gets the first
//! answer instead of a second hang-up. Concurrent duplicates wait for the first one's answer.
//! Keys are whatever makes two requests the same one (for releases: the caller and its
//! request_id, so that callers cannot replay each other's answers).
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
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
    /// Insertion order, for expiry; stale rows are skipped by generation.
    order: VecDeque<(Instant, K, u64)>,
    /// The entries free to be forgotten early, oldest first (generations grow with insertion):
    /// making room takes the first instead of searching the whole cache under the lock.
    /// Exactly the evictable entries: an entry leaves it whenever it leaves the cache.
    evictable: BTreeMap<u64, K>,
    next_generation: u64,
}

#[derive(Debug)]
struct Entry<F, V> {
    fingerprint: F,
    generation: u64,
    answer: watch::Receiver<Option<V>>,
}

impl<F, V> Entry<F, V> {
    fn answered(&self) -> bool {
        self.answer.borrow().is_some()
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
                evictable: BTreeMap::new(),
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
            // expired id has its answer; a pending one is kept regardless, and the ids behind
            // it expire all the same (its row, renewed, stops the loop when reached again).
            if self
                .entries
                .get(&key)
                .is_some_and(|e| e.generation == generation && !e.answered())
            {
                self.order.push_back((now, key, generation));
                continue;
            }
            self.remove_if(&key, generation);
        }
    }

    /// Forgets the oldest evictable id, so that memory stays bounded; an id still waiting, or
    /// pinned, is never forgotten early, or its duplicate could act a second time. Its row in
    /// `order` goes with the next compaction.
    fn evict_oldest_evictable(&mut self) -> bool {
        self.evictable
            .pop_first()
            .is_some_and(|(generation, key)| self.remove_if(&key, generation))
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

    /// Forgets `key` if it is still the entry of `generation`; true when it was.
    fn remove_if(&mut self, key: &K, generation: u64) -> bool {
        if self
            .entries
            .get(key)
            .is_some_and(|e| e.generation == generation)
        {
            self.entries.remove(key);
            self.evictable.remove(&generation);
            return true;
        }
        false
    }
}

impl<K: Hash + Eq + Clone, F, V> Ticket<K, F, V> {
    /// Publishes the answer to everyone waiting and keeps it as `retention` says.
    pub(crate) fn complete(mut self, value: V, retention: Retention) {
        let mut inner = lock(&self.inner);
        match retention {
            Retention::Forget => {
                inner.remove_if(&self.key, self.generation);
            }
            Retention::Evictable => {
                if inner
                    .entries
                    .get(&self.key)
                    .is_some_and(|e| e.generation == self.generation)
                {
                    inner.evictable.insert(self.generation, self.key.clone());
                }
            }
            // Kept: never in the evictable index.
            Retention::Pinned => {}
        }
        // Published under the lock, so no eviction sees an answer that is not in its place yet.
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

    /// An unknown-outcome answer outlives cache pressure for its window;
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

    #[tokio::test(start_paused = true)]
    async fn making_room_takes_the_oldest_evictable_answer_past_older_ones_that_must_stay() {
        let cache: IdempotencyCache<RequestId, u8, u32> =
            IdempotencyCache::new(Duration::from_secs(60), 4);
        owner(cache.claim(&id("pinned"), 0)).complete(1, Retention::Pinned);
        let _pending = owner(cache.claim(&id("pending"), 0));
        owner(cache.claim(&id("older"), 0)).complete(2, Retention::Evictable);
        owner(cache.claim(&id("newer"), 0)).complete(3, Retention::Evictable);
        assert_eq!(lock(&cache.inner).evictable.len(), 2);
        owner(cache.claim(&id("a"), 0)).complete(4, Retention::Pinned);
        assert!(
            !cache.contains(&id("older")),
            "the oldest evictable answer made room"
        );
        assert!(cache.contains(&id("newer")));
        owner(cache.claim(&id("b"), 0)).complete(5, Retention::Pinned);
        assert!(lock(&cache.inner).evictable.is_empty());
        assert!(matches!(cache.claim(&id("c"), 0), Claim::Full));
        // Expiry takes evictable answers out of the index with the cache.
        tokio::time::advance(Duration::from_secs(61)).await;
        owner(cache.claim(&id("d"), 0)).complete(6, Retention::Evictable);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!cache.contains(&id("d")));
        assert!(lock(&cache.inner).evictable.is_empty());
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A new or repeated id is claimed (its owner's ticket is held).
        Claim(u8),
        /// Held ticket n is completed with a retention.
        Complete(usize, u8),
        /// Held ticket n is dropped without an answer.
        Abandon(usize),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (0u8..12).prop_map(Op::Claim),
            3 => (0usize..6, 0u8..3).prop_map(|(n, r)| Op::Complete(n, r)),
            1 => (0usize..6).prop_map(Op::Abandon),
        ]
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Held {
        Pending,
        Evictable,
        Pinned,
    }

    proptest::proptest! {
        /// Whatever the order of claims, answers and abandoned tickets, the evictable index
        /// holds exactly the evictable answers, and room is made by forgetting the oldest of
        /// them, or refused when there is none.
        #[test]
        fn the_evictable_index_holds_exactly_the_evictable_answers(
            capacity in 1usize..6,
            ops in proptest::collection::vec(op(), 1..60),
        ) {
            let cache: IdempotencyCache<RequestId, u8, u32> =
                IdempotencyCache::new(Duration::from_secs(600), capacity);
            // In claim order: the ids the cache holds, and what they hold.
            let mut model: Vec<(RequestId, Held)> = Vec::new();
            let mut tickets: Vec<(RequestId, Ticket<RequestId, u8, u32>)> = Vec::new();
            for op in ops {
                match op {
                    Op::Claim(n) => {
                        let key = id(&n.to_string());
                        let known = model.iter().any(|(k, _)| *k == key);
                        let oldest_evictable =
                            model.iter().position(|(_, held)| *held == Held::Evictable);
                        match cache.claim(&key, 0) {
                            Claim::Follower(_) => proptest::prop_assert!(known),
                            Claim::Full => proptest::prop_assert!(
                                !known && model.len() >= capacity && oldest_evictable.is_none()
                            ),
                            Claim::Owner(ticket) => {
                                proptest::prop_assert!(!known);
                                if model.len() >= capacity {
                                    let evicted = oldest_evictable.expect("room was made");
                                    model.remove(evicted);
                                }
                                model.push((key.clone(), Held::Pending));
                                tickets.push((key, ticket));
                            }
                            Claim::Conflict => proptest::prop_assert!(false, "one fingerprint"),
                        }
                    }
                    Op::Complete(n, retention) if n < tickets.len() => {
                        let (key, ticket) = tickets.remove(n);
                        let (retention, held) = match retention {
                            0 => (Retention::Forget, None),
                            1 => (Retention::Evictable, Some(Held::Evictable)),
                            _ => (Retention::Pinned, Some(Held::Pinned)),
                        };
                        ticket.complete(0, retention);
                        let at = model.iter().position(|(k, _)| *k == key).expect("held");
                        match held {
                            Some(held) => model[at].1 = held,
                            None => {
                                model.remove(at);
                            }
                        }
                    }
                    Op::Abandon(n) if n < tickets.len() => {
                        let (key, ticket) = tickets.remove(n);
                        drop(ticket);
                        model.retain(|(k, _)| *k != key);
                    }
                    Op::Complete(..) | Op::Abandon(_) => {}
                }
                let inner = lock(&cache.inner);
                let mut indexed: Vec<&RequestId> = inner.evictable.values().collect();
                let mut evictable: Vec<&RequestId> = model
                    .iter()
                    .filter(|(_, held)| *held == Held::Evictable)
                    .map(|(k, _)| k)
                    .collect();
                indexed.sort_by_key(|k| k.as_str());
                evictable.sort_by_key(|k| k.as_str());
                proptest::prop_assert_eq!(indexed, evictable);
                proptest::prop_assert_eq!(inner.entries.len(), model.len());
            }
        }
    }
}
