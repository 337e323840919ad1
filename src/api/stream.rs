//! WatchReleaseEvents: a watcher as a gRPC stream, and release events as proto.
use std::{pin::Pin, time::Duration};

use futures_util::stream;
use tokio_stream::Stream;
use tonic::Status;

use super::status::{self, Context};
use crate::{
    callers::StreamSlot,
    domain::RequestId,
    events::{Forwarded, ReleaseEvent, ReleaseKind, ResumeToken, Watcher, WatcherEnd, WatcherItem},
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
/// The stream holds its caller's `slot` until it ends or is dropped, and ends when a reload
/// takes its caller's access away (UNAUTHENTICATED or PERMISSION_DENIED), with the position
/// after the last item it sent: `resumed_from` (the request's resume token) until it sent one.
pub(crate) fn into_stream(
    watcher: Watcher,
    resumed_from: Option<ResumeToken>,
    request_id: RequestId,
    send_timeout: Duration,
    slot: StreamSlot,
    counters: StreamMetrics,
) -> EventStream {
    let start = watcher.position();
    let span = tracing::info_span!("WatchReleaseEvents", request_id = %request_id);
    let items = span.in_scope(|| watcher.forward(STREAM_QUEUE, send_timeout));
    let state = StreamState {
        items,
        request_id,
        slot,
        counters,
        start,
        sent_up_to: resumed_from.unwrap_or(start),
        ended: false,
    };
    Box::pin(stream::unfold(state, |mut state| async move {
        if state.ended {
            return None;
        }
        let next = tokio::select! {
            biased;
            revoked = state.slot.revoked() => Err(revoked),
            item = state.items.recv() => Ok(item?),
        };
        let ctx = Context {
            agent: None,
            request_id: state.request_id.as_str(),
            releases_current_call: false,
        };
        let item = match next {
            Ok(Ok(item)) => {
                count_item(&item, &state.counters);
                state.sent_up_to = match &item {
                    WatcherItem::Event(event) => event.token,
                    WatcherItem::Heartbeat { position, .. } => *position,
                    WatcherItem::Gap(_) => state.start,
                    WatcherItem::SessionEnded { .. } => state.sent_up_to,
                };
                Ok(proto::WatchReleaseEventsResponse {
                    item: Some(item_to_proto(item)),
                })
            }
            Ok(Err(end)) => {
                if matches!(end, WatcherEnd::TooSlow { .. }) {
                    state.counters.cut_off_too_slow.inc();
                }
                Err(status::watcher_end(&end, &ctx))
            }
            Err(revoked) => {
                state.ended = true;
                Err(status::access_revoked(&revoked, state.sent_up_to, &ctx))
            }
        };
        Some((item, state))
    }))
}

/// What a stream keeps between its items.
struct StreamState {
    items: Forwarded,
    request_id: RequestId,
    slot: StreamSlot,
    counters: StreamMetrics,
    /// The watcher's position when it started.
    start: ResumeToken,
    /// Where the client resumes once it has read everything sent.
    sent_up_to: ResumeToken,
    ended: bool,
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
