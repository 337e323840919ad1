//! What a call's handler learns as it goes (who called, which agents, its request id, the
//! gateway's retcode), for the call's one log line and its metrics, written when the call ends.
//!
//! The layer that writes the line puts a [`CallRecord`] into the request's extensions before the
//! call goes in; whoever learns something (caller authentication, the handlers) fills it in
//! through [`CallRecord::update`]. Requests that went through no such layer (unit tests) carry
//! none, and updating them does nothing.
use std::sync::{Arc, Mutex};

use tonic::codegen::http;

use super::trace::CallTrace;

/// Cheap to clone; every clone is the same record.
#[derive(Debug, Clone, Default)]
pub struct CallRecord(Arc<Mutex<CallFacts>>);

/// Nothing here is a secret: no Guid, cookie, token or certificate ever goes in.
#[derive(Debug, Clone, Default)]
pub struct CallFacts {
    /// The authenticated caller's name (from the callers file), if any.
    pub caller: Option<String>,
    /// The client's address, for a call refused because it identified no caller.
    pub peer: Option<String>,
    /// The agent ids the call names, as given (comma-separated when several).
    pub agents: Option<String>,
    pub request_id: Option<String>,
    /// The gateway's retcode, when the call reached the gateway and got one.
    pub retcode: Option<String>,
    /// The failure's ErrorInfo reason, or the outcome of a success.
    pub reason: Option<String>,
    /// The call's trace, when the caller sent one or spans are exported: its line carries the
    /// ids, its server span the code.
    pub trace: Option<CallTrace>,
}

impl CallRecord {
    /// The record the request carries, if a layer put one there.
    pub fn of(extensions: &http::Extensions) -> Option<Self> {
        extensions.get::<Self>().cloned()
    }

    /// Fills in what `request`'s record should know; nothing when it has none.
    pub fn update_in(extensions: &http::Extensions, fill: impl FnOnce(&mut CallFacts)) {
        if let Some(record) = Self::of(extensions) {
            record.update(fill);
        }
    }

    pub fn update(&self, fill: impl FnOnce(&mut CallFacts)) {
        fill(&mut crate::lock(&self.0));
    }

    /// What is known now.
    pub fn facts(&self) -> CallFacts {
        self.read(CallFacts::clone)
    }

    /// Reads what is known now without copying it.
    pub fn read<T>(&self, read: impl FnOnce(&CallFacts) -> T) -> T {
        read(&crate::lock(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_one_record_and_requests_without_one_are_left_alone() {
        let mut extensions = http::Extensions::new();
        CallRecord::update_in(&extensions, |f| f.caller = Some("nobody".into()));
        let record = CallRecord::default();
        extensions.insert(record.clone());
        CallRecord::update_in(&extensions, |f| f.caller = Some("billing".into()));
        assert_eq!(record.facts().caller.as_deref(), Some("billing"));
    }
}
