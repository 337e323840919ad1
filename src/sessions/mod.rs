//! The agents' gateway sessions: which Guid (and cookies) a request goes out with, and what
//! the gateway's answer means for the session. Owns the registry and the handover rules; the
//! hang-up policy and the poll loops send through it. Knows nothing of gRPC; the HTTP client
//! it sends with knows nothing of sessions.
mod registry;
mod store;

use std::sync::Arc;

use tokio::time::Instant;

pub(crate) use registry::{
    Adoption, Installed, Refusal, SessionLimits, SessionRegistry, SessionsFull,
};
pub use store::{SessionStore, SharedSession, StoreCounters};

use crate::{
    domain::AgentId,
    gateway::{AgentRequest, Answer, GatewayClient, GatewayError, Guid, Session, SessionOperation},
    shares::CallerName,
};

/// Registry sessions one call tries: the one it found, and the one that replaced it while the
/// gateway refused the first (a rotation, or a watcher's candidate).
const MAX_REGISTRY_ATTEMPTS: usize = 2;

/// Sends operations in the agents' sessions. Cheap to clone; every clone is the same.
#[derive(Debug, Clone)]
pub struct Sessions {
    registry: Arc<SessionRegistry>,
    gateway: GatewayClient,
}

impl Sessions {
    pub(crate) fn new(registry: impl Into<Arc<SessionRegistry>>, gateway: GatewayClient) -> Self {
        Self {
            registry: registry.into(),
            gateway,
        }
    }

    pub fn registry(&self) -> &SessionRegistry {
        &self.registry
    }

    /// The gateway client every session request goes out with.
    pub fn gateway(&self) -> &GatewayClient {
        &self.gateway
    }

    /// Sends `operation` in the registry's session first; in the handed-over one only when
    /// there is none, or when the gateway refused the registry's. Each further attempt follows
    /// a refusal (100-006 / 000-003), which changed nothing, so none can act twice. After a
    /// refusal the registry is read again: a rotation that arrived meanwhile, or a watcher's
    /// candidate, may hold a session the gateway accepts. Made for `caller` (None: for the
    /// facade itself, like an event poll), whose share of the gateway's line it waits in.
    /// Returns the answer and the Guid it was given for.
    pub async fn send(
        &self,
        agent: AgentId,
        operation: &SessionOperation,
        deadline: Instant,
        handed: Option<&Session>,
        caller: Option<&CallerName>,
    ) -> Result<(Answer, Guid), GatewayError> {
        let request = AgentRequest {
            agent,
            operation,
            deadline,
            caller,
        };
        let mut refused: Vec<Session> = Vec::new();
        let mut last_refusal = None;
        while refused.len() < MAX_REGISTRY_ATTEMPTS {
            let Some(session) = self.registry.get(agent).filter(|s| !refused.contains(s)) else {
                break;
            };
            let answer = self.send_in_registry_session(request, &session).await?;
            if !answer.session_gone() {
                return Ok((answer, session.guid));
            }
            tracing::info!(%agent, retcode = %answer.retcode, "the gateway refused the agent's session");
            last_refusal = Some((answer, session.guid.clone()));
            refused.push(session);
        }
        match handed.filter(|h| !refused.contains(h)) {
            Some(handed) => {
                let replacing = refused.last().map(|s| &s.guid);
                self.send_in_handed_session(request, handed.clone(), replacing)
                    .await
            }
            None => last_refusal.ok_or(GatewayError::NoSession(agent)),
        }
    }

    /// Signs the agent in; a successful answer's `Set-GUID` becomes its session.
    pub async fn sign_in(
        &self,
        agent: AgentId,
        password: &str,
        phone_number: &str,
        force: bool,
        deadline: Instant,
    ) -> Result<Answer, GatewayError> {
        let exchange = self
            .gateway
            .sign_in(agent, password, phone_number, force, deadline)
            .await;
        self.registry.absorb(agent, None, exchange.headers);
        exchange.answer
    }

    /// One request in a session the registry holds, which learns from the answer: rotation,
    /// cookies, and whether the gateway accepted or refused the Guid.
    async fn send_in_registry_session(
        &self,
        request: AgentRequest<'_>,
        session: &Session,
    ) -> Result<Answer, GatewayError> {
        let agent = request.agent;
        let exchange = self.gateway.send(request, session).await;
        if self
            .registry
            .absorb(agent, Some(&session.guid), exchange.headers)
        {
            tracing::info!(%agent, "gateway issued a new Guid");
        }
        let answer = exchange.answer?;
        if answer.session_gone() {
            match self.registry.refused(agent, &session.guid) {
                Refusal::NotCurrent => {}
                Refusal::CandidateNext => {
                    tracing::info!(%agent, retcode = %answer.retcode, "the gateway refused the agent's session; a watcher's handed-over one is next");
                }
                Refusal::Forgotten => {
                    tracing::info!(%agent, retcode = %answer.retcode, "gateway session ended; forgot it");
                }
            }
        } else if answer.proves_session() {
            self.registry.confirm(agent, &session.guid);
        }
        Ok(answer)
    }

    /// One request in a session a caller handed over, kept (with what the answer rotated)
    /// only when the gateway carried the operation out with it, and only in place of
    /// `replacing` (the registry session the gateway refused first, if any).
    async fn send_in_handed_session(
        &self,
        request: AgentRequest<'_>,
        mut session: Session,
        replacing: Option<&Guid>,
    ) -> Result<(Answer, Guid), GatewayError> {
        let agent = request.agent;
        let guid_used = session.guid.clone();
        let exchange = self.gateway.send(request, &session).await;
        session.absorb(exchange.headers);
        let answer = exchange.answer?;
        if answer.proves_session() {
            match self.registry.adopt(agent, session, replacing) {
                Adoption::Adopted => {
                    tracing::info!(%agent, "the gateway accepted a handed-over session; it is the agent's session now")
                }
                Adoption::Superseded => {
                    tracing::info!(%agent, "the gateway accepted a handed-over session, but a newer one is the agent's session already; kept that")
                }
                Adoption::Full => {
                    tracing::warn!(%agent, "the gateway accepted a handed-over session, but the session registry is full; it is not kept")
                }
            }
        }
        Ok((answer, guid_used))
    }
}
