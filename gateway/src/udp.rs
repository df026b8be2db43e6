//! A media worker's shared UDP socket (`media.mux`): one socket for every connection of the
//! worker, so the datagrams one loop step produces — a publisher's packet fanned out to every
//! subscriber, a keyframe burst, retransmissions — leave in one `sendmmsg` call instead of one
//! `sendto` per datagram.
//!
//! Also the receive side every media socket shares: [`recv_stamped`] reads a datagram with the
//! kernel's receive timestamp (`SO_TIMESTAMPNS`, asked for by [`enable_rx_timestamps`]), from
//! which the worker learns how long it waited in the socket: the overload signal.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrStorage};
use nix::sys::time::TimeSpec;

use rustix::net::addr::SocketAddrArg;
use rustix::net::{sendmmsg, MMsgHdr, SendAncillaryBuffer, SendFlags, SocketAddrAny};

/// Datagrams handed to the kernel per `sendmmsg` call (Linux's `UIO_MAXIOV`).
const MAX_PER_CALL: usize = 1024;

/// Buffer sizes asked for on a shared socket: it carries what a socket per connection carried
/// for all of them. Capped by `net.core.{w,r}mem_max` unless the process may force them.
pub const SHARED_BUFFER_BYTES: usize = 4 << 20;

/// Datagrams waiting to be sent on one socket.
#[derive(Default)]
pub struct SendQueue {
    destinations: Vec<SocketAddrAny>,
    contents: Vec<Vec<u8>>,
}

/// What a [`SendQueue::send`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub datagrams: usize,
    /// Datagrams the kernel refused (an unreachable destination, a full socket buffer).
    pub failed: usize,
    pub calls: usize,
}

impl SendQueue {
    pub fn push(&mut self, destination: SocketAddr, contents: Vec<u8>) {
        self.destinations.push(destination.as_any());
        self.contents.push(contents);
    }

    pub fn len(&self) -> usize {
        self.contents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.contents.is_empty()
    }

    /// Send every queued datagram, in order, with as few system calls as the kernel allows,
    /// and empty the queue. A datagram the kernel refuses is skipped and counted; a full send
    /// buffer drops what is left (as a `sendto` that would block does).
    /// Each datagram's buffer goes to `recycle` once the kernel has it (or refused it).
    pub fn send(&mut self, socket: impl AsFd, mut recycle: impl FnMut(Vec<u8>)) -> Sent {
        let mut sent = Sent::default();
        let mut start = 0;
        let total = self.contents.len();
        while start < total {
            let end = (start + MAX_PER_CALL).min(total);
            let slices: Vec<[IoSlice<'_>; 1]> = self.contents[start..end].iter().map(|c| [IoSlice::new(c)]).collect();
            let mut controls: Vec<SendAncillaryBuffer<'_, '_, '_>> =
                (start..end).map(|_| SendAncillaryBuffer::default()).collect();
            let mut headers: Vec<MMsgHdr<'_>> = self.destinations[start..end]
                .iter()
                .zip(&slices)
                .zip(controls.iter_mut())
                .map(|((to, iov), control)| MMsgHdr::new_with_addr(to, iov, control))
                .collect();
            sent.calls += 1;
            match sendmmsg(socket.as_fd(), &mut headers, SendFlags::empty()) {
                Ok(0) => {
                    sent.failed += 1;
                    start += 1;
                }
                Ok(n) => {
                    sent.datagrams += n;
                    start += n;
                }
                Err(e) if e == rustix::io::Errno::INTR => {}
                Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                    sent.failed += total - start;
                    break;
                }
                // The first datagram of the call was refused (unreachable, too large): skip it.
                Err(_) => {
                    sent.failed += 1;
                    start += 1;
                }
            }
        }
        self.destinations.clear();
        self.contents.drain(..).for_each(&mut recycle);
        sent
    }
}

/// Bind a worker's shared socket: non-blocking, with large buffers (forced where the process
/// may, e.g. with CAP_NET_ADMIN) and receive timestamps. Returns the socket and the buffer
/// sizes it got.
pub fn bind_shared(addr: SocketAddr) -> io::Result<(UdpSocket, usize, usize)> {
    let socket = UdpSocket::bind(addr)?;
    socket.set_nonblocking(true)?;
    use rustix::net::sockopt::*;
    if set_socket_send_buffer_size_force(&socket, SHARED_BUFFER_BYTES).is_err() {
        let _ = set_socket_send_buffer_size(&socket, SHARED_BUFFER_BYTES);
    }
    if set_socket_recv_buffer_size_force(&socket, SHARED_BUFFER_BYTES).is_err() {
        let _ = set_socket_recv_buffer_size(&socket, SHARED_BUFFER_BYTES);
    }
    enable_rx_timestamps(&socket);
    let send = socket_send_buffer_size(&socket).unwrap_or(0);
    let recv = socket_recv_buffer_size(&socket).unwrap_or(0);
    Ok((socket, send, recv))
}

/// Ask the kernel to stamp each datagram the socket receives with its arrival time
/// (`SO_TIMESTAMPNS`). Best effort: without it [`recv_stamped`] reports no wait.
pub fn enable_rx_timestamps(socket: &impl AsFd) -> bool {
    setsockopt(socket, sockopt::ReceiveTimestampns, &true).is_ok()
}

/// A socket wait longer than this is a clock step, not a queue.
const MAX_PLAUSIBLE_WAIT: Duration = Duration::from_secs(10);

/// `recv_from` that also says how long the datagram waited in the socket's receive queue:
/// the kernel's receive timestamp against the real-time clock now (`None` when the socket does
/// not stamp, or the clock stepped).
pub fn recv_stamped(socket: &impl AsRawFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<Duration>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut control = nix::cmsg_space!(TimeSpec);
    let msg = loop {
        match recvmsg::<SockaddrStorage>(socket.as_raw_fd(), &mut iov, Some(&mut control), MsgFlags::empty()) {
            Ok(msg) => break msg,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let n = msg.bytes;
    let source = msg
        .address
        .as_ref()
        .and_then(std_addr)
        .ok_or_else(|| io::Error::other("datagram without an IP source address"))?;
    let mut arrived = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmTimestampns(ts) = c {
                arrived = Some(Duration::new(ts.tv_sec().max(0) as u64, ts.tv_nsec().clamp(0, 999_999_999) as u32));
            }
        }
    }
    let wait = arrived.and_then(|at| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?;
        // A stamp a little in the future is the clocks' granularity: no wait.
        let wait = now.checked_sub(at).unwrap_or(Duration::ZERO);
        (wait < MAX_PLAUSIBLE_WAIT).then_some(wait)
    });
    Ok((n, source, wait))
}

fn std_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    if let Some(v6) = a.as_sockaddr_in6() {
        return Some(SocketAddr::V6(SocketAddrV6::from(*v6)));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receiver() -> (UdpSocket, SocketAddr) {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let a = s.local_addr().unwrap();
        (s, a)
    }

    #[test]
    fn one_call_reaches_every_destination_in_order() {
        let (tx, _, _) = bind_shared("127.0.0.1:0".parse().unwrap()).unwrap();
        let (a, a_addr) = receiver();
        let (b, b_addr) = receiver();
        let mut q = SendQueue::default();
        for i in 0..100u8 {
            q.push(if i % 2 == 0 { a_addr } else { b_addr }, vec![i; 1 + usize::from(i)]);
        }
        assert_eq!(q.len(), 100);
        let mut recycled = Vec::new();
        let sent = q.send(&tx, |b| recycled.push(b));
        assert_eq!(sent, Sent { datagrams: 100, failed: 0, calls: 1 });
        // Every buffer comes back for reuse, in order.
        assert_eq!(recycled.len(), 100);
        assert!(recycled.iter().enumerate().all(|(i, b)| b.len() == 1 + i));
        assert!(q.is_empty());
        let mut buf = [0u8; 256];
        for (sock, first) in [(&a, 0u8), (&b, 1u8)] {
            for i in (first..100).step_by(2) {
                let (n, from) = sock.recv_from(&mut buf).unwrap();
                assert_eq!(from, tx.local_addr().unwrap());
                assert_eq!(&buf[..n], vec![i; 1 + usize::from(i)].as_slice());
            }
        }
    }

    #[test]
    fn a_refused_datagram_is_skipped_and_the_rest_still_go() {
        let (tx, _, _) = bind_shared("127.0.0.1:0".parse().unwrap()).unwrap();
        let (a, a_addr) = receiver();
        let mut q = SendQueue::default();
        q.push(a_addr, b"first".to_vec());
        // An IPv6 destination on an IPv4 socket is refused by the kernel.
        q.push("[::1]:9".parse().unwrap(), b"refused".to_vec());
        q.push(a_addr, b"last".to_vec());
        let sent = q.send(&tx, drop);
        assert_eq!((sent.datagrams, sent.failed), (2, 1));
        let mut buf = [0u8; 64];
        let (n, _) = a.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"first");
        let (n, _) = a.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"last");
    }

    #[test]
    fn more_than_one_call_worth_is_split() {
        let (tx, _, _) = bind_shared("127.0.0.1:0".parse().unwrap()).unwrap();
        let (_a, a_addr) = receiver();
        let mut q = SendQueue::default();
        for _ in 0..(MAX_PER_CALL + 5) {
            q.push(a_addr, vec![0; 8]);
        }
        let sent = q.send(&tx, drop);
        assert_eq!(sent.datagrams + sent.failed, MAX_PER_CALL + 5);
        assert!(sent.calls >= 2);
    }

    #[test]
    fn a_stamped_read_says_how_long_the_datagram_waited() {
        let (rx, to) = receiver();
        assert!(enable_rx_timestamps(&rx));
        // The kernel turns stamping on for the stack a moment after the first socket asks
        // (until then a datagram is stamped when it is read).
        std::thread::sleep(Duration::from_millis(100));
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(b"late", to).unwrap();
        std::thread::sleep(Duration::from_millis(60));
        let mut buf = [0u8; 64];
        let (n, from, wait) = recv_stamped(&rx, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"late");
        assert_eq!(from, tx.local_addr().unwrap());
        let wait = wait.expect("a stamped socket reports the wait");
        assert!(wait >= Duration::from_millis(50) && wait < Duration::from_secs(5), "{wait:?}");
        // Read as soon as it arrives: hardly any wait.
        tx.send_to(b"prompt", to).unwrap();
        let (n, _, wait) = recv_stamped(&rx, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"prompt");
        assert!(wait.unwrap() < Duration::from_millis(50), "{wait:?}");
    }

    #[test]
    fn an_unstamped_socket_reads_without_a_wait() {
        let (rx, to) = receiver();
        UdpSocket::bind("127.0.0.1:0").unwrap().send_to(b"x", to).unwrap();
        let mut buf = [0u8; 8];
        let (n, _, wait) = recv_stamped(&rx, &mut buf).unwrap();
        assert_eq!((n, wait), (1, None));
    }

    #[test]
    fn an_ipv6_source_is_read_back() {
        let Ok(rx) = UdpSocket::bind("[::1]:0") else { return };
        rx.set_nonblocking(true).unwrap();
        enable_rx_timestamps(&rx);
        let tx = UdpSocket::bind("[::1]:0").unwrap();
        tx.send_to(b"six", rx.local_addr().unwrap()).unwrap();
        let mut buf = [0u8; 8];
        let (n, from, _) = loop {
            match recv_stamped(&rx, &mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => break r.unwrap(),
            }
        };
        assert_eq!((&buf[..n], from), (&b"six"[..], tx.local_addr().unwrap()));
    }
}
