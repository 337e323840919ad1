//! A watcher read by a task of its own, for readers that may stop reading.
//!
//! A gRPC stream is polled by its transport only while the client's HTTP/2 window has room, so
//! a client that stops reading (its keepalive still answered) would keep its watcher, permit and
//! feed memberships included, for as long as its connection lives, and nothing would notice.
//! The forwarding task keeps reading the watcher, queues its items for the reader, and gives up
//! when one cannot be queued in time.
use std::{sync::Arc, time::Duration};

use tokio::{
    sync::mpsc::{self, OwnedPermit},
    time::Instant,
};
use tracing::Instrument;

use super::{ReleaseEvent, Watcher, WatcherEnd, WatcherItem};

/// What a forwarded watcher yields: its items, then how it ended, then nothing.
#[derive(Debug)]
pub struct Forwarded {
    queue: mpsc::Receiver<Slot>,
}

/// Events inline, the rare rest boxed: tokio allocates a channel's slots 32 at a time, so the
/// slot's size is paid 32 times per stream.
#[derive(Debug)]
enum Slot {
    Event(Arc<ReleaseEvent>),
    Other(Box<Result<WatcherItem, WatcherEnd>>),
}

impl From<Result<WatcherItem, WatcherEnd>> for Slot {
    fn from(item: Result<WatcherItem, WatcherEnd>) -> Self {
        match item {
            Ok(WatcherItem::Event(event)) => Self::Event(event),
            other => Self::Other(Box::new(other)),
        }
    }
}

impl Slot {
    fn into_item(self) -> Result<WatcherItem, WatcherEnd> {
        match self {
            Self::Event(event) => Ok(WatcherItem::Event(event)),
            Self::Other(item) => *item,
        }
    }
}

impl Forwarded {
    /// The next item; `Some(Err(_))` once, then `None`.
    pub async fn recv(&mut self) -> Option<Result<WatcherItem, WatcherEnd>> {
        self.queue.recv().await.map(Slot::into_item)
    }
}

impl Watcher {
    /// Reads the watcher in a task of its own (in the caller's span) that queues up to `queue`
    /// items for the returned reader. When an item cannot be queued within `send_timeout` (the
    /// reader stopped reading), the task drops the watcher at once, which frees its permit and
    /// leaves its feeds, and the reader gets what is queued, then `TooSlow` with the position
    /// after the last item queued: resuming from it repeats nothing and misses nothing.
    /// Dropping the reader frees the watcher at once as well.
    pub fn forward(self, queue: usize, send_timeout: Duration) -> Forwarded {
        let (sender, receiver) = mpsc::channel(queue.max(1) + 1);
        // Taken first, so that the end always finds room after whatever is queued.
        let end_slot = sender
            .clone()
            .try_reserve_owned()
            .expect("a new channel has room");
        let tasks = self.tasks().clone();
        tasks.spawn(forward(self, sender, end_slot, queue.max(1), send_timeout).in_current_span());
        Forwarded { queue: receiver }
    }
}

async fn forward(
    mut watcher: Watcher,
    sender: mpsc::Sender<Slot>,
    end_slot: OwnedPermit<Slot>,
    queue: usize,
    send_timeout: Duration,
) {
    let shutdown = watcher.shutdown_signal();
    // Where the reader stands once it has read everything queued. An item taken from the
    // watcher but not queued is not in it: the watcher's own position is already past it.
    let mut queued_up_to = watcher.position();
    // Once shutdown began, all sends share one deadline: a reader that keeps reading still gets
    // everything the watcher received, but one that trickles cannot keep the task alive item by
    // item.
    let mut shutdown_deadline = None;
    let end = loop {
        let next = tokio::select! {
            biased;
            () = sender.closed() => return,
            next = watcher.next() => next,
        };
        let item = match next.expect("next() is not called after the end") {
            Ok(item) => item,
            Err(end) => break end,
        };
        let mut deadline = Instant::now() + send_timeout;
        if shutdown.is_cancelled() {
            deadline = deadline.min(*shutdown_deadline.get_or_insert(deadline));
        }
        match tokio::time::timeout_at(deadline, enqueue(&sender, item, queue)).await {
            Ok(Ok(())) => queued_up_to = watcher.position(),
            // The reader is gone.
            Ok(Err(_)) => return,
            Err(_) if shutdown.is_cancelled() => {
                break WatcherEnd::ShuttingDown {
                    resume: queued_up_to,
                }
            }
            Err(_) => {
                tracing::info!(
                    ?send_timeout,
                    "the reader took nothing for the send timeout; cutting the watcher off"
                );
                break WatcherEnd::TooSlow {
                    resume: queued_up_to,
                };
            }
        }
    };
    // Before the reader can see the end, so that whoever sees it finds the permit back.
    drop(watcher);
    tracing::info!(?end, "watcher ended");
    end_slot.send(Err(end).into());
}

/// Queues an item for the reader. A heartbeat only says "nothing new", so it waits until the
/// reader has taken everything queued before it: a reader that stopped is then found out one
/// heartbeat interval (plus the send timeout) after it stopped, not once heartbeats have
/// filled the whole queue.
async fn enqueue(
    sender: &mpsc::Sender<Slot>,
    item: WatcherItem,
    queue: usize,
) -> Result<(), mpsc::error::SendError<()>> {
    if matches!(item, WatcherItem::Heartbeat { .. }) {
        let mut room = sender.reserve_many(queue).await?;
        room.next().expect("room for one").send(Ok(item).into());
        return Ok(());
    }
    sender
        .send(Ok(item).into())
        .await
        .map_err(|_| mpsc::error::SendError(()))
}
