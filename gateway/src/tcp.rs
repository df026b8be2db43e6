//! ICE-TCP (RFC 6544): passive TCP host candidates on `media.tcp_port`, for clients whose UDP
//! is blocked and who have no TURN server.
//!
//! One listener serves every media worker. Each accepted stream carries RFC 4571 frames (a
//! 2-byte big-endian length, then one STUN/DTLS/SRTP packet). The listener (a tokio task, off
//! the media workers) reads the stream's first frame, which must be a STUN Binding request;
//! the USERNAME's first half is our ICE ufrag, which names the connection, and the
//! [`UfragDirectory`] names the worker that owns it. The stream and that frame are handed to
//! the worker through its command channel (never blocking either side); from then on the
//! worker owns the stream ([`Link`]): it reads frames into the connection's `Rtc` and writes the
//! `Rtc`'s TCP transmits back, framed. A stream carries one connection only.
//!
//! Bounds: a frame is at most [`MAX_FRAME`] bytes; a stream has [`FIRST_FRAME_TIMEOUT`] to
//! send its first frame; at most [`MAX_PENDING`] streams wait for theirs ([`MAX_PENDING_PER_IP`]
//! from one address); a connection holds at most [`MAX_LINKS_PER_CONNECTION`] streams; each
//! stream buffers at most [`SEND_BUFFER_LIMIT`] bytes toward a slow client (frames beyond that
//! are dropped whole, as a full UDP socket buffer would drop datagrams). A stream that breaks a bound or sends what is not STUN, DTLS
//! or RTP (RFC 7983) is closed and counted in `/metrics` (as is a stream its client closes
//! before its first frame, which browsers do with spare streams); the call it named is
//! unaffected.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use str0m::ice::StunMessage;
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;

use crate::metrics::MediaMetrics;
use crate::worker::{Command, WorkerHandle};

/// Largest frame taken: the largest datagram a worker reads on UDP. WebRTC packets stay well
/// below (~1200 bytes); RFC 4571 would allow 65535.
pub const MAX_FRAME: usize = 2048;
/// A new stream must deliver its first frame within this.
pub const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(5);
/// Streams waiting for their first frame at once; more are closed at once (`overload`).
pub const MAX_PENDING: usize = 256;
/// Of those, from one IP address (so one host holding streams open cannot lock everyone out;
/// a whole office behind one NAT still opens its calls' streams a few at a time).
pub const MAX_PENDING_PER_IP: usize = 16;
/// Streams one connection may hold (a browser opens one per TCP candidate it can reach).
pub const MAX_LINKS_PER_CONNECTION: usize = 4;
/// Bytes queued toward one client before frames are dropped.
pub const SEND_BUFFER_LIMIT: usize = 256 * 1024;

/// Our ICE ufrag → the index of the worker that owns the connection. Workers keep it current
/// from their engines' `take_ufrag_changes`.
pub type UfragDirectory = dashmap::DashMap<String, usize>;

/// Why a stream ended before it carried a call: the `reason` label of
/// `gateway_ice_tcp_streams_dropped_total`, except `Closed` (the client's doing, which browsers
/// do routinely with spare streams): `gateway_ice_tcp_streams_total{result="abandoned"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not a STUN Binding request with a USERNAME first, or a later frame that is not STUN,
    /// DTLS or RTP/RTCP.
    Garbage,
    /// A frame longer than [`MAX_FRAME`] (or empty).
    Oversized,
    /// The first frame names no connection of ours (or one that has ended).
    UnknownUfrag,
    /// No complete first frame within [`FIRST_FRAME_TIMEOUT`].
    Timeout,
    /// The client closed (or reset) the stream before its first frame.
    Closed,
    /// [`MAX_PENDING`] streams (or [`MAX_PENDING_PER_IP`] from its address) were already
    /// waiting for their first frame.
    Overload,
    /// The connection already holds [`MAX_LINKS_PER_CONNECTION`] streams.
    Limit,
}

impl DropReason {
    /// The reasons the gateway drops a stream for (every one but `Closed`).
    pub const DROPS: [DropReason; 6] = [
        DropReason::Garbage,
        DropReason::Oversized,
        DropReason::UnknownUfrag,
        DropReason::Timeout,
        DropReason::Overload,
        DropReason::Limit,
    ];

    /// Count a stream that ended for this reason.
    pub fn count(self, metrics: &MediaMetrics) {
        match self {
            DropReason::Closed => metrics.ice_tcp_streams.with_label_values(&["abandoned"]).inc(),
            reason => metrics.ice_tcp_dropped.with_label_values(&[reason.as_str()]).inc(),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Garbage => "garbage",
            DropReason::Oversized => "oversized",
            DropReason::UnknownUfrag => "unknown_ufrag",
            DropReason::Timeout => "timeout",
            DropReason::Closed => "closed",
            DropReason::Overload => "overload",
            DropReason::Limit => "limit",
        }
    }
}

/// RFC 7983 demultiplexing by first byte: STUN (0-3), DTLS (20-63), RTP/RTCP (128-191).
/// Anything else has no business on an ICE-TCP stream.
pub fn is_webrtc_packet(frame: &[u8]) -> bool {
    matches!(frame.first(), Some(0..=3 | 20..=63 | 128..=191))
}

/// Our ufrag from a stream's first frame, which must be a STUN Binding request whose USERNAME
/// is `ours:theirs`.
pub fn first_frame_ufrag(frame: &[u8]) -> Result<String, DropReason> {
    if !matches!(frame.first(), Some(0..=3)) {
        return Err(DropReason::Garbage);
    }
    let message = StunMessage::parse(frame).map_err(|_| DropReason::Garbage)?;
    if !message.is_binding_request() {
        return Err(DropReason::Garbage);
    }
    let (ours, _) = message.split_username().ok_or(DropReason::Garbage)?;
    Ok(ours.to_owned())
}

/// RFC 4571 frames out of a byte stream: bytes go in as they are read, whole frames come out.
/// Holds at most one partial frame (≤ 2 + [`MAX_FRAME`] bytes).
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    /// Where the next frame starts in `buf`.
    pos: usize,
}

impl FrameReader {
    pub fn push(&mut self, data: &[u8]) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed, or `Oversized` for a
    /// length of 0 or above [`MAX_FRAME`] (the stream cannot be resynchronised after it).
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, DropReason> {
        let rest = &self.buf[self.pos..];
        if rest.len() < 2 {
            return Ok(None);
        }
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        if len == 0 || len > MAX_FRAME {
            return Err(DropReason::Oversized);
        }
        if rest.len() < 2 + len {
            return Ok(None);
        }
        let start = self.pos + 2;
        self.pos = start + len;
        Ok(Some(&self.buf[start..start + len]))
    }

    /// Bytes held (a partial frame).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }
}

/// Frames waiting to be written to one stream, bounded by [`SEND_BUFFER_LIMIT`].
#[derive(Debug, Default)]
pub struct SendBuffer {
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    sent: usize,
}

impl SendBuffer {
    /// Queue one frame; false (and nothing queued) when it would exceed the limit or is too
    /// long for a frame.
    pub fn push(&mut self, frame: &[u8]) -> bool {
        if frame.len() > usize::from(u16::MAX) || self.len() + 2 + frame.len() > SEND_BUFFER_LIMIT {
            return false;
        }
        if self.sent > 0 && self.sent == self.buf.len() {
            self.buf.clear();
            self.sent = 0;
        }
        self.buf.extend_from_slice(&(frame.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(frame);
        true
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.buf.len() - self.sent
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Write as much as the stream takes now. `Ok` also when it would block (the rest waits for
    /// the next writable event); `Err` when the stream is broken.
    pub fn write_to(&mut self, mut w: impl Write) -> io::Result<()> {
        while self.sent < self.buf.len() {
            match w.write(&self.buf[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.sent == self.buf.len() {
            self.buf.clear();
            self.sent = 0;
        } else if self.sent > SEND_BUFFER_LIMIT / 2 {
            self.buf.drain(..self.sent);
            self.sent = 0;
        }
        Ok(())
    }
}

/// An ICE-TCP stream a worker owns, bound to one of its connections.
pub struct Link {
    pub stream: mio::net::TcpStream,
    pub key: gateway_core::ConnKey,
    /// The client's end: the source of its frames and the destination str0m sends to.
    pub peer: SocketAddr,
    /// Our TCP candidate the stream belongs to.
    pub local: SocketAddr,
    pub frames: FrameReader,
    pub out: SendBuffer,
}

/// Accept ICE-TCP streams on `listener` until the task is aborted: read each one's first
/// frame (bounded in time, size and number of streams waiting) and hand the stream to the
/// worker that owns the connection its STUN USERNAME names.
pub fn spawn_listener(
    listener: std::net::TcpListener,
    ufrags: Arc<UfragDirectory>,
    workers: Vec<WorkerHandle>,
    metrics: MediaMetrics,
) -> io::Result<tokio::task::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let pending = Arc::new(Semaphore::new(MAX_PENDING));
    let per_ip = Arc::new(PendingPerIp::default());
    let workers = Arc::new(workers);
    Ok(tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "ICE-TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            metrics.ice_tcp_streams.with_label_values(&["accepted"]).inc();
            let Ok(permit) = Arc::clone(&pending).try_acquire_owned() else {
                DropReason::Overload.count(&metrics);
                continue;
            };
            let Some(ip_permit) = PendingPerIp::enter(&per_ip, peer.ip().to_canonical()) else {
                DropReason::Overload.count(&metrics);
                continue;
            };
            let (ufrags, workers, metrics) = (Arc::clone(&ufrags), Arc::clone(&workers), metrics.clone());
            tokio::spawn(async move {
                let handed = hand_over(stream, peer, &ufrags, &workers).await;
                drop((permit, ip_permit));
                if let Err(reason) = handed {
                    reason.count(&metrics);
                }
            });
        }
    }))
}

/// Streams waiting for their first frame, per client IP address.
#[derive(Default)]
struct PendingPerIp(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One stream's place in [`PendingPerIp`], given back when dropped.
struct IpPermit(Arc<PendingPerIp>, std::net::IpAddr);

impl PendingPerIp {
    fn enter(this: &Arc<Self>, ip: std::net::IpAddr) -> Option<IpPermit> {
        let mut map = this.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= MAX_PENDING_PER_IP {
            return None;
        }
        *n += 1;
        Some(IpPermit(Arc::clone(this), ip))
    }
}

impl Drop for IpPermit {
    fn drop(&mut self) {
        let mut map = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

/// Read a new stream's first frame and give the stream to the worker owning its connection.
async fn hand_over(
    mut stream: tokio::net::TcpStream,
    peer: SocketAddr,
    ufrags: &UfragDirectory,
    workers: &[WorkerHandle],
) -> Result<(), DropReason> {
    let first = match tokio::time::timeout(FIRST_FRAME_TIMEOUT, read_first_frame(&mut stream)).await {
        Ok(r) => r?,
        Err(_) => return Err(DropReason::Timeout),
    };
    let ufrag = first_frame_ufrag(&first)?;
    let worker = ufrags.get(&ufrag).map(|w| *w).ok_or(DropReason::UnknownUfrag)?;
    let handle = workers.get(worker).ok_or(DropReason::UnknownUfrag)?;
    let _ = stream.set_nodelay(true);
    // Still non-blocking; nothing of the stream is buffered in user space (no BufReader), so
    // what follows the first frame is read by the worker.
    let stream = stream.into_std().map_err(|_| DropReason::Closed)?;
    if !handle.send(Command::TcpStream { stream, peer, first }) {
        return Err(DropReason::UnknownUfrag);
    }
    Ok(())
}

async fn read_first_frame(stream: &mut tokio::net::TcpStream) -> Result<Vec<u8>, DropReason> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.map_err(|_| DropReason::Closed)?;
    let len = usize::from(u16::from_be_bytes(len));
    if len == 0 || len > MAX_FRAME {
        return Err(DropReason::Oversized);
    }
    let mut frame = vec![0u8; len];
    stream.read_exact(&mut frame).await.map_err(|_| DropReason::Closed)?;
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(frames: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for f in frames {
            v.extend_from_slice(&(f.len() as u16).to_be_bytes());
            v.extend_from_slice(f);
        }
        v
    }

    #[test]
    fn frames_come_out_whole_however_the_bytes_are_split() {
        let a = vec![1u8; 100];
        let b = vec![2u8; MAX_FRAME];
        let c = vec![3u8; 1];
        let bytes = framed(&[&a, &b, &c]);
        for chunk in [1, 2, 3, 7, 101, 4096] {
            let mut r = FrameReader::default();
            let mut got = Vec::new();
            for piece in bytes.chunks(chunk) {
                r.push(piece);
                while let Some(f) = r.next_frame().unwrap() {
                    got.push(f.to_vec());
                }
                assert!(r.buffered() <= 2 + MAX_FRAME);
            }
            assert_eq!(got, vec![a.clone(), b.clone(), c.clone()], "chunks of {chunk}");
            assert_eq!(r.buffered(), 0);
        }
    }

    #[test]
    fn an_oversized_or_empty_frame_is_refused_before_its_body_arrives() {
        let mut r = FrameReader::default();
        r.push(&((MAX_FRAME + 1) as u16).to_be_bytes());
        assert_eq!(r.next_frame(), Err(DropReason::Oversized));
        let mut r = FrameReader::default();
        r.push(&[0, 0, 1]);
        assert_eq!(r.next_frame(), Err(DropReason::Oversized));
    }

    #[test]
    fn the_send_buffer_is_bounded_and_keeps_frames_whole() {
        let mut s = SendBuffer::default();
        let frame = vec![9u8; 1000];
        let mut queued = 0;
        while s.push(&frame) {
            queued += 1;
        }
        assert_eq!(queued, SEND_BUFFER_LIMIT / 1002);
        assert!(s.len() <= SEND_BUFFER_LIMIT);
        // A writer that takes 1500 bytes, then would block.
        struct Slow(Vec<u8>);
        impl Write for Slow {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                if self.0.len() >= 1500 {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                let n = buf.len().min(1500 - self.0.len());
                self.0.extend_from_slice(&buf[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut w = Slow(Vec::new());
        s.write_to(&mut w).unwrap();
        assert_eq!(w.0.len(), 1500);
        assert_eq!(s.len(), queued * 1002 - 1500);
        // The bytes are the frames, in order, length-prefixed.
        let mut r = FrameReader::default();
        r.push(&w.0);
        assert_eq!(r.next_frame().unwrap(), Some(frame.as_slice()));
        assert_eq!(r.next_frame().unwrap(), None);
        // Room again once written.
        let mut all = Vec::new();
        s.write_to(&mut all).unwrap();
        assert!(s.is_empty());
        assert!(s.push(&frame));
    }

    proptest::proptest! {
        /// Any bytes, cut anywhere: the reader never panics, holds at most one partial frame,
        /// and yields exactly the frames a correct parse of the whole would, up to its first
        /// refusal.
        #[test]
        fn the_frame_reader_takes_any_bytes(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..6000),
            cuts in proptest::collection::vec(1usize..700, 1..20),
        ) {
            let mut want = Vec::new();
            let mut refused = false;
            let mut rest = &bytes[..];
            while rest.len() >= 2 {
                let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                if len == 0 || len > MAX_FRAME {
                    refused = true;
                    break;
                }
                if rest.len() < 2 + len {
                    break;
                }
                want.push(rest[2..2 + len].to_vec());
                rest = &rest[2 + len..];
            }
            let mut r = FrameReader::default();
            let (mut got, mut got_refused, mut at, mut i) = (Vec::new(), false, 0, 0);
            while at < bytes.len() && !got_refused {
                let end = (at + cuts[i % cuts.len()]).min(bytes.len());
                r.push(&bytes[at..end]);
                at = end;
                i += 1;
                loop {
                    match r.next_frame() {
                        Ok(Some(f)) => got.push(f.to_vec()),
                        Ok(None) => break,
                        Err(_) => {
                            got_refused = true;
                            break;
                        }
                    }
                }
                proptest::prop_assert!(got_refused || r.buffered() <= 2 + MAX_FRAME + 700);
            }
            proptest::prop_assert_eq!(got, want);
            proptest::prop_assert_eq!(got_refused, refused);
        }

        /// Valid frames of any size up to the limit, cut anywhere, come out whole and in order.
        #[test]
        fn valid_frames_survive_any_cutting(
            frames in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 1..=MAX_FRAME), 0..8),
            cuts in proptest::collection::vec(1usize..3000, 1..20),
        ) {
            let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
            let bytes = framed(&refs);
            let mut r = FrameReader::default();
            let (mut got, mut at, mut i) = (Vec::new(), 0, 0);
            while at < bytes.len() {
                let end = (at + cuts[i % cuts.len()]).min(bytes.len());
                r.push(&bytes[at..end]);
                at = end;
                i += 1;
                while let Some(f) = r.next_frame().unwrap() {
                    got.push(f.to_vec());
                }
            }
            proptest::prop_assert_eq!(got, frames);
            proptest::prop_assert_eq!(r.buffered(), 0);
        }
    }

    #[test]
    fn streams_waiting_are_bounded_per_address() {
        let pending = Arc::new(PendingPerIp::default());
        let (a, b): (std::net::IpAddr, std::net::IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let mut held: Vec<IpPermit> =
            (0..MAX_PENDING_PER_IP).map(|_| PendingPerIp::enter(&pending, a).unwrap()).collect();
        assert!(PendingPerIp::enter(&pending, a).is_none(), "one more from the same address is refused");
        let other = PendingPerIp::enter(&pending, b).expect("another address is not affected");
        held.pop();
        assert!(PendingPerIp::enter(&pending, a).is_some(), "a place freed is taken again");
        drop((held, other));
        assert!(pending.0.lock().unwrap().is_empty(), "nothing left behind");
    }

    #[test]
    fn the_first_frame_must_be_a_stun_binding_request_with_a_username() {
        assert_eq!(first_frame_ufrag(b"GET / HTTP/1.1\r\n"), Err(DropReason::Garbage));
        assert_eq!(first_frame_ufrag(&[0x16, 0xfe, 0xfd, 0, 0]), Err(DropReason::Garbage));
        // A STUN header with a bogus length.
        assert_eq!(first_frame_ufrag(&[0, 1, 0, 200, 0x21, 0x12, 0xa4, 0x42]), Err(DropReason::Garbage));
        assert!(is_webrtc_packet(&[0x80, 0]) && is_webrtc_packet(&[0x17]) && is_webrtc_packet(&[1]));
        assert!(!is_webrtc_packet(b"G") && !is_webrtc_packet(&[0x40]) && !is_webrtc_packet(&[]));
    }
}
