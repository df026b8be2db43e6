//! The synthetic media: short encoded clips (generated once by `media/generate.sh`, committed,
//! embedded in the binary) parsed into frames, and the RTP packetizers that turn a frame into
//! payloads. A publisher replays a clip in a loop with continuous RTP timestamps.
//!
//! Packetization is ours rather than str0m's frame-level `Writer`: the publisher must know every
//! payload it sends (the subscribers recognise packets by payload, see `stats`), and str0m's
//! packetizers are outside its versioned API. The formats are the RFCs' simplest correct ones:
//! VP8 with a 15-bit picture id (RFC 7741), H.264 single NAL units and FU-A (RFC 6184,
//! packetization-mode 1), Opus one frame per packet (RFC 7587).

use std::fmt;

use test_peer::vp8;

/// Largest RTP payload we produce; str0m adds the header, extensions and the SRTP tag and must
/// stay under its ~1150-byte datagram target.
pub const MAX_PAYLOAD: usize = 1100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum VideoCodec {
    Vp8,
    H264,
}

impl fmt::Display for VideoCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VideoCodec::Vp8 => "vp8",
            VideoCodec::H264 => "h264",
        })
    }
}

impl VideoCodec {
    /// The codec as str0m names it.
    pub fn codec(self) -> str0m::format::Codec {
        match self {
            VideoCodec::Vp8 => str0m::format::Codec::Vp8,
            VideoCodec::H264 => str0m::format::Codec::H264,
        }
    }
}

/// One encoded frame of a clip.
#[derive(Clone)]
pub struct Frame {
    /// RTP time from the start of the clip (90 kHz video, 48 kHz audio).
    pub ts: u32,
    pub keyframe: bool,
    /// VP8: the frame. H.264: the access unit's NAL units without start codes (no AUD). Opus:
    /// one packet.
    pub nals: Vec<Vec<u8>>,
}

/// A clip replayed in a loop.
pub struct Clip {
    pub name: &'static str,
    pub width: u32,
    pub height: u32,
    /// The bitrate it was encoded at (what `generate.sh` asked for), bit/s.
    pub nominal_bps: u64,
    pub frames: Vec<Frame>,
    /// RTP time of one loop (the timestamp step from the last frame back to the first).
    pub loop_ticks: u32,
    /// RTP time between frames.
    pub frame_ticks: u32,
    /// Audio: each frame's level as RFC 6464 carries it (−dBov, 127 = silence), measured from
    /// the decoded clip by `media/levels.py`; empty for video.
    pub levels: Vec<u8>,
}

impl Clip {
    /// Average payload bitrate of the clip as stored.
    pub fn measured_bps(&self, clock_rate: u32) -> u64 {
        let bytes: usize = self.frames.iter().flat_map(|f| f.nals.iter()).map(Vec::len).sum();
        (bytes as u64 * 8 * clock_rate as u64) / self.loop_ticks.max(1) as u64
    }

    /// Index of the next keyframe at or after `from` (wrapping), for keyframe requests.
    pub fn next_keyframe(&self, from: usize) -> usize {
        let n = self.frames.len();
        (0..n).map(|i| (from + i) % n).find(|&i| self.frames[i].keyframe).unwrap_or(0)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("clip {name}: {message}")]
pub struct ClipError {
    name: &'static str,
    message: String,
}

fn bad(name: &'static str, message: impl Into<String>) -> ClipError {
    ClipError { name, message: message.into() }
}

/// A simulcast layer as generated: rid, size, bitrate.
pub struct Layer {
    pub rid: &'static str,
    pub width: u32,
    pub height: u32,
    pub bps: u64,
    vp8: &'static [u8],
    h264: &'static [u8],
}

/// The committed clips, lowest layer first (see `media/generate.sh`).
pub const LAYERS: [Layer; 3] = [
    Layer {
        rid: "q",
        width: 320,
        height: 180,
        bps: 150_000,
        vp8: include_bytes!("../media/vp8-q.ivf"),
        h264: include_bytes!("../media/h264-q.h264"),
    },
    Layer {
        rid: "h",
        width: 640,
        height: 360,
        bps: 500_000,
        vp8: include_bytes!("../media/vp8-h.ivf"),
        h264: include_bytes!("../media/h264-h.h264"),
    },
    Layer {
        rid: "f",
        width: 1280,
        height: 720,
        bps: 1_500_000,
        vp8: include_bytes!("../media/vp8-f.ivf"),
        h264: include_bytes!("../media/h264-f.h264"),
    },
];

const OPUS: &[u8] = include_bytes!("../media/opus.ogg");
const OPUS_LEVELS: &[u8] = include_bytes!("../media/opus.levels");
const SILENCE: &[u8] = include_bytes!("../media/silence.ogg");
const SILENCE_LEVELS: &[u8] = include_bytes!("../media/silence.levels");
const VIDEO_FPS: u32 = 30;

/// The layer whose bitrate is nearest to `bps` (for a single-layer publisher).
pub fn nearest_layer(bps: u64) -> usize {
    (0..LAYERS.len()).min_by_key(|&i| LAYERS[i].bps.abs_diff(bps)).unwrap_or(LAYERS.len() - 1)
}

/// Load a video layer of a codec.
pub fn video_clip(codec: VideoCodec, layer: usize) -> Result<Clip, ClipError> {
    let l = &LAYERS[layer];
    match codec {
        VideoCodec::Vp8 => parse_ivf(l, l.vp8),
        VideoCodec::H264 => parse_annexb(l, l.h264),
    }
}

/// What a publisher's microphone hears.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AudioSource {
    /// A 440 Hz tone under pink noise (about −32 dBov): a speaker.
    Tone,
    /// Digital silence: a muted-looking microphone that still sends.
    Silence,
}

/// Load the Opus clip (the tone).
pub fn opus_clip() -> Result<Clip, ClipError> {
    audio_clip(AudioSource::Tone)
}

/// Load an Opus clip with its per-frame audio levels.
pub fn audio_clip(source: AudioSource) -> Result<Clip, ClipError> {
    let (name, ogg, levels) = match source {
        AudioSource::Tone => ("opus", OPUS, OPUS_LEVELS),
        AudioSource::Silence => ("silence", SILENCE, SILENCE_LEVELS),
    };
    let mut clip = parse_ogg_opus(name, ogg)?;
    if levels.is_empty() || levels.iter().any(|l| *l > 127) {
        return Err(bad(name, "its .levels file is empty or not RFC 6464 levels"));
    }
    clip.levels = levels.to_vec();
    Ok(clip)
}

fn le16(b: &[u8], at: usize) -> u32 {
    u32::from(u16::from_le_bytes([b[at], b[at + 1]]))
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// IVF: a 32-byte header ("DKIF", …, width, height, timebase), then frames with a 12-byte header
/// (size, 64-bit pts in timebase units). A VP8 keyframe has bit 0 of its first byte clear.
fn parse_ivf(layer: &Layer, b: &'static [u8]) -> Result<Clip, ClipError> {
    let name = layer.rid;
    if b.len() < 32 || &b[..4] != b"DKIF" || &b[8..12] != b"VP80" {
        return Err(bad(name, "not a VP8 IVF file"));
    }
    let header_len = le16(b, 6) as usize;
    let (den, num) = (le32(b, 16).max(1) as u64, le32(b, 20).max(1) as u64);
    let mut at = header_len;
    let mut frames = Vec::new();
    while at + 12 <= b.len() {
        let size = le32(b, at) as usize;
        let pts = u64::from(le32(b, at + 4)) | (u64::from(le32(b, at + 8)) << 32);
        at += 12;
        let data = b.get(at..at + size).ok_or_else(|| bad(name, "truncated frame"))?;
        at += size;
        if data.is_empty() {
            continue;
        }
        let ts = (pts * 90_000 * num / den) as u32;
        frames.push(Frame { ts, keyframe: data[0] & 1 == 0, nals: vec![data.to_vec()] });
    }
    finish_video(layer, frames)
}

/// Annex-B H.264 with an access unit delimiter (NAL type 9) before every frame.
fn parse_annexb(layer: &Layer, b: &'static [u8]) -> Result<Clip, ClipError> {
    let mut frames: Vec<Frame> = Vec::new();
    let mut au: Vec<Vec<u8>> = Vec::new();
    let flush = |au: &mut Vec<Vec<u8>>, frames: &mut Vec<Frame>| {
        // Only access units with a picture (slice NAL units 1..=5) are frames.
        if au.iter().any(|n| (1..=5).contains(&(n[0] & 0x1f))) {
            let keyframe = au.iter().any(|n| n[0] & 0x1f == 5);
            let ts = frames.len() as u32 * (90_000 / VIDEO_FPS);
            frames.push(Frame { ts, keyframe, nals: std::mem::take(au) });
        }
        au.clear();
    };
    for nal in split_annexb(b) {
        if nal.is_empty() {
            continue;
        }
        if nal[0] & 0x1f == 9 {
            flush(&mut au, &mut frames);
            continue;
        }
        au.push(nal.to_vec());
    }
    flush(&mut au, &mut frames);
    finish_video(layer, frames)
}

/// NAL units of an Annex-B stream (start codes 00 00 01 or 00 00 00 01 removed).
pub fn split_annexb(b: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= b.len() {
        if b[i] == 0 && b[i + 1] == 0 && b[i + 2] == 1 {
            starts.push((i, i + 3));
            i += 3;
        } else {
            i += 1;
        }
    }
    let mut out = Vec::new();
    for (k, &(_, begin)) in starts.iter().enumerate() {
        let mut end = starts.get(k + 1).map(|s| s.0).unwrap_or(b.len());
        // A 4-byte start code leaves one zero at the end of the previous unit.
        while end > begin && b[end - 1] == 0 && k + 1 < starts.len() {
            end -= 1;
        }
        out.push(&b[begin..end]);
    }
    out
}

fn finish_video(layer: &Layer, frames: Vec<Frame>) -> Result<Clip, ClipError> {
    let name = layer.rid;
    if frames.len() < 2 || !frames[0].keyframe {
        return Err(bad(name, "needs at least two frames, the first a keyframe"));
    }
    let frame_ticks = frames[1].ts - frames[0].ts;
    let last = frames[frames.len() - 1].ts;
    Ok(Clip {
        name,
        width: layer.width,
        height: layer.height,
        nominal_bps: layer.bps,
        loop_ticks: last + frame_ticks,
        frame_ticks,
        frames,
        levels: Vec::new(),
    })
}

/// Ogg pages → packets; the first two (OpusHead, OpusTags) are headers. 20 ms per packet.
fn parse_ogg_opus(name: &'static str, b: &[u8]) -> Result<Clip, ClipError> {
    let mut packets: Vec<Vec<u8>> = Vec::new();
    let mut partial: Vec<u8> = Vec::new();
    let mut at = 0;
    while at + 27 <= b.len() {
        if &b[at..at + 4] != b"OggS" {
            return Err(bad(name, format!("no Ogg page at byte {at}")));
        }
        let segments = b[at + 26] as usize;
        let table = b.get(at + 27..at + 27 + segments).ok_or_else(|| bad(name, "truncated page"))?;
        let mut data = at + 27 + segments;
        for &len in table {
            let seg = b.get(data..data + len as usize).ok_or_else(|| bad(name, "truncated segment"))?;
            partial.extend_from_slice(seg);
            data += len as usize;
            if len < 255 {
                packets.push(std::mem::take(&mut partial));
            }
        }
        at = data;
    }
    if packets.len() < 3 || !packets[0].starts_with(b"OpusHead") {
        return Err(bad(name, "not an Ogg Opus file"));
    }
    let frames: Vec<Frame> = packets
        .into_iter()
        .skip(2)
        .enumerate()
        .map(|(i, p)| Frame { ts: i as u32 * 960, keyframe: true, nals: vec![p] })
        .collect();
    let loop_ticks = frames.len() as u32 * 960;
    Ok(Clip {
        name,
        width: 0,
        height: 0,
        nominal_bps: 32_000,
        frames,
        loop_ticks,
        frame_ticks: 960,
        levels: Vec::new(),
    })
}

// ---------------------------------------------------------------------------------------------
// Packetizers
// ---------------------------------------------------------------------------------------------

/// RTP payloads of one frame, in order; the last one carries the marker bit (video).
pub trait Packetize: Send {
    fn packetize(&mut self, frame: &Frame, out: &mut Vec<Vec<u8>>);
}

/// RFC 7741 payload descriptor with X=1, I=1 and a 15-bit picture id that advances per frame.
pub struct Vp8Packetizer {
    picture_id: u16,
}

impl Vp8Packetizer {
    pub fn new(first_picture_id: u16) -> Self {
        Self { picture_id: first_picture_id & 0x7fff }
    }
}

impl Packetize for Vp8Packetizer {
    fn packetize(&mut self, frame: &Frame, out: &mut Vec<Vec<u8>>) {
        const DESCRIPTOR: usize = 4;
        let data = &frame.nals[0];
        let pid = self.picture_id;
        self.picture_id = (self.picture_id + 1) & 0x7fff;
        for (i, chunk) in data.chunks(MAX_PAYLOAD - DESCRIPTOR).enumerate() {
            let mut p = Vec::with_capacity(DESCRIPTOR + chunk.len());
            // X | S (start of partition 0 on the first packet), PID 0; I: a 15-bit picture id.
            vp8::push_descriptor(&mut p, i == 0, vp8::Descriptor::PictureId(pid));
            p.extend_from_slice(chunk);
            out.push(p);
        }
    }
}

/// RFC 6184 packetization-mode 1: NAL units that fit go alone, larger ones as FU-A fragments.
pub struct H264Packetizer;

impl Packetize for H264Packetizer {
    fn packetize(&mut self, frame: &Frame, out: &mut Vec<Vec<u8>>) {
        for nal in &frame.nals {
            if nal.len() <= MAX_PAYLOAD {
                out.push(nal.clone());
                continue;
            }
            let indicator = (nal[0] & 0xe0) | 28;
            let kind = nal[0] & 0x1f;
            let body = &nal[1..];
            let chunks = body.chunks(MAX_PAYLOAD - 2);
            let n = chunks.len();
            for (i, chunk) in chunks.enumerate() {
                let mut header = kind;
                if i == 0 {
                    header |= 0x80;
                }
                if i + 1 == n {
                    header |= 0x40;
                }
                let mut p = Vec::with_capacity(2 + chunk.len());
                p.push(indicator);
                p.push(header);
                p.extend_from_slice(chunk);
                out.push(p);
            }
        }
    }
}

/// RFC 7587: one Opus packet per RTP packet, as is.
pub struct OpusPacketizer;

impl Packetize for OpusPacketizer {
    fn packetize(&mut self, frame: &Frame, out: &mut Vec<Vec<u8>>) {
        out.push(frame.nals[0].clone());
    }
}

/// Whether an RTP payload starts a keyframe (what a decoder waits for).
pub fn payload_starts_keyframe(codec: VideoCodec, p: &[u8]) -> bool {
    test_peer::starts_keyframe(codec.codec(), p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_clip_parses_with_two_second_keyframes() {
        for codec in [VideoCodec::Vp8, VideoCodec::H264] {
            for layer in 0..LAYERS.len() {
                let c = video_clip(codec, layer).unwrap();
                assert_eq!(c.frames.len(), 120, "{codec} {}", c.name);
                assert_eq!(c.frame_ticks, 3000);
                assert_eq!(c.loop_ticks, 360_000, "4 s");
                let keys: Vec<usize> = (0..c.frames.len()).filter(|&i| c.frames[i].keyframe).collect();
                assert_eq!(keys, [0, 60], "{codec} {} keyframes", c.name);
                let bps = c.measured_bps(90_000) as f64;
                let nominal = c.nominal_bps as f64;
                assert!(bps > nominal * 0.7 && bps < nominal * 1.3, "{codec} {}: {bps} vs {nominal}", c.name);
            }
        }
        let o = opus_clip().unwrap();
        // 4 s of 20 ms frames, plus one for the encoder's pre-skip.
        assert!((200..=201).contains(&o.frames.len()), "{}", o.frames.len());
        assert_eq!(o.loop_ticks, o.frames.len() as u32 * 960);
    }

    #[test]
    fn audio_clips_carry_their_measured_levels() {
        let median = |c: &Clip| {
            let mut l = c.levels.clone();
            l.sort_unstable();
            l[l.len() / 2]
        };
        let tone = audio_clip(AudioSource::Tone).unwrap();
        let silence = audio_clip(AudioSource::Silence).unwrap();
        for c in [&tone, &silence] {
            assert!(c.levels.len().abs_diff(c.frames.len()) <= 1, "{}: a level per frame", c.name);
        }
        // The tone (volume 0.3 of ffmpeg's sine under pink noise) is about −32 dBov: a speaker
        // by the gateway's −50 dBov rule; silence is 127.
        assert!((25..=40).contains(&median(&tone)), "{}", median(&tone));
        assert!(silence.levels.iter().all(|l| *l == 127));
        assert!(silence.frames.len() >= 200, "4 s of silence");
    }

    #[test]
    fn packetizers_split_and_mark_keyframes() {
        let clip = video_clip(VideoCodec::Vp8, 2).unwrap();
        let mut out = Vec::new();
        Vp8Packetizer::new(5).packetize(&clip.frames[0], &mut out);
        assert!(out.len() > 5, "a 720p keyframe spans packets");
        assert!(out.iter().all(|p| p.len() <= MAX_PAYLOAD));
        assert!(payload_starts_keyframe(VideoCodec::Vp8, &out[0]));
        assert!(!payload_starts_keyframe(VideoCodec::Vp8, &out[1]), "S bit only on the first");
        let total: usize = out.iter().map(|p| p.len() - 4).sum();
        assert_eq!(total, clip.frames[0].nals[0].len());
        out.clear();
        Vp8Packetizer::new(6).packetize(&clip.frames[1], &mut out);
        assert!(!payload_starts_keyframe(VideoCodec::Vp8, &out[0]));

        let clip = video_clip(VideoCodec::H264, 2).unwrap();
        out.clear();
        H264Packetizer.packetize(&clip.frames[0], &mut out);
        assert!(out.iter().all(|p| p.len() <= MAX_PAYLOAD));
        assert!(out.iter().any(|p| payload_starts_keyframe(VideoCodec::H264, p)));
        // Reassemble the FU-A fragments and compare with the access unit.
        let mut nals: Vec<Vec<u8>> = Vec::new();
        for p in &out {
            if p[0] & 0x1f == 28 {
                if p[1] & 0x80 != 0 {
                    nals.push(vec![(p[0] & 0xe0) | (p[1] & 0x1f)]);
                }
                nals.last_mut().unwrap().extend_from_slice(&p[2..]);
            } else {
                nals.push(p.clone());
            }
        }
        assert_eq!(nals, clip.frames[0].nals);
    }

    #[test]
    fn annexb_split_handles_both_start_codes() {
        let b = [0, 0, 0, 1, 9, 0xf0, 0, 0, 1, 0x67, 1, 2, 0, 0, 0, 1, 0x65, 7];
        assert_eq!(split_annexb(&b), vec![&[9, 0xf0][..], &[0x67, 1, 2][..], &[0x65, 7][..]]);
    }
}
