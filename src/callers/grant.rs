//! What one caller may do: the agent id ranges and the verbs it is granted.
use std::fmt;

use crate::domain::AgentId;

enum_with_all! {
    /// What a caller does to an agent.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum Verb {
        /// ReleaseCall.
        Release,
        /// WatchReleaseEvents, and ReleaseCall's wait_for_release_event (both read release
        /// events, which carry customer numbers).
        Watch,
        /// Sending an agent's session (x-ccgw-guid metadata), which replaces the session every
        /// other caller of that agent uses.
        Handover,
    }
}

impl Verb {
    /// The name callers files use.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Release => "release",
            Self::Watch => "watch",
            Self::Handover => "handover",
        }
    }

    fn parse(raw: &str) -> Result<Self, String> {
        Self::ALL
            .iter()
            .copied()
            .find(|verb| verb.name() == raw)
            .ok_or_else(|| {
                let known: Vec<_> = Self::ALL.iter().map(|v| v.name()).collect();
                format!("unknown verb {raw:?} (known: {})", known.join(", "))
            })
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Agent ids `first..=last`: written `"101-199"`, `"500"`, or `"*"` for every agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentRange {
    first: u32,
    last: u32,
}

impl AgentRange {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.trim() == "*" {
            return Ok(Self {
                first: 0,
                last: u32::MAX,
            });
        }
        let (first, last) = raw.split_once('-').unwrap_or((raw, raw));
        let (first, last) = (agent_number(raw, first)?, agent_number(raw, last)?);
        if first > last {
            return Err(format!("agent range {raw:?} ends before it starts"));
        }
        Ok(Self { first, last })
    }

    pub fn contains(&self, agent: AgentId) -> bool {
        (self.first..=self.last).contains(&agent.get())
    }
}

/// One end of a range: decimal digits (surrounding spaces allowed), at most 9 of them.
fn agent_number(range: &str, raw: &str) -> Result<u32, String> {
    let raw = raw.trim();
    if raw.is_empty() || raw.len() > 9 || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "agent range {range:?}: expected an agent id, FIRST-LAST or \"*\""
        ));
    }
    raw.parse()
        .map_err(|_| format!("agent range {range:?}: not a number"))
}

/// The agents and verbs granted to one caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    agents: Vec<AgentRange>,
    verbs: Vec<Verb>,
}

/// Why a grant does not cover a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("the caller is not granted the verb {0}")]
    Verb(Verb),
    #[error("the caller is not granted agent {0}")]
    Agent(AgentId),
}

impl Grant {
    /// Parses the agent ranges and verbs of a callers file entry.
    pub fn parse(agents: &[String], verbs: &[String]) -> Result<Self, String> {
        Ok(Self {
            agents: agents
                .iter()
                .map(|raw| AgentRange::parse(raw))
                .collect::<Result<_, _>>()?,
            verbs: verbs
                .iter()
                .map(|raw| Verb::parse(raw))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Every agent, every verb: what a caller is granted when caller authorization is off.
    pub fn everything() -> Self {
        Self {
            agents: vec![AgentRange::parse("*").expect("a valid range")],
            verbs: Verb::ALL.to_vec(),
        }
    }

    /// Whether the grant covers all of `verbs` on all of `agents`; the first gap if not.
    pub fn allows(&self, verbs: &[Verb], agents: &[AgentId]) -> Result<(), Denied> {
        if let Some(&verb) = verbs.iter().find(|v| !self.verbs.contains(v)) {
            return Err(Denied::Verb(verb));
        }
        match agents
            .iter()
            .find(|&&agent| !self.agents.iter().any(|r| r.contains(agent)))
        {
            Some(&agent) => Err(Denied::Agent(agent)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn agent(n: u32) -> AgentId {
        AgentId::parse("agent_id", &n.to_string(), 999_999).unwrap()
    }

    fn strings(raw: &[&str]) -> Vec<String> {
        raw.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn ranges_parse_or_say_why_not() {
        assert_eq!(
            AgentRange::parse("101-199"),
            Ok(AgentRange {
                first: 101,
                last: 199
            })
        );
        assert_eq!(
            AgentRange::parse(" 500 "),
            Ok(AgentRange {
                first: 500,
                last: 500
            })
        );
        assert!(AgentRange::parse("*").unwrap().contains(agent(999_999)));
        for bad in [
            "",
            "-",
            "199-101",
            "a-b",
            "101-",
            "-5",
            "1e3",
            "101..199",
            "1234567890",
        ] {
            assert!(AgentRange::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Grant::parse(&strings(&["101"]), &strings(&["hangup"]))
            .unwrap_err()
            .contains("unknown verb \"hangup\""));
    }

    #[test]
    fn a_grant_names_the_first_verb_or_agent_it_lacks() {
        let grant = Grant::parse(&strings(&["101-199", "500"]), &strings(&["release"])).unwrap();
        assert_eq!(
            grant.allows(&[Verb::Release], &[agent(101), agent(500)]),
            Ok(())
        );
        assert_eq!(
            grant.allows(&[Verb::Release], &[agent(150), agent(200)]),
            Err(Denied::Agent(agent(200)))
        );
        assert_eq!(
            grant.allows(&[Verb::Release, Verb::Handover], &[agent(101)]),
            Err(Denied::Verb(Verb::Handover))
        );
        assert_eq!(
            Grant::everything().allows(Verb::ALL, &[agent(101), agent(999_999)]),
            Ok(())
        );
    }

    proptest! {
        /// A range written FIRST-LAST holds exactly the agents from FIRST to LAST.
        #[test]
        fn a_range_holds_exactly_its_agents(a in 101u32..2_000, b in 101u32..2_000, probe in 101u32..2_100) {
            let (first, last) = (a.min(b), a.max(b));
            let range = AgentRange::parse(&format!("{first}-{last}")).unwrap();
            prop_assert_eq!(range.contains(agent(probe)), (first..=last).contains(&probe));
            if first < last {
                let reversed = format!("{last}-{first}");
                prop_assert!(AgentRange::parse(&reversed).is_err());
            }
        }

        /// A grant allows a request exactly when every verb and every agent is covered.
        #[test]
        fn a_grant_allows_exactly_what_it_covers(
            ranges in proptest::collection::vec((101u32..1_000, 0u32..100), 0..4),
            verbs in proptest::collection::vec(0usize..3, 0..3),
            asked_verbs in proptest::collection::vec(0usize..3, 1..3),
            agents in proptest::collection::vec(101u32..1_100, 1..4),
        ) {
            let written: Vec<String> = ranges.iter().map(|(f, len)| format!("{f}-{}", f + len)).collect();
            let verb_names: Vec<String> = verbs.iter().map(|&v| Verb::ALL[v].name().to_owned()).collect();
            let grant = Grant::parse(&written, &verb_names).unwrap();
            let asked: Vec<Verb> = asked_verbs.iter().map(|&v| Verb::ALL[v]).collect();
            let ids: Vec<AgentId> = agents.iter().map(|&a| agent(a)).collect();
            let covered = asked.iter().all(|v| verbs.iter().any(|&g| Verb::ALL[g] == *v))
                && agents.iter().all(|a| ranges.iter().any(|(f, len)| (*f..=f + len).contains(a)));
            prop_assert_eq!(grant.allows(&asked, &ids).is_ok(), covered);
        }
    }
}
