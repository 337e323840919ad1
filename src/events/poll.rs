//! One agent's long-poll loop: the only reader of the agent's gateway events in the process.
use std::{sync::atomic::Ordering, sync::Arc, time::Duration};

use rand::Rng;
use tokio::{sync::watch, time::Instant};

use super::{
    hub::{Feed, Hub, Step},
    SessionEnding,
};
use crate::gateway::{event::parse_event, GatewayError};

/// First pause after a failed poll; it doubles up to `EventSettings::backoff_max`.
const BACKOFF_BASE: Duration = Duration::from_millis(200);

pub struct PollLoop {
    hub: Arc<Hub>,
    feed: Arc<Feed>,
    shutdown: watch::Receiver<bool>,
    /// Consecutive failed polls.
    failures: u32,
}

impl PollLoop {
    pub(super) fn new(hub: Arc<Hub>, feed: Arc<Feed>) -> Self {
        let shutdown = hub.shutdown_signal();
        Self {
            hub,
            feed,
            shutdown,
            failures: 0,
        }
    }

    pub async fn run(mut self) {
        let agent = self.feed.agent;
        tracing::info!(%agent, "poll loop started");
        loop {
            let step = self.hub.next_step(&self.feed);
            let keep_going = match step {
                Step::Poll => self.poll_once().await,
                Step::Wait(until) => self.wait(until).await,
                Step::Retire => false,
            };
            if !keep_going {
                break;
            }
        }
        tracing::info!(%agent, "poll loop ended");
    }

    /// One poll and the pause after it. False when the facade shuts down.
    async fn poll_once(&mut self) -> bool {
        let agent = self.feed.agent;
        let settings = &self.hub.settings;
        let deadline = Instant::now() + settings.poll_timeout;
        // Dropping a poll in flight can lose the event the gateway just dequeued for it; only
        // shutdown is worth that.
        let result = tokio::select! {
            result = self.hub.gateway.poll_event(agent, deadline) => result,
            _ = self.shutdown.wait_for(|stop| *stop) => return false,
        };
        let pause = match result {
            Ok(answer) if answer.is_ok() => {
                self.failures = 0;
                match answer.event {
                    Some(event) => {
                        self.hub.observe(&self.feed, parse_event(agent, &event));
                        // More may be queued: ask again at once.
                        Duration::ZERO
                    }
                    None => settings.poll_pause,
                }
            }
            Ok(answer) if answer.session_gone() => {
                tracing::info!(%agent, retcode = %answer.retcode, "the gateway ended the agent's session; its watchers are told");
                self.hub.end_session(
                    &self.feed,
                    SessionEnding::Refused {
                        retcode: answer.retcode,
                        message: answer.message,
                    },
                );
                Duration::ZERO
            }
            Ok(answer) => self.failed(&format!(
                "retcode {} ({:?})",
                answer.retcode, answer.message
            )),
            Err(GatewayError::NoSession(_)) => {
                tracing::info!(%agent, "the agent's session was dropped; its watchers are told");
                self.hub.end_session(&self.feed, SessionEnding::Forgotten);
                Duration::ZERO
            }
            Err(error) => self.failed(&error.to_string()),
        };
        if pause.is_zero() {
            return true;
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => true,
            _ = self.shutdown.wait_for(|stop| *stop) => false,
        }
    }

    /// Counts a failed poll and returns the pause before the next: exponential, capped, with
    /// jitter so that many agents' loops do not hammer a recovering gateway in step.
    fn failed(&mut self, what: &str) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.hub
            .counters
            .poll_failures
            .fetch_add(1, Ordering::Relaxed);
        let ceiling = BACKOFF_BASE
            .saturating_mul(1u32 << self.failures.min(16))
            .min(self.hub.settings.backoff_max);
        let pause = ceiling / 2 + rand::rng().random_range(Duration::ZERO..=ceiling / 2);
        tracing::warn!(agent = %self.feed.agent, failures = self.failures, ?pause, "poll failed: {what}");
        pause
    }

    /// Sleeps until a watcher comes or goes, or `until`. False when the facade shuts down.
    async fn wait(&mut self, until: Option<Instant>) -> bool {
        let timer = async {
            match until {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = self.feed.changed.notified() => true,
            () = timer => true,
            _ = self.shutdown.wait_for(|stop| *stop) => false,
        }
    }
}
