//! Deterministic simulation: the engine and str0m client peers on a virtual clock, joined by an
//! in-memory network with seeded loss and delay per direction. No sockets, no threads, no wall
//! clock: the same seed gives the same run, and seconds of call take milliseconds.
//!
//! Used by scenario tests, the fuzz targets (a READY connection to throw datagrams at) and the
//! benchmarks. Enabled by the `sim` feature (and in this crate's own tests).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{RtpWrite, Ssrc};
use str0m::{Candidate, Event, Input, Output as RtcOutput, Rtc};

use crate::{ConnKey, CoreConfig, Engine, MediaEvent, NewConnection, Output};

/// Benchmark support: a publisher fanned out to N subscribers, measured engine-only.
pub mod bench;

/// Network conditions on one leg (peer → gateway or gateway → peer).
#[derive(Debug, Clone, Copy, Default)]
pub struct Link {
    /// Probability that a datagram is lost.
    pub loss: f64,
    pub delay: Duration,
    /// Uniform extra delay in `0..jitter` (reorders datagrams when larger than their spacing).
    pub jitter: Duration,
}

/// A client peer: a full (non-lite) str0m agent in RTP mode.
pub struct Peer {
    pub name: String,
    pub addr: SocketAddr,
    pub rtc: Rtc,
    pub connection_id: Option<String>,
    pub key: Option<ConnKey>,
    pub connected: bool,
    /// RTP received: (kind, payload).
    pub received: Vec<(MediaKind, Vec<u8>)>,
    pub keyframe_requests: usize,
    /// Conditions toward the gateway and from it.
    pub up: Link,
    pub down: Link,
    pending: Option<SdpPendingOffer>,
    audio: Option<Mid>,
    video: Option<Mid>,
    sent: u64,
    video_ssrcs: Vec<Ssrc>,
    next_timeout: Option<Instant>,
}

struct Datagram {
    from: SocketAddr,
    to: SocketAddr,
    bytes: Vec<u8>,
}

/// The engine, its peers and the network between them.
pub struct Sim {
    pub engine: Engine,
    pub now: Instant,
    pub peers: Vec<Peer>,
    /// Every event the engine reported.
    pub events: Vec<MediaEvent>,
    rng: StdRng,
    in_flight: BTreeMap<(Instant, u64), Datagram>,
    seq: u64,
    /// Gateway candidate address → connection.
    sockets: HashMap<SocketAddr, ConnKey>,
    next_key: u64,
    room: String,
}

const GATEWAY_IP: [u8; 4] = [10, 0, 0, 1];

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
            rng: StdRng::seed_from_u64(seed),
            in_flight: BTreeMap::new(),
            seq: 0,
            sockets: HashMap::new(),
            next_key: 1,
            room: "room".into(),
        }
    }

    /// Add a client peer; returns its index.
    pub fn add_peer(&mut self, name: &str) -> usize {
        let i = self.peers.len();
        let addr = SocketAddr::from(([10, 0, 1, (i + 1) as u8], 5000));
        let mut rtc = Rtc::builder().set_rtp_mode(true).build(self.now);
        if let Ok(c) = Candidate::host(addr, "udp") {
            rtc.add_local_candidate(c);
        }
        self.peers.push(Peer {
            name: name.into(),
            addr,
            rtc,
            connection_id: None,
            key: None,
            connected: false,
            received: Vec::new(),
            keyframe_requests: 0,
            up: Link::default(),
            down: Link::default(),
            pending: None,
            audio: None,
            video: None,
            sent: 0,
            video_ssrcs: Vec::new(),
            next_timeout: None,
        });
        i
    }

    fn new_connection(&mut self, peer: usize) -> NewConnection {
        let key = ConnKey(self.next_key);
        self.next_key += 1;
        let local = SocketAddr::from((GATEWAY_IP, 40000 + key.0 as u16));
        self.sockets.insert(local, key);
        let connection_id = format!("c_{}_{}", self.peers[peer].name, key.0);
        self.peers[peer].connection_id = Some(connection_id.clone());
        self.peers[peer].key = Some(key);
        NewConnection {
            key,
            connection_id,
            room_id: self.room.clone(),
            participant_id: self.peers[peer].name.clone(),
            local,
        }
    }

    /// The peer publishes audio + video (its offer, our answer, then ICE and DTLS over the net).
    pub fn publish(&mut self, peer: usize) {
        let p = &mut self.peers[peer];
        let mut api = p.rtc.sdp_api();
        p.audio = Some(api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None));
        p.video = Some(api.add_media(MediaKind::Video, Direction::SendOnly, None, None, None));
        let (offer, pending) = api.apply().expect("an offer with two sections");
        p.pending = Some(pending);
        let spec = self.new_connection(peer);
        let sdp = offer.to_sdp_string();
        if let Err(e) = self.engine.publish(self.now, spec, &sdp) {
            panic!("publish refused: {e}");
        }
        self.pump_engine();
    }

    /// The peer subscribes (the gateway offers; the peer answers every offer).
    pub fn subscribe(&mut self, peer: usize) {
        let spec = self.new_connection(peer);
        if let Err(e) = self.engine.subscribe(self.now, spec) {
            panic!("subscribe refused: {e}");
        }
        self.pump_engine();
    }

    /// Write `n` video packets (and an audio packet every other one) from the peer, 20 ms apart
    /// in RTP time, all at the current instant. Returns the payloads written.
    pub fn send_media(&mut self, peer: usize, n: usize) -> Vec<Vec<u8>> {
        let mut written = Vec::new();
        for _ in 0..n {
            if let Some(v) = self.write_one(peer, MediaKind::Video) {
                written.push(v);
            }
            if self.peers[peer].sent % 2 == 0 {
                self.write_one(peer, MediaKind::Audio);
            }
            self.drain_peer(peer);
        }
        written
    }

    fn write_one(&mut self, peer: usize, kind: MediaKind) -> Option<Vec<u8>> {
        let now = self.now;
        let p = &mut self.peers[peer];
        let mid = if kind == MediaKind::Video { p.video? } else { p.audio? };
        if kind == MediaKind::Video {
            p.sent += 1;
        }
        let n = p.sent;
        let want = if kind == MediaKind::Video { Codec::Vp8 } else { Codec::Opus };
        let remote = p.rtc.media(mid)?.remote_pts().to_vec();
        let pt = p.rtc.codec_config().find(|c| c.spec().codec == want && remote.contains(&c.pt()))?.pt();
        let size = if kind == MediaKind::Video { 1000 } else { 100 };
        let mut payload = format!("{}-{:?}-{n}-", p.name, kind).into_bytes();
        payload.resize(size, (n % 251) as u8);
        let clock = if kind == MediaKind::Video { 90 } else { 48 };
        let mut api = p.rtc.direct_api();
        let tx = api.stream_tx_by_mid(mid, None)?;
        tx.write_rtp(
            RtpWrite::new(pt, (1000 + n).into(), (n * 20 * clock) as u32, now, payload.clone())
                .marker(true)
                .nackable(true),
        );
        Some(payload)
    }

    /// The peer asks for a keyframe on every video stream it receives.
    pub fn request_keyframe(&mut self, peer: usize) {
        let p = &mut self.peers[peer];
        for ssrc in p.video_ssrcs.clone() {
            if let Some(rx) = p.rtc.direct_api().stream_rx(&ssrc) {
                rx.request_keyframe(KeyframeRequestKind::Pli);
            }
        }
        self.drain_peer(peer);
    }

    /// Hand a raw datagram to the engine as if `from` had sent it to connection `key`.
    pub fn inject(&mut self, key: ConnKey, from: SocketAddr, bytes: &[u8]) {
        let Some(local) = self.sockets.iter().find(|(_, k)| **k == key).map(|(a, _)| *a) else { return };
        self.engine.handle_receive(self.now, key, from, local, bytes);
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
                    let _ = self.peers[i].rtc.handle_input(Input::Timeout(now));
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
            if let Some(key) = self.sockets.get(&d.to).copied() {
                self.engine.handle_receive(self.now, key, d.from, d.to, &d.bytes);
            } else if let Some(i) = self.peers.iter().position(|p| p.addr == d.to) {
                let now = self.now;
                if let Ok(contents) = d.bytes.as_slice().try_into() {
                    let recv = Receive { proto: Protocol::Udp, source: d.from, destination: d.to, contents };
                    let _ = self.peers[i].rtc.handle_input(Input::Receive(now, recv));
                }
                self.drain_peer(i);
            }
        }
    }

    fn send(&mut self, link: Link, from: SocketAddr, to: SocketAddr, bytes: Vec<u8>) {
        if link.loss > 0.0 && self.rng.random_bool(link.loss.min(1.0)) {
            return;
        }
        let jitter = if link.jitter.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_micros(self.rng.random_range(0..link.jitter.as_micros() as u64))
        };
        self.seq += 1;
        self.in_flight.insert((self.now + link.delay + jitter, self.seq), Datagram { from, to, bytes });
    }

    /// Carry out the engine's outputs: datagrams onto the net, events to the peers.
    fn pump_engine(&mut self) {
        while let Some(out) = self.engine.poll_output() {
            match out {
                Output::Transmit { key, destination, contents } => {
                    let from = self.sockets.iter().find(|(_, k)| **k == key).map(|(a, _)| *a);
                    let link = self.peers.iter().find(|p| p.addr == destination).map(|p| p.down).unwrap_or_default();
                    if let Some(from) = from {
                        self.send(link, from, destination, contents);
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
                let p = &mut self.peers[i];
                if let (Some(pending), Ok(answer)) = (p.pending.take(), SdpAnswer::from_sdp_string(sdp)) {
                    let _ = p.rtc.sdp_api().accept_answer(pending, answer);
                }
            }
            MediaEvent::Offer { connection_id, sdp } => {
                let Some(i) = self.peer_of(connection_id) else { return };
                let Ok(offer) = SdpOffer::from_sdp_string(sdp) else { return };
                let Ok(answer) = self.peers[i].rtc.sdp_api().accept_offer(offer) else { return };
                let (now, id, sdp) = (self.now, connection_id.clone(), answer.to_sdp_string());
                // Queued output of the answer is handled by the caller's pump loop.
                let _ = self.engine.answer(now, &id, &sdp);
            }
            MediaEvent::Candidate { connection_id, candidate, .. } => {
                let Some(i) = self.peer_of(connection_id) else { return };
                if let Ok(c) = Candidate::from_sdp_string(candidate) {
                    self.peers[i].rtc.add_remote_candidate(c);
                }
            }
            _ => {}
        }
    }

    fn drain_peer(&mut self, i: usize) {
        loop {
            let now = self.now;
            let out = self.peers[i].rtc.poll_output();
            match out {
                Ok(RtcOutput::Timeout(t)) => {
                    if t <= now {
                        let _ = self.peers[i].rtc.handle_input(Input::Timeout(now));
                        continue;
                    }
                    self.peers[i].next_timeout = Some(t);
                    return;
                }
                Ok(RtcOutput::Transmit(t)) => {
                    let link = self.peers[i].up;
                    let from = self.peers[i].addr;
                    self.send(link, from, t.destination, t.contents.into());
                }
                Ok(RtcOutput::Event(e)) => {
                    let p = &mut self.peers[i];
                    match e {
                        Event::Connected => p.connected = true,
                        Event::KeyframeRequest(_) => p.keyframe_requests += 1,
                        Event::RtpPacket(pkt) => {
                            let kind = p
                                .rtc
                                .direct_api()
                                .stream_rx(&pkt.header.ssrc)
                                .map(|s| s.mid())
                                .and_then(|mid| p.rtc.media(mid).map(|m| m.kind()))
                                .unwrap_or(MediaKind::Video);
                            if kind == MediaKind::Video && !p.video_ssrcs.contains(&pkt.header.ssrc) {
                                p.video_ssrcs.push(pkt.header.ssrc);
                            }
                            p.received.push((kind, pkt.payload.to_vec()));
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
        self.peers[peer].received.iter().filter(|(k, _)| *k == MediaKind::Video).map(|(_, b)| b.clone()).collect()
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
        let mut sent = Vec::new();
        for _ in 0..50 {
            sent.extend(sim.send_media(p, 1));
            sim.run_for(Duration::from_millis(20));
        }
        sim.run_for(Duration::from_millis(200));
        assert_eq!(sim.video_received(v), sent);
        assert!(sim.peers[p].keyframe_requests >= 1, "the new subscriber's keyframe request reached the publisher");
        assert!(wall.elapsed() < Duration::from_secs(5), "virtual time runs fast: {:?}", wall.elapsed());
    }

    #[test]
    fn same_seed_same_result_with_loss() {
        let run = |seed| {
            let (mut sim, p, v) = call(seed);
            sim.peers[v].down = Link { loss: 0.05, delay: Duration::from_millis(20), jitter: Duration::from_millis(5) };
            let mut sent = Vec::new();
            // Packets 1..=200 of 221 are judged: a receiver cannot NACK what comes before the
            // first sequence number it sees, nor a lost tail packet no successor reveals.
            for _ in 0..221 {
                sent.extend(sim.send_media(p, 1));
                sim.run_for(Duration::from_millis(20));
            }
            sim.run_for(Duration::from_millis(500));
            let got = sim.video_received(v);
            (sent[1..201].iter().filter(|x| got.contains(x)).count(), got.len())
        };
        let a = run(7);
        assert_eq!(a, run(7), "deterministic");
        assert_eq!(a.0, 200, "5% downlink loss is repaired by RTX: {a:?}");
    }
}
