//! Per-subscriber rewriting of RTP sequence numbers.
//!
//! Every outgoing stream has its own sequence space that starts low (str0m and browsers need the
//! first extended sequence number below 65536, see `RtpWrite::new`) and stays continuous. Inputs
//! are str0m's extended (64-bit, unwrapped) sequence numbers, so wraparound of the 16-bit field is
//! handled by construction. Timestamps get a per-subscriber offset, so each outgoing stream has
//! its own timestamp space too (RFC 3550 §5.1: random initial values).

/// Outgoing extended sequence numbers never reach this; anything at or above it came from a
/// packet older than the first one forwarded by more than the start value, and is dropped.
const LIMIT: u64 = 1 << 48;

#[derive(Debug, Clone)]
pub struct SeqRewriter {
    start: u64,
    offset: Option<u64>,
    ts_offset: u32,
}

impl SeqRewriter {
    /// `start` is the first outgoing sequence number; keep it well below 65536. `ts_offset` is
    /// added to every timestamp.
    pub fn new(start: u16, ts_offset: u32) -> Self {
        Self { start: u64::from(start), offset: None, ts_offset }
    }

    /// Map an incoming extended sequence number and timestamp to the outgoing ones.
    /// `None` for a packet too old to place (from long before the first forwarded one).
    pub fn rewrite(&mut self, seq: u64, ts: u32) -> Option<(u64, u32)> {
        let offset = *self.offset.get_or_insert(self.start.wrapping_sub(seq));
        let out = seq.wrapping_add(offset);
        if out >= LIMIT {
            return None;
        }
        Some((out, ts.wrapping_add(self.ts_offset)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn continuous_and_starts_low(start in 0u16..30000, first in 0u64..(1u64 << 40), n in 1usize..3000, ts0: u32, off: u32) {
            let mut r = SeqRewriter::new(start, off);
            let (s0, t0) = r.rewrite(first, ts0).unwrap();
            prop_assert_eq!(s0, u64::from(start));
            prop_assert!(s0 < 65536);
            prop_assert_eq!(t0, ts0.wrapping_add(off));
            for i in 1..n as u64 {
                // Timestamps wrap around u32 freely; differences are preserved.
                let (s, t) = r.rewrite(first + i, ts0.wrapping_add(i as u32 * 3000)).unwrap();
                prop_assert_eq!(s, s0 + i);
                prop_assert_eq!(t.wrapping_sub(t0), (i as u32).wrapping_mul(3000));
            }
        }

        #[test]
        fn reordered_packets_keep_their_distance(start in 100u16..30000, first in 1000u64..(1u64 << 40), back in 1u64..100) {
            let mut r = SeqRewriter::new(start, 0);
            r.rewrite(first, 0).unwrap();
            let (s, _) = r.rewrite(first - back, 0).unwrap();
            prop_assert_eq!(s, u64::from(start) - back);
        }
    }

    #[test]
    fn too_old_packets_are_dropped() {
        let mut r = SeqRewriter::new(10, 0);
        r.rewrite(70_000, 0).unwrap();
        assert!(r.rewrite(69_000, 0).is_none());
        // 16-bit wrap of the input is invisible: extended numbers keep counting.
        assert_eq!(r.rewrite(70_000 + 65_536, 0).unwrap().0, 10 + 65_536);
    }
}
