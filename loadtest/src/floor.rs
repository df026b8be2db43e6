//! What the kernel alone charges for one forwarded datagram on this machine: a sender that does
//! nothing but send `len`-byte UDP datagrams round robin to `dests` loopback sockets (one
//! datagram per destination per round, as a fan-out does), drained by a receiver on another
//! CPU. The sender's thread CPU time per datagram is the floor under any socket-based
//! forwarder's CPU per forwarded packet on the same machine: a gateway pays it plus its own
//! work (SRTP, the fan-out, feedback). On loopback the figure includes the receiver's
//! softirq work (IP and UDP receive, the enqueue, waking the reader), which loopback runs on
//! the sending CPU.
//!
//! `udp-floor` (src/bin) runs it from the command line; docs/performance.md has the figures.

use std::io::{self, IoSlice};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::net::addr::SocketAddrArg;
use rustix::net::{sendmmsg, MMsgHdr, SendAncillaryBuffer, SendFlags, SocketAddrAny};

/// How the sender hands datagrams to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    /// A socket per destination and one `sendto` per datagram (the gateway's default: a port
    /// per connection).
    PerSocket,
    /// One socket, each round's datagrams in one `sendmmsg` (the gateway's `media.mux`).
    Batched,
}

/// How the receiver waits for datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receiver {
    /// Polls every socket without sleeping: the kernel never has a sleeping reader to wake.
    Spin,
    /// An event loop (tokio, one thread) that sleeps when idle, as the load tester and most
    /// clients do: a datagram to an idle reader wakes it.
    EventLoop,
}

#[derive(Debug, Clone)]
pub struct FloorConfig {
    pub dests: usize,
    pub len: usize,
    pub rounds: usize,
    pub sender: Sender,
    pub receiver: Receiver,
    /// CPUs to pin the sender and the receiver to (`None`: not pinned).
    pub sender_cpu: Option<usize>,
    pub receiver_cpu: Option<usize>,
    /// KB of other memory the sender touches per round (random cache lines of a region 64 times
    /// larger, spread over the round's sends), as a forwarder's own work between sends evicts the
    /// kernel's data. The CPU of the touching alone (measured in a pass without sends) is
    /// subtracted. 0: none.
    pub touch_kb: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct FloorResult {
    pub sent: u64,
    pub received: u64,
    /// The sender thread's CPU seconds (user + system) over the sends.
    pub sender_cpu_s: f64,
    pub wall_s: f64,
}

impl FloorResult {
    /// Sender CPU per datagram sent, in µs.
    pub fn us_per_datagram(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        self.sender_cpu_s * 1e6 / self.sent as f64
    }
}

fn thread_cpu_s() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

fn pin(cpu: Option<usize>) -> io::Result<()> {
    let Some(cpu) = cpu else { return Ok(()) };
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).map_err(io::Error::from)
}

/// Run one measurement. Every datagram sent is waited for at the receiver (up to 2 s after the
/// last send), so `received < sent` means the kernel dropped some (a full receive buffer).
pub fn run(cfg: &FloorConfig) -> io::Result<FloorResult> {
    let receivers: Vec<UdpSocket> =
        (0..cfg.dests).map(|_| UdpSocket::bind("127.0.0.1:0")).collect::<io::Result<_>>()?;
    let addrs: Vec<SocketAddr> = receivers.iter().map(|s| s.local_addr()).collect::<io::Result<_>>()?;
    for s in &receivers {
        s.set_nonblocking(true)?;
    }
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
    let thread = {
        let (received, stop, receiver, cpu) =
            (Arc::clone(&received), Arc::clone(&stop), cfg.receiver, cfg.receiver_cpu);
        std::thread::spawn(move || -> io::Result<()> {
            if let Err(e) = pin(cpu) {
                let _ = ready_tx.send(Err(e));
                return Ok(());
            }
            match receiver {
                Receiver::Spin => {
                    let _ = ready_tx.send(Ok(()));
                    let mut buf = [0u8; 2048];
                    while !stop.load(Ordering::Relaxed) {
                        for s in &receivers {
                            while s.recv(&mut buf).is_ok() {
                                received.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Ok(())
                }
                Receiver::EventLoop => {
                    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return Ok(());
                        }
                    };
                    rt.block_on(async move {
                        for s in receivers {
                            let s = tokio::net::UdpSocket::from_std(s)?;
                            let received = Arc::clone(&received);
                            tokio::spawn(async move {
                                let mut buf = [0u8; 2048];
                                while s.recv(&mut buf).await.is_ok() {
                                    received.fetch_add(1, Ordering::Relaxed);
                                }
                            });
                        }
                        let _ = ready_tx.send(Ok(()));
                        while !stop.load(Ordering::Relaxed) {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Ok(())
                    })
                }
            }
        })
    };
    // From here every return stops and joins the receiver (the guard's drop).
    let drain = Drain { stop: Arc::clone(&stop), thread: Some(thread) };
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        // It ended before it was ready: its own error says why.
        Err(_) => {
            drain.finish()?;
            return Err(io::Error::other("receiver did not start"));
        }
    }

    pin(cfg.sender_cpu)?;
    let senders: Vec<UdpSocket> = match cfg.sender {
        Sender::PerSocket => (0..cfg.dests).map(|_| UdpSocket::bind("127.0.0.1:0")).collect::<io::Result<_>>()?,
        Sender::Batched => vec![UdpSocket::bind("127.0.0.1:0")?],
    };
    let payload = vec![0x5a_u8; cfg.len];
    let any: Vec<SocketAddrAny> = addrs.iter().map(|a| a.as_any()).collect();
    let mut other = Touch::new(cfg.touch_kb, cfg.dests);
    // The touching alone, to subtract: the same loop without sends.
    let touch_only_s = if cfg.touch_kb > 0 {
        let cpu0 = thread_cpu_s();
        for _ in 0..cfg.rounds {
            for _ in 0..cfg.dests {
                other.between_sends();
            }
        }
        thread_cpu_s() - cpu0
    } else {
        0.0
    };
    let mut sent = 0u64;
    let (cpu0, wall0) = (thread_cpu_s(), Instant::now());
    for _ in 0..cfg.rounds {
        if cfg.sender == Sender::Batched {
            for _ in 0..cfg.dests {
                other.between_sends();
            }
        }
        match cfg.sender {
            Sender::PerSocket => {
                for (s, a) in senders.iter().zip(&addrs) {
                    other.between_sends();
                    if s.send_to(&payload, a).is_ok() {
                        sent += 1;
                    }
                }
            }
            Sender::Batched => {
                let slices: Vec<[IoSlice<'_>; 1]> = any.iter().map(|_| [IoSlice::new(&payload)]).collect();
                let mut controls: Vec<SendAncillaryBuffer<'_, '_, '_>> =
                    any.iter().map(|_| SendAncillaryBuffer::default()).collect();
                let mut headers: Vec<MMsgHdr<'_>> = any
                    .iter()
                    .zip(&slices)
                    .zip(controls.iter_mut())
                    .map(|((to, iov), control)| MMsgHdr::new_with_addr(to, iov, control))
                    .collect();
                let mut start = 0;
                while start < headers.len() {
                    match sendmmsg(&senders[0], &mut headers[start..], SendFlags::empty()) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => start += n,
                    }
                }
                sent += start as u64;
            }
        }
        // A fan-out's datagrams come in rounds (one publisher packet each); give the receiver
        // a moment between rounds as a paced source would, without sleeping (which would
        // change what the sender's CPU does between rounds).
        std::thread::yield_now();
    }
    let (sender_cpu_s, wall_s) = ((thread_cpu_s() - cpu0 - touch_only_s).max(0.0), wall0.elapsed().as_secs_f64());

    let deadline = Instant::now() + Duration::from_secs(2);
    while received.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    drain.finish()?;
    Ok(FloorResult { sent, received: received.load(Ordering::Relaxed), sender_cpu_s, wall_s })
}

/// The receiver thread: stopped and joined by [`Drain::finish`], or when dropped (an early
/// return), so a spinning receiver never outlives the run.
struct Drain {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl Drain {
    fn finish(mut self) -> io::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| io::Error::other("receiver panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Random cache-line writes into a region 64 times the per-round amount.
struct Touch {
    region: Vec<u64>,
    per_send: usize,
    x: u64,
}

impl Touch {
    fn new(kb_per_round: usize, dests: usize) -> Self {
        let lines = kb_per_round * 1024 / 64;
        let mut region = if lines == 0 { Vec::new() } else { vec![0u64; lines * 64 * 8] };
        // A zeroed allocation is mapped on first write: fault every page in now, or the
        // touch-only pass (subtracted) would pay the page faults the measured pass then skips.
        for i in (0..region.len()).step_by(4096 / 8) {
            region[i] = 1;
        }
        Touch { region, per_send: lines / dests.max(1), x: 0x9e37_79b9_7f4a_7c15 }
    }

    fn between_sends(&mut self) {
        let lines = self.region.len() / 8;
        for _ in 0..self.per_send {
            // xorshift64
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            let i = (self.x as usize % lines) * 8;
            self.region[i] = self.region[i].wrapping_add(1);
        }
        std::hint::black_box(&self.region);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(sender: Sender, receiver: Receiver) -> FloorResult {
        let cfg = FloorConfig {
            dests: 8,
            len: 1200,
            rounds: 50,
            sender,
            receiver,
            sender_cpu: None,
            receiver_cpu: None,
            touch_kb: 0,
        };
        run(&cfg).expect("floor run")
    }

    #[test]
    fn every_datagram_of_every_round_is_sent_and_received() {
        for sender in [Sender::PerSocket, Sender::Batched] {
            for receiver in [Receiver::Spin, Receiver::EventLoop] {
                let r = small(sender, receiver);
                assert_eq!(r.sent, 8 * 50, "{sender:?}/{receiver:?}: one datagram per destination per round");
                assert_eq!(r.received, r.sent, "{sender:?}/{receiver:?}: the receiver drained them all");
                assert!(r.sender_cpu_s > 0.0 && r.us_per_datagram() > 0.0, "{sender:?}/{receiver:?}: {r:?}");
                assert!(
                    r.sender_cpu_s <= r.wall_s * 1.05 + 0.01,
                    "one thread's CPU cannot exceed the wall time: {r:?}"
                );
            }
        }
    }

    #[test]
    fn touching_other_memory_is_measured_apart_from_the_sends() {
        let cfg = FloorConfig {
            dests: 4,
            len: 1200,
            rounds: 20,
            sender: Sender::PerSocket,
            receiver: Receiver::Spin,
            sender_cpu: None,
            receiver_cpu: None,
            touch_kb: 64,
        };
        let r = run(&cfg).expect("floor run");
        assert_eq!((r.sent, r.received), (80, 80));
        assert!(r.sender_cpu_s <= r.wall_s * 1.05 + 0.01, "{r:?}");
        let mut t = Touch::new(64, 4);
        assert_eq!(t.per_send, 64 * 1024 / 64 / 4, "the round's lines are spread over its sends");
        let pages = t.region.len().div_ceil(4096 / 8) as u64;
        assert_eq!(t.region.iter().sum::<u64>(), pages, "every page written once when made");
        t.between_sends();
        assert_eq!(t.region.iter().sum::<u64>(), pages + t.per_send as u64, "one write per line touched");
    }
}
