//! Whether the gateway is reachable, from two kinds of evidence: a probe (a TCP connect, plus
//! the TLS handshake for `https`, with nothing sent over it: no session, no request an agent
//! could feel) every `--gateway-probe-secs`, and how real requests end (a connect failure or an
//! HTTP 502/503/504 says unreachable, any other answer says reachable). Damped: it goes down
//! after [`DOWN_AFTER`] failures in a row and up after [`UP_AFTER`] successes in a row, and
//! each change is logged once.
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, Mutex,
};

use tokio::sync::watch;

/// Failures in a row that take a reachable gateway down: one refused connection (a gateway
/// node restarting behind its load balancer) is not an outage.
pub const DOWN_AFTER: u32 = 3;
/// Successes in a row that bring an unreachable gateway back up: one lucky connect during a
/// flapping outage is not a recovery.
pub const UP_AFTER: u32 = 2;

/// What the facade knows about the gateway's reachability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reachability {
    /// Nothing observed yet (the first probe runs at startup).
    Unknown,
    Up,
    Down,
}

/// The damped reachability of the gateway. Cheap to clone; every clone is the same.
#[derive(Debug, Clone)]
pub struct GatewayHealth {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    damper: Mutex<Damper>,
    state: watch::Sender<Reachability>,
    transitions: AtomicU64,
}

impl Default for GatewayHealth {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                damper: Mutex::new(Damper::default()),
                state: watch::Sender::new(Reachability::Unknown),
                transitions: AtomicU64::new(0),
            }),
        }
    }
}

impl GatewayHealth {
    /// Whether the gateway is reachable now (false while unknown).
    pub fn is_up(&self) -> bool {
        self.state() == Reachability::Up
    }

    pub fn state(&self) -> Reachability {
        *self.inner.state.borrow()
    }

    /// Changes of [`Self::state`] so far, the first determination included.
    pub fn transitions(&self) -> u64 {
        self.inner.transitions.load(Ordering::Relaxed)
    }

    /// Sees every change of [`Self::state`].
    pub fn subscribe(&self) -> watch::Receiver<Reachability> {
        self.inner.state.subscribe()
    }

    /// Takes one piece of evidence: the gateway was reached, or not (with why, for the log).
    pub(crate) fn observe(&self, evidence: Result<(), &dyn std::fmt::Display>) {
        let changed = crate::lock(&self.inner.damper).observe(evidence.is_ok());
        let Some(state) = changed else {
            return;
        };
        self.inner.transitions.fetch_add(1, Ordering::Relaxed);
        self.inner.state.send_replace(state);
        match (state, evidence) {
            (Reachability::Down, Err(why)) => tracing::warn!(
                failures_in_a_row = DOWN_AFTER,
                error = %why,
                "the CC-Gateway is unreachable (health ccgw.gateway NOT_SERVING)"
            ),
            _ => tracing::info!("the CC-Gateway is reachable (health ccgw.gateway SERVING)"),
        }
    }
}

/// The damping, without clocks or logs.
#[derive(Debug, Clone, Copy)]
struct Damper {
    state: Reachability,
    /// Observations in a row that contradict `state`.
    against: u32,
}

impl Default for Damper {
    fn default() -> Self {
        Self {
            state: Reachability::Unknown,
            against: 0,
        }
    }
}

impl Damper {
    /// The new state, when this observation changes it.
    fn observe(&mut self, reached: bool) -> Option<Reachability> {
        let (agrees, needed, next) = match self.state {
            // The first observation decides: at startup there is nothing to damp.
            Reachability::Unknown => (false, 1, Self::from(reached)),
            Reachability::Up => (reached, DOWN_AFTER, Reachability::Down),
            Reachability::Down => (!reached, UP_AFTER, Reachability::Up),
        };
        if agrees {
            self.against = 0;
            return None;
        }
        self.against += 1;
        if self.against < needed {
            return None;
        }
        self.against = 0;
        self.state = next;
        Some(next)
    }

    fn from(reached: bool) -> Reachability {
        if reached {
            Reachability::Up
        } else {
            Reachability::Down
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(observations: &str) -> Vec<Option<Reachability>> {
        let mut damper = Damper::default();
        observations
            .chars()
            .map(|c| damper.observe(c == '+'))
            .collect()
    }

    #[test]
    fn down_after_three_failures_in_a_row_up_after_two_successes() {
        use Reachability::{Down, Up};
        assert_eq!(run("+")[0], Some(Up));
        assert_eq!(run("-")[0], Some(Down));
        // Up; two failures, a success resets; then three in a row.
        assert_eq!(
            run("+--+---"),
            [Some(Up), None, None, None, None, None, Some(Down)]
        );
        // Down; one success, a failure resets; then two in a row.
        assert_eq!(run("-+-++"), [Some(Down), None, None, None, Some(Up)]);
    }

    #[test]
    fn each_change_is_counted_and_published_once() {
        let health = GatewayHealth::default();
        let mut seen = health.subscribe();
        assert_eq!(health.state(), Reachability::Unknown);
        assert!(!health.is_up());
        health.observe(Ok(()));
        health.observe(Ok(()));
        assert!(health.is_up());
        assert!(seen.has_changed().unwrap());
        assert_eq!(*seen.borrow_and_update(), Reachability::Up);
        let refused = "connection refused";
        for _ in 0..DOWN_AFTER {
            health.observe(Err(&refused));
        }
        assert_eq!(health.state(), Reachability::Down);
        assert_eq!(health.transitions(), 2);
    }
}
