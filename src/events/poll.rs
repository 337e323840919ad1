//! One agent's long-poll loop: the only reader of the agent's gateway events in the process,
//! and, across replicas, the only one polling while its replica owns the agent (the others'
//! loops wait for the ownership to change).
use std::{
    future::Future,
    sync::atomic::{AtomicU64, Ordering},
    sync::Arc,
    time::Duration,
};

use futures_util::future::BoxFuture;
use tokio::{sync::watch, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    feeds::{Feed, Step},
    hub::Room,
    EventStats, PollPermit, SessionEnding, SHUTDOWN_POLL_GRACE,
};
use crate::{
    gateway::{
        event::parse_event, Answer, GatewayError, Guid, Retcode, SessionOperation,
        POLLS_PER_CONNECTION,
    },
    jittered_backoff,
};

/// The first failed poll pauses 200 to 400 ms; the ceiling doubles up to
/// `EventSettings::backoff_max`.
const BACKOFF_FIRST: Duration = Duration::from_millis(400);

/// The room's poll loops, and what they counted.
#[derive(Debug, Default)]
pub(super) struct PollLoops {
    /// The poll loops alone: on shutdown watchers wait for their last polls' answers.
    tracker: TaskTracker,
    /// Polls that failed (transport, HTTP, unexpected retcode) and were retried after a pause.
    failures: AtomicU64,
    /// Polls sent and not answered yet.
    in_flight: AtomicU64,
}

impl PollLoops {
    /// Poll loops running.
    pub fn running(&self) -> usize {
        self.tracker.len()
    }

    /// Event polls sent and not answered yet.
    pub fn polls_in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed) as usize
    }

    /// Puts the counts into `stats`.
    pub fn report(&self, stats: &mut EventStats) {
        stats.poll_failures = self.failures.load(Ordering::Relaxed);
    }

    /// Resolves once the loops have ended, after shutdown closed the tracker.
    pub fn ended(&self) -> impl Future<Output = ()> + Send + 'static {
        let tracker = self.tracker.clone();
        async move { tracker.wait().await }
    }

    /// Once shutdown began: waits (bounded) until the loops' last polls were answered and
    /// their events delivered. No feed, and so no loop, starts once shutdown began: closing
    /// the tracker lets the wait end. With replicas a poll may run longer (until the gateway
    /// answers it); what it brings reaches the watchers' resumed streams through the shared
    /// log.
    pub async fn last_polls_answered(&self) {
        self.tracker.close();
        let _ = tokio::time::timeout(SHUTDOWN_POLL_GRACE * 2, self.tracker.wait()).await;
    }
}

pub(super) struct PollLoop {
    room: Arc<Room>,
    feed: Arc<Feed>,
    shutdown: CancellationToken,
    /// Consecutive failed polls.
    failures: u32,
    /// What the ownership was last told: this replica's clients watch the agent.
    watched: bool,
    /// Changes when the agent's ownership may have.
    ownership: watch::Receiver<u64>,
    /// A record handed to a shared log, to be stored before the next poll: the gateway already
    /// removed the event from its queue, and appending in poll order keeps the agent's order.
    appending: Option<BoxFuture<'static, ()>>,
    /// Whether a poll went out with a session since the loop started or last ended the
    /// agent's session. Until one has, a missing session is one on its way, not one that ended.
    session_seen: bool,
    /// Until when a loop that has not seen a session waits for one (set when it first finds
    /// none).
    session_awaited_until: Option<Instant>,
    /// Polls sent since the loop last asked for a new connection.
    polls_on_connection: u32,
}

impl PollLoop {
    /// Starts `feed`'s poll loop, tracked among the room's poll loops and by the lifecycle.
    pub fn start(room: &Arc<Room>, feed: Arc<Feed>) {
        let poll_loop = Self::new(room.clone(), feed).run();
        room.tasks
            .spawn(room.poll_loops.tracker.track_future(poll_loop));
    }

    fn new(room: Arc<Room>, feed: Arc<Feed>) -> Self {
        let shutdown = room.shutdown.clone();
        let ownership = room.ownership.changes();
        Self {
            room,
            feed,
            shutdown,
            failures: 0,
            watched: false,
            ownership,
            appending: None,
            session_seen: false,
            session_awaited_until: None,
            polls_on_connection: 0,
        }
    }

    async fn run(mut self) {
        let agent = self.feed.agent;
        tracing::info!(%agent, "poll loop started");
        loop {
            let step = self.room.next_step(&self.feed);
            let (watched, ends) = self.feed.interest(&self.room.settings, Instant::now());
            self.tell_watched(watched && step != Step::Retire);
            let keep_going = match step {
                Step::Poll => self.poll_if_owned(ends).await,
                Step::Wait(until) => self.wait(until).await,
                Step::Retire => false,
            };
            if !keep_going {
                break;
            }
        }
        self.tell_watched(false);
        tracing::info!(%agent, "poll loop ended");
    }

    /// Tells the ownership when this replica's clients start or stop watching the agent.
    fn tell_watched(&mut self, watched: bool) {
        if watched != self.watched {
            self.watched = watched;
            self.room.ownership.set_watched(self.feed.agent, watched);
        }
    }

    /// Polls once if this replica owns the agent's polling; otherwise waits until that may
    /// have changed, a watcher comes or goes, or `ends` (a grace period running out). False
    /// when the facade shuts down.
    async fn poll_if_owned(&mut self, ends: Option<Instant>) -> bool {
        if let Some(until) = self.session_on_its_way() {
            return self.wait_for_session(until, ends).await;
        }
        // Marked seen before asking, so a change in between wakes the wait below.
        self.ownership.borrow_and_update();
        if let Some(permit) = self.room.ownership.poll_permit(self.feed.agent) {
            return self.poll_once(permit).await;
        }
        let ownership_changed = async {
            if self.ownership.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = ownership_changed => true,
            () = self.feed.changed.notified() => true,
            () = sleep_until(ends) => true,
            () = self.shutdown.cancelled() => false,
        }
    }

    /// While the loop has not seen a session and the agent has none: until when to wait for
    /// it. With replicas the owner's loop may start for another replica's watcher before that
    /// watcher's handed-over session reaches it through the shared sessions; telling every
    /// watcher the session ended would be wrong. Bounded by one poll timeout: a session that
    /// has not come by then is not coming, and the watchers are told.
    fn session_on_its_way(&mut self) -> Option<Instant> {
        if self.session_seen || self.current_guid().is_some() {
            return None;
        }
        let now = Instant::now();
        let until = *self
            .session_awaited_until
            .get_or_insert(now + self.room.settings.poll_timeout);
        (now < until).then_some(until)
    }

    /// Waits until the agent's session arrives, `until`, a watcher comes or goes, or `ends`.
    /// False when the facade shuts down.
    async fn wait_for_session(&mut self, until: Instant, ends: Option<Instant>) -> bool {
        let agent = self.feed.agent;
        tracing::debug!(%agent, "no session for the agent yet; waiting for one");
        tokio::select! {
            () = self.room.sessions.registry().arrival(agent) => true,
            () = tokio::time::sleep_until(until) => true,
            () = self.feed.changed.notified() => true,
            () = sleep_until(ends) => true,
            () = self.shutdown.cancelled() => false,
        }
    }

    /// One poll (holding `permit` until its answer is handled) and the pause after it. False
    /// when the facade shuts down.
    async fn poll_once(&mut self, permit: PollPermit) -> bool {
        let agent = self.feed.agent;
        let deadline = Instant::now() + self.room.settings.poll_timeout;
        let in_flight = InFlight::count(&self.room.poll_loops.in_flight);
        self.polls_on_connection += 1;
        let retire_connection = self.polls_on_connection >= POLLS_PER_CONNECTION;
        if retire_connection {
            self.polls_on_connection = 0;
        }
        let operation = SessionOperation::PollEvents { retire_connection };
        let (result, stopping) = {
            let poll = self
                .room
                .sessions
                .send(agent, &operation, deadline, None, None);
            tokio::pin!(poll);
            let answered = tokio::select! {
                result = &mut poll => Some(result),
                () = self.shutdown.cancelled() => None,
            };
            match answered {
                Some(result) => (result, false),
                // Dropping a poll in flight can lose the event the gateway just dequeued for
                // it, and with replicas leaves the gateway holding it while another replica
                // polls the agent: the ownership says how long it may still run.
                None => {
                    match tokio::time::timeout(self.room.ownership.shutdown_poll_grace(), &mut poll)
                        .await
                    {
                        Ok(result) => (result, true),
                        Err(_) => return false,
                    }
                }
            }
        };
        drop(in_flight);
        let pause = self.handle(result);
        // Stored before the permit goes: a new owner's first event must come after this one.
        if let Some(appending) = self.appending.take() {
            appending.await;
        }
        drop(permit);
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
        if !matches!(result, Err(GatewayError::NoSession(_))) {
            self.session_seen = true;
            self.session_awaited_until = None;
        }
        match result {
            Ok((answer, _)) if answer.is_ok() => {
                self.failures = 0;
                self.feed.set_failing(false);
                match answer.event {
                    Some(event) => {
                        self.appending = self.room.observe(&self.feed, parse_event(agent, &event));
                        // More may be queued: ask again at once.
                        Duration::ZERO
                    }
                    None => self.room.settings.poll_pause,
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
            // Gone between the check and the poll: waited for (bounded) like a missing one.
            Err(GatewayError::NoSession(_)) if self.session_on_its_way().is_some() => {
                Duration::ZERO
            }
            Err(GatewayError::NoSession(_)) => {
                tracing::info!(%agent, "the agent's session was dropped; its watchers are told");
                self.end_session(SessionEnding::Forgotten);
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
        self.end_session(SessionEnding::Refused {
            retcode: answer.retcode,
            message: answer.message,
        });
        Duration::ZERO
    }

    /// Tells the watchers the agent's session ended; polling waits for a watcher with a new
    /// one, which the loop waits for as for a first.
    fn end_session(&mut self, ending: SessionEnding) {
        self.appending = self.room.end_session(&self.feed, ending);
        self.session_seen = false;
        self.session_awaited_until = None;
    }

    fn current_guid(&self) -> Option<Guid> {
        self.room
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
        self.room
            .poll_loops
            .failures
            .fetch_add(1, Ordering::Relaxed);
        let pause = jittered_backoff(BACKOFF_FIRST, self.failures, self.room.settings.backoff_max);
        tracing::warn!(agent = %self.feed.agent, failures = self.failures, ?pause, "poll failed: {what}");
        pause
    }

    /// Sleeps until a watcher comes or goes, or `until`. False when the facade shuts down.
    async fn wait(&mut self, until: Option<Instant>) -> bool {
        tokio::select! {
            () = self.feed.changed.notified() => true,
            () = sleep_until(until) => true,
            () = self.shutdown.cancelled() => false,
        }
    }
}

/// Counts one poll in flight while it lives (a poll dropped at shutdown is uncounted too).
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn count(polls: &'a AtomicU64) -> Self {
        polls.fetch_add(1, Ordering::Relaxed);
        Self(polls)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Sleeps until `at`; forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        sync::{
            atomic::{AtomicBool, Ordering},
            Arc, Mutex,
        },
        time::Duration,
    };

    use tokio::sync::watch;

    use crate::{
        domain::AgentId,
        events::{
            ownership::{PollOwnership, PollPermit, RemoteInterest},
            testing::{agent, hub_owning, sign_in},
            EventHub, EventSettings, KindFilter,
        },
        lock,
    };

    /// Ownership a test grants and withdraws.
    #[derive(Debug)]
    struct Granted {
        owned: AtomicBool,
        changes: watch::Sender<u64>,
        interest: watch::Sender<RemoteInterest>,
        watched: Mutex<HashMap<AgentId, i32>>,
    }

    impl Granted {
        fn new() -> Arc<Self> {
            Arc::new(Self {
                owned: AtomicBool::new(false),
                changes: watch::Sender::new(0),
                interest: watch::Sender::new(RemoteInterest::default()),
                watched: Mutex::new(HashMap::new()),
            })
        }

        fn grant(&self) {
            self.owned.store(true, Ordering::SeqCst);
            self.changes.send_modify(|n| *n += 1);
        }

        fn watched(&self, agent: AgentId) -> i32 {
            lock(&self.watched).get(&agent).copied().unwrap_or(0)
        }
    }

    impl PollOwnership for Granted {
        fn poll_permit(&self, _agent: AgentId) -> Option<PollPermit> {
            self.owned.load(Ordering::SeqCst).then(PollPermit::free)
        }

        fn changes(&self) -> watch::Receiver<u64> {
            self.changes.subscribe()
        }

        fn set_watched(&self, agent: AgentId, watched: bool) {
            *lock(&self.watched).entry(agent).or_default() += if watched { 1 } else { -1 };
        }

        fn remote_interest(&self) -> watch::Receiver<RemoteInterest> {
            self.interest.subscribe()
        }
    }

    async fn until(what: &str, condition: impl Fn() -> bool) {
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            while !condition() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "timed out waiting until {what}");
    }

    fn poll_failures(hub: &EventHub) -> u64 {
        hub.stats().poll_failures
    }

    /// A replica that does not own a watched agent tells that its clients watch it and sends
    /// no poll (its gateway is unreachable here: a poll would count a failure) until it owns
    /// the agent; once the watcher left and the grace period passed, it tells it stopped.
    #[tokio::test]
    async fn a_loop_polls_only_while_its_replica_owns_the_agent() {
        let ownership = Granted::new();
        let hub = hub_owning(
            EventSettings {
                grace: Duration::from_millis(200),
                ..EventSettings::default()
            },
            ownership.clone(),
        );
        sign_in(&hub, agent(0));
        let watcher = hub
            .subscribe(&[agent(0)], None, KindFilter::default(), None)
            .unwrap();
        until("the interest is told", || ownership.watched(agent(0)) == 1).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(poll_failures(&hub), 0, "no poll without the ownership");

        ownership.grant();
        until("a poll was sent", || poll_failures(&hub) >= 1).await;
        drop(watcher);
        until("the interest ended", || ownership.watched(agent(0)) == 0).await;
        until("the loop ended", || hub.poll_loops_running() == 0).await;
    }

    fn session_lost(hub: &EventHub, agent: AgentId) -> bool {
        let feed = hub.room.feeds.lock().get(agent).expect("a feed");
        feed.session_lost()
    }

    /// The owner polls for another replica's watcher whose handed-over session has not reached
    /// it yet: its loop waits for the session instead of ending the agent's session for every
    /// watcher, and polls once it arrives. (The wait is a minute here, so that a loaded machine
    /// cannot end it before the session comes.)
    #[tokio::test]
    async fn a_loop_without_a_session_yet_waits_for_one() {
        let ownership = Granted::new();
        ownership.grant();
        let hub = hub_owning(
            EventSettings {
                poll_timeout: Duration::from_secs(60),
                ..EventSettings::default()
            },
            ownership.clone(),
        );
        ownership
            .interest
            .send_replace(Arc::new([agent(0), agent(1)].into()));
        until("both are polled for the other replica", || {
            hub.agents_to_poll() == [agent(0), agent(1)]
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!session_lost(&hub, agent(0)) && !session_lost(&hub, agent(1)));
        assert_eq!(poll_failures(&hub), 0, "nothing to poll with yet");

        sign_in(&hub, agent(0));
        until("a poll was sent with the session", || {
            poll_failures(&hub) >= 1
        })
        .await;
        assert!(!session_lost(&hub, agent(0)) && !session_lost(&hub, agent(1)));
    }

    /// A session that does not come within a poll timeout is not coming: the watchers are told.
    #[tokio::test]
    async fn a_session_that_does_not_come_within_a_poll_timeout_ends_the_wait() {
        let ownership = Granted::new();
        ownership.grant();
        let hub = hub_owning(
            EventSettings {
                poll_timeout: Duration::from_millis(500),
                ..EventSettings::default()
            },
            ownership.clone(),
        );
        ownership.interest.send_replace(Arc::new([agent(1)].into()));
        until("it is polled for the other replica", || {
            hub.agents_to_poll() == [agent(1)]
        })
        .await;
        until("agent 1's session never came", || {
            session_lost(&hub, agent(1))
        })
        .await;
        assert_eq!(
            poll_failures(&hub),
            0,
            "nothing was polled without a session"
        );
    }

    /// Agents only other replicas watch are polled here (counted among the polled agents,
    /// refused beyond the limit), and stop being polled a grace period after that interest
    /// ended; they are not reported as watched here.
    #[tokio::test]
    async fn agents_other_replicas_watch_are_polled_for_them_within_the_limit() {
        let ownership = Granted::new();
        ownership.grant();
        let hub = hub_owning(
            EventSettings {
                grace: Duration::from_millis(200),
                max_polled_agents: 2,
                ..EventSettings::default()
            },
            ownership.clone(),
        );
        for n in 0..3 {
            sign_in(&hub, agent(n));
        }
        let _local = hub
            .subscribe(&[agent(0)], None, KindFilter::default(), None)
            .unwrap();
        ownership
            .interest
            .send_replace(Arc::new([agent(1), agent(2)].into()));
        until("the remote agent is polled", || {
            hub.agents_to_poll() == [agent(0), agent(1)]
        })
        .await;
        assert_eq!(hub.polled_agents_in_use(), 2, "agent 2 did not fit");
        assert_eq!(ownership.watched(agent(1)), 0, "not watched here");

        ownership.interest.send_replace(Arc::new([agent(2)].into()));
        until("agent 1 stopped and agent 2 took its place", || {
            hub.agents_to_poll() == [agent(0), agent(2)]
        })
        .await;
        ownership.interest.send_replace(RemoteInterest::default());
        until("only the local agent is polled", || {
            hub.agents_to_poll() == [agent(0)] && hub.polled_agents_in_use() == 1
        })
        .await;
    }
}
