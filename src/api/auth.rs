//! Who is calling: every CallControl call goes through [`Authenticate`] (health and reflection
//! do not), which puts the caller into the request's extensions or answers UNAUTHENTICATED;
//! handlers then check the caller's grant ([`authorize`]) before anything touches a session.
use tonic::{Request, Status};

use super::status;
use crate::{
    callers::{Caller, Callers, Credential, Peer, Unauthenticated, Verb},
    domain::{AgentId, RequestId},
    telemetry::CallRecord,
};

/// Metadata key of the bearer token.
pub(crate) const AUTHORIZATION_METADATA: &str = "authorization";

/// The interceptor of the CallControl service. Without callers (`--no-caller-auth`, or
/// `--simulate` without `--callers`) every request is [`Caller::anyone`].
#[derive(Debug, Clone)]
pub(crate) struct Authenticate {
    pub(crate) callers: Option<Callers>,
}

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = match &self.callers {
            None => Ok(Caller::anyone()),
            Some(callers) => callers.authenticate(credential(&request)),
        };
        // Read once, and gone before the handler and anything it calls can see it (the layers
        // outside, telemetry and trace context, never read it).
        request.metadata_mut().remove(AUTHORIZATION_METADATA);
        let caller = caller.map_err(|why| refuse(&request, why))?;
        if self.callers.is_some() {
            CallRecord::update_in(request.extensions(), |f| {
                f.caller = Some(caller.name().to_owned());
            });
        }
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The token if the request sends one, else its client certificate, if any.
fn credential(request: &Request<()>) -> Credential<'_> {
    if let Some(value) = request.metadata().get(AUTHORIZATION_METADATA) {
        return Credential::Authorization(value.to_str().unwrap_or_default());
    }
    match request.extensions().get::<Peer>() {
        Some(peer) if !peer.certificate_names.is_empty() => Credential::Certificate(peer),
        _ => Credential::None,
    }
}

fn refuse(request: &Request<()>, why: Unauthenticated) -> Status {
    let request_id = RequestId::generate();
    let remote = request
        .extensions()
        .get::<Peer>()
        .and_then(|p| p.remote_addr)
        .or_else(|| request.remote_addr());
    // The call's own line (telemetry::rpc) says UNAUTHENTICATED, and from where.
    CallRecord::update_in(request.extensions(), |f| {
        f.peer = remote.map(|addr| addr.to_string());
        f.request_id = Some(request_id.to_string());
    });
    tracing::debug!(request_id = %request_id, reason = %why, "call refused: unauthenticated");
    status::unauthenticated(&why, request_id.as_str())
}

/// The caller the interceptor found, if `verbs` on `agents` are within its grant; else
/// PERMISSION_DENIED. A request that went through no interceptor is refused, not let in.
pub(crate) fn authorize<T>(
    request: &Request<T>,
    verbs: &[Verb],
    agents: &[AgentId],
    ctx: &status::Context<'_>,
) -> Result<Caller, Status> {
    let Some(caller) = request.extensions().get::<Caller>() else {
        return Err(status::unauthenticated(
            &Unauthenticated::Missing,
            ctx.request_id,
        ));
    };
    caller.allows(verbs, agents).map_err(|denied| {
        tracing::debug!(caller = caller.name(), request_id = %ctx.request_id, %denied, "call refused: permission denied");
        status::permission_denied(&denied, ctx)
    })?;
    Ok(caller.clone())
}

/// `caller` (authorized by the interceptor) checked again against the callers in force now:
/// UNAUTHENTICATED or PERMISSION_DENIED when a reload took its access away meanwhile.
pub(crate) fn still_authorized(
    callers: &Callers,
    caller: &Caller,
    verbs: &[Verb],
    agents: &[AgentId],
    ctx: &status::Context<'_>,
) -> Result<(), Status> {
    let now = callers
        .current_caller(caller)
        .map_err(|why| status::unauthenticated(&why, ctx.request_id))?;
    now.allows(verbs, agents)
        .map_err(|denied| status::permission_denied(&denied, ctx))
}
