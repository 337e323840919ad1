//! Prometheus metrics: one [`Registry`] built at startup, [`Metrics`] (the handles the hot paths
//! count with, resolved once so that a call allocates no label set), and scrape-time readings of
//! state the service already keeps (gauges of sizes, counters it already counts), which cost
//! nothing between scrapes.
//!
//! Agent ids are never labels (one series per agent would be unbounded), and no Guid, cookie or
//! token is ever a label or a value.
use std::{collections::HashMap, sync::Arc};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
        MetricType,
    },
    registry::{Registry, Unit},
};
use tonic::Code;

/// Latency buckets of RPCs and gateway requests, in seconds: Prometheus' default buckets with
/// finer ones below 5 ms (a ReleaseCall against a near gateway takes about a millisecond) and
/// 30 s (the longest gateway long poll).
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How a method streams, as go-grpc-prometheus' `grpc_type` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RpcType {
    Unary,
    ServerStream,
    BidiStream,
}

impl RpcType {
    fn label(self) -> &'static str {
        match self {
            Self::Unary => "unary",
            Self::ServerStream => "server_stream",
            Self::BidiStream => "bidi_stream",
        }
    }
}

/// The methods the server serves: (path, type, whether its log line is at debug level). Health
/// checks and reflection are counted like the rest, but probes every few seconds would flood
/// the log at info.
pub(crate) const SERVED_METHODS: &[(&str, RpcType, bool)] = &[
    (
        "/ccgw.callcontrol.v1.CallControl/ReleaseCall",
        RpcType::Unary,
        false,
    ),
    (
        "/ccgw.callcontrol.v1.CallControl/WatchReleaseEvents",
        RpcType::ServerStream,
        false,
    ),
    ("/grpc.health.v1.Health/Check", RpcType::Unary, true),
    ("/grpc.health.v1.Health/Watch", RpcType::ServerStream, true),
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        RpcType::BidiStream,
        true,
    ),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        RpcType::BidiStream,
        true,
    ),
];

/// Every path the server does not serve is counted under this method (UNIMPLEMENTED), so that
/// a client trying paths cannot grow the number of series.
const UNKNOWN: &str = "unknown";

type RpcLabels = [(&'static str, &'static str); 3];
type HandledLabels = [(&'static str, &'static str); 4];
/// Two labels: a gateway request's operation and outcome, a listener and a limit or reason.
type GatewayLabels = [(&'static str, &'static str); 2];
type TwoLabels = [(&'static str, &'static str); 2];
type OneLabel = [(&'static str, &'static str); 1];

/// One method's series, resolved once.
#[derive(Debug)]
pub(crate) struct MethodMetrics {
    /// `service/Method`, for the log line.
    pub(crate) name: &'static str,
    /// Its log line goes out at debug level.
    pub(crate) quiet: bool,
    pub(crate) started: Counter,
    /// gRPC messages received from clients (one per message of a stream).
    pub(crate) msg_received: Counter,
    /// gRPC messages sent to clients (one per message of a stream).
    pub(crate) msg_sent: Counter,
    /// Calls that ended with a reason, by reason.
    reasons: Family<ReasonLabels, Counter>,
    /// By code, indexed by the code's number.
    handled: [Counter; 17],
    pub(crate) seconds: Histogram,
}

impl MethodMetrics {
    pub(crate) fn handled(&self, code: Code) -> &Counter {
        &self.handled[code as usize]
    }

    /// Counts a call that ended with `reason`.
    pub(crate) fn ended_with(&self, reason: &str) {
        let (grpc_service, grpc_method) = split_path(self.name);
        let labels = ReasonLabels {
            grpc_service,
            grpc_method,
            reason: reason.to_owned(),
        };
        self.reasons.get_or_create(&labels).inc();
    }
}

/// The labels of `ccgw_rpc_reasons_total`. The reasons are the service's own (ErrorInfo reasons
/// and release outcomes, a fixed set), never a client's text.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    grpc_service: &'static str,
    grpc_method: &'static str,
    reason: String,
}

/// `service` and `Method` of `service/Method`.
fn split_path(name: &'static str) -> (&'static str, &'static str) {
    name.split_once('/').unwrap_or((UNKNOWN, UNKNOWN))
}

/// The gateway request kinds, the `operation` label of the gateway metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GatewayOperation {
    /// Release of the current call (`.../release`, or the legacy path).
    Release,
    /// Release of one call by its id (`.../dropcall/{callid}`).
    Dropcall,
    /// One event long poll.
    Poll,
    SignIn,
    ForceSignIn,
}

impl GatewayOperation {
    const ALL: [Self; 5] = [
        Self::Release,
        Self::Dropcall,
        Self::Poll,
        Self::SignIn,
        Self::ForceSignIn,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Release => "release",
            Self::Dropcall => "dropcall",
            Self::Poll => "poll",
            Self::SignIn => "sign_in",
            Self::ForceSignIn => "force_sign_in",
        }
    }
}

enum_with_all! {
    /// The ports that accept connections: the `listener` label of the connection metrics.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Listener {
        /// The gRPC port, plaintext or TLS.
        Grpc,
        /// `--health-listen`.
        Health,
        /// `--metrics-listen`.
        Metrics,
    }
}

impl Listener {
    fn label(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::Health => "health",
            Self::Metrics => "metrics",
        }
    }
}

enum_with_all! {
    /// The cap a new connection met, which closed it at once: the `limit` label.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum ConnectionLimit {
        Connections,
        ConnectionsPerAddress,
        Handshakes,
        HandshakesPerAddress,
    }
}

impl ConnectionLimit {
    fn label(self) -> &'static str {
        match self {
            Self::Connections => "max_connections",
            Self::ConnectionsPerAddress => "max_connections_per_address",
            Self::Handshakes => "max_handshakes",
            Self::HandshakesPerAddress => "max_handshakes_per_address",
        }
    }
}

enum_with_all! {
    /// Why the server closed a connection that carried no request at the time: the `reason`
    /// label of `ccgw_connections_closed`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum ConnectionClosed {
        /// No finished TLS handshake within the handshake timeout.
        TlsHandshakeTimeout,
        /// The TLS handshake failed (no or an untrusted client certificate, no common
        /// protocol, not TLS at all).
        TlsHandshakeFailed,
        /// No HTTP/2 connection preface within the handshake timeout.
        PrefaceTimeout,
        /// No complete HTTP/1 request head within the handshake timeout, first request or
        /// the next one on a kept-alive connection.
        RequestHeadTimeout,
    }
}

impl ConnectionClosed {
    fn label(self) -> &'static str {
        match self {
            Self::TlsHandshakeTimeout => "tls_handshake_timeout",
            Self::TlsHandshakeFailed => "tls_handshake_failed",
            Self::PrefaceTimeout => "preface_timeout",
            Self::RequestHeadTimeout => "request_head_timeout",
        }
    }
}

/// One listener's connection series, resolved once. Source addresses are never labels: an
/// attacker could grow the series without bound.
#[derive(Debug, Clone)]
pub(crate) struct ListenerMetrics {
    /// Connections open, handshaking ones included.
    pub(crate) open: Gauge,
    /// Connections not through their handshake (TLS, HTTP/2 preface) yet.
    pub(crate) handshakes: Gauge,
    refused: Vec<Counter>,
    closed: Vec<Counter>,
}

impl ListenerMetrics {
    pub(crate) fn refused(&self, limit: ConnectionLimit) -> &Counter {
        &self.refused[limit as usize]
    }

    pub(crate) fn closed(&self, why: ConnectionClosed) -> &Counter {
        &self.closed[why as usize]
    }
}

/// The counters of what WatchReleaseEvents streams sent and how they ended.
#[derive(Debug, Clone, Default)]
pub(crate) struct StreamMetrics {
    pub(crate) events_delivered: Counter,
    pub(crate) gaps_sent: Counter,
    pub(crate) cut_off_too_slow: Counter,
}

#[derive(Debug)]
struct Handles {
    methods: HashMap<&'static str, Arc<MethodMetrics>>,
    unknown_method: Arc<MethodMetrics>,
    gateway_requests: Family<GatewayLabels, Counter>,
    gateway_seconds: HashMap<&'static str, Histogram>,
    streams: StreamMetrics,
    listeners: Vec<ListenerMetrics>,
}

/// What the service counts with. Cheap to clone; every clone counts into the same series.
/// [`Metrics::default`] counts into series no registry exposes (unit tests, library users
/// without an endpoint).
#[derive(Debug, Clone)]
pub struct Metrics(Arc<Handles>);

impl Default for Metrics {
    fn default() -> Self {
        Self::new(&mut Registry::default())
    }
}

impl Metrics {
    /// Registers the service's metric families in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let started = Family::<RpcLabels, Counter>::default();
        let msg_received = Family::<RpcLabels, Counter>::default();
        let msg_sent = Family::<RpcLabels, Counter>::default();
        let handled = Family::<HandledLabels, Counter>::default();
        let seconds = latency_family::<RpcLabels>();
        let reasons = Family::<ReasonLabels, Counter>::default();
        let resolve = |path: &'static str, kind: RpcType, quiet: bool| {
            let name = path.trim_start_matches('/');
            let (service, method) = split_path(name);
            let labels = [
                ("grpc_service", service),
                ("grpc_method", method),
                ("grpc_type", kind.label()),
            ];
            let [s, m, t] = labels;
            Arc::new(MethodMetrics {
                name,
                quiet,
                started: started.get_or_create_owned(&labels),
                msg_received: msg_received.get_or_create_owned(&labels),
                msg_sent: msg_sent.get_or_create_owned(&labels),
                reasons: reasons.clone(),
                handled: std::array::from_fn(|code| {
                    let code = go_code_name(Code::from(code as i32));
                    handled.get_or_create_owned(&[s, m, t, ("grpc_code", code)])
                }),
                seconds: seconds.get_or_create_owned(&labels),
            })
        };
        let methods = SERVED_METHODS
            .iter()
            .map(|&(path, kind, quiet)| (path, resolve(path, kind, quiet)))
            .collect();
        let unknown_method = resolve("/unknown/unknown", RpcType::Unary, false);
        registry.register("grpc_server_started", "RPCs started on the server", started);
        registry.register(
            "grpc_server_msg_received",
            "gRPC messages received from clients (each message of a stream)",
            msg_received,
        );
        registry.register(
            "grpc_server_msg_sent",
            "gRPC messages sent to clients (each message of a stream)",
            msg_sent,
        );
        registry.register(
            "grpc_server_handled",
            "RPCs completed on the server, by gRPC code (a stream counts when it ends)",
            handled,
        );
        registry.register(
            "ccgw_rpc_reasons",
            "RPCs ended with a reason: a failure's ErrorInfo reason, or a ReleaseCall's outcome \
             (RELEASED ...)",
            reasons,
        );
        registry.register_with_unit(
            "grpc_server_handling",
            "Time from an RPC's start to its end (a stream's whole life)",
            Unit::Seconds,
            seconds,
        );

        let gateway_requests = Family::<GatewayLabels, Counter>::default();
        let gateway_latency = latency_family::<OneLabel>();
        let gateway_seconds = GatewayOperation::ALL
            .iter()
            .map(|op| {
                let histogram = gateway_latency.get_or_create_owned(&[("operation", op.label())]);
                (op.label(), histogram)
            })
            .collect();
        registry.register(
            "ccgw_gateway_requests",
            "Requests to the CC-Gateway by operation and outcome: the answer's retcode \
             (\"0\" success, a documented code, or \"other_retcode\"), or why there was none",
            gateway_requests.clone(),
        );
        registry.register_with_unit(
            "ccgw_gateway_request",
            "Time from sending a CC-Gateway request to its answer (or failure)",
            Unit::Seconds,
            gateway_latency,
        );

        let build_info = Family::<OneLabel, Gauge>::default();
        build_info
            .get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        registry.register(
            "ccgw_build_info",
            "Always 1; the version label says which build runs",
            build_info,
        );

        let streams = StreamMetrics::default();
        registry.register(
            "ccgw_events_delivered",
            "Release events handed to WatchReleaseEvents streams",
            streams.events_delivered.clone(),
        );
        registry.register(
            "ccgw_gaps_sent",
            "Gap items sent on WatchReleaseEvents streams (events a resuming watcher cannot get)",
            streams.gaps_sent.clone(),
        );
        registry.register(
            "ccgw_streams_cut_off_too_slow",
            "WatchReleaseEvents streams cut off because their client stopped reading \
             (WATCHER_TOO_SLOW)",
            streams.cut_off_too_slow.clone(),
        );
        let listeners = listener_metrics(registry);
        Self(Arc::new(Handles {
            methods,
            unknown_method,
            gateway_requests,
            gateway_seconds,
            streams,
            listeners,
        }))
    }

    /// The series of the method at `path` (the unknown method's for a path nobody serves).
    pub(crate) fn method(&self, path: &str) -> &Arc<MethodMetrics> {
        self.0.methods.get(path).unwrap_or(&self.0.unknown_method)
    }

    pub(crate) fn streams(&self) -> &StreamMetrics {
        &self.0.streams
    }

    /// The connection series of `listener`.
    pub(crate) fn listener(&self, listener: Listener) -> &ListenerMetrics {
        &self.0.listeners[listener as usize]
    }

    /// Counts one gateway request of `operation` that ended with `outcome` after `seconds`.
    pub(crate) fn gateway_request(
        &self,
        operation: GatewayOperation,
        outcome: &'static str,
        seconds: f64,
    ) {
        let operation = operation.label();
        self.0
            .gateway_requests
            .get_or_create(&[("operation", operation), ("outcome", outcome)])
            .inc();
        if let Some(histogram) = self.0.gateway_seconds.get(operation) {
            histogram.observe(seconds);
        }
    }
}

/// The connection metric families, with every series of every listener made at once (a
/// refusal never seen yet reads 0 rather than missing), in [`Listener::ALL`]'s order.
fn listener_metrics(registry: &mut Registry) -> Vec<ListenerMetrics> {
    let open = Family::<OneLabel, Gauge>::default();
    let handshakes = Family::<OneLabel, Gauge>::default();
    let refused = Family::<TwoLabels, Counter>::default();
    let closed = Family::<TwoLabels, Counter>::default();
    let listeners = Listener::ALL
        .iter()
        .map(|listener| {
            let name = ("listener", listener.label());
            ListenerMetrics {
                open: open.get_or_create_owned(&[name]),
                handshakes: handshakes.get_or_create_owned(&[name]),
                refused: ConnectionLimit::ALL
                    .iter()
                    .map(|limit| refused.get_or_create_owned(&[name, ("limit", limit.label())]))
                    .collect(),
                closed: ConnectionClosed::ALL
                    .iter()
                    .map(|why| closed.get_or_create_owned(&[name, ("reason", why.label())]))
                    .collect(),
            }
        })
        .collect();
    registry.register(
        "ccgw_connections_open",
        "Client connections open, those still in their handshake included",
        open,
    );
    registry.register(
        "ccgw_connection_handshakes",
        "Client connections still in their handshake (TLS handshake, HTTP/2 connection preface)",
        handshakes,
    );
    registry.register(
        "ccgw_connections_refused",
        "New connections closed at once because a connection cap was reached (limit: the flag)",
        refused,
    );
    registry.register(
        "ccgw_connections_closed",
        "Connections the server closed while they carried no request: a handshake or request \
         head that did not come in time, or a failed TLS handshake",
        closed,
    );
    listeners
}

fn latency_family<L>() -> Family<L, Histogram, fn() -> Histogram>
where
    L: Clone + std::hash::Hash + Eq,
{
    Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS))
}

/// A code's name as go-grpc-prometheus writes it (Go's `codes.Code.String()`), which Grafana's
/// gRPC dashboards filter on.
pub(crate) fn go_code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Values read at scrape time: one unlabelled value, or one value per value of a label.
enum Read {
    One(Box<dyn Fn() -> i64 + Send + Sync>),
    ByLabel {
        key: &'static str,
        read: Box<dyn Fn() -> Vec<(String, i64)> + Send + Sync>,
    },
}

struct Reading {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    read: Read,
}

/// Metrics read from the service's state when Prometheus scrapes: gauges of sizes, and counters
/// the service already keeps for itself (an `AtomicU64` it bumps). Nothing is counted twice and
/// nothing costs anything between scrapes. A counter's `name` goes without `_total`, which the
/// encoder adds.
#[derive(Default)]
pub struct ScrapeTimeMetrics(Vec<Reading>);

impl std::fmt::Debug for ScrapeTimeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.0.iter().map(|r| r.name).collect();
        f.debug_tuple("ScrapeTimeMetrics").field(&names).finish()
    }
}

impl ScrapeTimeMetrics {
    /// A gauge whose value `read` returns at each scrape.
    pub fn gauge(
        &mut self,
        name: &'static str,
        help: &'static str,
        read: impl Fn() -> i64 + Send + Sync + 'static,
    ) -> &mut Self {
        self.push(name, help, MetricType::Gauge, Read::One(Box::new(read)))
    }

    /// A counter whose running total `read` returns at each scrape.
    pub fn counter(
        &mut self,
        name: &'static str,
        help: &'static str,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> &mut Self {
        let read = move || saturating_i64(read());
        self.push(name, help, MetricType::Counter, Read::One(Box::new(read)))
    }

    /// A gauge with one series per value of the label `key` (a bounded set: caller names from
    /// the callers file, say; never agent ids), as `read` lists them at each scrape.
    pub fn gauge_by(
        &mut self,
        name: &'static str,
        help: &'static str,
        key: &'static str,
        read: impl Fn() -> Vec<(String, i64)> + Send + Sync + 'static,
    ) -> &mut Self {
        let read = Box::new(read);
        self.push(name, help, MetricType::Gauge, Read::ByLabel { key, read })
    }

    /// A counter with one series per value of the label `key` (a bounded set), as `read` lists
    /// their running totals at each scrape.
    pub fn counter_by(
        &mut self,
        name: &'static str,
        help: &'static str,
        key: &'static str,
        read: impl Fn() -> Vec<(String, u64)> + Send + Sync + 'static,
    ) -> &mut Self {
        let read = Box::new(move || {
            read()
                .into_iter()
                .map(|(label, n)| (label, saturating_i64(n)))
                .collect()
        });
        self.push(name, help, MetricType::Counter, Read::ByLabel { key, read })
    }

    fn push(
        &mut self,
        name: &'static str,
        help: &'static str,
        kind: MetricType,
        read: Read,
    ) -> &mut Self {
        self.0.push(Reading {
            name,
            help,
            kind,
            read,
        });
        self
    }

    /// Adds these readings to `registry`, which reads them at each scrape.
    pub fn register(self, registry: &mut Registry) {
        registry.register_collector(Box::new(self));
    }
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Collector for ScrapeTimeMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for reading in &self.0 {
            let mut metric =
                encoder.encode_descriptor(reading.name, reading.help, None, reading.kind)?;
            match &reading.read {
                Read::One(read) => encode_value(reading.kind, read(), metric)?,
                Read::ByLabel { key, read } => {
                    for (label, value) in read() {
                        let labels = [(*key, label.as_str())];
                        let series = metric.encode_family(&labels)?;
                        encode_value(reading.kind, value, series)?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn encode_value(
    kind: MetricType,
    value: i64,
    encoder: prometheus_client::encoding::MetricEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    match kind {
        MetricType::Counter => ConstCounter::new(u64::try_from(value).unwrap_or(0)).encode(encoder),
        _ => ConstGauge::new(value).encode(encoder),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, registry).unwrap();
        text
    }

    #[test]
    fn scrape_time_readings_are_read_at_each_scrape() {
        let value = Arc::new(std::sync::atomic::AtomicU64::new(1));
        let mut readings = ScrapeTimeMetrics::default();
        readings
            .counter("ccgw_things", "Things", {
                let value = value.clone();
                move || value.load(std::sync::atomic::Ordering::Relaxed)
            })
            .gauge_by("ccgw_streams_by_caller", "Streams", "caller", || {
                vec![("billing".into(), 2), ("crm".into(), 0)]
            });
        let mut registry = Registry::default();
        readings.register(&mut registry);
        let first = encoded(&registry);
        assert!(first.contains("ccgw_things_total 1\n"), "{first}");
        assert!(
            first.contains("ccgw_streams_by_caller{caller=\"billing\"} 2\n"),
            "{first}"
        );
        assert!(
            first.contains("ccgw_streams_by_caller{caller=\"crm\"} 0\n"),
            "{first}"
        );
        value.store(5, std::sync::atomic::Ordering::Relaxed);
        assert!(encoded(&registry).contains("ccgw_things_total 5\n"));
    }

    #[test]
    fn gateway_outcomes_and_build_info_are_labelled_as_documented() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        metrics.gateway_request(GatewayOperation::Release, "0", 0.002);
        let text = encoded(&registry);
        assert!(
            text.contains("ccgw_gateway_requests_total{operation=\"release\",outcome=\"0\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("ccgw_gateway_request_seconds_count{operation=\"release\"} 1\n"));
        assert!(text.contains(&format!(
            "ccgw_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )));
    }
}
