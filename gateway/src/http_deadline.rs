//! A deadline for a new HTTP connection's first bytes. hyper closes an HTTP/1 connection whose
//! request headers take longer than `http.header_read_timeout_ms` once it is reading them, but
//! before that the server first reads a few bytes to tell HTTP/1 from HTTP/2, with no deadline:
//! a client that connects (or completes a TLS handshake) and then sends nothing held its
//! connection, and a descriptor, forever, and so did one that sent the first bytes of the
//! HTTP/2 preface and stopped (the sniffing waits for as long as the bytes match it).
//! [`FirstBytesDeadline`] wraps the accepted stream so that its reads fail (`TimedOut`) unless,
//! within the same timeout, the protocol is known: a byte that is not the preface's (HTTP/1,
//! whose header deadline hyper then enforces) or the whole preface (HTTP/2: from there hyper's
//! HTTP/2 server has no deadline of its own, a known gap). After that it is transparent, so
//! requests, responses and upgraded WebSockets are untouched.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum_server::accept::Accept;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// An acceptor that wraps what `inner` accepts in a [`Deadline`] (`None`: no deadline).
#[derive(Clone, Debug)]
pub struct FirstBytesDeadline<A> {
    inner: A,
    timeout: Option<Duration>,
}

impl<A> FirstBytesDeadline<A> {
    pub fn new(inner: A, timeout: Option<Duration>) -> Self {
        Self { inner, timeout }
    }
}

impl<A, I, S> Accept<I, S> for FirstBytesDeadline<A>
where
    A: Accept<I, S>,
    A::Future: Send + 'static,
    A::Stream: Send + 'static,
    A::Service: Send + 'static,
{
    type Stream = Deadline<A::Stream>;
    type Service = A::Service;
    type Future = Pin<Box<dyn Future<Output = io::Result<(Self::Stream, Self::Service)>> + Send>>;

    fn accept(&self, stream: I, service: S) -> Self::Future {
        let accepted = self.inner.accept(stream, service);
        let timeout = self.timeout;
        Box::pin(async move {
            let (stream, service) = accepted.await?;
            Ok((Deadline::new(stream, timeout), service))
        })
    }
}

/// What an HTTP/2 connection starts with (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A stream whose reads fail with `TimedOut` if, by the deadline, the bytes read so far are
/// still nothing or a strict prefix of the HTTP/2 preface; once they are not, it only passes
/// reads and writes through.
pub struct Deadline<S> {
    inner: S,
    /// Until the protocol is known.
    sleep: Option<Pin<Box<Sleep>>>,
    /// Bytes read so far, all of them the preface's first bytes.
    matched: usize,
}

impl<S> Deadline<S> {
    pub fn new(inner: S, timeout: Option<Duration>) -> Self {
        Self { inner, sleep: timeout.map(|t| Box::pin(tokio::time::sleep(t))), matched: 0 }
    }

    /// `new` bytes arrived: is the protocol known now?
    fn decided(&mut self, new: &[u8]) -> bool {
        let rest = &H2_PREFACE[self.matched..];
        let n = new.len().min(rest.len());
        if new[..n] != rest[..n] {
            return true; // not HTTP/2
        }
        self.matched += n;
        self.matched == H2_PREFACE.len()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Deadline<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.sleep.is_some() && buf.filled().len() > before && this.decided(&buf.filled()[before..]) {
                    this.sleep = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let expired = this.sleep.as_mut().is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready());
                if expired {
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "no request arrived in time")))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Deadline<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_fail_only_while_nothing_has_arrived_by_the_deadline() {
        // Nothing arrives: the read fails at the deadline, not before.
        let (a, _b) = tokio::io::duplex(64);
        let mut d = Deadline::new(a, Some(Duration::from_millis(100)));
        let t0 = std::time::Instant::now();
        let err = d.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(t0.elapsed() >= Duration::from_millis(90), "{:?}", t0.elapsed());

        // A byte arrives in time: from then on no deadline, however long the next read waits.
        let (a, mut b) = tokio::io::duplex(64);
        let mut d = Deadline::new(a, Some(Duration::from_millis(100)));
        b.write_all(b"G").await.unwrap();
        assert_eq!(d.read(&mut [0u8; 8]).await.unwrap(), 1);
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            b.write_all(b"ET").await.unwrap();
            b
        });
        let mut buf = [0u8; 8];
        assert_eq!(d.read(&mut buf).await.unwrap(), 2, "read after 300 ms, past the first deadline");
        assert_eq!(&buf[..2], b"ET");
        d.write_all(b"ok").await.unwrap();
        let mut b = late.await.unwrap();
        let mut back = [0u8; 2];
        b.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ok", "writes pass through");

        // The first bytes of the HTTP/2 preface, then nothing: the deadline still holds.
        let (a, mut b) = tokio::io::duplex(64);
        let mut d = Deadline::new(a, Some(Duration::from_millis(150)));
        b.write_all(b"PRI * HT").await.unwrap();
        assert_eq!(d.read(&mut [0u8; 64]).await.unwrap(), 8);
        let err = d.read(&mut [0u8; 64]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "a partial preface decides nothing");
        // The whole preface (in pieces): HTTP/2, no deadline after it.
        let (a, mut b) = tokio::io::duplex(64);
        let mut d = Deadline::new(a, Some(Duration::from_millis(150)));
        b.write_all(&H2_PREFACE[..5]).await.unwrap();
        assert_eq!(d.read(&mut [0u8; 64]).await.unwrap(), 5);
        b.write_all(&H2_PREFACE[5..]).await.unwrap();
        assert_eq!(d.read(&mut [0u8; 64]).await.unwrap(), H2_PREFACE.len() - 5);
        assert!(d.sleep.is_none(), "the preface is complete");
        // "P" then something else: HTTP/1 ("POST"), no deadline after it.
        let (a, mut b) = tokio::io::duplex(64);
        let mut d = Deadline::new(a, Some(Duration::from_millis(150)));
        b.write_all(b"P").await.unwrap();
        assert_eq!(d.read(&mut [0u8; 64]).await.unwrap(), 1);
        assert!(d.sleep.is_some(), "P alone could be either");
        b.write_all(b"OST").await.unwrap();
        assert_eq!(d.read(&mut [0u8; 64]).await.unwrap(), 3);
        assert!(d.sleep.is_none(), "not the preface: HTTP/1");

        // No deadline configured: never fails.
        let (a, _b) = tokio::io::duplex(64);
        let mut d = Deadline::new(a, None);
        assert!(tokio::time::timeout(Duration::from_millis(200), d.read(&mut [0u8; 8])).await.is_err());
    }
}
