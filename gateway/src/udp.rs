//! A media worker's shared UDP socket (`media.mux`): one socket for every connection of the
//! worker, so the datagrams one loop step produces — a publisher's packet fanned out to every
//! subscriber, a keyframe burst, retransmissions — leave in one `sendmmsg` call instead of one
//! `sendto` per datagram.

use std::io::{self, IoSlice};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;

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
    pub fn send(&mut self, socket: impl AsFd) -> Sent {
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
        self.contents.clear();
        sent
    }
}

/// Bind a worker's shared socket: non-blocking, with large buffers (forced where the process
/// may, e.g. with CAP_NET_ADMIN). Returns the socket and the buffer sizes it got.
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
    let send = socket_send_buffer_size(&socket).unwrap_or(0);
    let recv = socket_recv_buffer_size(&socket).unwrap_or(0);
    Ok((socket, send, recv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
        let sent = q.send(&tx);
        assert_eq!(sent, Sent { datagrams: 100, failed: 0, calls: 1 });
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
        let sent = q.send(&tx);
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
        let sent = q.send(&tx);
        assert_eq!(sent.datagrams + sent.failed, MAX_PER_CALL + 5);
        assert!(sent.calls >= 2);
    }
}
