//! What a media worker measures of its own load, and what it does when it cannot keep up
//! (`gateway_core::overload`, docs/media-quality.md "Overload"): every
//! [`overload::TICK`](gateway_core::overload::TICK) it hands the level state machine its busy
//! share, the longest a datagram it read waited in its socket (the kernel's receive timestamp,
//! `udp::recv_stamped`), the packets it wrote and those the level shed, and tells the engine the
//! level that comes out.
//!
//! Also the test-only lever that makes a worker slow on purpose (`media.test_slow_ns`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gateway_core::overload::{Overload, Sample, TICK};
use gateway_core::Engine;

/// Datagrams read from one socket per loop pass before the others get their turn.
pub const READ_PER_SOCKET: usize = 32;
/// Datagrams read per loop pass in all: then timers, commands and the level get their turn.
pub const READ_PER_PASS: usize = 256;
/// Work per loop pass after which the rest waits for the next pass (at least one datagram is
/// always read).
pub const PASS_TIME: Duration = Duration::from_millis(10);
/// Receive and send buffer asked for on each connection's socket: a burst (a keyframe, a
/// stalled pass) waits in the kernel rather than being dropped. Capped by
/// `net.core.{r,w}mem_max` unless the process may force it.
pub const SOCKET_BUFFER_BYTES: usize = 1 << 20;

/// `media.test_slow_ns`: extra wall time (slept, not spun) per forwarded datagram. Test-only:
/// overloads a worker reproducibly on a shared machine. A process-wide value, so an in-process
/// test can change it while the gateway runs.
static TEST_SLOW_NS: AtomicU64 = AtomicU64::new(0);

pub fn set_test_slow_ns(ns: u64) {
    TEST_SLOW_NS.store(ns, Ordering::Relaxed);
}

pub fn test_slow_ns() -> u64 {
    TEST_SLOW_NS.load(Ordering::Relaxed)
}

/// The test lever's debt: forwarded datagrams add to it, and it is paid by sleeping once it
/// is worth a system call (the sleep's overshoot is credited).
#[derive(Default)]
pub struct SlowDown {
    debt_ns: i64,
}

impl SlowDown {
    pub fn charge(&mut self, datagrams: usize) {
        let per = test_slow_ns();
        if per == 0 || datagrams == 0 {
            self.debt_ns = 0;
            return;
        }
        self.debt_ns += (per as i64).saturating_mul(datagrams as i64);
        if self.debt_ns >= 200_000 {
            let t = Instant::now();
            std::thread::sleep(Duration::from_nanos(self.debt_ns as u64));
            self.debt_ns -= t.elapsed().as_nanos() as i64;
        }
    }
}

/// What one loop pass may still read.
pub struct PassBudget {
    started: Instant,
    read: usize,
}

impl PassBudget {
    pub fn new(started: Instant) -> Self {
        Self { started, read: 0 }
    }

    /// May one more datagram be read in this pass? The first always may.
    pub fn take(&mut self) -> bool {
        if self.spent() {
            return false;
        }
        self.read += 1;
        true
    }

    pub fn spent(&self) -> bool {
        self.read > 0 && (self.read >= READ_PER_PASS || self.started.elapsed() >= PASS_TIME)
    }
}

/// One worker's load: what it measured since the last tick, and its level.
pub struct Load {
    overload: Overload,
    tick_start: Instant,
    busy: Duration,
    forwarding: Duration,
    written_before: u64,
    /// The longest socket wait of a datagram read in this tick.
    wait_max: Option<Duration>,
    /// The longest socket wait of the last second (for `gateway_worker_queue_delay_seconds`).
    pub wait_max_second: Duration,
}

impl Load {
    pub fn new(now: Instant) -> Self {
        Self {
            overload: Overload::new(),
            tick_start: now,
            busy: Duration::ZERO,
            forwarding: Duration::ZERO,
            written_before: 0,
            wait_max: None,
            wait_max_second: Duration::ZERO,
        }
    }

    /// A datagram was read after waiting `wait` in its socket (`None`: not stamped).
    pub fn note_wait(&mut self, wait: Option<Duration>) {
        if let Some(w) = wait {
            self.wait_max = Some(self.wait_max.map_or(w, |m| m.max(w)));
        }
    }

    pub fn level(&self) -> u8 {
        self.overload.level()
    }

    pub fn add_busy(&mut self, busy: Duration) {
        self.busy += busy;
    }

    /// Time spent on a datagram that was forwarded (read to last write, part of the busy time).
    pub fn add_forwarding(&mut self, spent: Duration) {
        self.forwarding += spent;
    }

    /// When the next tick is due.
    pub fn next_tick(&self) -> Instant {
        self.tick_start + TICK
    }

    /// At a tick: sample, step the level, give it to the engine. Returns the new level if it
    /// changed (the engine's outputs are then waiting to be flushed).
    pub fn tick(&mut self, now: Instant, engine: &mut Engine) -> Option<u8> {
        if now < self.next_tick() {
            return None;
        }
        let c = engine.counters();
        let written = c.rtp_packets_out[0] + c.rtp_packets_out[1];
        let queue_delay = self.wait_max.take();
        if let Some(d) = queue_delay {
            self.wait_max_second = self.wait_max_second.max(d);
        }
        let sample = Sample {
            elapsed: now.saturating_duration_since(self.tick_start),
            busy: std::mem::take(&mut self.busy),
            forwarding: std::mem::take(&mut self.forwarding),
            queue_delay,
            written: written.saturating_sub(self.written_before),
            shed: engine.take_overload_shed(),
        };
        self.written_before = written;
        self.tick_start = now;
        let before = self.overload.level();
        let level = self.overload.update(now, &sample);
        if level == before {
            return None;
        }
        tracing::info!(
            level,
            from = before,
            busy = format!("{:.2}", self.overload.busy()),
            lag_ms = queue_delay.map(|d| d.as_millis() as u64),
            "media worker overload level"
        );
        engine.set_overload(now, level);
        Some(level)
    }
}
