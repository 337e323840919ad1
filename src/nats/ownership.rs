//! One poller per agent across replicas: poll ownership on NATS JetStream key-value leases.
//!
//! Agents map to [`SHARDS`] shards by a stable hash of the agent id. In the bucket
//! `<prefix>-leases`, `member.<replica>` is each replica's heartbeat (put every renew interval)
//! and `shard.<n>` the lease of shard n, holding its holder's replica id: taken with create,
//! renewed with update on the revision seen last (the revision is the fencing token: a holder
//! whose update fails lost the shard), handed back with a delete on that revision.
//!
//! Liveness is read on each replica's own clock: a member whose key's revision moved within the
//! TTL is live, a lease whose revision has not moved for the TTL may be taken over (update on
//! the revision seen). Per-key TTLs are never relied on. Each shard's desired owner is the live
//! member of highest rendezvous weight, so shards spread evenly and a joining replica gets its
//! share back: a holder that is no longer a shard's desired owner stops starting polls for it,
//! waits for its polls in flight, and hands the lease back.
//!
//! A holder fences itself: it starts no poll once its last successful renewal of the shard
//! was sent a TTL minus the margin minus the poll timeout ago. A poll runs at most the poll
//! timeout, so every poll of a paused or cut-off replica has ended before anybody may take over
//! (the configuration checks poll timeout + renew interval + margin < TTL, so a replica that
//! renews in time never finds its fence closed).
//!
//! Who is watched: in the bucket `<prefix>-watched`, key `shard.<n>.<replica>` lists the agents
//! of shard n (comma separated) that this replica's clients watch while another replica holds
//! the shard. It is put when that list changes and refreshed every other renew interval,
//! deleted when the list empties; the bucket's max age lets a crashed replica's interest fade
//! (interest is no lease). The holder of the agent's shard polls for them. One key per shard
//! and replica rather than one per agent: at ten thousand watched agents the per-agent keys,
//! each rewritten every renew interval, were thousands of replicated writes a second.
//!
//! Older versions wrote and read only `<agent>.<replica>` keys, and put an empty heartbeat.
//! This version reads both, puts `shard-interest` in its heartbeat, and also writes the
//! per-agent keys while a member with an empty heartbeat is live, so that an older replica
//! still polls what the upgraded ones watch during a rolling upgrade.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use async_nats::jetstream::kv::{self, Operation, UpdateErrorKind};
use futures_util::{future::join_all, StreamExt};
use tokio::time::Instant;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{Bucket, Cluster, NatsError, NatsSettings};
use crate::{
    domain::{AgentId, MAX_AGENT_ID_LIMIT},
    events::{
        desired_owner, shard_of, HeldLease, Holder, HolderState, Holding, LeaseOwnership,
        LeaseSettings, PollingPart, HAND_BACK_ON_SHUTDOWN, SHARDS,
    },
};

/// Interest keys live this many renew intervals without a refresh.
const INTEREST_LIFETIME: u32 = 4;
/// A shard's interest key is put again once it is this many renew intervals old: twice before
/// it would fade, so one failed or late refresh loses nothing.
const INTEREST_REFRESHED_AFTER: u32 = 2;
/// The heartbeat of a replica that writes its interest per shard (older ones put none).
const SHARD_INTEREST: &[u8] = b"shard-interest";
/// A member key not moved for this many TTLs is forgotten (its replica is gone for good).
const MEMBER_FORGOTTEN_AFTER_TTLS: u32 = 10;
/// A lease whose desired owner does not take it over within this many TTLs of standing still
/// is taken by any live replica (views of who is live may differ for a while).
const ANYONE_TAKES_OVER_AFTER_TTLS: u32 = 2;
/// Pause before watching a bucket again after its watch failed.
const REWATCH_PAUSE: Duration = Duration::from_secs(1);

fn shard_key(shard: u16) -> String {
    format!("shard.{shard}")
}

fn member_key(replica: &str) -> String {
    format!("member.{replica}")
}

fn shard_interest_key(shard: u16, replica: &str) -> String {
    format!("shard.{shard}.{replica}")
}

/// The interest key older versions read.
fn agent_interest_key(agent: AgentId, replica: &str) -> String {
    format!("{agent}.{replica}")
}

/// The agents an interest value names, comma separated.
fn interest_value(agents: &[AgentId]) -> bytes::Bytes {
    let mut value = String::with_capacity(agents.len() * 8);
    for (i, agent) in agents.iter().enumerate() {
        if i > 0 {
            value.push(',');
        }
        value.push_str(&agent.to_string());
    }
    value.into()
}

/// An interest key's replica and the agents it names, both formats; `None` for a key this code
/// did not write. Agents that do not belong to the key's shard, or do not parse, are left out.
fn parse_interest<'a>(key: &'a str, value: &[u8]) -> Option<(&'a str, Vec<AgentId>)> {
    let parse = |raw: &str| AgentId::parse("agent", raw, MAX_AGENT_ID_LIMIT).ok();
    let (agents, replica) = match key.strip_prefix("shard.") {
        Some(rest) => {
            let (shard, replica) = rest.split_once('.')?;
            let shard = shard.parse::<u16>().ok().filter(|n| *n < SHARDS)?;
            let mut agents: Vec<AgentId> = std::str::from_utf8(value)
                .ok()?
                .split(',')
                .filter_map(parse)
                .filter(|agent| shard_of(*agent) == shard)
                .collect();
            agents.sort_unstable();
            agents.dedup();
            (agents, replica)
        }
        None => {
            let (agent, replica) = key.split_once('.')?;
            (vec![parse(agent)?], replica)
        }
    };
    is_replica_id(replica).then_some((replica, agents))
}

/// A replica id as written by this code: lowercase hex (so it is safe as a key token).
fn is_replica_id(raw: &str) -> bool {
    !raw.is_empty() && raw.len() <= 64 && raw.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A key whose revision this replica watches move.
#[derive(Debug, Clone)]
struct Seen {
    revision: u64,
    /// When this replica saw the revision change last (its own clock).
    moved: Instant,
}

/// A shard lease as this replica last saw it.
#[derive(Debug, Clone)]
enum Lease {
    Held {
        holder: String,
        seen: Seen,
    },
    /// Deleted (handed back), or never seen since `since`.
    Free {
        since: Instant,
    },
}

/// What one round of the lease logic decided to do.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    /// Free shards to take (create).
    create: Vec<u16>,
    /// Stale shards to take over (update on the revision seen).
    take_over: Vec<(u16, u64)>,
    /// Shards to hand back (delete on the revision held): their polls ended.
    hand_back: Vec<(u16, u64)>,
}

/// Another replica's interest key as this replica saw it.
#[derive(Debug)]
struct SeenInterest {
    agents: Vec<AgentId>,
    /// When the key was put last (this replica's clock).
    put: Instant,
}

/// One of this replica's shard interest keys.
#[derive(Debug)]
struct PutInterest {
    agents: Vec<AgentId>,
    /// When the put that wrote it was sent.
    sent: Instant,
}

#[derive(Debug)]
pub(crate) struct State {
    holding: Holding,
    members: HashMap<String, Seen>,
    leases: HashMap<u16, Lease>,
    /// Since when this replica has been watching the bucket without a break: it began, or its
    /// heartbeat succeeded again after failing. Keys cannot be seen to move while it is cut off,
    /// so nothing counts as standing still from before (after an outage every replica would
    /// otherwise find every other dead and every lease stale at once).
    observing_since: Instant,
    /// When this replica's last successful heartbeat was sent; `None` after a failed one.
    heartbeat: Option<Instant>,
    /// Other replicas' interest keys as last seen, by key.
    remote: HashMap<String, SeenInterest>,
    /// Members whose heartbeat is empty: older versions, which read per-agent interest keys.
    older_members: HashSet<String>,
    /// This replica's shard interest keys: the agents each was put with, and when.
    shard_interest: HashMap<u16, PutInterest>,
    /// Agents whose per-agent interest key this replica put (while older members were live).
    agent_interest: HashSet<AgentId>,
    /// This replica has held, at least once, every shard its view of the live members gives
    /// it: it took part in the assignment (a new replica of three holds about a third).
    share_taken: bool,
    /// Some renewals of the last round failed.
    renewals_failing: bool,
}

impl State {
    fn new(now: Instant) -> Self {
        Self {
            holding: Holding::default(),
            members: HashMap::new(),
            leases: HashMap::new(),
            observing_since: now,
            heartbeat: None,
            remote: HashMap::new(),
            older_members: HashSet::new(),
            shard_interest: HashMap::new(),
            agent_interest: HashSet::new(),
            share_taken: false,
            renewals_failing: false,
        }
    }

    /// Whether this replica, live itself, holds every shard the live members give it.
    fn holds_its_share(&self, me: &str, now: Instant, ttl: Duration) -> bool {
        let live = self.live(me, now, ttl);
        live.contains(&me)
            && (0..SHARDS).all(|shard| {
                desired_owner(shard, &live) != Some(me) || self.holding.held.contains_key(&shard)
            })
    }
}

impl HolderState for State {
    fn holding(&mut self) -> &mut Holding {
        &mut self.holding
    }

    /// Its last heartbeat and renewals were written (a replica whose writes NATS refuses, or
    /// does not answer, polls nothing once its fences close), and it took its share once.
    fn part(&self) -> PollingPart {
        PollingPart {
            writes_accepted: self.heartbeat.is_some() && !self.renewals_failing,
            share_taken: self.share_taken,
        }
    }
}

impl State {
    /// The shards held and not being handed back.
    fn owned(&self) -> Vec<u16> {
        self.holding
            .held
            .iter()
            .filter(|(_, held)| !held.releasing)
            .map(|(shard, _)| *shard)
            .collect()
    }

    /// The lease of `shard` was (re)written by this replica at `revision`, the write sent at
    /// `sent`.
    fn renewed(&mut self, me: &str, shard: u16, revision: u64, sent: Instant, s: LeaseSettings) {
        let held = self.holding.held.entry(shard).or_insert(HeldLease {
            revision,
            fence: sent,
            releasing: false,
        });
        held.revision = held.revision.max(revision);
        held.fence = held.fence.max(sent + s.polls_start_within());
        self.saw_lease(shard, me, revision, sent);
    }

    /// This replica no longer holds `shard`.
    fn lost(&mut self, shard: u16) -> Option<HeldLease> {
        self.holding.held.remove(&shard)
    }

    fn saw_lease(&mut self, shard: u16, holder: &str, revision: u64, now: Instant) {
        match self.leases.get_mut(&shard) {
            Some(Lease::Held { seen, .. }) if seen.revision >= revision => {}
            Some(Lease::Held { holder: h, seen }) => {
                *h = holder.to_owned();
                *seen = Seen {
                    revision,
                    moved: now,
                };
            }
            _ => {
                self.leases.insert(
                    shard,
                    Lease::Held {
                        holder: holder.to_owned(),
                        seen: Seen {
                            revision,
                            moved: now,
                        },
                    },
                );
            }
        }
    }

    /// When `seen` last moved, as far as this replica can tell.
    fn moved(&self, seen: &Seen) -> Instant {
        seen.moved.max(self.observing_since)
    }

    /// This replica's heartbeat was sent at `sent` and succeeded (`Some`), or failed.
    fn heartbeat_sent(&mut self, sent: Option<Instant>) {
        if self.heartbeat.is_none() {
            if let Some(sent) = sent {
                self.observing_since = self.observing_since.max(sent);
            }
        }
        self.heartbeat = sent;
    }

    fn saw_member(&mut self, member: &str, revision: u64, now: Instant) {
        let seen = self.members.entry(member.to_owned()).or_insert(Seen {
            revision,
            moved: now,
        });
        if revision > seen.revision {
            *seen = Seen {
                revision,
                moved: now,
            };
        }
    }

    /// Live members, this replica among them while its heartbeat is fresh, sorted.
    fn live<'a>(&'a self, me: &'a str, now: Instant, ttl: Duration) -> Vec<&'a str> {
        let mut live: Vec<&str> = self
            .members
            .iter()
            .filter(|(member, seen)| member.as_str() != me && now < self.moved(seen) + ttl)
            .map(|(member, _)| member.as_str())
            .collect();
        if self.heartbeat.is_some_and(|sent| now < sent + ttl) {
            live.push(me);
        }
        live.sort_unstable();
        live.dedup();
        live
    }

    /// Decides which shards to take and which to hand back; marks the shards this replica
    /// should no longer poll as being handed back (and those it should again as not).
    fn plan(&mut self, me: &str, now: Instant, ttl: Duration) -> Plan {
        let live: Vec<String> = self
            .live(me, now, ttl)
            .into_iter()
            .map(str::to_owned)
            .collect();
        let live: Vec<&str> = live.iter().map(String::as_str).collect();
        let mut plan = Plan::default();
        if !live.contains(&me) {
            // Without a fresh heartbeat this replica cannot know who else is live: it only
            // renews what it holds (and may not poll once the fences close).
            return plan;
        }
        for shard in 0..SHARDS {
            let desired = desired_owner(shard, &live) == Some(me);
            if let Some(held) = self.holding.held.get_mut(&shard) {
                held.releasing = !desired;
                if held.releasing && self.holding.in_flight.get(&shard).copied().unwrap_or(0) == 0 {
                    plan.hand_back.push((shard, held.revision));
                }
                continue;
            }
            let patience = if desired {
                ttl
            } else {
                ttl * ANYONE_TAKES_OVER_AFTER_TTLS
            };
            match self.leases.get(&shard) {
                None if desired => plan.create.push(shard),
                None => {
                    if now >= self.observing_since + patience {
                        plan.create.push(shard);
                    }
                }
                Some(Lease::Free { since }) => {
                    if desired || now >= (*since).max(self.observing_since) + patience {
                        plan.create.push(shard);
                    }
                }
                Some(Lease::Held { holder, seen }) => {
                    // A live holder hands back what it should not hold; a holder that stopped
                    // renewing is taken over once the lease stood still for the TTL. A lease
                    // that names this replica but is not held is one whose write timed out
                    // here and reached the server after all (see `Driver::own_revision`):
                    // nobody else polls it.
                    if holder == me || now >= self.moved(seen) + patience {
                        plan.take_over.push((shard, seen.revision));
                    }
                }
            }
        }
        plan
    }

    /// The agents other replicas watch whose shard this replica may poll.
    fn remote_interest(&self, now: Instant, lifetime: Duration) -> BTreeSet<AgentId> {
        self.remote
            .values()
            .filter(|seen| now < seen.put + lifetime)
            .flat_map(|seen| &seen.agents)
            .filter(|agent| self.holding.owns(**agent))
            .copied()
            .collect()
    }

    /// Forgets what expired: other replicas' stale interest, long-gone members.
    fn prune(&mut self, now: Instant, interest_lifetime: Duration, ttl: Duration) {
        self.remote
            .retain(|_, seen| now < seen.put + interest_lifetime);
        self.members
            .retain(|_, seen| now < seen.moved + ttl * MEMBER_FORGOTTEN_AFTER_TTLS);
        let members = &self.members;
        self.older_members
            .retain(|member| members.contains_key(member));
    }

    /// Whether a live member reads only per-agent interest keys.
    fn older_member_live(&self, me: &str, now: Instant, ttl: Duration) -> bool {
        self.live(me, now, ttl)
            .iter()
            .any(|member| self.older_members.contains(*member))
    }
}

#[derive(Debug)]
struct Shared {
    replica: Arc<str>,
    settings: LeaseSettings,
    holder: Arc<Holder<State>>,
}

impl Shared {
    fn new(replica: Arc<str>, settings: LeaseSettings) -> Arc<Self> {
        Arc::new(Self {
            replica,
            settings,
            holder: Holder::new(State::new(Instant::now())),
        })
    }

    /// What the watched bucket's max age is.
    fn interest_lifetime(&self) -> Duration {
        self.settings.renew * INTEREST_LIFETIME
    }

    /// Runs `change` on the state; tells the poll loops when the shards they may poll changed
    /// and the events room when the remote interest did (through the shards owned).
    fn update<T>(&self, change: impl FnOnce(&mut State, Instant) -> T) -> T {
        self.apply(false, change)
    }

    /// [`update`](Self::update) for changes of other replicas' interest itself.
    fn update_interest<T>(&self, change: impl FnOnce(&mut State, Instant) -> T) -> T {
        self.apply(true, change)
    }

    fn apply<T>(&self, interest_changed: bool, change: impl FnOnce(&mut State, Instant) -> T) -> T {
        let now = Instant::now();
        let mut state = self.holder.lock();
        let (pollable, owned) = (state.holding.pollable(now), state.owned());
        let result = change(&mut state, now);
        let pollable_changed = pollable != state.holding.pollable(now);
        // Recomputed only when it may have changed: lease entries arrive by the hundred per
        // renew interval, and the interest may name thousands of agents.
        let interest = (interest_changed || owned != state.owned())
            .then(|| state.remote_interest(now, self.interest_lifetime()));
        drop(state);
        if pollable_changed {
            self.holder.signals.changes.send_modify(|n| *n += 1);
        }
        if let Some(interest) = interest {
            self.holder.signals.interest.send_if_modified(|current| {
                let modified = **current != interest;
                if modified {
                    *current = Arc::new(interest);
                }
                modified
            });
        }
        result
    }

    fn lease_lost(&self, shard: u16, why: &str) {
        let lost = self.update(|state, _| state.lost(shard));
        if lost.is_some_and(|held| !held.releasing) {
            self.holder
                .signals
                .leases_lost
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                shard,
                "shard lease lost: {why}; its agents are no longer polled here"
            );
        }
    }

    /// An entry of the leases bucket, as watched.
    fn saw_lease_entry(&self, entry: &kv::Entry) {
        let me: &str = &self.replica;
        if let Some(member) = entry.key.strip_prefix("member.") {
            if !is_replica_id(member) {
                return;
            }
            let joined_or_left = self.update(|state, now| match entry.operation {
                Operation::Put => {
                    let joined = !state.members.contains_key(member);
                    state.saw_member(member, entry.revision, now);
                    if entry.value.is_empty() {
                        state.older_members.insert(member.to_owned());
                    } else {
                        state.older_members.remove(member);
                    }
                    joined
                }
                Operation::Delete | Operation::Purge => {
                    state.older_members.remove(member);
                    state.members.remove(member).is_some()
                }
            });
            // Who should hold which shard changed: rebalance now, not at the next renewal, so
            // that a leaving replica's agents are not left unpolled for up to a renew interval.
            if joined_or_left {
                self.holder.signals.wake.notify_one();
            }
            return;
        }
        let Some(shard) = entry
            .key
            .strip_prefix("shard.")
            .and_then(|n| n.parse::<u16>().ok())
            .filter(|n| *n < SHARDS)
        else {
            return;
        };
        match entry.operation {
            Operation::Put => {
                let holder = String::from_utf8_lossy(&entry.value);
                let taken = self.update(|state, now| {
                    state.saw_lease(shard, &holder, entry.revision, now);
                    holder != me
                        && state
                            .holding
                            .held
                            .get(&shard)
                            .is_some_and(|held| entry.revision > held.revision)
                });
                if taken {
                    self.lease_lost(shard, "another replica took it over");
                }
            }
            Operation::Delete | Operation::Purge => {
                let held = self.update(|state, now| {
                    state.leases.insert(shard, Lease::Free { since: now });
                    state
                        .holding
                        .held
                        .get(&shard)
                        .is_some_and(|held| entry.revision > held.revision)
                });
                if held {
                    self.lease_lost(shard, "it was deleted");
                }
                self.holder.signals.wake.notify_one();
            }
        }
    }

    /// An entry of the watched bucket: another replica's interest in some agents.
    fn saw_interest_entry(&self, entry: &kv::Entry) {
        self.saw_interest(&entry.key, &entry.value, entry.operation);
    }

    fn saw_interest(&self, key: &str, value: &[u8], operation: Operation) {
        let Some((replica, agents)) = parse_interest(key, value) else {
            return;
        };
        if replica == &*self.replica {
            return;
        }
        let now = Instant::now();
        let mut state = self.holder.lock();
        // A refresh of known interest changes no set: only new and withdrawn agents do.
        let set_changed = match operation {
            Operation::Put => {
                let changed = state
                    .remote
                    .get(key)
                    .is_none_or(|seen| seen.agents != agents);
                state
                    .remote
                    .insert(key.to_owned(), SeenInterest { agents, put: now });
                changed
            }
            Operation::Delete | Operation::Purge => state
                .remote
                .remove(key)
                .is_some_and(|before| !before.agents.is_empty()),
        };
        drop(state);
        if set_changed {
            self.update_interest(|_, _| {});
        }
    }
}

/// Poll ownership shared through NATS (see the module's documentation).
pub(crate) type NatsOwnership = LeaseOwnership<State>;

/// The leases and watched buckets as this replica wants them.
pub(super) fn buckets(settings: &NatsSettings) -> [Bucket; 2] {
    let bucket = |what, max_age| Bucket {
        what,
        config: kv::Config {
            history: 1,
            max_age,
            ..kv::Config::default()
        },
        max_messages: None,
    };
    [
        // Only clears keys of replicas gone for good: held leases and heartbeats are rewritten
        // every renew interval.
        bucket(
            "leases",
            (settings.lease_ttl * 10).max(Duration::from_secs(3600)),
        ),
        // Lets a crashed replica's interest fade.
        bucket("watched", settings.lease_renew * INTEREST_LIFETIME),
    ]
}

impl NatsOwnership {
    /// Opens (or creates) the buckets and starts keeping leases and interest, until
    /// `shutdown`, when the leases are handed back.
    pub(crate) async fn start(
        cluster: &Cluster,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<Arc<Self>, NatsError> {
        let settings = cluster.settings();
        let lease_settings = LeaseSettings {
            renew: settings.lease_renew,
            ttl: settings.lease_ttl,
            margin: settings.lease_margin,
            poll_timeout: settings.poll_timeout,
        };
        let [leases, watched] = buckets(settings);
        let leases = cluster.key_value(leases).await?;
        let watched = cluster.key_value(watched).await?;
        let shared = Shared::new(cluster.replica().into(), lease_settings);
        tasks.spawn(follow(
            leases.clone(),
            shared.clone(),
            Shared::saw_lease_entry,
            shutdown.clone(),
        ));
        tasks.spawn(follow(
            watched.clone(),
            shared.clone(),
            Shared::saw_interest_entry,
            shutdown.clone(),
        ));
        let driver = Driver {
            shared: shared.clone(),
            leases,
            watched,
        };
        tasks.spawn(driver.run(shutdown));
        Ok(Arc::new(Self::new(shared.holder.clone())))
    }
}

/// Applies every entry of `store` (its current keys first) to `shared`, watching again after a
/// failure, until `shutdown`.
async fn follow(
    store: kv::Store,
    shared: Arc<Shared>,
    apply: fn(&Shared, &kv::Entry),
    shutdown: CancellationToken,
) {
    loop {
        match store.watch_with_history(">").await {
            Ok(mut entries) => loop {
                let entry = tokio::select! {
                    entry = entries.next() => entry,
                    () = shutdown.cancelled() => return,
                };
                match entry {
                    Some(Ok(entry)) => apply(&shared, &entry),
                    Some(Err(error)) => {
                        tracing::warn!(bucket = %store.name, %error, "watching a NATS bucket failed; watching it again");
                        break;
                    }
                    None => break,
                }
            },
            Err(error) => {
                tracing::warn!(bucket = %store.name, %error, "cannot watch a NATS bucket; trying again");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(REWATCH_PAUSE) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Keeps this replica's heartbeat, leases and interest keys.
struct Driver {
    shared: Arc<Shared>,
    leases: kv::Store,
    watched: kv::Store,
}

impl Driver {
    async fn run(self, shutdown: CancellationToken) {
        let mut renewals = tokio::time::interval(self.shared.settings.renew);
        renewals.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = renewals.tick() => {
                    self.heartbeat().await;
                    self.renew().await;
                    self.refresh_interest(true).await;
                }
                () = self.shared.holder.signals.wake.notified() => self.refresh_interest(false).await,
                () = shutdown.cancelled() => break,
            }
            self.rebalance().await;
            // The agents of shards just being handed back are now the new owner's to poll.
            self.refresh_interest(false).await;
        }
        if tokio::time::timeout(HAND_BACK_ON_SHUTDOWN, self.hand_back_all())
            .await
            .is_err()
        {
            tracing::warn!("could not hand every shard lease back on shutdown; other replicas take them over after --lease-ttl-secs");
        }
    }

    async fn heartbeat(&self) {
        let sent = Instant::now();
        let key = member_key(&self.shared.replica);
        let heartbeat = bytes::Bytes::from_static(SHARD_INTEREST);
        match self.leases.put(&key, heartbeat).await {
            Ok(revision) => self.shared.update(|state, _| {
                state.heartbeat_sent(Some(sent));
                state.saw_member(&self.shared.replica, revision, sent);
            }),
            Err(error) => {
                self.shared.update(|state, _| state.heartbeat_sent(None));
                self.shared
                    .holder
                    .signals
                    .renewals_failed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "cannot renew this replica's membership in NATS");
            }
        }
    }

    /// Renews every held lease on its revision.
    async fn renew(&self) {
        let held: Vec<(u16, u64)> = self
            .shared
            .holder
            .lock()
            .holding
            .held
            .iter()
            .map(|(shard, held)| (*shard, held.revision))
            .collect();
        let sent = Instant::now();
        let replica = bytes::Bytes::copy_from_slice(self.shared.replica.as_bytes());
        let renewals = held.iter().map(|(shard, revision)| {
            self.leases
                .update(shard_key(*shard), replica.clone(), *revision)
        });
        let results = join_all(renewals).await;
        let mut renewed = Vec::with_capacity(held.len());
        let mut failed = 0;
        for ((shard, _), result) in held.into_iter().zip(results) {
            match result {
                Ok(revision) => renewed.push((shard, revision)),
                Err(error) if error.kind() == UpdateErrorKind::WrongLastRevision => {
                    match self.own_revision(shard).await {
                        // Renewed on it next time; the fence stays as it was.
                        Some(revision) => self.shared.update(|state, _| {
                            if let Some(held) = state.holding.held.get_mut(&shard) {
                                held.revision = held.revision.max(revision);
                            }
                        }),
                        None => self.shared.lease_lost(shard, "its revision moved"),
                    }
                }
                Err(error) => {
                    failed += 1;
                    tracing::debug!(shard, %error, "shard lease renewal failed");
                }
            }
        }
        self.shared.update(|state, _| {
            state.renewals_failing = failed > 0;
            for (shard, revision) in renewed {
                // Not when it was found taken over meanwhile.
                if state.holding.held.contains_key(&shard) {
                    state.renewed(
                        &self.shared.replica,
                        shard,
                        revision,
                        sent,
                        self.shared.settings,
                    );
                }
            }
        });
        if failed > 0 {
            self.shared
                .holder
                .signals
                .renewals_failed
                .fetch_add(failed, Ordering::Relaxed);
            tracing::warn!(failed, "shard lease renewals failed; polls of those shards stop once the leases can no longer be relied on");
        }
    }

    /// The revision of `shard`'s lease when it names this replica: a write of its own that
    /// timed out here (NATS unreachable) and reached the server after all, from the client's
    /// buffer. Nobody else holds that lease.
    async fn own_revision(&self, shard: u16) -> Option<u64> {
        let entry = self.leases.entry(shard_key(shard)).await.ok()??;
        let own = entry.operation == Operation::Put
            && entry.value.as_ref() == self.shared.replica.as_bytes();
        own.then_some(entry.revision)
    }

    /// Takes the shards this replica should hold and may, hands back those drained.
    async fn rebalance(&self) {
        let plan = self
            .shared
            .update(|state, now| state.plan(&self.shared.replica, now, self.shared.settings.ttl));
        let replica = bytes::Bytes::copy_from_slice(self.shared.replica.as_bytes());
        let sent = Instant::now();
        let creates = plan.create.iter().map(|shard| async {
            (
                *shard,
                self.leases
                    .create(shard_key(*shard), replica.clone())
                    .await
                    .ok(),
            )
        });
        let takeovers = plan.take_over.iter().map(|&(shard, revision)| {
            let replica = replica.clone();
            async move {
                let taken = self
                    .leases
                    .update(shard_key(shard), replica, revision)
                    .await
                    .ok();
                if taken.is_some() {
                    tracing::info!(shard, "took over a shard lease its holder stopped renewing");
                }
                (shard, taken)
            }
        });
        let (created, taken) = tokio::join!(join_all(creates), join_all(takeovers));
        let gained: Vec<(u16, u64)> = created
            .into_iter()
            .chain(taken)
            .filter_map(|(shard, revision)| Some((shard, revision?)))
            .collect();
        let gained = self.shared.update(|state, _| {
            for (shard, revision) in &gained {
                state.renewed(
                    &self.shared.replica,
                    *shard,
                    *revision,
                    sent,
                    self.shared.settings,
                );
            }
            gained.len()
        });
        let handed_back = self.hand_back(&plan.hand_back).await;
        let share_taken = self.shared.update(|state, now| {
            let taken = !state.share_taken
                && state.holds_its_share(&self.shared.replica, now, self.shared.settings.ttl);
            state.share_taken |= taken;
            taken
        });
        if share_taken {
            tracing::info!(
                shards_held = self.shared.holder.lock().holding.held.len(),
                "this replica holds its share of the shards"
            );
        }
        if gained > 0 || handed_back > 0 {
            tracing::info!(
                gained,
                handed_back,
                shards_held = self.shared.holder.lock().holding.held.len(),
                "shard leases rebalanced"
            );
        }
    }

    /// Deletes the leases of `shards` on the revisions held; returns how many went.
    async fn hand_back(&self, shards: &[(u16, u64)]) -> usize {
        let deletes = shards.iter().map(|(shard, revision)| async {
            let deleted = self
                .leases
                .delete_expect_revision(shard_key(*shard), Some(*revision))
                .await;
            (*shard, deleted)
        });
        let mut handed_back = Vec::new();
        for (shard, deleted) in join_all(deletes).await {
            match deleted {
                Ok(()) => handed_back.push(shard),
                // Still held (renewed, its polls still held back) and tried again.
                Err(error) => tracing::debug!(shard, %error, "handing a shard lease back failed"),
            }
        }
        self.shared.update(|state, now| {
            for shard in &handed_back {
                state.lost(*shard);
                state.leases.insert(*shard, Lease::Free { since: now });
            }
        });
        handed_back.len()
    }

    /// Shares which agents this replica's clients watch whose shard another replica holds: puts
    /// the shard interest keys whose agents changed or that are due a refresh, deletes those of
    /// shards no longer wanted; the same per agent while an older member is live (all of them
    /// when `refresh`, else the new ones).
    async fn refresh_interest(&self, refresh: bool) {
        let settings = self.shared.settings;
        let replica = &self.shared.replica;
        let sent = Instant::now();
        let (puts, deletes, agent_puts, agent_deletes) = {
            let mut state = self.shared.holder.lock();
            let wanted = state.holding.interest_wanted();
            let mut by_shard: BTreeMap<u16, Vec<AgentId>> = BTreeMap::new();
            for agent in &wanted {
                by_shard.entry(shard_of(*agent)).or_default().push(*agent);
            }
            let deletes: Vec<u16> = state
                .shard_interest
                .keys()
                .filter(|shard| !by_shard.contains_key(shard))
                .copied()
                .collect();
            for shard in &deletes {
                state.shard_interest.remove(shard);
            }
            let due = settings.renew * INTEREST_REFRESHED_AFTER;
            let puts: Vec<(u16, Vec<AgentId>)> = by_shard
                .into_iter()
                .filter_map(|(shard, mut agents)| {
                    agents.sort_unstable();
                    let current = state
                        .shard_interest
                        .get(&shard)
                        .is_some_and(|put| put.agents == agents && sent < put.sent + due);
                    (!current).then_some((shard, agents))
                })
                .collect();
            let per_agent = if state.older_member_live(replica, sent, settings.ttl) {
                wanted.clone()
            } else {
                HashSet::new()
            };
            let agent_deletes: Vec<AgentId> = state
                .agent_interest
                .difference(&per_agent)
                .copied()
                .collect();
            let agent_puts: Vec<AgentId> = per_agent
                .iter()
                .filter(|agent| refresh || !state.agent_interest.contains(agent))
                .copied()
                .collect();
            state.agent_interest = per_agent;
            state.holding.published = wanted;
            (puts, deletes, agent_puts, agent_deletes)
        };
        let shard_puts = puts.iter().map(|(shard, agents)| {
            self.watched
                .put(shard_interest_key(*shard, replica), interest_value(agents))
        });
        let agent_puts = agent_puts.iter().map(|agent| {
            self.watched
                .put(agent_interest_key(*agent, replica), bytes::Bytes::new())
        });
        let (shard_puts, agent_puts, failed_deletes) = tokio::join!(
            join_all(shard_puts),
            join_all(agent_puts),
            self.delete_interest(&deletes, &agent_deletes)
        );
        let mut failed = failed_deletes + agent_puts.iter().filter(|r| r.is_err()).count();
        self.shared.update_interest(|state, now| {
            for ((shard, agents), put) in puts.into_iter().zip(shard_puts) {
                if put.is_ok() {
                    state
                        .shard_interest
                        .insert(shard, PutInterest { agents, sent });
                } else {
                    // Put again in the next round.
                    state.shard_interest.remove(&shard);
                    failed += 1;
                }
            }
            state.prune(now, self.shared.interest_lifetime(), settings.ttl);
        });
        if failed > 0 {
            // Put again in the next round; a key not deleted fades with the bucket's max age.
            tracing::warn!(
                failed,
                "cannot share which agents this replica's clients watch"
            );
        }
    }

    /// On shutdown (the poll loops stopping): withdraws this replica's membership, hands every
    /// lease back once its polls ended, then withdraws its interest, so others take over at
    /// once.
    async fn hand_back_all(&self) {
        // First: while its member key stands, the others count this replica as live and leave
        // the shards it should hold to it, those it hands back included, until the key goes
        // stale. A shard whose last poll is slow to end (an append retried) must not keep
        // every other shard waiting for that.
        let _ = self.leases.delete(member_key(&self.shared.replica)).await;
        loop {
            let (drained, busy) = { self.shared.holder.lock().holding.release_all() };
            self.hand_back(&drained).await;
            if busy == 0 {
                break;
            }
            self.shared.holder.signals.wake.notified().await;
        }
        let (shards, agents) = {
            let mut state = self.shared.holder.lock();
            state.holding.published.clear();
            let shards: Vec<u16> = state
                .shard_interest
                .drain()
                .map(|(shard, _)| shard)
                .collect();
            let agents: Vec<AgentId> = state.agent_interest.drain().collect();
            (shards, agents)
        };
        self.delete_interest(&shards, &agents).await;
        tracing::info!("shard leases handed back");
    }

    /// Deletes this replica's interest keys of `shards`, and its per-agent keys of `agents`;
    /// returns how many deletes failed.
    async fn delete_interest(&self, shards: &[u16], agents: &[AgentId]) -> usize {
        let replica = &self.shared.replica;
        let shard_deletes = shards
            .iter()
            .map(|shard| self.watched.delete(shard_interest_key(*shard, replica)));
        let agent_deletes = agents
            .iter()
            .map(|agent| self.watched.delete(agent_interest_key(*agent, replica)));
        let (shard_deletes, agent_deletes) =
            tokio::join!(join_all(shard_deletes), join_all(agent_deletes));
        shard_deletes
            .iter()
            .chain(&agent_deletes)
            .filter(|deleted| deleted.is_err())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{shard_of, PollOwnership};

    const SETTINGS: LeaseSettings = LeaseSettings {
        renew: Duration::from_secs(5),
        ttl: Duration::from_secs(45),
        margin: Duration::from_secs(2),
        poll_timeout: Duration::from_secs(30),
    };

    fn agent(raw: &str) -> AgentId {
        AgentId::parse("agent", raw, MAX_AGENT_ID_LIMIT).unwrap()
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n)
            .map(|_| uuid::Uuid::new_v4().simple().to_string())
            .collect()
    }

    fn owners(members: &[String]) -> Vec<String> {
        let live: Vec<&str> = members.iter().map(String::as_str).collect();
        (0..SHARDS)
            .map(|shard| desired_owner(shard, &live).unwrap().to_owned())
            .collect()
    }

    /// Replicas of every version must agree on an agent's shard.
    #[test]
    fn an_agents_shard_never_changes() {
        let pinned: Vec<u16> = ["101", "102", "59999", "999999"]
            .iter()
            .map(|raw| shard_of(agent(raw)))
            .collect();
        assert_eq!(pinned, [64, 221, 145, 187]);
        let mut spread = [0u32; SHARDS as usize];
        for n in 101..10_101 {
            spread[usize::from(shard_of(agent(&n.to_string())))] += 1;
        }
        // 10,000 agents over 256 shards: about 39 each.
        assert!(spread.iter().all(|n| (15..=70).contains(n)), "{spread:?}");
    }

    /// Rendezvous hashing spreads the shards evenly, and a replica joining (or leaving) moves
    /// only the shards it takes (or held).
    #[test]
    fn shards_spread_evenly_and_move_only_to_a_joining_replica() {
        for _ in 0..20 {
            let mut members = ids(3);
            let before = owners(&members);
            for member in &members {
                let held = before.iter().filter(|o| *o == member).count();
                assert!((50..=120).contains(&held), "{held} of 256 for one of three");
            }
            let joining = ids(1).remove(0);
            members.push(joining.clone());
            let after = owners(&members);
            let moved: Vec<usize> = (0..before.len())
                .filter(|i| before[*i] != after[*i])
                .collect();
            assert!(moved.iter().all(|i| after[*i] == joining));
            assert!((35..=95).contains(&moved.len()), "{} moved", moved.len());

            let leaving = members.remove(0);
            let without = owners(&members);
            assert!((0..after.len()).all(|i| after[i] == without[i] || after[i] == leaving));
        }
    }

    fn holding(me: &str, shard: u16, now: Instant) -> State {
        let mut state = State::new(now);
        state.heartbeat_sent(Some(now));
        state.renewed(me, shard, 7, now, SETTINGS);
        state
    }

    /// A holder starts no poll once its last renewal was sent TTL - margin - poll timeout ago,
    /// whatever else happens (a paused process, NATS unreachable), so its last poll has ended
    /// before the lease may be taken over; a renewal opens the fence again.
    #[tokio::test(start_paused = true)]
    async fn the_fence_closes_a_poll_timeout_before_the_lease_may_be_taken_over() {
        let sent = Instant::now();
        let mut state = holding("a", 3, sent);
        let closes = sent + SETTINGS.ttl - SETTINGS.margin - SETTINGS.poll_timeout;
        assert!(closes + SETTINGS.poll_timeout < sent + SETTINGS.ttl);
        tokio::time::sleep_until(closes - Duration::from_millis(1)).await;
        assert!(state.holding.may_poll(3, Instant::now()));
        assert!(
            !state.holding.may_poll(4, Instant::now()),
            "a shard not held"
        );
        tokio::time::sleep_until(closes).await;
        assert!(!state.holding.may_poll(3, Instant::now()));
        assert!(state.holding.pollable(Instant::now()).is_empty());

        // A renewal answered late counts from when it was sent.
        let renewal_sent = Instant::now();
        tokio::time::advance(Duration::from_secs(4)).await;
        state.renewed("a", 3, 9, renewal_sent, SETTINGS);
        assert!(state.holding.may_poll(3, Instant::now()));
        tokio::time::sleep_until(renewal_sent + SETTINGS.polls_start_within()).await;
        assert!(!state.holding.may_poll(3, Instant::now()));
    }

    /// A lease is taken over only once its revision stood still for the TTL on this replica's
    /// clock (and its holder's heartbeat with it); a lease that moves is never.
    #[tokio::test(start_paused = true)]
    async fn a_lease_is_taken_over_once_it_stood_still_for_the_ttl() {
        let start = Instant::now();
        let mut state = State::new(start);
        state.heartbeat_sent(Some(start));
        state.saw_member("b", 1, start);
        for shard in 0..SHARDS {
            state.saw_lease(shard, "b", 100 + u64::from(shard), start);
        }
        tokio::time::advance(SETTINGS.ttl - Duration::from_millis(1)).await;
        let now = Instant::now();
        state.heartbeat_sent(Some(now));
        let plan = state.plan("a", now, SETTINGS.ttl);
        assert!(
            plan.take_over.is_empty() && plan.create.is_empty(),
            "{plan:?}"
        );

        // One lease renewed meanwhile; b's heartbeat stopped.
        state.saw_lease(0, "b", 1000, now);
        tokio::time::advance(Duration::from_millis(1)).await;
        let now = Instant::now();
        state.heartbeat_sent(Some(now));
        let plan = state.plan("a", now, SETTINGS.ttl);
        assert_eq!(plan.take_over.len(), usize::from(SHARDS) - 1);
        assert!(plan.take_over.contains(&(1, 101)), "on the revision seen");
        assert!(!plan.take_over.iter().any(|(shard, _)| *shard == 0));
    }

    /// While this replica was cut off it could not see keys move: after an outage nothing
    /// stood still from before it, and other replicas count as live for a TTL.
    #[tokio::test(start_paused = true)]
    async fn nothing_stood_still_while_this_replica_was_cut_off() {
        let start = Instant::now();
        let mut state = State::new(start);
        state.heartbeat_sent(Some(start));
        state.saw_member("b", 1, start);
        state.saw_lease(0, "b", 100, start);
        tokio::time::advance(Duration::from_secs(1)).await;
        state.heartbeat_sent(None);
        tokio::time::advance(SETTINGS.ttl * 3).await;
        let back = Instant::now();
        state.heartbeat_sent(Some(back));
        assert_eq!(state.live("a", back, SETTINGS.ttl), ["a", "b"]);
        assert!(state.plan("a", back, SETTINGS.ttl).take_over.is_empty());
        tokio::time::advance(SETTINGS.ttl).await;
        let now = Instant::now();
        state.heartbeat_sent(Some(now));
        assert_eq!(state.live("a", now, SETTINGS.ttl), ["a"]);
        assert_eq!(state.plan("a", now, SETTINGS.ttl).take_over, [(0, 100)]);
    }

    /// A renewal that timed out here but reached the server leaves a lease naming this
    /// replica that it does not hold: it takes it back at once on the revision seen.
    #[tokio::test(start_paused = true)]
    async fn a_lease_naming_this_replica_is_taken_back_at_once() {
        let now = Instant::now();
        let mut state = holding("a", 3, now);
        state.lost(3);
        state.saw_lease(3, "a", 8, now);
        let plan = state.plan("a", now, SETTINGS.ttl);
        assert!(plan.take_over.contains(&(3, 8)), "{plan:?}");
    }

    /// Without a fresh heartbeat of its own a replica takes nothing and hands nothing back.
    #[tokio::test(start_paused = true)]
    async fn a_replica_whose_heartbeat_failed_plans_nothing() {
        let start = Instant::now();
        let mut state = holding("a", 3, start);
        state.saw_member("b", 1, start);
        tokio::time::advance(SETTINGS.ttl).await;
        state.saw_member("b", 2, Instant::now());
        assert_eq!(
            state.plan("a", Instant::now(), SETTINGS.ttl),
            Plan::default()
        );
    }

    /// A replica holds its share once it holds every shard rendezvous hashing gives it among
    /// the live replicas (about half of them with one other), not all 256; its part counts only
    /// while its heartbeat and renewals are written.
    #[tokio::test(start_paused = true)]
    async fn a_replica_holds_its_share_when_it_holds_what_hashing_gives_it() {
        let now = Instant::now();
        let mut state = State::new(now);
        state.heartbeat_sent(Some(now));
        state.saw_member("b", 1, now);
        let mine: Vec<u16> = (0..SHARDS)
            .filter(|shard| desired_owner(*shard, &["a", "b"]) == Some("a"))
            .collect();
        assert!((64..=192).contains(&mine.len()), "{}", mine.len());
        for shard in &mine[1..] {
            state.renewed("a", *shard, 7, now, SETTINGS);
        }
        assert!(!state.holds_its_share("a", now, SETTINGS.ttl));
        state.renewed("a", mine[0], 7, now, SETTINGS);
        assert!(state.holds_its_share("a", now, SETTINGS.ttl));

        state.share_taken = true;
        assert!(state.part().writes_accepted && state.part().share_taken);
        state.renewals_failing = true;
        assert!(!state.part().writes_accepted);
        state.renewals_failing = false;
        state.heartbeat_sent(None);
        assert!(!state.part().writes_accepted, "a failed heartbeat");
        assert!(
            !state.holds_its_share("a", now, SETTINGS.ttl),
            "not live itself"
        );
    }

    fn ownership(me: &str) -> (Arc<Shared>, NatsOwnership) {
        let shared = Shared::new(me.into(), SETTINGS);
        let ownership = NatsOwnership::new(shared.holder.clone());
        (shared, ownership)
    }

    /// A shard whose desired owner is another live replica stops getting polls at once and
    /// is handed back only when its polls in flight ended, so two replicas never poll one
    /// agent at once when shards move.
    #[tokio::test(start_paused = true)]
    async fn a_shard_is_handed_back_once_its_polls_in_flight_ended() {
        let me = "a";
        let other = "b";
        let agent = (101..)
            .map(|n| agent(&n.to_string()))
            .find(|a| desired_owner(shard_of(*a), &[me, other]) == Some(other))
            .unwrap();
        let shard = shard_of(agent);
        let (shared, ownership) = ownership(me);
        let mut changes = ownership.changes();
        shared.update(|state, now| *state = holding(me, shard, now));
        assert!(changes.has_changed().unwrap(), "the poll loops are told");
        changes.borrow_and_update();
        let permit = ownership.poll_permit(agent).expect("held");

        let plan = shared.update(|state, now| {
            state.saw_member(other, 1, now);
            state.plan(me, now, SETTINGS.ttl)
        });
        assert!(plan.hand_back.is_empty(), "a poll is in flight");
        assert!(ownership.poll_permit(agent).is_none(), "no new poll starts");
        assert!(changes.has_changed().unwrap());

        drop(permit);
        let plan = shared.update(|state, now| state.plan(me, now, SETTINGS.ttl));
        assert_eq!(plan.hand_back, vec![(shard, 7)]);
    }

    /// Other replicas' interest counts for the agents of the shards this replica may poll,
    /// until it fades.
    #[tokio::test(start_paused = true)]
    async fn remote_interest_is_that_of_held_shards_until_it_fades() {
        let (shared, ownership) = ownership("a");
        let watched = agent("101");
        // Not a replica id, or this replica's own: ignored.
        shared.saw_interest("101.nothex", b"", Operation::Put);
        let elsewhere = (102..)
            .map(|n| agent(&n.to_string()))
            .find(|a| shard_of(*a) != shard_of(watched))
            .unwrap();
        let interest = ownership.remote_interest();
        shared.update(|state, now| *state = holding("a", shard_of(watched), now));
        // One in an older version's per-agent key, one in a shard key.
        shared.saw_interest(&format!("{watched}.b"), b"", Operation::Put);
        let key = format!("shard.{}.c", shard_of(elsewhere));
        shared.saw_interest(&key, elsewhere.to_string().as_bytes(), Operation::Put);
        assert_eq!(**interest.borrow(), BTreeSet::from([watched]));
        tokio::time::advance(shared.interest_lifetime()).await;
        shared.update_interest(|state, now| {
            state.prune(now, shared.interest_lifetime(), SETTINGS.ttl);
        });
        assert!(interest.borrow().is_empty());
    }

    /// A shard key's agents are those of its shard; what this code did not write is ignored.
    #[test]
    fn interest_keys_parse_in_both_formats() {
        let a = agent("101");
        let b = (102..)
            .map(|n| agent(&n.to_string()))
            .find(|b| shard_of(*b) == shard_of(a))
            .unwrap();
        let other = (102..)
            .map(|n| agent(&n.to_string()))
            .find(|o| shard_of(*o) != shard_of(a))
            .unwrap();
        let shard = shard_of(a);
        let value = interest_value(&[b, a]);
        assert_eq!(value, format!("{b},{a}").as_bytes());
        let key = shard_interest_key(shard, "ab12");
        assert_eq!(parse_interest(&key, &value), Some(("ab12", vec![a, b])));
        let mixed = format!("{a},{other},x,,{a},99999999999");
        assert_eq!(
            parse_interest(&key, mixed.as_bytes()),
            Some(("ab12", vec![a])),
            "agents of other shards, junk and repeats are left out"
        );
        assert_eq!(parse_interest(&key, b""), Some(("ab12", vec![])));
        let older = agent_interest_key(a, "ab12");
        assert_eq!(parse_interest(&older, b""), Some(("ab12", vec![a])));
        for key in [
            format!("shard.{SHARDS}.ab12"),
            format!("shard.{shard}.not-hex"),
            format!("shard.{shard}"),
            "shard.x.ab12".to_owned(),
            "x.ab12".to_owned(),
            format!("{a}"),
        ] {
            assert_eq!(
                parse_interest(&key, a.to_string().as_bytes()),
                None,
                "{key}"
            );
        }
        assert_eq!(parse_interest(&key, &[0xff, 0xfe]), None, "not UTF-8");
    }

    /// A shard key put again with the same agents changes nothing; with other agents, or
    /// deleted, it changes the remote interest.
    #[tokio::test(start_paused = true)]
    async fn a_shard_interest_key_changes_the_interest_only_when_its_agents_do() {
        let (shared, ownership) = ownership("a");
        let first = agent("101");
        let second = (102..)
            .map(|n| agent(&n.to_string()))
            .find(|b| shard_of(*b) == shard_of(first))
            .unwrap();
        shared.update(|state, now| *state = holding("a", shard_of(first), now));
        let mut interest = ownership.remote_interest();
        interest.borrow_and_update();
        let key = shard_interest_key(shard_of(first), "b");
        shared.saw_interest(&key, &interest_value(&[first]), Operation::Put);
        assert!(interest.has_changed().unwrap());
        assert_eq!(**interest.borrow_and_update(), BTreeSet::from([first]));
        shared.saw_interest(&key, &interest_value(&[first]), Operation::Put);
        assert!(!interest.has_changed().unwrap(), "a refresh");
        shared.saw_interest(&key, &interest_value(&[first, second]), Operation::Put);
        assert_eq!(
            **interest.borrow_and_update(),
            BTreeSet::from([first, second])
        );
        shared.saw_interest(&key, b"", Operation::Delete);
        assert!(interest.borrow_and_update().is_empty());
    }
}
