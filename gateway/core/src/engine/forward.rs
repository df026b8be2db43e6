//! The packet's path: a publisher packet is matched to its track and layer (the receive side:
//! activity, loss, keyframes, the cache, audio levels), then for every subscriber of the track
//! the selector decides — drop, forward, switch, start from the cache — and the subscriber's
//! down track carries the decision out. Keyframe requests the decisions call for go upstream
//! after the fan-out, not in the middle of it.

use super::*;
use crate::downtrack::{Forwarded, Written};
use crate::select::{select, DownState, Packet, Verdict, Why};

/// A publisher packet as the fan-out needs it, independent of the `Rtc` it came from (so a
/// packet handed over from another worker can take the same path). The payload is shared.
#[derive(Clone)]
pub(super) struct Inbound {
    pub(super) ssrc: u32,
    /// Extended sequence number.
    pub(super) seq: u64,
    pub(super) ts: u32,
    pub(super) wallclock: Instant,
    pub(super) marker: bool,
    pub(super) payload: Arc<[u8]>,
    /// The header extensions forwarded: audio level, voice activity, video orientation.
    pub(super) ext: ExtensionValues,
}

impl Inbound {
    pub(super) fn from_rtp(p: &RtpPacket) -> Self {
        Self {
            ssrc: *p.header.ssrc,
            seq: *p.seq_no,
            ts: p.header.timestamp,
            wallclock: p.timestamp,
            marker: p.header.marker,
            payload: Arc::clone(&p.payload),
            ext: ExtensionValues {
                audio_level: p.header.ext_vals.audio_level,
                voice_activity: p.header.ext_vals.voice_activity,
                video_orientation: p.header.ext_vals.video_orientation,
                ..Default::default()
            },
        }
    }
}

impl Engine {
    /// Forward one publisher packet to every live subscriber of its track: video only to those
    /// whose layer it is, switching a subscriber to its target layer at that layer's keyframe.
    pub(super) fn forward(&mut self, now: Instant, key: ConnKey, p: RtpPacket) {
        let Self { rooms, conns, cfg, .. } = self;
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
        let Some(ti) = room.track_index(key, mid) else { return };
        let track = &mut room.tracks[ti];
        let Some(li) = track.layer_index(rid, cfg.keyframe_throttle) else { return };
        let video = track.kind == MediaKind::Video;
        if let Some(level) = p.header.ext_vals.audio_level.filter(|_| !video && !track.blocked) {
            track.level.observe(level);
            room.speakers.wake(now);
        }
        self.take_in(now, &room_id, ti, li, Inbound::from_rtp(&p), params);
    }

    /// The receive side of a publisher packet (read here, or relayed from the room's home):
    /// its layer's activity, rate, gaps and keyframe cache, keyframe requests it settles or
    /// calls for, then the fan-out to this worker's subscribers (and, on a spread room's home,
    /// to the workers with subscribers of their own).
    pub(super) fn take_in(
        &mut self,
        now: Instant,
        room_id: &Arc<str>,
        ti: usize,
        li: usize,
        p: Inbound,
        params: PayloadParams,
    ) {
        let Self { rooms, conns, q, counters, cfg, .. } = self;
        let Some(room) = rooms.get_mut(room_id) else { return };
        let mirror = room.home.is_some();
        let Some(track) = room.tracks.get_mut(ti) else { return };
        let video = track.kind == MediaKind::Video;
        let bytes = p.payload.len() as u64;
        let layer = &mut track.layers[li];
        let was_active = layer.active(now);
        layer.last_packet = Some(now);
        layer.rate.add(now, p.payload.len());
        if layer.ssrc != Some(p.ssrc.into()) {
            // A new stream (or a restarted one): its sequence numbers start over.
            layer.ssrc = Some(p.ssrc.into());
            layer.loss = Default::default();
            layer.gop.clear();
        }
        // Gaps are tracked for video only: a lost audio packet is concealed by the decoder, and
        // a keyframe request would not help it (audio has no RTX to repair it either).
        let newest = !video || layer.loss.on_packet(p.seq, now);
        let starts = video && starts_keyframe(params.spec().codec, &p.payload);
        // A keyframe's first packet that comes late (reordered, or repaired by RTX) follows the
        // rest of its frame, which subscribers waiting for a keyframe did not get: starting them
        // on it would leave them a keyframe they can never complete. Ask for another.
        let keyframe = starts && newest;
        if video && cfg.keyframe_cache {
            layer.gop.add(
                keyframe,
                CachedPacket {
                    seq: p.seq,
                    ts: p.ts,
                    marker: p.marker,
                    payload: p.payload.clone(),
                    wallclock: p.wallclock,
                    params,
                    ext: ExtensionValues { video_orientation: p.ext.video_orientation, ..Default::default() },
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
        if !mirror {
            counters.count_in(video, bytes);
        }
        if !was_active && !mirror {
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
        let Some(room) = self.rooms.get(room_id) else { return };
        let Some(track) = room.tracks.get(ti) else { return };
        if track.blocked {
            // Muted by the app backend: measured above, forwarded to nobody.
            if !mirror {
                self.counters.moderated_drops += 1;
            }
            return;
        }
        if room.relay_to != 0 {
            relay::relay_packet(&mut self.q, room.relay_to, room_id, track, li, &p, params, now);
        }
        self.fan_out(now, room_id, ti, li, &p, params, keyframe);
    }

    /// Write one publisher packet (track `ti` of room `room_id`, its layer `li`) to the
    /// subscribers of its track that receive that layer.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fan_out(
        &mut self,
        now: Instant,
        room_id: &str,
        ti: usize,
        li: usize,
        p: &Inbound,
        params: PayloadParams,
        keyframe: bool,
    ) {
        let Self { rooms, conns, q, counters, first_frames, cfg, overload, overload_shed, .. } = self;
        let Some(room) = rooms.get_mut(room_id) else { return };
        let Some(track) = room.tracks.get_mut(ti) else { return };
        let video = track.kind == MediaKind::Video;
        let ssrc = p.ssrc;
        let bytes = p.payload.len() as u64;
        let clock = f64::from(params.spec().clock_rate.get());
        // VP8/VP9 picture numbering, rewritten per subscriber after a layer switch.
        let descriptor =
            if video { PayloadDescriptor::parse(params.spec().codec, &p.payload) } else { PayloadDescriptor::Other };
        let forwarded = Forwarded {
            ssrc,
            seq: p.seq,
            ts: p.ts,
            wallclock: p.wallclock,
            marker: p.marker,
            payload: &p.payload,
            params,
            ext: &p.ext,
            descriptor: &descriptor,
            nackable: video,
        };
        let mut source_changed = false;
        for &(sub_key, out_mid) in &track.outs {
            let Some(sub) = conns.get_mut(&sub_key) else { continue };
            if sub.state != ConnectionState::Ready {
                continue;
            }
            let Conn { rtc, side: Side::Subscribe(side), stats, .. } = sub else { continue };
            let slot = side.shed_slot;
            let Some(out) = side.outs.iter_mut().find(|o| o.mid == out_mid) else { continue };
            if !out.live {
                continue;
            }
            if video && *overload > 0 {
                // What the overload level costs this subscriber, by the level at which it would
                // get this packet again (the worker weighs a step down with it).
                if out.target.is_none() && out.current.is_none() && out.natural.is_some() && out.lowest == Some(li) {
                    overload_shed[usize::from(crate::overload::last_level_with_video(slot))] += 1;
                    if p.marker {
                        counters.overload_dropped_frames += 1;
                    }
                } else if out.natural == Some(li) && out.lowest != Some(li) && out.target != Some(li) {
                    overload_shed[0] += 1;
                }
            }
            if video && out.target.is_none() && out.current == Some(li) && out.frame_ts != Some(p.ts) {
                // Shed (overload): the stream ends where the next frame would begin, so the
                // subscriber never gets part of a frame; it starts again at a keyframe.
                out.current = None;
                overload_shed[usize::from(crate::overload::last_level_with_video(slot))] += 1;
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
                        let mut sent = Vec::new();
                        let (packets, bytes) =
                            out.replay(now, rtc, gop, ssrc, clock, cfg.direct_send.then_some(&mut sent));
                        stats.rtp_packets_out += packets;
                        stats.rtp_bytes_out += bytes;
                        counters.count_out_many(true, packets, bytes);
                        counters.keyframe_cache_packets += packets;
                        counters.keyframe_cache_starts += 1;
                        if let Some(t0) = out.ttff_from.take() {
                            first_frames.push(now.saturating_duration_since(t0));
                        }
                        out.current = Some(li);
                        for t in sent {
                            sub.transmit(t, q);
                        }
                        sub.drain(now, q);
                    }
                    continue;
                }
                Verdict::Switch { layer_change } => {
                    out.switch_source(now, ssrc, p.seq, p.ts, clock);
                    if video {
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
            let written = out.write(now, rtc, &forwarded, cfg.direct_send, &mut q.spare);
            if matches!(written, Written::Not) {
                continue;
            }
            // Per packet per subscriber: only when the publisher's payload type changes (the
            // lookup compares mids as strings, ~1.5% of a forward at fan-out 100).
            if out.noted_pt != Some(params.pt()) {
                note_codec(stats, out_mid, params);
                out.noted_pt = Some(params.pt());
            }
            stats.rtp_packets_out += 1;
            stats.rtp_bytes_out += bytes;
            counters.count_out(video, bytes);
            if video {
                out.frame_ts = Some(p.ts);
                if p.marker && out.target.is_none() {
                    // The last packet of the frame in flight when the stream was shed.
                    out.current = None;
                }
            }
            match written {
                Written::Sent(t) => {
                    sub.transmit(t, q);
                    sub.sent_directly(now, cfg.direct_round_every, q);
                }
                _ => sub.drain(now, q),
            }
        }
        if source_changed {
            // The publisher restarted this layer's stream: subscribers need a keyframe of it.
            want_keyframe(now, track, li, conns, q, counters);
        }
    }
}
