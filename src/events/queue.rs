//! A queue from any number of senders to one receiver that holds only what is queued.
//!
//! Not a tokio mpsc channel: one of those allocates its slots 32 at a time when it is made and
//! keeps a second block once 32 items went through, about 1 KiB per queue even when nothing is
//! ever queued; every stream has two (its watcher's live items and its forwarding queue). Here a
//! `VecDeque` behind a mutex: no buffer until the first item, then the largest length it reached.
//! Senders say how many items may be queued at each send, so one queue can take items up to a
//! fixed bound (`try_send`) or let some wait for less (`send`).
use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::Notify;

/// A new queue's two sides.
pub(super) fn queue<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            senders: 1,
            receiver_gone: false,
        }),
        queued: Notify::new(),
        taken: Notify::new(),
        gone: Notify::new(),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

#[derive(Debug)]
struct Shared<T> {
    state: Mutex<State<T>>,
    /// Wakes the receiver: an item was queued, or the last sender went. `notify_one` keeps the
    /// wake-up for a receiver that checked the queue and is not waiting yet.
    queued: Notify,
    /// Wakes a sender waiting for room: the receiver took an item, or went.
    taken: Notify,
    /// Wakes whoever waits for the receiver to go. Not `taken`: the forwarding task waits for
    /// this while idle, and every item the reader took (a heartbeat every few seconds on each
    /// of thousands of streams) would wake it for nothing.
    gone: Notify,
}

#[derive(Debug)]
struct State<T> {
    items: VecDeque<T>,
    senders: usize,
    receiver_gone: bool,
}

impl<T> Shared<T> {
    fn state(&self) -> MutexGuard<'_, State<T>> {
        crate::lock(&self.state)
    }
}

/// Why an item was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    /// As many items as the send allowed are queued.
    Full,
    ReceiverGone,
}

/// A sending side; clones send into the same queue, and the receiver learns the end once all
/// of them went.
#[derive(Debug)]
pub(super) struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.state().senders += 1;
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut state = self.shared.state();
        state.senders -= 1;
        let last = state.senders == 0;
        drop(state);
        if last {
            self.shared.queued.notify_one();
        }
    }
}

impl<T> Sender<T> {
    /// Queues `item` if fewer than `limit` items are queued, without waiting.
    pub(super) fn try_send(&self, item: T, limit: usize) -> Result<(), Refused> {
        self.push(item, limit).map_err(|(refused, _)| refused)
    }

    /// Waits until fewer than `limit` items are queued (the receiver took the rest), then
    /// queues `item`; refused only once the receiver went.
    pub(super) async fn send(&self, mut item: T, limit: usize) -> Result<(), Refused> {
        loop {
            match self.push(item, limit) {
                Err((Refused::Full, back)) => item = back,
                done => return done.map_err(|(refused, _)| refused),
            }
            // A wake-up given between the check and here is kept for this wait.
            self.shared.taken.notified().await;
        }
    }

    /// Queues `item` after whatever is queued, however many that is, and goes.
    pub(super) fn send_last(self, item: T) {
        // The receiver may be gone; then nobody wants it.
        let _ = self.try_send(item, usize::MAX);
    }

    /// Once the receiver went.
    pub(super) async fn closed(&self) {
        let gone = self.shared.gone.notified();
        tokio::pin!(gone);
        // Registered before the check, so a receiver dropped in between still wakes it.
        gone.as_mut().enable();
        if !self.shared.state().receiver_gone {
            gone.await;
        }
    }

    fn push(&self, item: T, limit: usize) -> Result<(), (Refused, T)> {
        let mut state = self.shared.state();
        if state.receiver_gone {
            return Err((Refused::ReceiverGone, item));
        }
        if state.items.len() >= limit {
            return Err((Refused::Full, item));
        }
        state.items.push_back(item);
        drop(state);
        self.shared.queued.notify_one();
        Ok(())
    }
}

/// The receiving side; dropping it drops what is queued and refuses further items.
#[derive(Debug)]
pub(super) struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Receiver<T> {
    /// The next item, waiting for one; `None` once the queue is empty and every sender went.
    /// Cancel-safe: an item is taken only when returned.
    pub(super) async fn recv(&mut self) -> Option<T> {
        loop {
            {
                let mut state = self.shared.state();
                if let Some(item) = state.items.pop_front() {
                    drop(state);
                    self.shared.taken.notify_one();
                    return Some(item);
                }
                if state.senders == 0 {
                    return None;
                }
            }
            // A wake-up given between the check and here is kept for this wait.
            self.shared.queued.notified().await;
        }
    }

    /// The next item if one is queued.
    pub(super) fn try_recv(&mut self) -> Option<T> {
        let item = self.shared.state().items.pop_front()?;
        self.shared.taken.notify_one();
        Some(item)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.shared.state().items.is_empty()
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let queued = {
            let mut state = self.shared.state();
            state.receiver_gone = true;
            std::mem::take(&mut state.items)
        };
        // Dropped outside the lock.
        drop(queued);
        self.shared.taken.notify_one();
        self.shared.gone.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{queue, Refused};

    #[test]
    fn try_send_refuses_at_the_limit_and_once_the_receiver_went() {
        let (sender, mut receiver) = queue();
        assert_eq!(sender.try_send(1, 2), Ok(()));
        assert_eq!(sender.try_send(2, 2), Ok(()));
        assert_eq!(sender.try_send(3, 2), Err(Refused::Full));
        assert_eq!(receiver.try_recv(), Some(1));
        assert_eq!(sender.try_send(3, 2), Ok(()));
        drop(receiver);
        assert_eq!(sender.try_send(4, 2), Err(Refused::ReceiverGone));
    }

    /// Every clone sends into the one queue; the receiver gets what is queued, then the end
    /// once the last sender went.
    #[tokio::test]
    async fn the_receiver_gets_everything_queued_then_the_end_after_the_last_sender() {
        let (first, mut receiver) = queue();
        let second = first.clone();
        first.try_send(1, 8).unwrap();
        second.try_send(2, 8).unwrap();
        drop(first);
        assert_eq!(receiver.recv().await, Some(1));
        second.send_last(3);
        assert_eq!(receiver.recv().await, Some(2));
        assert_eq!(receiver.recv().await, Some(3));
        assert_eq!(receiver.recv().await, None);
    }

    /// A receive abandoned while waiting takes nothing, and a wake-up given while nobody waits
    /// is not lost.
    #[tokio::test(start_paused = true)]
    async fn an_abandoned_receive_takes_nothing_and_no_wake_up_is_lost() {
        let (sender, mut receiver) = queue();
        let abandoned = tokio::time::timeout(Duration::from_secs(1), receiver.recv()).await;
        assert!(abandoned.is_err());
        sender.try_send(1, 1).unwrap();
        let waiting = tokio::spawn(async move {
            let first = receiver.recv().await;
            let second = receiver.recv().await;
            (first, second)
        });
        tokio::task::yield_now().await;
        sender.try_send(2, 8).unwrap();
        assert_eq!(waiting.await.unwrap(), (Some(1), Some(2)));
    }

    /// `send` waits for room and is refused once the receiver goes; `closed` returns then.
    #[tokio::test(start_paused = true)]
    async fn send_waits_for_room_until_the_receiver_goes() {
        let (sender, mut receiver) = queue();
        sender.send(1, 1).await.unwrap();
        let waiting = tokio::spawn(async move {
            let second = sender.send(2, 1).await;
            let third = sender.send(3, 1).await;
            sender.closed().await;
            (second, third)
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(receiver.try_recv(), Some(1));
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(receiver);
        assert_eq!(waiting.await.unwrap(), (Ok(()), Err(Refused::ReceiverGone)));
    }

    /// Waiting for the receiver to go is woken by that alone, not by each item it takes: an
    /// idle stream's forwarding task waits so, and would otherwise wake at every heartbeat.
    #[test]
    fn closed_is_woken_only_when_the_receiver_goes() {
        use std::{
            future::Future,
            sync::{
                atomic::{AtomicUsize, Ordering},
                Arc,
            },
            task::{Context, Wake, Waker},
        };
        struct Wakes(AtomicUsize);
        impl Wake for Wakes {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let (sender, mut receiver) = queue();
        let mut closed = std::pin::pin!(sender.closed());
        assert!(closed.as_mut().poll(&mut cx).is_pending());
        for n in 0..3 {
            sender.try_send(n, 8).unwrap();
            assert_eq!(receiver.try_recv(), Some(n));
        }
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0, "taking items woke it");
        drop(receiver);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert!(closed.as_mut().poll(&mut cx).is_ready());
    }
}
