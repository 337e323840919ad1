//! The polled agents: every agent whose poll loop may poll holds one long-poll connection (one
//! file descriptor) to the gateway, so the process polls at most `--max-polled-agents` of them.
//! A watcher admitted for agents nobody polls yet reserves their places before anything else
//! changes, all or none; joining their feeds turns the reservations into polled agents, and a
//! watcher refused after its admission gives them back. An agent stops being polled once its
//! poll loop stops polling (nobody watches it and its grace period is over, or its session was
//! lost and its watchers left), which frees its place. Kept in the feed registry, under the
//! feeds lock, so a check and what it admits are one step: the limit is never overshot.
use std::collections::{HashMap, HashSet};

use crate::domain::AgentId;

#[derive(Debug)]
pub(super) struct PolledAgents {
    limit: usize,
    /// Agents whose poll loop may poll: watched, or in their grace period.
    polled: HashSet<AgentId>,
    /// Watchers admitted and not yet joined (or refused), per agent: while an agent has one,
    /// its feed stays and keeps its place.
    admitted: HashMap<AgentId, usize>,
    /// How many agents of `admitted` are not in `polled`: places reserved for poll loops about
    /// to start.
    reserved: usize,
}

/// The polled agents' limit refused a watcher.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "this replica already polls {in_use} agents (--max-polled-agents {limit}); agent(s) {} \
     would need a poll loop of their own",
    super::subscribe::list(.agents)
)]
pub struct PolledAgentsFull {
    pub(crate) in_use: usize,
    pub(crate) limit: usize,
    /// The agents of the request nobody polls yet.
    pub(crate) agents: Vec<AgentId>,
}

impl PolledAgents {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            polled: HashSet::new(),
            admitted: HashMap::new(),
            reserved: 0,
        }
    }

    /// Places taken: agents polled, and agents a watcher being admitted reserved.
    pub fn in_use(&self) -> usize {
        self.polled.len() + self.reserved
    }

    /// Admits a watcher of `agents`: reserves a place for each agent that is neither polled
    /// nor reserved already, all or none.
    pub fn admit(&mut self, agents: &[AgentId]) -> Result<(), PolledAgentsFull> {
        let mut fresh: Vec<AgentId> = agents
            .iter()
            .copied()
            .filter(|a| !self.polled.contains(a) && !self.admitted.contains_key(a))
            .collect();
        fresh.sort_unstable();
        fresh.dedup();
        if self.in_use() + fresh.len() > self.limit {
            return Err(PolledAgentsFull {
                in_use: self.in_use(),
                limit: self.limit,
                agents: fresh,
            });
        }
        for &agent in agents {
            *self.admitted.entry(agent).or_default() += 1;
        }
        self.reserved += fresh.len();
        Ok(())
    }

    /// A watcher admitted for `agent` joined its feed: the agent is polled.
    pub fn join(&mut self, agent: AgentId) {
        self.settle(agent);
        if self.polled.insert(agent) {
            self.reserved -= 1;
        }
    }

    /// A watcher admitted for `agent` will not join its feed (it was refused after its
    /// admission). True when no other admitted watcher awaits the agent.
    pub fn withdraw(&mut self, agent: AgentId) -> bool {
        let last = self.settle(agent);
        if last && !self.polled.contains(&agent) {
            self.reserved -= 1;
        }
        last
    }

    /// One admitted watcher of `agent` less; true when it was the last.
    fn settle(&mut self, agent: AgentId) -> bool {
        let Some(count) = self.admitted.get_mut(&agent) else {
            debug_assert!(false, "agent {agent} settled without an admission");
            return false;
        };
        *count -= 1;
        if *count > 0 {
            return false;
        }
        self.admitted.remove(&agent);
        true
    }

    /// The agent is polled for other replicas' watchers: it takes a place unless it holds one
    /// (polled, or reserved by a watcher being admitted).
    pub fn poll_for_others(&mut self, agent: AgentId) -> Result<(), PolledAgentsFull> {
        if self.polled.contains(&agent) {
            return Ok(());
        }
        if self.admitted.contains_key(&agent) {
            // Its reservation becomes its place: the watcher's join then finds it polled.
            self.reserved -= 1;
        } else if self.in_use() >= self.limit {
            return Err(PolledAgentsFull {
                in_use: self.in_use(),
                limit: self.limit,
                agents: vec![agent],
            });
        }
        self.polled.insert(agent);
        Ok(())
    }

    /// An admitted watcher is about to join the agent's feed: the feed must stay, and keep
    /// its place.
    pub fn is_awaited(&self, agent: AgentId) -> bool {
        self.admitted.contains_key(&agent)
    }

    /// The agent's poll loop stopped polling: its place is free. Not while a watcher is
    /// admitted for it.
    pub fn stop(&mut self, agent: AgentId) {
        debug_assert!(
            !self.is_awaited(agent),
            "agent {agent} stopped while awaited"
        );
        self.polled.remove(&agent);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::events::testing::agent;

    fn agents(ns: &[u32]) -> Vec<AgentId> {
        ns.iter().copied().map(agent).collect()
    }

    #[test]
    fn admits_up_to_the_limit_all_or_none() {
        let mut polled = PolledAgents::new(3);
        polled.admit(&agents(&[0])).unwrap();
        polled.join(agent(0));
        polled.admit(&agents(&[1])).unwrap();
        assert_eq!(
            polled.in_use(),
            2,
            "a reservation counts before its feed exists"
        );

        // Two new agents, one place left: neither is taken.
        let refused = polled.admit(&agents(&[0, 2, 3])).unwrap_err();
        assert_eq!(
            refused,
            PolledAgentsFull {
                in_use: 2,
                limit: 3,
                agents: agents(&[2, 3]),
            }
        );
        assert_eq!(
            refused.to_string(),
            "this replica already polls 2 agents (--max-polled-agents 3); agent(s) 103, 104 \
             would need a poll loop of their own"
        );
        assert_eq!(polled.in_use(), 2);
        assert!(!polled.is_awaited(agent(2)));

        // One new agent fits; at the limit, agents already polled or reserved still do.
        polled.admit(&agents(&[0, 2])).unwrap();
        assert_eq!(polled.in_use(), 3);
        polled.admit(&agents(&[0, 1, 2])).unwrap();
        assert_eq!(polled.in_use(), 3);
        assert!(polled.admit(&agents(&[3])).is_err());
    }

    #[test]
    fn a_withdrawn_admission_gives_its_places_back_and_a_stopped_agent_its_own() {
        let mut polled = PolledAgents::new(2);
        polled.admit(&agents(&[0, 1])).unwrap();
        // Two watchers admitted for the same new agent share its place.
        polled.admit(&agents(&[1])).unwrap();
        assert_eq!(polled.in_use(), 2);
        assert!(polled.withdraw(agent(0)));
        assert!(!polled.is_awaited(agent(0)));
        assert_eq!(polled.in_use(), 1);
        assert!(
            !polled.withdraw(agent(1)),
            "another watcher still awaits 101"
        );
        assert_eq!(polled.in_use(), 1);
        polled.join(agent(1));
        assert_eq!(polled.in_use(), 1);
        assert!(!polled.is_awaited(agent(1)));

        // A polled agent with an admitted watcher keeps its place when that watcher is refused.
        polled.admit(&agents(&[1])).unwrap();
        assert!(polled.withdraw(agent(1)));
        assert_eq!(polled.in_use(), 1);

        polled.stop(agent(1));
        assert_eq!(polled.in_use(), 0);
        polled.admit(&agents(&[2, 3])).unwrap();
        assert_eq!(polled.in_use(), 2);
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A watcher of the agents in the mask is admitted (or refused).
        Admit(u8),
        /// Admitted watcher n joins its feeds.
        Join(usize),
        /// Admitted watcher n is refused after its admission.
        Withdraw(usize),
        /// Agent n's poll loop stops polling, if nobody awaits it.
        Stop(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (1u8..32).prop_map(Op::Admit),
            2 => (0usize..8).prop_map(Op::Join),
            1 => (0usize..8).prop_map(Op::Withdraw),
            2 => (0u32..5).prop_map(Op::Stop),
        ]
    }

    proptest! {
        /// Whatever the order of admissions, joins, refusals and stops, the places taken are
        /// exactly the agents polled or awaited, never more than the limit, and an admission
        /// is refused only when its new agents do not fit.
        #[test]
        fn places_taken_are_the_agents_polled_or_awaited(limit in 1usize..5, ops in proptest::collection::vec(op(), 1..80)) {
            let mut polled = PolledAgents::new(limit);
            let mut pending: Vec<Vec<AgentId>> = Vec::new();
            let mut model: HashSet<AgentId> = HashSet::new();
            for op in ops {
                match op {
                    Op::Admit(mask) => {
                        let request: Vec<AgentId> = (0..5).filter(|n| mask & (1 << n) != 0).map(agent).collect();
                        let awaited: HashSet<AgentId> = pending.iter().flatten().copied().collect();
                        let new = request.iter().filter(|a| !model.contains(a) && !awaited.contains(a)).count();
                        let taken = model.union(&awaited).count();
                        match polled.admit(&request) {
                            Ok(()) => {
                                prop_assert!(taken + new <= limit);
                                pending.push(request);
                            }
                            Err(full) => {
                                prop_assert!(taken + new > limit);
                                prop_assert_eq!(full.agents.len(), new);
                            }
                        }
                    }
                    Op::Join(i) => {
                        if i < pending.len() {
                            for a in pending.remove(i) {
                                polled.join(a);
                                model.insert(a);
                            }
                        }
                    }
                    Op::Withdraw(i) => {
                        if i < pending.len() {
                            for a in pending.remove(i) {
                                polled.withdraw(a);
                            }
                        }
                    }
                    Op::Stop(n) => {
                        if !polled.is_awaited(agent(n)) {
                            polled.stop(agent(n));
                            model.remove(&agent(n));
                        }
                    }
                }
                let awaited: HashSet<AgentId> = pending.iter().flatten().copied().collect();
                prop_assert_eq!(polled.in_use(), model.union(&awaited).count());
                prop_assert!(polled.in_use() <= limit);
            }
        }
    }
}
