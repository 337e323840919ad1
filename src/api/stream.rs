//! WatchReleaseEvents: a watcher as a gRPC stream, and release events as proto.
use std::{pin::Pin, time::Duration};

use futures_util::stream;
use tokio_stream::Stream;
use tonic::Status;

use super::status::{self, Context};
use crate::{
    callers::StreamSlot,
    domain::RequestId,
    events::{ReleaseEvent, ReleaseKind, Watcher, WatcherEnd, WatcherItem},
    proto::{self, watch_release_events_response::Item},
    telemetry::StreamMetrics,
};

pub(crate) type EventStream =
    Pin<Box<dyn Stream<Item = Result<proto::WatchReleaseEventsResponse, Status>> + Send>>;

/// Items a stream queues for its transport. Small: what is queued when a client stops reading
/// stays in memory after its watcher is freed, until the client reads or goes.
const STREAM_QUEUE: usize = 16;

/// The watcher as a stream: items until the watcher ends, then its Status, then nothing.
/// The watcher is read by a task of its own, because tonic stops polling a stream whose client
/// stopped reading: the task cuts such a stream off after `send_timeout` (WATCHER_TOO_SLOW)
/// and frees its watcher. Dropping the stream (client cancel or disconnect) frees it at once.
/// The stream holds its caller's `slot` until it ends or is dropped.
pub(crate) fn into_stream(
    watcher: Watcher,
    request_id: RequestId,
    send_timeout: Duration,
    slot: StreamSlot,
    counters: StreamMetrics,
) -> EventStream {
    let span = tracing::info_span!("WatchReleaseEvents", request_id = %request_id);
    let items = span.in_scope(|| watcher.forward(STREAM_QUEUE, send_timeout));
    Box::pin(stream::unfold(
        (items, request_id, slot, counters),
        |(mut items, request_id, slot, counters)| async move {
            let item = match items.recv().await? {
                Ok(item) => {
                    count_item(&item, &counters);
                    Ok(proto::WatchReleaseEventsResponse {
                        item: Some(item_to_proto(item)),
                    })
                }
                Err(end) => {
                    if matches!(end, WatcherEnd::TooSlow { .. }) {
                        counters.cut_off_too_slow.inc();
                    }
                    let ctx = Context {
                        agent: None,
                        request_id: request_id.as_str(),
                        releases_current_call: false,
                    };
                    Err(status::watcher_end(&end, &ctx))
                }
            };
            Some((item, (items, request_id, slot, counters)))
        },
    ))
}

fn count_item(item: &WatcherItem, counters: &StreamMetrics) {
    let counter = match item {
        WatcherItem::Event(_) => &counters.events_delivered,
        WatcherItem::Gap(_) => &counters.gaps_sent,
        WatcherItem::Heartbeat { .. } | WatcherItem::SessionEnded { .. } => return,
    };
    counter.inc();
}

fn item_to_proto(item: WatcherItem) -> Item {
    match item {
        WatcherItem::Event(event) => Item::Event(event_to_proto(&event)),
        WatcherItem::Heartbeat { position, failing } => Item::Heartbeat(proto::Heartbeat {
            resume_token: position.to_string(),
            failing_agent_ids: failing.iter().map(ToString::to_string).collect(),
        }),
        WatcherItem::Gap(gap) => Item::Gap(proto::Gap {
            reason: gap.describe().to_owned(),
            agent_ids: gap.agents.iter().map(ToString::to_string).collect(),
        }),
        WatcherItem::SessionEnded { agent, ending } => {
            let (rule, detail) = status::session_ending(&ending, &mut Default::default());
            Item::SessionEnded(proto::AgentSessionEnded {
                agent_id: agent.to_string(),
                reason: rule.reason.to_owned(),
                retcode: ending
                    .retcode()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                message: format!("{}: {detail}", rule.meaning),
            })
        }
    }
}

pub(crate) fn event_to_proto(event: &ReleaseEvent) -> proto::ReleaseEvent {
    proto::ReleaseEvent {
        agent_id: event.agent.to_string(),
        kind: match event.kind {
            ReleaseKind::CallRelease => proto::ReleaseKind::CallRelease,
            ReleaseKind::CustomerRelease => proto::ReleaseKind::CustomerRelease,
        } as i32,
        call_id: event.call_id.to_string(),
        resume_token: event.token.to_string(),
        customer_number: event.customer_number.clone().unwrap_or_default(),
        event_time: event.event_time.map(Into::into),
        observed_time: Some(event.observed_time.into()),
        raw_event_type: event.raw_event_type.clone(),
        sequence: event.token.sequence,
    }
}
