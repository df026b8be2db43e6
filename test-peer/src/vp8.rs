//! Synthetic VP8: the RFC 7741 payload descriptor a sender writes in front of each packet (with
//! the picture numbering an encoder keeps per encoding), the first byte of the VP8 payload
//! header for frames that are only shaped like VP8, and reading the numbering back from a
//! received payload.

/// Bytes of a descriptor with every numbering field ([`Descriptor::Full`]) plus the payload
/// header byte: where a synthetic payload's own content starts.
pub const FULL_HEADER_LEN: usize = 7;

/// The numbering an encoder keeps for one VP8 encoding (each simulcast layer its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Numbering {
    /// 15-bit picture ID.
    pub picture_id: u16,
    pub tl0_pic_idx: u8,
    /// 5-bit KEYIDX.
    pub key_idx: u8,
}

impl Numbering {
    /// Step to the next picture: picture ID and TL0PICIDX advance (every picture is on temporal
    /// layer 0), KEYIDX on keyframes.
    pub fn advance(&mut self, keyframe: bool) {
        self.picture_id = (self.picture_id + 1) % 32_768;
        self.tl0_pic_idx = self.tl0_pic_idx.wrapping_add(1);
        if keyframe {
            self.key_idx = (self.key_idx + 1) % 32;
        }
    }
}

/// What a payload descriptor carries besides the start-of-partition bit.
#[derive(Debug, Clone, Copy)]
pub enum Descriptor {
    /// One byte, no extension.
    Plain,
    /// X and I: a 15-bit picture ID.
    PictureId(u16),
    /// X with I, L, T and K: picture ID, TL0PICIDX, TID 0 with KEYIDX (as browsers send
    /// simulcast).
    Full(Numbering),
}

/// Append a payload descriptor; `start` marks the first packet of a frame (S, partition 0).
pub fn push_descriptor(out: &mut Vec<u8>, start: bool, d: Descriptor) {
    let s = if start { 0x10 } else { 0 };
    match d {
        Descriptor::Plain => out.push(s),
        Descriptor::PictureId(pid) => {
            out.extend_from_slice(&[0x80 | s, 0x80, 0x80 | (pid >> 8) as u8, pid as u8]);
        }
        Descriptor::Full(n) => out.extend_from_slice(&[
            0x80 | s,
            0xf0,
            0x80 | (n.picture_id >> 8) as u8,
            n.picture_id as u8,
            n.tl0_pic_idx,
            n.key_idx & 0x1f,
        ]),
    }
}

/// A descriptor followed by the first byte of a VP8 payload header, P bit clear on a keyframe:
/// enough for keyframe detection on a frame that is only VP8-shaped.
pub fn push_synthetic_header(out: &mut Vec<u8>, start: bool, d: Descriptor, keyframe: bool) {
    push_descriptor(out, start, d);
    out.push(if keyframe { 0x00 } else { 0x01 });
}

/// The picture ID, TL0PICIDX and KEYIDX of a payload's descriptor, if it carries all three.
pub fn numbers(payload: &[u8]) -> Option<(u16, u8, u8)> {
    let d = str0m::rtp::Vp8Descriptor::parse(payload).ok()?;
    Some((d.picture_id()?, d.tl0_pic_idx()?, d.key_idx()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_round_trip_and_detect() {
        let n = Numbering { picture_id: 32_767, tl0_pic_idx: 255, key_idx: 31 };
        let mut p = Vec::new();
        push_synthetic_header(&mut p, true, Descriptor::Full(n), true);
        assert_eq!(p.len(), FULL_HEADER_LEN);
        assert_eq!(numbers(&p), Some((32_767, 255, 31)));
        assert!(crate::starts_keyframe(str0m::format::Codec::Vp8, &p));
        let mut m = n;
        m.advance(true);
        assert_eq!(m, Numbering { picture_id: 0, tl0_pic_idx: 0, key_idx: 0 });
        let mut q = Vec::new();
        push_descriptor(&mut q, false, Descriptor::PictureId(0x1234));
        assert_eq!(q, [0x80, 0x80, 0x92, 0x34]);
        let mut r = Vec::new();
        push_synthetic_header(&mut r, true, Descriptor::Plain, false);
        assert_eq!(r, [0x10, 0x01]);
    }
}
