//! The publisher: a polled gateway event becomes a release event appended to the event log (or
//! is counted and dropped), and a lost session is told to its watchers too; what the log
//! numbered is delivered to the feed's watchers. Every delivery happens under the hub's publish
//! lock, which is what keeps each watcher's events in sequence order. Knows nothing of how
//! watchers are admitted or read.
use std::{
    sync::{atomic::Ordering, Arc},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures_util::future::BoxFuture;
use tokio::{sync::mpsc, time::Instant};

use super::{
    feeds::{Feed, FeedItem, FeedState},
    hub::Hub,
    log::Record,
    watcher::SessionEnding,
    ReleaseEvent, ReleaseKind, ResumeToken,
};
use crate::{
    domain::{AgentId, CallId},
    gateway::event::{EventBody, MalformedEvent, PolledEvent},
    lock,
};

/// A release read from a polled event, before it gets its number.
struct Release {
    kind: ReleaseKind,
    call_id: CallId,
    customer_number: Option<String>,
    event_time: Option<SystemTime>,
    raw_event_type: String,
}

impl Hub {
    /// Appends the release a polled event carries to the log, or counts the event. `Some`: the
    /// append to await before the next poll (a shared log; see [`EventLog::append`]).
    pub(super) fn observe(
        &self,
        feed: &Feed,
        polled: Result<PolledEvent, MalformedEvent>,
    ) -> Option<BoxFuture<'static, ()>> {
        let release = self.release_in(feed.agent, polled)?;
        let event = ReleaseEvent {
            agent: feed.agent,
            kind: release.kind,
            call_id: release.call_id,
            customer_number: release.customer_number,
            event_time: release.event_time,
            observed_time: SystemTime::now(),
            raw_event_type: release.raw_event_type,
            token: ResumeToken {
                epoch: self.epoch,
                sequence: 0,
            },
        };
        self.append(feed, Record::Release(event))
    }

    /// The release a polled event carries, if any; counts and logs everything else.
    fn release_in(
        &self,
        agent: AgentId,
        polled: Result<PolledEvent, MalformedEvent>,
    ) -> Option<Release> {
        let polled = match polled {
            Ok(polled) => polled,
            Err(malformed) => {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%agent, error = %malformed, "skipped a malformed gateway event");
                return None;
            }
        };
        for field in &polled.dropped_fields {
            self.counters.dropped_fields.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%agent, event_type = %polled.event_type, field, "left an invalid field out of a gateway event");
        }
        let Some((kind, call_id, customer_number)) = release_of(polled.body) else {
            self.counters.skipped.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%agent, event_type = %polled.event_type, "skipped a gateway event");
            return None;
        };
        self.counters.release.fetch_add(1, Ordering::Relaxed);
        Some(Release {
            kind,
            call_id,
            customer_number,
            event_time: polled
                .gen_time_ms
                .and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms))),
            raw_event_type: polled.event_type,
        })
    }

    /// Hands `record` to the log. The in-memory log leaves numbering to the hub: the next
    /// sequence number, given and delivered under one lock, so no watcher can receive a later
    /// number first. A shared log numbers it where it stores it; its follower delivers it.
    fn append(&self, feed: &Feed, record: Record) -> Option<BoxFuture<'static, ()>> {
        let _order = lock(&self.publish);
        self.append_in_order(feed, record)
    }

    /// [`append`](Self::append), the publish lock held by the caller.
    fn append_in_order(&self, feed: &Feed, record: Record) -> Option<BoxFuture<'static, ()>> {
        let appending = self.log.append(&record);
        if appending.is_none() {
            let sequence = self.sequence.load(Ordering::SeqCst) + 1;
            self.deliver(Some(feed), sequence, record);
        }
        appending
    }

    /// Delivers the record numbered `sequence` to `feed` (the agent's feed here, if it has
    /// one), under the publish lock: a release event is kept in its ring and sent to its
    /// watchers, an ended session is told to them. Every record moves the position.
    pub(super) fn deliver(&self, feed: Option<&Feed>, sequence: u64, record: Record) {
        self.sequence.store(sequence, Ordering::SeqCst);
        self.log_end.fetch_max(sequence, Ordering::SeqCst);
        match record {
            Record::Release(mut event) => {
                event.token = ResumeToken {
                    epoch: self.epoch,
                    sequence,
                };
                tracing::info!(agent = %event.agent, kind = ?event.kind, call_id = %event.call_id, sequence, "release event");
                let Some(feed) = feed else { return };
                let event = Arc::new(event);
                let mut state = lock(&feed.state);
                state.ring.push(event.clone(), Instant::now());
                state.deliver(&FeedItem::Event(event));
            }
            Record::SessionEnded(agent, ending) => {
                let Some(feed) = feed else { return };
                let mut state = lock(&feed.state);
                state.session_lost = true;
                state.deliver(&FeedItem::SessionEnded(Arc::new((agent, ending))));
            }
        }
    }

    /// The gateway will not deliver the agent's events any more (its session was refused, or
    /// 000-001): tell its watchers (on every replica, through a shared log); polling waits for
    /// a watcher with a session, from now on.
    pub(super) fn end_session(
        &self,
        feed: &Feed,
        ending: SessionEnding,
    ) -> Option<BoxFuture<'static, ()>> {
        // Under the publish lock, as a joining watcher (which brings a session) is.
        let _order = lock(&self.publish);
        lock(&feed.state).session_lost = true;
        self.append_in_order(feed, Record::SessionEnded(feed.agent, ending))
    }
}

/// The kind, call and customer number of a release; `None` for other events.
fn release_of(body: EventBody) -> Option<(ReleaseKind, CallId, Option<String>)> {
    match body {
        EventBody::CallRelease { call_id } => Some((ReleaseKind::CallRelease, call_id, None)),
        EventBody::CustomerRelease { call_id, number } => Some((
            ReleaseKind::CustomerRelease,
            call_id,
            (!number.is_empty()).then_some(number),
        )),
        EventBody::Other => None,
    }
}

impl FeedState {
    /// Hands `item` to every watcher without waiting: a watcher whose buffer is full is cut off
    /// (it learns so and ends), and nobody else is held up.
    fn deliver(&mut self, item: &FeedItem) {
        let before = self.members.len();
        self.members.retain(|s| {
            if s.overflowed.load(Ordering::Relaxed) {
                return false;
            }
            match s.sender.try_send(item.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.overflowed.store(true, Ordering::Relaxed);
                    false
                }
                // The watcher is gone; its memberships remove it from the other feeds.
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        if before > 0 && self.members.is_empty() {
            self.idle_since = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use crate::{
        events::{
            testing::{agent, hub, publish, ready, sign_in, token},
            EventSettings, KindFilter, ReleaseKind, WatcherEnd, WatcherItem,
        },
        lock,
    };

    /// Collects what a tracing subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A customer release whose number fails validation reaches
    /// its watchers without the number; the dropped field is counted, and logged at warn with
    /// the event type and the field's name but not its value.
    #[tokio::test(start_paused = true)]
    async fn a_dropped_field_is_counted_and_logged_without_its_value() {
        let hub = hub(EventSettings::default());
        sign_in(&hub, agent(0));
        let mut watcher = hub
            .subscribe(&[agent(0)], None, KindFilter::default(), None)
            .unwrap();
        let feed = lock(&hub.hub.feeds).get(agent(0)).unwrap();
        let bad_number = "9".repeat(65);
        let polled = crate::gateway::event::parse_event(
            agent(0),
            &serde_json::json!({"eventType": "AgentEvent_Customer_Release", "workNo": "101",
                                "content": {"callid": "1-1", "number": bad_number}}),
        );

        let logs = Captured::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || hub.hub.observe(&feed, polled));

        let delivered = ready(&mut watcher);
        let [Ok(WatcherItem::Event(event))] = &delivered[..] else {
            panic!("{delivered:?}");
        };
        assert_eq!(event.kind, ReleaseKind::CustomerRelease);
        assert_eq!(event.customer_number, None);
        let stats = hub.stats();
        assert_eq!((stats.dropped_fields, stats.malformed_events), (1, 0));
        let logs = String::from_utf8(lock(&logs.0).clone()).unwrap();
        let warning = logs
            .lines()
            .find(|line| line.contains("WARN"))
            .unwrap_or_else(|| panic!("no warning in {logs}"));
        assert!(
            warning.contains("event_type=AgentEvent_Customer_Release")
                && warning.contains("field=\"number\""),
            "{warning}"
        );
        assert!(!logs.contains(&bad_number), "{logs}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_overflowing_watcher_is_cut_off_alone_and_told_where_it_stands() {
        let hub = hub(EventSettings {
            watcher_buffer: 2,
            ..EventSettings::default()
        });
        sign_in(&hub, agent(0));
        let mut slow = hub
            .subscribe(&[agent(0)], None, KindFilter::default(), None)
            .unwrap();
        let mut fast = hub
            .subscribe(&[agent(0)], None, KindFilter::default(), None)
            .unwrap();
        assert!(publish(&hub, agent(0)));
        let first = ready(&mut slow);
        assert!(
            matches!(&first[..], [Ok(WatcherItem::Event(_))]),
            "{first:?}"
        );
        let mut fast_seen = ready(&mut fast).len();
        for _ in 0..5 {
            assert!(publish(&hub, agent(0)));
            fast_seen += ready(&mut fast).len();
        }
        assert_eq!(fast_seen, 6);
        let end = ready(&mut slow);
        assert_eq!(
            end,
            [Err(WatcherEnd::TooSlow {
                resume: token(&hub, 1)
            })]
        );
        assert_eq!(
            hub.watchers(),
            2,
            "the ended watcher still holds its permit until dropped"
        );
        drop(slow);
        assert_eq!(hub.watchers(), 1);
    }
}
