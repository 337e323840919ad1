//! ccgw-callcontrol: a gRPC facade over Huawei CC-Gateway's agent REST interface.
//!
//! Rooms that know gRPC: `api` (the CallControl service: handlers, request validation, caller
//! authentication, the failure -> Status table), `server` (composition: the tonic server,
//! reflection, TLS on the gRPC port, the drain), `health` (what each name of the gRPC health
//! service reports), `telemetry` (logs, metrics, traces; its `rpc` layer counts and logs every
//! call by its gRPC status). Rooms that know nothing of gRPC: `gateway` (REST transport, wire
//! types, TLS, the request cap, reachability), `sessions` (which session a request goes out
//! with, handovers), `release` (hang-up policy), `events` (poll loops, feeds, watchers, replay
//! and resume), `callers` (who may call, and what for), `shared_state` (the one seam for what
//! replicas share, handing each room its part), `nats` (replication: the NATS JetStream
//! implementations of what replicas share). Around them: `lifecycle` (shutdown and tasks),
//! `config`, `startup` (builds the `app` from the configuration), `app` (the built service the
//! server runs).
//! The CC-Gateway simulator is a crate of its own, `ccgw-sim`, which `startup` embeds
//! for `--simulate` when the `simulator` feature (on by default) is.

/// Declares a fieldless enum together with `ALL`, its variants in declaration order. A list
/// written by hand can miss a variant without anything failing; this one cannot, so tables
/// built from it (the failure table in docs/api.md) and lookups over it cover every variant.
macro_rules! enum_with_all {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $($(#[$variant_meta:meta])* $variant:ident,)*
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $($(#[$variant_meta])* $variant,)*
        }

        impl $name {
            /// Every variant, in declaration order.
            $vis const ALL: &'static [Self] = &[$(Self::$variant,)*];
        }
    };
}

pub mod api;
pub mod app;
pub mod callers;
pub mod config;
mod connections;
pub mod domain;
pub mod events;
pub mod gateway;
pub mod health;
pub(crate) mod lifecycle;
pub mod nats;
pub(crate) mod release;
pub(crate) mod reload;
pub mod server;
pub mod sessions;
pub mod shared_state;
mod shares;
pub mod startup;
pub mod telemetry;

pub mod proto {
    #![allow(clippy::all)]
    tonic::include_proto!("ccgw.callcontrol.v1");
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("callcontrol_descriptor");
    /// `google/rpc/error_details.proto` (with `google/protobuf/duration.proto`, which it
    /// imports): the types of the status details every failure carries. Served by reflection so
    /// that grpcurl can print ErrorInfo, RetryInfo, BadRequest and RequestInfo instead of
    /// their raw bytes.
    pub const ERROR_DETAILS_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("error_details_descriptor");

    /// The keys of `ErrorInfo.metadata`: clients read them, so they are part of the interface.
    pub mod metadata_key {
        /// The gateway's retcode.
        pub const RETCODE: &str = "retcode";
        /// The gateway's message, or what went wrong on the way to it.
        pub const MESSAGE: &str = "message";
        /// The agent of the request, or of the session that ended.
        pub const AGENT_ID: &str = "agent_id";
        /// The HTTP status the gateway or its load balancer answered instead of an envelope.
        pub const HTTP_STATUS: &str = "http_status";
        /// `"true"` when a release of the current call may have happened.
        pub const MAY_HAVE_RELEASED: &str = "may_have_released";
        /// The reason of the failure behind RELEASE_OUTCOME_UNKNOWN.
        pub const CAUSE: &str = "cause";
        /// Where a stream that ended can resume.
        pub const RESUME_TOKEN: &str = "resume_token";
        /// The agents of a stream the failure is about (those without a session, or those that
        /// would need a poll loop beyond --max-polled-agents), comma-separated.
        pub const AGENT_IDS: &str = "agent_ids";
        /// The verb a caller is not granted (`release`, `watch`, `handover`).
        pub const VERB: &str = "verb";
        /// The agent a caller is not granted.
        pub const DENIED_AGENT_ID: &str = "denied_agent_id";
        /// How many agents `agent_ids` leaves out (present only when it leaves some out).
        pub const UNLISTED_AGENT_IDS: &str = "unlisted_agent_ids";
        /// How many field violations BadRequest leaves out (present only when it leaves some out).
        pub const UNLISTED_VIOLATIONS: &str = "unlisted_violations";
        /// The flag of the per-caller limit a caller is at.
        pub const CALLER_LIMIT: &str = "caller_limit";
    }
}

/// Installs ring as the process-wide rustls crypto provider. rustls is built without a provider
/// of its own so that one process never mixes two; every client constructor calls this, so a
/// library user cannot hit rustls' "no process-level CryptoProvider" panic. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Locks a mutex of plain data. Poisoning only means another thread panicked mid-update; the
/// data is still usable, and refusing it would turn one panic into many.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The pause before retry number `attempt` (1, 2, ...): `first * 2^(attempt-1)`, at most
/// `ceiling`, then anywhere between half of that and all of it, so that many callers backing
/// off from one failing gateway do not come back in step.
pub(crate) fn jittered_backoff(
    first: std::time::Duration,
    attempt: u32,
    ceiling: std::time::Duration,
) -> std::time::Duration {
    use rand::Rng;
    let doublings = attempt.saturating_sub(1).min(16);
    let full = first.saturating_mul(1 << doublings).min(ceiling);
    full / 2 + full.mul_f64(rand::rng().random_range(0.0..=0.5))
}

/// Resolves on Ctrl-C or SIGTERM (what Kubernetes sends before killing a pod).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeMap, BTreeSet},
        path::Path,
        time::Duration,
    };

    #[test]
    fn backoff_doubles_up_to_its_ceiling_with_jitter() {
        let first = Duration::from_millis(100);
        let ceiling = Duration::from_secs(10);
        for attempt in 1..40 {
            let pause = super::jittered_backoff(first, attempt, ceiling);
            let full = (first * 2u32.pow((attempt - 1).min(16))).min(ceiling);
            assert!(pause >= full / 2 && pause <= full, "{attempt}: {pause:?}");
        }
    }

    /// The rooms this code (not its comments or unit tests) names: `crate::room` anywhere, and
    /// each top-level item of `use crate::{...}`.
    fn rooms_named(code: &str) -> BTreeSet<String> {
        let code = code
            .split("#[cfg(test)]\nmod tests")
            .next()
            .unwrap_or_default();
        let code: String = code
            .lines()
            .filter(|line| !line.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let word = |text: &str| -> String {
            text.trim_start()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        };
        let mut named = BTreeSet::new();
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let mut depth = 0;
                let mut item_start = true;
                for (i, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => item_start = true,
                        c if item_start && !c.is_whitespace() => {
                            named.insert(word(&group[i..]));
                            item_start = false;
                        }
                        _ => {}
                    }
                }
            } else {
                named.insert(word(rest));
            }
        }
        named
    }

    /// The rooms (the top-level modules of src/) point one way: no room reaches itself through
    /// the rooms it uses, so each can be read, tested and changed from the bottom up.
    #[test]
    fn the_rooms_have_no_cycles() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut uses: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut files = vec![src.clone()];
        while let Some(path) = files.pop() {
            if path.is_dir() {
                files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
                continue;
            }
            let relative = path.strip_prefix(&src).unwrap();
            let first = relative.components().next().unwrap().as_os_str();
            let room = first.to_str().unwrap().trim_end_matches(".rs").to_owned();
            if room == "lib" || room == "bin" || path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let named = rooms_named(&std::fs::read_to_string(&path).unwrap());
            let entry = uses.entry(room.clone()).or_default();
            entry.extend(named.into_iter().filter(|r| *r != room && r != "self"));
        }
        assert!(
            uses["api"].contains("release"),
            "the reader sees uses: {uses:?}"
        );
        for (room, used) in &uses {
            // Every room reachable from `room`'s uses; `room` must not be among them.
            let mut reached = BTreeSet::new();
            let mut next: Vec<&String> = used.iter().collect();
            while let Some(other) = next.pop() {
                if reached.insert(other.clone()) {
                    next.extend(uses.get(other).into_iter().flatten());
                }
            }
            assert!(
                !reached.contains(room),
                "the room {room} reaches itself through {used:?}: {uses:?}"
            );
        }
    }

    #[test]
    fn the_room_reader_sees_uses_in_groups_and_paths_but_not_in_comments() {
        let code = "use crate::{a::{B, C}, d, e::F};\nfn f() { crate::g::h(); }\n// crate::x\n\
                    #[cfg(test)]\nmod tests { use crate::y; }";
        let named: Vec<String> = rooms_named(code).into_iter().collect();
        assert_eq!(named, ["a", "d", "e", "g"]);
    }
}
