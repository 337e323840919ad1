//! The gRPC surface: handlers, proto <-> domain, and the failure -> Status table. The only room
//! that knows gRPC.
pub mod request;
pub mod status;
mod watch;

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::{
    domain::{AgentId, FieldViolation, RequestId},
    events::{EventHub, KindFilter, ReleaseEvent, ReleaseKind, SubscribeError, Watch, WatchEnd},
    gateway::{ReleaseTarget, Session},
    proto::{self, call_control_server::CallControl, ReleaseConfirmation},
    release::{ReleaseError, ReleaseOutcome, ReleaseService},
};

pub use proto::call_control_server::CallControlServer;

#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub max_agent_id: u32,
    /// Upper bound for one ReleaseCall when the caller sets no (or a longer) deadline.
    pub request_timeout: Duration,
    /// Agents one WatchReleaseEvents stream may watch.
    pub max_watch_agents: usize,
    /// A stream that could not send an item for this long is cut off (WATCHER_TOO_SLOW).
    pub stream_send_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct CallControlApi {
    release: ReleaseService,
    events: EventHub,
    settings: ApiSettings,
    /// Cancelled when the server gives up draining: calls still running must answer now.
    hard_stop: CancellationToken,
}

impl CallControlApi {
    pub fn new(release: ReleaseService, events: EventHub, settings: ApiSettings) -> Self {
        Self {
            release,
            events,
            settings,
            hard_stop: CancellationToken::new(),
        }
    }

    pub fn gateway(&self) -> &crate::gateway::GatewayClient {
        self.release.gateway()
    }

    pub fn events(&self) -> &EventHub {
        &self.events
    }

    /// The server cancels it when the drain times out. A ReleaseCall then answers at once with
    /// what it knows (never an answer inviting a retry once its release may have been sent).
    pub fn hard_stop(&self) -> &CancellationToken {
        &self.hard_stop
    }

    /// A watcher of the agent's call releases, for wait_for_release_event.
    fn subscribe_release_waiter(&self, agent: AgentId) -> Result<Watch, SubscribeError> {
        self.events
            .subscribe_release_waiter(agent, KindFilter::only(ReleaseKind::CallRelease))
    }
}

/// The request and its handover metadata, or INVALID_ARGUMENT naming every bad field of both.
fn both_valid<V, H>(
    rpc: &str,
    valid: Result<V, Vec<FieldViolation>>,
    handover: Result<H, FieldViolation>,
    ctx: &status::Context<'_>,
) -> Result<(V, H), Status> {
    match (valid, handover) {
        (Ok(valid), Ok(handover)) => Ok((valid, handover)),
        (valid, handover) => {
            let mut violations = valid.err().unwrap_or_default();
            violations.extend(handover.err());
            tracing::info!(request_id = %ctx.request_id, fields = ?violations.iter().map(|v| v.field).collect::<Vec<_>>(), "{rpc} rejected: invalid argument");
            Err(status::invalid_argument(&violations, ctx))
        }
    }
}

/// Reads the session handover and removes it from the metadata, so that nothing later (a
/// tracing layer, say) gets to see the credentials.
fn take_handover<T>(request: &mut Request<T>) -> Result<Option<Session>, FieldViolation> {
    let handover = request::session_handover(request.metadata());
    request.metadata_mut().remove(request::GUID_METADATA);
    request.metadata_mut().remove(request::COOKIE_METADATA);
    handover
}

#[tonic::async_trait]
impl CallControl for CallControlApi {
    async fn release_call(
        &self,
        mut request: Request<proto::ReleaseCallRequest>,
    ) -> Result<Response<proto::ReleaseCallResponse>, Status> {
        let started = tokio::time::Instant::now();
        let deadline = request::deadline(request.metadata(), self.settings.request_timeout);
        let handover = take_handover(&mut request);
        let body = request.get_ref();
        let valid = request::release_request(body, self.settings.max_agent_id);
        let request_id = match &valid {
            Ok(v) => v.request_id.clone(),
            Err(_) => RequestId::parse("request_id", &body.request_id).ok(),
        }
        .unwrap_or_else(RequestId::generate);
        let ctx = status::Context {
            agent: valid.as_ref().ok().map(|v| v.command.agent),
            request_id: request_id.as_str(),
            releases_current_call: body.call_id.is_empty(),
        };
        let (valid, handover) = both_valid("ReleaseCall", valid, handover, &ctx)?;
        let agent = valid.command.agent;
        let target = valid.command.target.clone();
        // Subscribed before the release is sent, so its event cannot slip by unseen; not for a
        // repeated request_id, whose answer is replayed without waiting (and which must not
        // start polling an agent for nothing).
        let wait_for_event = body.wait_for_release_event
            && !valid
                .request_id
                .as_ref()
                .is_some_and(|id| self.release.remembers(id));
        let mut confirmation = None;
        if wait_for_event {
            confirmation = match self.subscribe_release_waiter(agent) {
                Ok(watch) => Some(watch),
                // No session yet: one handed over is adopted by the release; nobody polled the
                // agent, so its event waits at the gateway for the watcher subscribed after.
                Err(SubscribeError::NoSession(_)) => None,
                Err(error) => return Err(status::subscribe_failure(&error, &ctx)),
            };
        }
        let result = tokio::select! {
            biased;
            result = self.release.release(valid.command, valid.request_id.as_ref(), deadline, handover) => result,
            () = self.hard_stop.cancelled() => Err(ReleaseError::ShuttingDown),
        };
        let target_name = match &target {
            ReleaseTarget::Current => "current",
            ReleaseTarget::Call(_) => "call",
        };
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let report = match result {
            Ok(report) => report,
            Err(error) => {
                tracing::warn!(%agent, target = target_name, request_id = %request_id, %error, elapsed_ms, "ReleaseCall failed");
                return Err(status::release_failure(&error, &ctx));
            }
        };
        tracing::info!(%agent, target = target_name, request_id = %request_id, retcode = %report.retcode, outcome = ?report.outcome, replayed = report.replayed, elapsed_ms, "ReleaseCall");
        let (release_event, confirmation) = if wait_for_event
            && report.outcome == ReleaseOutcome::Released
            && !report.replayed
        {
            let watch = match confirmation {
                Some(watch) => Ok(watch),
                None => self.subscribe_release_waiter(agent),
            };
            let (event, confirmation) = tokio::select! {
                biased;
                confirmed = confirm_release(watch, &target, deadline) => confirmed,
                () = self.hard_stop.cancelled() => (None, ReleaseConfirmation::ShuttingDown),
            };
            if event.is_none() {
                tracing::warn!(%agent, request_id = %request_id, ?confirmation, "ReleaseCall released the call, but its release event was not observed");
            }
            (event.map(|e| watch::event_to_proto(&e)), confirmation)
        } else {
            (None, ReleaseConfirmation::Unspecified)
        };
        Ok(Response::new(proto::ReleaseCallResponse {
            outcome: match report.outcome {
                ReleaseOutcome::Released => proto::ReleaseOutcome::Released,
                ReleaseOutcome::NoActiveCall => proto::ReleaseOutcome::NoActiveCall,
            } as i32,
            retcode: report.retcode.to_string(),
            message: report.message,
            request_id: request_id.to_string(),
            replayed: report.replayed,
            release_event,
            confirmation: confirmation as i32,
        }))
    }

    type WatchReleaseEventsStream = watch::EventStream;

    async fn watch_release_events(
        &self,
        mut request: Request<proto::WatchReleaseEventsRequest>,
    ) -> Result<Response<Self::WatchReleaseEventsStream>, Status> {
        let mut handover = take_handover(&mut request);
        let body = request.get_ref();
        let request_id = RequestId::generate();
        let valid = request::watch_request(
            body,
            self.settings.max_agent_id,
            self.settings.max_watch_agents,
        );
        let single_agent = match &valid {
            Ok(v) if v.agents.len() == 1 => Some(v.agents[0]),
            _ => None,
        };
        if let (Ok(_), Ok(Some(_)), None) = (&valid, &handover, single_agent) {
            handover = Err(FieldViolation::new(
                request::GUID_METADATA,
                "hands over one agent's session: send it with exactly one agent id",
            ));
        }
        let ctx = status::Context {
            agent: single_agent,
            request_id: request_id.as_str(),
            releases_current_call: false,
        };
        let (valid, handover) = both_valid("WatchReleaseEvents", valid, handover, &ctx)?;
        let handover = single_agent.zip(handover);
        let watch = self
            .events
            .subscribe(&valid.agents, valid.from, valid.kinds, handover)
            .map_err(|error| {
                tracing::info!(request_id = %request_id, %error, "WatchReleaseEvents refused");
                status::subscribe_failure(&error, &ctx)
            })?;
        tracing::info!(request_id = %request_id, agents = ?valid.agents, resumed = valid.from.is_some(), "WatchReleaseEvents started");
        Ok(Response::new(watch::into_stream(
            watch,
            request_id,
            self.settings.stream_send_timeout,
        )))
    }
}

/// Waits for the release event of a call just released (wait_for_release_event): the event,
/// or why there is none. The call was released either way.
async fn confirm_release(
    watch: Result<Watch, SubscribeError>,
    target: &ReleaseTarget,
    deadline: tokio::time::Instant,
) -> (Option<Arc<ReleaseEvent>>, ReleaseConfirmation) {
    let wanted = |event: &ReleaseEvent| match target {
        ReleaseTarget::Call(call) => event.call_id == *call,
        ReleaseTarget::Current => true,
    };
    let mut watch = match watch {
        Ok(watch) => watch,
        Err(SubscribeError::ShuttingDown) => return (None, ReleaseConfirmation::ShuttingDown),
        Err(SubscribeError::NoSession(_)) => return (None, ReleaseConfirmation::SessionEnded),
        Err(_) => return (None, ReleaseConfirmation::NotObserved),
    };
    match watch.next_event(wanted, deadline).await {
        Ok(Some(event)) => (Some(event), ReleaseConfirmation::Confirmed),
        Ok(None) | Err(WatchEnd::TooSlow { .. }) => (None, ReleaseConfirmation::NotObserved),
        Err(WatchEnd::ShuttingDown { .. }) => (None, ReleaseConfirmation::ShuttingDown),
        Err(WatchEnd::SessionEnded { .. }) => (None, ReleaseConfirmation::SessionEnded),
    }
}
