//! Who may hold a connection to the service's ports, and for how long, so that nobody can lock
//! callers out before authenticating.
//!
//! Each listener accepts first and decides after: a connection over one of its caps (open
//! connections, and connections still in their handshake, per source address and in total) is
//! reset at once, so nothing waits in the listen backlog behind silent sockets. An admitted
//! connection must be through its handshake (the TLS handshake, then the HTTP/2 connection
//! preface) within the handshake timeout or it is closed; from then on HTTP/2 keepalive finds
//! dead peers, and the end of its life ends it.
//!
//! The end of life: tonic sends the GOAWAY at `--max-connection-age` (`Server::
//! max_connection_age`), after which the connection carries only the calls it has; but tonic
//! 0.14.9's own `max_connection_age_grace` replaces that GOAWAY with a bare close at age +
//! grace instead of adding the close after it. So the grace is kept here, below HTTP/2: once
//! the deadline passes, the connection's socket fails every read and write, hyper ends the
//! connection, and whatever still runs on it (a WatchReleaseEvents stream, whose client resumes
//! from its last resume_token) is cut off. The handshake deadline works the same way.
use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use futures_util::{Stream, StreamExt};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::{Instant, Sleep},
};
use tonic::transport::server::Connected;

use crate::{
    lock,
    telemetry::{ConnectionClosed, ConnectionLimit, ListenerMetrics},
};

/// What an HTTP/2 client sends first: the 24-byte magic and a SETTINGS frame (9 bytes at
/// least), in one write in every client.
const HTTP2_PREFACE_LEN: usize = 24 + 9;

/// The caps and the handshake timeout of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnectionLimits {
    /// Connections open at once, handshaking ones included.
    pub(crate) max_open: usize,
    pub(crate) max_open_per_address: usize,
    /// Connections not through their handshake yet.
    pub(crate) max_handshakes: usize,
    pub(crate) max_handshakes_per_address: usize,
    /// From accept to the end of the handshake.
    pub(crate) handshake_timeout: Duration,
}

/// Connections the health port, and the metrics port, hold at most.
pub(crate) const SIDE_PORT_CONNECTIONS: usize = 256;

impl ConnectionLimits {
    /// The health and metrics ports: a few clients (the kubelet, Prometheus), each with a
    /// connection or two, from a few addresses. A per-address cap well below the total keeps
    /// one pod that opens sockets there from taking the kubelet's place.
    pub(crate) fn side_port(handshake_timeout: Duration) -> Self {
        Self {
            max_open: SIDE_PORT_CONNECTIONS,
            max_open_per_address: 16,
            max_handshakes: 256,
            max_handshakes_per_address: 16,
            handshake_timeout,
        }
    }

    /// The cap `counts` (everybody's) and `here` (the new connection's address) are at.
    fn reached(&self, counts: &Counts, here: AddressCounts) -> Option<ConnectionLimit> {
        if counts.open >= self.max_open {
            Some(ConnectionLimit::Connections)
        } else if here.open >= self.max_open_per_address {
            Some(ConnectionLimit::ConnectionsPerAddress)
        } else if counts.handshakes >= self.max_handshakes {
            Some(ConnectionLimit::Handshakes)
        } else if here.handshakes >= self.max_handshakes_per_address {
            Some(ConnectionLimit::HandshakesPerAddress)
        } else {
            None
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    open: usize,
    handshakes: usize,
    /// Only addresses with a connection open: at most `max_open` entries.
    by_address: HashMap<IpAddr, AddressCounts>,
}

#[derive(Debug, Default, Clone, Copy)]
struct AddressCounts {
    open: usize,
    handshakes: usize,
}

/// One listener's connection counts against its caps. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Admission(Arc<AdmissionState>);

#[derive(Debug)]
struct AdmissionState {
    limits: ConnectionLimits,
    metrics: ListenerMetrics,
    counts: Mutex<Counts>,
}

impl Admission {
    pub(crate) fn new(limits: ConnectionLimits, metrics: ListenerMetrics) -> Self {
        Self(Arc::new(AdmissionState {
            limits,
            metrics,
            counts: Mutex::default(),
        }))
    }

    /// A connection from `address`, if every cap leaves room for it (else it is counted as
    /// refused).
    fn admit(&self, address: IpAddr) -> Option<Admitted> {
        // An IPv4 client on a dual-stack socket is the same client as over IPv4.
        let address = address.to_canonical();
        let state = &self.0;
        {
            let mut counts = lock(&state.counts);
            let here = counts.by_address.get(&address).copied().unwrap_or_default();
            if let Some(limit) = state.limits.reached(&counts, here) {
                drop(counts);
                state.metrics.refused(limit).inc();
                return None;
            }
            counts.open += 1;
            counts.handshakes += 1;
            let here = counts.by_address.entry(address).or_default();
            here.open += 1;
            here.handshakes += 1;
        }
        state.metrics.open.inc();
        state.metrics.handshakes.inc();
        let slot = |kind| Slot {
            admission: self.clone(),
            address,
            kind,
        };
        Some(Admitted {
            open: slot(SlotKind::Open),
            handshake: slot(SlotKind::Handshake),
            accepted: Instant::now(),
        })
    }

    fn release(&self, address: IpAddr, kind: SlotKind) {
        let state = &self.0;
        {
            let mut counts = lock(&state.counts);
            let Some(here) = counts.by_address.get_mut(&address) else {
                return;
            };
            match kind {
                SlotKind::Open => here.open -= 1,
                SlotKind::Handshake => here.handshakes -= 1,
            }
            if here.open == 0 && here.handshakes == 0 {
                counts.by_address.remove(&address);
            }
            match kind {
                SlotKind::Open => counts.open -= 1,
                SlotKind::Handshake => counts.handshakes -= 1,
            }
        }
        match kind {
            SlotKind::Open => state.metrics.open.dec(),
            SlotKind::Handshake => state.metrics.handshakes.dec(),
        };
    }
}

#[derive(Debug, Clone, Copy)]
enum SlotKind {
    Open,
    Handshake,
}

/// A place under a listener's caps, given back when dropped.
#[derive(Debug)]
struct Slot {
    admission: Admission,
    address: IpAddr,
    kind: SlotKind,
}

impl Slot {
    fn metrics(&self) -> &ListenerMetrics {
        &self.admission.0.metrics
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admission.release(self.address, self.kind);
    }
}

/// An admitted connection's places under the caps, and when it was accepted.
#[derive(Debug)]
pub(crate) struct Admitted {
    open: Slot,
    handshake: Slot,
    accepted: Instant,
}

impl Admitted {
    /// When its handshake must be over.
    pub(crate) fn deadline(&self) -> Instant {
        self.accepted + self.open.admission.0.limits.handshake_timeout
    }

    /// The connection is closed before its handshake ended, for `why`.
    pub(crate) fn closed(self, why: ConnectionClosed) {
        self.open.metrics().closed(why).inc();
    }
}

/// Accepts on `listener` for as long as the stream is polled, and yields the connections
/// `admission` admits; the others are reset at once. Dropping the stream closes the listener.
pub(crate) fn accept(
    listener: TcpListener,
    admission: Admission,
) -> impl Stream<Item = (TcpStream, SocketAddr, Admitted)> + Send {
    futures_util::stream::unfold((listener, admission), |(listener, admission)| async move {
        loop {
            match listener.accept().await {
                Ok((tcp, remote)) => match admission.admit(remote.ip()) {
                    Some(admitted) => {
                        // Without TCP_NODELAY small answers wait on delayed ACKs (40 ms
                        // stalls at p99).
                        let _ = tcp.set_nodelay(true);
                        return Some(((tcp, remote, admitted), (listener, admission)));
                    }
                    // A reset rather than a close: no TIME_WAIT left behind here, and the
                    // client learns at once.
                    None => {
                        let _ = tcp.set_zero_linger();
                    }
                },
                Err(error) => {
                    // E.g. out of file descriptors: pause so that the loop does not spin.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

/// The admitted plaintext HTTP/2 connections of `listener` (the gRPC and health ports), each
/// ended `lifetime` after it was accepted.
pub(crate) fn http2(
    listener: TcpListener,
    admission: Admission,
    lifetime: Duration,
) -> impl Stream<Item = io::Result<LimitedConnection<TcpStream>>> + Send {
    accept(listener, admission)
        .map(move |(tcp, _, admitted)| Ok(LimitedConnection::http2(tcp, admitted, lifetime)))
}

/// A connection under its listener's caps, its handshake deadline and the end of its life: it
/// fails every read once one of them is past (and every write past the end of its life).
#[derive(Debug)]
pub(crate) struct LimitedConnection<IO> {
    io: IO,
    _open: Slot,
    /// Until the client's HTTP/2 connection preface has been read.
    handshake: Option<Handshake>,
    /// The handshake deadline while in the handshake, then the end of life, if any.
    timer: Option<Pin<Box<Sleep>>>,
    end_of_life: Option<Instant>,
}

#[derive(Debug)]
struct Handshake {
    /// Given back when the handshake is over.
    slot: Slot,
    /// Preface bytes not read yet.
    preface_left: usize,
}

impl<IO> LimitedConnection<IO> {
    /// An HTTP/2 connection (TLS handshaken or not): in its handshake until the client's
    /// connection preface has been read, which must be by the admission's deadline; ended
    /// `lifetime` after it was accepted.
    pub(crate) fn http2(io: IO, admitted: Admitted, lifetime: Duration) -> Self {
        let deadline = admitted.deadline();
        Self {
            io,
            _open: admitted.open,
            handshake: Some(Handshake {
                slot: admitted.handshake,
                preface_left: HTTP2_PREFACE_LEN,
            }),
            timer: Some(Box::pin(tokio::time::sleep_until(deadline))),
            end_of_life: Some(admitted.accepted + lifetime),
        }
    }

    /// A connection whose protocol keeps its own time (HTTP/1 under hyper's header read
    /// timeout): through its handshake at once, no end of life.
    pub(crate) fn timed_by_protocol(io: IO, admitted: Admitted) -> Self {
        Self {
            io,
            _open: admitted.open,
            handshake: None,
            timer: None,
            end_of_life: None,
        }
    }

    /// Before a read: polling the timer also registers the connection's task for the
    /// deadline, so an idle connection (hyper always has a read pending) is woken then.
    fn check_read(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Some(timer) = &mut self.timer else {
            return Ok(());
        };
        if timer.as_mut().poll(cx).is_pending() {
            return Ok(());
        }
        match self.handshake.take() {
            Some(handshake) => {
                let metrics = handshake.slot.metrics();
                metrics.closed(ConnectionClosed::PrefaceTimeout).inc();
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 connection preface within --handshake-timeout-ms",
                ))
            }
            None => Err(Self::over()),
        }
    }

    /// After a read of `read` bytes: the handshake is over once the preface is in.
    fn count_read(&mut self, read: usize) {
        let Some(handshake) = &mut self.handshake else {
            return;
        };
        handshake.preface_left = handshake.preface_left.saturating_sub(read);
        if handshake.preface_left > 0 {
            return;
        }
        self.handshake = None;
        match (self.end_of_life, &mut self.timer) {
            (Some(end), Some(timer)) => timer.as_mut().reset(end),
            _ => self.timer = None,
        }
    }

    /// Before a write: the read side gets the wake-up, a look at the clock is enough here.
    fn check_write(&self) -> io::Result<()> {
        match self.end_of_life {
            Some(end) if Instant::now() >= end => Err(Self::over()),
            _ => Ok(()),
        }
    }

    fn over() -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "the connection outlived --max-connection-age-secs plus its grace",
        )
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for LimitedConnection<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_read(cx)?;
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = read {
            this.count_read(buf.filled().len() - before);
        }
        read
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for LimitedConnection<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_write()?;
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_write()?;
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Keeps what tonic tells handlers about the peer (`Request::remote_addr`, TLS info) as it was.
impl<IO: Connected> Connected for LimitedConnection<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::telemetry::{Listener, Metrics};

    const PREFACE: &[u8; HTTP2_PREFACE_LEN] =
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

    fn admission(limits: ConnectionLimits) -> (Admission, ListenerMetrics) {
        let metrics = Metrics::new(&mut Registry::default());
        let listener = metrics.listener(Listener::Grpc).clone();
        (Admission::new(limits, listener.clone()), listener)
    }

    fn limits(open: usize, open_here: usize, handshakes: usize, here: usize) -> ConnectionLimits {
        ConnectionLimits {
            max_open: open,
            max_open_per_address: open_here,
            max_handshakes: handshakes,
            max_handshakes_per_address: here,
            handshake_timeout: Duration::from_secs(5),
        }
    }

    fn refused(metrics: &ListenerMetrics) -> Vec<u64> {
        ConnectionLimit::ALL
            .iter()
            .map(|&limit| metrics.refused(limit).get())
            .collect()
    }

    #[tokio::test]
    async fn each_cap_refuses_the_connection_beyond_it_and_frees_its_place_when_dropped() {
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "::ffff:10.0.0.1".parse().unwrap(),
        );
        let (admission, metrics) = admission(limits(5, 3, 3, 2));
        let first = admission.admit(a).unwrap();
        let second = admission.admit(c).expect("room for a second from a");
        // The mapped address is a's: a has 2 handshakes in progress.
        assert!(admission.admit(a).is_none());
        assert_eq!(refused(&metrics), [0, 0, 0, 1]);
        let _third = admission.admit(b).unwrap();
        assert!(admission.admit("10.0.0.3".parse().unwrap()).is_none());
        assert_eq!(refused(&metrics), [0, 0, 1, 1]);
        assert_eq!((metrics.open.get(), metrics.handshakes.get()), (3, 3));
        // Through its handshake, a connection keeps its connection place only.
        let (first, first_handshake) = (first.open, first.handshake);
        drop(first_handshake);
        assert_eq!((metrics.open.get(), metrics.handshakes.get()), (3, 2));
        let fourth = admission.admit(a).unwrap();
        assert!(admission.admit(a).is_none(), "a holds 3 connections");
        assert_eq!(refused(&metrics), [0, 1, 1, 1]);
        let (fourth, fourth_handshake) = (fourth.open, fourth.handshake);
        drop(fourth_handshake);
        let _fifth = admission.admit("10.0.0.3".parse().unwrap()).unwrap();
        assert!(admission.admit("10.0.0.4".parse().unwrap()).is_none());
        assert_eq!(refused(&metrics), [1, 1, 1, 1]);
        drop((first, second, fourth));
        assert_eq!((metrics.open.get(), metrics.handshakes.get()), (2, 2));
        assert!(!lock(&admission.0.counts).by_address.contains_key(&a));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_its_preface_fails_at_the_handshake_deadline() {
        let (admission, metrics) = admission(limits(8, 8, 8, 8));
        let (near, mut far) = tokio::io::duplex(64);
        let admitted = admission.admit("10.0.0.1".parse().unwrap()).unwrap();
        let mut connection = LimitedConnection::http2(near, admitted, Duration::from_secs(60));
        // Part of the preface does not make the handshake over.
        far.write_all(&PREFACE[..20]).await.unwrap();
        let mut buf = [0; 64];
        assert_eq!(connection.read(&mut buf).await.unwrap(), 20);
        let error = connection.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(metrics.closed(ConnectionClosed::PrefaceTimeout).get(), 1);
        drop(connection);
        assert_eq!((metrics.open.get(), metrics.handshakes.get()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn after_its_preface_a_connection_lives_until_its_end_of_life() {
        let (admission, metrics) = admission(limits(8, 8, 8, 8));
        let (near, mut far) = tokio::io::duplex(64);
        let start = Instant::now();
        let admitted = admission.admit("10.0.0.1".parse().unwrap()).unwrap();
        let mut connection = LimitedConnection::http2(near, admitted, Duration::from_secs(60));
        far.write_all(PREFACE).await.unwrap();
        let mut buf = [0; HTTP2_PREFACE_LEN];
        connection.read_exact(&mut buf).await.unwrap();
        assert_eq!((metrics.open.get(), metrics.handshakes.get()), (1, 0));
        tokio::time::sleep(Duration::from_secs(30)).await;
        far.write_all(b"hi").await.unwrap();
        assert_eq!(connection.read(&mut buf).await.unwrap(), 2);
        connection.write_all(b"ok").await.unwrap();
        // A read waiting for data ends at the end of life, with nothing else to wake it.
        let error = connection.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(Instant::now() >= start + Duration::from_secs(60));
        assert!(connection.write_all(b"late").await.is_err());
        assert_eq!(metrics.closed(ConnectionClosed::PrefaceTimeout).get(), 0);
    }
}
