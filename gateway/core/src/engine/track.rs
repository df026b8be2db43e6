//! The receive side of a published track: its encodings (simulcast layers), where a
//! subscriber may start or switch (keyframe detection), and the room that holds tracks.

use super::*;

/// Most encodings of one published track (browsers send up to three simulcast layers).
pub(super) const MAX_LAYERS: usize = 4;

/// A published track and the subscribers it fans out to.
pub(super) struct TrackIn {
    pub(super) stream_id: Arc<str>,
    pub(super) owner: Arc<str>,
    pub(super) conn: ConnKey,
    pub(super) mid: Mid,
    pub(super) kind: MediaKind,
    /// Its encodings: one, or one per simulcast rid. Indices are stable (layers are only added).
    pub(super) layers: Vec<LayerIn>,
    /// Its subscribers: connection and our mid there (the down track's). Changed only through
    /// [`Room::link`] and [`Room::unlink`].
    pub(super) outs: Vec<(ConnKey, Mid)>,
    /// Which layers were last reported as being sent (`stream_layers`; simulcast only).
    pub(super) announced: Vec<bool>,
    /// The one codec the publication carries (the publisher's answer lists only it), as the
    /// publisher's session numbers it; subscribers are offered only this codec.
    pub(super) codec: Option<PayloadParams>,
    /// Audio: loudness for the room's active speakers.
    pub(super) level: AudioLevel,
    /// The app backend muted it (moderation): its packets are received and measured but
    /// forwarded to nobody, and it is never an active speaker.
    pub(super) blocked: bool,
    /// A mirror of a track on another worker (`relay`): that worker (the room's home) and the
    /// room. Its `conn` is [`relay::MIRROR`]; keyframe requests go to the home.
    pub(super) mirror: Option<(usize, Arc<str>)>,
}

impl TrackIn {
    pub(super) fn layer_index(&mut self, rid: Option<Rid>, throttle: std::time::Duration) -> Option<usize> {
        if let Some(i) = self.layers.iter().position(|l| l.rid == rid) {
            return Some(i);
        }
        if self.layers.len() >= MAX_LAYERS {
            return None;
        }
        self.layers.push(LayerIn::new(rid, throttle));
        Some(self.layers.len() - 1)
    }

    /// The layers a subscriber can be given, lowest bitrate first: those sending now; if none
    /// is (a publisher pausing between bursts), those that have sent and are not paused.
    pub(super) fn ranked(&self, now: Instant) -> Vec<usize> {
        let mut r: Vec<usize> = (0..self.layers.len()).filter(|&i| self.layers[i].active(now)).collect();
        if r.is_empty() {
            let sent = |i: &usize| self.layers[*i].last_packet.is_some() && !self.layers[*i].paused;
            r = (0..self.layers.len()).filter(sent).collect();
        }
        r.sort_by_key(|&i| (self.layers[i].rate.bps(), i));
        r
    }

    /// The layers and whether each is being sent, if that changed since it was last reported
    /// (simulcast tracks only: a single encoding has nothing to choose from).
    pub(super) fn layers_changed(&mut self, now: Instant) -> Option<Vec<LayerInfo>> {
        if self.layers.iter().all(|l| l.rid.is_none()) {
            return None;
        }
        let same = self.announced.len() == self.layers.len()
            && self.layers.iter().zip(&self.announced).all(|(l, a)| l.active(now) == *a);
        if same {
            return None;
        }
        self.announced = self.layers.iter().map(|l| l.active(now)).collect();
        let info = |(l, active): (&LayerIn, &bool)| LayerInfo {
            rid: l.rid.map(|r| r.to_string()).unwrap_or_default(),
            active: *active,
        };
        Some(self.layers.iter().zip(&self.announced).map(info).collect())
    }

    /// When one of its layers needs the engine.
    pub(super) fn poll_timeout(&self, retry: std::time::Duration, give_up: std::time::Duration) -> Option<Instant> {
        self.layers.iter().filter_map(|l| l.poll_timeout(retry, give_up)).min()
    }

    pub(super) fn rid_name(&self, layer: Option<usize>) -> Option<String> {
        layer.and_then(|i| self.layers.get(i)).and_then(|l| l.rid).map(|r| r.to_string())
    }
}

/// Whether an RTP payload starts a keyframe (its first packet: for H.264 the SPS that Chrome
/// puts ahead of the IDR, or the IDR itself). Switching to a layer can only happen here.
pub(super) fn starts_keyframe(codec: Codec, payload: &[u8]) -> bool {
    match codec {
        Codec::Vp8 => str0m::format::detect_vp8_keyframe(payload),
        Codec::H264 => str0m::format::detect_h264_nalu(payload, 7) || str0m::format::detect_h264_keyframe(payload),
        Codec::Vp9 => str0m::format::detect_vp9_keyframe(payload),
        Codec::Av1 => str0m::format::detect_av1_keyframe(payload),
        Codec::H265 => str0m::format::detect_h265_keyframe(payload),
        // No detector: every packet counts, so such streams are never held back.
        _ => true,
    }
}

#[derive(Default)]
pub(super) struct Room {
    pub(super) tracks: Vec<TrackIn>,
    pub(super) conns: Vec<ConnKey>,
    pub(super) speakers: Speakers,
    /// Spread rooms (`relay`): the worker that holds the publishers, if not this one.
    pub(super) home: Option<usize>,
    /// On the home: the workers with subscribers in the room (bits), which get its packets.
    pub(super) relay_to: u64,
    /// On a mirror: whether the home was last told this worker has subscribers here.
    pub(super) interest_sent: bool,
}

impl Room {
    /// The track a publisher sends on `mid`.
    pub(super) fn track_index(&self, publisher: ConnKey, mid: Mid) -> Option<usize> {
        self.tracks.iter().position(|t| t.conn == publisher && t.mid == mid)
    }

    /// `sub` receives track `i` on its section `mid` (the down track is the subscriber's).
    pub(super) fn link(&mut self, i: usize, sub: ConnKey, mid: Mid) {
        if let Some(t) = self.tracks.get_mut(i) {
            t.outs.push((sub, mid));
        }
    }

    /// A connection leaves the room: it receives nothing any more.
    pub(super) fn unlink(&mut self, key: ConnKey) {
        self.conns.retain(|k| *k != key);
        for t in self.tracks.iter_mut() {
            t.outs.retain(|(k, _)| *k != key);
        }
    }

    /// When one of its tracks or its speaker list needs the engine. `conns` gives each track's
    /// publisher (its round trip sets how long a loss may stay open).
    pub(super) fn poll_timeout(&self, conns: &super::Conns, retry: std::time::Duration) -> Option<Instant> {
        let tracks = self.tracks.iter().filter_map(|t| t.poll_timeout(retry, give_up_after(conns.get(&t.conn))));
        tracks.chain(self.speakers.poll_timeout()).min()
    }

    /// If the speaker list is due and changed, the event that reports it.
    pub(super) fn speakers_changed(&mut self, now: Instant, room_id: &str) -> Option<MediaEvent> {
        let audio = self.tracks.iter_mut().filter(|t| t.kind == MediaKind::Audio);
        let listed = self.speakers.tick(now, audio.map(|t| (&t.owner, &t.stream_id, &mut t.level)))?;
        let speakers = listed
            .into_iter()
            .map(|l| Speaker {
                participant_id: l.participant_id.to_string(),
                stream_id: l.stream_id.to_string(),
                level: l.level,
            })
            .collect();
        Some(MediaEvent::ActiveSpeakers { room_id: room_id.to_owned(), speakers })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where a subscriber may start or switch layers: a VP8 keyframe's first packet; for H.264
    /// the SPS that leads an IDR (single NAL or in a STAP-A) or an IDR slice, never a delta slice
    /// or the middle of a fragmented IDR.
    #[test]
    fn keyframe_starts_by_codec() {
        // VP8: payload descriptor with S set and partition 0, payload header P bit clear.
        assert!(starts_keyframe(Codec::Vp8, &[0x10, 0x00, 0x9d, 0x01, 0x2a, 0, 0, 0, 0, 0]));
        assert!(!starts_keyframe(Codec::Vp8, &[0x10, 0x01, 0, 0, 0, 0]), "delta frame");
        assert!(!starts_keyframe(Codec::Vp8, &[0x00, 0x00, 0, 0, 0, 0]), "not the first packet");
        // H.264 (RFC 6184): NAL header forbidden bit 0, NRI 3, type in the low 5 bits.
        let sps = [0x67, 0x42, 0xe0, 0x1f, 0xda];
        assert!(starts_keyframe(Codec::H264, &sps), "SPS as a single NAL unit");
        let stap_a = [0x78, 0x00, 0x05, 0x67, 0x42, 0xe0, 0x1f, 0xda, 0x00, 0x02, 0x68, 0xce];
        assert!(starts_keyframe(Codec::H264, &stap_a), "SPS + PPS in a STAP-A");
        assert!(starts_keyframe(Codec::H264, &[0x65, 0x88, 0x84]), "IDR slice");
        assert!(starts_keyframe(Codec::H264, &[0x7c, 0x85, 0x88, 0x84]), "first FU-A fragment of an IDR");
        assert!(!starts_keyframe(Codec::H264, &[0x7c, 0x05, 0x88, 0x84]), "later FU-A fragment of an IDR");
        assert!(!starts_keyframe(Codec::H264, &[0x41, 0x9a, 0x02]), "non-IDR slice");
        assert!(!starts_keyframe(Codec::H264, &[0x7c, 0x41, 0x9a]), "FU-A fragment of a non-IDR slice");
    }
}
