//! One room on two media workers (`media.spread`) against one worker, CPU-bound and in
//! process: packets forwarded per second of wall time.
//!
//! - **one worker**: one engine, a publisher and `SUBS` subscribers, on this thread;
//! - **two workers**: the same room spread over two engines (`SpreadFanout`): the home (the
//!   publisher and half the subscribers) on this thread, the mirror (the other half) on a
//!   second thread, every publisher packet handed across a bounded lock-free queue as the
//!   gateway's workers do (payload `Arc`, no copy);
//! - **two engines, one thread** (reference): the spread room with both engines on this
//!   thread, what the relay itself costs.
//!
//! ```text
//! cargo bench -p gateway-core --bench spread
//! SUBS=200 PACKETS=3000 cargo bench -p gateway-core --bench spread
//! ```
//! Production configuration (BWE on, AES-256-GCM). No network and no load tester: the engines
//! do all the work (SRTP unprotect, forwarding, one SRTP protect per subscriber), so on a
//! machine with two free cores the two-worker figure is what a second core adds. The machine
//! must be otherwise idle (wall time). Every run prints the ratio; run it three times and take
//! the median.

use std::time::{Duration, Instant};

use gateway_core::sim::bench::{thread_cpu_time, Fanout, SpreadFanout, MAX_BATCH};
use gateway_core::CoreConfig;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

const PAYLOAD: usize = 1100;
const BATCH: usize = 100;

/// Forwarded datagrams and the wall time they took over `packets` publisher packets (after a
/// warm-up), `forward` being the measured call.
fn run<T>(
    f: &mut T,
    packets: usize,
    prepare: impl Fn(&mut T, usize) -> Vec<gateway_core::sim::bench::Datagram>,
    forward: impl Fn(&mut T, &[gateway_core::sim::bench::Datagram]) -> usize,
    keepalive: impl Fn(&mut T),
) -> (usize, usize, Duration, Duration) {
    for _ in 0..env("WARMUP", 1600) / BATCH {
        let batch = prepare(f, BATCH);
        forward(f, &batch);
        keepalive(f);
    }
    let (mut forwarded, mut published, mut wall, mut cpu) = (0, 0, Duration::ZERO, Duration::ZERO);
    let mut left = packets;
    while left > 0 {
        let batch = prepare(f, left.min(BATCH).min(MAX_BATCH));
        published += batch.iter().filter(|d| d.rtp).count();
        let (t, c) = (Instant::now(), thread_cpu_time());
        forwarded += forward(f, &batch);
        wall += t.elapsed();
        cpu += thread_cpu_time().saturating_sub(c);
        keepalive(f);
        left = left.saturating_sub(BATCH);
    }
    (forwarded, published, wall, cpu)
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not used here.
    let subs = env("SUBS", 100);
    let packets = env("PACKETS", 2000);
    let cfg = CoreConfig { stats_interval: Duration::from_secs(1), ..CoreConfig::default() };

    let mut one = Fanout::with_config(subs, PAYLOAD, 7, cfg.clone());
    let (fwd1, pub1, wall1, _) = run(&mut one, packets, |f, n| f.prepare(n), |f, b| f.forward(b), |f| f.keepalive());
    assert_eq!(one.live_subscribers(), subs, "no subscriber dropped out (one worker)");
    assert!(fwd1 * 100 >= pub1 * subs * 95, "fan-out broke (one worker): {fwd1} < {pub1} x {subs}");
    drop(one);

    let mut spread = SpreadFanout::new(subs, PAYLOAD, 7, cfg);
    let (fwd_s, pub_s, wall_s, _) =
        run(&mut spread, packets, |f, n| f.prepare(n), |f, b| f.forward_serial(b), |f| f.keepalive());
    let (fwd2, pub2, wall2, _) =
        run(&mut spread, packets, |f, n| f.prepare(n), |f, b| f.forward_parallel(b), |f| f.keepalive());
    assert_eq!(spread.live_subscribers(), subs, "no subscriber dropped out (spread)");
    for (fwd, publ, what) in [(fwd_s, pub_s, "serial"), (fwd2, pub2, "parallel")] {
        assert!(fwd * 100 >= publ * subs * 95, "fan-out broke (spread, {what}): {fwd} < {publ} x {subs}");
    }

    let rate = |fwd: usize, wall: Duration| fwd as f64 / wall.as_secs_f64();
    let (r1, rs, r2) = (rate(fwd1, wall1), rate(fwd_s, wall_s), rate(fwd2, wall2));
    println!("1 x {subs}, {packets} publisher packets, BWE on, AES-256-GCM, split {:?}", spread.split);
    println!("one worker:               {r1:>10.0} forwarded packets per wall second ({fwd1} in {wall1:.2?})");
    println!(
        "two engines, one thread:  {rs:>10.0} ({fwd_s} in {wall_s:.2?}; relay overhead {:.1}%)",
        (r1 / rs - 1.0) * 100.0
    );
    println!("two workers (threads):    {r2:>10.0} ({fwd2} in {wall2:.2?})");
    println!("ratio two workers / one worker: {:.2}", r2 / r1);
}
