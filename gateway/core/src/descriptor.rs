//! Per-subscriber rewriting of the picture numbering inside VP8 and VP9 payload descriptors.
//!
//! A VP8 (RFC 7741 §4.2) or VP9 (RFC 9628 §4.2) receiver links frames by the descriptor's picture
//! ID and, with temporal layers, its TL0PICIDX; VP8 also carries KEYIDX. Each simulcast layer of a
//! publisher numbers its pictures on its own, so a subscriber moved from one layer to another
//! would see those numbers jump, often backwards: Chromium then takes the new layer's keyframe
//! for an old frame and decodes the new layer's delta frames on the old layer's pictures (green
//! blocks that never clear). [`PictureRewriter`] keeps one continuous numbering per outgoing
//! stream: at a switch (always at a keyframe) the new source continues from the last numbers
//! sent, and every later packet of that source is shifted by the same offsets.
//!
//! Until the first switch the offsets are zero and packets go out untouched, so a stream that
//! never switches costs nothing. VP8 is patched by str0m while it serialises the packet
//! (`RtpWrite::vp8_patch`, no copy); VP9 has no such hook, so a switched VP9 stream's packets
//! are copied with the new bytes ([`rewrite_vp9`]).

/// Picture IDs are 15 bits (or 7 in VP8/VP9's short form).
const PID_SPACE: u32 = 1 << 15;
/// VP8 KEYIDX is 5 bits.
const KEYIDX_SPACE: u32 = 1 << 5;

/// The numbering fields of one packet's descriptor (absent fields are `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Picture {
    /// Picture ID and whether it is the 15-bit form (else 7-bit).
    pub picture_id: Option<(u16, bool)>,
    pub tl0_pic_idx: Option<u8>,
    pub key_idx: Option<u8>,
}

/// Values to write into a packet's descriptor (only the fields it has).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rewritten {
    pub picture_id: Option<u16>,
    pub tl0_pic_idx: Option<u8>,
    pub key_idx: Option<u8>,
}

/// One outgoing video stream's picture numbering, continuous across source switches.
#[derive(Debug, Clone, Default)]
pub struct PictureRewriter {
    /// Added to the current source's values, modulo each field's space.
    pid_offset: u16,
    tl0_offset: u8,
    key_offset: u8,
    /// The next packet starts a new source: compute the offsets from it.
    rebase: bool,
    /// Whether any packet went out yet (the first source keeps its own numbers).
    started: bool,
    /// Newest values sent: picture ID (and whether 15-bit), TL0PICIDX, KEYIDX.
    last_pid: Option<(u16, bool)>,
    last_tl0: Option<u8>,
    last_key: Option<u8>,
}

fn pid_space(wide: bool) -> u32 {
    if wide {
        PID_SPACE
    } else {
        1 << 7
    }
}

/// Whether `b` is ahead of `a` in a wrapping space of `space` values.
fn ahead(a: u32, b: u32, space: u32) -> bool {
    let d = (b + space - a) % space;
    d != 0 && d < space / 2
}

impl PictureRewriter {
    /// The outgoing stream takes its packets from another source from the next packet on (which
    /// is the first packet of a keyframe of that source).
    pub fn switch(&mut self) {
        if self.started {
            self.rebase = true;
        }
    }

    /// Whether packets are rewritten at all (a switch happened and the offsets are not zero).
    pub fn is_identity(&self) -> bool {
        self.pid_offset == 0 && self.tl0_offset == 0 && self.key_offset == 0
    }

    /// The values a packet of the current source with `p` goes out with; `None` when they are
    /// the packet's own.
    pub fn rewrite(&mut self, p: Picture) -> Option<Rewritten> {
        if self.rebase {
            self.rebase = false;
            // Continue one past the newest values sent: the receiver sees the new source's
            // keyframe as the next picture.
            if let (Some((pid, _)), Some((last, wide))) = (p.picture_id, self.last_pid) {
                let next = (u32::from(last) + 1) % pid_space(wide);
                self.pid_offset = ((next + PID_SPACE - u32::from(pid) % PID_SPACE) % PID_SPACE) as u16;
            }
            if let (Some(tl0), Some(last)) = (p.tl0_pic_idx, self.last_tl0) {
                self.tl0_offset = last.wrapping_add(1).wrapping_sub(tl0);
            }
            if let (Some(key), Some(last)) = (p.key_idx, self.last_key) {
                let next = (u32::from(last) + 1) % KEYIDX_SPACE;
                self.key_offset = ((next + KEYIDX_SPACE - u32::from(key) % KEYIDX_SPACE) % KEYIDX_SPACE) as u8;
            }
        }
        self.started = true;
        let out = Rewritten {
            picture_id: p
                .picture_id
                .map(|(pid, wide)| ((u32::from(pid) + u32::from(self.pid_offset)) % pid_space(wide)) as u16),
            tl0_pic_idx: p.tl0_pic_idx.map(|t| t.wrapping_add(self.tl0_offset)),
            key_idx: p.key_idx.map(|k| ((u32::from(k) + u32::from(self.key_offset)) % KEYIDX_SPACE) as u8),
        };
        // Remember the newest values (packets may come reordered). A source whose picture ID
        // form differs from the last one's starts the comparison afresh.
        if let (Some(pid), Some((_, wide))) = (out.picture_id, p.picture_id) {
            let newer = match self.last_pid {
                Some((l, w)) if w == wide => ahead(u32::from(l), u32::from(pid), pid_space(wide)),
                _ => true,
            };
            if newer {
                self.last_pid = Some((pid, wide));
            }
        }
        if let Some(t) = out.tl0_pic_idx {
            if self.last_tl0.is_none_or(|l| ahead(u32::from(l), u32::from(t), 256)) {
                self.last_tl0 = Some(t);
            }
        }
        if let Some(k) = out.key_idx {
            if self.last_key.is_none_or(|l| ahead(u32::from(l), u32::from(k), KEYIDX_SPACE)) {
                self.last_key = Some(k);
            }
        }
        let unchanged = out.picture_id == p.picture_id.map(|(v, _)| v)
            && out.tl0_pic_idx == p.tl0_pic_idx
            && out.key_idx == p.key_idx;
        (!unchanged).then_some(out)
    }
}

/// A video payload's descriptor, parsed once per packet and read by every down track.
pub enum PayloadDescriptor {
    /// Not VP8/VP9, or a descriptor that could not be parsed: nothing to renumber.
    Other,
    Vp8(str0m::rtp::Vp8Descriptor, Picture),
    Vp9(Vp9Descriptor, Picture),
}

impl PayloadDescriptor {
    pub fn parse(codec: str0m::format::Codec, payload: &[u8]) -> Self {
        use str0m::format::Codec;
        match codec {
            Codec::Vp8 => match str0m::rtp::Vp8Descriptor::parse(payload) {
                Ok(d) => {
                    let p = vp8_picture(&d, payload);
                    Self::Vp8(d, p)
                }
                Err(_) => Self::Other,
            },
            Codec::Vp9 => match Vp9Descriptor::parse(payload) {
                Some(d) => {
                    let p = d.picture(payload);
                    Self::Vp9(d, p)
                }
                None => Self::Other,
            },
            _ => Self::Other,
        }
    }
}

/// The numbering fields of a VP8 payload, read with str0m's parser (`None`: not a VP8 payload
/// descriptor str0m can patch).
pub fn vp8_picture(d: &str0m::rtp::Vp8Descriptor, payload: &[u8]) -> Picture {
    // str0m does not say which picture ID form a descriptor uses; the M bit does.
    let wide = vp8_picture_id_offset(payload).and_then(|o| payload.get(o)).is_some_and(|b| b & 0x80 != 0);
    Picture { picture_id: d.picture_id().map(|v| (v, wide)), tl0_pic_idx: d.tl0_pic_idx(), key_idx: d.key_idx() }
}

/// Where a VP8 descriptor's picture ID starts, if it has one.
fn vp8_picture_id_offset(payload: &[u8]) -> Option<usize> {
    let x = payload.first()? & 0x80 != 0;
    let ext = if x { *payload.get(1)? } else { 0 };
    (ext & 0x80 != 0).then_some(2)
}

/// str0m's patch writing `r` into the VP8 payload that `d` was parsed from.
pub fn vp8_patch(d: &str0m::rtp::Vp8Descriptor, r: Rewritten) -> Option<str0m::rtp::Vp8Patch> {
    let mut b = d.patch();
    if let Some(v) = r.picture_id {
        b = b.picture_id(v);
    }
    if let Some(v) = r.tl0_pic_idx {
        b = b.tl0_pic_idx(v);
    }
    if let Some(v) = r.key_idx {
        b = b.key_idx(v);
    }
    b.build().ok()
}

/// Offsets of a VP9 payload descriptor's numbering fields (flexible or not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vp9Descriptor {
    /// Offset of the picture ID and whether it is 15-bit.
    picture_id: Option<(usize, bool)>,
    /// Offset of TL0PICIDX (non-flexible mode with layer indices).
    tl0_pic_idx: Option<usize>,
}

impl Vp9Descriptor {
    /// Parse the fields of RFC 9628 §4.2 needed here; `None` for a payload too short to hold
    /// what its flags announce.
    pub fn parse(payload: &[u8]) -> Option<Self> {
        let b0 = *payload.first()?;
        let (i, l, f) = (b0 & 0x80 != 0, b0 & 0x20 != 0, b0 & 0x10 != 0);
        let mut at = 1;
        let mut picture_id = None;
        if i {
            let wide = payload.get(at)? & 0x80 != 0;
            picture_id = Some((at, wide));
            at += if wide { 2 } else { 1 };
        }
        let mut tl0_pic_idx = None;
        if l {
            at += 1;
            if !f {
                tl0_pic_idx = Some(at);
                at += 1;
            }
        }
        (payload.len() > at).then_some(Self { picture_id, tl0_pic_idx })
    }

    /// The numbering fields of `payload` (the one this was parsed from).
    pub fn picture(&self, payload: &[u8]) -> Picture {
        let picture_id = self.picture_id.and_then(|(o, wide)| {
            let hi = u16::from(*payload.get(o)? & 0x7f);
            Some(if wide { ((hi << 8) | u16::from(*payload.get(o + 1)?), true) } else { (hi, false) })
        });
        let tl0_pic_idx = self.tl0_pic_idx.and_then(|o| payload.get(o).copied());
        Picture { picture_id, tl0_pic_idx, key_idx: None }
    }
}

/// A copy of VP9 `payload` with the numbering fields of `d` set to `r`.
pub fn rewrite_vp9(payload: &[u8], d: &Vp9Descriptor, r: Rewritten) -> Vec<u8> {
    let mut out = payload.to_vec();
    if let (Some((o, wide)), Some(v)) = (d.picture_id, r.picture_id) {
        if wide {
            out[o] = 0x80 | ((v >> 8) as u8 & 0x7f);
            out[o + 1] = v as u8;
        } else {
            out[o] = v as u8 & 0x7f;
        }
    }
    if let (Some(o), Some(v)) = (d.tl0_pic_idx, r.tl0_pic_idx) {
        out[o] = v;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pic(pid: u16, tl0: u8, key: u8) -> Picture {
        Picture { picture_id: Some((pid, true)), tl0_pic_idx: Some(tl0), key_idx: Some(key) }
    }

    /// Apply `r` (or nothing) to `p`: what the receiver reads.
    fn seen(p: Picture, r: Option<Rewritten>) -> (u16, u8, u8) {
        match r {
            Some(r) => (r.picture_id.unwrap(), r.tl0_pic_idx.unwrap(), r.key_idx.unwrap()),
            None => (p.picture_id.unwrap().0, p.tl0_pic_idx.unwrap(), p.key_idx.unwrap()),
        }
    }

    #[test]
    fn a_stream_that_never_switches_is_untouched() {
        let mut r = PictureRewriter::default();
        for i in 0..40_000u32 {
            let p = pic((i % PID_SPACE) as u16, (i / 3) as u8, ((i / 300) % 32) as u8);
            assert_eq!(r.rewrite(p), None);
        }
        assert!(r.is_identity());
    }

    #[test]
    fn a_switch_continues_the_numbers_and_wraps() {
        let mut r = PictureRewriter::default();
        // Layer A near the top of every space.
        for pid in 32_760..32_768u16 {
            assert_eq!(r.rewrite(pic(pid, 255, 31)), None);
        }
        // Layer B starts far away; its keyframe becomes the next picture.
        r.switch();
        let out = r.rewrite(pic(100, 7, 3)).unwrap();
        assert_eq!((out.picture_id, out.tl0_pic_idx, out.key_idx), (Some(0), Some(0), Some(0)));
        let out = r.rewrite(pic(101, 7, 3)).unwrap();
        assert_eq!(out.picture_id, Some(1));
        assert!(!r.is_identity());
    }

    /// The 7-bit picture ID form wraps every 128 pictures (4 s at 30 fps): numbering continues
    /// one per picture across its wraps, across switches between sources of that form, and
    /// into and out of the 15-bit form (whose last value wraps into the 7-bit space).
    #[test]
    fn seven_bit_picture_ids_continue_across_wraps_and_switches() {
        let short = |pid: u16| Picture { picture_id: Some((pid, false)), tl0_pic_idx: None, key_idx: None };
        let wide = |pid: u16| Picture { picture_id: Some((pid, true)), tl0_pic_idx: None, key_idx: None };
        let out = |r: &mut PictureRewriter, p: Picture| {
            r.rewrite(p).map_or(p.picture_id.unwrap().0, |o| o.picture_id.unwrap())
        };
        let mut r = PictureRewriter::default();
        let mut expect = 120u16;
        // A 7-bit source wraps 127 -> 0 untouched.
        for i in 0..20u16 {
            assert_eq!(out(&mut r, short((120 + i) % 128)), expect);
            expect = (expect + 1) % 128;
        }
        // Another 7-bit source, numbered far away, continues it and wraps on its own.
        r.switch();
        for i in 0..200u16 {
            assert_eq!(out(&mut r, short((60 + i) % 128)), expect, "picture {i} of the second source");
            expect = (expect + 1) % 128;
        }
        // A 15-bit source continues from the last 7-bit value ...
        r.switch();
        for i in 0..10u16 {
            assert_eq!(out(&mut r, wide((32_760 + i) % 32_768)), expect + i);
        }
        // ... and a 7-bit one after it from the 15-bit value, wrapped into 7 bits.
        let last_wide = expect + 9;
        r.switch();
        assert_eq!(out(&mut r, short(3)), (last_wide + 1) % 128);
        // A 15-bit source that ends at 32767 hands 0 to the next 7-bit one.
        let mut r = PictureRewriter::default();
        out(&mut r, wide(32_767));
        r.switch();
        assert_eq!(out(&mut r, short(77)), 0);
        assert_eq!(out(&mut r, short(78)), 1);
    }

    #[test]
    fn vp8_descriptor_is_patched_in_place() {
        // X=1 S=1; I L T K; 15-bit picture ID 0x1234; TL0PICIDX 9; TID 0 Y 1 KEYIDX 5; VP8 key.
        let payload = [0x90, 0xf0, 0x80 | 0x12, 0x34, 9, 0x20 | 5, 0x00, 1, 2, 3];
        let d = str0m::rtp::Vp8Descriptor::parse(&payload).unwrap();
        let p = vp8_picture(&d, &payload);
        assert_eq!(p, Picture { picture_id: Some((0x1234, true)), tl0_pic_idx: Some(9), key_idx: Some(5) });
        let patch = vp8_patch(&d, Rewritten { picture_id: Some(0x7ffe), tl0_pic_idx: Some(200), key_idx: Some(31) });
        assert!(patch.is_some());
        // A 7-bit picture ID is reported as such.
        let short = [0x90, 0x80, 0x05, 0x00, 1];
        let d = str0m::rtp::Vp8Descriptor::parse(&short).unwrap();
        assert_eq!(vp8_picture(&d, &short).picture_id, Some((5, false)));
    }

    #[test]
    fn vp9_descriptor_fields_are_read_and_written() {
        // I=1 P=0 L=1 F=0 B=1 E=0 V=0; 15-bit picture ID 0x0abc; layer byte; TL0PICIDX 42.
        let payload = [0xa8, 0x80 | 0x0a, 0xbc, 0x00, 42, 0xff];
        let d = Vp9Descriptor::parse(&payload).unwrap();
        assert_eq!(
            d.picture(&payload),
            Picture { picture_id: Some((0x0abc, true)), tl0_pic_idx: Some(42), key_idx: None }
        );
        let out =
            rewrite_vp9(&payload, &d, Rewritten { picture_id: Some(0x7001), tl0_pic_idx: Some(7), key_idx: None });
        assert_eq!(out, vec![0xa8, 0xf0, 0x01, 0x00, 7, 0xff]);
        // Flexible mode has no TL0PICIDX; a truncated descriptor is refused.
        let flexible = [0x98, 0x05, 0x00, 0xff];
        assert_eq!(Vp9Descriptor::parse(&flexible).unwrap().picture(&flexible).tl0_pic_idx, None);
        assert!(Vp9Descriptor::parse(&[0x80]).is_none());
    }

    proptest! {
        /// Sources with unrelated numbering (anywhere, including just before a wrap), switched
        /// between at arbitrary points: the receiver sees picture IDs go up by one per picture
        /// across every switch, TL0PICIDX by one per base-layer picture, KEYIDX by one per
        /// keyframe — modulo their spaces.
        #[test]
        fn switching_sources_keeps_every_number_continuous(
            starts in proptest::collection::vec((0u16..32768, any::<u8>(), 0u8..32), 3),
            plan in proptest::collection::vec((0usize..3, 1u32..300), 1..12),
        ) {
            let mut r = PictureRewriter::default();
            let mut pos: Vec<(u16, u8, u8)> = starts.clone();
            let mut last: Option<(u16, u8, u8)> = None;
            let mut current = None;
            for (src, pictures) in plan {
                if current != Some(src) {
                    r.switch();
                    // A switch lands on a keyframe: a base-layer picture with a new KEYIDX.
                    let (pid, tl0, key) = pos[src];
                    pos[src] = (pid, tl0.wrapping_add(1), (key + 1) % 32);
                }
                for n in 0..pictures {
                    let (pid, tl0, key) = pos[src];
                    let out = seen(pic(pid, tl0, key), r.rewrite(pic(pid, tl0, key)));
                    if let Some((lp, lt, lk)) = last {
                        prop_assert_eq!(u32::from(out.0), (u32::from(lp) + 1) % PID_SPACE, "picture ID continues");
                        if current != Some(src) && n == 0 {
                            prop_assert_eq!(out.1, lt.wrapping_add(1), "TL0PICIDX continues at a switch");
                            prop_assert_eq!(u32::from(out.2), (u32::from(lk) + 1) % 32, "KEYIDX continues at a switch");
                        } else {
                            prop_assert_eq!(out.1, lt, "one temporal layer: TL0PICIDX as sent");
                            prop_assert_eq!(out.2, lk);
                        }
                    }
                    last = Some(out);
                    // The next picture of this source (every picture here is base layer only for
                    // TL0PICIDX purposes when it is the keyframe; the rest keep it).
                    pos[src] = (((u32::from(pid) + 1) % PID_SPACE) as u16, tl0, key);
                    current = Some(src);
                }
            }
        }

        /// Reordered packets of the current source keep their distance to the newest one.
        #[test]
        fn reordered_packets_keep_their_distance(start in 0u16..32768, other in 0u16..32768, back in 1u16..100) {
            let mut r = PictureRewriter::default();
            r.rewrite(pic(start, 0, 0));
            r.switch();
            let first = seen(pic(other, 0, 0), r.rewrite(pic(other, 0, 0))).0;
            let ahead_pid = ((u32::from(other) + 200) % PID_SPACE) as u16;
            let newest = seen(pic(ahead_pid, 0, 0), r.rewrite(pic(ahead_pid, 0, 0))).0;
            let old_pid = ((u32::from(ahead_pid) + PID_SPACE - u32::from(back)) % PID_SPACE) as u16;
            let old = seen(pic(old_pid, 0, 0), r.rewrite(pic(old_pid, 0, 0))).0;
            prop_assert_eq!((u32::from(newest) + PID_SPACE - u32::from(old)) % PID_SPACE, u32::from(back));
            prop_assert_eq!((u32::from(newest) + PID_SPACE - u32::from(first)) % PID_SPACE, 200);
        }
    }
}
