//! A fixed amount of forwarding for instruction counting under callgrind, where criterion's
//! adaptive iteration counts get in the way: one publisher, `SUBS` subscribers, `PACKETS`
//! publisher packets, and the count of forwarded datagrams printed, so instructions per forwarded
//! packet per subscriber = callgrind's `Ir` / forwarded.
//!
//! ```text
//! cargo bench -p gateway-core --bench instructions --no-run
//! SUBS=100 BWE=1 valgrind --tool=callgrind --toggle-collect='*measured*' \
//!     target/release/deps/instructions-<hash>
//! ```
//! A warm-up of `WARMUP` (1600) publisher packets — longer than str0m's 3 s RTX cache at the
//! bench's 500 packets/s, so its buffers have grown to their steady size — is not counted.
//! Environment: `SUBS` (100), `PACKETS` (2000), `BWE` (1: bandwidth estimation on, as in
//! production), `DIRECT` (1: the direct send path; 0: the old write-and-poll path), `BATCH`
//! (datagrams per timer check, 1 = every datagram, the worst case), `SRTP` (`aes256gcm`,
//! `aes128gcm`, `aescm`), `ROUND_MS` (20: a subscriber's `Rtc` gets a timeout round at least
//! every 20 ms after direct sends, as in production; 0: only when it asks). Without valgrind it prints the thread CPU time per forwarded packet.

use std::time::Duration;

use gateway_core::sim::bench::{install_srtp_override, thread_cpu_time, Fanout, Srtp, MAX_BATCH};
use gateway_core::CoreConfig;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The counted region (callgrind: `--toggle-collect='*measured*'`).
#[inline(never)]
fn measured(f: &mut Fanout, batch: &[gateway_core::sim::bench::Datagram]) -> usize {
    f.forward(batch)
}

fn main() {
    let subs = env("SUBS", 100);
    let packets = env("PACKETS", 2000);
    let srtp = match std::env::var("SRTP").as_deref() {
        Ok("aes128gcm") => Srtp::AeadAes128Gcm,
        Ok("aescm") => Srtp::AesCm128HmacSha1_80,
        _ => Srtp::AeadAes256Gcm,
    };
    install_srtp_override(srtp);
    let cfg = CoreConfig {
        stats_interval: Duration::from_secs(1),
        bwe: env("BWE", 1) == 1,
        direct_send: env("DIRECT", 1) == 1,
        // 0: timeout rounds only when the subscriber's `Rtc` asks for one.
        direct_round_every: Some(env("ROUND_MS", 20)).filter(|&ms| ms > 0).map(|ms| Duration::from_millis(ms as u64)),
        ..CoreConfig::default()
    };
    let mut f = Fanout::with_config(subs, 1100, 7, cfg);
    f.timer_check_every = env("BATCH", 1);
    f.keepalive();
    let mut left = env("WARMUP", 1600);
    while left > 0 {
        let batch = f.prepare(left.min(100));
        f.forward(&batch);
        f.keepalive();
        left = left.saturating_sub(100);
    }
    let (mut forwarded, mut published, mut cpu) = (0usize, 0usize, Duration::ZERO);
    let mut left = packets;
    while left > 0 {
        let batch = f.prepare(left.min(MAX_BATCH).min(100));
        published += batch.iter().filter(|d| d.rtp).count();
        let t = thread_cpu_time();
        forwarded += measured(&mut f, &batch);
        cpu += thread_cpu_time().saturating_sub(t);
        f.keepalive();
        left = left.saturating_sub(100);
    }
    assert_eq!(f.live_subscribers(), subs, "no subscriber dropped out");
    assert!(forwarded * 100 >= published * subs * 95, "fan-out broke: {forwarded} < {published} x {subs}");
    println!(
        "{srtp} bwe={} direct={} batch={} round_ms={}: {published} publisher packets, {forwarded} forwarded to {subs} subscribers, {:.2} us CPU per forwarded packet",
        env("BWE", 1),
        env("DIRECT", 1),
        f.timer_check_every,
        env("ROUND_MS", 20),
        cpu.as_secs_f64() * 1e6 / forwarded.max(1) as f64
    );
}
