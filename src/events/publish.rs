//! The publisher: a polled gateway event becomes a release event appended to the event log (or
//! is counted and dropped), and a lost session is told to its watchers too; what the log
//! numbered is delivered to the feed's watchers. Every delivery happens under the publish lock
//! ([`Publishing`]), which is what keeps each watcher's events in sequence order. Knows nothing
//! of how watchers are admitted or read.
use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures_util::future::BoxFuture;

use super::{
    feeds::Feed, hub::Room, log::Record, numbering::Publishing, watcher::SessionEnding, EventStats,
    ReleaseEvent, ReleaseKind,
};
use crate::{
    domain::{AgentId, CallId},
    gateway::event::{EventBody, MalformedEvent, PolledEvent},
};

/// What the publisher counted of the polled events.
#[derive(Debug, Default)]
pub(super) struct ObservedEvents {
    release: AtomicU64,
    skipped: AtomicU64,
    malformed: AtomicU64,
    dropped_fields: AtomicU64,
}

impl ObservedEvents {
    /// Puts the counts into `stats`.
    pub fn report(&self, stats: &mut EventStats) {
        stats.release_events = self.release.load(Ordering::Relaxed);
        stats.skipped_events = self.skipped.load(Ordering::Relaxed);
        stats.malformed_events = self.malformed.load(Ordering::Relaxed);
        stats.dropped_fields = self.dropped_fields.load(Ordering::Relaxed);
    }
}

/// A release read from a polled event, before it gets its number.
struct Release {
    kind: ReleaseKind,
    call_id: CallId,
    customer_number: Option<String>,
    event_time: Option<SystemTime>,
    raw_event_type: String,
}

impl Room {
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
            token: self.numbering.token(0),
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
                self.observed.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%agent, error = %malformed, "skipped a malformed gateway event");
                return None;
            }
        };
        for field in &polled.dropped_fields {
            self.observed.dropped_fields.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%agent, event_type = %polled.event_type, field, "left an invalid field out of a gateway event");
        }
        let Some((kind, call_id, customer_number)) = release_of(polled.body) else {
            self.observed.skipped.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%agent, event_type = %polled.event_type, "skipped a gateway event");
            return None;
        };
        self.observed.release.fetch_add(1, Ordering::Relaxed);
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

    /// Hands `record` to the log. The in-memory log leaves numbering to the room: the next
    /// sequence number, given and delivered under one lock, so no watcher can receive a later
    /// number first. A shared log numbers it where it stores it; its follower delivers it.
    fn append(&self, feed: &Feed, record: Record) -> Option<BoxFuture<'static, ()>> {
        let publishing = self.numbering.publish();
        self.append_in_order(&publishing, feed, record)
    }

    /// [`append`](Self::append), while `publishing`.
    fn append_in_order(
        &self,
        publishing: &Publishing<'_>,
        feed: &Feed,
        record: Record,
    ) -> Option<BoxFuture<'static, ()>> {
        let appending = self.log.append(&record);
        if appending.is_none() {
            let sequence = publishing.delivered() + 1;
            self.deliver(publishing, Some(feed), sequence, record);
        }
        appending
    }

    /// Delivers the record numbered `sequence` to `feed` (the agent's feed here, if it has
    /// one): a release event is kept in its ring and sent to its watchers, an ended session is
    /// told to them. Every record moves the position.
    pub(super) fn deliver(
        &self,
        publishing: &Publishing<'_>,
        feed: Option<&Feed>,
        sequence: u64,
        record: Record,
    ) {
        publishing.advance(sequence);
        match record {
            Record::Release(mut event) => {
                event.token = self.numbering.token(sequence);
                tracing::info!(agent = %event.agent, kind = ?event.kind, call_id = %event.call_id, sequence, "release event");
                if let Some(feed) = feed {
                    feed.deliver_event(Arc::new(event));
                }
            }
            Record::SessionEnded(_, ending) => {
                if let Some(feed) = feed {
                    feed.deliver_session_end(ending);
                }
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
        // While publishing, as a joining watcher (which brings a session) subscribes.
        let publishing = self.numbering.publish();
        feed.lose_session();
        self.append_in_order(&publishing, feed, Record::SessionEnded(feed.agent, ending))
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
        let feed = hub.room.feeds.lock().get(agent(0)).unwrap();
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
        tracing::subscriber::with_default(subscriber, || hub.room.observe(&feed, polled));

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
