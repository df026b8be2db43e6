//! The receive side of a test peer: every RTP packet str0m hands over is classified once per
//! SSRC (our mid, rid, audio or video, codec by payload type) and counted on its stream —
//! packets, bytes, the sequence span seen (so loss after NACK repair), RFC 3550 jitter, keyframe
//! starts and the first one. With recording on, every packet is also kept whole ([`Received`]),
//! for tests that compare payloads.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use str0m::format::Codec;
use str0m::media::{MediaKind, Mid, Rid};
use str0m::rtp::{RtpPacket, Ssrc};
use str0m::Rtc;

use crate::keyframe::starts_keyframe;

/// One received stream (an incoming SSRC), by first arrival.
#[derive(Debug, Clone)]
pub struct RxStream {
    pub ssrc: Ssrc,
    /// Our mid for it.
    pub mid: Mid,
    pub rid: Option<Rid>,
    pub kind: MediaKind,
    /// By the first packet's payload type.
    pub codec: Option<Codec>,
    /// RTP clock rate: 48 kHz audio, 90 kHz video.
    pub clock: f64,
    pub received: u64,
    pub bytes: u64,
    /// Lowest and highest extended sequence numbers seen.
    pub first_seq: Option<u64>,
    pub max_seq: u64,
    /// RFC 3550 interarrival jitter, in RTP ticks.
    pub jitter: f64,
    /// Arrival (in RTP ticks since the receive side's epoch) and RTP time of the last packet.
    last: Option<(f64, u32)>,
    /// Packets that start a keyframe (video).
    pub keyframes: u64,
    pub first_rx: Option<Instant>,
    pub first_key: Option<Instant>,
}

impl RxStream {
    /// What should have arrived between the first and the last sequence number seen.
    pub fn expected(&self) -> u64 {
        self.first_seq.map_or(0, |f| self.max_seq - f + 1)
    }

    /// Packets missing from that span (after str0m's NACK/RTX repair; duplicates are dropped).
    pub fn lost(&self) -> u64 {
        self.expected().saturating_sub(self.received)
    }

    pub fn jitter_ms(&self) -> f64 {
        self.jitter / self.clock * 1000.0
    }

    /// First packet → first packet that starts a keyframe (what a decoder waits for).
    pub fn first_keyframe_wait(&self) -> Option<Duration> {
        Some(self.first_key?.duration_since(self.first_rx?))
    }
}

/// One received RTP packet, kept whole (recording on).
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    /// Index into [`Rx::streams`] (`None`: str0m knew no stream for the SSRC).
    pub stream: Option<usize>,
    pub kind: MediaKind,
    pub ssrc: Ssrc,
    pub seq: u64,
    pub ts: u32,
    pub payload: Vec<u8>,
    keyframe: bool,
}

impl Received {
    /// The first packet of a keyframe (by the stream's codec, [`starts_keyframe`]).
    pub fn starts_keyframe(&self) -> bool {
        self.keyframe
    }
}

/// What a packet was, as [`Rx::on_rtp`] found it.
#[derive(Debug, Clone, Copy)]
pub struct Classified {
    pub stream: Option<usize>,
    /// Video when str0m knew no stream for the SSRC.
    pub kind: MediaKind,
    pub keyframe: bool,
}

/// A peer's receive side.
#[derive(Debug)]
pub struct Rx {
    /// Arrival times for jitter are counted from here.
    epoch: Instant,
    by_ssrc: HashMap<Ssrc, usize>,
    /// Every stream received, in order of first arrival.
    pub streams: Vec<RxStream>,
    record: bool,
    /// Every packet, in arrival order, when recording.
    pub received: Vec<Received>,
}

impl Rx {
    pub fn new(epoch: Instant, record: bool) -> Self {
        Self { epoch, by_ssrc: HashMap::new(), streams: Vec::new(), record, received: Vec::new() }
    }

    /// Classify and count a packet `rtc` emitted (and record it, if recording). Its arrival is
    /// the packet's receive instant.
    pub fn on_rtp(&mut self, rtc: &mut Rtc, p: &RtpPacket) -> Classified {
        let arrived = p.timestamp;
        let stream = match self.by_ssrc.get(&p.header.ssrc) {
            Some(&i) => Some(i),
            None => self.add_stream(rtc, p),
        };
        let c = match stream {
            Some(i) => {
                let rx = &mut self.streams[i];
                let seq = *p.seq_no;
                rx.first_seq = Some(rx.first_seq.map_or(seq, |f| f.min(seq)));
                rx.max_seq = rx.max_seq.max(seq);
                rx.received += 1;
                rx.bytes += p.payload.len() as u64;
                rx.first_rx.get_or_insert(arrived);
                let arrival = arrived.saturating_duration_since(self.epoch).as_secs_f64() * rx.clock;
                if let Some((last_arrival, last_ts)) = rx.last {
                    let d = (arrival - last_arrival) - f64::from(p.header.timestamp.wrapping_sub(last_ts) as i32);
                    rx.jitter += (d.abs() - rx.jitter) / 16.0;
                }
                rx.last = Some((arrival, p.header.timestamp));
                let keyframe =
                    rx.kind == MediaKind::Video && rx.codec.is_some_and(|codec| starts_keyframe(codec, &p.payload));
                if keyframe {
                    rx.keyframes += 1;
                    rx.first_key.get_or_insert(arrived);
                }
                Classified { stream, kind: rx.kind, keyframe }
            }
            None => Classified { stream: None, kind: MediaKind::Video, keyframe: false },
        };
        if self.record {
            self.received.push(Received {
                at: arrived,
                stream,
                kind: c.kind,
                ssrc: p.header.ssrc,
                seq: *p.seq_no,
                ts: p.header.timestamp,
                payload: p.payload.to_vec(),
                keyframe: c.keyframe,
            });
        }
        c
    }

    fn add_stream(&mut self, rtc: &mut Rtc, p: &RtpPacket) -> Option<usize> {
        let (mid, rid) = rtc.direct_api().stream_rx(&p.header.ssrc).map(|s| (s.mid(), s.rid()))?;
        let kind = rtc.media(mid)?.kind();
        let codec = rtc.codec_config().find(|c| c.pt() == p.header.payload_type).map(|c| c.spec().codec);
        self.streams.push(RxStream {
            ssrc: p.header.ssrc,
            mid,
            rid,
            kind,
            codec,
            clock: if kind == MediaKind::Audio { 48_000.0 } else { 90_000.0 },
            received: 0,
            bytes: 0,
            first_seq: None,
            max_seq: 0,
            jitter: 0.0,
            last: None,
            keyframes: 0,
            first_rx: None,
            first_key: None,
        });
        let i = self.streams.len() - 1;
        self.by_ssrc.insert(p.header.ssrc, i);
        Some(i)
    }

    /// SSRCs of the video streams received, in order of first arrival.
    pub fn video_ssrcs(&self) -> impl Iterator<Item = Ssrc> + '_ {
        self.streams.iter().filter(|s| s.kind == MediaKind::Video).map(|s| s.ssrc)
    }
}
