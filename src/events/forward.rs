//! A watcher read by a task of its own, for readers that may stop reading.
//!
//! A gRPC stream is polled by its transport only while the client's HTTP/2 window has room, so
//! a client that stops reading (its keepalive still answered) would keep its watcher, permit and
//! feed memberships included, for as long as its connection lives, and nothing would notice.
//! The forwarding task keeps reading the watcher, queues its items for the reader, and gives up
//! when one cannot be queued in time.
use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{
    queue::{self, Receiver, Refused, Sender},
    ReleaseEvent, ResumeToken, Watcher, WatcherEnd, WatcherItem,
};

/// What a forwarded watcher yields: its items, then how it ended, then nothing.
#[derive(Debug)]
pub(crate) struct Forwarded {
    queue: Receiver<Slot>,
}

/// Events inline, the rare rest boxed: the queue's buffer keeps the largest size it reached,
/// in slots.
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
    /// The next item; `Some(Err(_))` once, then `None`. Cancel-safe: an item is taken only
    /// when returned.
    pub(crate) async fn recv(&mut self) -> Option<Result<WatcherItem, WatcherEnd>> {
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
    pub(crate) fn forward(self, queue: usize, send_timeout: Duration) -> Forwarded {
        let (sender, receiver) = queue::queue();
        let tasks = self.tasks().clone();
        tasks.spawn(forward(self, sender, queue.max(1), send_timeout).in_current_span());
        Forwarded { queue: receiver }
    }
}

async fn forward(mut watcher: Watcher, sender: Sender<Slot>, queue: usize, send_timeout: Duration) {
    let mut deadlines = SendDeadlines {
        shutdown: watcher.shutdown_signal(),
        send_timeout,
        after_shutdown: None,
    };
    // Where the reader stands once it has read everything queued. An item taken from the
    // watcher but not queued is not in it: the watcher's own position is already past it.
    let mut queued_up_to = watcher.position();
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
        match tokio::time::timeout_at(deadlines.next(), enqueue(&sender, item, queue)).await {
            Ok(Ok(())) => queued_up_to = watcher.position(),
            // The reader is gone.
            Ok(Err(_)) => return,
            Err(_) => break deadlines.missed(queued_up_to),
        }
    };
    // Before the reader can see the end, so that whoever sees it finds the permit back.
    drop(watcher);
    tracing::info!(?end, "watcher ended");
    sender.send_last(Err(end).into());
}

/// When each item must be queued by. Once shutdown began, all sends share one deadline: a
/// reader that keeps reading still gets everything the watcher received, but one that trickles
/// cannot keep the task alive item by item.
struct SendDeadlines {
    shutdown: CancellationToken,
    send_timeout: Duration,
    after_shutdown: Option<Instant>,
}

impl SendDeadlines {
    fn next(&mut self) -> Instant {
        let deadline = Instant::now() + self.send_timeout;
        if !self.shutdown.is_cancelled() {
            return deadline;
        }
        deadline.min(*self.after_shutdown.get_or_insert(deadline))
    }

    /// How the watcher ends when an item missed its deadline: resuming right after what the
    /// reader was given.
    fn missed(&self, resume: ResumeToken) -> WatcherEnd {
        if self.shutdown.is_cancelled() {
            return WatcherEnd::ShuttingDown { resume };
        }
        tracing::info!(
            send_timeout = ?self.send_timeout,
            "the reader took nothing for the send timeout; cutting the watcher off"
        );
        WatcherEnd::TooSlow { resume }
    }
}

/// Queues an item for the reader, at most `queue` at a time. A heartbeat only says "nothing
/// new", so it waits until the reader has taken everything queued before it: a reader that
/// stopped is then found out one heartbeat interval (plus the send timeout) after it stopped,
/// not once heartbeats have filled the whole queue.
async fn enqueue(sender: &Sender<Slot>, item: WatcherItem, queue: usize) -> Result<(), Refused> {
    let limit = if matches!(item, WatcherItem::Heartbeat { .. }) {
        1
    } else {
        queue
    };
    sender.send(Ok(item).into(), limit).await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Forwarded;
    use crate::events::{
        testing::{agent, hub, publish, ready, sequences, sign_in, token},
        EventSettings, KindFilter, WatcherEnd, WatcherItem,
    };

    /// Everything a forwarded watcher yields until it ends (paused clock: a hang fails at once).
    async fn read_to_end(reader: &mut Forwarded) -> Vec<Result<WatcherItem, WatcherEnd>> {
        let mut items = Vec::new();
        tokio::time::timeout(Duration::from_secs(600), async {
            while let Some(item) = reader.recv().await {
                items.push(item);
            }
        })
        .await
        .expect("the forwarded watcher ended");
        items
    }

    /// Lets every woken task run; on the paused clock nothing else happens meanwhile.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    /// A stream that stops reading is cut off in bounded time, without sockets: a reader that takes
    /// nothing keeps its watcher until the send timeout, not after; then the permit is back and the
    /// feed no longer holds it, and the reader gets what was queued, then TooSlow whose token
    /// resumes with the event that could not be queued: nothing repeated, nothing missed.
    #[tokio::test(start_paused = true)]
    async fn a_forwarded_watcher_whose_reader_takes_nothing_is_cut_off_at_the_send_timeout() {
        let hub = hub(EventSettings::default());
        sign_in(&hub, agent(0));
        let watcher = hub
            .subscribe(&[agent(0)], None, KindFilter::default(), None)
            .unwrap();
        let mut reader = watcher.forward(2, Duration::from_secs(5));
        for _ in 0..4 {
            assert!(publish(&hub, agent(0)));
        }
        // Two queued, the third waiting for room.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!((hub.watchers(), hub.watchers_of(agent(0))), (1, 1));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!((hub.watchers(), hub.watchers_of(agent(0))), (0, 0));

        let items = read_to_end(&mut reader).await;
        assert_eq!(sequences(&items), [Some(1), Some(2), None]);
        assert_eq!(
            items[2],
            Err(WatcherEnd::TooSlow {
                resume: token(&hub, 2)
            })
        );
        let mut resumed = hub
            .subscribe(
                &[agent(0)],
                Some(token(&hub, 2)),
                KindFilter::default(),
                None,
            )
            .unwrap();
        assert_eq!(sequences(&ready(&mut resumed)), [Some(3), Some(4)]);
    }

    /// On an idle agent, heartbeats do not fill the queue first: a reader that takes
    /// nothing is cut off one heartbeat interval plus the send timeout after the first
    /// heartbeat it left unread.
    #[tokio::test(start_paused = true)]
    async fn a_reader_that_takes_no_heartbeats_is_cut_off_a_heartbeat_later() {
        let hub = hub(EventSettings {
            heartbeat: Duration::from_secs(15),
            ..EventSettings::default()
        });
        sign_in(&hub, agent(0));
        let watcher = hub
            .subscribe(&[agent(0)], None, KindFilter::default(), None)
            .unwrap();
        let mut reader = watcher.forward(16, Duration::from_secs(30));
        // Heartbeats at 15 s (queued) and 30 s (waits for the reader until 60 s).
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert_eq!(hub.watchers(), 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!((hub.watchers(), hub.watchers_of(agent(0))), (0, 0));
        let items = read_to_end(&mut reader).await;
        assert!(
            matches!(items[0], Ok(WatcherItem::Heartbeat { .. })),
            "{items:?}"
        );
        assert!(
            matches!(items[1], Err(WatcherEnd::TooSlow { .. })),
            "{items:?}"
        );
    }

    /// A reader that reads (slowly, but within the send timeout) gets everything, heartbeats
    /// included, and keeps its watcher.
    #[tokio::test(start_paused = true)]
    async fn a_forwarded_watcher_whose_reader_reads_in_time_keeps_going() {
        let hub = hub(EventSettings {
            heartbeat: Duration::from_secs(3),
            ..EventSettings::default()
        });
        sign_in(&hub, agent(0));
        let watcher = hub
            .subscribe(&[agent(0)], None, KindFilter::default(), None)
            .unwrap();
        let mut reader = watcher.forward(1, Duration::from_secs(5));
        for _ in 0..3 {
            assert!(publish(&hub, agent(0)));
        }
        for sequence in 1..=3 {
            tokio::time::sleep(Duration::from_secs(4)).await;
            let item = reader.recv().await.unwrap();
            assert_eq!(sequences(&[item]), [Some(sequence)]);
        }
        let heartbeat = reader.recv().await.unwrap();
        assert!(
            matches!(heartbeat, Ok(WatcherItem::Heartbeat { position, .. }) if position == token(&hub, 3)),
            "{heartbeat:?}"
        );
        assert_eq!((hub.watchers(), hub.watchers_of(agent(0))), (1, 1));
    }

    /// Whether the task waits for the watcher or for room in the queue, a reader that goes
    /// frees the watcher at once.
    #[tokio::test(start_paused = true)]
    async fn a_forwarded_watcher_is_freed_as_soon_as_its_reader_goes() {
        let hub = hub(EventSettings::default());
        sign_in(&hub, agent(0));
        let subscribe = || {
            hub.subscribe(&[agent(0)], None, KindFilter::default(), None)
                .unwrap()
                .forward(1, Duration::from_secs(600))
        };
        let waiting_for_room = subscribe();
        for _ in 0..3 {
            assert!(publish(&hub, agent(0)));
        }
        // Live from now: nothing for it yet.
        let waiting_for_events = subscribe();
        settle().await;
        assert_eq!((hub.watchers(), hub.watchers_of(agent(0))), (2, 2));
        drop(waiting_for_events);
        drop(waiting_for_room);
        settle().await;
        assert_eq!((hub.watchers(), hub.watchers_of(agent(0))), (0, 0));
    }

    /// On shutdown a reader that reads gets everything, then ShuttingDown; one that does not
    /// read is freed after the send timeout and learns ShuttingDown (not TooSlow), with the
    /// position after what was queued for it.
    #[tokio::test(start_paused = true)]
    async fn a_forwarded_watcher_ends_shutting_down_whether_its_reader_reads_or_not() {
        let hub = hub(EventSettings::default());
        sign_in(&hub, agent(0));
        let forwarded = || {
            hub.subscribe(&[agent(0)], None, KindFilter::default(), None)
                .unwrap()
                .forward(1, Duration::from_secs(5))
        };
        let mut reading = forwarded();
        let mut not_reading = forwarded();
        for _ in 0..3 {
            assert!(publish(&hub, agent(0)));
        }
        settle().await;
        hub.shut_down();

        let items = read_to_end(&mut reading).await;
        assert_eq!(sequences(&items), [Some(1), Some(2), Some(3), None]);
        assert_eq!(
            items[3],
            Err(WatcherEnd::ShuttingDown {
                resume: token(&hub, 3)
            })
        );

        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(hub.watchers(), 0);
        let items = read_to_end(&mut not_reading).await;
        assert_eq!(sequences(&items), [Some(1), None]);
        assert_eq!(
            items[1],
            Err(WatcherEnd::ShuttingDown {
                resume: token(&hub, 1)
            })
        );
    }

    /// After shutdown began, every send shares one send timeout: a reader that takes an item
    /// just before each send would time out cannot keep the task (and the watcher) alive.
    #[tokio::test(start_paused = true)]
    async fn after_shutdown_a_trickling_reader_cannot_keep_a_forwarded_watcher_alive() {
        let hub = hub(EventSettings::default());
        sign_in(&hub, agent(0));
        let mut reader = hub
            .subscribe(&[agent(0)], None, KindFilter::default(), None)
            .unwrap()
            .forward(1, Duration::from_secs(5));
        for _ in 0..5 {
            assert!(publish(&hub, agent(0)));
        }
        settle().await;
        hub.shut_down();
        let mut items = Vec::new();
        tokio::time::timeout(Duration::from_secs(600), async {
            while let Some(item) = reader.recv().await {
                items.push(item);
                tokio::time::sleep(Duration::from_secs(4)).await;
            }
        })
        .await
        .expect("the forwarded watcher ended");
        // Event 3 was the first sent after shutdown began: the shared deadline ran from then,
        // and event 4 waited past it.
        assert_eq!(sequences(&items), [Some(1), Some(2), Some(3), None]);
        assert_eq!(
            items[3],
            Err(WatcherEnd::ShuttingDown {
                resume: token(&hub, 3)
            })
        );
        assert_eq!(hub.watchers(), 0);
    }
}
