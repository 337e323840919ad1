//! What the room's unit tests share: a hub without a gateway, and events published by hand.
use std::sync::Arc;

use futures_util::FutureExt;

use super::{
    EventHub, EventLog, EventSettings, PollOwnership, ProcessLog, ProcessOwnership, ResumeToken,
    Watcher, WatcherEnd, WatcherItem,
};
use crate::{
    domain::{AgentId, CallId},
    gateway::{
        event::{EventBody, PolledEvent},
        GatewayClient, GatewaySettings, Guid, Session,
    },
    lifecycle::Lifecycle,
    sessions::{SessionRegistry, Sessions},
};

/// A hub whose poll loops find no gateway (they back off quietly); tests publish by hand.
pub(super) fn hub(settings: EventSettings) -> EventHub {
    hub_on(settings, Arc::new(ProcessLog::new()))
}

/// [`hub`], polling what `ownership` lets it.
pub(super) fn hub_owning(settings: EventSettings, ownership: Arc<dyn PollOwnership>) -> EventHub {
    EventHub::new(
        no_gateway(),
        settings,
        &Lifecycle::default(),
        ownership,
        Arc::new(ProcessLog::new()),
    )
}

/// [`hub`] on `log`.
pub(super) fn hub_on(settings: EventSettings, log: Arc<dyn EventLog>) -> EventHub {
    EventHub::new(
        no_gateway(),
        settings,
        &Lifecycle::default(),
        Arc::new(ProcessOwnership::new()),
        log,
    )
}

fn no_gateway() -> Sessions {
    let gateway = GatewayClient::new(&GatewaySettings::new("http://127.0.0.1:1")).unwrap();
    Sessions::new(SessionRegistry::default(), gateway)
}

/// A call release of `agent` placed at `token`, as a log or ring holds it.
pub(super) fn call_release(agent: AgentId, token: ResumeToken) -> super::ReleaseEvent {
    super::ReleaseEvent {
        agent,
        kind: super::ReleaseKind::CallRelease,
        call_id: CallId::parse("c", "1-1").unwrap(),
        customer_number: None,
        event_time: None,
        observed_time: std::time::SystemTime::now(),
        raw_event_type: "AgentEvent_Call_Release".into(),
        token,
    }
}

pub(super) fn agent(n: u32) -> AgentId {
    AgentId::parse("agent", &(101 + n).to_string(), 59_999).unwrap()
}

pub(super) fn sign_in(hub: &EventHub, agent: AgentId) {
    let session = Session {
        guid: Guid::parse("guid", "g.AgentGateway0").unwrap(),
        cookies: Default::default(),
    };
    hub.sessions().registry().offer(agent, session).unwrap();
}

/// An event polled for `agent`, as its poll loop would hand it over. False when the agent
/// has no feed: nobody polls it, so no event of it can be observed.
pub(super) fn publish(hub: &EventHub, agent: AgentId) -> bool {
    let Some(feed) = hub.room.feeds.lock().get(agent) else {
        return false;
    };
    hub.room.observe(
        &feed,
        Ok(PolledEvent {
            event_type: "AgentEvent_Call_Release".into(),
            body: EventBody::CallRelease {
                call_id: CallId::parse("c", "1-1").unwrap(),
            },
            gen_time_ms: None,
            dropped_fields: Vec::new(),
        }),
    );
    true
}

/// Everything the watcher has ready now, without waiting.
pub(super) fn ready(watcher: &mut Watcher) -> Vec<Result<WatcherItem, WatcherEnd>> {
    std::iter::from_fn(|| watcher.next().now_or_never().flatten()).collect()
}

pub(super) fn token(hub: &EventHub, sequence: u64) -> ResumeToken {
    hub.room.numbering.token(sequence)
}

/// Sequence numbers of events, `None` for anything else.
pub(super) fn sequences(items: &[Result<WatcherItem, WatcherEnd>]) -> Vec<Option<u64>> {
    items
        .iter()
        .map(|item| match item {
            Ok(WatcherItem::Event(event)) => Some(event.token.sequence),
            _ => None,
        })
        .collect()
}
