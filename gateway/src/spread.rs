//! How media workers reach each other for rooms spread over them (`media.spread`,
//! `gateway_core::Relay`): a bounded lock-free queue per ordered worker pair for packets (the
//! payload travels as the publisher's `Arc`, never copied; a full queue drops the packet and
//! counts it, like a full socket), a lossless channel per worker for everything else (track
//! changes, interest, keyframe requests, data messages), and each worker's mio `Waker`. A
//! worker pushes what its engine produced as it flushes, and wakes each target once per loop
//! pass; the target drains its channel, then every packet queue, before its commands.

use std::sync::{mpsc, Arc, OnceLock};

use crossbeam_queue::ArrayQueue;
use gateway_core::{Relay, RelayedPacket};
use mio::Waker;

/// Packets in flight from one worker to another: ~80 ms of a 1,500-packet/s room per pair,
/// far more than a worker that keeps up ever holds.
pub const PACKET_QUEUE: usize = 4096;

/// Workers a room can be spread over: the engine keeps worker sets as 64-bit masks
/// (`media.spread` refuses more at start-up).
pub const MAX_WORKERS: usize = 64;

pub struct Hub {
    workers: usize,
    /// `from * workers + to`.
    packets: Vec<ArrayQueue<RelayedPacket>>,
    control: Vec<mpsc::Sender<Relay>>,
    wakers: Vec<OnceLock<Arc<Waker>>>,
}

/// What one worker holds of the hub.
pub struct Link {
    pub hub: Arc<Hub>,
    pub me: usize,
    pub rx: mpsc::Receiver<Relay>,
}

impl Hub {
    /// A hub for `workers` workers, and each one's link (index order).
    pub fn links(workers: usize) -> Vec<Link> {
        let mut control = Vec::with_capacity(workers);
        let mut receivers = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (tx, rx) = mpsc::channel();
            control.push(tx);
            receivers.push(rx);
        }
        let hub = Arc::new(Hub {
            workers,
            packets: (0..workers * workers).map(|_| ArrayQueue::new(PACKET_QUEUE)).collect(),
            control,
            wakers: (0..workers).map(|_| OnceLock::new()).collect(),
        });
        receivers.into_iter().enumerate().map(|(me, rx)| Link { hub: Arc::clone(&hub), me, rx }).collect()
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Worker `w`'s waker, set once it runs.
    pub fn set_waker(&self, w: usize, waker: Arc<Waker>) {
        let _ = self.wakers[w].set(waker);
    }

    /// Queue a packet from `from` to `to`; false (dropped) when that queue is full.
    pub fn push_packet(&self, from: usize, to: usize, p: RelayedPacket) -> bool {
        self.packets.get(from * self.workers + to).is_some_and(|q| q.push(p).is_ok())
    }

    pub fn pop_packet(&self, from: usize, to: usize) -> Option<RelayedPacket> {
        self.packets.get(from * self.workers + to)?.pop()
    }

    pub fn send(&self, to: usize, relay: Relay) {
        if let Some(tx) = self.control.get(to) {
            let _ = tx.send(relay);
        }
    }

    pub fn wake(&self, to: usize) {
        if let Some(w) = self.wakers.get(to).and_then(OnceLock::get) {
            let _ = w.wake();
        }
    }
}
