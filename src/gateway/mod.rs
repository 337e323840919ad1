//! The CC-Gateway REST client, as transport: a request in, its answer and session headers
//! out; wire types (envelope, retcodes, events, the Guid and cookies as credentials), bounded
//! answers. Knows nothing of gRPC, nor what an answer means for a session (the sessions room
//! decides). "The reference" in this crate's comments is Huawei's public CC-Gateway
//! agent-interface documentation; the `ccgw-sim` crate's documentation condenses what of it the
//! facade relies on.
mod admission;
mod client;
pub(crate) mod event;
mod reachability;
pub(crate) mod retcode;
pub(crate) mod session;
#[cfg(test)]
pub(crate) mod testing;
mod tls;
pub(crate) mod wire;

use std::time::Duration;

pub use admission::{BusyCause, GatewayAdmission};
pub(crate) use client::POLLS_PER_CONNECTION;
pub(crate) use client::{AgentRequest, GatewaySettings, ReleaseTarget};
pub use client::{GatewayClient, GatewayStats};
pub use client::{PemFile, SessionOperation, SettingsError};
pub use reachability::{GatewayHealth, Reachability, DOWN_AFTER, UP_AFTER};
pub(crate) use retcode::{KnownRetcode, Retcode};
pub(crate) use session::SessionHeaders;
pub use session::{Cookies, Guid, Session};
pub(crate) use tls::is_loopback;
pub(crate) use wire::Answer;

use crate::domain::AgentId;

/// Why a gateway call produced no answer. Every variant says whether the request may have
/// reached the gateway, which decides whether a hang-up may be retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GatewayError {
    #[error("no CC-Gateway session is known for agent {0}")]
    NoSession(AgentId),
    #[error("could not connect to the CC-Gateway: {0}")]
    Connect(String),
    #[error("no answer from the CC-Gateway within {0:?}")]
    Timeout(Duration),
    #[error("the deadline left {0:?}, too little to reach the CC-Gateway; nothing was sent")]
    DeadlineTooShort(Duration),
    #[error("the connection to the CC-Gateway failed during the request: {0}")]
    Transport(String),
    #[error("the CC-Gateway (or its load balancer) answered HTTP {status}")]
    HttpStatus { status: u16 },
    #[error("the CC-Gateway's answer is malformed: {0}")]
    Malformed(String),
    #[error("the CC-Gateway's answer exceeds {limit} bytes")]
    Oversized { limit: usize },
    #[error("too many gateway requests at once ({0}); nothing was sent")]
    Busy(BusyCause),
}

impl GatewayError {
    /// False only when the request provably had no effect: it never left the facade, or the
    /// gateway or its load balancer refused it as unknown (404, 405) or throttled (429).
    pub(crate) fn may_have_taken_effect(&self) -> bool {
        !matches!(
            self,
            Self::NoSession(_)
                | Self::Busy(_)
                | Self::Connect(_)
                | Self::DeadlineTooShort(_)
                | Self::HttpStatus {
                    status: 404 | 405 | 429
                }
        )
    }
}
