//! The gRPC surface: handlers, proto <-> domain, and the failure -> Status table. The only room
//! that knows gRPC.
pub mod request;
pub mod status;

use std::{pin::Pin, time::Duration};

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::{
    domain::RequestId,
    gateway::ReleaseTarget,
    proto::{self, call_control_server::CallControl},
    release::{ReleaseOutcome, ReleaseService},
};

pub use proto::call_control_server::CallControlServer;

#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub max_agent_id: u32,
    /// Upper bound for one ReleaseCall when the caller sets no (or a longer) deadline.
    pub request_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct CallControlApi {
    release: ReleaseService,
    settings: ApiSettings,
}

impl CallControlApi {
    pub fn new(release: ReleaseService, settings: ApiSettings) -> Self {
        Self { release, settings }
    }

    pub fn gateway(&self) -> &crate::gateway::GatewayClient {
        self.release.gateway()
    }
}

type EventStream =
    Pin<Box<dyn Stream<Item = Result<proto::WatchReleaseEventsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl CallControl for CallControlApi {
    async fn release_call(
        &self,
        mut request: Request<proto::ReleaseCallRequest>,
    ) -> Result<Response<proto::ReleaseCallResponse>, Status> {
        let started = tokio::time::Instant::now();
        let deadline = request::deadline(request.metadata(), self.settings.request_timeout);
        let handover = request::session_handover(request.metadata());
        // Read once; nothing later (a tracing layer, say) gets to see the credentials.
        request.metadata_mut().remove(request::GUID_METADATA);
        request.metadata_mut().remove(request::COOKIE_METADATA);
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
        let (valid, handover) = match (valid, handover) {
            (Ok(valid), Ok(handover)) => (valid, handover),
            (valid, handover) => {
                let mut violations = valid.err().unwrap_or_default();
                violations.extend(handover.err());
                tracing::info!(request_id = %request_id, fields = ?violations.iter().map(|v| v.field).collect::<Vec<_>>(), "ReleaseCall rejected: invalid argument");
                return Err(status::invalid_argument(&violations, &ctx));
            }
        };
        let agent = valid.command.agent;
        if let Some((guid, cookies)) = handover {
            self.gateway().sessions().hand_over(agent, guid, cookies);
        }
        let target = match &valid.command.target {
            ReleaseTarget::Current => "current",
            ReleaseTarget::Call(_) => "call",
        };
        let result = self
            .release
            .release(valid.command, valid.request_id.as_ref(), deadline)
            .await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match result {
            Ok(report) => {
                tracing::info!(%agent, target, request_id = %request_id, retcode = %report.retcode, outcome = ?report.outcome, replayed = report.replayed, elapsed_ms, "ReleaseCall");
                Ok(Response::new(proto::ReleaseCallResponse {
                    outcome: match report.outcome {
                        ReleaseOutcome::Released => proto::ReleaseOutcome::Released,
                        ReleaseOutcome::NoActiveCall => proto::ReleaseOutcome::NoActiveCall,
                    } as i32,
                    retcode: report.retcode,
                    message: report.message,
                    request_id: request_id.to_string(),
                    replayed: report.replayed,
                }))
            }
            Err(error) => {
                tracing::warn!(%agent, target, request_id = %request_id, %error, elapsed_ms, "ReleaseCall failed");
                Err(status::release_failure(&error, &ctx))
            }
        }
    }

    type WatchReleaseEventsStream = EventStream;

    async fn watch_release_events(
        &self,
        _request: Request<proto::WatchReleaseEventsRequest>,
    ) -> Result<Response<Self::WatchReleaseEventsStream>, Status> {
        Err(Status::unimplemented(
            "WatchReleaseEvents is not available yet in this version of ccgw-callcontrol",
        ))
    }
}
