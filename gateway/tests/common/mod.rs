//! Test harness: a real gateway started in-process on ephemeral ports, and str0m-based test
//! peers that join through the public REST + WebSocket API and exchange RTP over loopback UDP.
//!
//! The str0m side of a peer (its `Rtc`, SDP steps, receive classification, VP8 descriptors) is
//! the shared `test_peer` crate; this file owns the REST client, the WebSocket driver and the
//! socket, the fault switches (lossy, muted, DTLS blocked, offers ignored, no repair) and the
//! log the tests read.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use gateway::config::GatewayConfig;
use gateway::server::Running;
use serde_json::{json, Value};
use str0m::format::Codec;
use str0m::media::MediaKind;
use str0m::rtp::{RtpPacket, RtpWrite};
use str0m::Event;
use test_peer::rx::Classified;
use test_peer::vp8::{self, Descriptor};
use test_peer::{Out, PeerConfig, SdpError};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

pub const API_KEY: &str = "test-api-key";

/// `TEST_MEDIA_MUX=1`: every gateway the tests start shares one UDP port per media worker
/// (`media.mux`), so the same suites prove the single-port mode.
pub fn mux_mode() -> bool {
    std::env::var("TEST_MEDIA_MUX").is_ok_and(|v| v == "1")
}

/// `TEST_MEDIA_SPREAD=1`: every gateway the tests start spreads each room over its two media
/// workers (`media.spread`), so the same suites prove rooms that cross workers.
pub fn spread_mode() -> bool {
    std::env::var("TEST_MEDIA_SPREAD").is_ok_and(|v| v == "1")
}

/// Start a gateway on 127.0.0.1 with HTTP on an ephemeral port and the given media port range.
pub async fn start_gateway(port_min: u16, port_max: u16) -> Running {
    start_gateway_with(port_min, port_max, |_| {}).await
}

/// The same, with the config adjusted first.
pub async fn start_gateway_with(port_min: u16, port_max: u16, adjust: impl FnOnce(&mut GatewayConfig)) -> Running {
    let mut cfg = GatewayConfig::default();
    cfg.http.bind = "127.0.0.1:0".parse().unwrap();
    cfg.media.port_min = port_min;
    cfg.media.port_max = port_max;
    cfg.media.workers = 2;
    cfg.auth.api_key = API_KEY.into();
    cfg.auth.token_secret = "integration-test-secret-0123456789".into();
    // The suites run once as configured and once more in single-port mode (scripts/test.sh).
    cfg.media.mux = mux_mode();
    cfg.media.spread = spread_mode();
    adjust(&mut cfg);
    cfg.validate().unwrap();
    gateway::server::start(cfg).await.expect("gateway starts")
}

pub struct Api {
    pub base: String,
    client: reqwest::Client,
}

impl Api {
    pub fn new(base: String) -> Self {
        // No keep-alive pool: idle pooled connections would count as the server's tasks and
        // descriptors in the leak checks.
        let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("client");
        Self { base, client }
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.client.request(m, format!("{}{}", self.base, path)).bearer_auth(API_KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn create_room(&self, name: &str) -> String {
        self.create_room_of(name, 8).await
    }

    /// A room for up to `max_participants`.
    pub async fn create_room_of(&self, name: &str, max_participants: usize) -> String {
        let body = json!({ "name": name, "max_participants": max_participants });
        let (s, b) = self.call("POST", "/v1/rooms", Some(body)).await;
        assert_eq!(s, 201, "{b}");
        b["room_id"].as_str().unwrap().to_owned()
    }

    pub async fn token(&self, room: &str, participant: &str) -> String {
        let (s, b) =
            self.call("POST", &format!("/v1/rooms/{room}/tokens"), Some(json!({ "participant": participant }))).await;
        assert_eq!(s, 201, "{b}");
        b["token"].as_str().unwrap().to_owned()
    }

    /// A sample from `/metrics` (series written exactly as exposed, labels in order).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.client.get(format!("{}/metrics", self.base)).send().await.unwrap().text().await.unwrap();
        text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
    }

    /// Wait up to `secs` until a `/metrics` sample reaches `min`: media workers publish their
    /// counters once a second, so one read right after the traffic can come too early.
    pub async fn metric_reaches(&self, series: &str, min: f64, secs: u64) {
        poll_until(&format!("{series} >= {min}"), secs, || async move {
            let v = self.metric(series).await;
            if v >= min {
                Ok(())
            } else {
                Err(format!("{series} = {v}"))
            }
        })
        .await;
    }

    pub fn ws_url(&self, token: &str) -> String {
        format!("{}/v1/ws?token={}", self.base.replacen("http", "ws", 1), token)
    }
}

/// What a peer has seen.
#[derive(Default)]
pub struct Log {
    /// Every message from the gateway.
    pub messages: Vec<Value>,
    /// RTP received: (kind, payload).
    pub rtp: Vec<(MediaKind, Vec<u8>)>,
    /// RTP payloads sent, in order.
    pub sent: Vec<(MediaKind, Vec<u8>)>,
    pub keyframe_requests: usize,
    pub plis_sent: usize,
    pub dropped_rx: u64,
    pub dropped_tx: u64,
    pub connected: bool,
    pub offers: Vec<String>,
    pub ws_closed: Option<u16>,
    /// Video frames received (`test_peer::frames`): whole, partial, decodable.
    pub frames: test_peer::frames::Frames,
}

impl Log {
    pub fn events(&self, event: &str) -> Vec<Value> {
        self.messages.iter().filter(|m| m["type"] == "connection_event" && m["event"] == event).cloned().collect()
    }
    pub fn of_type(&self, t: &str) -> Vec<Value> {
        self.messages.iter().filter(|m| m["type"] == t).cloned().collect()
    }
}

enum Cmd {
    Publish,
    Subscribe,
    SendMedia {
        packets: usize,
    },
    Raw(Value),
    Leave,
    /// Stop answering on UDP (a peer that vanished from the network but kept its WebSocket).
    MuteUdp,
    /// Do not answer the gateway's offers.
    IgnoreOffers,
    /// Send this many PLIs for every received video stream, one every 50 ms.
    RequestKeyframes(usize),
    /// Never send DTLS (ICE completes, the handshake never starts on our side).
    BlockDtls,
    /// Drop every n-th incoming / outgoing RTP datagram (0: none). RTCP is never dropped.
    Lossy {
        rx_every: u64,
        tx_every: u64,
    },
    /// No loss repair: send NACKs for nothing we receive and write media that cannot be resent,
    /// so every RTP packet counted arrived in its first transmission.
    NoRepair,
    /// Send video as frames of this many packets every 40 ms (25 fps, VP8 descriptors with
    /// picture numbering, the marker on each frame's last packet, keyframes when asked) and
    /// audio every 20 ms, both with real-time RTP timestamps.
    Frames(usize),
}

/// A participant: a WebSocket session plus one str0m `Rtc` (publish or subscribe).
pub struct Peer {
    pub name: String,
    pub log: Arc<Mutex<Log>>,
    cmd: mpsc::UnboundedSender<Cmd>,
    pub local: SocketAddr,
}

impl Peer {
    pub async fn join(api: &Api, room: &str, name: &str) -> Peer {
        let token = api.token(room, name).await;
        let (ws, _) = tokio_tungstenite::connect_async(api.ws_url(&token)).await.expect("ws connects");
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let local = socket.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run_peer(name.to_owned(), ws, socket, rx, Arc::clone(&log)));
        let peer = Peer { name: name.to_owned(), log, cmd: tx, local };
        peer.wait("joined", 5, |l| !l.of_type("joined").is_empty()).await;
        peer
    }

    pub fn publish(&self) {
        let _ = self.cmd.send(Cmd::Publish);
    }
    pub fn subscribe(&self) {
        let _ = self.cmd.send(Cmd::Subscribe);
    }
    pub fn send_media(&self, packets: usize) {
        let _ = self.cmd.send(Cmd::SendMedia { packets });
    }
    pub fn raw(&self, v: Value) {
        let _ = self.cmd.send(Cmd::Raw(v));
    }
    pub fn leave(&self) {
        let _ = self.cmd.send(Cmd::Leave);
    }
    pub fn request_keyframes(&self, n: usize) {
        let _ = self.cmd.send(Cmd::RequestKeyframes(n));
    }
    pub fn lossy(&self, rx_every: u64, tx_every: u64) {
        let _ = self.cmd.send(Cmd::Lossy { rx_every, tx_every });
    }
    pub fn block_dtls(&self) {
        let _ = self.cmd.send(Cmd::BlockDtls);
    }
    pub fn ignore_offers(&self) {
        let _ = self.cmd.send(Cmd::IgnoreOffers);
    }
    pub fn mute_udp(&self) {
        let _ = self.cmd.send(Cmd::MuteUdp);
    }
    pub fn no_repair(&self) {
        let _ = self.cmd.send(Cmd::NoRepair);
    }
    pub fn frames(&self, packets_per_frame: usize) {
        let _ = self.cmd.send(Cmd::Frames(packets_per_frame));
    }

    pub fn with<R>(&self, f: impl FnOnce(&Log) -> R) -> R {
        f(&self.log.lock().unwrap())
    }

    /// Wait until `f` holds for this peer's log.
    pub async fn wait(&self, what: &str, secs: u64, f: impl Fn(&Log) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if self.with(&f) {
                return;
            }
            if Instant::now() > deadline {
                let msgs: Vec<String> =
                    self.with(|l| l.messages.iter().map(|m| m.to_string().chars().take(200).collect()).collect());
                panic!("{}: timed out waiting for {what}; messages:\n{}", self.name, msgs.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn state_sequence(&self, role: &str) -> Vec<String> {
        self.with(|l| {
            l.messages
                .iter()
                .filter(|m| m["type"] == "connection_event" && m["role"] == role)
                .map(|m| m["event"].as_str().unwrap().to_owned())
                .filter(|e| !matches!(e.as_str(), "SDP_PROCESSED" | "CANDIDATE"))
                .collect()
        })
    }

    pub fn connection_id(&self, role: &str) -> Option<String> {
        self.with(|l| {
            l.messages
                .iter()
                .find(|m| m["type"] == "connection_event" && m["role"] == role)
                .map(|m| m["connection_id"].as_str().unwrap().to_owned())
        })
    }
}

struct PeerState {
    name: String,
    peer: test_peer::Peer,
    socket: UdpSocket,
    connection_id: Option<String>,
    to_send: usize,
    sent: u64,
    ignore_offers: bool,
    plis_left: usize,
    /// A keyframe request arrived: the next video packet is a keyframe.
    keyframe_owed: bool,
    ticks: u64,
    loss: (u64, u64),
    block_dtls: bool,
    no_repair: bool,
    rtp_rx: u64,
    rtp_tx: u64,
    /// Frame mode (`Cmd::Frames`): packets per frame (0: one packet per tick), and the next
    /// sequence numbers and picture numbering.
    frame_packets: usize,
    frame_seq: [u64; 2],
    numbering: vp8::Numbering,
    log: Arc<Mutex<Log>>,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn run_peer(
    name: String,
    ws: Ws,
    socket: UdpSocket,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    log: Arc<Mutex<Log>>,
) {
    let local = socket.local_addr().unwrap();
    let peer = test_peer::Peer::new(Instant::now(), local, &PeerConfig::default()).unwrap();
    let mut st = PeerState {
        name,
        peer,
        socket,
        connection_id: None,
        to_send: 0,
        sent: 0,
        ignore_offers: false,
        plis_left: 0,
        keyframe_owed: false,
        ticks: 0,
        loss: (0, 0),
        block_dtls: false,
        no_repair: false,
        rtp_rx: 0,
        rtp_tx: 0,
        frame_packets: 0,
        frame_seq: [1000, 5000],
        numbering: vp8::Numbering { picture_id: 100, tl0_pic_idx: 0, key_idx: 0 },
        log,
    };
    let (mut ws_tx, mut ws_rx) = ws.split();
    let mut buf = vec![0u8; 2048];
    let mut media_tick = tokio::time::interval(Duration::from_millis(10));
    let mut muted = false;
    loop {
        if muted {
            // Keep only signaling alive: no UDP in or out.
            tokio::select! {
                m = ws_rx.next() => match m {
                    Some(Ok(Message::Text(t))) => st.log.lock().unwrap().messages.push(serde_json::from_str(&t).unwrap()),
                    Some(Ok(_)) => {}
                    _ => return,
                },
                c = cmds.recv() => match c {
                    Some(Cmd::Raw(v)) => { let _ = ws_tx.send(Message::Text(v.to_string().into())).await; }
                    Some(Cmd::Leave) => { let _ = ws_tx.send(Message::Text(json!({ "type": "leave" }).to_string().into())).await; }
                    Some(_) => {}
                    None => return,
                },
            }
            continue;
        }
        let timeout = st.drain().await;
        let wait = timeout.saturating_duration_since(Instant::now()).min(Duration::from_millis(50));
        tokio::select! {
            r = st.socket.recv_from(&mut buf) => {
                let Ok((n, source)) = r else { continue };
                if is_rtp(&buf[..n]) && st.loss.0 > 0 {
                    st.rtp_rx += 1;
                    if st.rtp_rx % st.loss.0 == 0 {
                        st.log.lock().unwrap().dropped_rx += 1;
                        continue;
                    }
                }
                let _ = st.peer.handle_datagram(Instant::now(), source, &buf[..n]);
            }
            m = ws_rx.next() => {
                match m {
                    Some(Ok(Message::Text(t))) => {
                        let v: Value = serde_json::from_str(&t).unwrap();
                        if let Some(reply) = st.on_message(&v) {
                            let _ = ws_tx.send(Message::Text(reply.to_string().into())).await;
                        }
                        st.log.lock().unwrap().messages.push(v);
                    }
                    Some(Ok(Message::Close(f))) => {
                        st.log.lock().unwrap().ws_closed = Some(f.map(|f| u16::from(f.code)).unwrap_or(1005));
                        return;
                    }
                    Some(Ok(_)) => {}
                    _ => {
                        st.log.lock().unwrap().ws_closed.get_or_insert(1006);
                        return;
                    }
                }
            }
            c = cmds.recv() => {
                let Some(c) = c else { return };
                let out = match c {
                    Cmd::Publish => Some(st.make_offer()),
                    Cmd::Subscribe => Some(json!({ "type": "subscribe" })),
                    Cmd::SendMedia { packets } => { st.to_send += packets; None }
                    Cmd::Raw(v) => Some(v),
                    Cmd::Leave => Some(json!({ "type": "leave" })),
                    Cmd::MuteUdp => { muted = true; None }
                    Cmd::IgnoreOffers => { st.ignore_offers = true; None }
                    Cmd::RequestKeyframes(n) => { st.plis_left += n; None }
                    Cmd::Lossy { rx_every, tx_every } => { st.loss = (rx_every, tx_every); None }
                    Cmd::BlockDtls => { st.block_dtls = true; None }
                    Cmd::NoRepair => { st.no_repair = true; None }
                    Cmd::Frames(n) => { st.frame_packets = n; None }
                };
                if let Some(out) = out {
                    let _ = ws_tx.send(Message::Text(out.to_string().into())).await;
                }
            }
            _ = media_tick.tick(), if st.to_send > 0 || st.plis_left > 0 => {
                st.write_media();
                st.send_pli();
            }
            _ = tokio::time::sleep(wait) => {
                let _ = st.peer.handle_timeout(Instant::now());
            }
        }
    }
}

impl PeerState {
    /// Poll the Rtc until it waits; returns when it next wants time.
    async fn drain(&mut self) -> Instant {
        loop {
            match self.peer.poll_output(Instant::now()) {
                Ok(Out::Timeout(t)) => return t,
                Ok(Out::Transmit(t)) => {
                    if self.block_dtls && t.contents.first().is_some_and(|b| (20..=63).contains(b)) {
                        continue;
                    }
                    if is_rtp(&t.contents) && self.loss.1 > 0 {
                        self.rtp_tx += 1;
                        if self.rtp_tx % self.loss.1 == 0 {
                            self.log.lock().unwrap().dropped_tx += 1;
                            continue;
                        }
                    }
                    let _ = self.socket.send_to(&t.contents, t.destination).await;
                }
                Ok(Out::Rtp(c, p)) => self.on_rtp(c, &p),
                Ok(Out::Event(e)) => self.on_event(e),
                Err(_) => return Instant::now() + Duration::from_millis(50),
            }
        }
    }

    fn on_event(&mut self, e: Event) {
        let mut log = self.log.lock().unwrap();
        match e {
            Event::Connected => log.connected = true,
            Event::KeyframeRequest(_) => {
                log.keyframe_requests += 1;
                self.keyframe_owed = true;
            }
            _ => {}
        }
    }

    fn on_rtp(&mut self, c: Classified, p: &RtpPacket) {
        if self.no_repair {
            // Before any gap can be seen: the first packet of a stream cannot be missing.
            if let Some(rx) = self.peer.rtc.direct_api().stream_rx(&p.header.ssrc) {
                rx.suppress_nack(true);
            }
        }
        let mut log = self.log.lock().unwrap();
        if c.kind == MediaKind::Video {
            log.frames.on_packet(
                p.timestamp,
                *p.header.ssrc,
                *p.seq_no,
                p.header.timestamp,
                p.header.marker,
                &p.payload,
            );
        }
        log.rtp.push((c.kind, p.payload.to_vec()));
    }

    fn make_offer(&mut self) -> Value {
        let sdp = self.peer.publish_offer(true, Some(&[])).expect("offer");
        json!({ "type": "publish", "sdp": sdp })
    }

    fn on_message(&mut self, v: &Value) -> Option<Value> {
        match v["type"].as_str()? {
            "answer" => {
                self.connection_id = v["connection_id"].as_str().map(str::to_owned);
                if let Err(SdpError::Rejected(e)) = self.peer.accept_answer(v["sdp"].as_str()?) {
                    panic!("gateway answer is acceptable: {e}");
                }
                None
            }
            "offer" if !self.ignore_offers => {
                self.connection_id = v["connection_id"].as_str().map(str::to_owned);
                let sdp = v["sdp"].as_str()?;
                self.log.lock().unwrap().offers.push(sdp.to_owned());
                let answer = match self.peer.accept_offer(sdp) {
                    Ok(answer) => answer,
                    Err(SdpError::Rejected(e)) => panic!("gateway offer is acceptable: {e}"),
                    Err(_) => return None,
                };
                Some(json!({ "type": "answer", "connection_id": v["connection_id"], "sdp": answer }))
            }
            "candidate" => {
                self.peer.add_remote_candidate(v["candidate"].as_str()?);
                None
            }
            _ => None,
        }
    }

    /// Every fifth tick (50 ms), ask for a keyframe on every received video stream.
    fn send_pli(&mut self) {
        self.ticks += 1;
        if self.plis_left == 0 || self.ticks % 5 != 0 {
            return;
        }
        self.plis_left -= 1;
        self.peer.request_keyframes();
        self.log.lock().unwrap().plis_sent += 1;
    }

    /// Write one video and, every other tick, one audio packet with recognisable payloads.
    fn write_media(&mut self) {
        if self.to_send == 0 {
            return;
        }
        if self.frame_packets > 0 {
            return self.write_frames();
        }
        self.to_send -= 1;
        self.sent += 1;
        let n = self.sent;
        let now = Instant::now();
        for (kind, mid) in [(MediaKind::Video, self.peer.video_mid), (MediaKind::Audio, self.peer.audio_mid)] {
            let Some(mid) = mid else { continue };
            if kind == MediaKind::Audio && n % 2 == 0 {
                continue;
            }
            let want = if kind == MediaKind::Video { Codec::Vp8 } else { Codec::Opus };
            let Some(pt) = self.peer.pt_for(mid, want) else { continue };
            let size = if kind == MediaKind::Video { 900 } else { 120 };
            // Video is VP8-shaped (payload descriptor with S=1, then the key/delta bit), so the
            // gateway's keyframe detection sees what a browser would send: a keyframe first and
            // whenever one was asked for.
            let mut payload = Vec::new();
            if kind == MediaKind::Video {
                let key = n == 1 || std::mem::take(&mut self.keyframe_owed);
                vp8::push_synthetic_header(&mut payload, true, Descriptor::Plain, key);
            }
            payload.extend_from_slice(format!("{}-{:?}-{n}-", self.name, kind).as_bytes());
            while payload.len() < size {
                payload.push((payload.len() as u64 * 31 + n) as u8);
            }
            let clock = if kind == MediaKind::Video { 90 } else { 48 };
            let ts = (n * 20 * clock) as u32;
            let write = RtpWrite::new(pt, (1000 + n).into(), ts, now, payload.clone()).marker(true);
            if !self.peer.write_rtp(mid, None, write.nackable(!self.no_repair)) {
                continue;
            }
            self.log.lock().unwrap().sent.push((kind, payload));
        }
    }
}

impl PeerState {
    /// Frame mode: every tick is 10 ms; audio every other tick (20 ms), a video frame of
    /// `frame_packets` packets every fourth (40 ms).
    fn write_frames(&mut self) {
        self.to_send -= 1;
        let n = self.sent;
        self.sent += 1;
        let now = Instant::now();
        if n % 2 == 0 {
            if let Some(pt) = self.peer.audio_mid.and_then(|mid| Some((mid, self.peer.pt_for(mid, Codec::Opus)?))) {
                let (mid, pt) = pt;
                let mut payload = format!("{}-audio-{n}-", self.name).into_bytes();
                payload.resize(120, 0xa5);
                let ts = (n * 10 * 48) as u32;
                let seq = self.frame_seq[0];
                self.frame_seq[0] += 1;
                let write = RtpWrite::new(pt, seq.into(), ts, now, payload.clone()).marker(true);
                if self.peer.write_rtp(mid, None, write.nackable(false)) {
                    self.log.lock().unwrap().sent.push((MediaKind::Audio, payload));
                }
            }
        }
        if n % 4 != 0 {
            return;
        }
        let Some((mid, pt)) = self.peer.video_mid.and_then(|mid| Some((mid, self.peer.pt_for(mid, Codec::Vp8)?)))
        else {
            return;
        };
        let key = n == 0 || std::mem::take(&mut self.keyframe_owed);
        self.numbering.advance(key);
        let ts = (n / 4 * 3600) as u32;
        for i in 0..self.frame_packets {
            let mut payload = Vec::new();
            vp8::push_synthetic_header(&mut payload, i == 0, Descriptor::Full(self.numbering), key && i == 0);
            payload.extend_from_slice(format!("{}-video-{n}-{i}-", self.name).as_bytes());
            payload.resize(1000, (n + i as u64) as u8);
            let seq = self.frame_seq[1];
            self.frame_seq[1] += 1;
            let last = i + 1 == self.frame_packets;
            let write = RtpWrite::new(pt, seq.into(), ts, now, payload.clone()).marker(last);
            if self.peer.write_rtp(mid, None, write.nackable(!self.no_repair)) {
                self.log.lock().unwrap().sent.push((MediaKind::Video, payload));
            }
        }
    }
}

/// A call: one publisher `pub` (audio + video) and subscribers with these names, all READY.
pub async fn call(api: &Api, room: &str, subscribers: &[&str]) -> (Peer, Vec<Peer>) {
    let publisher = Peer::join(api, room, "pub").await;
    publisher.publish();
    publisher.wait("publish READY", 10, |l| l.connected).await;
    let mut subs = Vec::new();
    for name in subscribers {
        let s = Peer::join(api, room, name).await;
        s.subscribe();
        subs.push(s);
    }
    for s in &subs {
        s.wait("subscribe READY", 10, |l| l.connected).await;
    }
    (publisher, subs)
}

/// SRTP (not SRTCP) by RFC 7983 / RFC 5761 demultiplexing.
fn is_rtp(d: &[u8]) -> bool {
    d.len() > 1 && (128..=191).contains(&d[0]) && !(192..=223).contains(&d[1])
}

/// Poll an async check every 100 ms until it gives `Ok`; on timeout, panic with the last `Err`
/// (what was seen instead).
pub async fn poll_until<T, F, Fut>(what: &str, secs: u64, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match check().await {
            Ok(v) => return v,
            Err(seen) => assert!(Instant::now() < deadline, "timed out waiting for {what}: {seen}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait for a condition on the gateway or anything else.
pub async fn eventually(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
