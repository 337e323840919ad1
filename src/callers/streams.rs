//! The WatchReleaseEvents streams each caller holds open: how many, so that one caller cannot
//! use up the process's --max-watchers; and what each needs (its verbs on its agents), so that
//! a reload that takes a caller's token, certificate name or grant away ends its streams. The
//! map has an entry per caller with a stream open: at most the callers of the callers file
//! (one without caller authorization), each with at most --max-streams-per-caller streams.
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use tokio::sync::oneshot;

use super::{Caller, Denied, Unauthenticated, Verb};
use crate::{domain::AgentId, lock};

/// Why an open stream may no longer go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Revoked {
    /// Its credential identifies its caller no more (token or certificate name removed,
    /// caller removed).
    Unauthenticated(Unauthenticated),
    /// Its caller is no longer granted what the stream needs.
    Denied(Denied),
}

/// One open stream as the slots know it.
#[derive(Debug)]
struct OpenStream {
    caller: Caller,
    verbs: Vec<Verb>,
    agents: Vec<AgentId>,
    /// Taken when the stream is told to end.
    end: Option<oneshot::Sender<Revoked>>,
}

type OpenStreams = Arc<Mutex<HashMap<Arc<str>, HashMap<u64, OpenStream>>>>;

#[derive(Debug, Clone)]
pub(crate) struct StreamSlots {
    open: OpenStreams,
    next_id: Arc<AtomicU64>,
    per_caller: usize,
}

/// One open stream of a caller; dropping it (when the stream ends) frees the slot.
#[derive(Debug)]
pub(crate) struct StreamSlot {
    open: OpenStreams,
    caller: Arc<str>,
    id: u64,
    revoked: oneshot::Receiver<Revoked>,
}

impl StreamSlots {
    pub(crate) fn new(per_caller: usize) -> Self {
        Self {
            open: Arc::default(),
            next_id: Arc::default(),
            per_caller,
        }
    }

    /// A slot for one more stream of `caller`, which needs `verbs` on `agents`, or None when
    /// the caller holds `per_caller` already.
    pub(crate) fn take(
        &self,
        caller: &Caller,
        verbs: &[Verb],
        agents: &[AgentId],
    ) -> Option<StreamSlot> {
        let mut open = lock(&self.open);
        let streams = open.entry(caller.shared_name()).or_default();
        if streams.len() >= self.per_caller {
            if streams.is_empty() {
                open.remove(caller.name());
            }
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (end, revoked) = oneshot::channel();
        streams.insert(
            id,
            OpenStream {
                caller: caller.clone(),
                verbs: verbs.to_vec(),
                agents: agents.to_vec(),
                end: Some(end),
            },
        );
        Some(StreamSlot {
            open: self.open.clone(),
            caller: caller.shared_name(),
            id,
            revoked,
        })
    }

    /// Checks every open stream again: `current` says who its caller is now (by the credential
    /// that identified it), and that caller's grant must still cover the stream. A stream that
    /// fails either is told to end, once.
    pub(crate) fn recheck(&self, current: impl Fn(&Caller) -> Result<Caller, Unauthenticated>) {
        let mut open = lock(&self.open);
        let mut ended = 0usize;
        for stream in open.values_mut().flat_map(HashMap::values_mut) {
            if stream.end.is_none() {
                continue;
            }
            let verdict = current(&stream.caller)
                .map_err(Revoked::Unauthenticated)
                .and_then(|now| {
                    now.allows(&stream.verbs, &stream.agents)
                        .map_err(Revoked::Denied)
                });
            if let Err(revoked) = verdict {
                // One line per stream only at debug: a revoked caller may hold a thousand.
                tracing::debug!(
                    caller = stream.caller.name(),
                    ?revoked,
                    "ending a WatchReleaseEvents stream: its caller's access is gone"
                );
                if let Some(end) = stream.end.take() {
                    let _ = end.send(revoked);
                }
                ended += 1;
            }
        }
        if ended > 0 {
            tracing::warn!(
                streams = ended,
                "the callers files changed: streams of revoked callers end"
            );
        }
    }

    /// The streams `caller` holds open.
    #[cfg(test)]
    fn open_of(&self, caller: &str) -> usize {
        lock(&self.open).get(caller).map_or(0, HashMap::len)
    }

    #[cfg(test)]
    fn callers_with_streams(&self) -> usize {
        lock(&self.open).len()
    }
}

impl StreamSlot {
    /// Resolves once a reload took away what the stream needs; never otherwise.
    pub(crate) async fn revoked(&mut self) -> Revoked {
        match (&mut self.revoked).await {
            Ok(revoked) => revoked,
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = lock(&self.open);
        if let Some(streams) = open.get_mut(&self.caller) {
            streams.remove(&self.id);
            if streams.is_empty() {
                open.remove(&self.caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use super::*;
    use crate::callers::Grant;

    fn agent(n: u32) -> AgentId {
        AgentId::parse("agent_id", &n.to_string(), 999_999).unwrap()
    }

    fn take(slots: &StreamSlots, caller: &Caller) -> Option<StreamSlot> {
        slots.take(caller, &[Verb::Watch], &[agent(101)])
    }

    #[test]
    fn each_caller_has_its_own_cap_and_slots_come_back_when_dropped() {
        let slots = StreamSlots::new(2);
        let (a, b) = (
            Caller::new("a", Grant::everything()),
            Caller::new("b", Grant::everything()),
        );
        let first = take(&slots, &a).unwrap();
        let _second = take(&slots, &a).unwrap();
        assert!(take(&slots, &a).is_none());
        let _other = take(&slots, &b).expect("b has its own cap");
        drop(first);
        let _third = take(&slots, &a).expect("a freed slot is back");
        assert_eq!(slots.open_of("a"), 2);
        drop(_other);
        assert_eq!(
            slots.callers_with_streams(),
            1,
            "a caller without streams has no entry"
        );
        assert!(StreamSlots::new(0).take(&a, &[], &[]).is_none());
        assert_eq!(StreamSlots::new(0).callers_with_streams(), 0);
    }

    /// Whether `slot` was told to end, without waiting.
    fn told(slot: &mut StreamSlot) -> Option<Revoked> {
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        match std::pin::pin!(slot.revoked()).poll(&mut cx) {
            std::task::Poll::Ready(revoked) => Some(revoked),
            std::task::Poll::Pending => None,
        }
    }

    #[test]
    fn a_recheck_ends_exactly_the_streams_whose_caller_or_grant_is_gone() {
        let slots = StreamSlots::new(5);
        let watcher = Caller::new(
            "w",
            Grant::parse(&["101-199".into()], &["watch".into()]).unwrap(),
        );
        let gone = Caller::new("gone", Grant::everything());
        let mut kept = take(&slots, &watcher).unwrap();
        let mut narrowed = slots.take(&watcher, &[Verb::Watch], &[agent(150)]).unwrap();
        let mut revoked = take(&slots, &gone).unwrap();
        let narrower = Grant::parse(&["101-120".into()], &["watch".into()]).unwrap();
        let recheck = || {
            slots.recheck(|caller| match caller.name() {
                "gone" => Err(Unauthenticated::UnknownToken),
                name => Ok(Caller::new(name, narrower.clone())),
            })
        };
        recheck();
        assert_eq!(told(&mut kept), None);
        assert_eq!(
            told(&mut narrowed),
            Some(Revoked::Denied(Denied::Agent(agent(150))))
        );
        assert_eq!(
            told(&mut revoked),
            Some(Revoked::Unauthenticated(Unauthenticated::UnknownToken))
        );
        // Told once; the slot is held until the stream ends.
        recheck();
        assert_eq!(slots.open_of("gone"), 1);
        drop(revoked);
        assert_eq!(slots.open_of("gone"), 0);
    }
}
