//! Deterministic simulation: the engine and str0m client peers on a virtual clock, joined by an
//! in-memory network with seeded conditions per direction (random and burst loss, delay, jitter,
//! reordering, a bandwidth bottleneck). No sockets, no threads, no wall clock: the same seed
//! gives the same run, and seconds of call take milliseconds.
//!
//! Publishers send VP8-shaped video (a real payload descriptor and key/delta flag, so keyframe
//! detection and layer switching work as with a browser), optionally as up to three simulcast
//! layers, and answer keyframe requests after an encoder delay, like a browser does.
//!
//! The client side of each peer — its str0m `Rtc`, SDP steps, receive side (every packet
//! classified and recorded) and VP8 descriptors — is the shared `test_peer` crate; this file
//! owns the virtual clock, the network between the peers and the engine, and the publishers'
//! synthetic encoders (frame sizes, layers, keyframe timing, payload tags).
//!
//! Used by scenario tests, the fuzz targets (a READY connection to throw datagrams at) and the
//! benchmarks. Enabled by the `sim` feature (and in this crate's own tests).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use str0m::format::Codec;
use str0m::media::{MediaKind, Mid, Rid};
use str0m::rtp::{ExtensionValues, RtpWrite};
use str0m::Event;
use test_peer::vp8::{self, Descriptor, Numbering};
use test_peer::{Out, PeerConfig};

use crate::{ConnKey, ConnectionSpec, CoreConfig, Engine, MediaEvent, NewConnection, Output};
use signaling_api::protocol::Role;

/// Benchmark support: a publisher fanned out to N subscribers, measured engine-only.
pub mod bench;

/// Network conditions on one leg (peer → gateway or gateway → peer).
#[derive(Debug, Clone, Copy, Default)]
pub struct Link {
    /// Probability that a datagram is lost (outside bursts).
    pub loss: f64,
    /// Burst loss (Gilbert–Elliott): probability to enter a burst per datagram, and the mean
    /// burst length in datagrams (every datagram in a burst is lost).
    pub burst_start: f64,
    pub burst_len: f64,
    pub delay: Duration,
    /// Uniform extra delay in `0..jitter`.
    pub jitter: Duration,
    /// Probability that a datagram is held back by `reorder_by` (and so overtaken).
    pub reorder: f64,
    pub reorder_by: Duration,
    /// Bottleneck bandwidth, bits/s (`None`: unlimited). Datagrams queue behind each other;
    /// one that would wait longer than `queue` is dropped (a tail-drop router).
    pub rate_bps: Option<u64>,
    pub queue: Duration,
    /// Drop every STUN datagram (first byte 0-3, RFC 7983) on this leg: a peer that, like
    /// libnice with consent freshness off, sends media but no Binding requests after nomination.
    pub block_stun: bool,
}

/// A simulcast (or single) video encoding a publisher sends.
#[derive(Debug, Clone)]
pub struct LayerSpec {
    pub rid: Option<&'static str>,
    /// Bytes per frame (split into packets of at most 1100 bytes).
    pub frame_bytes: usize,
}

/// One received RTP packet (`starts_keyframe`: the first packet of a keyframe).
pub use test_peer::Received;

/// A video packet a publisher sent: its layer, frame number and when.
#[derive(Debug, Clone)]
pub struct Sent {
    pub at: Instant,
    pub layer: usize,
    pub frame: u32,
    pub keyframe: bool,
    pub payload: Vec<u8>,
}

struct LayerTx {
    rid: Option<Rid>,
    frame_bytes: usize,
    seq: u64,
    /// VP8 payload descriptor numbering of this layer's pictures (each layer its own, as an
    /// encoder's simulcast streams have): 15-bit picture ID, TL0PICIDX, KEYIDX.
    numbering: Numbering,
    /// A keyframe is owed (first frame, or requested; due at the instant).
    keyframe_due: Option<Instant>,
}

/// A client peer: a full (non-lite) str0m agent in RTP mode ([`test_peer::Peer`], which it
/// derefs to: `rtc`, `connected`, `keyframe_requests`, and `rx.received`, every RTP packet in
/// arrival order), plus its place on the network and its encoder.
pub struct Peer {
    pub name: String,
    pub addr: SocketAddr,
    pub client: test_peer::Peer,
    pub connection_id: Option<String>,
    pub key: Option<ConnKey>,
    /// Video packets sent, in order.
    pub sent: Vec<Sent>,
    /// Conditions toward the gateway and from it.
    pub up: Link,
    pub down: Link,
    /// Delay between a keyframe request and the keyframe (an encoder's reaction time).
    pub encoder_delay: Duration,
    /// A keyframe every this many frames regardless of requests (`None`: only on request).
    pub keyframe_interval: Option<u32>,
    /// When it subscribed (for time to first frame).
    pub subscribed_at: Option<Instant>,
    /// Video is written resendable (it answers NACKs from its RTX buffer); off models a sender
    /// whose buffer no longer has the packet.
    pub rtx: bool,
    /// Audio packets sent.
    pub audio_sent: usize,
    /// The audio level (RFC 6464, −dBov) its audio packets carry, if any.
    pub audio_level: Option<i8>,
    /// RTCP Sender Reports received: when, for which mid, the RTP time (in the clock rate of the
    /// stream, 90 kHz for video) and the packet count they carry.
    pub sender_reports: Vec<(Instant, Mid, u64, u32)>,
    layers: Vec<LayerTx>,
    frames: u32,
    audio_seq: u64,
    /// Audio sequence numbers are this plus the packet count ([`Sim::set_rtp_start`]).
    audio_seq_base: u64,
    /// Video and audio RTP time counts from this.
    ts_base: u32,
    next_timeout: Option<Instant>,
}

impl Deref for Peer {
    type Target = test_peer::Peer;
    fn deref(&self) -> &test_peer::Peer {
        &self.client
    }
}

impl DerefMut for Peer {
    fn deref_mut(&mut self) -> &mut test_peer::Peer {
        &mut self.client
    }
}

struct Datagram {
    from: SocketAddr,
    to: SocketAddr,
    bytes: Vec<u8>,
}

#[derive(Default, Clone, Copy)]
struct LegState {
    in_burst: bool,
    /// When the bottleneck queue is free again.
    free_at: Option<Instant>,
}

/// The engine, its peers and the network between them.
pub struct Sim {
    pub engine: Engine,
    pub now: Instant,
    pub peers: Vec<Peer>,
    /// Every event the engine reported.
    pub events: Vec<MediaEvent>,
    /// Datagrams the network dropped (random, burst, queue overflow).
    pub dropped: u64,
    rng: StdRng,
    in_flight: BTreeMap<(Instant, u64), Datagram>,
    seq: u64,
    /// Gateway candidate address → connection.
    sockets: HashMap<SocketAddr, ConnKey>,
    /// One gateway address for every connection (`media.mux`), set by [`Sim::share_one_port`].
    shared: Option<SocketAddr>,
    /// Per (peer index, up?) leg.
    legs: HashMap<(usize, bool), LegState>,
    next_key: u64,
    room: String,
}

const GATEWAY_IP: [u8; 4] = [10, 0, 0, 1];
const MAX_PACKET: usize = 1100;
/// Bytes ahead of the sim's payload tag: the VP8 payload descriptor and payload header byte.
const VP8_HEADER: usize = vp8::FULL_HEADER_LEN;

impl Sim {
    /// A simulation with one room, `room`, and the given seed.
    pub fn new(seed: u64, cfg: CoreConfig) -> Self {
        let mut engine = Engine::new(cfg);
        engine.create_room("room");
        Self {
            engine,
            now: Instant::now(),
            peers: Vec::new(),
            events: Vec::new(),
            dropped: 0,
            rng: StdRng::seed_from_u64(seed),
            in_flight: BTreeMap::new(),
            seq: 0,
            sockets: HashMap::new(),
            shared: None,
            legs: HashMap::new(),
            next_key: 1,
            room: "room".into(),
        }
    }

    /// Add a client peer; returns its index.
    pub fn add_peer(&mut self, name: &str) -> usize {
        self.add_peer_with(name, None)
    }

    /// Add a client peer that knows only Opus and this one video codec (a client that can
    /// decode nothing else); returns its index.
    pub fn add_peer_with_codec(&mut self, name: &str, video: Codec) -> usize {
        self.add_peer_with(name, Some(video))
    }

    fn add_peer_with(&mut self, name: &str, video: Option<Codec>) -> usize {
        let i = self.peers.len();
        let addr = SocketAddr::from(([10, 0, (i / 250 + 1) as u8, (i % 250 + 1) as u8], 5000));
        let cfg = PeerConfig { video_codec: video, record: true, ..PeerConfig::default() };
        let client = test_peer::Peer::new(self.now, addr, &cfg).expect("a host candidate");
        self.peers.push(Peer {
            name: name.into(),
            addr,
            client,
            connection_id: None,
            key: None,
            sent: Vec::new(),
            up: Link::default(),
            down: Link::default(),
            encoder_delay: Duration::from_millis(10),
            keyframe_interval: None,
            subscribed_at: None,
            rtx: true,
            audio_sent: 0,
            audio_level: None,
            sender_reports: Vec::new(),
            layers: Vec::new(),
            frames: 0,
            audio_seq: 0,
            audio_seq_base: 1000,
            ts_base: 0,
            next_timeout: None,
        });
        i
    }

    /// From now on every new connection gets the same gateway address, and the engine finds
    /// each datagram's connection itself (`Engine::handle_shared_receive`), as a worker with
    /// `media.mux` does.
    pub fn share_one_port(&mut self) {
        self.shared = Some(SocketAddr::from((GATEWAY_IP, 39999)));
    }

    fn new_connection(&mut self, peer: usize, role: Role) -> NewConnection {
        let key = ConnKey(self.next_key);
        self.next_key += 1;
        let local = match self.shared {
            Some(shared) => shared,
            None => {
                let local = SocketAddr::from((GATEWAY_IP, 40000 + key.0 as u16));
                self.sockets.insert(local, key);
                local
            }
        };
        let connection_id = format!("c_{}_{}", self.peers[peer].name, key.0);
        self.peers[peer].connection_id = Some(connection_id.clone());
        self.peers[peer].key = Some(key);
        NewConnection {
            key,
            local,
            spec: ConnectionSpec {
                connection_id,
                room_id: self.room.clone(),
                participant_id: self.peers[peer].name.clone(),
                role,
            },
        }
    }

    /// The peer publishes audio + one video encoding of 1000-byte frames.
    pub fn publish(&mut self, peer: usize) {
        self.publish_layers(peer, &[LayerSpec { rid: None, frame_bytes: 1000 }]);
    }

    /// The peer publishes audio + video with these encodings (several: simulcast by rid).
    pub fn publish_layers(&mut self, peer: usize, layers: &[LayerSpec]) {
        let now = self.now;
        let p = &mut self.peers[peer];
        let rids: Vec<&str> = layers.iter().filter_map(|l| l.rid).collect();
        assert!(layers.len() == 1 || rids.len() == layers.len(), "simulcast layers have rids");
        p.layers = layers
            .iter()
            .enumerate()
            .map(|(i, l)| LayerTx {
                rid: l.rid.map(Rid::from),
                frame_bytes: l.frame_bytes,
                seq: 1000,
                // Far apart, and the first near the 15-bit wrap.
                numbering: Numbering {
                    picture_id: ((32_700 + 11_000 * i as u32) % 32_768) as u16,
                    tl0_pic_idx: (250 + 70 * i) as u8,
                    key_idx: (30 + 9 * i as u8) % 32,
                },
                keyframe_due: Some(now),
            })
            .collect();
        let sdp = p.client.publish_offer(true, Some(&rids)).expect("an offer with two sections");
        let spec = self.new_connection(peer, Role::Publish);
        if let Err(e) = self.engine.publish(self.now, spec, &sdp) {
            panic!("publish refused: {e}");
        }
        self.pump_engine();
    }

    /// Start the peer's RTP counters where a test wants them, e.g. just below a wrap (the sim's
    /// own start at 1000 and 0): video layer `i`'s next sequence number is `video_seq[i]`, the
    /// next audio packet's `audio_seq`, and both RTP clocks count from `ts`. Call it after
    /// publishing and before any media: a sender's first sequence number must be below 65536,
    /// and later ones continue from it.
    pub fn set_rtp_start(&mut self, peer: usize, video_seq: &[u64], audio_seq: u64, ts: u32) {
        let p = &mut self.peers[peer];
        assert!(p.sent.is_empty() && p.audio_sent == 0 && audio_seq > 0, "set before any media");
        assert!(video_seq.iter().chain([&audio_seq]).all(|s| *s < 65_536), "a first sequence number is 16 bits");
        for (layer, &seq) in p.layers.iter_mut().zip(video_seq) {
            layer.seq = seq;
        }
        p.audio_seq_base = audio_seq - 1;
        p.ts_base = ts;
    }

    /// The sequence number video layer `layer` of `peer` sends next (extended: it keeps
    /// counting past 65535).
    pub fn next_video_seq(&self, peer: usize, layer: usize) -> u64 {
        self.peers[peer].layers[layer].seq
    }

    /// The peer plays `publisher`'s tracks with an offer of its own (WHEP: one receive-only
    /// audio and one receive-only video section).
    pub fn play(&mut self, peer: usize, publisher: usize) {
        self.peers[peer].subscribed_at = Some(self.now);
        let offer = self.peers[peer].client.play_offer().expect("a playback offer");
        let spec = self.new_connection(peer, Role::Subscribe);
        let publisher = self.peers[publisher].name.clone();
        if let Err(e) = self.engine.play(self.now, spec, &publisher, &offer) {
            panic!("play refused: {e}");
        }
        self.pump_engine();
    }

    /// The peer subscribes (the gateway offers; the peer answers every offer).
    pub fn subscribe(&mut self, peer: usize) {
        self.peers[peer].subscribed_at = Some(self.now);
        let spec = self.new_connection(peer, Role::Subscribe);
        if let Err(e) = self.engine.subscribe(self.now, spec) {
            panic!("subscribe refused: {e}");
        }
        self.pump_engine();
    }

    /// Write `n` video frames (every layer) and an audio packet every other one, 20 ms apart in
    /// RTP time, all at the current instant. Returns the video payloads written.
    pub fn send_media(&mut self, peer: usize, n: usize) -> Vec<Vec<u8>> {
        let mut written = Vec::new();
        for _ in 0..n {
            written.extend(self.write_frame(peer));
            if self.peers[peer].frames % 2 == 0 {
                self.write_audio(peer);
            }
            self.drain_peer(peer);
        }
        written
    }

    /// Send media from `peer` at 50 frames/s for `d` of virtual time, running everything.
    /// Returns the video payloads written.
    pub fn stream_for(&mut self, peer: usize, d: Duration) -> Vec<Vec<u8>> {
        let end = self.now + d;
        let mut written = Vec::new();
        while self.now < end {
            written.extend(self.send_media(peer, 1));
            self.run_for(Duration::from_millis(20));
        }
        written
    }

    fn write_frame(&mut self, peer: usize) -> Vec<Vec<u8>> {
        let now = self.now;
        let p = &mut self.peers[peer];
        let Some(mid) = p.client.video_mid else { return Vec::new() };
        let Some(pt) = p.client.pt_for(mid, Codec::Vp8) else { return Vec::new() };
        p.frames += 1;
        let frame = p.frames;
        let ts = p.ts_base.wrapping_add(frame.wrapping_mul(20 * 90));
        let periodic = p.keyframe_interval.is_some_and(|k| frame % k == 1);
        let mut written = Vec::new();
        for li in 0..p.layers.len() {
            let layer = &mut p.layers[li];
            let keyframe = periodic || layer.keyframe_due.is_some_and(|t| t <= now);
            if keyframe {
                layer.keyframe_due = None;
            }
            let parts = layer.frame_bytes.div_ceil(MAX_PACKET).max(1);
            let rid = layer.rid;
            layer.numbering.advance(keyframe);
            for part in 0..parts {
                let size = (layer.frame_bytes / parts).max(16);
                // VP8 payload descriptor as a browser writes it: X and S (first packet of the
                // frame) bits; I, L, T, K; 15-bit picture ID, TL0PICIDX, TID 0 with KEYIDX. Then
                // the payload header's first byte, P bit clear on a keyframe.
                let mut payload = Vec::with_capacity(size.max(VP8_HEADER));
                vp8::push_synthetic_header(&mut payload, part == 0, Descriptor::Full(layer.numbering), keyframe);
                payload.extend_from_slice(format!("{}-L{li}-F{frame}-P{part}-", p.name).as_bytes());
                payload.resize(size, (frame % 251) as u8);
                let seq = layer.seq;
                layer.seq += 1;
                let write =
                    RtpWrite::new(pt, seq.into(), ts, now, payload.clone()).marker(part + 1 == parts).nackable(p.rtx);
                if !p.client.write_rtp(mid, rid, write) {
                    continue;
                }
                p.sent.push(Sent {
                    at: now,
                    layer: li,
                    frame,
                    keyframe: keyframe && part == 0,
                    payload: payload.clone(),
                });
                written.push(payload);
            }
        }
        written
    }

    fn write_audio(&mut self, peer: usize) {
        let now = self.now;
        let p = &mut self.peers[peer];
        let Some(mid) = p.client.audio_mid else { return };
        let Some(pt) = p.client.pt_for(mid, Codec::Opus) else { return };
        p.audio_seq += 1;
        let n = p.audio_seq;
        let mut payload = format!("{}-audio-{n}-", p.name).into_bytes();
        payload.resize(100, (n % 251) as u8);
        // str0m writes the level only with the voice-activity flag beside it.
        let vad = p.audio_level.map(|l| l > -127);
        let ext = ExtensionValues { audio_level: p.audio_level, voice_activity: vad, ..Default::default() };
        let ts = p.ts_base.wrapping_add((n * 40 * 48) as u32);
        let write = RtpWrite::new(pt, (p.audio_seq_base + n).into(), ts, now, payload).marker(true).ext_vals(ext);
        if p.client.write_rtp(mid, None, write) {
            p.audio_sent += 1;
        }
    }

    /// The peer asks for a keyframe on every video stream it receives.
    pub fn request_keyframe(&mut self, peer: usize) {
        self.peers[peer].client.request_keyframes();
        self.drain_peer(peer);
    }

    /// The peer sends a REMB (receiver estimated maximum bitrate) on every video stream it
    /// receives, as a receiver without TWCC feedback does.
    pub fn send_remb(&mut self, peer: usize, bps: u64) {
        self.peers[peer].client.request_remb(bps);
        self.drain_peer(peer);
    }

    /// The peer's address changes (a phone moving networks): datagrams to the old address are
    /// lost and none leave from it any more. Its host candidate on the new address comes with
    /// its next ICE restart ([`Sim::restart_publisher_ice`], [`Sim::restart_subscriber_ice`]).
    pub fn move_peer(&mut self, peer: usize, addr: SocketAddr) {
        self.peers[peer].addr = addr;
        self.peers[peer].client.move_to(addr);
    }

    /// A publishing peer restarts ICE: a new offer with new credentials on its publish
    /// connection (a browser's `restartIce()`), answered by `Engine::republish`.
    pub fn restart_publisher_ice(&mut self, peer: usize) -> Result<(), crate::MediaError> {
        let offer = self.peers[peer].client.ice_restart_offer().expect("an ICE restart needs an offer");
        let id = self.peers[peer].connection_id.clone().expect("a publish connection");
        let r = self.engine.republish(self.now, &id, &offer);
        self.pump_engine();
        r
    }

    /// A peer whose connection it offered itself (WHIP publish, WHEP play) restarts ICE the way
    /// a WHIP/WHEP client does: its new credentials alone go to the gateway
    /// (`Engine::restart_ice_remote`, what a PATCH carries). The peer then takes the gateway's
    /// new credentials and candidate: the engine's answer to the replayed offer carries them too
    /// and is applied like any answer. Returns what the PATCH would answer.
    pub fn restart_client_offered_ice(&mut self, peer: usize) -> Result<crate::IceRestarted, crate::MediaError> {
        let offer = self.peers[peer].client.ice_restart_offer().expect("an ICE restart needs an offer");
        let attr = |name: &str| {
            offer.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_owned()).expect("credentials")
        };
        let (ufrag, pwd) = (attr("a=ice-ufrag:"), attr("a=ice-pwd:"));
        let id = self.peers[peer].connection_id.clone().expect("a connection");
        let r = self.engine.restart_ice_remote(self.now, &id, &ufrag, &pwd);
        self.pump_engine();
        if let Ok(restarted) = &r {
            for c in &restarted.candidates {
                self.peers[peer].client.add_remote_candidate(c);
            }
        }
        r
    }

    /// A subscribing peer asks for an ICE restart (`restart_ice`); the gateway's new offer is
    /// answered and its trickled candidate added as any other.
    pub fn restart_subscriber_ice(&mut self, peer: usize) -> Result<(), crate::MediaError> {
        let id = self.peers[peer].connection_id.clone().expect("a subscribe connection");
        let r = self.engine.restart_ice(self.now, &id);
        self.pump_engine();
        r
    }

    /// Hand a raw datagram to the engine as if `from` had sent it to connection `key`.
    pub fn inject(&mut self, key: ConnKey, from: SocketAddr, bytes: &[u8]) {
        let Some(local) = self.sockets.iter().find(|(_, k)| **k == key).map(|(a, _)| *a) else { return };
        self.engine.handle_receive(self.now, key, from, local, bytes);
        self.pump_engine();
    }

    /// Hand a raw datagram to the engine as if `from` had sent it to the shared gateway address.
    pub fn inject_shared(&mut self, from: SocketAddr, bytes: &[u8]) {
        let Some(shared) = self.shared else { return };
        self.engine.handle_shared_receive(self.now, from, shared, bytes);
        self.pump_engine();
    }

    /// Run the network and every agent for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        self.run_until_time(end, |_| false);
    }

    /// Run until `done` holds or `limit` of virtual time has passed; returns whether it held.
    pub fn run_until(&mut self, limit: Duration, done: impl Fn(&Sim) -> bool) -> bool {
        let end = self.now + limit;
        self.run_until_time(end, done)
    }

    fn run_until_time(&mut self, end: Instant, done: impl Fn(&Sim) -> bool) -> bool {
        loop {
            self.pump_engine();
            for i in 0..self.peers.len() {
                self.drain_peer(i);
            }
            if done(self) {
                return true;
            }
            let next = [
                self.engine.poll_timeout(),
                self.in_flight.keys().next().map(|(t, _)| *t),
                self.peers.iter().filter_map(|p| p.next_timeout).min(),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(end)
            .min(end)
            .max(self.now);
            if next >= end && self.now >= end {
                return done(self);
            }
            // Always move forward a little so timers that are due "now" cannot spin.
            self.now = if next > self.now { next } else { self.now + Duration::from_micros(100) };
            self.deliver_due();
            self.engine.handle_timeout(self.now);
            for i in 0..self.peers.len() {
                if self.peers[i].next_timeout.is_some_and(|t| t <= self.now) {
                    let now = self.now;
                    let _ = self.peers[i].client.handle_timeout(now);
                }
            }
        }
    }

    fn deliver_due(&mut self) {
        while let Some(entry) = self.in_flight.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let d = entry.remove();
            if Some(d.to) == self.shared {
                self.engine.handle_shared_receive(self.now, d.from, d.to, &d.bytes);
            } else if let Some(key) = self.sockets.get(&d.to).copied() {
                self.engine.handle_receive(self.now, key, d.from, d.to, &d.bytes);
            } else if let Some(i) = self.peers.iter().position(|p| p.addr == d.to) {
                let now = self.now;
                let _ = self.peers[i].client.handle_datagram(now, d.from, &d.bytes);
                // Delivered: the gateway's buffer goes back, as the media worker hands it back
                // after `sendto` (so the simulations encrypt into reused buffers too).
                self.engine.recycle(d.bytes);
                self.drain_peer(i);
            }
        }
    }

    /// Put a datagram on leg (`peer`, `up`) of the network.
    fn send(&mut self, peer: Option<usize>, up: bool, from: SocketAddr, to: SocketAddr, bytes: Vec<u8>) {
        let Some(peer) = peer else {
            self.seq += 1;
            self.in_flight.insert((self.now, self.seq), Datagram { from, to, bytes });
            return;
        };
        let link = if up { self.peers[peer].up } else { self.peers[peer].down };
        if link.block_stun && bytes.first().is_some_and(|b| *b < 4) {
            self.dropped += 1;
            return;
        }
        let leg = self.legs.entry((peer, up)).or_default();
        // Burst loss (Gilbert–Elliott with a lossless good state and a lossy bad state).
        if leg.in_burst {
            if self.rng.random_bool((1.0 / link.burst_len.max(1.0)).min(1.0)) {
                leg.in_burst = false;
            }
        } else if link.burst_start > 0.0 && self.rng.random_bool(link.burst_start.min(1.0)) {
            leg.in_burst = true;
        }
        if leg.in_burst || (link.loss > 0.0 && self.rng.random_bool(link.loss.min(1.0))) {
            self.dropped += 1;
            return;
        }
        let mut at = self.now;
        if let Some(rate) = link.rate_bps {
            let start = leg.free_at.unwrap_or(self.now).max(self.now);
            if start.saturating_duration_since(self.now) > link.queue {
                self.dropped += 1;
                return;
            }
            let done = start + Duration::from_secs_f64(bytes.len() as f64 * 8.0 / rate as f64);
            leg.free_at = Some(done);
            at = done;
        }
        at += link.delay;
        if !link.jitter.is_zero() {
            at += Duration::from_micros(self.rng.random_range(0..link.jitter.as_micros() as u64));
        }
        if link.reorder > 0.0 && self.rng.random_bool(link.reorder.min(1.0)) {
            at += link.reorder_by;
        }
        self.seq += 1;
        self.in_flight.insert((at, self.seq), Datagram { from, to, bytes });
    }

    /// Carry out the engine's outputs: datagrams onto the net, events to the peers.
    fn pump_engine(&mut self) {
        while let Some(out) = self.engine.poll_output() {
            match out {
                Output::Transmit { key, destination, contents, .. } => {
                    let from = self.shared.or_else(|| self.sockets.iter().find(|(_, k)| **k == key).map(|(a, _)| *a));
                    let peer = self.peers.iter().position(|p| p.addr == destination);
                    if let Some(from) = from {
                        self.send(peer, false, from, destination, contents);
                    }
                }
                Output::Event(e) => {
                    self.on_engine_event(&e);
                    self.events.push(e);
                }
                Output::Closed { key, .. } => {
                    self.sockets.retain(|_, k| *k != key);
                }
            }
        }
    }

    fn peer_of(&self, connection_id: &str) -> Option<usize> {
        self.peers.iter().position(|p| p.connection_id.as_deref() == Some(connection_id))
    }

    fn on_engine_event(&mut self, e: &MediaEvent) {
        match e {
            MediaEvent::Answer { connection_id, sdp } => {
                let Some(i) = self.peer_of(connection_id) else { return };
                let _ = self.peers[i].client.accept_answer(sdp);
            }
            MediaEvent::Offer { connection_id, sdp } => {
                let Some(i) = self.peer_of(connection_id) else { return };
                let Ok(sdp) = self.peers[i].client.accept_offer(sdp) else { return };
                let (now, id) = (self.now, connection_id.clone());
                // Queued output of the answer is handled by the caller's pump loop.
                let _ = self.engine.answer(now, &id, &sdp);
            }
            MediaEvent::Candidate { connection_id, candidate, .. } => {
                let Some(i) = self.peer_of(connection_id) else { return };
                self.peers[i].client.add_remote_candidate(candidate);
            }
            _ => {}
        }
    }

    fn drain_peer(&mut self, i: usize) {
        loop {
            let now = self.now;
            let out = self.peers[i].client.poll_output(now);
            match out {
                Ok(Out::Timeout(t)) => {
                    self.peers[i].next_timeout = Some(t);
                    return;
                }
                Ok(Out::Transmit(t)) => {
                    let from = self.peers[i].addr;
                    if t.source != from {
                        // From an address the peer no longer has (it moved): goes nowhere.
                        self.dropped += 1;
                        continue;
                    }
                    self.send(Some(i), true, from, t.destination, t.contents.into());
                }
                // Counted and recorded by the client.
                Ok(Out::Rtp(..)) => {}
                Ok(Out::Event(e)) => {
                    let p = &mut self.peers[i];
                    match e {
                        Event::SenderFeedback(f) => {
                            let audio = p.client.rtc.media(f.mid).is_some_and(|m| m.kind() == MediaKind::Audio);
                            let clock = if audio { 48_000 } else { 90_000 };
                            let rtp = f
                                .sender_info
                                .rtp_time
                                .rebase(str0m::media::Frequency::new(clock).expect("nonzero"))
                                .numer();
                            p.sender_reports.push((now, f.mid, rtp, f.sender_info.sender_packet_count));
                        }
                        Event::KeyframeRequest(r) => {
                            let due = now + p.encoder_delay;
                            for l in p.layers.iter_mut().filter(|l| r.rid.is_none() || l.rid == r.rid) {
                                l.keyframe_due.get_or_insert(due);
                            }
                        }
                        _ => {}
                    }
                }
                Err(_) => {
                    self.peers[i].next_timeout = Some(now + Duration::from_millis(10));
                    return;
                }
            }
        }
    }

    /// Video payloads a peer received, in arrival order.
    pub fn video_received(&self, peer: usize) -> Vec<Vec<u8>> {
        self.peers[peer].rx.received.iter().filter(|r| r.kind == MediaKind::Video).map(|r| r.payload.clone()).collect()
    }

    /// When the peer received its first keyframe (its first decodable video frame).
    pub fn first_keyframe_at(&self, peer: usize) -> Option<Instant> {
        self.peers[peer].rx.received.iter().find(|r| r.starts_keyframe()).map(|r| r.at)
    }

    /// The publisher layer (index into its layers) of a received payload, from its tag.
    pub fn layer_of(payload: &[u8]) -> Option<usize> {
        let text = std::str::from_utf8(payload.get(VP8_HEADER..)?.split(|b| *b == b'-').nth(1)?).ok()?;
        text.strip_prefix('L')?.parse().ok()
    }

    /// The VP8 picture ID, TL0PICIDX and KEYIDX of a payload the sim's publishers wrote (as
    /// rewritten on the way).
    pub fn vp8_numbers(payload: &[u8]) -> Option<(u16, u8, u8)> {
        vp8::numbers(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(seed: u64) -> (Sim, usize, usize) {
        let mut sim = Sim::new(seed, CoreConfig::default());
        let publisher = sim.add_peer("pub");
        let viewer = sim.add_peer("sub");
        sim.publish(publisher);
        assert!(sim.run_until(Duration::from_secs(5), |s| s.peers[publisher].connected), "publisher connects");
        sim.subscribe(viewer);
        assert!(sim.run_until(Duration::from_secs(5), |s| s.peers[viewer].connected), "subscriber connects");
        sim.run_for(Duration::from_millis(200));
        (sim, publisher, viewer)
    }

    #[test]
    fn a_call_forwards_every_packet_in_virtual_time() {
        let wall = std::time::Instant::now();
        let (mut sim, p, v) = call(1);
        let sent = sim.stream_for(p, Duration::from_secs(1));
        assert_eq!(sent.len(), 50);
        sim.run_for(Duration::from_millis(200));
        let got = sim.video_received(v);
        assert!(got == sent, "received {} of {} payloads, or out of order", got.len(), sent.len());
        assert!(sim.peers[p].keyframe_requests >= 1, "the new subscriber's keyframe request reached the publisher");
        assert!(wall.elapsed() < Duration::from_secs(5), "virtual time runs fast: {:?}", wall.elapsed());
    }

    #[test]
    fn same_seed_same_result_with_loss() {
        let run = |seed| {
            let (mut sim, p, v) = call(seed);
            sim.peers[v].down = Link {
                loss: 0.05,
                delay: Duration::from_millis(20),
                jitter: Duration::from_millis(5),
                ..Link::default()
            };
            // Packets 1..=200 of 221 are judged: a receiver cannot NACK what comes before the
            // first sequence number it sees, nor a lost tail packet no successor reveals.
            let sent = sim.stream_for(p, Duration::from_millis(221 * 20));
            assert_eq!(sent.len(), 221);
            sim.run_for(Duration::from_millis(500));
            let got = sim.video_received(v);
            (sent[1..201].iter().filter(|x| got.contains(x)).count(), got.len())
        };
        let a = run(7);
        assert_eq!(a, run(7), "deterministic");
        assert_eq!(a.0, 200, "5% downlink loss is repaired by RTX: {a:?}");
    }

    /// A subscriber that joins while the publisher streams answers the gateway's first offer
    /// before ICE and DTLS are done. The keyframe asked for at the answer can arrive before
    /// READY, when nothing may be forwarded yet; the subscriber must still get a keyframe after
    /// READY instead of waiting for the publisher's next natural one (which browsers send only
    /// on request). Seen with Chromium: the subscriber stayed black.
    #[test]
    fn a_keyframe_that_came_before_ready_is_asked_for_again() {
        for layers in [
            vec![LayerSpec { rid: None, frame_bytes: 1000 }],
            vec![
                LayerSpec { rid: Some("q"), frame_bytes: 300 },
                LayerSpec { rid: Some("h"), frame_bytes: 1000 },
                LayerSpec { rid: Some("f"), frame_bytes: 3000 },
            ],
        ] {
            let mut sim = Sim::new(3, CoreConfig::default());
            let publisher = sim.add_peer("pub");
            let viewer = sim.add_peer("sub");
            sim.publish_layers(publisher, &layers);
            assert!(sim.run_until(Duration::from_secs(5), |s| s.peers[publisher].connected), "publisher connects");
            for _ in 0..25 {
                sim.send_media(publisher, 1);
                sim.run_for(Duration::from_millis(20));
            }
            // ICE and DTLS take a few round trips on the viewer's 40 ms path; the publisher's
            // keyframe takes 10 ms.
            let slow = Link { delay: Duration::from_millis(20), ..Link::default() };
            sim.peers[viewer].up = slow;
            sim.peers[viewer].down = slow;
            sim.subscribe(viewer);
            let mut ready_at = None;
            for _ in 0..100 {
                sim.send_media(publisher, 1);
                sim.run_for(Duration::from_millis(20));
                if ready_at.is_none() && sim.peers[viewer].connected {
                    ready_at = Some(sim.now);
                }
            }
            let ready_at = ready_at.expect("viewer connects");
            let first = sim.first_keyframe_at(viewer);
            assert!(
                first.is_some_and(|t| t.saturating_duration_since(ready_at) < Duration::from_millis(500)),
                "{} layer(s): first keyframe {:?} after READY; keyframe requests at the publisher: {}",
                layers.len(),
                first.map(|t| t.saturating_duration_since(ready_at)),
                sim.peers[publisher].keyframe_requests
            );
        }
    }

    /// A layer switch happens at the first packet of a keyframe. When that packet arrives late
    /// (reordered, or lost and brought back by RTX), the rest of the keyframe has already gone
    /// by and was not forwarded; switching on it anyway leaves the subscriber with a keyframe it
    /// can never complete (its NACKs name packets the gateway never sent). Seen with Chromium at
    /// 5% loss: a 3 s freeze after an automatic switch. Every keyframe a subscriber starts a
    /// layer on must arrive whole.
    #[test]
    fn a_switch_never_starts_on_a_keyframe_whose_rest_went_by() {
        let cfg = CoreConfig { bwe: false, ..CoreConfig::default() };
        let mut sim = Sim::new(11, cfg);
        let publisher = sim.add_peer("pub");
        let viewer = sim.add_peer("sub");
        let layers = [
            LayerSpec { rid: Some("q"), frame_bytes: 2000 },
            LayerSpec { rid: Some("h"), frame_bytes: 4000 },
            LayerSpec { rid: Some("f"), frame_bytes: 8000 },
        ];
        sim.publish_layers(publisher, &layers);
        assert!(sim.run_until(Duration::from_secs(5), |s| s.peers[publisher].connected), "publisher connects");
        sim.subscribe(viewer);
        for _ in 0..50 {
            sim.send_media(publisher, 1);
            sim.run_for(Duration::from_millis(20));
        }
        assert!(sim.peers[viewer].connected, "viewer connects");
        let stream_id = sim
            .events
            .iter()
            .find_map(|e| match e {
                MediaEvent::StreamAdded { stream_id, kind, .. } if kind == "video" => Some(stream_id.clone()),
                _ => None,
            })
            .expect("a video stream");
        let sub_id = sim.peers[viewer].connection_id.clone().expect("subscribed");
        // One datagram in five from the publisher arrives 15 ms late (a frame is 20 ms).
        sim.peers[publisher].up = Link { reorder: 0.2, reorder_by: Duration::from_millis(15), ..Link::default() };
        for round in 0..30 {
            let rid = ["q", "f", "h"][round % 3];
            let now = sim.now;
            sim.engine.set_layer(now, &sub_id, &stream_id, Some(rid)).expect("set_layer");
            for _ in 0..25 {
                sim.send_media(publisher, 1);
                sim.run_for(Duration::from_millis(20));
            }
        }
        sim.run_for(Duration::from_millis(500));
        // Parts per frame of each layer, and the parts of each keyframe the viewer got.
        let parts: Vec<usize> = layers.iter().map(|l| l.frame_bytes.div_ceil(MAX_PACKET)).collect();
        let tag = |payload: &[u8]| -> Option<(usize, u32, usize)> {
            let text = std::str::from_utf8(payload.get(VP8_HEADER..)?).ok()?;
            let mut f = text.split('-').skip(1);
            let l = f.next()?.strip_prefix('L')?.parse().ok()?;
            let fr = f.next()?.strip_prefix('F')?.parse().ok()?;
            let pa = f.next()?.strip_prefix('P')?.parse().ok()?;
            Some((l, fr, pa))
        };
        let video: Vec<&Received> =
            sim.peers[viewer].rx.received.iter().filter(|r| r.kind == MediaKind::Video).collect();
        let starts: Vec<(usize, u32)> = video
            .iter()
            .filter(|r| r.starts_keyframe())
            .filter_map(|r| tag(&r.payload).map(|(l, f, _)| (l, f)))
            .collect();
        assert!(starts.len() >= 10, "the viewer got keyframes for its switches: {}", starts.len());
        let mut broken = Vec::new();
        for &(l, f) in &starts {
            let got = video.iter().filter(|r| tag(&r.payload).is_some_and(|(l2, f2, _)| l2 == l && f2 == f)).count();
            if got < parts[l] {
                broken.push(format!("L{l} F{f}: {got}/{}", parts[l]));
            }
        }
        assert!(
            broken.is_empty(),
            "keyframes the viewer could not complete ({} of {}): {broken:?}",
            broken.len(),
            starts.len()
        );
    }
}
