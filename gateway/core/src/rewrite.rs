//! Per-subscriber rewriting of RTP sequence numbers and timestamps.
//!
//! Every outgoing stream has its own sequence space that starts low (str0m and browsers need the
//! first extended sequence number below 65536, see `RtpWrite::new`) and stays continuous. Inputs
//! are str0m's extended (64-bit, unwrapped) sequence numbers, so wraparound of the 16-bit field is
//! handled by construction. Timestamps get a per-subscriber offset, so each outgoing stream has
//! its own timestamp space too (RFC 3550 §5.1: random initial values).
//!
//! The source of an outgoing stream can change: a simulcast layer switch, or a publisher that
//! restarted its stream with a new SSRC. [`SeqRewriter::switch`] rebases so the next packet of the
//! new source follows the last one sent without a gap in sequence numbers and with its timestamp
//! advanced by the time that passed; packets of the new source from before the switch point (late
//! or reordered) would land on numbers already used and are dropped.

/// Outgoing extended sequence numbers never reach this; anything at or above it came from a
/// packet older than the first one forwarded by more than the start value, and is dropped.
const LIMIT: u64 = 1 << 48;

#[derive(Debug, Clone, Copy)]
struct Source {
    id: u32,
    seq_offset: u64,
    ts_offset: u32,
    /// Outgoing numbers at or below this belong to an earlier source.
    floor: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct SeqRewriter {
    start: u64,
    ts_offset: u32,
    source: Option<Source>,
    /// Highest outgoing sequence number and its timestamp.
    last: Option<(u64, u32)>,
    switches: u64,
}

impl SeqRewriter {
    /// `start` is the first outgoing sequence number; keep it well below 65536. `ts_offset` is
    /// added to the timestamps of the first source.
    pub fn new(start: u16, ts_offset: u32) -> Self {
        Self { start: u64::from(start), ts_offset, source: None, last: None, switches: 0 }
    }

    /// The source packets are currently taken from (`None` before the first).
    pub fn source(&self) -> Option<u32> {
        self.source.map(|s| s.id)
    }

    /// Source changes after the first.
    pub fn switches(&self) -> u64 {
        self.switches
    }

    /// Take packets from `source` from now on, starting with the packet (`seq`, `ts`): it gets
    /// the sequence number after the last one sent and a timestamp `ts_advance` ticks after the
    /// last one sent (at least 1). The first source starts at `start` with the constructor's
    /// timestamp offset.
    pub fn switch(&mut self, source: u32, seq: u64, ts: u32, ts_advance: u32) {
        let (next_seq, next_ts, floor) = match self.last {
            Some((last_seq, last_ts)) => {
                self.switches += 1;
                (last_seq + 1, last_ts.wrapping_add(ts_advance.max(1)), Some(last_seq))
            }
            None => (self.start, ts.wrapping_add(self.ts_offset), None),
        };
        self.source = Some(Source {
            id: source,
            seq_offset: next_seq.wrapping_sub(seq),
            ts_offset: next_ts.wrapping_sub(ts),
            floor,
        });
    }

    /// Forget the current source: the next packet (of any source) must come through
    /// [`SeqRewriter::switch`], which continues after the last number sent. For a source that
    /// paused: its numbers jumped while nothing was forwarded.
    pub fn release_source(&mut self) {
        self.source = None;
    }

    /// Map an incoming extended sequence number and timestamp of `source` to the outgoing ones.
    /// A packet of the first source seen switches to it; a packet of another source than the
    /// current one, too old to place, or from before a switch point gives `None`.
    pub fn rewrite(&mut self, source: u32, seq: u64, ts: u32) -> Option<(u64, u32)> {
        if self.source.is_none() {
            self.switch(source, seq, ts, 0);
        }
        let s = self.source?;
        if s.id != source {
            return None;
        }
        let out = seq.wrapping_add(s.seq_offset);
        if out >= LIMIT || s.floor.is_some_and(|f| out <= f) {
            return None;
        }
        let ts = ts.wrapping_add(s.ts_offset);
        if self.last.is_none_or(|(l, _)| out > l) {
            self.last = Some((out, ts));
        }
        Some((out, ts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_released_source_continues_the_numbering_after_a_pause() {
        let mut r = SeqRewriter::new(100, 0);
        for i in 0..10 {
            r.rewrite(7, 5000 + i, 1000 + i as u32 * 960).unwrap();
        }
        // The source went on for 500 packets nobody was sent, then is released and resumed.
        r.release_source();
        assert_eq!(r.source(), None);
        r.switch(7, 5510, 1000 + 510 * 960, 48_000);
        let (seq, ts) = r.rewrite(7, 5510, 1000 + 510 * 960).unwrap();
        assert_eq!(seq, 110, "no gap for the receiver to NACK");
        assert_eq!(ts, 1000 + 9 * 960 + 48_000, "the timestamp moved by the time that passed");
        assert_eq!(r.rewrite(7, 5511, 1000 + 511 * 960).unwrap().0, 111);
    }

    proptest! {
        #[test]
        fn continuous_and_starts_low(start in 0u16..30000, first in 0u64..(1u64 << 40), n in 1usize..3000, ts0: u32, off: u32) {
            let mut r = SeqRewriter::new(start, off);
            let (s0, t0) = r.rewrite(1, first, ts0).unwrap();
            prop_assert_eq!(s0, u64::from(start));
            prop_assert!(s0 < 65536);
            prop_assert_eq!(t0, ts0.wrapping_add(off));
            for i in 1..n as u64 {
                // Timestamps wrap around u32 freely; differences are preserved.
                let (s, t) = r.rewrite(1, first + i, ts0.wrapping_add(i as u32 * 3000)).unwrap();
                prop_assert_eq!(s, s0 + i);
                prop_assert_eq!(t.wrapping_sub(t0), (i as u32).wrapping_mul(3000));
            }
        }

        #[test]
        fn reordered_packets_keep_their_distance(start in 100u16..30000, first in 1000u64..(1u64 << 40), back in 1u64..100) {
            let mut r = SeqRewriter::new(start, 0);
            r.rewrite(1, first, 0).unwrap();
            let (s, _) = r.rewrite(1, first - back, 0).unwrap();
            prop_assert_eq!(s, u64::from(start) - back);
        }

        /// Layers with unrelated sequence and timestamp spaces (anywhere, including just before a
        /// 16-bit or 32-bit wrap), switched between at arbitrary points: the outgoing stream
        /// never repeats or skips a sequence number, and its timestamps only move forward, by
        /// the advance given at each switch.
        #[test]
        fn switching_sources_stays_continuous(
            start in 0u16..30000,
            off: u32,
            layers in proptest::collection::vec((0u64..(1u64 << 40), any::<u32>()), 3),
            plan in proptest::collection::vec((0usize..3, 1u64..400, 1u32..9000), 1..12),
        ) {
            let mut r = SeqRewriter::new(start, off);
            // Where each layer's own sequence/timestamp counters are.
            let mut pos: Vec<(u64, u32)> = layers.clone();
            let mut expect_seq = u64::from(start);
            let mut last_ts: Option<u32> = None;
            let mut current: Option<usize> = None;
            for (layer, packets, advance) in plan {
                let (seq, ts) = pos[layer];
                if current != Some(layer) {
                    r.switch(layer as u32, seq, ts, advance);
                    // A packet of the layer we left is refused from now on.
                    if let Some(old) = current {
                        prop_assert!(r.rewrite(old as u32, pos[old].0, pos[old].1).is_none());
                    }
                }
                for i in 0..packets {
                    let (s, t) = r.rewrite(layer as u32, seq + i, ts.wrapping_add(i as u32 * 90)).unwrap();
                    prop_assert_eq!(s, expect_seq, "sequence numbers are continuous");
                    if let Some(lt) = last_ts {
                        let step = t.wrapping_sub(lt);
                        if i == 0 && current != Some(layer) && current.is_some() {
                            prop_assert_eq!(step, advance, "timestamp advances by the switch gap");
                        } else if i > 0 {
                            prop_assert_eq!(step, 90);
                        }
                        prop_assert!(step < (1 << 31), "timestamps move forward");
                    }
                    last_ts = Some(t);
                    expect_seq += 1;
                }
                // Late packets of the new layer from before its switch point are dropped.
                if seq > 0 && current.is_some() && current != Some(layer) {
                    prop_assert!(r.rewrite(layer as u32, seq - 1, ts).is_none());
                }
                current = Some(layer);
                pos[layer] = (seq + packets, ts.wrapping_add(packets as u32 * 90));
            }
            prop_assert!(u64::from(start) < 65536);
        }
    }

    #[test]
    fn too_old_packets_are_dropped() {
        let mut r = SeqRewriter::new(10, 0);
        r.rewrite(1, 70_000, 0).unwrap();
        assert!(r.rewrite(1, 69_000, 0).is_none());
        // 16-bit wrap of the input is invisible: extended numbers keep counting.
        assert_eq!(r.rewrite(1, 70_000 + 65_536, 0).unwrap().0, 10 + 65_536);
    }

    #[test]
    fn a_new_source_continues_where_the_old_one_stopped() {
        let mut r = SeqRewriter::new(100, 5);
        assert_eq!(r.rewrite(7, 65_530, 1000), Some((100, 1005)));
        assert_eq!(r.rewrite(7, 65_531, 4000), Some((101, 4005)));
        // Another source is not forwarded until switched to.
        assert_eq!(r.rewrite(9, 3, 777), None);
        r.switch(9, 3, 777, 3000);
        assert_eq!(r.rewrite(9, 3, 777), Some((102, 7005)));
        assert_eq!(r.rewrite(9, 4, 777 + 90), Some((103, 7095)));
        assert_eq!(r.rewrite(9, 2, 0), None, "from before the switch");
        assert_eq!(r.switches(), 1);
        assert_eq!(r.source(), Some(9));
    }
}
