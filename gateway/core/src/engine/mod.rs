//! The SFU engine of one media worker: its rooms, their connections and the forwarding between
//! them. Sans-IO: it is fed commands, datagrams and time, and hands back datagrams to send,
//! events to report and the next moment it wants to be woken.
//!
//! This file is the front (commands, `handle_*`, `poll_*`, the event loop, ending connections);
//! each job lives in its own file: `track` (the receive side of a published track), `negotiation`
//! (SDP and renegotiation), `forward` (the packet's path), `keyframes` (keyframe policy),
//! `allocation` (layer choice and bandwidth steering), `data` (the data-channel relay), `stats`
//! (inspection).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rand::Rng;
use signaling_api::protocol::{ConnectionState, ErrorCode, EventKind, LayerInfo, Role, Speaker};
use str0m::bwe::{Bitrate, BweKind};
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::config::DtlsCert;
use str0m::format::{Codec, CodecConfig, PayloadParams};
use str0m::ice::StunMessage;
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, Mid, Rid};
use str0m::net::{Protocol, Receive, TcpType};
use str0m::rtp::{ExtensionValues, RtpPacket};
use str0m::{Candidate, Event, IceConnectionState, Input, Rtc};

use crate::allocator::{allocate, desired_bitrate, TrackChoice, SINGLE_PAUSE_AFTER};
use crate::connection::{CodecInUse, Conn, ConnStats, LayerInUse, MediaStats, Queues, SelectedPair, Side};
use crate::descriptor::PayloadDescriptor;
use crate::downtrack::DownTrack;
use crate::layers::{CachedPacket, LayerIn};
use crate::rewrite::SeqRewriter;
use crate::sdp::{accepted_media_sections, check_sections, first_mid, restrict_codecs};
use crate::speakers::{AudioLevel, Speakers};
use crate::{ConnKey, ConnectionSpec, CoreConfig, Counters, MediaError, MediaEvent, Output, UfragChange};

mod allocation;
pub(crate) mod data;
mod forward;
mod keyframes;
mod negotiation;
mod relay;
mod stats;
mod track;

pub use relay::{Relay, RelayedPacket, TrackInfo};

use allocation::*;
use keyframes::*;
use stats::*;
use track::*;

/// How many sent datagrams' buffers the engine keeps for reuse ([`Engine::recycle`]): enough for
/// one publisher packet's copies to every subscriber of a large room (the driver hands them back
/// after each pass) while holding at most ~1 MB per worker.
pub const SPARE_BUFFERS: usize = 512;

/// A buffer larger than this (a datagram is at most ~1.5 KB) is not kept for reuse.
pub const SPARE_BUFFER_MAX_BYTES: usize = 2048;

/// A new connection: its description, and the socket the driver opened for it.
#[derive(Debug, Clone)]
pub struct NewConnection {
    pub key: ConnKey,
    /// The address of our host candidate (announced or bind IP, and the socket's port).
    pub local: SocketAddr,
    pub spec: ConnectionSpec,
}

pub struct Engine {
    cfg: CoreConfig,
    /// One DTLS certificate for every connection of this engine: generating an ECDSA key per
    /// connection dominates connection setup (join storms). DTLS key exchange stays ephemeral
    /// (ECDHE) per connection; the certificate only identifies us via the SDP fingerprint.
    cert: Option<DtlsCert>,
    rooms: HashMap<Arc<str>, Room>,
    conns: Conns,
    keys: HashMap<Arc<str>, ConnKey>,
    /// Shared-socket demultiplexing (`media.mux`) and ICE-TCP streams: our ICE username
    /// fragment of each connection, and each ICE-authenticated remote address with the
    /// connection it belongs to. Change `by_ufrag` only through `index_ufrag`/`unindex`.
    by_ufrag: HashMap<String, ConnKey>,
    by_source: HashMap<SocketAddr, ConnKey>,
    /// With ICE-TCP on: every change to `by_ufrag`, until the driver takes them
    /// ([`Engine::take_ufrag_changes`]) for its listener, which serves every worker.
    ufrag_changes: Vec<UfragChange>,
    q: Queues,
    counters: Counters,
    /// Subscribers whose layers must be chosen again.
    realloc: Vec<ConnKey>,
    next_realloc: Option<Instant>,
    /// Time to first frame of each new subscriber track, until the driver collects them.
    first_frames: Vec<std::time::Duration>,
    /// The driver's overload level (`overload`): how much video is shed.
    overload: u8,
    /// Subscribe connections made so far (each one's shed slot comes from its ordinal).
    subscribers_seen: u64,
    /// Packets not written because of the overload level, by the level at which they would be
    /// written again, until the driver takes them.
    overload_shed: [u64; crate::overload::LEVELS],
    /// `media.spread`: this worker's place among those rooms are spread over.
    spread: Option<relay::Spread>,
    /// Subscribe connections open now.
    subscribers: usize,
    /// Where new outgoing streams start: sequence number and timestamp offset (`None`: random,
    /// as always outside the sim, which fixes them to put a wrap where a test wants it).
    out_start: Option<(u16, u32)>,
}

fn err(code: ErrorCode, message: impl Into<String>) -> MediaError {
    MediaError { code, message: message.into() }
}

/// The engine's connections. Looked up for every subscriber of every forwarded packet, so
/// hashed with FxHash (one multiply) instead of SipHash: the keys are counters the media
/// worker assigns, never chosen by a peer, so a hash-flooding-resistant hasher buys nothing here.
pub(super) type Conns = HashMap<ConnKey, Conn, rustc_hash::FxBuildHasher>;

/// A connection by key (a free function, so the engine's other fields stay borrowable).
fn conn_mut(conns: &mut Conns, key: ConnKey) -> Result<&mut Conn, MediaError> {
    conns.get_mut(&key).ok_or_else(|| err(ErrorCode::NotFound, "connection not found"))
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
            conns: Conns::default(),
            keys: HashMap::new(),
            by_ufrag: HashMap::new(),
            by_source: HashMap::new(),
            ufrag_changes: Vec::new(),
            q: Queues::default(),
            counters: Counters::default(),
            realloc: Vec::new(),
            next_realloc: None,
            first_frames: Vec::new(),
            overload: 0,
            subscribers_seen: 0,
            overload_shed: [0; crate::overload::LEVELS],
            spread: None,
            subscribers: 0,
            out_start: None,
        }
    }

    /// New outgoing streams start at sequence number `seq` (below 65536) with `ts_offset` added
    /// to their first source's timestamps, instead of random values: a test can make them wrap
    /// early (65535 → 0, and the 32-bit timestamp).
    #[cfg(any(test, feature = "sim"))]
    pub fn fix_outgoing_start(&mut self, seq: u16, ts_offset: u32) {
        self.out_start = Some((seq, ts_offset));
    }

    /// Set the overload level (`overload`, 0 = normal): every subscriber's video layers are
    /// chosen again under it. Video being shed stops at the end of the frame in flight; video
    /// coming back starts at a keyframe (asked for here, merged by the throttle).
    pub fn set_overload(&mut self, now: Instant, level: u8) {
        let level = level.min(crate::overload::MAX_LEVEL);
        if level == self.overload {
            return;
        }
        self.overload = level;
        let subs: Vec<ConnKey> =
            self.conns.iter().filter(|(_, c)| c.role() == Role::Subscribe).map(|(k, _)| *k).collect();
        for k in subs {
            self.reallocate(now, k);
        }
        self.process(now);
    }

    pub fn overload(&self) -> u8 {
        self.overload
    }

    /// Packets not written because of the overload level since the last call, by the level at
    /// which they would be written again (`overload::Sample::shed`).
    pub fn take_overload_shed(&mut self) -> [u64; crate::overload::LEVELS] {
        std::mem::take(&mut self.overload_shed)
    }

    // -----------------------------------------------------------------------------------------
    // Outputs
    // -----------------------------------------------------------------------------------------

    /// Next thing for the driver: a datagram, an event, or a closed connection whose socket can go.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.q.out.pop_front()
    }

    /// Hand back the buffer of a datagram the driver has sent ([`Output::Transmit`]'s
    /// `contents`): the next forwarded packet is encrypted into it instead of a new allocation.
    /// Keeps at most [`SPARE_BUFFERS`]; buffers larger than a datagram are let go.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if self.q.spare.len() < SPARE_BUFFERS && buf.capacity() <= SPARE_BUFFER_MAX_BYTES {
            self.q.spare.push(buf);
        }
    }

    /// When [`Engine::handle_timeout`] must be called next: the earliest of what each part
    /// asks for (connections and their `Rtc`s, rooms with their tracks, layers and speaker
    /// lists, and the periodic reallocation while there are subscribers).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let conns = self.conns.values().filter_map(|c| c.poll_timeout(&self.cfg));
        let rooms = self.rooms.values().filter_map(|r| r.poll_timeout(&self.conns, self.cfg.keyframe_retry));
        let realloc = self.next_realloc.filter(|_| self.conns.values().any(|c| c.role() == Role::Subscribe));
        conns.chain(rooms).chain(realloc).min()
    }

    /// Time to first frame of subscriber tracks since the last call: from the moment a track
    /// could be received (answered, READY) to its first keyframe forwarded.
    pub fn take_first_frame_times(&mut self) -> Vec<std::time::Duration> {
        std::mem::take(&mut self.first_frames)
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Rooms whose home is this engine (a spread room's mirrors are not counted).
    pub fn room_count(&self) -> usize {
        self.rooms.values().filter(|r| r.home.is_none()).count()
    }

    pub fn has_connection(&self, key: ConnKey) -> bool {
        self.conns.contains_key(&key)
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
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
        keys.sort_by_key(|k| self.conns.get(k).map(|c| c.role() == Role::Publish));
        for key in keys {
            self.end(now, key, ConnectionState::Finished, reason);
        }
        self.rooms.remove(room_id);
        self.process(now);
    }

    /// Stop (`true`) or resume forwarding a published track to its subscribers: the app
    /// backend's mute. On resume every subscriber's down track starts over at a keyframe (one is
    /// requested) with sequence numbers continuing where they stopped, so nothing of the muted
    /// time is NACKed or waited for.
    pub fn set_track_blocked(
        &mut self,
        now: Instant,
        room_id: &str,
        stream_id: &str,
        blocked: bool,
    ) -> Result<(), MediaError> {
        let Self { rooms, conns, q, counters, .. } = self;
        let room = rooms.get_mut(room_id).ok_or_else(|| err(ErrorCode::NotFound, "room not found"))?;
        let track = room
            .tracks
            .iter_mut()
            .find(|t| &*t.stream_id == stream_id)
            .ok_or_else(|| err(ErrorCode::NotFound, "stream not found"))?;
        if track.blocked == blocked {
            return Ok(());
        }
        track.blocked = blocked;
        if blocked {
            track.level = Default::default();
            return Ok(());
        }
        let mut targets = Vec::new();
        for (sub, mid) in &track.outs {
            let Some(out) = conns.get_mut(sub).and_then(|c| c.outs_mut().iter_mut().find(|o| o.mid == *mid)) else {
                continue;
            };
            out.restart();
            targets.extend(out.target);
        }
        targets.sort_unstable();
        targets.dedup();
        for li in targets {
            keyframes::want_keyframe(now, track, li, conns, q, counters);
        }
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
        self.receive(now, key, Protocol::Udp, source, destination, data);
    }

    /// A frame arrived on an ICE-TCP stream (RFC 6544, RFC 4571 framing) the driver bound to
    /// connection `key` ([`Engine::route_stun`] on its first frame). `source` is the client's
    /// end of the stream, `destination` our TCP candidate's address. The frame is handled as a
    /// datagram would be; answers go out as [`Output::Transmit`] with `proto` TCP, to `source`.
    /// Returns false when the connection is gone (the stream is no use any more).
    pub fn handle_tcp_receive(
        &mut self,
        now: Instant,
        key: ConnKey,
        source: SocketAddr,
        destination: SocketAddr,
        data: &[u8],
    ) -> bool {
        if !self.conns.contains_key(&key) {
            return false;
        }
        self.receive(now, key, Protocol::Tcp, source, destination, data);
        true
    }

    /// Which connection a STUN message names in its USERNAME (our ufrag first): how a new
    /// ICE-TCP stream finds its connection from its first frame. None for anything else.
    pub fn route_stun(&self, data: &[u8]) -> Option<ConnKey> {
        if data.first().is_none_or(|b| *b >= 4) {
            return None;
        }
        let message = StunMessage::parse(data).ok()?;
        let (ours, _) = message.split_username()?;
        self.by_ufrag.get(ours).copied()
    }

    /// Changes to the ufrag index since the last call (recorded only with ICE-TCP on).
    pub fn take_ufrag_changes(&mut self) -> Vec<UfragChange> {
        std::mem::take(&mut self.ufrag_changes)
    }

    fn receive(
        &mut self,
        now: Instant,
        key: ConnKey,
        proto: Protocol,
        source: SocketAddr,
        destination: SocketAddr,
        data: &[u8],
    ) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        let Ok(contents) = data.try_into() else {
            self.counters.garbage_datagrams += 1;
            return;
        };
        let recv = Receive { proto, source, destination, contents };
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
        if conn.restart_reached_now() {
            // Media goes to the client's new path from now on (`Conn::transmit`): start video
            // over there without waiting for the client to nominate.
            self.ice_restart_done(now, key);
        }
        self.process(now);
    }

    /// Which connection a datagram on a socket shared by many connections belongs to: a STUN
    /// message by our username fragment in its USERNAME (so a client's first check, and a
    /// check from a new address, find their connection), anything else only by a remote
    /// address ICE has authenticated for a connection.
    pub fn route(&self, source: SocketAddr, data: &[u8]) -> Option<ConnKey> {
        if data.first().is_some_and(|b| *b < 4) {
            if let Some((ours, _)) = StunMessage::parse(data).ok().as_ref().and_then(|m| m.split_username()) {
                return self.by_ufrag.get(ours).copied();
            }
        }
        self.by_source.get(&source).copied()
    }

    fn index_ufrag(&mut self, ufrag: String, key: ConnKey) {
        if !self.cfg.ice_tcp.is_empty() {
            self.ufrag_changes.push(UfragChange::Added(ufrag.clone()));
        }
        self.by_ufrag.insert(ufrag, key);
    }

    /// Forget every ufrag of a connection.
    fn unindex(&mut self, key: ConnKey) {
        let record = !self.cfg.ice_tcp.is_empty();
        let changes = &mut self.ufrag_changes;
        self.by_ufrag.retain(|ufrag, k| {
            let keep = *k != key;
            if !keep && record {
                changes.push(UfragChange::Removed(ufrag.clone()));
            }
            keep
        });
    }

    /// A datagram arrived on a socket shared by many connections (`destination` is that
    /// socket's candidate address). Returns the connection it was given to; datagrams that
    /// belong to none are dropped and counted.
    pub fn handle_shared_receive(
        &mut self,
        now: Instant,
        source: SocketAddr,
        destination: SocketAddr,
        data: &[u8],
    ) -> Option<ConnKey> {
        let Some(key) = self.route(source, data) else {
            self.counters.unrouted_datagrams += 1;
            return None;
        };
        self.handle_receive(now, key, source, destination, data);
        // The check passed (str0m answered it): later datagrams from there are this connection's.
        if self.conns.get(&key).is_some_and(|c| c.trusted.contains(&source))
            && self.by_source.get(&source) != Some(&key)
        {
            self.by_source.insert(source, key);
        }
        Some(key)
    }

    /// Time passed: drive every `Rtc` that is due, send merged keyframe requests, and fail
    /// connections whose deadlines passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        for conn in self.conns.values_mut() {
            if conn.next_timeout.is_some_and(|t| t <= now) {
                conn.last_round = Some(now);
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
            // A mirror (spread room) reports nothing: the home does.
            let mirror = room.home.is_some();
            if let Some(event) = room.speakers_changed(now, room_id).filter(|_| !mirror) {
                q.out.push_back(Output::Event(event));
            }
            for track in room.tracks.iter_mut() {
                if let Some(layers) = track.layers_changed(now).filter(|_| !mirror) {
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
                        if !mirror {
                            counters.unrecoverable_losses += lost;
                        }
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
                                .and_then(|c| c.outs().iter().find(|o| o.mid == *m))
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
            let subs = self.conns.values().filter(|c| c.role() == Role::Subscribe && c.state == ConnectionState::Ready);
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
                if entered && conn.role() == Role::Subscribe {
                    for o in conn.outs_mut().iter_mut().filter(|o| o.live && o.kind == MediaKind::Video) {
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
                    if conn.ice_reconnected(now) {
                        self.ice_restart_done(now, key);
                    }
                }
                IceConnectionState::Disconnected => {
                    // Only a silent peer fails a READY connection (`Conn::lost_at`); an agent
                    // that sends media and no Binding requests is still here.
                    let silent_ms = now.saturating_duration_since(conn.last_rx).as_millis() as u64;
                    conn.span.in_scope(|| tracing::info!(silent_ms, "ICE agent reports disconnected"));
                }
                _ => {}
            },
            Event::MediaAdded(m) if conn.role() == Role::Publish && m.direction.is_receiving() => {
                let rids: Vec<Rid> =
                    m.simulcast.iter().flat_map(|s| s.recv.iter().chain(s.send.iter())).map(|l| l.rid).collect();
                self.add_track(now, key, m.mid, m.kind, &rids);
            }
            Event::MediaChanged(m) if conn.role() == Role::Publish => {
                if m.direction.is_receiving() {
                    let kind = conn.rtc.media(m.mid).map(|x| x.kind());
                    if let Some(kind) = kind {
                        self.add_track(now, key, m.mid, kind, &[]);
                    }
                } else {
                    self.remove_tracks(now, key, Some(m.mid));
                }
            }
            Event::KeyframeRequest(r) if conn.role() == Role::Subscribe => {
                conn.stats.keyframe_requests_in += 1;
                self.counters.keyframe_requests_in[kind_index(r.kind)] += 1;
                self.relay_keyframe_request(now, key, r.mid, r.kind);
            }
            Event::EgressBitrateEstimate(estimate) => {
                let Some(side) = conn.sub_mut() else { return };
                match estimate {
                    BweKind::Twcc { estimate, .. } => side.twcc_estimate = Some(estimate.as_u64()),
                    BweKind::Remb { estimate, .. } => side.remb_estimate = Some(estimate.as_u64()),
                    _ => {}
                }
                conn.stats.bwe_estimate_bps = conn.bandwidth();
                queue_reallocation(&mut self.realloc, key);
            }
            Event::StreamPaused(p) if conn.role() == Role::Publish => {
                let Some(room) = self.rooms.get_mut(&conn.room) else { return };
                let Some(track) = room.tracks.iter_mut().find(|t| t.conn == key && t.mid == p.mid) else { return };
                if let Some(layer) = track.layers.iter_mut().find(|l| l.rid == p.rid) {
                    layer.paused = p.paused;
                }
                for (k, _) in &track.outs {
                    queue_reallocation(&mut self.realloc, *k);
                }
                let (room, stream_id) = (Arc::clone(&conn.room), Arc::clone(&track.stream_id));
                self.relay_all(&room, || Relay::LayerPaused {
                    room: Arc::clone(&room),
                    stream_id: Arc::clone(&stream_id),
                    rid: p.rid,
                    paused: p.paused,
                });
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
                if let Conn { side: Side::Subscribe(side), stats, .. } = &mut *conn {
                    if let Some(out) = side.outs.iter_mut().find(|o| o.mid == s.mid) {
                        let resent = s.packets.saturating_sub(out.written);
                        if resent > out.resent {
                            self.counters.retransmitted_packets += resent - out.resent;
                            stats.retransmitted_packets += resent - out.resent;
                            out.resent = resent;
                        }
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
                    let tcp = pair.protocol != Protocol::Udp;
                    conn.stats.selected_pair = Some(SelectedPair {
                        protocol: format!("{:?}", pair.protocol).to_ascii_lowercase(),
                        local_type: "host",
                        tcptype: tcp.then_some("passive"),
                        local: pair.local.addr.to_string(),
                        remote: pair.remote.addr.to_string(),
                        rtt_ms: pair.current_round_trip_time.map(|d| d.as_secs_f64() * 1000.0),
                    });
                }
            }
            Event::ChannelOpen(id, label) if conn.role() == Role::Publish => self.data_channel_opened(key, id, label),
            Event::ChannelData(d) if conn.role() == Role::Publish => self.relay_data(now, key, d),
            Event::Closed => {
                self.end(now, key, ConnectionState::Finished, "remote_closed");
            }
            _ => {}
        }
    }

    /// The client reached us again after a restart (its first check under the new credentials,
    /// or ICE connected). What went out while it was unreachable (to its old address) is lost
    /// and too old to repair, so video starts over at a keyframe at once instead of when the
    /// receiver's decoder gives up: a subscriber's video down tracks
    /// wait for one (sequence numbers continuing) and their layers are asked for one; a
    /// publisher is asked for one on every layer a subscriber receives.
    fn ice_restart_done(&mut self, now: Instant, key: ConnKey) {
        let Self { rooms, conns, q, counters, realloc, .. } = self;
        let Some(conn) = conns.get_mut(&key) else { return };
        let Some(room) = rooms.get_mut(&conn.room) else { return };
        let mut wanted: Vec<(usize, usize)> = Vec::new();
        if conn.role() == Role::Subscribe {
            for o in conn.outs_mut().iter_mut().filter(|o| o.live && o.kind == MediaKind::Video) {
                o.restart();
                let track = room.tracks.iter().position(|t| t.stream_id == o.stream_id);
                wanted.extend(track.zip(o.target));
            }
            queue_reallocation(realloc, key);
        } else {
            for (ti, t) in room.tracks.iter().enumerate().filter(|(_, t)| t.conn == key) {
                for (sub, mid) in &t.outs {
                    let target = conns.get(sub).and_then(|c| c.outs().iter().find(|o| o.mid == *mid)?.target);
                    wanted.extend(target.map(|li| (ti, li)));
                }
            }
        }
        wanted.sort_unstable();
        wanted.dedup();
        for (ti, li) in wanted {
            want_keyframe(now, &mut room.tracks[ti], li, conns, q, counters);
        }
    }

    /// Move a connection to FINISHED or FAILED, undo everything it took part in, close its `Rtc`
    /// (BYE and close_notify go out) and tell the driver its socket can go.
    fn end(&mut self, now: Instant, key: ConnKey, state: ConnectionState, reason: &str) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        conn.enter(&mut self.q, state, Some(reason.to_owned()));
        let role = conn.role();
        let room_id = Arc::clone(&conn.room);
        if role == Role::Publish {
            self.remove_tracks(now, key, None);
        }
        let Some(mut conn) = self.conns.remove(&key) else { return };
        self.keys.remove(&conn.id);
        self.unindex(key);
        self.by_source.retain(|_, k| *k != key);
        if let Some(room) = self.rooms.get_mut(&room_id) {
            room.unlink(key);
        }
        if role == Role::Subscribe {
            self.subscribers = self.subscribers.saturating_sub(1);
        }
        self.note_interest(&room_id);
        if conn.rtc.close().is_ok() {
            conn.drain(now, &mut self.q);
        }
        self.q.out.push_back(Output::Closed { key, connection_id: conn.id.to_string() });
    }
}
