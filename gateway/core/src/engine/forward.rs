//! The packet's path: a publisher packet is matched to its track and layer, then written to
//! every subscriber that receives that layer (switching at keyframes, rewriting sequence numbers,
//! timestamps and VP8/VP9 picture numbering), or started from the keyframe cache.

use super::*;
use crate::select::{select, DownState, Packet, Verdict, Why};

/// Ticks between the frames of a replayed group of pictures: 1 ms. A decoder gets them as one
/// burst and shows the newest at once; with their original spacing a jitter buffer would hold
/// the live frames back by the age of the keyframe.
pub(super) const REPLAY_FRAME_STEP_MS: f64 = 1.0;

/// Start a subscriber's track on a cached group of pictures (whose last packet is the live one
/// being forwarded): sequence numbers continue the outgoing stream, frames are packed 1 ms apart
/// ending at the live frame's timestamp, so live packets that follow keep their spacing.
#[allow(clippy::too_many_arguments)]
pub(super) fn replay_gop(
    now: Instant,
    rtc: &mut Rtc,
    out: &mut TrackOut,
    stats: &mut ConnStats,
    counters: &mut Counters,
    gop: &[CachedPacket],
    ssrc: u32,
    clock: f64,
) {
    let (Some(first), Some(last)) = (gop.first(), gop.last()) else { return };
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
    let advance = ts_advance(out.last_forward, now, clock);
    out.rewrite.switch(ssrc, first.seq, ts_ref, advance);
    out.pictures.switch();
    let mut k = 0u32;
    let mut prev_ts = None;
    for c in gop {
        if prev_ts.is_some_and(|t| t != c.ts) {
            k += 1;
        }
        prev_ts = Some(c.ts);
        let Some(pt) = map_pt(rtc, out, c.params) else { return };
        let Some((seq, ts)) = out.rewrite.rewrite(ssrc, c.seq, ts_ref.wrapping_add(k.wrapping_mul(step))) else {
            continue;
        };
        let mut payload = c.payload.clone();
        let mut patch = None;
        match c.params.spec().codec {
            Codec::Vp8 => {
                if let Ok(d) = Vp8Descriptor::parse(&c.payload) {
                    patch = out.pictures.rewrite(vp8_picture(&d, &c.payload)).and_then(|r| vp8_patch(&d, r));
                }
            }
            Codec::Vp9 => {
                if let Some(d) = Vp9Descriptor::parse(&c.payload) {
                    if let Some(r) = out.pictures.rewrite(d.picture(&c.payload)) {
                        payload = rewrite_vp9(&c.payload, &d, r).into();
                    }
                }
            }
            _ => {}
        }
        let mut api = rtc.direct_api();
        let Some(tx) = api.stream_tx_by_mid(out.mid, None) else { return };
        tx.set_unpaced(true);
        let mut w = RtpWrite::new(pt, seq.into(), ts, c.wallclock, payload)
            .marker(c.marker)
            .ext_vals(c.ext.clone())
            .nackable(true);
        if let Some(patch) = patch {
            w = w.vp8_patch(patch);
        }
        tx.write_rtp(w);
        let bytes = c.payload.len() as u64;
        out.written += 1;
        stats.rtp_packets_out += 1;
        stats.rtp_bytes_out += bytes;
        counters.count_out(true, bytes);
        counters.keyframe_cache_packets += 1;
    }
    out.last_forward = Some(now);
    counters.keyframe_cache_starts += 1;
}

/// RTP ticks to advance the timestamp by when an outgoing stream changes source: the time since
/// the last forwarded packet.
pub(super) fn ts_advance(last: Option<Instant>, now: Instant, clock: f64) -> u32 {
    let secs = last.map(|t| now.saturating_duration_since(t).as_secs_f64()).unwrap_or(0.0);
    ((secs * clock) as u32).max(1)
}

/// The subscriber's payload type for the publisher's codec, cached per track.
pub(super) fn map_pt(rtc: &Rtc, out: &mut TrackOut, params: PayloadParams) -> Option<str0m::media::Pt> {
    if let Some((_, local)) = out.pts.iter().find(|(pt, _)| *pt == params.pt()) {
        return *local;
    }
    let local = rtc
        .codec_config()
        .match_params(params)
        .map(|p| p.pt())
        .filter(|pt| rtc.media(out.mid).is_none_or(|m| m.remote_pts().is_empty() || m.remote_pts().contains(pt)));
    if local.is_none() {
        tracing::debug!(mid = %out.mid, codec = ?params.spec().codec, "subscriber did not accept the publisher's codec");
    }
    out.pts.push((params.pt(), local));
    local
}

impl Engine {
    /// Forward one publisher packet to every live subscriber of its track: video only to those
    /// whose layer it is, switching a subscriber to its target layer at that layer's keyframe.
    pub(super) fn forward(&mut self, now: Instant, key: ConnKey, p: RtpPacket) {
        let Self { rooms, conns, q, counters, cfg, .. } = self;
        let Some(publisher) = conns.get_mut(&key) else { return };
        let bytes = p.payload.len() as u64;
        publisher.stats.rtp_packets_in += 1;
        publisher.stats.rtp_bytes_in += bytes;
        let Some((mid, rid)) = publisher.rtc.direct_api().stream_rx(&p.header.ssrc).map(|s| (s.mid(), s.rid())) else {
            return;
        };
        let Some(params) = publisher.rtc.codec_config().find(|c| c.pt() == p.header.payload_type).copied() else {
            return;
        };
        note_codec(&mut publisher.stats, mid, params);
        let room_id = Arc::clone(&publisher.room);
        let Some(room) = rooms.get_mut(&room_id) else { return };
        let Some(ti) = room.tracks.iter().position(|t| t.conn == key && t.mid == mid) else { return };
        let track = &mut room.tracks[ti];
        let Some(li) = track.layer_index(rid, cfg.keyframe_throttle) else { return };
        let video = track.kind == MediaKind::Video;
        if let Some(level) = p.header.ext_vals.audio_level.filter(|_| !video) {
            track.level.observe(level);
            room.speakers.wake(now);
        }
        let layer = &mut track.layers[li];
        let was_active = layer.active(now);
        layer.last_packet = Some(now);
        layer.rate.add(now, p.payload.len());
        if layer.ssrc != Some(p.header.ssrc) {
            // A new stream (or a restarted one): its sequence numbers start over.
            layer.ssrc = Some(p.header.ssrc);
            layer.loss = Default::default();
            layer.gop.clear();
        }
        // Gaps are tracked for video only: a lost audio packet is concealed by the decoder, and
        // a keyframe request would not help it (audio has no RTX to repair it either).
        let newest = !video || layer.loss.on_packet(*p.seq_no, now);
        let starts = video && starts_keyframe(params.spec().codec, &p.payload);
        // A keyframe's first packet that comes late (reordered, or repaired by RTX) follows the
        // rest of its frame, which subscribers waiting for a keyframe did not get: starting them
        // on it would leave them a keyframe they can never complete. Ask for another.
        let keyframe = starts && newest;
        if video && cfg.keyframe_cache {
            layer.gop.add(
                keyframe,
                CachedPacket {
                    seq: *p.seq_no,
                    ts: p.header.timestamp,
                    marker: p.header.marker,
                    payload: p.payload.clone(),
                    wallclock: p.timestamp,
                    params,
                    ext: ExtensionValues {
                        video_orientation: p.header.ext_vals.video_orientation,
                        ..Default::default()
                    },
                },
            );
        }
        if keyframe {
            layer.keyframe_wanted = None;
        } else if starts {
            let waiting = track.outs.iter().any(|(k, m)| {
                let out = conns.get(k).and_then(|c| c.outs().iter().find(|o| o.mid == *m));
                out.is_some_and(|o| o.target == Some(li) && o.current != Some(li))
            });
            if waiting {
                want_keyframe(now, track, li, conns, q, counters);
            }
        }
        counters.count_in(video, bytes);
        if !was_active {
            if let Some(layers) = track.layers_changed(now) {
                let (room_id, stream_id) = (room_id.to_string(), track.stream_id.to_string());
                q.out.push_back(Output::Event(MediaEvent::StreamLayers { room_id, stream_id, layers }));
            }
        }
        if !was_active && !track.outs.is_empty() {
            // A layer (re)appeared: choose its subscribers' layers before this packet goes out,
            // so a first keyframe is not wasted.
            let subs: Vec<ConnKey> = track.outs.iter().map(|(k, _)| *k).collect();
            for k in subs {
                self.reallocate(now, k);
            }
        }
        // Reallocation leaves the room's track list as it is, so `ti` still names this track.
        self.fan_out(now, key, ti, li, p, params, keyframe);
    }

    /// Write one publisher packet to the subscribers of its track that receive its layer.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fan_out(
        &mut self,
        now: Instant,
        key: ConnKey,
        ti: usize,
        li: usize,
        p: RtpPacket,
        params: PayloadParams,
        keyframe: bool,
    ) {
        let Self { rooms, conns, q, counters, first_frames, cfg, .. } = self;
        let Some(room) = conns.get(&key).and_then(|c| rooms.get_mut(&c.room)) else { return };
        let Some(track) = room.tracks.get_mut(ti) else { return };
        let video = track.kind == MediaKind::Video;
        let ssrc = *p.header.ssrc;
        let bytes = p.payload.len() as u64;
        let clock = f64::from(params.spec().clock_rate.get());
        let ext = ExtensionValues {
            audio_level: p.header.ext_vals.audio_level,
            voice_activity: p.header.ext_vals.voice_activity,
            video_orientation: p.header.ext_vals.video_orientation,
            ..Default::default()
        };
        // VP8/VP9 picture numbering, rewritten per subscriber after a layer switch.
        let codec = params.spec().codec;
        let vp8 = if video && codec == Codec::Vp8 { Vp8Descriptor::parse(&p.payload).ok() } else { None };
        let vp9 = if video && codec == Codec::Vp9 { Vp9Descriptor::parse(&p.payload) } else { None };
        let picture = match (&vp8, &vp9) {
            (Some(d), _) => Some(vp8_picture(d, &p.payload)),
            (_, Some(d)) => Some(d.picture(&p.payload)),
            _ => None,
        };
        let mut source_changed = false;
        for &(sub_key, out_mid) in &track.outs {
            let Some(sub) = conns.get_mut(&sub_key) else { continue };
            if sub.state != ConnectionState::Ready {
                continue;
            }
            let Conn { rtc, side: Side::Subscribe(side), stats, .. } = sub else { continue };
            let Some(out) = side.outs.iter_mut().find(|o| o.mid == out_mid) else { continue };
            if !out.live {
                continue;
            }
            // Decide, then apply.
            let state =
                DownState { current: out.current, target: out.target, same_source: out.rewrite.source() == Some(ssrc) };
            let packet = Packet { video, layer: li, keyframe };
            let layer = &track.layers[li];
            match select(state, packet, cfg.keyframe_cache, || layer.gop.complete().is_some()) {
                Verdict::Forward => {}
                Verdict::Drop(why) => {
                    source_changed |= why == Why::SourceRestarted;
                    continue;
                }
                Verdict::StartFromCache => {
                    // From the cached group of pictures, which ends with this packet.
                    if let Some(gop) = layer.gop.complete() {
                        replay_gop(now, rtc, out, stats, counters, gop, ssrc, clock);
                        if let Some(t0) = out.ttff_from.take() {
                            first_frames.push(now.saturating_duration_since(t0));
                        }
                        out.current = Some(li);
                        sub.drain(now, q);
                    }
                    continue;
                }
                Verdict::Switch { layer_change } => {
                    let advance = ts_advance(out.last_forward, now, clock);
                    out.rewrite.switch(ssrc, *p.seq_no, p.header.timestamp, advance);
                    if video {
                        out.pictures.switch();
                        if layer_change {
                            counters.layer_switches += 1;
                            stats.layer_switches += 1;
                        }
                        out.current = Some(li);
                        if let Some(t0) = out.ttff_from.take() {
                            first_frames.push(now.saturating_duration_since(t0));
                        }
                    }
                }
            }
            let Some(pt) = map_pt(rtc, out, params) else { continue };
            // Per packet per subscriber: only when the publisher's payload type changes (the
            // lookup compares mids as strings, ~1.5% of a forward at fan-out 100).
            if out.noted_pt != Some(params.pt()) {
                note_codec(stats, out_mid, params);
                out.noted_pt = Some(params.pt());
            }
            let Some((seq, ts)) = out.rewrite.rewrite(ssrc, *p.seq_no, p.header.timestamp) else { continue };
            // After a layer switch the new layer continues the picture numbering sent so far.
            let mut payload = None;
            let mut patch = None;
            if let Some(r) = picture.and_then(|pic| out.pictures.rewrite(pic)) {
                if let Some(d) = &vp8 {
                    patch = vp8_patch(d, r);
                } else if let Some(d) = &vp9 {
                    payload = Some(Arc::<[u8]>::from(rewrite_vp9(&p.payload, d, r)));
                }
            }
            let mut api = rtc.direct_api();
            let Some(tx) = api.stream_tx_by_mid(out_mid, None) else { continue };
            // Not through str0m's pacer: the publisher paced this already, and the pacer runs at
            // 1.1x an estimate that random loss pulls down toward the stream's own rate, so
            // packets and their retransmissions waited in its queue (96% of video within two
            // round trips at 5% loss instead of 99.3%). The estimate still chooses the layers.
            // (A field store; cheaper than tracking whether it was set.)
            tx.set_unpaced(true);
            let mut w = RtpWrite::new(pt, seq.into(), ts, p.timestamp, payload.unwrap_or_else(|| p.payload.clone()))
                .marker(p.header.marker)
                .ext_vals(ext.clone())
                .nackable(video);
            if let Some(patch) = patch {
                w = w.vp8_patch(patch);
            }
            tx.write_rtp(w);
            out.written += 1;
            out.last_forward = Some(now);
            stats.rtp_packets_out += 1;
            stats.rtp_bytes_out += bytes;
            counters.count_out(video, bytes);
            sub.drain(now, q);
        }
        if source_changed {
            // The publisher restarted this layer's stream: subscribers need a keyframe of it.
            want_keyframe(now, track, li, conns, q, counters);
        }
    }
}
