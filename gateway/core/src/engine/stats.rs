//! Live statistics of a connection for `GET /v1/connections/{id}`.

use super::*;

/// The SRTP profile, from the authentication tag of an SRTP packet and the RtpPacket str0m made of
/// it (str0m 0.25 has no getter). The DTLS server — the gateway, which always answers
/// `setup:passive` — picks AEAD_AES_256_GCM whenever the client offers it (every browser does),
/// then AEAD_AES_128_GCM, then AES_CM_128_HMAC_SHA1_80. A 16-byte tag is GCM, 10 bytes SHA1-80.
pub(super) fn infer_srtp_profile<'a>(
    datagram: &[u8],
    events: impl Iterator<Item = &'a (ConnKey, Event)>,
) -> Option<String> {
    // Plain RTP (not RTCP, not padded): the sequence number and SSRC identify its packet.
    let is_rtp = datagram.len() > 12 && (128..=191).contains(&datagram[0]) && !(192..=223).contains(&datagram[1]);
    if !is_rtp || datagram[0] & 0x20 != 0 {
        return None;
    }
    let seq = u16::from_be_bytes([datagram[2], datagram[3]]);
    let ssrc = u32::from_be_bytes([datagram[8], datagram[9], datagram[10], datagram[11]]);
    let p = events
        .filter_map(|(_, e)| if let Event::RtpPacket(p) = e { Some(p) } else { None })
        .find(|p| p.header.sequence_number == seq && *p.header.ssrc == ssrc && !p.header.has_padding)?;
    match datagram.len().checked_sub(p.header.header_len + p.payload.len())? {
        16 => Some("AEAD_AES_256_GCM".into()),
        10 => Some("AES_CM_128_HMAC_SHA1_80".into()),
        _ => None,
    }
}

/// Remember which codec a mid carries (for `GET /v1/connections/{id}`); cheap when unchanged.
pub(super) fn note_codec(stats: &mut ConnStats, mid: Mid, params: PayloadParams) {
    let codec = params.spec().codec;
    if let Some(c) = stats.codecs.iter_mut().find(|c| c.mid == mid.as_ref()) {
        if c.codec_id != codec {
            c.codec_id = codec;
            c.codec = codec_name(params);
        }
        return;
    }
    stats.codecs.push(CodecInUse { mid: mid.to_string(), codec: codec_name(params), codec_id: codec });
}

pub(super) fn codec_name(params: PayloadParams) -> String {
    let spec = params.spec();
    let mut name = format!("{}/{}", spec.codec, spec.clock_rate.get()).to_ascii_lowercase();
    if let Some(profile) = spec.format.profile_level_id {
        name.push_str(&format!(";profile-level-id={profile:06x}"));
    }
    name
}

/// Store the latest stats of a (mid, rid); returns how many NACKs were added since the last.
pub(super) fn upsert(list: &mut Vec<MediaStats>, mut st: MediaStats) -> u64 {
    match list.iter_mut().find(|x| x.mid == st.mid && x.rid == st.rid) {
        Some(x) => {
            let added = st.nacks.saturating_sub(x.nacks);
            if let (Some(a), Some(b)) = (x.at, st.at) {
                let secs = b.saturating_duration_since(a).as_secs_f64();
                if secs > 0.0 {
                    st.bitrate_bps = Some((st.bytes.saturating_sub(x.bytes) as f64 * 8.0 / secs) as u64);
                }
            }
            *x = st;
            added
        }
        None => {
            let added = st.nacks;
            list.push(st);
            added
        }
    }
}

impl Engine {
    /// Live statistics of a connection.
    pub fn stats(&self, connection_id: &str) -> Option<ConnStats> {
        let key = self.keys.get(connection_id)?;
        let conn = self.conns.get(key)?;
        let mut stats = conn.stats.clone();
        let tracks = self.rooms.get(&conn.room).map(|r| r.tracks.as_slice()).unwrap_or_default();
        let shown = |o: &&DownTrack| (o.kind == MediaKind::Video && o.live || o.unavailable.is_some()) && !o.stopped;
        for o in conn.outs().iter().filter(shown) {
            let Some(t) = tracks.iter().find(|t| t.stream_id == o.stream_id) else { continue };
            stats.layers.push(LayerInUse {
                mid: o.mid.to_string(),
                stream_id: o.stream_id.to_string(),
                rid: t.rid_name(o.current),
                target_rid: t.rid_name(o.target),
                preferred_rid: o.preferred.map(|r| r.to_string()),
                paused: o.target.is_none() && o.last_down.is_some(),
                unavailable: o.unavailable.map(str::to_owned),
                codec: o.unavailable.and(t.codec).map(codec_name),
            });
        }
        Some(stats)
    }
}
