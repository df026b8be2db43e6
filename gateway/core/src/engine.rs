//! The SFU engine of one media worker: its rooms, their connections and the forwarding between
//! them. Sans-IO: it is fed commands, datagrams and time, and hands back datagrams to send,
//! events to report and the next moment it wants to be woken.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rand::Rng;
use signaling_api::protocol::{ConnectionState, ErrorCode, EventKind, LayerInfo, Role};
use str0m::bwe::{Bitrate, BweKind};
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::config::DtlsCert;
use str0m::format::{Codec, CodecConfig, PayloadParams};
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, Mid, Rid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{ExtensionValues, RtpPacket, RtpWrite, Vp8Descriptor};
use str0m::{Candidate, Event, IceConnectionState, Input, Rtc};

use crate::connection::{CodecInUse, Conn, ConnStats, LayerInUse, MediaStats, Queues, SelectedPair, TrackOut};
use crate::descriptor::{rewrite_vp9, vp8_patch, vp8_picture, Vp9Descriptor};
use crate::layers::{allocate, desired_bitrate, CachedPacket, LayerIn, TrackChoice, SINGLE_PAUSE_AFTER};
use crate::rewrite::SeqRewriter;
use crate::sdp::{accepted_media_sections, check_sections, first_mid, restrict_codecs};
use crate::{ConnKey, CoreConfig, Counters, MediaError, MediaEvent, Output};

/// Most encodings of one published track (browsers send up to three simulcast layers).
const MAX_LAYERS: usize = 4;
/// A subscriber's bandwidth estimate is a guess until feedback has flowed this long; it does not
/// pause video before then.
const BWE_WARMUP: std::time::Duration = std::time::Duration::from_secs(3);
/// How often every subscriber's layers are chosen again (layer bitrates change, layers stop).
const REALLOCATE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// While a subscriber is held below its best layers by its estimate, its estimator is asked to
/// probe at most this often.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// A published track and the subscribers it fans out to.
struct TrackIn {
    stream_id: Arc<str>,
    owner: Arc<str>,
    conn: ConnKey,
    mid: Mid,
    kind: MediaKind,
    /// Its encodings: one, or one per simulcast rid. Indices are stable (layers are only added).
    layers: Vec<LayerIn>,
    /// Subscriber connection and our mid there.
    outs: Vec<(ConnKey, Mid)>,
    /// Which layers were last reported as being sent (`stream_layers`; simulcast only).
    announced: Vec<bool>,
    /// The one codec the publication carries (the publisher's answer lists only it), as the
    /// publisher's session numbers it; subscribers are offered only this codec.
    codec: Option<PayloadParams>,
}

impl TrackIn {
    fn layer_index(&mut self, rid: Option<Rid>, throttle: std::time::Duration) -> Option<usize> {
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
    fn ranked(&self, now: Instant) -> Vec<usize> {
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
    fn layers_changed(&mut self, now: Instant) -> Option<Vec<LayerInfo>> {
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

    fn rid_name(&self, layer: Option<usize>) -> Option<String> {
        layer.and_then(|i| self.layers.get(i)).and_then(|l| l.rid).map(|r| r.to_string())
    }
}

/// Whether an RTP payload starts a keyframe (its first packet: for H.264 the SPS that Chrome
/// puts ahead of the IDR, or the IDR itself). Switching to a layer can only happen here.
fn starts_keyframe(codec: Codec, payload: &[u8]) -> bool {
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

/// Ask for a subscriber's layers to be chosen again (once, however often it is asked).
fn queue_reallocation(queue: &mut Vec<ConnKey>, key: ConnKey) {
    if !queue.contains(&key) {
        queue.push(key);
    }
}

fn kind_index(kind: KeyframeRequestKind) -> usize {
    usize::from(kind == KeyframeRequestKind::Fir)
}

#[derive(Default)]
struct Room {
    tracks: Vec<TrackIn>,
    conns: Vec<ConnKey>,
}

/// What a new connection needs.
#[derive(Debug, Clone)]
pub struct NewConnection {
    pub key: ConnKey,
    pub connection_id: String,
    pub room_id: String,
    pub participant_id: String,
    /// The address of our host candidate (announced or bind IP, and the socket's port).
    pub local: SocketAddr,
}

pub struct Engine {
    cfg: CoreConfig,
    /// One DTLS certificate for every connection of this engine: generating an ECDSA key per
    /// connection dominates connection setup (join storms). DTLS key exchange stays ephemeral
    /// (ECDHE) per connection; the certificate only identifies us via the SDP fingerprint.
    cert: Option<DtlsCert>,
    rooms: HashMap<Arc<str>, Room>,
    conns: HashMap<ConnKey, Conn>,
    keys: HashMap<Arc<str>, ConnKey>,
    q: Queues,
    counters: Counters,
    /// Subscribers whose layers must be chosen again.
    realloc: Vec<ConnKey>,
    next_realloc: Option<Instant>,
    /// Time to first frame of each new subscriber track, until the driver collects them.
    first_frames: Vec<std::time::Duration>,
}

fn err(code: ErrorCode, message: impl Into<String>) -> MediaError {
    MediaError { code, message: message.into() }
}

/// The first video codec of the offer's first video section that we support.
fn preferred_video_codec(sdp: &str) -> Option<Codec> {
    let mline = sdp.lines().find(|l| l.starts_with("m=video "))?;
    for pt in mline.split_whitespace().skip(3) {
        let prefix = format!("a=rtpmap:{pt} ");
        let Some(name) = sdp.lines().find_map(|l| l.strip_prefix(prefix.as_str())) else { continue };
        let name = name.split('/').next().unwrap_or("").to_ascii_uppercase();
        let codec = match name.as_str() {
            "VP8" => Codec::Vp8,
            "H264" => Codec::H264,
            "VP9" => Codec::Vp9,
            "AV1" => Codec::Av1,
            _ => continue,
        };
        return Some(codec);
    }
    None
}

/// Move `first` ahead of the other video codecs (`enable_*` re-adds a codec at the end).
fn prefer_video_codec(cc: &mut CodecConfig, first: Codec) {
    type Enable = fn(&mut CodecConfig, bool);
    let all: [(Codec, Enable); 5] = [
        (Codec::Vp8, CodecConfig::enable_vp8),
        (Codec::H264, CodecConfig::enable_h264),
        (Codec::H265, CodecConfig::enable_h265),
        (Codec::Vp9, CodecConfig::enable_vp9),
        (Codec::Av1, CodecConfig::enable_av1),
    ];
    for (codec, enable) in all {
        if codec != first {
            enable(cc, true);
        }
    }
}

fn kind_str(kind: MediaKind) -> &'static str {
    if kind == MediaKind::Audio {
        "audio"
    } else {
        "video"
    }
}

impl Engine {
    pub fn new(cfg: CoreConfig) -> Self {
        let cert = str0m::crypto::from_feature_flags().dtls_provider.generate_certificate();
        Self {
            cfg,
            cert,
            rooms: HashMap::new(),
            conns: HashMap::new(),
            keys: HashMap::new(),
            q: Queues::default(),
            counters: Counters::default(),
            realloc: Vec::new(),
            next_realloc: None,
            first_frames: Vec::new(),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Outputs
    // -----------------------------------------------------------------------------------------

    /// Next thing for the driver: a datagram, an event, or a closed connection whose socket can go.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.q.out.pop_front()
    }

    /// When [`Engine::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let conns = self.conns.values().filter_map(|c| c.deadline(&self.cfg));
        let retry = self.cfg.keyframe_retry;
        let tracks = self.rooms.values().flat_map(|r| r.tracks.iter()).flat_map(|t| {
            let give_up = give_up_after(self.conns.get(&t.conn));
            t.layers.iter().filter_map(move |l| {
                [l.keyframes.deadline(), l.keyframe_wanted.map(|w| w + retry), l.loss.deadline(give_up)]
                    .into_iter()
                    .flatten()
                    .min()
            })
        });
        let realloc = self.next_realloc.filter(|_| self.conns.values().any(|c| c.role == Role::Subscribe));
        conns.chain(tracks).chain(realloc).min()
    }

    /// Time to first frame of subscriber tracks since the last call: from the moment a track
    /// could be received (answered, READY) to its first keyframe forwarded.
    pub fn take_first_frame_times(&mut self) -> Vec<std::time::Duration> {
        std::mem::take(&mut self.first_frames)
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    pub fn has_connection(&self, key: ConnKey) -> bool {
        self.conns.contains_key(&key)
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Live statistics of a connection.
    pub fn stats(&self, connection_id: &str) -> Option<ConnStats> {
        let key = self.keys.get(connection_id)?;
        let conn = self.conns.get(key)?;
        let mut stats = conn.stats.clone();
        let tracks = self.rooms.get(&conn.room).map(|r| r.tracks.as_slice()).unwrap_or_default();
        let shown = |o: &&TrackOut| (o.kind == MediaKind::Video && o.live || o.unavailable.is_some()) && !o.stopped;
        for o in conn.outs.iter().filter(shown) {
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

    // -----------------------------------------------------------------------------------------
    // Commands
    // -----------------------------------------------------------------------------------------

    pub fn create_room(&mut self, room_id: &str) {
        self.rooms.entry(Arc::from(room_id)).or_default();
    }

    pub fn has_room(&self, room_id: &str) -> bool {
        self.rooms.contains_key(room_id)
    }

    /// End every connection of the room (FINISHED with `reason`) and forget the room.
    pub fn close_room(&mut self, now: Instant, room_id: &str, reason: &str) {
        let Some(room) = self.rooms.get(room_id) else { return };
        // Subscribers first, so the publishers' departures do not trigger pointless re-offers.
        let mut keys = room.conns.clone();
        keys.sort_by_key(|k| self.conns.get(k).map(|c| c.role == Role::Publish));
        for key in keys {
            self.end(now, key, ConnectionState::Finished, reason);
        }
        self.rooms.remove(room_id);
        self.process(now);
    }

    fn new_conn(
        &mut self,
        now: Instant,
        spec: NewConnection,
        role: Role,
        first_video: Option<Codec>,
    ) -> Result<ConnKey, MediaError> {
        let room = Arc::clone(
            self.rooms
                .get_key_value(spec.room_id.as_str())
                .ok_or_else(|| err(ErrorCode::NotFound, "room not found"))?
                .0,
        );
        if self.keys.contains_key(spec.connection_id.as_str()) || self.conns.contains_key(&spec.key) {
            return Err(err(ErrorCode::Conflict, "connection already exists"));
        }
        let mut builder =
            Rtc::builder().set_ice_lite(true).set_rtp_mode(true).set_stats_interval(Some(self.cfg.stats_interval));
        if let Some(first) = first_video {
            prefer_video_codec(builder.codec_config(), first);
        }
        if let Some(cert) = &self.cert {
            builder = builder.set_dtls_cert(cert.clone());
        }
        if role == Role::Subscribe && self.cfg.bwe {
            // TWCC feedback from the subscriber drives str0m's estimator and pacer.
            builder = builder.enable_bwe(Some(Bitrate::bps(self.cfg.bwe_initial_bps)));
        }
        let rtc = builder.build(now);
        let id: Arc<str> = Arc::from(spec.connection_id.as_str());
        let span = tracing::info_span!(
            "connection",
            connection_id = %spec.connection_id,
            room = %spec.room_id,
            participant = %spec.participant_id,
            role = if role == Role::Publish { "publish" } else { "subscribe" }
        );
        let mut conn = Conn {
            key: spec.key,
            id: Arc::clone(&id),
            room: Arc::clone(&room),
            participant: Arc::from(spec.participant_id.as_str()),
            role,
            rtc,
            state: ConnectionState::Initial,
            local: spec.local,
            created: now,
            gathered_at: None,
            ice_connected: false,
            last_rx: now,
            next_timeout: None,
            trusted: Vec::new(),
            pending: None,
            offered: false,
            offer_wanted: false,
            last_offer: None,
            idle_reoffer: false,
            candidate_added: false,
            first_mid: None,
            sending_pts: Vec::new(),
            outs: Vec::new(),
            ready_at: None,
            twcc_estimate: None,
            remb_estimate: None,
            bwe_desired: None,
            next_probe: None,
            stats: ConnStats::default(),
            span,
        };
        conn.enter(&mut self.q, ConnectionState::Initial, None);
        self.keys.insert(id, spec.key);
        self.conns.insert(spec.key, conn);
        if let Some(r) = self.rooms.get_mut(&room) {
            r.conns.push(spec.key);
        }
        Ok(spec.key)
    }

    /// Fail a connection because of its SDP, and return the error for the client.
    fn reject_sdp(&mut self, now: Instant, key: ConnKey, message: String) -> MediaError {
        self.end(now, key, ConnectionState::Failed, &format!("bad_sdp: {message}"));
        self.process(now);
        err(ErrorCode::BadSdp, message)
    }

    /// Open a publish connection with the client's offer; emits the answer.
    pub fn publish(&mut self, now: Instant, spec: NewConnection, offer: &str) -> Result<(), MediaError> {
        let local = spec.local;
        // Answer with the publisher's preferred video codec first: browsers send the first one.
        let key = self.new_conn(now, spec, Role::Publish, preferred_video_codec(offer))?;
        if let Err(message) = check_sections(offer, self.cfg.max_media_sections) {
            return Err(self.reject_sdp(now, key, message));
        }
        let offer = match SdpOffer::from_sdp_string(offer) {
            Ok(o) => o,
            Err(e) => return Err(self.reject_sdp(now, key, format!("offer is not valid SDP: {e}"))),
        };
        let conn = self.conns.get_mut(&key).expect("inserted above");
        if let Ok(c) = Candidate::host(local, "udp") {
            conn.rtc.add_local_candidate(c);
        }
        let answer = match conn.rtc.sdp_api().accept_offer(offer) {
            Ok(a) => one_codec_per_section(conn, &a.to_sdp_string()),
            Err(e) => return Err(self.reject_sdp(now, key, format!("offer was rejected: {e}"))),
        };
        if accepted_media_sections(&answer) == 0 {
            return Err(self.reject_sdp(now, key, "offer has no audio or video with a usable codec".into()));
        }
        let conn = self.conns.get_mut(&key).expect("inserted above");
        conn.event(&mut self.q, EventKind::SdpProcessed, None);
        let mid = first_mid(&answer);
        self.q.out.push_back(Output::Event(MediaEvent::Answer { connection_id: conn.id.to_string(), sdp: answer }));
        conn.candidate_added = true;
        self.announce_candidate(key, mid, now);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.drain(now, &mut self.q);
        }
        self.process(now);
        Ok(())
    }

    /// A new offer on an existing publish connection.
    pub fn republish(&mut self, now: Instant, connection_id: &str, offer: &str) -> Result<(), MediaError> {
        let key = self.key_of(connection_id)?;
        let conn = self.conns.get_mut(&key).expect("keys and conns agree");
        if conn.role != Role::Publish {
            return Err(err(ErrorCode::BadRequest, "not a publish connection"));
        }
        check_sections(offer, self.cfg.max_media_sections).map_err(|m| err(ErrorCode::BadSdp, m))?;
        let offer = SdpOffer::from_sdp_string(offer)
            .map_err(|e| err(ErrorCode::BadSdp, format!("offer is not valid SDP: {e}")))?;
        let answer = match conn.rtc.sdp_api().accept_offer(offer) {
            Ok(a) => one_codec_per_section(conn, &a.to_sdp_string()),
            Err(e) => return Err(self.reject_sdp(now, key, format!("offer was rejected: {e}"))),
        };
        conn.event(&mut self.q, EventKind::SdpProcessed, None);
        self.q.out.push_back(Output::Event(MediaEvent::Answer { connection_id: conn.id.to_string(), sdp: answer }));
        conn.drain(now, &mut self.q);
        self.process(now);
        Ok(())
    }

    /// Open a subscribe connection; emits the first offer (a data channel plus every track in
    /// the room that is not the participant's own).
    pub fn subscribe(&mut self, now: Instant, spec: NewConnection) -> Result<(), MediaError> {
        let key = self.new_conn(now, spec, Role::Subscribe, None)?;
        self.renegotiate(now, key);
        self.process(now);
        Ok(())
    }

    /// A fresh offer on an existing subscribe connection (or the outstanding one again).
    pub fn resubscribe(&mut self, now: Instant, connection_id: &str) -> Result<(), MediaError> {
        let key = self.key_of(connection_id)?;
        let conn = self.conns.get_mut(&key).expect("keys and conns agree");
        if conn.role != Role::Subscribe {
            return Err(err(ErrorCode::BadRequest, "not a subscribe connection"));
        }
        if conn.pending.is_some() {
            // The client has not answered the outstanding offer yet: send it again.
            if let Some(sdp) = conn.last_offer.clone() {
                self.q.out.push_back(Output::Event(MediaEvent::Offer { connection_id: conn.id.to_string(), sdp }));
            }
        } else if !self.renegotiate(now, key) {
            // Nothing changed: the same description again, so the client can re-answer it.
            let conn = self.conns.get_mut(&key).expect("keys and conns agree");
            if let Some(sdp) = conn.last_offer.clone() {
                conn.idle_reoffer = true;
                self.q.out.push_back(Output::Event(MediaEvent::Offer { connection_id: conn.id.to_string(), sdp }));
            }
        }
        self.process(now);
        Ok(())
    }

    /// The client's answer to our latest offer.
    pub fn answer(&mut self, now: Instant, connection_id: &str, sdp: &str) -> Result<(), MediaError> {
        let key = self.key_of(connection_id)?;
        let conn = self.conns.get_mut(&key).expect("keys and conns agree");
        if conn.role != Role::Subscribe {
            return Err(err(ErrorCode::BadRequest, "answers are for subscribe connections"));
        }
        let answer = SdpAnswer::from_sdp_string(sdp)
            .map_err(|e| err(ErrorCode::BadSdp, format!("answer is not valid SDP: {e}")))?;
        let Some(pending) = conn.pending.take() else {
            if std::mem::take(&mut conn.idle_reoffer) {
                // The answer to a repeated, unchanged offer: nothing to apply.
                conn.event(&mut self.q, EventKind::SdpProcessed, None);
                return Ok(());
            }
            return Err(err(ErrorCode::BadRequest, "no offer is waiting for an answer"));
        };
        if let Err(e) = conn.rtc.sdp_api().accept_answer(pending, answer) {
            return Err(self.reject_sdp(now, key, format!("answer was rejected: {e}")));
        }
        conn.event(&mut self.q, EventKind::SdpProcessed, None);
        let mut newly_live = Vec::new();
        let mut unavailable = Vec::new();
        let answered = crate::sdp::codecs(sdp);
        let Conn { rtc, outs, .. } = conn;
        for o in outs.iter_mut().filter(|o| !o.live && !o.stopped && o.unavailable.is_none()) {
            if rtc.media(o.mid).is_none_or(|m| m.disabled()) {
                // Rejected (port 0). With one codec offered, a section that does not list it
                // back is one the subscriber cannot decode.
                let mid = o.mid.to_string();
                let section = answered.iter().find(|s| s.mid.as_deref() == Some(mid.as_str()));
                let offered = o.pts.iter().filter_map(|(_, ours)| *ours).map(|p| *p).collect::<Vec<u8>>();
                let listed = section.is_some_and(|s| s.pts.iter().any(|p| offered.contains(p)));
                let reason = if listed { "rejected" } else { "codec_unsupported" };
                o.unavailable = Some(reason);
                unavailable.push((o.stream_id.to_string(), reason));
                continue;
            }
            o.live = true;
            newly_live.push(o.mid);
        }
        for (stream_id, reason) in unavailable {
            self.stream_unavailable(key, stream_id, reason);
        }
        let conn = self.conns.get_mut(&key).expect("keys and conns agree");
        if !conn.candidate_added {
            conn.candidate_added = true;
            if let Ok(c) = Candidate::host(conn.local, "udp") {
                conn.rtc.add_local_candidate(c);
            }
            let mid = conn.first_mid.clone();
            self.announce_candidate(key, mid, now);
        }
        let conn = self.conns.get_mut(&key).expect("keys and conns agree");
        conn.drain(now, &mut self.q);
        if conn.state == ConnectionState::Ready {
            for o in conn.outs.iter_mut().filter(|o| newly_live.contains(&o.mid) && o.kind == MediaKind::Video) {
                o.ttff_from = Some(now);
            }
        }
        queue_reallocation(&mut self.realloc, key);
        let conn = self.conns.get_mut(&key).expect("keys and conns agree");
        if std::mem::take(&mut conn.offer_wanted) {
            self.renegotiate(now, key);
        }
        self.process(now);
        Ok(())
    }

    /// A trickled remote candidate. ICE-lite needs none (the client's checks reveal its
    /// address), but valid ones are added; mDNS and TCP candidates are ignored.
    pub fn add_candidate(&mut self, now: Instant, connection_id: &str, candidate: &str) -> Result<(), MediaError> {
        let key = self.key_of(connection_id)?;
        let candidate = candidate.trim();
        if candidate.is_empty() {
            return Ok(());
        }
        // mDNS host names (`….local`) cannot be resolved here and are not needed: ICE-lite learns
        // the client's address from its checks.
        if candidate.split_whitespace().nth(4).is_some_and(|addr| addr.ends_with(".local")) {
            return Ok(());
        }
        let c = Candidate::from_sdp_string(candidate)
            .map_err(|e| err(ErrorCode::BadRequest, format!("candidate could not be parsed: {e}")))?;
        if c.proto() != Protocol::Udp {
            return Ok(());
        }
        let conn = self.conns.get_mut(&key).expect("keys and conns agree");
        conn.rtc.add_remote_candidate(c);
        conn.drain(now, &mut self.q);
        self.process(now);
        Ok(())
    }

    /// End a connection on purpose. Unknown ids are ignored.
    pub fn close_connection(&mut self, now: Instant, connection_id: &str, reason: &str) {
        if let Ok(key) = self.key_of(connection_id) {
            self.end(now, key, ConnectionState::Finished, reason);
            self.process(now);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Network and time
    // -----------------------------------------------------------------------------------------

    /// A datagram arrived on a connection's socket. `destination` is the connection's candidate
    /// address. Garbage and datagrams from unauthenticated sources are dropped and counted.
    pub fn handle_receive(
        &mut self,
        now: Instant,
        key: ConnKey,
        source: SocketAddr,
        destination: SocketAddr,
        data: &[u8],
    ) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        let Ok(contents) = data.try_into() else {
            self.counters.garbage_datagrams += 1;
            return;
        };
        let recv = Receive { proto: Protocol::Udp, source, destination, contents };
        // RFC 7983 demultiplexing: a first byte of 0-3 is STUN.
        let is_stun = data.first().is_some_and(|b| *b < 4);
        if !is_stun && !conn.trusted.contains(&source) {
            conn.stats.dropped_untrusted_datagrams += 1;
            self.counters.untrusted_datagrams += 1;
            return;
        }
        let work_before = self.q.work.len();
        if let Err(e) = conn.rtc.handle_input(Input::Receive(now, recv)) {
            let reason = format!("dtls_error: {e}");
            self.q.doomed.push((key, reason));
        } else {
            conn.drain(now, &mut self.q);
            if conn.stats.srtp_profile.is_none() {
                conn.stats.srtp_profile = infer_srtp_profile(data, self.q.work.range(work_before..));
            }
        }
        // Only the authenticated peer keeps a connection alive; spoofed STUN does not.
        if conn.trusted.contains(&source) {
            conn.last_rx = now;
        }
        self.process(now);
    }

    /// Time passed: drive every `Rtc` that is due, send merged keyframe requests, and fail
    /// connections whose deadlines passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        for conn in self.conns.values_mut() {
            if conn.next_timeout.is_some_and(|t| t <= now) {
                if let Err(e) = conn.rtc.handle_input(Input::Timeout(now)) {
                    self.q.doomed.push((conn.key, format!("rtc_error: {e}")));
                    continue;
                }
                conn.drain(now, &mut self.q);
            }
            if let Some(reason) = conn.expired(now, &self.cfg) {
                self.q.doomed.push((conn.key, reason.to_owned()));
            }
        }
        let Self { rooms, conns, q, counters, cfg, .. } = self;
        for (room_id, room) in rooms.iter_mut() {
            for track in room.tracks.iter_mut() {
                if let Some(layers) = track.layers_changed(now) {
                    let (room_id, stream_id) = (room_id.to_string(), track.stream_id.to_string());
                    q.out.push_back(Output::Event(MediaEvent::StreamLayers { room_id, stream_id, layers }));
                }
                let give_up = give_up_after(conns.get(&track.conn));
                for li in 0..track.layers.len() {
                    let layer = &mut track.layers[li];
                    let lost = layer.loss.expire(now, give_up);
                    let mut want = false;
                    if lost > 0 {
                        // The cached group has a hole now: no decoder could start on it.
                        layer.gop.clear();
                        counters.unrecoverable_losses += lost;
                        if let Some(p) = conns.get_mut(&track.conn) {
                            p.stats.unrecoverable_losses += lost;
                        }
                        want = !track.outs.is_empty();
                    }
                    let layer = &mut track.layers[li];
                    if layer.keyframe_wanted.is_some_and(|t| now >= t + cfg.keyframe_retry) {
                        // Still nothing: ask again (or stop, if nobody needs it any more).
                        layer.keyframe_wanted = None;
                        want |= track.outs.iter().any(|(k, m)| {
                            conns
                                .get(k)
                                .and_then(|c| c.outs.iter().find(|o| o.mid == *m))
                                .is_some_and(|o| o.target == Some(li))
                        });
                    }
                    if want {
                        want_keyframe(now, track, li, conns, q, counters);
                    } else {
                        send_due_keyframe_request(now, track, li, conns, q, counters);
                    }
                }
            }
        }
        if self.next_realloc.is_none_or(|t| now >= t) {
            self.next_realloc = Some(now + REALLOCATE_EVERY);
            let subs = self.conns.values().filter(|c| c.role == Role::Subscribe && c.state == ConnectionState::Ready);
            for c in subs {
                queue_reallocation(&mut self.realloc, c.key);
            }
        }
        self.process(now);
    }

    // -----------------------------------------------------------------------------------------
    // Internals
    // -----------------------------------------------------------------------------------------

    fn key_of(&self, connection_id: &str) -> Result<ConnKey, MediaError> {
        self.keys.get(connection_id).copied().ok_or_else(|| err(ErrorCode::NotFound, "connection not found"))
    }

    /// Tell the subscriber (and the inspection and metrics) that it will not receive a stream.
    fn stream_unavailable(&mut self, key: ConnKey, stream_id: String, reason: &'static str) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        let codec = self
            .rooms
            .get(&conn.room)
            .and_then(|r| r.tracks.iter().find(|t| *t.stream_id == *stream_id))
            .and_then(|t| t.codec)
            .map(codec_name);
        conn.span.in_scope(|| tracing::info!(%stream_id, reason, codec = codec.as_deref().unwrap_or("-"), "subscriber cannot receive a stream"));
        if reason == "codec_unsupported" {
            self.counters.codec_unsupported += 1;
        }
        self.q.out.push_back(Output::Event(MediaEvent::StreamUnavailable {
            connection_id: conn.id.to_string(),
            stream_id,
            reason: reason.to_owned(),
            codec,
        }));
    }

    /// Trickle our host candidate to the client and enter GATHERED.
    fn announce_candidate(&mut self, key: ConnKey, mid: Option<String>, now: Instant) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        let Ok(c) = Candidate::host(conn.local, "udp") else { return };
        let line = c.to_sdp_string();
        let candidate = line.strip_prefix("a=").unwrap_or(&line).trim_end().to_owned();
        self.q.out.push_back(Output::Event(MediaEvent::Candidate {
            connection_id: conn.id.to_string(),
            candidate,
            sdp_mid: mid,
            sdp_mline_index: Some(0),
        }));
        conn.event(&mut self.q, EventKind::Candidate, None);
        conn.gathered_at = Some(now);
        conn.enter(&mut self.q, ConnectionState::Gathered, None);
    }

    /// Handle queued str0m events and fatal errors until both queues are empty.
    fn process(&mut self, now: Instant) {
        loop {
            if let Some((key, event)) = self.q.work.pop_front() {
                self.on_event(now, key, event);
                continue;
            }
            if let Some((key, reason)) = self.q.doomed.pop() {
                self.end(now, key, ConnectionState::Failed, &reason);
                continue;
            }
            if let Some(key) = self.realloc.pop() {
                self.reallocate(now, key);
                continue;
            }
            break;
        }
    }

    fn on_event(&mut self, now: Instant, key: ConnKey, event: Event) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        match event {
            Event::RtpPacket(p) => self.forward(now, key, p),
            Event::Connected => {
                let entered = conn.enter(&mut self.q, ConnectionState::Ready, None);
                if entered {
                    conn.ready_at = Some(now);
                    let remote = conn.trusted.last().map(|a| a.to_string()).unwrap_or_default();
                    let setup_ms = now.duration_since(conn.created).as_millis() as u64;
                    let _in = conn.span.enter();
                    let local = conn.local.to_string();
                    if self.cfg.log_client_ips {
                        tracing::info!(setup_ms, local, remote, "ICE and DTLS done");
                    } else {
                        tracing::info!(setup_ms, local, "ICE and DTLS done");
                        tracing::debug!(remote, "selected remote address");
                    }
                }
                if entered && conn.role == Role::Subscribe {
                    for o in conn.outs.iter_mut().filter(|o| o.live && o.kind == MediaKind::Video) {
                        o.ttff_from = Some(now);
                    }
                    // Reallocation (in this same pass) asks again for the keyframes the
                    // subscriber waits for: one asked for at the answer may have arrived before
                    // READY, when nothing could be forwarded.
                    queue_reallocation(&mut self.realloc, key);
                }
            }
            Event::IceConnectionStateChange(s) => match s {
                IceConnectionState::Connected | IceConnectionState::Completed => {
                    conn.ice_connected = true;
                }
                IceConnectionState::Disconnected => {
                    // Only a silent peer fails a READY connection (`Conn::lost_at`); an agent
                    // that sends media and no Binding requests is still here.
                    let silent_ms = now.saturating_duration_since(conn.last_rx).as_millis() as u64;
                    conn.span.in_scope(|| tracing::info!(silent_ms, "ICE agent reports disconnected"));
                }
                _ => {}
            },
            Event::MediaAdded(m) if conn.role == Role::Publish && m.direction.is_receiving() => {
                let rids: Vec<Rid> =
                    m.simulcast.iter().flat_map(|s| s.recv.iter().chain(s.send.iter())).map(|l| l.rid).collect();
                self.add_track(now, key, m.mid, m.kind, &rids);
            }
            Event::MediaChanged(m) if conn.role == Role::Publish => {
                if m.direction.is_receiving() {
                    let kind = conn.rtc.media(m.mid).map(|x| x.kind());
                    if let Some(kind) = kind {
                        self.add_track(now, key, m.mid, kind, &[]);
                    }
                } else {
                    self.remove_tracks(now, key, Some(m.mid));
                }
            }
            Event::KeyframeRequest(r) if conn.role == Role::Subscribe => {
                conn.stats.keyframe_requests_in += 1;
                self.counters.keyframe_requests_in[kind_index(r.kind)] += 1;
                self.relay_keyframe_request(now, key, r.mid, r.kind);
            }
            Event::EgressBitrateEstimate(estimate) if conn.role == Role::Subscribe => {
                match estimate {
                    BweKind::Twcc { estimate, .. } => conn.twcc_estimate = Some(estimate.as_u64()),
                    BweKind::Remb { estimate, .. } => conn.remb_estimate = Some(estimate.as_u64()),
                    _ => {}
                }
                conn.stats.bwe_estimate_bps = conn.bandwidth();
                queue_reallocation(&mut self.realloc, key);
            }
            Event::StreamPaused(p) if conn.role == Role::Publish => {
                let Some(room) = self.rooms.get_mut(&conn.room) else { return };
                let Some(track) = room.tracks.iter_mut().find(|t| t.conn == key && t.mid == p.mid) else { return };
                if let Some(layer) = track.layers.iter_mut().find(|l| l.rid == p.rid) {
                    layer.paused = p.paused;
                }
                for (k, _) in &track.outs {
                    queue_reallocation(&mut self.realloc, *k);
                }
            }
            Event::MediaIngressStats(s) => {
                let st = MediaStats {
                    mid: s.mid.to_string(),
                    rid: s.rid.map(|r| r.to_string()),
                    packets: s.packets,
                    bytes: s.bytes,
                    nacks: s.nacks,
                    plis: s.plis,
                    firs: s.firs,
                    loss: s.loss,
                    rtt_ms: s.rtt.map(|d| d.as_secs_f64() * 1000.0),
                    jitter: Some(s.jitter),
                    bitrate_bps: None,
                    at: Some(s.timestamp),
                };
                // NACKs we sent to the publisher since the last report.
                self.counters.nacks_out += upsert(&mut conn.stats.ingress, st);
            }
            Event::MediaEgressStats(s) => {
                let st = MediaStats {
                    mid: s.mid.to_string(),
                    rid: s.rid.map(|r| r.to_string()),
                    packets: s.packets,
                    bytes: s.bytes,
                    nacks: s.nacks,
                    plis: s.plis,
                    firs: s.firs,
                    loss: s.loss,
                    rtt_ms: s.rtt.map(|d| d.as_secs_f64() * 1000.0),
                    jitter: None,
                    bitrate_bps: None,
                    at: Some(s.timestamp),
                };
                // Retransmissions: str0m's packet count includes them, ours does not.
                if let Some(out) = conn.outs.iter_mut().find(|o| o.mid == s.mid) {
                    let resent = s.packets.saturating_sub(out.written);
                    if resent > out.resent {
                        self.counters.retransmitted_packets += resent - out.resent;
                        conn.stats.retransmitted_packets += resent - out.resent;
                        out.resent = resent;
                    }
                }
                // NACKs the subscriber sent us since the last report.
                self.counters.nacks_in += upsert(&mut conn.stats.egress, st);
            }
            Event::PeerStats(s) => {
                conn.stats.peer_bytes_rx = s.peer_bytes_rx;
                conn.stats.peer_bytes_tx = s.peer_bytes_tx;
                conn.stats.rtt_ms = s.rtt.map(|d| d.as_secs_f64() * 1000.0);
                conn.stats.ingress_loss_fraction = s.ingress_loss_fraction;
                conn.stats.egress_loss_fraction = s.egress_loss_fraction;
                if let Some(pair) = s.selected_candidate_pair {
                    conn.stats.selected_pair = Some(SelectedPair {
                        protocol: format!("{:?}", pair.protocol).to_ascii_lowercase(),
                        local: pair.local.addr.to_string(),
                        remote: pair.remote.addr.to_string(),
                        rtt_ms: pair.current_round_trip_time.map(|d| d.as_secs_f64() * 1000.0),
                    });
                }
            }
            Event::Closed => {
                self.end(now, key, ConnectionState::Finished, "remote_closed");
            }
            _ => {}
        }
    }

    /// A publisher's media section started receiving: announce the track and offer it to every
    /// other participant's subscribe connection.
    fn add_track(&mut self, now: Instant, key: ConnKey, mid: Mid, kind: MediaKind, rids: &[Rid]) {
        if !matches!(kind, MediaKind::Audio | MediaKind::Video) {
            return;
        }
        let Some(conn) = self.conns.get(&key) else { return };
        let Some(room) = self.rooms.get_mut(&conn.room) else { return };
        if room.tracks.iter().any(|t| t.conn == key && t.mid == mid) {
            return;
        }
        let stream_id: Arc<str> = Arc::from(format!("st_{:016x}", rand::rng().random::<u64>()));
        let mid_str = mid.to_string();
        let codec = conn
            .sending_pts
            .iter()
            .find(|(m, _)| *m == mid_str)
            .and_then(|(_, pt)| conn.rtc.codec_config().find(|c| *c.pt() == *pt).copied());
        let layers = if rids.is_empty() {
            vec![LayerIn::new(None, self.cfg.keyframe_throttle)]
        } else {
            let mut unique: Vec<Rid> = Vec::new();
            for r in rids {
                if !unique.contains(r) && unique.len() < MAX_LAYERS {
                    unique.push(*r);
                }
            }
            unique.into_iter().map(|r| LayerIn::new(Some(r), self.cfg.keyframe_throttle)).collect()
        };
        room.tracks.push(TrackIn {
            stream_id: Arc::clone(&stream_id),
            owner: Arc::clone(&conn.participant),
            conn: key,
            mid,
            kind,
            layers,
            outs: Vec::new(),
            announced: Vec::new(),
            codec,
        });
        conn.span.in_scope(|| tracing::info!(%mid, kind = kind_str(kind), %stream_id, "track published"));
        self.q.out.push_back(Output::Event(MediaEvent::StreamAdded {
            room_id: conn.room.to_string(),
            participant_id: conn.participant.to_string(),
            stream_id: stream_id.to_string(),
            kind: kind_str(kind).into(),
            mid: mid.to_string(),
        }));
        let room_id = Arc::clone(&conn.room);
        self.renegotiate_room(now, &room_id);
    }

    /// Remove a publisher's tracks (one mid, or all) and renegotiate the subscribers.
    fn remove_tracks(&mut self, now: Instant, key: ConnKey, mid: Option<Mid>) {
        let Some(conn) = self.conns.get(&key) else { return };
        let room_id = Arc::clone(&conn.room);
        let Some(room) = self.rooms.get_mut(&room_id) else { return };
        let mut removed = Vec::new();
        room.tracks.retain(|t| {
            let gone = t.conn == key && mid.is_none_or(|m| m == t.mid);
            if gone {
                removed.push((Arc::clone(&t.owner), Arc::clone(&t.stream_id), t.kind, t.mid));
            }
            !gone
        });
        if removed.is_empty() {
            return;
        }
        for (owner, stream_id, kind, mid) in removed {
            self.q.out.push_back(Output::Event(MediaEvent::StreamRemoved {
                room_id: room_id.to_string(),
                participant_id: owner.to_string(),
                stream_id: stream_id.to_string(),
                kind: kind_str(kind).into(),
                mid: mid.to_string(),
            }));
        }
        self.renegotiate_room(now, &room_id);
    }

    fn renegotiate_room(&mut self, now: Instant, room_id: &str) {
        let Some(room) = self.rooms.get(room_id) else { return };
        let subs: Vec<ConnKey> = room
            .conns
            .iter()
            .copied()
            .filter(|k| self.conns.get(k).is_some_and(|c| c.role == Role::Subscribe))
            .collect();
        for k in subs {
            self.renegotiate(now, k);
        }
    }

    /// Bring a subscribe connection's media sections in line with the room's tracks and send
    /// an offer if anything changed (or if none was ever sent). One offer is outstanding at a
    /// time; changes meanwhile are folded into the next one.
    /// Returns whether an offer went out.
    fn renegotiate(&mut self, now: Instant, key: ConnKey) -> bool {
        let Self { rooms, conns, q, .. } = self;
        let Some(conn) = conns.get_mut(&key) else { return false };
        if conn.role != Role::Subscribe || conn.state.is_terminal() {
            return false;
        }
        if conn.pending.is_some() {
            conn.offer_wanted = true;
            return false;
        }
        let Some(room) = rooms.get_mut(&conn.room) else { return false };
        let wanted: Vec<usize> = (0..room.tracks.len()).filter(|&i| room.tracks[i].owner != conn.participant).collect();
        let mut api = conn.rtc.sdp_api();
        if !conn.offered {
            api.add_channel("gateway".into());
        }
        let mut added = Vec::new();
        for &i in &wanted {
            let t = &room.tracks[i];
            if conn.outs.iter().any(|o| !o.stopped && o.stream_id == t.stream_id) {
                continue;
            }
            let mid = api.add_media(
                t.kind,
                Direction::SendOnly,
                Some(t.owner.to_string()),
                Some(t.stream_id.to_string()),
                None,
            );
            added.push((i, mid));
        }
        for o in conn.outs.iter_mut().filter(|o| !o.stopped) {
            if !wanted.iter().any(|&i| room.tracks[i].stream_id == o.stream_id) {
                api.stop_media(o.mid);
                o.stopped = true;
                o.live = false;
            }
        }
        let Some((offer, pending)) = api.apply() else {
            return false;
        };
        let start_seq: u16 = rand::rng().random_range(1000..30000);
        for (i, mid) in added {
            let t = &mut room.tracks[i];
            t.outs.push((key, mid));
            let rewrite = SeqRewriter::new(start_seq, rand::rng().random());
            conn.outs.push(TrackOut::new(mid, Arc::clone(&t.stream_id), t.kind, rewrite));
        }
        // Stopped sections belong to tracks that are gone; forget them.
        conn.outs.retain(|o| !o.stopped);
        conn.idle_reoffer = false;
        conn.pending = Some(pending);
        conn.offered = true;
        let sdp = offers_publication_codecs(conn, &room.tracks, &offer.to_sdp_string());
        if conn.first_mid.is_none() {
            conn.first_mid = first_mid(&sdp);
        }
        conn.last_offer = Some(sdp.clone());
        q.out.push_back(Output::Event(MediaEvent::Offer { connection_id: conn.id.to_string(), sdp }));
        conn.drain(now, q);
        true
    }

    /// Forward one publisher packet to every live subscriber of its track: video only to those
    /// whose layer it is, switching a subscriber to its target layer at that layer's keyframe.
    fn forward(&mut self, now: Instant, key: ConnKey, p: RtpPacket) {
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
                let out = conns.get(k).and_then(|c| c.outs.iter().find(|o| o.mid == *m));
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
    fn fan_out(
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
            let Conn { rtc, outs, stats, .. } = sub;
            let Some(out) = outs.iter_mut().find(|o| o.mid == out_mid) else { continue };
            if !out.live {
                continue;
            }
            let same_source = out.rewrite.source() == Some(ssrc);
            if video {
                if out.current == Some(li) && same_source {
                    // The usual case: this subscriber's layer.
                } else if out.target == Some(li) {
                    if out.current.is_none() && cfg.keyframe_cache {
                        // Starting: from the cached group of pictures (which ends with this
                        // packet), if it is whole.
                        if let Some(gop) = track.layers[li].gop.complete() {
                            let clock_rate = clock;
                            replay_gop(now, rtc, out, stats, counters, gop, ssrc, clock_rate);
                            if let Some(t0) = out.ttff_from.take() {
                                first_frames.push(now.saturating_duration_since(t0));
                            }
                            out.current = Some(li);
                            sub.drain(now, q);
                            continue;
                        }
                    }
                    if !keyframe {
                        // A decoder cannot start (or change streams) on a delta frame.
                        source_changed |= out.current == Some(li);
                        continue;
                    }
                    let advance = ts_advance(out.last_forward, now, clock);
                    out.rewrite.switch(ssrc, *p.seq_no, p.header.timestamp, advance);
                    out.pictures.switch();
                    if out.current.is_some() && out.current != Some(li) {
                        counters.layer_switches += 1;
                        stats.layer_switches += 1;
                    }
                    out.current = Some(li);
                    if let Some(t0) = out.ttff_from.take() {
                        first_frames.push(now.saturating_duration_since(t0));
                    }
                } else {
                    continue;
                }
            } else if !same_source {
                // Audio (no layers): a new SSRC continues the same outgoing stream.
                let advance = ts_advance(out.last_forward, now, clock);
                out.rewrite.switch(ssrc, *p.seq_no, p.header.timestamp, advance);
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

    /// A subscriber asked for a keyframe on one of its tracks: merge it into the throttle of
    /// the layer it receives (or is switching to).
    fn relay_keyframe_request(&mut self, now: Instant, sub_key: ConnKey, mid: Mid, kind: KeyframeRequestKind) {
        let Self { rooms, conns, q, counters, .. } = self;
        let Some(sub) = conns.get(&sub_key) else { return };
        let Some(out) = sub.outs.iter().find(|o| o.mid == mid) else { return };
        let Some(li) = out.current.or(out.target) else { return };
        let Some(room) = rooms.get_mut(&sub.room) else { return };
        let Some(track) = room.tracks.iter_mut().find(|t| t.stream_id == out.stream_id) else { return };
        let Some(layer) = track.layers.get_mut(li) else { return };
        layer.keyframes.request(kind);
        send_due_keyframe_request(now, track, li, conns, q, counters);
        if track.layers[li].keyframes.deadline().is_some() {
            // Deferred into the merged request the throttle sends when its window ends.
            counters.keyframe_requests_throttled[kind_index(kind)] += 1;
        }
    }

    /// Change which layer a subscriber prefers for one of its video tracks (`None`: the best the
    /// bandwidth allows). The switch happens at the next keyframe of that layer.
    pub fn set_layer(
        &mut self,
        now: Instant,
        connection_id: &str,
        stream_id: &str,
        rid: Option<&str>,
    ) -> Result<(), MediaError> {
        let key = self.key_of(connection_id)?;
        let conn = self.conns.get_mut(&key).expect("keys and conns agree");
        if conn.role != Role::Subscribe {
            return Err(err(ErrorCode::BadRequest, "set_layer is for subscribe connections"));
        }
        let Some(out) = conn.outs.iter_mut().find(|o| &*o.stream_id == stream_id && !o.stopped) else {
            return Err(err(ErrorCode::NotFound, "this connection does not receive that stream"));
        };
        if out.kind != MediaKind::Video {
            return Err(err(ErrorCode::BadRequest, "layers exist for video streams only"));
        }
        let track = self.rooms.get(&conn.room).and_then(|r| r.tracks.iter().find(|t| &*t.stream_id == stream_id));
        let preferred = match (rid, track) {
            (None, _) => None,
            (Some(r), Some(t)) => {
                let found = t.layers.iter().find_map(|l| l.rid.filter(|x| x.to_string() == r));
                if found.is_none() {
                    let names: Vec<String> = t.layers.iter().filter_map(|l| l.rid.map(|x| x.to_string())).collect();
                    return Err(err(
                        ErrorCode::BadRequest,
                        if names.is_empty() {
                            "the stream is not simulcast; it has no layers to choose".to_owned()
                        } else {
                            format!("unknown layer {r:?}; the stream has {}", names.join(", "))
                        },
                    ));
                }
                found
            }
            (Some(_), None) => return Err(err(ErrorCode::NotFound, "stream not found")),
        };
        out.preferred = preferred;
        // An explicit choice is not held back by the hysteresis of automatic moves.
        out.last_down = None;
        self.reallocate(now, key);
        self.process(now);
        Ok(())
    }

    /// Choose the layer of each of a subscriber's video tracks: the best the bandwidth estimate
    /// carries (with hysteresis), up to the subscriber's preferred layer; none (video paused,
    /// audio continues) when not even the lowest fits. A new target is asked a keyframe of;
    /// the switch itself happens in [`Self::forward`].
    fn reallocate(&mut self, now: Instant, sub_key: ConnKey) {
        let Self { rooms, conns, q, counters, cfg, .. } = self;
        let Some(sub) = conns.get_mut(&sub_key) else { return };
        if sub.role != Role::Subscribe || sub.state.is_terminal() {
            return;
        }
        let Some(room) = rooms.get_mut(&sub.room) else { return };
        let mut audio_bps = 0;
        let mut choices = Vec::new();
        let mut ranked_of = Vec::new();
        for (oi, o) in sub.outs.iter().enumerate() {
            if !o.live || o.stopped {
                continue;
            }
            let Some(track) = room.tracks.iter().find(|t| t.stream_id == o.stream_id) else { continue };
            if o.kind != MediaKind::Video {
                audio_bps += track.layers.iter().map(|l| l.rate.bps()).sum::<u64>();
                continue;
            }
            let mut ranked = track.ranked(now);
            if ranked.is_empty() {
                // Nothing has been sent yet: nothing to choose (the first packet chooses again).
                continue;
            }
            // Capped at the preferred layer while it flows; if it stopped, what flows is offered.
            if let Some(pos) = ranked.iter().position(|&i| o.preferred.is_some() && track.layers[i].rid == o.preferred)
            {
                ranked.truncate(pos + 1);
            }
            let rates = ranked.iter().map(|&i| track.layers[i].rate.bps()).collect();
            let current = o.target.and_then(|t| ranked.iter().position(|&i| i == t));
            let may_go_up = o.last_down.is_none_or(|t| now.saturating_duration_since(t) >= cfg.layer_up_hold);
            choices.push(TrackChoice { rates, current, may_go_up });
            ranked_of.push((oi, ranked));
        }
        let budget = if cfg.bwe { sub.bandwidth().map(|b| b.saturating_sub(audio_bps)) } else { None };
        let mut picks = allocate(budget, &choices);
        // What the estimate alone allows, before the rules below keep video flowing.
        let fits = picks.clone();
        let warming_up = sub.ready_at.is_none_or(|t| now.saturating_duration_since(t) < BWE_WARMUP);
        for ((oi, _), (p, c)) in ranked_of.iter().zip(picks.iter_mut().zip(&choices)) {
            let out = &mut sub.outs[*oi];
            if p.is_some() || c.rates.is_empty() {
                out.starved_since = None;
            } else if warming_up {
                // The estimate is still the initial guess, not a measurement: start with the
                // lowest layer rather than pause.
                *p = Some(0);
            } else if c.rates.len() == 1 && out.target.is_some() {
                // The only layer: paused only when starved for a while, not on a dip.
                let since = *out.starved_since.get_or_insert(now);
                if now.saturating_duration_since(since) < SINGLE_PAUSE_AFTER {
                    *p = Some(0);
                }
            }
        }
        let mut wanted = Vec::new();
        for ((oi, ranked), pick) in ranked_of.iter().zip(picks.iter()) {
            let out = &mut sub.outs[*oi];
            let new_target = pick.map(|p| ranked[p]);
            if new_target == out.target {
                continue;
            }
            let old_pos = out.target.and_then(|t| ranked.iter().position(|&i| i == t));
            if new_target.is_none() || (old_pos.is_some() && *pick < old_pos) {
                out.last_down = Some(now);
            }
            if new_target.is_none() && out.current.is_some() {
                counters.video_pauses += 1;
                out.current = None;
            }
            out.target = new_target;
            if let Some(t) = new_target.filter(|t| out.current != Some(*t)) {
                wanted.push((Arc::clone(&out.stream_id), t));
            }
        }
        if sub.state == ConnectionState::Ready {
            // Still waiting for a keyframe of the target (e.g. the one asked for at the answer
            // arrived before READY and could not be used): ask again, merged by the throttle.
            for o in sub.outs.iter().filter(|o| o.live && !o.stopped && o.kind == MediaKind::Video) {
                if let Some(t) = o.target.filter(|t| o.current != Some(*t)) {
                    if !wanted.iter().any(|(s, l)| *s == o.stream_id && *l == t) {
                        wanted.push((Arc::clone(&o.stream_id), t));
                    }
                }
            }
        }
        if sub.state != ConnectionState::Ready {
            // A keyframe now would arrive before the subscriber can take it; READY asks.
            wanted.clear();
        }
        if cfg.bwe {
            steer_estimator(now, sub, audio_bps, &choices, &fits, warming_up, cfg.bwe_initial_bps);
        }
        sub.drain(now, q);
        let starting: Vec<bool> =
            wanted.iter().map(|(s, _)| sub.outs.iter().any(|o| o.stream_id == *s && o.current.is_none())).collect();
        for ((stream_id, li), starting) in wanted.into_iter().zip(starting) {
            if let Some(track) = room.tracks.iter_mut().find(|t| t.stream_id == stream_id) {
                if !(starting && cached(cfg, track, li)) {
                    want_keyframe(now, track, li, conns, q, counters);
                }
            }
        }
    }

    /// Move a connection to FINISHED or FAILED, undo everything it took part in, close its `Rtc`
    /// (BYE and close_notify go out) and tell the driver its socket can go.
    fn end(&mut self, now: Instant, key: ConnKey, state: ConnectionState, reason: &str) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        conn.enter(&mut self.q, state, Some(reason.to_owned()));
        let role = conn.role;
        let room_id = Arc::clone(&conn.room);
        if role == Role::Publish {
            self.remove_tracks(now, key, None);
        }
        let Some(mut conn) = self.conns.remove(&key) else { return };
        self.keys.remove(&conn.id);
        if let Some(room) = self.rooms.get_mut(&room_id) {
            room.conns.retain(|k| *k != key);
            for t in room.tracks.iter_mut() {
                t.outs.retain(|(k, _)| *k != key);
            }
        }
        if conn.rtc.close().is_ok() {
            conn.drain(now, &mut self.q);
        }
        self.q.out.push_back(Output::Closed { key, connection_id: conn.id.to_string() });
    }
}

/// Tell str0m's estimator what the subscriber's best layers need (it probes toward it; no floor,
/// so a small stream does not probe for bandwidth it will never use), and while the estimate
/// holds a track below its best layer (`fits`: what it allows), ask for a probe every
/// [`PROBE_EVERY`]. Without one, a subscriber whose link cleared waited for str0m's own periodic
/// probe (every 5 s) and then the hold time; and after congestion str0m's estimate was seen to
/// keep sinking for seconds on a clean link until a probe lifted it.
fn steer_estimator(
    now: Instant,
    sub: &mut Conn,
    audio_bps: u64,
    choices: &[TrackChoice],
    fits: &[Option<usize>],
    warming_up: bool,
    initial_bps: u64,
) {
    // Until a layer's rate is measured (its first 500 ms), the initial estimate stands in, so
    // str0m's initial probing is not held back.
    let desired = desired_bitrate(audio_bps, choices).unwrap_or(initial_bps);
    // Small changes (rates are measured, so they wobble) are not worth telling: every increase
    // above the estimate asks for a probe.
    let changed = sub.bwe_desired.is_none_or(|d| desired.abs_diff(d) * 10 > d);
    let held_below = choices.iter().zip(fits).any(|(c, p)| c.may_go_up && p.is_none_or(|p| p + 1 < c.rates.len()));
    let short = sub.bandwidth().is_some_and(|b| b < desired);
    let probe = !warming_up && held_below && short && sub.next_probe.is_none_or(|t| now >= t);
    if probe {
        // str0m probes when the desired bitrate rises above the estimate; lower it for one of
        // its timeouts first so raising it again counts as a rise.
        sub.rtc.bwe().set_bitrate(Bitrate::ZERO, Bitrate::bps(desired / 2));
        let _ = sub.rtc.handle_input(Input::Timeout(now));
        sub.next_probe = Some(now + PROBE_EVERY);
    }
    if changed || probe {
        sub.bwe_desired = Some(desired);
        sub.rtc.bwe().set_bitrate(Bitrate::ZERO, Bitrate::bps(desired));
        if probe {
            let _ = sub.rtc.handle_input(Input::Timeout(now));
        }
    }
}

/// Whether a subscriber starting on a layer can start from its keyframe cache.
fn cached(cfg: &CoreConfig, track: &TrackIn, li: usize) -> bool {
    cfg.keyframe_cache && track.layers.get(li).is_some_and(|l| l.gop.complete().is_some())
}

/// Send a layer's merged keyframe request upstream if the throttle allows it now.
fn send_due_keyframe_request(
    now: Instant,
    track: &mut TrackIn,
    li: usize,
    conns: &mut HashMap<ConnKey, Conn>,
    q: &mut Queues,
    counters: &mut Counters,
) {
    let Some(layer) = track.layers.get_mut(li) else { return };
    let Some(kind) = layer.keyframes.due(now) else { return };
    let Some(publisher) = conns.get_mut(&track.conn) else { return };
    // Nothing to ask until the publisher's stream exists; the request stays pending.
    let mut api = publisher.rtc.direct_api();
    let Some(rx) = api.stream_rx_by_mid(track.mid, layer.rid) else { return };
    rx.request_keyframe(kind);
    layer.keyframes.mark_sent(now);
    publisher.stats.keyframe_requests_out += 1;
    counters.keyframe_requests_out[kind_index(kind)] += 1;
    publisher.drain(now, q);
}

/// The gateway itself needs a keyframe of a layer (a subscriber starts or switches, or a loss
/// could not be repaired): ask now if the throttle allows, and keep asking every
/// `keyframe_retry` until one arrives.
fn want_keyframe(
    now: Instant,
    track: &mut TrackIn,
    li: usize,
    conns: &mut HashMap<ConnKey, Conn>,
    q: &mut Queues,
    counters: &mut Counters,
) {
    if track.kind != MediaKind::Video {
        return;
    }
    let Some(layer) = track.layers.get_mut(li) else { return };
    layer.keyframe_wanted.get_or_insert(now);
    layer.keyframes.request(KeyframeRequestKind::Pli);
    send_due_keyframe_request(now, track, li, conns, q, counters);
}

/// Ticks between the frames of a replayed group of pictures: 1 ms. A decoder gets them as one
/// burst and shows the newest at once; with their original spacing a jitter buffer would hold
/// the live frames back by the age of the keyframe.
const REPLAY_FRAME_STEP_MS: f64 = 1.0;

/// Start a subscriber's track on a cached group of pictures (whose last packet is the live one
/// being forwarded): sequence numbers continue the outgoing stream, frames are packed 1 ms apart
/// ending at the live frame's timestamp, so live packets that follow keep their spacing.
#[allow(clippy::too_many_arguments)]
fn replay_gop(
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

/// Narrow our answer to a publisher to one codec per media section (plus its RTX): the first,
/// which the publisher would send anyway. The publication then carries one definite codec that
/// subscribers can be offered alone. Records that payload type per mid on the connection.
fn one_codec_per_section(conn: &mut Conn, answer: &str) -> String {
    let narrowed = restrict_codecs(answer, |s| Some(s.primary_with_rtx()));
    for s in crate::sdp::codecs(&narrowed) {
        if let (Some(mid), Some(&pt)) = (s.mid, s.pts.first()) {
            conn.sending_pts.retain(|(m, _)| *m != mid);
            conn.sending_pts.push((mid, pt));
        }
    }
    narrowed
}

/// Narrow a subscriber offer so each track's section lists only the codec its publication
/// carries (and that codec's RTX), in the subscriber session's payload types. A subscriber that
/// cannot decode it rejects the section (port 0) instead of accepting a codec nobody sends.
fn offers_publication_codecs(conn: &Conn, tracks: &[TrackIn], offer: &str) -> String {
    restrict_codecs(offer, |s| {
        let mid = s.mid.as_deref()?;
        let out = conn.outs.iter().find(|o| o.mid.to_string() == mid)?;
        let codec = tracks.iter().find(|t| t.stream_id == out.stream_id)?.codec?;
        let ours = conn.rtc.codec_config().match_params(codec)?;
        Some([Some(*ours.pt()), ours.resend().map(|p| *p)].into_iter().flatten().collect())
    })
}

/// RTP ticks to advance the timestamp by when an outgoing stream changes source: the time since
/// the last forwarded packet.
fn ts_advance(last: Option<Instant>, now: Instant, clock: f64) -> u32 {
    let secs = last.map(|t| now.saturating_duration_since(t).as_secs_f64()).unwrap_or(0.0);
    ((secs * clock) as u32).max(1)
}

/// The subscriber's payload type for the publisher's codec, cached per track.
fn map_pt(rtc: &Rtc, out: &mut TrackOut, params: PayloadParams) -> Option<str0m::media::Pt> {
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

/// How long a gap in a publisher's stream may stay open before it counts as lost for good: four
/// round trips to the publisher (NACK, RTX, and a retry), at least 250 ms; 500 ms while the
/// round trip is unknown.
fn give_up_after(publisher: Option<&Conn>) -> std::time::Duration {
    match publisher.and_then(|p| p.stats.rtt_ms) {
        Some(rtt) => std::time::Duration::from_secs_f64((4.0 * rtt / 1000.0).max(0.25)),
        None => std::time::Duration::from_millis(500),
    }
}

/// The SRTP profile, from the authentication tag of an SRTP packet and the RtpPacket str0m made of
/// it (str0m 0.25 has no getter). The DTLS server — the gateway, which always answers
/// `setup:passive` — picks AEAD_AES_256_GCM whenever the client offers it (every browser does),
/// then AEAD_AES_128_GCM, then AES_CM_128_HMAC_SHA1_80. A 16-byte tag is GCM, 10 bytes SHA1-80.
fn infer_srtp_profile<'a>(datagram: &[u8], events: impl Iterator<Item = &'a (ConnKey, Event)>) -> Option<String> {
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
fn note_codec(stats: &mut ConnStats, mid: Mid, params: PayloadParams) {
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

fn codec_name(params: PayloadParams) -> String {
    let spec = params.spec();
    let mut name = format!("{}/{}", spec.codec, spec.clock_rate.get()).to_ascii_lowercase();
    if let Some(profile) = spec.format.profile_level_id {
        name.push_str(&format!(";profile-level-id={profile:06x}"));
    }
    name
}

/// Store the latest stats of a (mid, rid); returns how many NACKs were added since the last.
fn upsert(list: &mut Vec<MediaStats>, mut st: MediaStats) -> u64 {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_offers_first_supported_video_codec() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 45 102 96\r\na=rtpmap:45 XYZ/90000\r\n\
                   a=rtpmap:96 VP8/90000\r\na=rtpmap:102 H264/90000\r\n";
        assert_eq!(preferred_video_codec(sdp), Some(Codec::H264));
        assert_eq!(preferred_video_codec("v=0\r\nm=audio 9 X 0\r\n"), None);
    }

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

    #[test]
    fn preferred_codec_goes_first() {
        let mut cc = CodecConfig::new_with_defaults();
        prefer_video_codec(&mut cc, Codec::H264);
        let first_video = cc.params().iter().find(|p| p.spec().codec.is_video()).map(|p| p.spec().codec);
        assert_eq!(first_video, Some(Codec::H264));
        assert!(cc.params().iter().any(|p| p.spec().codec == Codec::Vp8), "others stay");
    }

    #[test]
    fn accepted_sections_are_counted() {
        let answer = "m=audio 9 UDP 111\r\nm=video 0 UDP 96\r\nm=application 9 UDP/DTLS/SCTP x\r\n";
        assert_eq!(accepted_media_sections(answer), 1);
        assert_eq!(first_mid("a=x\r\na=mid:0\r\na=mid:1\r\n").as_deref(), Some("0"));
    }
}
