//! Video frames as a VP8 decoder would take them, from the RTP packets of each received stream:
//! a frame is the packets of one RTP timestamp; it is *whole* when its first packet starts the
//! frame (descriptor S bit, partition 0), its last carries the marker and no sequence number
//! in between is missing; it is *decodable* when it is whole and is a keyframe or follows a
//! decodable frame with the next picture ID (so a frame dropped between two that arrived whole
//! is seen, even where sequence numbers were rewritten to close the gap). A frame that is not
//! whole is *partial*; a whole one that cannot be decoded is *undecodable*.

use std::collections::HashMap;
use std::time::Instant;

use str0m::format::Codec;

use crate::keyframe::starts_keyframe;
use crate::vp8;

/// One frame, when it was complete (or given up: the next frame began).
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    pub ssrc: u32,
    pub ts: u32,
    /// Arrival of its last packet.
    pub at: Instant,
    pub keyframe: bool,
    pub whole: bool,
    pub decodable: bool,
}

#[derive(Debug, Default)]
struct Assembly {
    cur: Option<Building>,
    /// The timestamp of the last frame finished (late packets of it are not a new frame).
    done_ts: Option<u32>,
    /// The last frame was decodable, and its picture ID.
    chain: bool,
    picture: Option<u16>,
}

#[derive(Debug)]
struct Building {
    ts: u32,
    first_seq: u64,
    last_seq: u64,
    packets: u64,
    starts: bool,
    marker: bool,
    keyframe: bool,
    picture: Option<u16>,
    at: Instant,
}

/// Every video stream's frames.
#[derive(Debug, Default)]
pub struct Frames {
    streams: HashMap<u32, Assembly>,
    /// Every frame finished, in order.
    pub frames: Vec<Frame>,
    /// Packets of a frame already finished.
    pub late_packets: u64,
}

impl Frames {
    /// A VP8 packet of stream `ssrc` (extended sequence number `seq`).
    pub fn on_packet(&mut self, at: Instant, ssrc: u32, seq: u64, ts: u32, marker: bool, payload: &[u8]) {
        let a = self.streams.entry(ssrc).or_default();
        if a.done_ts == Some(ts) {
            self.late_packets += 1;
            return;
        }
        if a.cur.as_ref().is_some_and(|c| c.ts != ts) {
            let c = a.cur.take().expect("checked");
            self.frames.push(finish(ssrc, a, c));
        }
        let a = self.streams.get_mut(&ssrc).expect("inserted");
        let c = a.cur.get_or_insert(Building {
            ts,
            first_seq: seq,
            last_seq: seq,
            packets: 0,
            starts: false,
            marker: false,
            keyframe: false,
            picture: None,
            at,
        });
        c.first_seq = c.first_seq.min(seq);
        c.last_seq = c.last_seq.max(seq);
        c.packets += 1;
        c.at = at;
        c.marker |= marker;
        // S bit with partition index 0: the frame's first packet.
        if payload.first().is_some_and(|b| b & 0x10 != 0 && b & 0x07 == 0) {
            c.starts = true;
            c.keyframe = starts_keyframe(Codec::Vp8, payload);
            c.picture = vp8::numbers(payload).map(|(p, _, _)| p);
        }
        if marker {
            let c = a.cur.take().expect("just built");
            self.frames.push(finish(ssrc, a, c));
        }
    }

    pub fn whole(&self) -> usize {
        self.frames.iter().filter(|f| f.whole).count()
    }

    pub fn partial(&self) -> usize {
        self.frames.iter().filter(|f| !f.whole).count()
    }

    pub fn undecodable(&self) -> usize {
        self.frames.iter().filter(|f| f.whole && !f.decodable).count()
    }
}

fn finish(ssrc: u32, a: &mut Assembly, c: Building) -> Frame {
    let whole = c.starts && c.marker && c.packets == c.last_seq - c.first_seq + 1;
    let follows = a.chain && a.picture.zip(c.picture).is_none_or(|(p, q)| (p + 1) % 32_768 == q);
    let decodable = whole && (c.keyframe || follows);
    a.chain = decodable;
    a.picture = c.picture;
    a.done_ts = Some(c.ts);
    Frame { ssrc, ts: c.ts, at: c.at, keyframe: c.keyframe, whole, decodable }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vp8::{push_synthetic_header, Descriptor, Numbering};

    fn packet(start: bool, key: bool, picture: u16) -> Vec<u8> {
        let mut p = Vec::new();
        let n = Numbering { picture_id: picture, tl0_pic_idx: 0, key_idx: 0 };
        push_synthetic_header(&mut p, start, Descriptor::Full(n), key);
        p
    }

    #[test]
    fn whole_partial_and_undecodable_frames() {
        let t = Instant::now();
        let mut f = Frames::default();
        let mut seq = 0;
        let mut frame = |f: &mut Frames, ts: u32, key: bool, pic: u16, skip: Option<usize>| {
            for i in 0..3 {
                seq += 1;
                if skip == Some(i) {
                    continue;
                }
                f.on_packet(t, 1, seq, ts, i == 2, &packet(i == 0, key, pic));
            }
        };
        frame(&mut f, 0, true, 10, None); // keyframe, whole
        frame(&mut f, 3000, false, 11, None); // delta, follows
        frame(&mut f, 6000, false, 12, Some(1)); // a hole: partial
        frame(&mut f, 9000, false, 13, None); // whole but after a partial one: undecodable
        frame(&mut f, 12000, true, 14, None); // a keyframe starts over
        frame(&mut f, 18000, false, 16, None); // picture 15 never came: undecodable
        frame(&mut f, 21000, false, 17, Some(2)); // no marker: given up at the next frame
        frame(&mut f, 24000, true, 18, None);
        let got: Vec<(bool, bool)> = f.frames.iter().map(|x| (x.whole, x.decodable)).collect();
        assert_eq!(
            got,
            [
                (true, true),
                (true, true),
                (false, false),
                (true, false),
                (true, true),
                (true, false),
                (false, false),
                (true, true)
            ]
        );
        assert_eq!((f.whole(), f.partial(), f.undecodable()), (6, 2, 2));
    }
}
