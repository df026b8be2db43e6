//! What a run measures, shared by every participant task of the process.
//!
//! Publishers and subscribers live in one process, so end-to-end latency needs no clock sync:
//! a publisher records the instant it wrote each packet, keyed by its stream and a hash of the
//! RTP payload; a subscriber hashes the payload it received and looks the instant up. The key is
//! the payload because the gateway rewrites SSRC, sequence number and timestamp per subscriber
//! but forwards payload bytes unchanged. A clip repeats every loop, so a hash can recur: the
//! index keeps the two newest send instants per hash and takes the newest one not after the
//! arrival (right whenever a packet arrives within a loop, 4 s, of being sent). A payload found
//! in no index is counted as `unmatched`: corrupted or not ours.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

/// A fast, non-cryptographic 64-bit hash of a payload (whole payload, 8 bytes at a time).
pub fn payload_hash(p: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = (p.len() as u64).wrapping_mul(K);
    let mut chunks = p.chunks_exact(8);
    for c in &mut chunks {
        let v = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        h = (h ^ v).wrapping_mul(K).rotate_left(29);
    }
    for &b in chunks.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(K).rotate_left(29);
    }
    h ^ (h >> 32)
}

/// One published stream (one simulcast layer): what its publisher sent, and when.
pub struct SentIndex {
    pub id: usize,
    pub publisher: String,
    /// The publisher's mid (and rid for a simulcast layer).
    pub mid: String,
    pub rid: Option<String>,
    pub kind: &'static str,
    pub codec: String,
    pub sent_packets: AtomicU64,
    pub sent_bytes: AtomicU64,
    /// Subscribers currently receiving this stream.
    pub receivers: AtomicU64,
    sent: Mutex<HashMap<u64, [Option<Instant>; 2]>>,
    /// Latency samples (µs) of every subscriber, for per-stream percentiles.
    pub latencies: Mutex<Vec<u32>>,
}

impl SentIndex {
    pub fn record(&self, hash: u64, at: Instant, bytes: usize) {
        self.sent_packets.fetch_add(1, Ordering::Relaxed);
        self.sent_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        let mut map = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        let slot = map.entry(hash).or_insert([None, None]);
        *slot = [Some(at), slot[0]];
    }

    /// When the packet with this payload hash was sent (the newest send not after `arrived`).
    pub fn lookup(&self, hash: u64, arrived: Instant) -> Option<Instant> {
        let map = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        let slot = map.get(&hash)?;
        slot.iter().flatten().copied().find(|t| *t <= arrived)
    }
}

/// Counters every task bumps as things happen (read by the progress line and the sampler).
#[derive(Default)]
pub struct Live {
    pub started: AtomicU64,
    pub joined: AtomicU64,
    /// Connections participants will ask for (publish and subscribe count one each).
    pub requested: AtomicU64,
    pub publish_ready: AtomicU64,
    pub subscribe_ready: AtomicU64,
    pub failed: AtomicU64,
    pub finished: AtomicU64,
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub unmatched: AtomicU64,
}

/// Latency samples of one second of the run.
#[derive(Default, Clone)]
pub struct Second {
    pub latencies_us: Vec<u32>,
}

/// Everything the participant tasks share.
pub struct Shared {
    pub start: Instant,
    pub live: Live,
    streams: Mutex<HashMap<(String, String), Arc<SentIndex>>>,
    all_streams: Mutex<Vec<Arc<SentIndex>>>,
    seconds: Mutex<Vec<Second>>,
}

impl Shared {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            live: Live::default(),
            streams: Mutex::new(HashMap::new()),
            all_streams: Mutex::new(Vec::new()),
            seconds: Mutex::new(Vec::new()),
        }
    }

    /// A publisher announces a stream before it sends on it.
    pub fn register(
        &self,
        publisher: &str,
        mid: &str,
        rid: Option<&str>,
        kind: &'static str,
        codec: &str,
    ) -> Arc<SentIndex> {
        let mut all = self.all_streams.lock().unwrap_or_else(|e| e.into_inner());
        let idx = Arc::new(SentIndex {
            id: all.len(),
            publisher: publisher.to_owned(),
            mid: mid.to_owned(),
            rid: rid.map(str::to_owned),
            kind,
            codec: codec.to_owned(),
            sent_packets: AtomicU64::new(0),
            sent_bytes: AtomicU64::new(0),
            receivers: AtomicU64::new(0),
            sent: Mutex::new(HashMap::new()),
            latencies: Mutex::new(Vec::new()),
        });
        all.push(Arc::clone(&idx));
        // Simulcast layers share a mid; the gateway forwards one of them, found by payload.
        let mut map = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        map.entry((publisher.to_owned(), mid.to_owned())).or_insert_with(|| Arc::clone(&idx));
        idx
    }

    /// Every layer a publisher sends on a mid (one unless simulcast).
    pub fn layers(&self, publisher: &str, mid: &str) -> Vec<Arc<SentIndex>> {
        let all = self.all_streams.lock().unwrap_or_else(|e| e.into_inner());
        all.iter().filter(|s| s.publisher == publisher && s.mid == mid).cloned().collect()
    }

    pub fn streams(&self) -> Vec<Arc<SentIndex>> {
        self.all_streams.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Seconds since the start of the run.
    pub fn second_of(&self, t: Instant) -> usize {
        t.saturating_duration_since(self.start).as_secs() as usize
    }

    /// Add latency samples `(second, µs)`.
    pub fn add_latencies(&self, samples: &[(u32, u32)]) {
        let mut secs = self.seconds.lock().unwrap_or_else(|e| e.into_inner());
        for &(s, us) in samples {
            let s = s as usize;
            if secs.len() <= s {
                secs.resize(s + 1, Second::default());
            }
            secs[s].latencies_us.push(us);
        }
    }

    /// Latency samples of seconds `from..to`.
    pub fn latencies_between(&self, from: usize, to: usize) -> Vec<u32> {
        let secs = self.seconds.lock().unwrap_or_else(|e| e.into_inner());
        secs.iter().take(to).skip(from).flat_map(|s| s.latencies_us.iter().copied()).collect()
    }

    pub fn seconds(&self) -> Vec<Second> {
        self.seconds.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Percentiles of a sample (nearest rank), in the unit of the sample.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(values: &mut [f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        values.sort_by(|a, b| a.total_cmp(b));
        let rank = |q: f64| values[((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
        Self {
            count: values.len(),
            mean: values.iter().sum::<f64>() / values.len() as f64,
            p50: rank(0.50),
            p95: rank(0.95),
            p99: rank(0.99),
            max: values[values.len() - 1],
        }
    }

    /// From microsecond samples, in milliseconds.
    pub fn of_us_as_ms(samples: &[u32]) -> Self {
        let mut v: Vec<f64> = samples.iter().map(|&us| us as f64 / 1000.0).collect();
        Self::of(&mut v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = Percentiles::of(&mut v);
        assert_eq!((p.p50, p.p95, p.p99, p.max, p.count), (50.0, 95.0, 99.0, 100.0, 100));
        assert_eq!(Percentiles::of(&mut []).count, 0);
    }

    #[test]
    fn index_finds_the_newest_send_not_after_arrival() {
        let shared = Shared::new(Instant::now());
        let idx = shared.register("p", "0", None, "video", "vp8");
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(4);
        let h = payload_hash(b"same payload in two loops");
        idx.record(h, t0, 10);
        idx.record(h, t1, 10);
        assert_eq!(idx.lookup(h, t0 + Duration::from_millis(3)), Some(t0));
        assert_eq!(idx.lookup(h, t1 + Duration::from_millis(3)), Some(t1));
        assert_eq!(idx.lookup(payload_hash(b"other"), t1), None);
        assert_eq!(idx.sent_packets.load(Ordering::Relaxed), 2);
        assert_ne!(payload_hash(b"abcdefgh1"), payload_hash(b"abcdefgh2"));
        assert_ne!(payload_hash(&[0; 16]), payload_hash(&[0; 17]));
    }
}
