//! Poll ownership shared by the members as the NATS leases share it between replicas: agents
//! map to shards ([`shard_of`]), each shard has at most one lease, held by one member; each
//! shard's desired owner is the live member of highest rendezvous weight ([`desired_owner`]).
//! Each member's driver, every renew interval (and whenever the store changed or the member
//! wants something), writes its heartbeat, renews its leases (a lease whose revision moved was
//! taken over: lost), takes the free shards it should hold and takes over those whose lease
//! stood still for the TTL, and hands back, once their polls in flight ended, those it should
//! no longer hold. A member fences itself as on NATS: no poll starts once its last renewal is
//! TTL - margin - poll timeout old, so a member cut off has ended its last poll before anybody
//! may take over. Time is tokio's, so tests may pause it.
//!
//! Who is watched: a member puts its interest in the agents its clients watch whose shard it
//! does not hold (refreshed each renew interval, withdrawn when they stop); interest fades
//! after four renew intervals without a refresh (a member cut off or gone); the holder of the
//! agent's shard polls for them.
//!
//! Unlike NATS, liveness and staleness are read on one clock (the store's), so members never
//! disagree on who is live, and a free shard is taken by its desired owner only (NATS lets
//! anyone take a shard its desired owner left free for two TTLs, for views that differ).
use std::{
    collections::{BTreeSet, HashMap},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use super::MemberLink;
use crate::{
    domain::AgentId,
    events::{
        desired_owner, HeldLease, Holder, HolderState, Holding, LeaseOwnership, LeaseSettings,
        PollingPart, HAND_BACK_ON_SHUTDOWN, SHARDS,
    },
    lifecycle::Lifecycle,
    lock,
};

/// Interest lives this many renew intervals without a refresh.
const INTEREST_LIFETIME: u32 = 4;

/// The store's leases, heartbeats and interest.
#[derive(Debug)]
pub(super) struct Leases {
    settings: LeaseSettings,
    table: std::sync::Mutex<Table>,
    /// Bumped when a lease was taken or handed back, a member came or went, or the interest
    /// in an agent changed: the members' drivers look again.
    changed: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Table {
    /// Each member's last heartbeat.
    members: HashMap<Arc<str>, Instant>,
    shards: HashMap<u16, Lease>,
    /// The last revision written to a lease (any shard): a renewal or takeover moves it.
    revision: u64,
    /// Agent -> member -> when it last put its interest.
    interest: HashMap<AgentId, HashMap<Arc<str>, Instant>>,
}

#[derive(Debug, Clone)]
struct Lease {
    holder: Arc<str>,
    revision: u64,
    /// When it was last written (taken or renewed).
    renewed: Instant,
}

impl Table {
    fn live(&self, now: Instant, ttl: Duration) -> Vec<&str> {
        let mut live: Vec<&str> = self
            .members
            .iter()
            .filter(|(_, heartbeat)| now < **heartbeat + ttl)
            .map(|(member, _)| &**member)
            .collect();
        live.sort_unstable();
        live
    }

    fn write(&mut self, shard: u16, holder: &Arc<str>, now: Instant) -> u64 {
        self.revision += 1;
        self.shards.insert(
            shard,
            Lease {
                holder: holder.clone(),
                revision: self.revision,
                renewed: now,
            },
        );
        self.revision
    }
}

impl Leases {
    pub(super) fn new(settings: LeaseSettings) -> Self {
        Self {
            settings,
            table: std::sync::Mutex::default(),
            changed: watch::Sender::new(0),
        }
    }

    /// The member whose lease of `shard` the store holds.
    pub(super) fn holder(&self, shard: u16) -> Option<Arc<str>> {
        lock(&self.table)
            .shards
            .get(&shard)
            .map(|lease| lease.holder.clone())
    }

    fn interest_lifetime(&self) -> Duration {
        self.settings.renew * INTEREST_LIFETIME
    }

    fn tell(&self) {
        self.changed.send_modify(|n| *n += 1);
    }
}

#[derive(Debug, Default)]
pub(crate) struct State {
    holding: Holding,
    /// Other members' interest as last read: agent -> when last put.
    remote: HashMap<AgentId, Instant>,
    writes_accepted: bool,
    share_taken: bool,
}

impl HolderState for State {
    fn holding(&mut self) -> &mut Holding {
        &mut self.holding
    }

    fn part(&self) -> PollingPart {
        PollingPart {
            writes_accepted: self.writes_accepted,
            share_taken: self.share_taken,
        }
    }
}

impl State {
    fn remote_interest(&self, now: Instant, lifetime: Duration) -> BTreeSet<AgentId> {
        self.remote
            .iter()
            .filter(|(agent, put)| now < **put + lifetime && self.holding.owns(**agent))
            .map(|(agent, _)| *agent)
            .collect()
    }
}

#[derive(Debug)]
struct Shared {
    me: Arc<str>,
    leases: Arc<Leases>,
    link: Arc<MemberLink>,
    holder: Arc<Holder<State>>,
}

impl Shared {
    /// Runs `change` on the state; tells the poll loops when the shards they may poll changed
    /// and the events room when the remote interest did.
    fn update<T>(&self, change: impl FnOnce(&mut State, Instant) -> T) -> T {
        let now = Instant::now();
        let mut state = self.holder.lock();
        let pollable = state.holding.pollable(now);
        let result = change(&mut state, now);
        let pollable_changed = pollable != state.holding.pollable(now);
        let interest = state.remote_interest(now, self.leases.interest_lifetime());
        drop(state);
        if pollable_changed {
            self.holder.signals.changes.send_modify(|n| *n += 1);
        }
        self.holder.signals.interest.send_if_modified(|current| {
            let modified = **current != interest;
            if modified {
                *current = Arc::new(interest);
            }
            modified
        });
        result
    }

    /// One round while the member reaches the store: heartbeat, renewals, takes and hand-backs,
    /// interest put and read.
    fn round(&self, refresh: bool) {
        let settings = self.leases.settings;
        let mut told = false;
        let mut lost = 0;
        self.update(|state, now| {
            let mut table = lock(&self.leases.table);
            told |= table.members.insert(self.me.clone(), now).is_none();
            // Renewals: a lease whose revision moved was taken over.
            let held: Vec<(u16, HeldLease)> = state.holding.held.iter().map(|(s, h)| (*s, *h)).collect();
            for (shard, held) in held {
                let ours = table
                    .shards
                    .get(&shard)
                    .is_some_and(|lease| lease.holder == self.me && lease.revision == held.revision);
                if !ours {
                    state.holding.held.remove(&shard);
                    if !held.releasing {
                        lost += 1;
                        tracing::warn!(shard, "shard lease lost: another member took it over; its agents are no longer polled here");
                    }
                    continue;
                }
                let revision = table.write(shard, &self.me, now);
                let entry = state.holding.held.get_mut(&shard).expect("held");
                entry.revision = revision;
                entry.fence = now + settings.polls_start_within();
            }
            // Takes and hand-backs.
            let live: Vec<Arc<str>> = table.live(now, settings.ttl).into_iter().map(Arc::from).collect();
            let live: Vec<&str> = live.iter().map(|m| &**m).collect();
            let mut holds_share = true;
            for shard in 0..SHARDS {
                let desired = desired_owner(shard, &live) == Some(&*self.me);
                if let Some(held) = state.holding.held.get_mut(&shard) {
                    held.releasing = !desired;
                    if !desired && !state.holding.in_flight.contains_key(&shard) {
                        table.shards.remove(&shard);
                        state.holding.held.remove(&shard);
                        told = true;
                    }
                    continue;
                }
                if !desired {
                    continue;
                }
                let free = match table.shards.get(&shard) {
                    None => true,
                    Some(lease) => now >= lease.renewed + settings.ttl,
                };
                if free {
                    let revision = table.write(shard, &self.me, now);
                    state.holding.held.insert(
                        shard,
                        HeldLease {
                            revision,
                            fence: now + settings.polls_start_within(),
                            releasing: false,
                        },
                    );
                    told = true;
                } else {
                    holds_share = false;
                }
            }
            if holds_share && !state.share_taken {
                tracing::info!(shards_held = state.holding.held.len(), "this member holds its share of the shards");
            }
            state.share_taken |= holds_share;
            state.writes_accepted = true;
            // Interest: put what is wanted (all of it on a refresh), withdraw the rest.
            let wanted = state.holding.interest_wanted();
            for agent in state.holding.published.difference(&wanted) {
                if let Some(by) = table.interest.get_mut(agent) {
                    by.remove(&self.me);
                    if by.is_empty() {
                        table.interest.remove(agent);
                    }
                }
                told = true;
            }
            for agent in &wanted {
                if refresh || !state.holding.published.contains(agent) {
                    told |= table
                        .interest
                        .entry(*agent)
                        .or_default()
                        .insert(self.me.clone(), now)
                        .is_none();
                }
            }
            state.holding.published = wanted;
            state.remote = table
                .interest
                .iter()
                .filter_map(|(agent, by)| {
                    let put = by
                        .iter()
                        .filter(|(member, _)| **member != self.me)
                        .map(|(_, put)| *put)
                        .max()?;
                    Some((*agent, put))
                })
                .collect();
        });
        if lost > 0 {
            self.holder
                .signals
                .leases_lost
                .fetch_add(lost, Ordering::Relaxed);
        }
        if told {
            self.leases.tell();
        }
    }

    /// A round while the member is cut off: nothing is written; its fences close in time, and
    /// the interest it last saw fades.
    fn cut_off_round(&self) {
        let held = self.update(|state, now| {
            state.writes_accepted = false;
            let lifetime = self.leases.interest_lifetime();
            state.remote.retain(|_, put| now < *put + lifetime);
            state.holding.held.len()
        });
        self.holder
            .signals
            .renewals_failed
            .fetch_add(held as u64, Ordering::Relaxed);
    }

    /// On shutdown: withdraws the membership (first, as the NATS driver does: the others leave
    /// a live member's shards to it), stops starting polls, hands each lease back once its
    /// polls ended, and withdraws the interest, so the others take over at once.
    async fn hand_back_all(&self) {
        if self.link.reachable() {
            lock(&self.leases.table).members.remove(&self.me);
            self.leases.tell();
        }
        loop {
            let woken = self.holder.signals.wake.notified();
            let busy = self.update(|state, _| {
                let mut table = lock(&self.leases.table);
                let (drained, busy) = state.holding.release_all();
                if self.link.reachable() {
                    for (shard, revision) in drained {
                        if table
                            .shards
                            .get(&shard)
                            .is_some_and(|l| l.revision == revision)
                        {
                            table.shards.remove(&shard);
                        }
                        state.holding.held.remove(&shard);
                    }
                }
                busy
            });
            self.leases.tell();
            if busy == 0 {
                break;
            }
            woken.await;
        }
        if self.link.reachable() {
            let mut table = lock(&self.leases.table);
            for by in table.interest.values_mut() {
                by.remove(&self.me);
            }
            table.interest.retain(|_, by| !by.is_empty());
        }
        self.leases.tell();
        tracing::info!("shard leases handed back");
    }
}

/// One member's poll ownership (see the module's documentation).
pub(super) type MemberOwnership = LeaseOwnership<State>;

impl MemberOwnership {
    /// Starts the member's driver in `lifecycle`; it hands the leases back at shutdown.
    pub(super) fn start(
        leases: Arc<Leases>,
        me: Arc<str>,
        link: Arc<MemberLink>,
        lifecycle: &Lifecycle,
    ) -> Arc<Self> {
        let shared = Arc::new(Shared {
            me,
            leases,
            link,
            holder: Holder::new(State::default()),
        });
        lifecycle
            .tasks()
            .spawn(drive(shared.clone(), lifecycle.shutdown().child_token()));
        Arc::new(Self::new(shared.holder.clone()))
    }
}

/// Runs rounds every renew interval, when the store changed, when the member wants something
/// and when it is cut off or back, until `shutdown`.
async fn drive(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut renewals = tokio::time::interval(shared.leases.settings.renew);
    renewals.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut store_changed = shared.leases.changed.subscribe();
    let mut reached = shared.link.changes();
    loop {
        let refresh = tokio::select! {
            _ = renewals.tick() => true,
            _ = store_changed.changed() => false,
            _ = reached.changed() => false,
            () = shared.holder.signals.wake.notified() => false,
            () = shutdown.cancelled() => break,
        };
        if shared.link.reachable() {
            store_changed.borrow_and_update();
            shared.round(refresh);
        } else if refresh {
            shared.cut_off_round();
        }
    }
    if tokio::time::timeout(HAND_BACK_ON_SHUTDOWN, shared.hand_back_all())
        .await
        .is_err()
    {
        tracing::warn!("could not hand every shard lease back on shutdown; other members take them over after the lease TTL");
    }
}

#[cfg(test)]
mod tests {
    use crate::{
        domain::MAX_AGENT_ID_LIMIT,
        events::{shard_of, PollOwnership},
    };

    use super::*;

    const SETTINGS: LeaseSettings = LeaseSettings {
        renew: Duration::from_secs(1),
        ttl: Duration::from_secs(15),
        margin: Duration::from_secs(2),
        poll_timeout: Duration::from_secs(11),
    };

    /// One agent of each shard.
    fn one_agent_per_shard() -> Vec<AgentId> {
        let mut agents: HashMap<u16, AgentId> = HashMap::new();
        for n in 101.. {
            let agent = AgentId::parse("agent", &n.to_string(), MAX_AGENT_ID_LIMIT).unwrap();
            agents.entry(shard_of(agent)).or_insert(agent);
            if agents.len() == usize::from(SHARDS) {
                return agents.into_values().collect();
            }
        }
        unreachable!()
    }

    /// Three members start, one is cut off, the other two take its shards over: at every
    /// moment at most one member may poll each agent, and in the end each shard is polled by
    /// its desired owner among the two.
    #[tokio::test(start_paused = true)]
    async fn one_member_at_a_time_may_poll_each_shard() {
        let leases = Arc::new(Leases::new(SETTINGS));
        let ids = ["a", "b", "c"];
        let members: Vec<(Arc<MemberOwnership>, Arc<MemberLink>, Lifecycle)> = ids
            .iter()
            .map(|id| {
                let link = Arc::new(MemberLink::default());
                let lifecycle = Lifecycle::new();
                let ownership =
                    MemberOwnership::start(leases.clone(), (*id).into(), link.clone(), &lifecycle);
                (ownership, link, lifecycle)
            })
            .collect();
        let agents = one_agent_per_shard();
        let pollers = |agent: AgentId| -> Vec<usize> {
            (0..members.len())
                .filter(|i| members[*i].0.poll_permit(agent).is_some())
                .collect()
        };
        for step in 0..80 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if step == 10 {
                assert!(members.iter().all(|m| m.0.part().share_taken));
                members[2].1.connected.send_replace(false);
            }
            for agent in &agents {
                assert!(pollers(*agent).len() <= 1, "step {step}: {agent}");
            }
        }
        for agent in &agents {
            let desired = desired_owner(shard_of(*agent), &ids[..2]).unwrap();
            let desired = ids.iter().position(|id| *id == desired).unwrap();
            assert_eq!(pollers(*agent), [desired], "{agent}");
        }
        assert!(!members[2].0.part().writes_accepted);
        assert!(members[2].0.stats().renewals_failed > 0);
    }
}
