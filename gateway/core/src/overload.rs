//! Overload: how much video a media worker sheds when it cannot keep up. Pure (fed a sample of
//! the worker's measurements every tick, returns the level), so every rule is unit tested.
//!
//! Levels, each shedding more video for the subscribers the worker serves (audio, RTCP, ICE
//! and the data channels are never shed):
//!
//! | level | video |
//! |---|---|
//! | 0 | normal |
//! | 1 | the lowest simulcast layer only |
//! | 2 | a quarter of the subscriber connections get no video |
//! | 3 | half of them (every other subscriber) |
//! | 4 | three quarters |
//! | 5 | no video |
//!
//! Which subscribers lose video is fixed per connection ([`shed_slot`]), so the groups nest:
//! going up a level adds a quarter, going down gives exactly that quarter back.
//!
//! The signal is the time datagrams wait in the kernel's socket queues before the worker reads
//! them (the kernel's receive timestamp; the worker's busy share where there is none): a worker
//! that keeps up reads them within a loop pass; one that cannot sees the wait *grow*. A level is
//! added while it grows (not merely while it is long: a queue that drains after a step needs no
//! second step — the previous attempt's over-shedding), and removed once the queue is empty and
//! the busy share plus what the removed level would cost again (the packets it sheds, at the
//! measured cost per written packet) stays under [`DOWN_TARGET`]. Holds on both sides keep it
//! from flapping.

use std::time::{Duration, Instant};

/// Number of levels (0 ..= [`MAX_LEVEL`]).
pub const LEVELS: usize = 6;
pub const MAX_LEVEL: u8 = (LEVELS - 1) as u8;

/// How often the worker samples and the level may move.
pub const TICK: Duration = Duration::from_millis(100);

/// The socket wait above which a growing queue counts as overload (a loop pass or two of
/// work is normal; a keyframe's fan-out at a large room takes a few milliseconds).
pub const DELAY_HIGH: Duration = Duration::from_millis(20);
/// The socket wait below which the queue counts as drained.
pub const DELAY_LOW: Duration = Duration::from_millis(5);
/// How much longer the wait must be than two ticks before to count as growing (measurement
/// noise stays below it).
pub const GROWTH: Duration = Duration::from_millis(1);
/// Without a socket wait to go by (no timestamps): overloaded above this busy share.
pub const BUSY_HIGH: f64 = 0.97;
/// A growing wait (or a busy worker) counts only in a tick in which forwarding — handling the
/// publisher packets that were fanned out, and writing them — took at least this share of the
/// worker's time: shedding video can only win back time spent forwarding it. A worker that
/// mostly idles and still reads late is kept off the CPU by another process; one busy reading
/// a flood of garbage at its port would lose its calls' video and still drown.
pub const FORWARD_GATE: f64 = 0.25;
/// A growing wait counts only in a tick the worker was at least this busy. A worker that
/// falls behind never rests; one that rests a third of the time keeps up on average, and the
/// waits it shows are bursts (a keyframe fanned out to hundreds, a round of DTLS handshakes)
/// that drain by themselves: 2 rooms × 210 subscribers at 69% busy stepped to level 3 without it.
pub const BUSY_UP: f64 = 0.9;
/// Ticks in a row the queue must grow before a level is added.
pub const UP_AFTER_TICKS: u32 = 2;
/// At least this long between two steps up: the last one must have taken effect (subscribers
/// stop at their next frame boundary) and shown in the queue.
pub const UP_HOLD: Duration = Duration::from_millis(300);
/// At least this long after a step up before a step down, and this long between steps down.
pub const DOWN_AFTER_UP: Duration = Duration::from_millis(1500);
pub const DOWN_HOLD: Duration = Duration::from_millis(400);
/// A level is removed only if the busy share with its video back is predicted below this.
pub const DOWN_TARGET: f64 = 0.8;

/// Which quarter of the subscribers a connection belongs to, from its ordinal among the
/// worker's subscribe connections: quarters in the order 0, 2, 1, 3 of the ordinal mod 4, so
/// level 3 (two quarters shed) is every other subscriber.
pub fn shed_slot(ordinal: u64) -> u8 {
    [0, 2, 1, 3][(ordinal % 4) as usize]
}

/// The highest level at which a subscriber in `slot` still receives video (its lowest layer).
pub fn last_level_with_video(slot: u8) -> u8 {
    1 + slot
}

/// One tick of the worker's measurements.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Length of the tick.
    pub elapsed: Duration,
    /// Time the worker spent working (not waiting for readiness) in it.
    pub busy: Duration,
    /// Of that, the time spent on datagrams that were forwarded to other connections (from
    /// the read to the last write they caused).
    pub forwarding: Duration,
    /// The longest a datagram read in the tick waited in its socket (`None`: nothing read with
    /// a timestamp).
    pub queue_delay: Option<Duration>,
    /// Packets written to subscribers.
    pub written: u64,
    /// Packets not written because of the level, by the level below which they would be
    /// written again: `shed[l]` comes back when the level falls to `l`.
    pub shed: [u64; LEVELS],
}

/// The level state machine.
#[derive(Debug, Clone)]
pub struct Overload {
    level: u8,
    changed_at: Option<Instant>,
    last_up: Option<Instant>,
    /// Smoothed busy share (0..=1).
    busy: f64,
    /// Smoothed cost of one written packet, seconds of work.
    cost: Option<f64>,
    /// Smoothed shed packets per second, by level.
    shed_rate: [f64; LEVELS],
    /// The socket wait of the last two ticks (the older first), and for how many ticks in a
    /// row it has grown above [`DELAY_HIGH`].
    last_delays: [Option<Duration>; 2],
    growing: u32,
}

impl Default for Overload {
    fn default() -> Self {
        Self::new()
    }
}

/// Weight of a new tick in the smoothed values (about three ticks' memory).
const ALPHA: f64 = 0.3;

fn ewma(old: f64, new: f64) -> f64 {
    old + ALPHA * (new - old)
}

impl Overload {
    pub fn new() -> Self {
        Self {
            level: 0,
            changed_at: None,
            last_up: None,
            busy: 0.0,
            cost: None,
            shed_rate: [0.0; LEVELS],
            last_delays: [None; 2],
            growing: 0,
        }
    }

    pub fn level(&self) -> u8 {
        self.level
    }

    /// The smoothed busy share.
    pub fn busy(&self) -> f64 {
        self.busy
    }

    /// The busy share predicted at `level - 1`: today's plus the work of the packets this level
    /// sheds that the one below would write.
    pub fn predicted_busy_below(&self) -> f64 {
        let Some(below) = self.level.checked_sub(1) else { return self.busy };
        self.busy + self.cost.unwrap_or(0.0) * self.shed_rate[below as usize]
    }

    /// Take one tick's sample; returns the level from now on.
    pub fn update(&mut self, now: Instant, s: &Sample) -> u8 {
        let secs = s.elapsed.as_secs_f64();
        if secs <= 0.0 {
            return self.level;
        }
        let busy = (s.busy.as_secs_f64() / secs).min(1.0);
        let forwarding = s.forwarding.as_secs_f64() / secs >= FORWARD_GATE;
        self.busy = ewma(self.busy, busy);
        if s.written >= 20 {
            let cost = s.busy.as_secs_f64() / s.written as f64;
            self.cost = Some(self.cost.map_or(cost, |c| ewma(c, cost)));
        }
        for (rate, shed) in self.shed_rate.iter_mut().zip(s.shed) {
            *rate = ewma(*rate, shed as f64 / secs);
        }
        // Overloaded: the queue is long and longer than two ticks ago (or, without a wait to
        // go by, the worker never rests). A queue that drains after a step is left to drain.
        let overloaded = match s.queue_delay {
            Some(d) => {
                forwarding
                    && busy >= BUSY_UP
                    && d > DELAY_HIGH
                    && self.last_delays[0].is_none_or(|old| d > old + GROWTH)
            }
            None => forwarding && busy >= BUSY_HIGH,
        };
        let drained = match s.queue_delay {
            Some(d) => d < DELAY_LOW,
            None => busy < BUSY_HIGH,
        };
        self.last_delays = [self.last_delays[1], s.queue_delay];
        self.growing = if overloaded { self.growing + 1 } else { 0 };
        let since_change = self.changed_at.map_or(Duration::MAX, |t| now.saturating_duration_since(t));
        let since_up = self.last_up.map_or(Duration::MAX, |t| now.saturating_duration_since(t));
        if self.growing >= UP_AFTER_TICKS && self.level < MAX_LEVEL && since_change >= UP_HOLD {
            self.level += 1;
            self.changed_at = Some(now);
            self.last_up = Some(now);
            self.growing = 0;
        } else if self.level > 0
            && drained
            && !overloaded
            && since_up >= DOWN_AFTER_UP
            && since_change >= DOWN_HOLD
            && self.predicted_busy_below() < DOWN_TARGET
        {
            self.level -= 1;
            self.changed_at = Some(now);
        }
        self.level
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A worker model: `demand` seconds of work per second at level 0, of which `video_share`
    /// is video, shed by level as the table says; a queue that grows by the excess.
    struct Model {
        demand: f64,
        video_share: f64,
        queue: f64,
    }

    impl Model {
        /// The share of the video work a level saves: the lowest layer costs a third less than
        /// the best in this model, and levels 2..=5 take a quarter of the subscribers'
        /// video each.
        fn shed_share(level: u8) -> f64 {
            if level == 0 {
                return 0.0;
            }
            let off = f64::from(level - 1) / 4.0;
            off + (1.0 - off) / 3.0
        }

        fn tick(&mut self, level: u8) -> Sample {
            let dt = TICK.as_secs_f64();
            let work = self.demand * (1.0 - self.video_share * Self::shed_share(level));
            // Seconds of work queued: grows by the excess, drains by the spare capacity.
            self.queue = (self.queue + (work - 1.0) * dt).max(0.0);
            let busy = if self.queue > 0.0 { 1.0 } else { work };
            let cost = 0.001; // 1 ms per written packet
            let written = (busy * dt / cost) as u64;
            let mut shed = [0; LEVELS];
            if level > 0 {
                // What the level below would write again, in packets per tick.
                let back = self.demand * self.video_share * (Self::shed_share(level) - Self::shed_share(level - 1));
                shed[level as usize - 1] = (back * dt / cost) as u64;
            }
            Sample {
                elapsed: TICK,
                busy: Duration::from_secs_f64(busy * dt),
                forwarding: Duration::from_secs_f64(busy * dt * 0.8),
                queue_delay: Some(Duration::from_secs_f64(self.queue + 0.001)),
                written,
                shed,
            }
        }
    }

    fn run(o: &mut Overload, m: &mut Model, t0: Instant, from: u32, ticks: u32) -> Vec<u8> {
        (from..from + ticks)
            .map(|i| {
                let s = m.tick(o.level());
                o.update(t0 + TICK * i, &s)
            })
            .collect()
    }

    #[test]
    fn the_slots_nest_and_half_is_every_other_subscriber() {
        let slots: Vec<u8> = (0..8).map(shed_slot).collect();
        assert_eq!(slots, [0, 2, 1, 3, 0, 2, 1, 3]);
        // At level 3 (slots 0 and 1 without video) exactly the even ordinals lose video.
        let shed_at = |level: u8| (0..8).filter(|&o| level > last_level_with_video(shed_slot(o))).collect::<Vec<_>>();
        assert_eq!(shed_at(1), Vec::<u64>::new());
        assert_eq!(shed_at(2), [0, 4]);
        assert_eq!(shed_at(3), [0, 2, 4, 6]);
        assert_eq!(shed_at(4), [0, 1, 2, 4, 5, 6]);
        assert_eq!(shed_at(5), (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn under_capacity_nothing_is_shed() {
        let mut o = Overload::new();
        let mut m = Model { demand: 0.9, video_share: 0.8, queue: 0.0 };
        let levels = run(&mut o, &mut m, Instant::now(), 0, 100);
        assert!(levels.iter().all(|&l| l == 0), "{levels:?}");
    }

    #[test]
    fn one_and_a_half_times_capacity_settles_on_the_least_level_that_fits() {
        let mut o = Overload::new();
        // 80% video: level 1 (lowest layers) leaves 1.5 × (1 - 0.8 / 3) = 1.1, level 2 (a
        // quarter without video) 1.5 × (1 - 0.8 × 0.5) = 0.9: it settles there, never higher.
        let mut m = Model { demand: 1.5, video_share: 0.8, queue: 0.0 };
        let t0 = Instant::now();
        let levels = run(&mut o, &mut m, t0, 0, 300);
        assert_eq!(*levels.iter().max().unwrap(), 2, "{levels:?}");
        let settled = &levels[50..];
        assert!(settled.iter().all(|&l| l == 2), "no flapping once settled: {levels:?}");
        assert!(m.queue < 0.01, "the queue drained: {}", m.queue);
        // The load drops: back to level 0 well within 5 s.
        m.demand = 0.3;
        let after = run(&mut o, &mut m, t0, 300, 50);
        let back = after.iter().position(|&l| l == 0).expect("recovers");
        assert!(back <= 30, "level 0 after {back} ticks: {after:?}");
    }

    #[test]
    fn a_step_that_drains_the_queue_gets_no_second_step() {
        let mut o = Overload::new();
        // Just over capacity: level 1 is enough (the queue drains), even though it is long.
        let mut m = Model { demand: 1.1, video_share: 0.8, queue: 0.0 };
        let levels = run(&mut o, &mut m, Instant::now(), 0, 200);
        assert_eq!(*levels.iter().max().unwrap(), 1, "{levels:?}");
    }

    #[test]
    fn a_level_is_kept_while_the_one_below_would_not_fit() {
        let mut o = Overload::new();
        let t0 = Instant::now();
        let mut m = Model { demand: 1.5, video_share: 0.8, queue: 0.0 };
        run(&mut o, &mut m, t0, 0, 100);
        assert_eq!(o.level(), 2);
        // At level 2 the worker is 90% busy; level 1 would need 1.1: predicted over the target.
        assert!(o.predicted_busy_below() > DOWN_TARGET, "{}", o.predicted_busy_below());
    }

    #[test]
    fn without_timestamps_the_busy_share_decides() {
        let mut o = Overload::new();
        let t0 = Instant::now();
        let busy = |b: f64| Sample {
            elapsed: TICK,
            busy: Duration::from_secs_f64(b * 0.1),
            forwarding: Duration::from_secs_f64(b * 0.1),
            queue_delay: None,
            written: 100,
            shed: [0; LEVELS],
        };
        for i in 0..2 {
            o.update(t0 + TICK * i, &busy(1.0));
        }
        assert_eq!(o.level(), 1);
        for i in 2..40 {
            o.update(t0 + TICK * i, &busy(0.2));
        }
        assert_eq!(o.level(), 0);
    }

    #[test]
    fn a_single_slow_pass_is_not_overload() {
        let mut o = Overload::new();
        let t0 = Instant::now();
        let mut s = Sample {
            elapsed: TICK,
            busy: ms(30),
            forwarding: ms(30),
            queue_delay: Some(ms(1)),
            written: 100,
            shed: [0; LEVELS],
        };
        for i in 0..50 {
            // One tick in ten has a 40 ms wait (a keyframe burst), then it is gone.
            s.queue_delay = Some(if i % 10 == 5 { ms(40) } else { ms(1) });
            assert_eq!(o.update(t0 + TICK * i, &s), 0);
        }
    }

    #[test]
    fn a_growing_wait_counts_only_while_forwarding_is_real_work() {
        // Reads come later and later. (a) Another process holds the CPU: the worker works 10%
        // of the time. (b) A flood of garbage at its port: busy all the time, forwarding 2%.
        // Shedding video would win back nothing in either.
        let t0 = Instant::now();
        let levels = |busy: u64, forwarding: u64| {
            let mut o = Overload::new();
            (0..30u32)
                .map(|i| {
                    let s = Sample {
                        elapsed: TICK,
                        busy: ms(busy),
                        forwarding: ms(forwarding),
                        queue_delay: Some(ms(25 + 10 * u64::from(i))),
                        written: 100,
                        shed: [0; LEVELS],
                    };
                    o.update(t0 + TICK * i, &s)
                })
                .collect::<Vec<u8>>()
        };
        assert!(levels(10, 8).iter().all(|&l| l == 0), "idle: {:?}", levels(10, 8));
        assert!(levels(100, 2).iter().all(|&l| l == 0), "flood: {:?}", levels(100, 2));
        // The same waits in a worker busy forwarding: overload.
        assert!(levels(95, 80).iter().any(|&l| l > 0), "forwarding: {:?}", levels(95, 80));
    }

    #[test]
    fn bursty_waits_in_a_worker_that_rests_are_not_overload() {
        // 70% busy, forwarding most of it; the longest wait of each tick jumps between 12 and
        // 35 ms (keyframes fanned out to hundreds) and so often "grows" two ticks in a row.
        let mut o = Overload::new();
        let t0 = Instant::now();
        let waits = [12, 25, 30, 35, 14, 28, 33, 12, 26, 31, 35, 13];
        for i in 0..120u32 {
            let s = Sample {
                elapsed: TICK,
                busy: ms(70),
                forwarding: ms(60),
                queue_delay: Some(ms(waits[i as usize % waits.len()])),
                written: 100,
                shed: [0; LEVELS],
            };
            assert_eq!(o.update(t0 + TICK * i, &s), 0, "tick {i}");
        }
    }
}
