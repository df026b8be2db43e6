//! The receive side of one encoding of a published track (one, or up to three simulcast
//! layers): [`LayerIn`] with its rid and SSRC, measured bitrate ([`RateMeter`]), keyframe
//! throttle, the sequence gaps that were never repaired ([`LossTracker`]) and the cached group
//! of pictures ([`GopCache`]). Which layer each subscriber gets is `allocator`'s job.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::format::PayloadParams;
use str0m::media::Rid;
use str0m::rtp::{ExtensionValues, Ssrc};

use crate::keyframe::KeyframeThrottle;

/// A layer that sent nothing for this long is not offered to subscribers.
pub const LAYER_IDLE: Duration = Duration::from_secs(2);
/// Gaps remembered per layer; a larger burst counts the rest as lost at once.
const MAX_GAPS: usize = 512;
/// Bitrate measuring window.
const RATE_WINDOW: Duration = Duration::from_millis(500);

/// One encoding of a published track.
pub struct LayerIn {
    pub rid: Option<Rid>,
    /// The SSRC it arrives on (a publisher that restarts the stream gets a new one).
    pub ssrc: Option<Ssrc>,
    pub keyframes: KeyframeThrottle,
    /// Since when the gateway has wanted a keyframe on this layer without one arriving (new
    /// subscriber, layer switch, unrecoverable loss): the request is repeated while it lasts.
    pub keyframe_wanted: Option<Instant>,
    pub rate: RateMeter,
    pub loss: LossTracker,
    pub last_packet: Option<Instant>,
    /// The publisher paused it (str0m's `StreamPaused`).
    pub paused: bool,
    /// The packets since its last keyframe, for subscribers that start on it
    /// (`media.keyframe_cache`).
    pub gop: GopCache,
}

impl LayerIn {
    /// When this layer needs the engine: a throttled keyframe request falls due, a keyframe
    /// asked for is overdue (`retry`), or a loss is given up (`give_up`).
    pub fn poll_timeout(&self, retry: Duration, give_up: Duration) -> Option<Instant> {
        [self.keyframes.poll_timeout(), self.keyframe_wanted.map(|w| w + retry), self.loss.poll_timeout(give_up)]
            .into_iter()
            .flatten()
            .min()
    }

    pub fn new(rid: Option<Rid>, throttle: Duration) -> Self {
        Self {
            rid,
            ssrc: None,
            keyframes: KeyframeThrottle::new(throttle),
            keyframe_wanted: None,
            rate: RateMeter::default(),
            loss: LossTracker::default(),
            last_packet: None,
            paused: false,
            gop: GopCache::default(),
        }
    }

    /// Sending, and recently.
    pub fn active(&self, now: Instant) -> bool {
        !self.paused && self.last_packet.is_some_and(|t| now.saturating_duration_since(t) < LAYER_IDLE)
    }
}

/// One packet of a cached group of pictures, as it came from the publisher.
#[derive(Debug, Clone)]
pub struct CachedPacket {
    /// Extended sequence number.
    pub seq: u64,
    pub ts: u32,
    pub marker: bool,
    pub payload: Arc<[u8]>,
    pub wallclock: Instant,
    pub params: PayloadParams,
    pub ext: ExtensionValues,
}

/// The packets of a layer from its last keyframe on (the whole group of pictures: a decoder
/// needs the keyframe and every frame after it), so a subscriber can start at once instead of
/// waiting for a keyframe round trip to the publisher. Bounded: past [`GopCache::MAX_BYTES`] it
/// is dropped until the next keyframe.
#[derive(Debug, Default, Clone)]
pub struct GopCache {
    /// Sorted by sequence number, no duplicates.
    packets: Vec<CachedPacket>,
    bytes: usize,
    /// The keyframe's first sequence number (`None`: nothing usable cached).
    start: Option<u64>,
}

impl GopCache {
    pub const MAX_BYTES: usize = 2 << 20;

    /// Note a packet of the layer; `keyframe`: it starts a keyframe (and is the newest packet).
    pub fn add(&mut self, keyframe: bool, p: CachedPacket) {
        if keyframe {
            self.clear();
            self.start = Some(p.seq);
        }
        let Some(start) = self.start else { return };
        if p.seq < start {
            return;
        }
        if self.bytes + p.payload.len() > Self::MAX_BYTES {
            self.clear();
            return;
        }
        match self.packets.binary_search_by_key(&p.seq, |c| c.seq) {
            Ok(_) => {}
            Err(i) => {
                self.bytes += p.payload.len();
                self.packets.insert(i, p);
            }
        }
    }

    /// Forget everything (a new stream, or a gap that will never be filled).
    pub fn clear(&mut self) {
        self.packets.clear();
        self.bytes = 0;
        self.start = None;
    }

    /// The cached group if a decoder can start on it: from the keyframe on, no packet missing.
    pub fn complete(&self) -> Option<&[CachedPacket]> {
        let first = self.packets.first()?;
        let last = self.packets.last()?;
        let whole = Some(first.seq) == self.start && last.seq - first.seq + 1 == self.packets.len() as u64;
        whole.then_some(self.packets.as_slice())
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Bitrate over the last completed window.
#[derive(Debug, Default, Clone)]
pub struct RateMeter {
    window_start: Option<Instant>,
    bytes: u64,
    bps: u64,
}

impl RateMeter {
    pub fn add(&mut self, now: Instant, bytes: usize) {
        let start = *self.window_start.get_or_insert(now);
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= RATE_WINDOW {
            self.bps = (self.bytes as f64 * 8.0 / elapsed.as_secs_f64()) as u64;
            self.bytes = 0;
            self.window_start = Some(now);
        }
        self.bytes += bytes as u64;
    }

    /// Bits per second over the last completed window (0 before one completed).
    pub fn bps(&self) -> u64 {
        self.bps
    }
}

/// Sequence numbers that arrived out of order leave gaps; NACK/RTX usually fills them. A gap
/// still open after the give-up time is an unrecoverable loss: the decoder downstream needs a
/// keyframe, so the caller asks for one instead of leaving the subscribers frozen.
#[derive(Debug, Default, Clone)]
pub struct LossTracker {
    highest: Option<u64>,
    /// Missing sequence numbers and when they were found missing, oldest first.
    missing: VecDeque<(u64, Instant)>,
    /// Lost beyond `MAX_GAPS` in one burst, to be reported by the next `expire`.
    overflow: u64,
}

impl LossTracker {
    /// Note an arrival (extended sequence number). Returns whether it is the newest so far (not
    /// a late one: reordered, or repaired by RTX).
    pub fn on_packet(&mut self, seq: u64, now: Instant) -> bool {
        let Some(h) = self.highest else {
            self.highest = Some(seq);
            return true;
        };
        if seq > h {
            let gap = seq - h - 1;
            let tracked = gap.min((MAX_GAPS - self.missing.len().min(MAX_GAPS)) as u64);
            self.overflow += gap - tracked;
            for s in (seq - tracked)..seq {
                self.missing.push_back((s, now));
            }
            self.highest = Some(seq);
            return true;
        }
        if let Some(i) = self.missing.iter().position(|(s, _)| *s == seq) {
            self.missing.remove(i);
        }
        false
    }

    /// Forget gaps open for `give_up` or longer; returns how many.
    pub fn expire(&mut self, now: Instant, give_up: Duration) -> u64 {
        let mut n = std::mem::take(&mut self.overflow);
        while self.missing.front().is_some_and(|(_, t)| now.saturating_duration_since(*t) >= give_up) {
            self.missing.pop_front();
            n += 1;
        }
        n
    }

    /// When the oldest open gap is given up.
    pub fn poll_timeout(&self, give_up: Duration) -> Option<Instant> {
        self.missing.front().map(|(_, t)| *t + give_up)
    }

    pub fn open_gaps(&self) -> usize {
        self.missing.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_that_stay_open_are_unrecoverable() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut l = LossTracker::default();
        for s in [1, 2, 5, 6] {
            l.on_packet(s, t0);
        }
        assert_eq!(l.open_gaps(), 2);
        assert!(!l.on_packet(3, t0 + ms(30)), "repaired by RTX: late");
        assert_eq!(l.expire(t0 + ms(100), ms(200)), 0);
        assert_eq!(l.poll_timeout(ms(200)), Some(t0 + ms(200)));
        assert_eq!(l.expire(t0 + ms(200), ms(200)), 1, "4 never came");
        assert_eq!(l.open_gaps(), 0);
        // A huge jump counts everything beyond the tracked gaps at once.
        l.on_packet(10_006, t0 + ms(300));
        assert_eq!(l.open_gaps(), MAX_GAPS);
        assert_eq!(l.expire(t0 + ms(300), ms(200)), 10_006 - 6 - 1 - MAX_GAPS as u64);
    }

    #[test]
    fn the_rate_meter_measures_whole_windows() {
        let t0 = Instant::now();
        let mut r = RateMeter::default();
        for i in 0..=50 {
            r.add(t0 + Duration::from_millis(i * 10), 1250);
        }
        // 50 packets of 10 kbit in 0.5 s.
        assert_eq!(r.bps(), 1_000_000);
    }
}
