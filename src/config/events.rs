//! Watching calls end: the poll loops, replay for resuming watchers, and the caps on watchers,
//! release waiters and polled agents.
use std::time::Duration;

use clap::Args;

use crate::events::EventSettings;

/// Flags of the event hub and its watchers: polling, replay, buffers, heartbeats and caps.
#[derive(Debug, Clone, Args)]
pub(crate) struct EventFlags {
    /// Pause after an empty event-poll answer, in milliseconds (after an event the next poll
    /// goes out at once).
    #[arg(long, env = "CCGW_POLL_PAUSE_MS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub(crate) poll_pause_ms: u64,

    /// HTTP timeout of one event poll, in milliseconds; must outlast the gateway's long-poll
    /// wait (about 10 s).
    #[arg(long, env = "CCGW_POLL_TIMEOUT_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(11_000..=300_000))]
    pub(crate) poll_timeout_ms: u64,

    /// Longest pause between event polls after consecutive failures, in milliseconds.
    #[arg(long, env = "CCGW_POLL_BACKOFF_MAX_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(200..=60_000))]
    pub(crate) poll_backoff_max_ms: u64,

    /// How long an agent is still polled after its last watcher left, in seconds (a
    /// reconnecting watcher misses nothing; the gateway signs out agents after 2 min without a
    /// poll).
    #[arg(long, env = "CCGW_WATCH_GRACE_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(0..=3_600))]
    pub(crate) watch_grace_secs: u64,

    /// Release events kept per agent for resuming watchers.
    #[arg(long, env = "CCGW_REPLAY_EVENTS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub(crate) replay_events: u32,

    /// How long release events are kept for resuming watchers, in seconds.
    #[arg(long, env = "CCGW_REPLAY_AGE_SECS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub(crate) replay_age_secs: u64,

    /// How many events a watcher may fall behind before its stream is cut off
    /// (RESOURCE_EXHAUSTED, with a token to resume from).
    #[arg(long, env = "CCGW_WATCH_BUFFER_EVENTS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(crate) watch_buffer_events: u32,

    /// A WatchReleaseEvents stream that sent nothing for this long gets a heartbeat, in seconds.
    #[arg(long, env = "CCGW_HEARTBEAT_SECS", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub(crate) heartbeat_secs: u64,

    /// Agents one WatchReleaseEvents stream may watch.
    #[arg(long, env = "CCGW_MAX_WATCH_AGENTS", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) max_watch_agents: u32,

    /// Open WatchReleaseEvents streams in the process.
    #[arg(long, env = "CCGW_MAX_WATCHERS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(crate) max_watchers: u32,

    /// ReleaseCalls waiting for their release event in the process (wait_for_release_event);
    /// apart from --max-watchers, so that streams and releases cannot crowd each other out.
    #[arg(long, env = "CCGW_MAX_RELEASE_WAITERS", default_value_t = 1_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(crate) max_release_waiters: u32,

    /// Agents polled at once in the process: watched (by streams or by ReleaseCalls waiting for
    /// their release event), or in their grace period. Each polled agent holds one long-poll
    /// connection, one file descriptor, to the gateway: keep the process's open-file limit
    /// (RLIMIT_NOFILE, raised to its hard limit at startup) above this plus the gRPC
    /// connections. A stream that needs one more is refused (RESOURCE_EXHAUSTED).
    #[arg(long, env = "CCGW_MAX_POLLED_AGENTS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(crate) max_polled_agents: u32,

    /// A WatchReleaseEvents stream that could not send anything for this long (its client
    /// stopped reading) is cut off with a token to resume from and its watcher freed, in
    /// seconds.
    #[arg(long, env = "CCGW_STREAM_SEND_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub(crate) stream_send_timeout_secs: u64,
}

impl EventFlags {
    /// HTTP timeout of one event poll.
    pub(super) fn poll_timeout(&self) -> Duration {
        Duration::from_millis(self.poll_timeout_ms)
    }

    pub(super) fn settings(&self) -> EventSettings {
        EventSettings {
            poll_pause: Duration::from_millis(self.poll_pause_ms),
            poll_timeout: self.poll_timeout(),
            backoff_max: Duration::from_millis(self.poll_backoff_max_ms),
            grace: Duration::from_secs(self.watch_grace_secs),
            replay_events: self.replay_events as usize,
            replay_age: Duration::from_secs(self.replay_age_secs),
            watcher_buffer: self.watch_buffer_events as usize,
            heartbeat: Duration::from_secs(self.heartbeat_secs),
            max_watchers: self.max_watchers as usize,
            max_release_waiters: self.max_release_waiters as usize,
            max_polled_agents: self.max_polled_agents as usize,
        }
    }
}
