//! The CallControl service: handlers, proto <-> domain, and the failure -> Status table. The
//! rooms below it (release, events, sessions, gateway) know nothing of gRPC.
pub(crate) mod auth;
pub mod codec;
pub(crate) mod request;
pub mod status;
mod stream;

use std::time::Duration;

use tonic::{Request, Response, Status};

use self::request::ValidWatchRequest;

use crate::{
    callers::{Callers, StreamSlots, Verb},
    domain::{AgentId, FieldViolation, RequestId},
    events::{EventHub, Watcher},
    gateway::Session,
    proto::{self, call_control_server::CallControl},
    release::{Confirmation, ReleaseOutcome, ReleaseRequest, ReleaseService, Released},
    sessions::Sessions,
    shared_state::SharedState,
    telemetry::{CallRecord, Metrics},
};

pub(crate) use proto::call_control_server::CallControlServer;

#[derive(Debug, Clone)]
pub(crate) struct ApiSettings {
    pub(crate) max_agent_id: u32,
    /// Upper bound for one ReleaseCall when the caller sets no (or a longer) deadline.
    pub(crate) request_timeout: Duration,
    /// Agents one WatchReleaseEvents stream may watch.
    pub(crate) max_watch_agents: usize,
    /// A stream that could not send an item for this long is cut off (WATCHER_TOO_SLOW).
    pub(crate) stream_send_timeout: Duration,
    /// WatchReleaseEvents streams one caller may hold open.
    pub(crate) max_streams_per_caller: usize,
}

#[derive(Debug, Clone)]
pub struct CallControlApi {
    pub(crate) release: ReleaseService,
    pub(crate) events: EventHub,
    pub(crate) settings: ApiSettings,
    /// None: caller authorization is off (every request is `Caller::anyone`).
    pub(crate) callers: Option<Callers>,
    /// Each caller's open streams; `callers` checks them again at every reload.
    pub(crate) stream_slots: StreamSlots,
    /// Whether the replicas' shared state can be reached: watches are refused while not.
    pub(crate) shared_state: SharedState,
    pub(crate) metrics: Metrics,
}

impl CallControlApi {
    /// The interceptor that authenticates every CallControl call.
    pub(crate) fn authenticator(&self) -> auth::Authenticate {
        auth::Authenticate {
            callers: self.callers.clone(),
        }
    }

    pub fn sessions(&self) -> &Sessions {
        self.events.sessions()
    }

    pub fn events(&self) -> &EventHub {
        &self.events
    }
}

impl CallControlApi {
    /// The watcher of a valid WatchReleaseEvents request, or the Status of its refusal.
    fn subscribe(
        &self,
        valid: ValidWatchRequest,
        handover: Option<(AgentId, Session)>,
        ctx: &status::Context<'_>,
    ) -> Result<Watcher, Status> {
        let watcher = self
            .events
            .subscribe(&valid.agents, valid.from, valid.kinds, handover)
            .map_err(|error| {
                tracing::debug!(request_id = %ctx.request_id, %error, "WatchReleaseEvents refused");
                status::subscribe_failure(&error, ctx)
            })?;
        tracing::debug!(request_id = %ctx.request_id, resumed = valid.from.is_some(), "WatchReleaseEvents started");
        Ok(watcher)
    }
}

/// The verbs a call needs: its own, handover when it hands a session over, watch when it waits
/// for a release event (which carries the customer's number).
fn verbs(own: Verb, hands_over: bool, waits_for_event: bool) -> Vec<Verb> {
    [
        Some(own),
        hands_over.then_some(Verb::Handover),
        waits_for_event.then_some(Verb::Watch),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// The agent ids a request names, for its log line: as given (they may be invalid), at most
/// [`LOGGED_AGENTS`] of them and each cut to [`LOGGED_AGENT_CHARS`], so that a request cannot
/// make its log line big.
fn agents_as_given(agents: &[&str]) -> Option<String> {
    if agents.iter().all(|agent| agent.is_empty()) {
        return None;
    }
    let mut listed: Vec<&str> = agents
        .iter()
        .take(LOGGED_AGENTS)
        .map(|agent| {
            agent
                .char_indices()
                .nth(LOGGED_AGENT_CHARS)
                .map_or(*agent, |(end, _)| &agent[..end])
        })
        .collect();
    if agents.len() > LOGGED_AGENTS {
        listed.push("...");
    }
    Some(listed.join(","))
}

const LOGGED_AGENTS: usize = 10;
const LOGGED_AGENT_CHARS: usize = 12;
/// Fields of an invalid request named in its log line.
const LOGGED_FIELDS: usize = 10;

/// A session handover is one agent's: with several agent ids it says nothing of which.
fn handover_of_one_agent(
    handover: Result<Option<Session>, FieldViolation>,
    several_agents: bool,
) -> Result<Option<Session>, FieldViolation> {
    match handover {
        Ok(Some(_)) if several_agents => Err(FieldViolation::new(
            request::GUID_METADATA,
            "hands over one agent's session: send it with exactly one agent id",
        )),
        other => other,
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
            tracing::debug!(request_id = %ctx.request_id, violations = violations.len(), fields = ?violations.iter().take(LOGGED_FIELDS).map(|v| v.field).collect::<Vec<_>>(), "{rpc} rejected: invalid argument");
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

fn release_response(released: Released, request_id: &RequestId) -> proto::ReleaseCallResponse {
    let Released {
        report,
        confirmation,
    } = released;
    let (release_event, confirmation) = match confirmation {
        Confirmation::NotAsked => (None, proto::ReleaseConfirmation::Unspecified),
        Confirmation::Confirmed(event) => (
            Some(stream::event_to_proto(&event)),
            proto::ReleaseConfirmation::Confirmed,
        ),
        Confirmation::NotObserved => (None, proto::ReleaseConfirmation::NotObserved),
        Confirmation::ShuttingDown => (None, proto::ReleaseConfirmation::ShuttingDown),
        Confirmation::SessionEnded => (None, proto::ReleaseConfirmation::SessionEnded),
    };
    proto::ReleaseCallResponse {
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
    }
}

#[tonic::async_trait]
impl CallControl for CallControlApi {
    async fn release_call(
        &self,
        mut request: Request<proto::ReleaseCallRequest>,
    ) -> Result<Response<proto::ReleaseCallResponse>, Status> {
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
        CallRecord::update_in(request.extensions(), |facts| {
            facts.agents = agents_as_given(&[&body.agent_id]);
            facts.request_id = Some(request_id.to_string());
        });
        let (valid, handover) = both_valid("ReleaseCall", valid, handover, &ctx)?;
        let agent = valid.command.agent;
        let needed = verbs(
            Verb::Release,
            handover.is_some(),
            body.wait_for_release_event,
        );
        let caller = auth::authorize(&request, &needed, &[agent], &ctx)?;
        let result = self
            .release
            .release_call(ReleaseRequest {
                command: valid.command,
                request_id: valid.request_id,
                caller: caller.shared_name(),
                deadline,
                handed: handover,
                wait_for_event: body.wait_for_release_event,
            })
            .await;
        let released = result.map_err(|error| {
            // The call's line has the reason; this says what exactly went wrong.
            tracing::warn!(request_id = %request_id, %error, "ReleaseCall failed");
            status::release_failure(&error, &ctx)
        })?;
        let response = release_response(released, &request_id);
        CallRecord::update_in(request.extensions(), |facts| {
            facts.retcode = Some(response.retcode.clone());
            facts.reason = Some(response.outcome().as_str_name().to_owned());
        });
        Ok(Response::new(response))
    }

    type WatchReleaseEventsStream = stream::EventStream;

    async fn watch_release_events(
        &self,
        mut request: Request<proto::WatchReleaseEventsRequest>,
    ) -> Result<Response<Self::WatchReleaseEventsStream>, Status> {
        let handover = take_handover(&mut request);
        let request_id = RequestId::generate();
        // Enough for the log line, however many the request names.
        let agents: Vec<&str> = request
            .get_ref()
            .agent_ids
            .iter()
            .take(LOGGED_AGENTS + 1)
            .map(String::as_str)
            .collect();
        CallRecord::update_in(request.extensions(), |facts| {
            facts.agents = agents_as_given(&agents);
            facts.request_id = Some(request_id.to_string());
        });
        let valid = request::watch_request(
            request.get_ref(),
            self.settings.max_agent_id,
            self.settings.max_watch_agents,
        );
        let single_agent = match &valid {
            Ok(v) if v.agents.len() == 1 => Some(v.agents[0]),
            _ => None,
        };
        let several_agents = valid.is_ok() && single_agent.is_none();
        let ctx = status::Context {
            agent: single_agent,
            request_id: request_id.as_str(),
            releases_current_call: false,
        };
        let (valid, handover) = both_valid(
            "WatchReleaseEvents",
            valid,
            handover_of_one_agent(handover, several_agents),
            &ctx,
        )?;
        let needed = verbs(Verb::Watch, handover.is_some(), false);
        let caller = auth::authorize(&request, &needed, &valid.agents, &ctx)?;
        if !self.shared_state.reachable() {
            // Its events come through the shared event log, out of reach: the client resumes
            // with its token on a replica that reaches it, or here once it is back.
            return Err(status::shared_state_unavailable(&ctx));
        }
        // What the stream goes on needing: its handover, if any, is done once it opened.
        let slot = self
            .stream_slots
            .take(&caller, &[Verb::Watch], &valid.agents)
            .ok_or_else(|| {
                let limit = self.settings.max_streams_per_caller;
                tracing::debug!(caller = caller.name(), request_id = %ctx.request_id, limit, "WatchReleaseEvents refused: the caller's streams are at their cap");
                status::too_many_caller_streams(limit, &ctx)
            })?;
        // A reload between the interceptor and the slot did not see this stream: check the
        // caller against the callers in force now that the next reload will.
        if let Some(callers) = &self.callers {
            auth::still_authorized(callers, &caller, &needed, &valid.agents, &ctx)?;
        }
        let resumed_from = valid.from;
        self.events.prepare_resume(valid.from).await;
        let watcher = self.subscribe(valid, single_agent.zip(handover), &ctx)?;
        Ok(Response::new(stream::into_stream(
            watcher,
            resumed_from,
            request_id,
            self.settings.stream_send_timeout,
            slot,
            self.metrics.streams().clone(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::agents_as_given;

    #[test]
    fn the_agents_of_a_log_line_are_bounded() {
        assert_eq!(agents_as_given(&[]), None);
        assert_eq!(agents_as_given(&[""]), None);
        assert_eq!(agents_as_given(&["101", "102"]).as_deref(), Some("101,102"));
        let long = "9".repeat(1000);
        assert_eq!(agents_as_given(&[&long]).unwrap().len(), 12);
        let many = vec!["1"; 500];
        assert_eq!(
            agents_as_given(&many).unwrap(),
            format!("{},...", ["1"; 10].join(","))
        );
        assert_eq!(
            agents_as_given(&["ééééééééééééé"]).unwrap().chars().count(),
            12
        );
    }
}
