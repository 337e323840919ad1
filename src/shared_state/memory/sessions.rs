//! The members' shared sessions, as the NATS sessions bucket keeps them: one entry per agent
//! with the store revision that wrote it (revisions only grow across the store). Each member's
//! registry stays its local copy and the one place that decides; its changes reach the bucket
//! through a writer task (compare-and-set on the revision the change was based on; on a
//! conflict the bucket's newer entry is installed instead), and a follower task installs what
//! the other members write. A member cut off writes nothing and installs nothing until it is
//! back: then its writes go in order and it receives everything written meanwhile.
//!
//! Unlike the NATS writer's queue (bounded: a change beyond it is dropped), the queue to the
//! writer is unbounded: tests make few changes.
use std::{collections::HashMap, sync::Arc};

use tokio::sync::mpsc;

use super::MemberLink;
use crate::{
    domain::AgentId,
    lifecycle::Lifecycle,
    lock,
    sessions::{SessionLimits, SessionRegistry, SessionStore, SharedSession, StoreCounters},
};

/// The store's sessions.
#[derive(Debug, Default)]
pub(super) struct Bucket {
    state: Arc<std::sync::Mutex<BucketState>>,
}

#[derive(Debug, Default)]
struct BucketState {
    /// The last revision written (any agent).
    revision: u64,
    entries: HashMap<AgentId, Kept>,
    /// Where each member's follower receives what the others write, in revision order.
    followers: Vec<(Arc<str>, mpsc::UnboundedSender<Written>)>,
}

/// An agent's entry as the bucket holds it: `None` is a deletion's marker, which a create
/// may write over, as on a NATS bucket.
#[derive(Debug, Clone)]
struct Kept {
    revision: u64,
    entry: Option<SharedSession>,
}

/// An agent's entry as written at `revision` (`None`: deleted).
#[derive(Debug)]
struct Written {
    agent: AgentId,
    revision: u64,
    entry: Option<SharedSession>,
}

/// One change of a member's registry, on its way to the writer.
#[derive(Debug)]
struct Change {
    agent: AgentId,
    based_on: u64,
    entry: Option<SharedSession>,
}

/// What a compare-and-set did.
enum Outcome {
    /// Written at this revision (`None`: deleted, or nothing to delete).
    Written(Option<u64>),
    /// The bucket's entry is not the one the change was based on: this is the bucket's.
    Conflict(Kept),
}

impl BucketState {
    fn write(&mut self, writer: &str, change: Change) -> Outcome {
        let Change {
            agent,
            based_on,
            entry,
        } = change;
        let current = self.entries.get(&agent);
        let on_current = match current {
            None => based_on == 0,
            Some(kept) => kept.revision == based_on || (based_on == 0 && kept.entry.is_none()),
        };
        if !on_current {
            return Outcome::Conflict(current.cloned().expect("a conflict is with an entry"));
        }
        if entry.is_none() && current.is_none_or(|kept| kept.entry.is_none()) {
            return Outcome::Written(None);
        }
        self.revision += 1;
        let revision = self.revision;
        self.entries.insert(
            agent,
            Kept {
                revision,
                entry: entry.clone(),
            },
        );
        self.followers.retain(|(member, follower)| {
            **member == *writer
                || follower
                    .send(Written {
                        agent,
                        revision,
                        entry: entry.clone(),
                    })
                    .is_ok()
        });
        Outcome::Written(entry.is_some().then_some(revision))
    }
}

impl Bucket {
    /// A member's registry, loaded with every entry of the bucket, kept current with what the
    /// other members write, its changes written back; its tasks run in `lifecycle` until the
    /// member has drained.
    pub(super) fn member(
        &self,
        member: Arc<str>,
        link: Arc<MemberLink>,
        limits: SessionLimits,
        lifecycle: &Lifecycle,
    ) -> Arc<SessionRegistry> {
        let counters = Arc::new(StoreCounters::default());
        let (queue, inbox) = mpsc::unbounded_channel();
        let registry = Arc::new(SessionRegistry::with_store(
            limits,
            Arc::new(Changes { queue }),
            counters.clone(),
        ));
        let (follower, written) = mpsc::unbounded_channel();
        {
            let mut state = lock(&self.state);
            for (agent, kept) in &state.entries {
                if let Some(entry) = &kept.entry {
                    registry.install(*agent, kept.revision, Some(entry.clone()));
                }
            }
            state.followers.push((member.clone(), follower));
        }
        let tasks = lifecycle.tasks();
        tasks.spawn(follow(
            registry.clone(),
            link.clone(),
            written,
            lifecycle.drained(),
        ));
        let writer = Writer {
            state: self.state.clone(),
            member,
            registry: registry.clone(),
            link,
            counters,
            chains: HashMap::new(),
        };
        tasks.spawn(writer.run(inbox, lifecycle.drained()));
        registry
    }
}

/// The registry's side of the queue to the writer: never blocks.
#[derive(Debug)]
struct Changes {
    queue: mpsc::UnboundedSender<Change>,
}

impl SessionStore for Changes {
    fn changed(&self, agent: AgentId, based_on: u64, entry: Option<SharedSession>) {
        // Closed only once the member has drained: nothing is shared after.
        let _ = self.queue.send(Change {
            agent,
            based_on,
            entry,
        });
    }
}

/// Installs what the other members write, once the member reaches the store, until it has
/// drained.
async fn follow(
    registry: Arc<SessionRegistry>,
    link: Arc<MemberLink>,
    mut written: mpsc::UnboundedReceiver<Written>,
    drained: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(drained);
    loop {
        let next = tokio::select! {
            () = &mut drained => return,
            next = written.recv() => next,
        };
        let Some(Written {
            agent,
            revision,
            entry,
        }) = next
        else {
            return;
        };
        tokio::select! {
            () = &mut drained => return,
            () = link.reached() => {}
        }
        registry.install(agent, revision, entry);
    }
}

/// Writes one member's changes to the bucket, in order.
struct Writer {
    state: Arc<std::sync::Mutex<BucketState>>,
    member: Arc<str>,
    registry: Arc<SessionRegistry>,
    link: Arc<MemberLink>,
    counters: Arc<StoreCounters>,
    /// Per agent, this member's last write: a change still based on what that write was based
    /// on (made before the registry learnt of the write) derives from the write.
    chains: HashMap<AgentId, (u64, u64)>,
}

impl Writer {
    /// Writes each change once the member reaches the store, until the member has drained;
    /// then what is queued, if it reaches the store.
    async fn run(
        mut self,
        mut inbox: mpsc::UnboundedReceiver<Change>,
        drained: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(drained);
        loop {
            let change = tokio::select! {
                biased;
                () = &mut drained => break,
                change = inbox.recv() => change,
            };
            let Some(change) = change else {
                return;
            };
            tokio::select! {
                () = &mut drained => break,
                () = self.link.reached() => {}
            }
            self.write(change);
        }
        inbox.close();
        while let Ok(change) = inbox.try_recv() {
            if !self.link.reachable() {
                tracing::warn!(
                    "a member stops with session changes the shared memory has not taken"
                );
                return;
            }
            self.write(change);
        }
    }

    fn write(&mut self, mut change: Change) {
        let agent = change.agent;
        if let Some((from, to)) = self.chains.get(&agent) {
            if change.based_on == *from {
                change.based_on = *to;
            }
        }
        let based_on = change.based_on;
        let outcome = lock(&self.state).write(&self.member, change);
        match outcome {
            Outcome::Written(Some(revision)) => {
                self.chains.insert(agent, (based_on, revision));
                self.registry.written(agent, revision);
            }
            Outcome::Written(None) => {
                self.chains.remove(&agent);
            }
            Outcome::Conflict(kept) => {
                StoreCounters::count(&self.counters.conflicts);
                self.chains.remove(&agent);
                tracing::info!(%agent, revision = kept.revision, "another member changed the agent's session first; this member takes the newer one");
                self.registry.install(agent, kept.revision, kept.entry);
            }
        }
    }
}
