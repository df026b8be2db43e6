//! Does an RTP payload start a keyframe (what a decoder waits for)? One answer per codec, used
//! by the receive side ([`crate::rx`]) and by anyone who writes keyframes and wants to check.

use str0m::format::Codec;

/// Whether `payload` (one RTP payload of `codec`) is the first packet of a keyframe. VP8 and
/// VP9 by their payload descriptors (str0m's detectors); H.264 by an IDR slice or an SPS as a
/// single NAL unit, or the first FU-A fragment of an IDR slice (packetization-mode 1, as the
/// load tester's clips are sent). Other codecs: never.
pub fn starts_keyframe(codec: Codec, payload: &[u8]) -> bool {
    match codec {
        Codec::Vp8 => str0m::format::detect_vp8_keyframe(payload),
        Codec::Vp9 => str0m::format::detect_vp9_keyframe(payload),
        Codec::H264 => h264_starts_keyframe(payload),
        _ => false,
    }
}

fn h264_starts_keyframe(p: &[u8]) -> bool {
    match p.first().map(|b| b & 0x1f) {
        Some(5) | Some(7) => true,
        Some(28) => p.get(1).is_some_and(|h| h & 0x80 != 0 && h & 0x1f == 5),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vp8_by_start_bit_and_payload_header() {
        // No extension: S set, then the payload header's P bit.
        assert!(starts_keyframe(Codec::Vp8, &[0x10, 0x00]));
        assert!(!starts_keyframe(Codec::Vp8, &[0x10, 0x01]));
        assert!(!starts_keyframe(Codec::Vp8, &[0x00, 0x00]), "not the start of the frame");
        // X with I (15-bit picture ID), L, T/K: the header byte comes after all of them.
        assert!(starts_keyframe(Codec::Vp8, &[0x90, 0xf0, 0x81, 0x02, 0x03, 0x04, 0x00]));
        assert!(!starts_keyframe(Codec::Vp8, &[0x90, 0xf0, 0x81, 0x02, 0x03, 0x04, 0x01]));
        assert!(!starts_keyframe(Codec::Vp8, &[0x90, 0xf0, 0x81]), "cut short");
    }

    #[test]
    fn h264_by_nal_type() {
        assert!(starts_keyframe(Codec::H264, &[0x65, 0]), "IDR slice");
        assert!(starts_keyframe(Codec::H264, &[0x67, 0]), "SPS");
        assert!(!starts_keyframe(Codec::H264, &[0x41, 0]), "non-IDR slice");
        assert!(starts_keyframe(Codec::H264, &[0x7c, 0x85]), "FU-A start of an IDR slice");
        assert!(!starts_keyframe(Codec::H264, &[0x7c, 0x05]), "FU-A continuation");
        assert!(!starts_keyframe(Codec::Opus, &[0x65]));
    }
}
