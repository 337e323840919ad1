//! The gRPC surface: handlers, proto <-> domain, and the failure -> Status table. The only room
//! that knows gRPC.
pub mod request;
pub mod status;
mod watch;

use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::{
    domain::{AgentId, FieldViolation, RequestId},
    events::{EventHub, KindFilter, ReleaseKind, SubscribeError, Watch},
    gateway::{Cookies, Guid, Handover, ReleaseTarget},
    proto::{self, call_control_server::CallControl},
    release::{ReleaseOutcome, ReleaseService},
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
}

impl CallControlApi {
    pub fn new(release: ReleaseService, events: EventHub, settings: ApiSettings) -> Self {
        Self {
            release,
            events,
            settings,
        }
    }

    pub fn gateway(&self) -> &crate::gateway::GatewayClient {
        self.release.gateway()
    }

    pub fn events(&self) -> &EventHub {
        &self.events
    }

    fn hand_over(&self, agent: AgentId, handover: Option<(Guid, Option<Cookies>)>) {
        if let Some((guid, cookies)) = handover {
            if self.gateway().sessions().hand_over(agent, guid, cookies) == Handover::Outdated {
                tracing::info!(%agent, "a handed-over Guid was rotated away already; kept the newer session");
            }
        }
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
fn take_handover<T>(
    request: &mut Request<T>,
) -> Result<Option<(Guid, Option<Cookies>)>, FieldViolation> {
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
        self.hand_over(agent, handover);
        let target = valid.command.target.clone();
        // Subscribed before the release is sent, so its event cannot slip by unseen; not for a
        // repeated request_id, whose answer is replayed without waiting (and which must not
        // start polling an agent for nothing).
        let repeated = valid
            .request_id
            .as_ref()
            .is_some_and(|id| self.release.remembers(id));
        let confirmation = if body.wait_for_release_event && !repeated {
            match self
                .events
                .subscribe_release_waiter(agent, KindFilter::only(ReleaseKind::CallRelease))
            {
                Ok(watch) => Some(watch),
                // The release itself will answer NO_SESSION.
                Err(SubscribeError::NoSession(_)) => None,
                Err(error) => return Err(status::subscribe_failure(&error, &ctx)),
            }
        } else {
            None
        };
        let result = self
            .release
            .release(valid.command, valid.request_id.as_ref(), deadline)
            .await;
        let target_name = match &target {
            ReleaseTarget::Current => "current",
            ReleaseTarget::Call(_) => "call",
        };
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match result {
            Ok(report) => {
                tracing::info!(%agent, target = target_name, request_id = %request_id, retcode = %report.retcode, outcome = ?report.outcome, replayed = report.replayed, elapsed_ms, "ReleaseCall");
                let release_event = match confirmation {
                    Some(watch)
                        if report.outcome == ReleaseOutcome::Released && !report.replayed =>
                    {
                        let confirmed = confirm_release(watch, &target, deadline, &ctx).await;
                        if let Err(status) = &confirmed {
                            tracing::warn!(%agent, request_id = %request_id, code = ?status.code(), "ReleaseCall released the call, but its release event was not confirmed");
                        }
                        Some(confirmed?)
                    }
                    _ => None,
                };
                Ok(Response::new(proto::ReleaseCallResponse {
                    outcome: match report.outcome {
                        ReleaseOutcome::Released => proto::ReleaseOutcome::Released,
                        ReleaseOutcome::NoActiveCall => proto::ReleaseOutcome::NoActiveCall,
                    } as i32,
                    retcode: report.retcode,
                    message: report.message,
                    request_id: request_id.to_string(),
                    replayed: report.replayed,
                    release_event,
                }))
            }
            Err(error) => {
                tracing::warn!(%agent, target = target_name, request_id = %request_id, %error, elapsed_ms, "ReleaseCall failed");
                Err(status::release_failure(&error, &ctx))
            }
        }
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
        if let Some(agent) = single_agent {
            self.hand_over(agent, handover);
        }
        let watch = self
            .events
            .subscribe(&valid.agents, valid.from, valid.kinds)
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

/// Waits for the release event of a call just released (wait_for_release_event).
async fn confirm_release(
    mut watch: Watch,
    target: &ReleaseTarget,
    deadline: tokio::time::Instant,
    ctx: &status::Context<'_>,
) -> Result<proto::ReleaseEvent, Status> {
    let wanted = |event: &crate::events::ReleaseEvent| match target {
        ReleaseTarget::Call(call) => event.call_id == *call,
        ReleaseTarget::Current => true,
    };
    match watch.next_event(wanted, deadline).await {
        Ok(Some(event)) => Ok(watch::event_to_proto(&event)),
        Ok(None) => Err(status::release_unconfirmed(None, ctx)),
        Err(end) => Err(status::release_unconfirmed(Some(&end), ctx)),
    }
}
