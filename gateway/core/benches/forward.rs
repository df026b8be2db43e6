//! Cost of forwarding in the sans-IO core, no sockets: one publisher packet in, one SRTP
//! datagram out per subscriber, at fan-out 1, 10 and 100, for each SRTP profile. Criterion's
//! time is per publisher packet; its throughput (elements = subscribers) turned around is the
//! cost per forwarded packet per subscriber. Time is the thread's CPU time (scheduler
//! accounting), not wall time, so other load on the machine does not count.
//!
//! `cargo bench -p gateway-core --bench forward` (add `-- --quick` for a fast pass, or a filter
//! such as `-- aescm`). Profile with callgrind:
//! `valgrind --tool=callgrind target/release/deps/forward-* --bench --profile-time 5 fanout/aes256gcm/100`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gateway_core::sim::bench::{install_srtp_override, thread_cpu_time, Fanout, Srtp, MAX_BATCH};

const PAYLOAD: usize = 1100;

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout");
    group.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    for srtp in [Srtp::AeadAes256Gcm, Srtp::AeadAes128Gcm, Srtp::AesCm128HmacSha1_80] {
        for subscribers in [1usize, 10, 100] {
            group.throughput(Throughput::Elements(subscribers as u64));
            group.bench_with_input(BenchmarkId::new(srtp.to_string(), subscribers), &subscribers, |b, &n| {
                // Set up here, so a filtered run (or a profiler) only pays for what it measures.
                install_srtp_override(srtp);
                let mut f = Fanout::new(n, PAYLOAD, 7);
                let expected = match srtp {
                    Srtp::AesCm128HmacSha1_80 => "AES_CM_128_HMAC_SHA1_80",
                    _ => "AEAD_AES_256_GCM", // GCM-128 has the same 16-byte tag; inferred as GCM
                };
                f.keepalive();
                assert_eq!(f.srtp_profile().as_deref(), Some(expected), "{srtp}: profile in use");
                b.iter_custom(|iters| {
                    let mut measured = Duration::ZERO;
                    let mut left = iters as usize;
                    while left > 0 {
                        let want = left.min(MAX_BATCH);
                        let batch = f.prepare(want);
                        let packets = batch.iter().filter(|d| d.rtp).count();
                        let t = thread_cpu_time();
                        let sent = f.forward(&batch);
                        measured += thread_cpu_time().saturating_sub(t);
                        // Every packet goes to every subscriber (a publisher's RTX or padding
                        // datagram may look like RTP and not be forwarded, hence the slack).
                        assert!(sent * 100 >= packets * n * 95, "fan-out broke: {sent} < {packets} x {n}");
                        f.keepalive();
                        left -= want;
                    }
                    assert_eq!(f.live_subscribers(), n, "no subscriber dropped out while measuring");
                    measured
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
