//! Connection setup and SDP: publish answers (one codec per section), subscriber offers (each
//! track's codec alone) and renegotiation when a room's tracks change, answers, trickled
//! candidates.

use super::*;

/// Sent packets each connection remembers for TWCC feedback (str0m keeps 1,000, ~90 bytes
/// each, `vendor/README.md`): 500 cover a 250 ms feedback interval plus a round trip at 1,500
/// packets/s (a subscriber of nine 1 Mbit/s videos), and stay in a 512-slot queue instead of a
/// 1,024-slot one (45 KB less per connection).
const TWCC_SEND_HISTORY: usize = 500;

/// The first video codec of the offer's first video section that we support.
pub(super) fn preferred_video_codec(sdp: &str) -> Option<Codec> {
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
pub(super) fn prefer_video_codec(cc: &mut CodecConfig, first: Codec) {
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

/// Narrow our answer to a publisher to one codec per media section (plus its RTX): the first,
/// which the publisher would send anyway. The publication then carries one definite codec that
/// subscribers can be offered alone. Records that payload type per mid on the connection.
pub(super) fn one_codec_per_section(conn: &mut Conn, answer: &str) -> String {
    let narrowed = restrict_codecs(answer, |s| Some(s.primary_with_rtx()));
    let Side::Publish(side) = &mut conn.side else { return narrowed };
    for s in crate::sdp::codecs(&narrowed) {
        if let (Some(mid), Some(&pt)) = (s.mid, s.pts.first()) {
            side.sending_pts.retain(|(m, _)| *m != mid);
            side.sending_pts.push((mid, pt));
        }
    }
    narrowed
}

/// Narrow a subscriber offer so each track's section lists only the codec its publication
/// carries (and that codec's RTX), in the subscriber session's payload types. A subscriber that
/// cannot decode it rejects the section (port 0) instead of accepting a codec nobody sends.
pub(super) fn offers_publication_codecs(conn: &Conn, tracks: &[TrackIn], offer: &str) -> String {
    restrict_codecs(offer, |s| {
        let mid = s.mid.as_deref()?;
        let out = conn.outs().iter().find(|o| o.mid.to_string() == mid)?;
        let codec = tracks.iter().find(|t| t.stream_id == out.stream_id)?.codec?;
        let ours = conn.rtc.codec_config().match_params(codec)?;
        Some([Some(*ours.pt()), ours.resend().map(|p| *p)].into_iter().flatten().collect())
    })
}

/// Add our host candidates to a connection's `Rtc` and keep their SDP values for trickling:
/// the UDP one on `local` (the connection's socket), then a passive TCP one (RFC 6544) per
/// ICE-TCP address. str0m gives TCP host candidates a lower type preference (90) than UDP
/// ones (126), and each later candidate a lower local preference, so a client that can reach
/// the UDP port prefers it and TCP is the fallback.
pub(super) fn add_host_candidates(conn: &mut Conn, cfg: &CoreConfig, local: SocketAddr) {
    let udp = Candidate::host(local, "udp").ok();
    let tcp = cfg
        .ice_tcp
        .iter()
        .filter_map(|addr| Candidate::builder().tcp().host(*addr).tcptype(TcpType::Passive).build().ok());
    for c in udp.into_iter().chain(tcp) {
        if let Some(added) = conn.rtc.add_local_candidate(c) {
            // Trickled as before: without the `ufrag` extension the agent appends (the offer's
            // or answer's ufrag is the one), which not every client's parser takes.
            let line = added.to_sdp_string();
            let line = line.strip_prefix("a=").unwrap_or(&line);
            let line = line.split(" ufrag ").next().unwrap_or(line);
            conn.candidates.push(line.trim_end().to_owned());
        }
    }
}

/// The `SDP_PROCESSED` reason of a renegotiation that restarted ICE.
const ICE_RESTART: &str = signaling_api::protocol::ICE_RESTART_REASON;

/// Where a batch of new outgoing streams starts: one sequence number for all (low: str0m and
/// receivers need the first extended number below 65536) and a timestamp offset per stream
/// (random, RFC 3550 §5.1), unless the sim fixed both ([`Engine::fix_outgoing_start`]).
fn out_start(fixed: Option<(u16, u32)>) -> (u16, impl Fn() -> u32) {
    let seq = fixed.map_or_else(|| rand::rng().random_range(1000..30000), |(s, _)| s);
    (seq, move || fixed.map_or_else(|| rand::rng().random(), |(_, t)| t))
}

/// Our current ICE username fragment on a connection.
fn local_ufrag(conn: &mut Conn) -> String {
    conn.rtc.direct_api().local_ice_credentials().ufrag
}

impl Engine {
    pub(super) fn new_conn(
        &mut self,
        now: Instant,
        spec: NewConnection,
        role: Role,
        first_video: Option<Codec>,
    ) -> Result<ConnKey, MediaError> {
        if spec.spec.role != role {
            return Err(err(ErrorCode::BadRequest, "the connection's role does not match the request"));
        }
        let room = Arc::clone(
            self.rooms
                .get_key_value(spec.spec.room_id.as_str())
                .ok_or_else(|| err(ErrorCode::NotFound, "room not found"))?
                .0,
        );
        if self.keys.contains_key(spec.spec.connection_id.as_str()) || self.conns.contains_key(&spec.key) {
            return Err(err(ErrorCode::Conflict, "connection already exists"));
        }
        let mut builder = Rtc::builder()
            .set_ice_lite(true)
            .set_rtp_mode(true)
            .set_stats_interval(Some(self.cfg.stats_interval))
            .set_twcc_send_history(TWCC_SEND_HISTORY);
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
        let id: Arc<str> = Arc::from(spec.spec.connection_id.as_str());
        let span = tracing::info_span!(
            "connection",
            connection_id = %spec.spec.connection_id,
            room = %spec.spec.room_id,
            participant = %spec.spec.participant_id,
            role = if role == Role::Publish { "publish" } else { "subscribe" }
        );
        let mut conn = Conn {
            key: spec.key,
            id: Arc::clone(&id),
            room: Arc::clone(&room),
            participant: Arc::from(spec.spec.participant_id.as_str()),
            side: Side::new(role),
            rtc,
            state: ConnectionState::Initial,
            local: spec.local,
            created: now,
            gathered_at: None,
            ice_connected: false,
            last_rx: now,
            restarted_at: None,
            restarting: false,
            restart_path: None,
            restart_reached: false,
            next_timeout: None,
            last_round: None,
            trusted: Vec::new(),
            candidate_added: false,
            candidates: Vec::new(),
            first_mid: None,
            remote_offer: None,
            ready_at: None,
            stats: ConnStats::default(),
            span,
        };
        if let Side::Subscribe(side) = &mut conn.side {
            side.shed_slot = crate::overload::shed_slot(self.subscribers_seen);
            self.subscribers_seen += 1;
        }
        conn.enter(&mut self.q, ConnectionState::Initial, None);
        self.index_ufrag(local_ufrag(&mut conn), spec.key);
        self.keys.insert(id, spec.key);
        self.conns.insert(spec.key, conn);
        if let Some(r) = self.rooms.get_mut(&room) {
            r.conns.push(spec.key);
        }
        if role == Role::Subscribe {
            self.subscribers += 1;
        }
        self.note_interest(&room);
        Ok(spec.key)
    }

    /// Fail a connection because of its SDP, and return the error for the client.
    pub(super) fn reject_sdp(&mut self, now: Instant, key: ConnKey, message: String) -> MediaError {
        self.end(now, key, ConnectionState::Failed, &format!("bad_sdp: {message}"));
        self.process(now);
        err(ErrorCode::BadSdp, message)
    }

    /// Open a publish connection with the client's offer; emits the answer.
    pub fn publish(&mut self, now: Instant, spec: NewConnection, offer: &str) -> Result<(), MediaError> {
        let local = spec.local;
        // Answer with the publisher's preferred video codec first: browsers send the first one.
        let key = self.new_conn(now, spec, Role::Publish, preferred_video_codec(offer))?;
        let text = offer;
        if let Err(message) = check_sections(offer, self.cfg.max_media_sections) {
            return Err(self.reject_sdp(now, key, message));
        }
        let offer = match SdpOffer::from_sdp_string(offer) {
            Ok(o) => o,
            Err(e) => return Err(self.reject_sdp(now, key, format!("offer is not valid SDP: {e}"))),
        };
        let conn = self.conns.get_mut(&key).expect("inserted above");
        conn.remote_offer = Some(text.to_owned());
        add_host_candidates(conn, &self.cfg, local);
        let answer = match conn.rtc.sdp_api().accept_offer(offer) {
            Ok(a) => one_codec_per_section(conn, &a.to_sdp_string()),
            Err(e) => return Err(self.reject_sdp(now, key, format!("offer was rejected: {e}"))),
        };
        if accepted_media_sections(&answer) == 0 {
            let message = "offer has no audio or video with a usable codec";
            let mut e = self.reject_sdp(now, key, message.into());
            // Valid SDP, nothing usable in it: WHIP answers 422 (the WebSocket says `bad_sdp`).
            e.code = ErrorCode::Unprocessable;
            return Err(e);
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
        let conn = conn_mut(&mut self.conns, key)?;
        if conn.role() != Role::Publish {
            return Err(err(ErrorCode::BadRequest, "not a publish connection"));
        }
        check_sections(offer, self.cfg.max_media_sections).map_err(|m| err(ErrorCode::BadSdp, m))?;
        let text = offer;
        let offer = SdpOffer::from_sdp_string(offer)
            .map_err(|e| err(ErrorCode::BadSdp, format!("offer is not valid SDP: {e}")))?;
        let ufrag = local_ufrag(conn);
        let answer = match conn.rtc.sdp_api().accept_offer(offer) {
            Ok(a) => one_codec_per_section(conn, &a.to_sdp_string()),
            Err(e) => return Err(self.reject_sdp(now, key, format!("offer was rejected: {e}"))),
        };
        // New ICE credentials in the offer (the browser's `restartIce()`): str0m answered with
        // new ones of ours, keeping our candidate. Same connection, same DTLS, same state.
        conn.remote_offer = Some(text.to_owned());
        let restarted = local_ufrag(conn) != ufrag;
        if restarted {
            conn.ice_restarted(now);
        }
        let reason = restarted.then(|| ICE_RESTART.to_owned());
        conn.event(&mut self.q, EventKind::SdpProcessed, reason);
        self.q.out.push_back(Output::Event(MediaEvent::Answer { connection_id: conn.id.to_string(), sdp: answer }));
        conn.drain(now, &mut self.q);
        if restarted {
            self.reindex_ufrag(key);
        }
        self.process(now);
        Ok(())
    }

    /// The client asks for an ICE restart of its subscribe connection (`restart_ice`): the
    /// gateway offers again with new ICE credentials (and whatever else changed meanwhile). With
    /// an offer already outstanding, the restart goes into the next one, made as soon as that
    /// one is answered. The state stays as it is (READY stays READY); the answer's
    /// `SDP_PROCESSED` carries the reason `ice_restart`.
    pub fn restart_ice(&mut self, now: Instant, connection_id: &str) -> Result<(), MediaError> {
        let key = self.key_of(connection_id)?;
        let conn = conn_mut(&mut self.conns, key)?;
        let state = conn.state;
        let Side::Subscribe(side) = &mut conn.side else {
            return Err(err(
                ErrorCode::BadRequest,
                "restart_ice is for subscribe connections; a publisher restarts ICE with a new publish offer",
            ));
        };
        if side.plays.is_some() {
            return Err(err(ErrorCode::BadRequest, "a WHEP connection restarts ICE by PATCH on its resource"));
        }
        if state == ConnectionState::Initial {
            return Err(err(
                ErrorCode::BadRequest,
                "the connection has not been negotiated yet: answer its offer first",
            ));
        }
        side.restart_wanted = true;
        if side.pending.is_some() {
            side.offer_wanted = true;
        } else {
            self.renegotiate(now, key);
        }
        self.process(now);
        Ok(())
    }

    /// An ICE restart of a connection the client offered (WHIP publish, WHEP play) asked for by
    /// its new ICE credentials alone (a PATCH, RFC 9725 §4.3): the client's latest offer is
    /// applied again with them, and str0m answers with new ones of ours, which are returned
    /// with our candidate. As any restart: same connection, `SDP_PROCESSED` `ice_restart`.
    pub fn restart_ice_remote(
        &mut self,
        now: Instant,
        connection_id: &str,
        ufrag: &str,
        pwd: &str,
    ) -> Result<crate::IceRestarted, MediaError> {
        let key = self.key_of(connection_id)?;
        let conn = conn_mut(&mut self.conns, key)?;
        let plays = conn.sub().is_some_and(|s| s.plays.is_some());
        if conn.role() == Role::Subscribe && !plays {
            return Err(err(ErrorCode::BadRequest, "a gateway-offered connection restarts ICE with restart_ice"));
        }
        if !crate::sdp::valid_ice_credentials(ufrag, pwd) {
            return Err(err(ErrorCode::BadRequest, "ice-ufrag and ice-pwd must be 4 and 22 to 256 ICE characters"));
        }
        let Some(stored) = conn.remote_offer.clone() else {
            return Err(err(ErrorCode::BadRequest, "the connection has no offer to restart from"));
        };
        let before = local_ufrag(conn);
        let offer = crate::sdp::with_ice_credentials(&stored, ufrag, pwd);
        if plays {
            self.replay(now, key, &offer)?;
        } else {
            self.republish(now, connection_id, &offer)?;
        }
        let conn = conn_mut(&mut self.conns, key)?;
        let creds = conn.rtc.direct_api().local_ice_credentials();
        if creds.ufrag == before {
            return Err(err(ErrorCode::BadRequest, "these are the session's current ICE credentials, not new ones"));
        }
        // The UDP candidate, then any ICE-TCP ones, as trickled.
        let candidates = conn.candidates.clone();
        Ok(crate::IceRestarted { ufrag: creds.ufrag, pwd: creds.pass, candidates })
    }

    /// A client-offered subscribe connection (WHEP) takes its offer again (for an ICE restart):
    /// its sections stay bound as they are.
    fn replay(&mut self, now: Instant, key: ConnKey, offer: &str) -> Result<(), MediaError> {
        let conn = conn_mut(&mut self.conns, key)?;
        let parsed = SdpOffer::from_sdp_string(offer)
            .map_err(|e| err(ErrorCode::BadSdp, format!("offer is not valid SDP: {e}")))?;
        let ufrag = local_ufrag(conn);
        let answer = match conn.rtc.sdp_api().accept_offer(parsed) {
            Ok(a) => a.to_sdp_string(),
            Err(e) => return Err(self.reject_sdp(now, key, format!("offer was rejected: {e}"))),
        };
        let conn = conn_mut(&mut self.conns, key)?;
        conn.remote_offer = Some(offer.to_owned());
        // The whole answer, as for a publisher's renegotiation (an HTTP client gets only the
        // credentials and candidates from it).
        self.q.out.push_back(Output::Event(MediaEvent::Answer { connection_id: conn.id.to_string(), sdp: answer }));
        let restarted = local_ufrag(conn) != ufrag;
        if restarted {
            conn.ice_restarted(now);
        }
        conn.event(&mut self.q, EventKind::SdpProcessed, restarted.then(|| ICE_RESTART.to_owned()));
        conn.drain(now, &mut self.q);
        if restarted {
            self.reindex_ufrag(key);
        }
        self.process(now);
        Ok(())
    }

    /// Send a subscribe connection's outstanding offer again (a resumed session's new socket
    /// may never have seen it); nothing when no offer is outstanding.
    pub fn resend_offer(&mut self, connection_id: &str) -> Result<(), MediaError> {
        let key = self.key_of(connection_id)?;
        let conn = conn_mut(&mut self.conns, key)?;
        let Some(side) = conn.sub() else {
            return Err(err(ErrorCode::BadRequest, "not a subscribe connection"));
        };
        if let (Some(_), Some(sdp)) = (&side.pending, &side.last_offer) {
            let (connection_id, sdp) = (conn.id.to_string(), sdp.clone());
            self.q.out.push_back(Output::Event(MediaEvent::Offer { connection_id, sdp }));
        }
        Ok(())
    }

    /// Index the connection under its current ICE username fragment (and no other): a shared
    /// socket (`media.mux`) and the ICE-TCP listener find a client's checks by it, and a restart
    /// changes it.
    pub(super) fn reindex_ufrag(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        let ufrag = local_ufrag(conn);
        self.unindex(key);
        self.index_ufrag(ufrag, key);
    }

    /// Open a subscribe connection; emits the first offer (a data channel plus every track in
    /// the room that is not the participant's own).
    pub fn subscribe(&mut self, now: Instant, spec: NewConnection) -> Result<(), MediaError> {
        let key = self.new_conn(now, spec, Role::Subscribe, None)?;
        self.renegotiate(now, key);
        self.process(now);
        Ok(())
    }

    /// Open a subscribe connection the client offers (WHEP): it plays `publisher`'s tracks. Each
    /// `recvonly` audio or video section of the offer gets the first of the publisher's tracks
    /// of its kind whose codec it lists, with the same down track (sequence, timestamp and
    /// picture rewriting, layer choice by the bandwidth estimate) as a gateway-offered
    /// subscriber; the answer lists only that codec (and its RTX) per section and carries our
    /// host candidate. Sections left without a track stay silent. The connection is never
    /// re-offered; it ends FINISHED (`publisher_left`) when none of its tracks is left.
    pub fn play(&mut self, now: Instant, spec: NewConnection, publisher: &str, offer: &str) -> Result<(), MediaError> {
        // The target is identified before the offer is judged, and before anything is made.
        let room =
            self.rooms.get(spec.spec.room_id.as_str()).ok_or_else(|| err(ErrorCode::NotFound, "room not found"))?;
        let published: Vec<&TrackIn> = room.tracks.iter().filter(|t| *t.owner == *publisher).collect();
        if published.is_empty() {
            return Err(err(ErrorCode::NotFound, "participant not found or publishing nothing"));
        }
        let first_video =
            published.iter().find(|t| t.kind == MediaKind::Video).and_then(|t| t.codec).map(|c| c.spec().codec);
        let local = spec.local;
        let key = self.new_conn(now, spec, Role::Subscribe, first_video)?;
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.remote_offer = Some(offer.to_owned());
            if let Some(side) = conn.sub_mut() {
                side.plays = Some(Arc::from(publisher));
            }
        }
        if let Err(message) = check_sections(offer, self.cfg.max_media_sections) {
            return Err(self.reject_sdp(now, key, message));
        }
        let offer = match SdpOffer::from_sdp_string(offer) {
            Ok(o) => o,
            Err(e) => return Err(self.reject_sdp(now, key, format!("offer is not valid SDP: {e}"))),
        };
        let conn = self.conns.get_mut(&key).expect("inserted above");
        add_host_candidates(conn, &self.cfg, local);
        let answer = match conn.rtc.sdp_api().accept_offer(offer) {
            Ok(a) => a.to_sdp_string(),
            Err(e) => return Err(self.reject_sdp(now, key, format!("offer was rejected: {e}"))),
        };
        // Bind the publisher's tracks to the sections we send on, by kind and codec.
        let Self { rooms, conns, .. } = self;
        let conn = conns.get_mut(&key).expect("inserted above");
        let room = rooms.get_mut(&conn.room).expect("checked above");
        let mut bound: Vec<(usize, Mid, u8, Option<u8>)> = Vec::new();
        for section in crate::sdp::codecs(&answer) {
            let Some(mid) = section.mid.as_deref().map(Mid::from) else { continue };
            let Some(media) = conn.rtc.media(mid) else { continue };
            if section.rejected || !media.direction().is_sending() {
                continue;
            }
            let kind = media.kind();
            let remote = media.remote_pts().to_vec();
            let track = (0..room.tracks.len()).find(|&i| {
                let t = &room.tracks[i];
                *t.owner == *publisher && t.kind == kind && !bound.iter().any(|b| b.0 == i)
            });
            let Some(i) = track else { continue };
            let Some(ours) = room.tracks[i].codec.and_then(|c| conn.rtc.codec_config().match_params(c).copied()) else {
                continue;
            };
            if !remote.contains(&ours.pt()) {
                continue;
            }
            bound.push((i, mid, *ours.pt(), ours.resend().map(|p| *p)));
        }
        if bound.is_empty() {
            let message = "offer has no recvonly audio or video section with a codec the publisher sends".to_owned();
            self.end(now, key, ConnectionState::Failed, &format!("bad_sdp: {message}"));
            self.process(now);
            return Err(err(ErrorCode::Unprocessable, message));
        }
        let answer = restrict_codecs(&answer, |s| {
            let b = bound.iter().find(|b| Some(b.1.to_string()) == s.mid)?;
            Some([Some(b.2), b.3].into_iter().flatten().collect())
        });
        let (start_seq, ts_offset) = out_start(self.out_start);
        let Conn { side: Side::Subscribe(side), .. } = &mut *conn else { unreachable!("made as a subscriber") };
        for &(i, mid, _, _) in &bound {
            room.link(i, key, mid);
            let t = &room.tracks[i];
            let mut out = DownTrack::new(
                mid,
                Arc::clone(&t.stream_id),
                t.kind,
                SeqRewriter::new(start_seq, ts_offset()),
                self.cfg.rtx_history,
            );
            out.live = true;
            side.outs.push(out);
        }
        conn.span.in_scope(|| tracing::info!(publisher, tracks = bound.len(), "playing a publisher (client offer)"));
        conn.event(&mut self.q, EventKind::SdpProcessed, None);
        let mid = first_mid(&answer);
        conn.first_mid = mid.clone();
        self.q.out.push_back(Output::Event(MediaEvent::Answer { connection_id: conn.id.to_string(), sdp: answer }));
        conn.candidate_added = true;
        self.announce_candidate(key, mid, now);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.drain(now, &mut self.q);
        }
        queue_reallocation(&mut self.realloc, key);
        self.process(now);
        Ok(())
    }

    /// A fresh offer on an existing subscribe connection (or the outstanding one again).
    pub fn resubscribe(&mut self, now: Instant, connection_id: &str) -> Result<(), MediaError> {
        let key = self.key_of(connection_id)?;
        let conn = conn_mut(&mut self.conns, key)?;
        let id = conn.id.to_string();
        let Side::Subscribe(side) = &mut conn.side else {
            return Err(err(ErrorCode::BadRequest, "not a subscribe connection"));
        };
        if side.pending.is_some() {
            // The client has not answered the outstanding offer yet: send it again.
            if let Some(sdp) = side.last_offer.clone() {
                self.q.out.push_back(Output::Event(MediaEvent::Offer { connection_id: id, sdp }));
            }
        } else if !self.renegotiate(now, key) {
            // Nothing changed: the same description again, so the client can re-answer it.
            let conn = conn_mut(&mut self.conns, key)?;
            if let Some(side) = conn.sub_mut() {
                if let Some(sdp) = side.last_offer.clone() {
                    side.idle_reoffer = true;
                    self.q.out.push_back(Output::Event(MediaEvent::Offer { connection_id: id, sdp }));
                }
            }
        }
        self.process(now);
        Ok(())
    }

    /// The client's answer to our latest offer.
    pub fn answer(&mut self, now: Instant, connection_id: &str, sdp: &str) -> Result<(), MediaError> {
        let key = self.key_of(connection_id)?;
        let conn = conn_mut(&mut self.conns, key)?;
        let Side::Subscribe(side) = &mut conn.side else {
            return Err(err(ErrorCode::BadRequest, "answers are for subscribe connections"));
        };
        let answer = SdpAnswer::from_sdp_string(sdp)
            .map_err(|e| err(ErrorCode::BadSdp, format!("answer is not valid SDP: {e}")))?;
        let Some(pending) = side.pending.take() else {
            if std::mem::take(&mut side.idle_reoffer) {
                // The answer to a repeated, unchanged offer: nothing to apply.
                conn.event(&mut self.q, EventKind::SdpProcessed, None);
                return Ok(());
            }
            return Err(err(ErrorCode::BadRequest, "no offer is waiting for an answer"));
        };
        let restarted = std::mem::take(&mut side.restart_offered);
        if let Err(e) = conn.rtc.sdp_api().accept_answer(pending, answer) {
            return Err(self.reject_sdp(now, key, format!("answer was rejected: {e}")));
        }
        if restarted {
            conn.ice_restarted(now);
        }
        conn.event(&mut self.q, EventKind::SdpProcessed, restarted.then(|| ICE_RESTART.to_owned()));
        let mut newly_live = Vec::new();
        let mut unavailable = Vec::new();
        let answered = crate::sdp::codecs(sdp);
        let tracks = self.rooms.get(&conn.room).map(|r| r.tracks.as_slice()).unwrap_or_default();
        let Conn { rtc, side: Side::Subscribe(side), .. } = conn else { unreachable!("checked above") };
        for o in side.outs.iter_mut().filter(|o| !o.live && !o.stopped && o.unavailable.is_none()) {
            if rtc.media(o.mid).is_none_or(|m| m.disabled()) {
                // Rejected (port 0). With one codec offered, a section that does not list it
                // back is one the subscriber cannot decode.
                let mid = o.mid.to_string();
                let section = answered.iter().find(|s| s.mid.as_deref() == Some(mid.as_str()));
                // The one codec we offered for it, in this session's numbers (what
                // `offers_publication_codecs` put in the offer).
                let offered = tracks
                    .iter()
                    .find(|t| t.stream_id == o.stream_id)
                    .and_then(|t| t.codec)
                    .and_then(|c| rtc.codec_config().match_params(c))
                    .map(|p| *p.pt());
                let listed = section.is_some_and(|s| offered.is_some_and(|pt| s.pts.contains(&pt)));
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
        let conn = conn_mut(&mut self.conns, key)?;
        if !conn.candidate_added {
            conn.candidate_added = true;
            let local = conn.local;
            add_host_candidates(conn, &self.cfg, local);
            let mid = conn.first_mid.clone();
            self.announce_candidate(key, mid, now);
        } else if restarted {
            // The restart offer carried no candidate (str0m dropped ours with the old
            // credentials): add it again and trickle it, as after the first answer, so the
            // client's checks start once we know its new credentials.
            let local = conn.local;
            conn.candidates.clear();
            add_host_candidates(conn, &self.cfg, local);
            let mid = conn.first_mid.clone();
            self.trickle_candidate(key, mid);
            self.reindex_ufrag(key);
        }
        let conn = conn_mut(&mut self.conns, key)?;
        conn.drain(now, &mut self.q);
        if conn.state == ConnectionState::Ready {
            for o in conn.outs_mut().iter_mut().filter(|o| newly_live.contains(&o.mid) && o.kind == MediaKind::Video) {
                o.ttff_from = Some(now);
            }
        }
        queue_reallocation(&mut self.realloc, key);
        let conn = conn_mut(&mut self.conns, key)?;
        if conn.sub_mut().is_some_and(|s| std::mem::take(&mut s.offer_wanted)) {
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
        let conn = conn_mut(&mut self.conns, key)?;
        conn.rtc.add_remote_candidate(c);
        conn.drain(now, &mut self.q);
        self.process(now);
        Ok(())
    }

    /// Tell the subscriber (and the inspection and metrics) that it will not receive a stream.
    pub(super) fn stream_unavailable(&mut self, key: ConnKey, stream_id: String, reason: &'static str) {
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

    /// Trickle our host candidates to the client (the UDP one, then any ICE-TCP ones) and enter
    /// GATHERED.
    pub(super) fn announce_candidate(&mut self, key: ConnKey, mid: Option<String>, now: Instant) {
        if !self.trickle_candidate(key, mid) {
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else { return };
        conn.gathered_at = Some(now);
        conn.enter(&mut self.q, ConnectionState::Gathered, None);
    }

    /// Send our host candidates to the client (the UDP one, then any ICE-TCP ones): a
    /// `candidate` message and a CANDIDATE event each. False when there is none.
    fn trickle_candidate(&mut self, key: ConnKey, mid: Option<String>) -> bool {
        let Some(conn) = self.conns.get_mut(&key) else { return false };
        if conn.candidates.is_empty() {
            return false;
        }
        for candidate in &conn.candidates {
            self.q.out.push_back(Output::Event(MediaEvent::Candidate {
                connection_id: conn.id.to_string(),
                candidate: candidate.clone(),
                sdp_mid: mid.clone(),
                sdp_mline_index: Some(0),
            }));
            conn.event(&mut self.q, EventKind::Candidate, None);
        }
        true
    }

    /// A publisher's media section started receiving: announce the track and offer it to every
    /// other participant's subscribe connection.
    pub(super) fn add_track(&mut self, now: Instant, key: ConnKey, mid: Mid, kind: MediaKind, rids: &[Rid]) {
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
        let sending: &[(String, u8)] = match &conn.side {
            Side::Publish(p) => &p.sending_pts,
            Side::Subscribe(_) => &[],
        };
        let codec = sending
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
            level: Default::default(),
            blocked: false,
            mirror: None,
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
        if self.spread.is_some() {
            let info = self.rooms.get(&room_id).and_then(|r| r.tracks.last()).map(|t| {
                Arc::new(relay::TrackInfo {
                    room: Arc::clone(&room_id),
                    stream_id: Arc::clone(&t.stream_id),
                    owner: Arc::clone(&t.owner),
                    mid: t.mid,
                    kind: t.kind,
                    rids: t.layers.iter().map(|l| l.rid).collect(),
                    codec: t.codec,
                    blocked: t.blocked,
                })
            });
            if let Some(info) = info {
                self.relay_all(&room_id, || Relay::TrackAdded(Arc::clone(&info)));
            }
        }
        self.renegotiate_room(now, &room_id);
    }

    /// Remove a publisher's tracks (one mid, or all) and renegotiate the subscribers.
    pub(super) fn remove_tracks(&mut self, now: Instant, key: ConnKey, mid: Option<Mid>) {
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
        let gone: Vec<Arc<str>> = removed.iter().map(|r| Arc::clone(&r.1)).collect();
        self.relay_all(&room_id, || Relay::TrackRemoved { room: Arc::clone(&room_id), stream_ids: gone.clone() });
        for (owner, stream_id, kind, mid) in removed {
            self.q.out.push_back(Output::Event(MediaEvent::StreamRemoved {
                room_id: room_id.to_string(),
                participant_id: owner.to_string(),
                stream_id: stream_id.to_string(),
                kind: kind_str(kind).into(),
                mid: mid.to_string(),
            }));
        }
        self.end_orphaned_players(now, &room_id, &gone);
        self.renegotiate_room(now, &room_id);
    }

    /// Client-offered subscribers (WHEP) cannot be re-offered: a track of theirs that ended
    /// leaves its section silent, and one left with no track at all ends FINISHED.
    pub(super) fn end_orphaned_players(&mut self, now: Instant, room_id: &str, gone: &[Arc<str>]) {
        let Some(room) = self.rooms.get(room_id) else { return };
        let mut ended = Vec::new();
        for k in &room.conns {
            let Some(side) = self.conns.get_mut(k).and_then(Conn::sub_mut) else { continue };
            if side.plays.is_none() {
                continue;
            }
            for o in side.outs.iter_mut().filter(|o| gone.contains(&o.stream_id)) {
                o.stopped = true;
                o.live = false;
            }
            if side.outs.iter().all(|o| o.stopped) {
                ended.push(*k);
            }
        }
        for k in ended {
            self.end(now, k, ConnectionState::Finished, "publisher_left");
        }
    }

    pub(super) fn renegotiate_room(&mut self, now: Instant, room_id: &str) {
        let Some(room) = self.rooms.get(room_id) else { return };
        let subs: Vec<ConnKey> = room
            .conns
            .iter()
            .copied()
            .filter(|k| self.conns.get(k).is_some_and(|c| c.role() == Role::Subscribe))
            .collect();
        for k in subs {
            self.renegotiate(now, k);
        }
    }

    /// Bring a subscribe connection's media sections in line with the room's tracks and send
    /// an offer if anything changed (or if none was ever sent). One offer is outstanding at a
    /// time; changes meanwhile are folded into the next one.
    /// Returns whether an offer went out.
    pub(super) fn renegotiate(&mut self, now: Instant, key: ConnKey) -> bool {
        let Self { rooms, conns, q, cfg, out_start: out_fixed, .. } = self;
        let Some(conn) = conns.get_mut(&key) else { return false };
        if conn.state.is_terminal() {
            return false;
        }
        let Conn { rtc, side: Side::Subscribe(side), room: room_id, participant, .. } = &mut *conn else {
            return false;
        };
        if side.plays.is_some() {
            // Its sections were fixed by the client's one offer (WHEP): nothing to re-offer.
            return false;
        }
        if side.pending.is_some() {
            side.offer_wanted = true;
            return false;
        }
        let Some(room) = rooms.get_mut(room_id) else { return false };
        let wanted: Vec<usize> = (0..room.tracks.len()).filter(|&i| room.tracks[i].owner != *participant).collect();
        let mut api = rtc.sdp_api();
        let restart = std::mem::take(&mut side.restart_wanted);
        if restart {
            // New credentials, no candidate in the offer: ours is trickled after the answer.
            api.ice_restart(false);
        }
        if !side.offered {
            // The first offer's data channels: the reliable one also brings the transport up
            // when there is nothing to receive yet; both carry the room's data messages.
            side.data.reliable = Some(api.add_channel(data::RELIABLE_LABEL.into()));
            side.data.unreliable = Some(api.add_channel_with_config(data::unreliable_config()));
        }
        let mut added = Vec::new();
        for &i in &wanted {
            let t = &room.tracks[i];
            if side.outs.iter().any(|o| !o.stopped && o.stream_id == t.stream_id) {
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
        for o in side.outs.iter_mut().filter(|o| !o.stopped) {
            if !wanted.iter().any(|&i| room.tracks[i].stream_id == o.stream_id) {
                api.stop_media(o.mid);
                o.stopped = true;
                o.live = false;
            }
        }
        let Some((offer, pending)) = api.apply() else {
            side.restart_wanted = restart;
            return false;
        };
        side.restart_offered = restart;
        let (start_seq, ts_offset) = out_start(*out_fixed);
        for (i, mid) in added {
            room.link(i, key, mid);
            let t = &room.tracks[i];
            let rewrite = SeqRewriter::new(start_seq, ts_offset());
            side.outs.push(DownTrack::new(mid, Arc::clone(&t.stream_id), t.kind, rewrite, cfg.rtx_history));
        }
        // Stopped sections belong to tracks that are gone; forget them.
        side.outs.retain(|o| !o.stopped);
        side.idle_reoffer = false;
        side.pending = Some(pending);
        side.offered = true;
        let sdp = offers_publication_codecs(conn, &room.tracks, &offer.to_sdp_string());
        if conn.first_mid.is_none() {
            conn.first_mid = first_mid(&sdp);
        }
        if let Some(side) = conn.sub_mut() {
            side.last_offer = Some(sdp.clone());
        }
        q.out.push_back(Output::Event(MediaEvent::Offer { connection_id: conn.id.to_string(), sdp }));
        conn.drain(now, q);
        true
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

    fn spec(key: u64, role: Role) -> NewConnection {
        NewConnection {
            key: ConnKey(key),
            local: "192.0.2.1:40000".parse().unwrap(),
            spec: ConnectionSpec {
                room_id: "r".into(),
                participant_id: format!("p{key}"),
                connection_id: format!("c{key}"),
                role,
            },
        }
    }

    fn sdp_events(engine: &mut Engine) -> (Vec<String>, Vec<String>) {
        let (mut sdps, mut candidates) = (Vec::new(), Vec::new());
        while let Some(out) = engine.poll_output() {
            match out {
                Output::Event(MediaEvent::Answer { sdp, .. } | MediaEvent::Offer { sdp, .. }) => sdps.push(sdp),
                Output::Event(MediaEvent::Candidate { candidate, .. }) => candidates.push(candidate),
                _ => {}
            }
        }
        (sdps, candidates)
    }

    /// With ICE-TCP addresses configured, the answer carries a passive TCP host candidate per
    /// address after the UDP one, at lower priorities, and the same candidates are trickled; the
    /// connection's ufrag is reported to the driver and routes a STUN message to it until the
    /// connection ends.
    #[test]
    fn ice_tcp_candidates_and_the_ufrag_index() {
        let now = Instant::now();
        let tcp: Vec<SocketAddr> = vec!["192.0.2.1:3478".parse().unwrap(), "198.51.100.7:3478".parse().unwrap()];
        let mut engine = Engine::new(CoreConfig { ice_tcp: tcp, ..CoreConfig::default() });
        engine.create_room("r");
        let mut client = test_peer::Peer::new(now, "192.0.2.9:5000".parse().unwrap(), &Default::default()).unwrap();
        let offer = client.publish_offer(true, Some(&[])).unwrap();
        engine.publish(now, spec(1, Role::Publish), &offer).unwrap();
        let (sdps, trickled) = sdp_events(&mut engine);
        let lines: Vec<&str> =
            sdps[0].lines().filter_map(|l| l.strip_prefix("a=")).filter(|l| l.starts_with("candidate:")).collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].contains(" udp ") && lines[0].contains("192.0.2.1 40000 typ host"), "{lines:?}");
        assert!(
            lines[1].contains(" tcp ") && lines[1].contains("192.0.2.1 3478 typ host tcptype passive"),
            "{lines:?}"
        );
        assert!(
            lines[2].contains(" tcp ") && lines[2].contains("198.51.100.7 3478 typ host tcptype passive"),
            "{lines:?}"
        );
        let prio = |l: &str| l.split_whitespace().nth(3).unwrap().parse::<u32>().unwrap();
        assert!(prio(lines[0]) > prio(lines[1]) && prio(lines[1]) > prio(lines[2]), "{lines:?}");
        assert_eq!(trickled.len(), 3);
        for (t, l) in trickled.iter().zip(&lines) {
            assert!(l.starts_with(t.as_str()) || t.starts_with(*l), "trickled {t} / in the answer {l}");
        }

        let ufrag = sdps[0].lines().find_map(|l| l.strip_prefix("a=ice-ufrag:")).unwrap().trim().to_owned();
        assert_eq!(engine.take_ufrag_changes(), [crate::UfragChange::Added(ufrag.clone())]);
        assert!(engine.take_ufrag_changes().is_empty(), "taken once");
        let username = format!("{ufrag}:them");
        let msg = StunMessage::binding_request(&username, str0m::ice::TransId::new(), true, 1, 100, false);
        let mut buf = vec![0u8; 256];
        let n = msg.to_bytes(Some(b"x"), &mut buf, |_, _| [0u8; 20]).unwrap();
        assert_eq!(engine.route_stun(&buf[..n]), Some(ConnKey(1)));
        assert_eq!(engine.route_stun(&[0x80, 0, 0, 0]), None, "RTP names no connection");
        engine.close_connection(now, "c1", "test");
        assert_eq!(engine.take_ufrag_changes(), [crate::UfragChange::Removed(ufrag)]);
        assert_eq!(engine.route_stun(&buf[..n]), None);
        assert!(!engine.handle_tcp_receive(
            now,
            ConnKey(1),
            "192.0.2.9:5000".parse().unwrap(),
            "192.0.2.1:3478".parse().unwrap(),
            &buf[..n]
        ));
    }

    #[test]
    fn without_ice_tcp_no_tcp_candidate_and_no_ufrag_log() {
        let now = Instant::now();
        let mut engine = Engine::new(CoreConfig::default());
        engine.create_room("r");
        engine.subscribe(now, spec(2, Role::Subscribe)).unwrap();
        let (sdps, _) = sdp_events(&mut engine);
        assert!(!sdps[0].contains(" tcp "), "{}", sdps[0]);
        assert!(engine.take_ufrag_changes().is_empty());
    }

    #[test]
    fn preferred_codec_goes_first() {
        let mut cc = CodecConfig::new_with_defaults();
        prefer_video_codec(&mut cc, Codec::H264);
        let first_video = cc.params().iter().find(|p| p.spec().codec.is_video()).map(|p| p.spec().codec);
        assert_eq!(first_video, Some(Codec::H264));
        assert!(cc.params().iter().any(|p| p.spec().codec == Codec::Vp8), "others stay");
    }
}
