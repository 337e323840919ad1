//! One agent's long-poll loop: the only reader of the agent's gateway events in the process.
use std::{sync::atomic::Ordering, sync::Arc, time::Duration};

use futures_util::future::BoxFuture;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    feeds::{Feed, Step},
    hub::Hub,
    SessionEnding,
};
use crate::{
    gateway::{event::parse_event, Answer, GatewayError, Guid, Retcode, SessionOperation},
    jittered_backoff,
};

/// The first failed poll pauses 200 to 400 ms; the ceiling doubles up to
/// `EventSettings::backoff_max`.
const BACKOFF_FIRST: Duration = Duration::from_millis(400);
/// How long a poll in flight may still finish once shutdown begins.
pub(super) const SHUTDOWN_POLL_GRACE: Duration = Duration::from_secs(1);

pub(super) struct PollLoop {
    hub: Arc<Hub>,
    feed: Arc<Feed>,
    shutdown: CancellationToken,
    /// Consecutive failed polls.
    failures: u32,
    /// A record handed to a shared log, to be stored before the next poll: the gateway already
    /// removed the event from its queue, and appending in poll order keeps the agent's order.
    appending: Option<BoxFuture<'static, ()>>,
}

impl PollLoop {
    pub fn new(hub: Arc<Hub>, feed: Arc<Feed>) -> Self {
        let shutdown = hub.shutdown.clone();
        Self {
            hub,
            feed,
            shutdown,
            failures: 0,
            appending: None,
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
        let deadline = Instant::now() + self.hub.settings.poll_timeout;
        let (result, stopping) = {
            let poll = self
                .hub
                .sessions
                .send(agent, &SessionOperation::PollEvents, deadline, None);
            tokio::pin!(poll);
            let answered = tokio::select! {
                result = &mut poll => Some(result),
                () = self.shutdown.cancelled() => None,
            };
            match answered {
                Some(result) => (result, false),
                // Dropping a poll in flight can lose the event the gateway just dequeued for
                // it; an answer already on its way arrives within this grace, a waiting long
                // poll does not (and holds nothing).
                None => match tokio::time::timeout(SHUTDOWN_POLL_GRACE, &mut poll).await {
                    Ok(result) => (result, true),
                    Err(_) => return false,
                },
            }
        };
        let pause = self.handle(result);
        if let Some(appending) = self.appending.take() {
            appending.await;
        }
        if stopping {
            return false;
        }
        if pause.is_zero() {
            return true;
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => true,
            () = self.shutdown.cancelled() => false,
        }
    }

    /// Acts on a poll's outcome; returns the pause before the next poll.
    fn handle(&mut self, result: Result<(Answer, Guid), GatewayError>) -> Duration {
        let agent = self.feed.agent;
        match result {
            Ok((answer, _)) if answer.is_ok() => {
                self.failures = 0;
                self.feed.set_failing(false);
                match answer.event {
                    Some(event) => {
                        self.appending = self.hub.observe(&self.feed, parse_event(agent, &event));
                        // More may be queued: ask again at once.
                        Duration::ZERO
                    }
                    None => self.hub.settings.poll_pause,
                }
            }
            Ok((answer, guid_used)) if answer.session_gone() => {
                self.session_refused(answer, &guid_used)
            }
            Ok((answer, _)) if answer.retcode == Retcode::WRONG_EVENT_METHOD => {
                self.stop_polling(answer)
            }
            Ok((answer, _)) => self.failed(&format!(
                "retcode {} ({:?})",
                answer.retcode, answer.message
            )),
            Err(GatewayError::NoSession(_)) => {
                tracing::info!(%agent, "the agent's session was dropped; its watchers are told");
                self.appending = self.hub.end_session(&self.feed, SessionEnding::Forgotten);
                Duration::ZERO
            }
            Err(error) => self.failed(&error.to_string()),
        }
    }

    /// The gateway refused the Guid the poll went out with (100-006, 000-003).
    fn session_refused(&mut self, answer: Answer, guid_used: &Guid) -> Duration {
        match self.current_guid() {
            None => self.stop_polling(answer),
            // The refused Guid is not the agent's session any more (a watcher's handed-over
            // one took its place, or a request's was adopted while the poll waited): poll
            // again with the session held now rather than end its watchers.
            Some(now) if now != *guid_used => {
                tracing::info!(agent = %self.feed.agent, retcode = %answer.retcode, "a poll's Guid was refused; polling with the agent's current session");
                Duration::ZERO
            }
            // Handed over again meanwhile: back off rather than spin on it.
            Some(_) => self.failed(&format!(
                "retcode {} for a Guid handed over again",
                answer.retcode
            )),
        }
    }

    /// The gateway will not deliver the agent's events: tell the watchers, stop polling.
    fn stop_polling(&mut self, answer: Answer) -> Duration {
        tracing::info!(agent = %self.feed.agent, retcode = %answer.retcode, "the gateway will not deliver the agent's events; its watchers are told");
        self.appending = self.hub.end_session(
            &self.feed,
            SessionEnding::Refused {
                retcode: answer.retcode,
                message: answer.message,
            },
        );
        Duration::ZERO
    }

    fn current_guid(&self) -> Option<Guid> {
        self.hub
            .sessions
            .registry()
            .get(self.feed.agent)
            .map(|s| s.guid)
    }

    /// Counts a failed poll and returns the pause before the next: exponential, capped, with
    /// jitter so that many agents' loops do not hammer a recovering gateway in step.
    fn failed(&mut self, what: &str) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.feed.set_failing(true);
        self.hub
            .counters
            .poll_failures
            .fetch_add(1, Ordering::Relaxed);
        let pause = jittered_backoff(BACKOFF_FIRST, self.failures, self.hub.settings.backoff_max);
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
            () = self.shutdown.cancelled() => false,
        }
    }
}
