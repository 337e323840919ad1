//! The hard end of a client connection's life. tonic sends the GOAWAY at
//! `--max-connection-age` (`Server::max_connection_age`), after which the connection carries
//! only the calls it has; but tonic 0.14.9's own `max_connection_age_grace` replaces that
//! GOAWAY with a bare close at age + grace instead of adding the close after it. So the grace
//! is kept here, below HTTP/2: once the deadline passes, the connection's socket fails every
//! read and write, hyper ends the connection, and whatever still runs on it (a
//! WatchReleaseEvents stream, whose client resumes from its last resume_token) is cut off.
use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::{Stream, StreamExt};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::Sleep,
};
use tonic::transport::server::{Connected, TcpIncoming};

/// A connection that fails every read and write once its lifetime is over.
#[derive(Debug)]
pub(crate) struct AgedConnection<IO> {
    io: IO,
    end: Pin<Box<Sleep>>,
}

impl<IO> AgedConnection<IO> {
    pub(crate) fn new(io: IO, lifetime: Duration) -> Self {
        Self {
            io,
            end: Box::pin(tokio::time::sleep(lifetime)),
        }
    }

    /// Before a read: polling the timer also registers the connection's task for the end of
    /// its life, so an idle connection (hyper always has a read pending) is woken then.
    fn check_read(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.end.as_mut().poll(cx) {
            Poll::Ready(()) => Err(Self::over()),
            Poll::Pending => Ok(()),
        }
    }

    /// Before a write: the read side gets the wake-up, a look at the clock is enough here.
    fn check_write(&self) -> io::Result<()> {
        if self.end.is_elapsed() {
            return Err(Self::over());
        }
        Ok(())
    }

    fn over() -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "the connection outlived --max-connection-age-secs plus its grace",
        )
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for AgedConnection<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_read(cx)?;
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for AgedConnection<IO> {
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
impl<IO: Connected> Connected for AgedConnection<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// The listener's connections, each ended after `lifetime` (the age plus its grace).
pub(crate) fn aged_connections(
    listener: TcpListener,
    lifetime: Duration,
) -> impl Stream<Item = io::Result<AgedConnection<TcpStream>>> {
    // Without TCP_NODELAY small answers wait on delayed ACKs (40 ms stalls at p99).
    aged(
        TcpIncoming::from(listener).with_nodelay(Some(true)),
        lifetime,
    )
}

/// `incoming`'s connections, each ended after `lifetime`.
pub(crate) fn aged<IO>(
    incoming: impl Stream<Item = io::Result<IO>>,
    lifetime: Duration,
) -> impl Stream<Item = io::Result<AgedConnection<IO>>> {
    incoming.map(move |accepted| accepted.map(|io| AgedConnection::new(io, lifetime)))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn reads_and_writes_fail_once_the_lifetime_is_over() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut aged = AgedConnection::new(near, Duration::from_secs(10));
        far.write_all(b"hi").await.unwrap();
        let mut buf = [0; 2];
        aged.read_exact(&mut buf).await.unwrap();
        aged.write_all(b"ok").await.unwrap();
        // A read waiting for data ends at the deadline, with nothing else to wake it.
        let error = aged.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(aged.write_all(b"late").await.is_err());
    }
}
