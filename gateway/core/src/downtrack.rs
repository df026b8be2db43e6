//! The down track: a subscriber's copy of one published track. Owns what is per subscriber and
//! per track on the way out — the payload-type map (the publisher's numbers to the
//! subscriber's), sequence number and timestamp rewriting across source switches, VP8/VP9
//! picture renumbering, the subscriber's layer wishes and the layer being forwarded — and the
//! write into the subscriber's `Rtc`. Which packets to write is decided before, by
//! `select::select`; the down track only carries the decision out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::format::PayloadParams;
use str0m::media::{MediaKind, Mid, Pt, Rid};
use str0m::rtp::{ExtensionValues, RtpWrite, Vp8Patch};
use str0m::Rtc;

use crate::descriptor::{rewrite_vp9, vp8_patch, PayloadDescriptor, PictureRewriter};
use crate::layers::CachedPacket;
use crate::rewrite::SeqRewriter;

/// Ticks between the frames of a replayed group of pictures: 1 ms. A decoder gets them as one
/// burst and shows the newest at once; with their original spacing a jitter buffer would hold
/// the live frames back by the age of the keyframe.
pub(crate) const REPLAY_FRAME_STEP_MS: f64 = 1.0;

/// The most packets a subscriber's video stream keeps for NACKs: one per millisecond of
/// `media.rtx_history_ms` (the whole history of a 10 Mbit/s layer in 1,200-byte packets; a
/// faster one keeps the newest that many), at least this many. (str0m's fixed 2,000 let a
/// short history keep more packets than it needs at high rates; measured, the slots
/// themselves cost ~4 KB per stream.)
const RTX_MIN_PACKETS: usize = 256;

/// The RTX slots for a history (see [`RTX_MIN_PACKETS`]).
pub(crate) fn rtx_packets(history: Duration) -> usize {
    (history.as_millis() as usize).max(RTX_MIN_PACKETS)
}
/// str0m's default: queued retransmissions are dropped while they exceed 15% of the bytes sent.
const RTX_RATIO_CAP: Option<f32> = Some(0.15);

/// A subscriber's copy of one published track.
pub(crate) struct DownTrack {
    /// Our mid in the subscriber's session.
    pub mid: Mid,
    pub stream_id: Arc<str>,
    pub kind: MediaKind,
    /// Answered by the subscriber: media may be written.
    pub live: bool,
    /// The m-line was stopped (the track ended).
    pub stopped: bool,
    pub rewrite: SeqRewriter,
    /// VP8/VP9 picture numbering, continuous across layer switches.
    pub pictures: PictureRewriter,
    /// Publisher payload type → ours (`None`: the subscriber cannot take that codec).
    pub pts: Vec<(Pt, Option<Pt>)>,
    /// Packets we wrote; str0m's egress count minus this is what it retransmitted.
    pub written: u64,
    /// Retransmissions already counted.
    pub resent: u64,
    /// The highest layer the subscriber wants (`set_layer`); `None`: the best available.
    pub preferred: Option<Rid>,
    /// Index of the publisher layer to receive (video); `None`: paused or not chosen yet.
    pub target: Option<usize>,
    /// Index of the layer being forwarded now. It becomes `target` at a keyframe of `target`.
    pub current: Option<usize>,
    /// When the target last moved down: moving up again waits for the hold time.
    pub last_down: Option<Instant>,
    /// When the last packet was forwarded (the timestamp advance at a source switch).
    pub last_forward: Option<Instant>,
    /// Since when the subscriber waits for its first frame on this track.
    pub ttff_from: Option<Instant>,
    /// The publisher payload type last recorded in the subscriber's `stats.codecs`.
    pub noted_pt: Option<Pt>,
    /// The subscriber rejected this track (port 0 in its answer), and why: `codec_unsupported`
    /// when it cannot decode the one codec the publication carries.
    pub unavailable: Option<&'static str>,
    /// Since when the estimate has been too low for this track's only layer (it pauses once
    /// that has lasted `allocator::SINGLE_PAUSE_AFTER`).
    pub starved_since: Option<Instant>,
    /// How long the subscriber's stream keeps sent video to answer NACKs; `None` once applied
    /// to the stream (at the first write, before anything is kept, with `set_unpaced`).
    rtx_history: Option<Duration>,
    /// The layer the allocator chose before an overloaded worker capped it (`target` is the
    /// capped one), and the track's lowest layer: what shedding costs the subscriber.
    pub natural: Option<usize>,
    pub lowest: Option<usize>,
    /// The publisher RTP timestamp of the last video packet written: a stream being shed
    /// ends where the next frame would begin.
    pub frame_ts: Option<u32>,
}

/// What became of a packet given to [`DownTrack::write`].
pub(crate) enum Written {
    /// Serialised and encrypted at once: the datagram to send.
    Sent(str0m::net::Transmit),
    /// Queued in the subscriber's `Rtc` (something else waited on the stream): drain it.
    Queued,
    /// Not written (no payload type for the codec, a sequence number from before the switch,
    /// no send stream).
    Not,
}

/// One publisher packet as every down track of its track writes it.
pub(crate) struct Forwarded<'a> {
    pub ssrc: u32,
    /// Extended sequence number.
    pub seq: u64,
    pub ts: u32,
    pub wallclock: Instant,
    pub marker: bool,
    pub payload: &'a Arc<[u8]>,
    pub params: PayloadParams,
    pub ext: &'a ExtensionValues,
    pub descriptor: &'a PayloadDescriptor,
    /// Written resendable (video: the subscriber's NACKs are answered from str0m's buffer).
    pub nackable: bool,
}

impl DownTrack {
    pub fn new(mid: Mid, stream_id: Arc<str>, kind: MediaKind, rewrite: SeqRewriter, rtx_history: Duration) -> Self {
        Self {
            mid,
            stream_id,
            kind,
            live: false,
            stopped: false,
            rewrite,
            pictures: PictureRewriter::default(),
            pts: Vec::new(),
            written: 0,
            resent: 0,
            preferred: None,
            target: None,
            current: None,
            last_down: None,
            last_forward: None,
            ttff_from: None,
            noted_pt: None,
            starved_since: None,
            unavailable: None,
            rtx_history: Some(rtx_history),
            natural: None,
            lowest: None,
            frame_ts: None,
        }
    }

    /// The subscriber's payload type for the publisher's codec, cached per track.
    pub fn map_pt(&mut self, rtc: &Rtc, params: PayloadParams) -> Option<Pt> {
        if let Some((_, local)) = self.pts.iter().find(|(pt, _)| *pt == params.pt()) {
            return *local;
        }
        let mid = self.mid;
        let local = rtc
            .codec_config()
            .match_params(params)
            .map(|p| p.pt())
            .filter(|pt| rtc.media(mid).is_none_or(|m| m.remote_pts().is_empty() || m.remote_pts().contains(pt)));
        if local.is_none() {
            tracing::debug!(%mid, codec = ?params.spec().codec, "subscriber did not accept the publisher's codec");
        }
        self.pts.push((params.pt(), local));
        local
    }

    /// The outgoing stream continues from a new source (a layer switch, a restarted publisher
    /// stream, the first packet) at this packet.
    /// Start over after a pause of the source (the track was muted by the backend): video
    /// waits for a keyframe, and the next packet continues the outgoing numbering.
    pub fn restart(&mut self) {
        if self.kind == MediaKind::Video {
            self.current = None;
        }
        self.rewrite.release_source();
    }

    pub fn switch_source(&mut self, now: Instant, ssrc: u32, seq: u64, ts: u32, clock: f64) {
        let advance = ts_advance(self.last_forward, now, clock);
        self.rewrite.switch(ssrc, seq, ts, advance);
        self.pictures.switch();
    }

    /// Write one packet: straight to an encrypted datagram when the subscriber's stream has
    /// nothing else waiting (str0m's `send_rtp_now`, vendored patch), else into its queue.
    /// A direct send encrypts into a buffer from `spare` when it has one.
    pub fn write(
        &mut self,
        now: Instant,
        rtc: &mut Rtc,
        f: &Forwarded,
        direct: bool,
        spare: &mut Vec<Vec<u8>>,
    ) -> Written {
        let Some(pt) = self.map_pt(rtc, f.params) else { return Written::Not };
        let Some((seq, ts)) = self.rewrite.rewrite(f.ssrc, f.seq, f.ts) else { return Written::Not };
        let (payload, patch) = self.number(f.descriptor, f.payload);
        let mut api = rtc.direct_api();
        if let Some(history) = self.rtx_history {
            // Configured once, at the first write: a `&mut` access to a stream makes the
            // `Rtc`'s next poll sweep everything, which a direct send otherwise spares it.
            let Some(tx) = api.stream_tx_by_mid(self.mid, None) else { return Written::Not };
            // Not through str0m's pacer: the publisher paced this already, and the pacer runs
            // at 1.1x an estimate that random loss pulls down toward the stream's own rate, so
            // packets and their retransmissions waited in its queue (96% of video within two
            // round trips at 5% loss instead of 99.3%). The estimate still chooses the layers.
            tx.set_unpaced(true);
            // str0m keeps 3 s (up to 2,000 packets) per stream by default; a NACK comes within
            // a few round trips, so most of that was memory no request ever reached. Audio is
            // written not resendable: it keeps nothing (not even the buffer's first slots).
            match self.kind {
                MediaKind::Video => tx.set_rtx_cache(rtx_packets(history), history, RTX_RATIO_CAP),
                MediaKind::Audio => tx.set_rtx_cache(0, Duration::ZERO, RTX_RATIO_CAP),
            }
            self.rtx_history = None;
        }
        let mut w = RtpWrite::new(pt, seq.into(), ts, f.wallclock, payload)
            .marker(f.marker)
            .ext_vals(f.ext.clone())
            .nackable(f.nackable);
        if let Some(patch) = patch {
            w = w.vp8_patch(patch);
        }
        let sent = if direct {
            api.send_rtp_now_into(now, self.mid, None, w, spare.pop().unwrap_or_default())
        } else {
            let Some(tx) = api.stream_tx_by_mid(self.mid, None) else { return Written::Not };
            tx.write_rtp(w);
            None
        };
        self.written += 1;
        self.last_forward = Some(now);
        match sent {
            Some(t) => Written::Sent(t),
            None => Written::Queued,
        }
    }

    /// The payload to write and str0m's VP8 patch: after a switch the new source continues the
    /// picture numbering sent so far (VP8 patched while str0m serialises, VP9 copied).
    fn number(&mut self, d: &PayloadDescriptor, payload: &Arc<[u8]>) -> (Arc<[u8]>, Option<Vp8Patch>) {
        match d {
            PayloadDescriptor::Vp8(d, picture) => {
                let patch = self.pictures.rewrite(*picture).and_then(|r| vp8_patch(d, r));
                (Arc::clone(payload), patch)
            }
            PayloadDescriptor::Vp9(d, picture) => match self.pictures.rewrite(*picture) {
                Some(r) => (rewrite_vp9(payload, d, r).into(), None),
                None => (Arc::clone(payload), None),
            },
            PayloadDescriptor::Other => (Arc::clone(payload), None),
        }
    }

    /// Start the track on a cached group of pictures (whose last packet is the live one being
    /// forwarded): sequence numbers continue the outgoing stream, frames are packed
    /// [`REPLAY_FRAME_STEP_MS`] apart ending at the live frame's timestamp, so live packets that
    /// follow keep their spacing. Returns the packets and bytes written. With `direct`, packets
    /// that can go at once are serialised into it; the rest wait in the `Rtc` (drain it).
    pub fn replay(
        &mut self,
        now: Instant,
        rtc: &mut Rtc,
        gop: &[CachedPacket],
        ssrc: u32,
        clock: f64,
        mut direct: Option<&mut Vec<str0m::net::Transmit>>,
    ) -> (u64, u64) {
        let (Some(first), Some(last)) = (gop.first(), gop.last()) else { return (0, 0) };
        let step = ((clock * REPLAY_FRAME_STEP_MS / 1000.0) as u32).max(1);
        let mut frames = 0u32;
        let mut prev_ts = None;
        for c in gop {
            if prev_ts != Some(c.ts) {
                frames += 1;
                prev_ts = Some(c.ts);
            }
        }
        // The timestamp the first frame would have if frames were `step` apart up to the last one.
        let ts_ref = last.ts.wrapping_sub(step.wrapping_mul(frames - 1));
        self.switch_source(now, ssrc, first.seq, ts_ref, clock);
        let (mut packets, mut bytes) = (0, 0);
        let mut k = 0u32;
        let mut prev_ts = None;
        for c in gop {
            if prev_ts.is_some_and(|t| t != c.ts) {
                k += 1;
            }
            prev_ts = Some(c.ts);
            let descriptor = PayloadDescriptor::parse(c.params.spec().codec, &c.payload);
            let f = Forwarded {
                ssrc,
                seq: c.seq,
                ts: ts_ref.wrapping_add(k.wrapping_mul(step)),
                wallclock: c.wallclock,
                marker: c.marker,
                payload: &c.payload,
                params: c.params,
                ext: &c.ext,
                descriptor: &descriptor,
                nackable: true,
            };
            match self.write(now, rtc, &f, direct.is_some(), &mut Vec::new()) {
                Written::Not => continue,
                Written::Sent(t) => direct.as_mut().expect("sent only when direct").push(t),
                Written::Queued => {}
            }
            packets += 1;
            bytes += c.payload.len() as u64;
        }
        (packets, bytes)
    }
}

/// RTP ticks to advance the timestamp by when an outgoing stream changes source: the time since
/// the last forwarded packet.
pub(crate) fn ts_advance(last: Option<Instant>, now: Instant, clock: f64) -> u32 {
    let secs = last.map(|t| now.saturating_duration_since(t).as_secs_f64()).unwrap_or(0.0);
    ((secs * clock) as u32).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rtx_slots_follow_the_history() {
        assert_eq!(rtx_packets(Duration::from_millis(1000)), 1000);
        assert_eq!(rtx_packets(Duration::from_millis(3000)), 3000);
        assert_eq!(rtx_packets(Duration::from_millis(100)), RTX_MIN_PACKETS);
    }
}
