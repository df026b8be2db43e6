//! One synthetic participant: a signaling session with the server under test (the gateway's
//! WebSocket or Janus's HTTP API, both behind [`crate::signaling`]) and up to two str0m peers
//! (RTP mode, full ICE agent, DTLS client), each on its own UDP socket, exactly as a browser
//! would use the public API. A publisher replays the clips in real time; a subscriber receives
//! every stream it is offered and measures it.
//!
//! The str0m peers are the shared `test_peer` crate's (SDP steps, drive loop, per-stream
//! receive counting: loss, jitter, keyframes); this file owns the session loop and sockets, the
//! join bookkeeping, the clip replay schedule, and matching received payloads to what the
//! publishers sent (latency, unmatched) for the report.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use str0m::format::Codec;
use str0m::media::{MediaKind, Mid, Pt, Rid};
use str0m::rtp::{ExtensionValues, RtpPacket, RtpWrite};
use str0m::{Event, IceConnectionState};
use test_peer::rx::Classified;
use test_peer::{Out, PeerConfig, SdpError};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::media::{self, Clip, H264Packetizer, OpusPacketizer, Packetize, VideoCodec, Vp8Packetizer};
use crate::signaling::{Command, ConnState, Event as Signal, Published, Role, Signaling, Target};
use crate::stats::{payload_hash, Percentiles, SentIndex, Shared};

/// What this participant does.
#[derive(Clone)]
pub struct Plan {
    pub room_id: String,
    pub name: String,
    pub publish: bool,
    pub subscribe: bool,
    /// Address our UDP sockets bind to (the gateway must reach it).
    pub local_ip: IpAddr,
    /// READY must be reached within this, or the connection counts as failed (`timeout`).
    pub connect_timeout: Duration,
    /// Which of `MediaPlan::audio` this publisher sends (modulo their number).
    pub audio_source: usize,
}

/// What publishers send.
pub struct MediaPlan {
    pub codec: VideoCodec,
    /// Video layers, lowest first; one without simulcast, none without video.
    pub video: Vec<Arc<Clip>>,
    /// Audio clips publishers take in turn (`Plan::audio_source`); none without audio.
    pub audio: Vec<Arc<Clip>>,
    /// Video goes out paced at this multiple of the video clips' bitrate (libwebrtc's pacer
    /// uses 2.5), a frame's packets spread out; 0 = each frame's packets at once (a burst).
    pub pacing: f64,
}

/// A connection's join, as this participant saw it.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Join {
    pub role: String,
    pub connection_id: Option<String>,
    /// INITIAL → READY by the gateway's own event timestamps.
    pub ready_ms: Option<f64>,
    /// From sending `publish`/`subscribe` to the READY event arriving here.
    pub client_ms: Option<f64>,
    pub failed: Option<String>,
    /// Lost after READY: the gateway's FAILED reason, or `client ICE disconnected`.
    pub dropped: Option<String>,
}

/// One received stream at one subscriber.
#[derive(Debug, Clone, Serialize)]
pub struct RxReport {
    pub publisher: String,
    pub stream: usize,
    pub kind: String,
    pub received: u64,
    pub bytes: u64,
    /// Sequence number span seen: what should have arrived between the first and last packet.
    pub expected: u64,
    pub lost: u64,
    pub unmatched: u64,
    pub jitter_ms: f64,
    pub keyframes: u64,
    /// First packet of the stream → first keyframe start (what a decoder waits for).
    pub first_keyframe_ms: Option<f64>,
    pub latency_ms: Percentiles,
}

/// Publisher-side figures of one sent stream.
#[derive(Debug, Clone, Serialize, Default)]
pub struct TxReport {
    pub stream: usize,
    pub kind: String,
    pub rid: Option<String>,
    pub packets: u64,
    pub bytes: u64,
    /// NACKs, PLIs, FIRs the gateway sent us (str0m's egress stats).
    pub nacks_in: u64,
    pub plis_in: u64,
    pub firs_in: u64,
    /// Packets str0m resent from its buffer (egress count minus packets written).
    pub retransmitted: u64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct ParticipantReport {
    pub name: String,
    pub error: Option<String>,
    pub joins: Vec<Join>,
    pub rx: Vec<RxReport>,
    pub tx: Vec<TxReport>,
    /// NACKs and PLIs this subscriber sent (str0m's ingress stats, ours for PLI).
    pub nacks_out: u64,
    pub plis_out: u64,
    /// Keyframe requests received by this publisher (`Event::KeyframeRequest`).
    pub keyframe_requests_in: u64,
    pub forced_keyframes: u64,
}

/// Run one participant until `stop` turns true, then leave.
pub async fn run(
    target: Target,
    plan: Plan,
    media: Arc<MediaPlan>,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) -> ParticipantReport {
    let mut report = ParticipantReport { name: plan.name.clone(), ..Default::default() };
    let connections = u64::from(plan.publish) + u64::from(plan.subscribe);
    shared.live.requested.fetch_add(connections, Ordering::Relaxed);
    shared.live.started.fetch_add(1, Ordering::Relaxed);
    let unsettled = Arc::new(AtomicU64::new(connections));
    let result = session(&target, &plan, &media, &shared, stop, Arc::clone(&unsettled), &mut report).await;
    if let Err(e) = result {
        report.error = Some(format!("{e:#}"));
    }
    // Connections that never became READY nor FAILED (the session ended first) count as failed.
    shared.live.failed.fetch_add(unsettled.load(Ordering::Relaxed), Ordering::Relaxed);
    shared.live.finished.fetch_add(1, Ordering::Relaxed);
    report
}

async fn session(
    target: &Target,
    plan: &Plan,
    media: &Arc<MediaPlan>,
    shared: &Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    unsettled: Arc<AtomicU64>,
    report: &mut ParticipantReport,
) -> anyhow::Result<()> {
    let Signaling { commands, mut events } = target.connect(plan).await?;
    let mut p = Participant::new(plan, media, shared, unsettled).await?;
    let mut buf_pub = vec![0u8; 2048];
    let mut buf_sub = vec![0u8; 2048];
    let sleep = tokio::time::sleep(Duration::from_millis(1));
    tokio::pin!(sleep);
    let mut leaving: Option<Instant> = None;
    let mut error = None;
    loop {
        let now = Instant::now();
        let next = p.poll(now);
        if leaving.is_some_and(|t| now >= t) {
            break;
        }
        let deadline = leaving.map_or(next, |t| next.min(t));
        sleep.as_mut().reset(tokio::time::Instant::from_std(deadline));
        tokio::select! {
            r = recv(p.publisher.as_ref().map(|x| &x.side.socket), &mut buf_pub) => {
                if let Ok((n, from)) = r {
                    let now = Instant::now();
                    p.on_datagram(true, now, from, &buf_pub[..n]);
                    // Everything else already waiting, without going back to the reactor.
                    while let Some(Ok((n, from))) = p.publisher.as_ref().map(|x| x.side.socket.try_recv_from(&mut buf_pub)) {
                        p.on_datagram(true, Instant::now(), from, &buf_pub[..n]);
                    }
                }
            }
            r = recv(p.subscriber.as_ref().map(|x| &x.side.socket), &mut buf_sub) => {
                if let Ok((n, from)) = r {
                    let now = Instant::now();
                    p.on_datagram(false, now, from, &buf_sub[..n]);
                    while let Some(Ok((n, from))) = p.subscriber.as_ref().map(|x| x.side.socket.try_recv_from(&mut buf_sub)) {
                        p.on_datagram(false, Instant::now(), from, &buf_sub[..n]);
                    }
                }
            }
            ev = events.recv() => match ev {
                Some(Signal::Closed(e)) => {
                    error = e;
                    break;
                }
                None => break,
                Some(ev) => {
                    for cmd in p.on_event(ev) {
                        let _ = commands.send(cmd);
                    }
                }
            },
            _ = stop.changed(), if leaving.is_none() => {
                let _ = commands.send(Command::Leave);
                leaving = Some(Instant::now() + Duration::from_secs(3));
            }
            _ = &mut sleep => {}
        }
    }
    p.finish(report);
    match error {
        // An error after we asked to leave is the server closing on us: not the run's failure.
        Some(e) if leaving.is_none() => Err(anyhow::anyhow!(e)),
        _ => Ok(()),
    }
}

async fn recv(socket: Option<&UdpSocket>, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    match socket {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// One str0m peer and its socket.
struct Side {
    peer: test_peer::Peer,
    socket: UdpSocket,
    next_timeout: Instant,
    join: Join,
    requested_at: Option<Instant>,
    initial_at: Option<chrono::DateTime<chrono::FixedOffset>>,
    /// The last state event the gateway reported for this connection.
    last_state: &'static str,
    /// Our ICE agent reached Connected (DTLS may still be going).
    ice_connected: bool,
    dead: bool,
}

impl Side {
    async fn new(ip: IpAddr, publisher: Option<VideoCodec>) -> anyhow::Result<Self> {
        let socket = UdpSocket::bind(SocketAddr::new(ip, 0)).await?;
        let local = socket.local_addr()?;
        let cfg = PeerConfig {
            video_codec: publisher.map(VideoCodec::codec),
            stats_interval: Some(Duration::from_secs(1)),
            record: false,
            tcp: false,
        };
        Ok(Self {
            peer: test_peer::Peer::new(Instant::now(), local, &cfg)?,
            socket,
            next_timeout: Instant::now(),
            join: Join::default(),
            requested_at: None,
            initial_at: None,
            last_state: "none",
            ice_connected: false,
            dead: false,
        })
    }

    fn input(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        if self.peer.handle_datagram(now, from, data).is_err() {
            self.dead = true;
        }
    }
}

/// Outgoing state of one publisher stream (a simulcast layer, or the audio).
struct TxTrack {
    mid: Mid,
    rid: Option<Rid>,
    index: Arc<SentIndex>,
    clip: Arc<Clip>,
    packetizer: Box<dyn Packetize>,
    seq: u64,
    ts: u32,
    written: u64,
}

/// Cumulative egress counters of one sent stream: packets (with resends), NACKs, PLIs, FIRs.
#[derive(Clone, Copy, Default)]
struct Egress {
    packets: u64,
    nacks: u64,
    plis: u64,
    firs: u64,
}

struct Publisher {
    side: Side,
    video: Vec<TxTrack>,
    audio: Option<TxTrack>,
    codec: VideoCodec,
    /// Next video frame (index into the clips, which share their frame timing) and when it is due.
    frame: usize,
    next_frame_at: Option<Instant>,
    next_audio_at: Option<Instant>,
    audio_frame: usize,
    keyframe_wanted: bool,
    last_forced_keyframe: Option<Instant>,
    forced_keyframes: u64,
    /// str0m's latest egress stats per (mid, rid).
    egress: HashMap<(String, Option<String>), Egress>,
    scratch: Vec<Vec<u8>>,
    /// Video packets waiting for the pacer (`MediaPlan::pacing`), in send order.
    paced: VecDeque<Paced>,
    /// When the pacer may send its next packet (a leaky bucket at `pace_bps`).
    pace_free_at: Option<Instant>,
    /// Pacing rate, bit/s; 0 = no pacing.
    pace_bps: u64,
}

/// A video packet the pacer holds: its track (index into `Publisher::video`), payload type,
/// frame timestamp and whether it ends the frame; it is numbered and sent when its time comes.
struct Paced {
    at: Instant,
    track: usize,
    pt: Pt,
    ts: u32,
    marker: bool,
    payload: Vec<u8>,
}

/// What we know of one received stream beyond the peer's counts (`side.peer.rx.streams`, same
/// index): whose it is, and its payloads matched to the publishers' sends.
struct RxMatch {
    index: Option<Arc<SentIndex>>,
    publisher: String,
    /// The publisher's mid.
    mid: String,
    unmatched: u64,
    last_pli: Option<Instant>,
    latencies: Vec<u32>,
}

struct Subscriber {
    side: Side,
    streams: Vec<RxMatch>,
    nacks_by_mid: HashMap<Mid, u64>,
    nacks_out: u64,
    plis_out: u64,
    pending_latency: Vec<(u32, u32)>,
    last_flush: Instant,
}

struct Participant<'a> {
    plan: &'a Plan,
    media: &'a Arc<MediaPlan>,
    shared: &'a Arc<Shared>,
    joined: bool,
    publisher: Option<Publisher>,
    subscriber: Option<Subscriber>,
    /// stream id → (publisher, publisher's mid), from `joined` and `stream_added`.
    published: HashMap<String, (String, String)>,
    /// This participant's connections not yet READY or failed.
    unsettled: Arc<AtomicU64>,
}

impl<'a> Participant<'a> {
    async fn new(
        plan: &'a Plan,
        media: &'a Arc<MediaPlan>,
        shared: &'a Arc<Shared>,
        unsettled: Arc<AtomicU64>,
    ) -> anyhow::Result<Self> {
        let publisher = if plan.publish {
            Some(Publisher {
                side: Side::new(plan.local_ip, Some(media.codec)).await?,
                video: Vec::new(),
                audio: None,
                codec: media.codec,
                frame: 0,
                next_frame_at: None,
                next_audio_at: None,
                audio_frame: 0,
                keyframe_wanted: false,
                last_forced_keyframe: None,
                forced_keyframes: 0,
                egress: HashMap::new(),
                scratch: Vec::new(),
                paced: VecDeque::new(),
                pace_free_at: None,
                pace_bps: (media.pacing * media.video.iter().map(|c| c.nominal_bps).sum::<u64>() as f64) as u64,
            })
        } else {
            None
        };
        let subscriber = if plan.subscribe {
            Some(Subscriber {
                side: Side::new(plan.local_ip, None).await?,
                streams: Vec::new(),
                nacks_by_mid: HashMap::new(),
                nacks_out: 0,
                plis_out: 0,
                pending_latency: Vec::new(),
                last_flush: Instant::now(),
            })
        } else {
            None
        };
        Ok(Self { plan, media, shared, joined: false, publisher, subscriber, published: HashMap::new(), unsettled })
    }

    /// After `joined`: the publish offer and/or the subscribe request.
    fn start(&mut self) -> Vec<Command> {
        let mut out = Vec::new();
        let now = Instant::now();
        if let Some(p) = self.publisher.as_mut() {
            let layers = self.media.video.len();
            let rids: Vec<&str> = media::LAYERS.iter().take(layers).map(|l| l.rid).collect();
            let video = (layers > 0).then_some(rids.as_slice());
            if let Some(sdp) = p.side.peer.publish_offer(!self.media.audio.is_empty(), video) {
                out.push(Command::Publish { sdp });
            }
            let (audio_mid, video_mid) = (p.side.peer.audio_mid, p.side.peer.video_mid);
            let name = &self.plan.name;
            let audio = &self.media.audio;
            let clip = (!audio.is_empty()).then(|| &audio[self.plan.audio_source % audio.len()]);
            if let (Some(mid), Some(clip)) = (audio_mid, clip) {
                let index = self.shared.register(name, &mid.to_string(), None, "audio", "opus");
                p.audio = Some(TxTrack::new(mid, None, index, Arc::clone(clip), Box::new(OpusPacketizer)));
            }
            if let Some(mid) = video_mid {
                for (i, clip) in self.media.video.iter().enumerate() {
                    let rid = (layers > 1).then(|| Rid::from(media::LAYERS[i].rid));
                    let rid_s = rid.map(|r| r.to_string());
                    let codec = self.media.codec.to_string();
                    let index = self.shared.register(name, &mid.to_string(), rid_s.as_deref(), "video", &codec);
                    let packetizer: Box<dyn Packetize> = match self.media.codec {
                        VideoCodec::Vp8 => Box::new(Vp8Packetizer::new(rand::random())),
                        VideoCodec::H264 => Box::new(H264Packetizer),
                    };
                    p.video.push(TxTrack::new(mid, rid, index, Arc::clone(clip), packetizer));
                }
            }
            p.side.requested_at = Some(now);
        }
        if let Some(s) = self.subscriber.as_mut() {
            s.side.requested_at = Some(now);
            out.push(Command::Subscribe);
        }
        out
    }

    fn side_mut(&mut self, role: Role) -> Option<&mut Side> {
        match role {
            Role::Publish => self.publisher.as_mut().map(|p| &mut p.side),
            Role::Subscribe => self.subscriber.as_mut().map(|s| &mut s.side),
        }
    }

    /// What the server said; returns what to tell it.
    fn on_event(&mut self, ev: Signal) -> Vec<Command> {
        let mut replies = Vec::new();
        match ev {
            Signal::Joined { streams } => {
                if !self.joined {
                    self.joined = true;
                    self.shared.live.joined.fetch_add(1, Ordering::Relaxed);
                    for s in streams {
                        self.note_stream(s);
                    }
                    replies = self.start();
                }
            }
            Signal::StreamAdded(s) => self.note_stream(s),
            Signal::Answer { sdp } => {
                if let Some(p) = self.publisher.as_mut() {
                    let answered = p.side.peer.accept_answer(&sdp);
                    if let Err(SdpError::Rejected(e)) = answered {
                        p.side.join.failed = Some(format!("answer rejected: {e}"));
                    }
                }
            }
            Signal::Offer { sdp, streams } => {
                if let Some(s) = self.subscriber.as_mut() {
                    match s.side.peer.accept_offer(&sdp) {
                        Ok(answer) => replies.push(Command::Answer { sdp: answer }),
                        Err(SdpError::Rejected(e)) => s.side.join.failed = Some(format!("offer rejected: {e}")),
                        Err(_) => {}
                    }
                    // What each of our mids carries, where the server says so outside the SDP.
                    for (mid, p) in streams {
                        s.side.peer.mids.insert(mid, (p.participant.clone(), p.stream_id.clone()));
                        self.published.insert(p.stream_id, (p.participant, p.mid));
                    }
                }
            }
            Signal::Candidate { role, candidate } => {
                if let Some(side) = self.side_mut(role) {
                    side.peer.add_remote_candidate(&candidate);
                }
            }
            Signal::Connection { role, state, at, connection_id } => {
                self.on_connection_event(role, state, at, connection_id)
            }
            Signal::Requested { role } => {
                if let Some(side) = self.side_mut(role) {
                    side.requested_at = Some(Instant::now());
                }
            }
            // A refusal about an existing connection is not a refused publish or subscribe.
            Signal::Refused { code, message, connection_id: None } => self.on_refused(&code, &message),
            Signal::Refused { .. } => {}
            Signal::Closed(_) => {}
        }
        replies
    }

    /// The server refused a request. Replies come in the order of the requests, and a refused
    /// `publish` or `subscribe` gets no connection: the refusal is the oldest such request
    /// still waiting for its connection (publish is sent first). Other refusals (of a
    /// candidate, say) find no such side and change nothing.
    fn on_refused(&mut self, code: &str, message: &str) {
        let live = &self.shared.live;
        let unsettled = Arc::clone(&self.unsettled);
        for (role, side) in [
            (Role::Publish, self.publisher.as_mut().map(|p| &mut p.side)),
            (Role::Subscribe, self.subscriber.as_mut().map(|s| &mut s.side)),
        ] {
            let Some(side) = side else { continue };
            let waiting = side.requested_at.is_some()
                && side.join.connection_id.is_none()
                && side.join.ready_ms.is_none()
                && side.join.failed.is_none();
            if waiting {
                side.join.role = role.as_str().to_owned();
                side.join.failed = Some(format!("refused: {code}: {message}"));
                live.failed.fetch_add(1, Ordering::Relaxed);
                settle(&unsettled);
                return;
            }
        }
    }

    fn note_stream(&mut self, s: Published) {
        self.published.insert(s.stream_id, (s.participant, s.mid));
    }

    fn on_connection_event(
        &mut self,
        role: Role,
        state: ConnState,
        at: Option<chrono::DateTime<chrono::FixedOffset>>,
        connection_id: Option<String>,
    ) {
        let live = &self.shared.live;
        let unsettled = Arc::clone(&self.unsettled);
        let Some(side) = self.side_mut(role) else { return };
        side.join.role = role.as_str().to_owned();
        if connection_id.is_some() {
            side.join.connection_id = connection_id;
        }
        side.last_state = state.name();
        match state {
            ConnState::Initial => side.initial_at = at,
            // READY after our own connect timeout stays a failure (`timeout`).
            ConnState::Ready if side.join.failed.is_none() => {
                settle(&unsettled);
                if let (Some(a), Some(b)) = (side.initial_at, at) {
                    side.join.ready_ms = Some((b - a).num_microseconds().unwrap_or(0) as f64 / 1000.0);
                }
                if let Some(t) = side.requested_at {
                    side.join.client_ms = Some(t.elapsed().as_secs_f64() * 1000.0);
                }
                if role == Role::Publish {
                    live.publish_ready.fetch_add(1, Ordering::Relaxed);
                } else {
                    live.subscribe_ready.fetch_add(1, Ordering::Relaxed);
                }
            }
            ConnState::Failed(reason) if side.join.ready_ms.is_some() => {
                side.join.dropped.get_or_insert(reason);
            }
            ConnState::Failed(reason) if side.join.failed.is_none() => {
                side.join.failed = Some(reason);
                live.failed.fetch_add(1, Ordering::Relaxed);
                settle(&unsettled);
            }
            _ => {}
        }
    }

    fn on_datagram(&mut self, publish: bool, now: Instant, from: SocketAddr, data: &[u8]) {
        let side = if publish {
            self.publisher.as_mut().map(|p| &mut p.side)
        } else {
            self.subscriber.as_mut().map(|s| &mut s.side)
        };
        if let Some(side) = side {
            side.input(now, from, data);
        }
        // Drain at once: in RTP mode str0m holds only one undelivered packet.
        self.drain(publish, now);
    }

    /// Drain one side's `Rtc` to its timeout: transmit, and handle events.
    fn drain(&mut self, publish: bool, now: Instant) {
        loop {
            let side = if publish {
                self.publisher.as_mut().map(|p| &mut p.side)
            } else {
                self.subscriber.as_mut().map(|s| &mut s.side)
            };
            let Some(side) = side else { return };
            if side.dead {
                return;
            }
            match side.peer.poll_output(now) {
                Ok(Out::Timeout(t)) => {
                    side.next_timeout = t;
                    return;
                }
                Ok(Out::Transmit(t)) => {
                    // A full socket buffer drops the datagram, as the network would.
                    let _ = side.socket.try_send_to(&t.contents, t.destination);
                }
                Ok(Out::Rtp(c, p)) => {
                    if let (false, Some(s)) = (publish, self.subscriber.as_mut()) {
                        s.on_rtp(self.shared, &self.published, c, &p);
                    }
                }
                Ok(Out::Event(e)) => {
                    if publish {
                        self.on_publisher_event(e, now);
                    } else {
                        self.on_subscriber_event(e);
                    }
                }
                Err(_) => {
                    side.dead = true;
                    return;
                }
            }
        }
    }

    fn on_publisher_event(&mut self, e: Event, now: Instant) {
        let Some(p) = self.publisher.as_mut() else { return };
        match e {
            Event::IceConnectionStateChange(s) => {
                p.side.ice_connected |= matches!(s, IceConnectionState::Connected | IceConnectionState::Completed);
                if s == IceConnectionState::Disconnected && p.side.join.ready_ms.is_some() {
                    p.side.join.dropped.get_or_insert_with(|| "client ICE disconnected".into());
                }
            }
            Event::Connected => {
                p.next_frame_at = (!p.video.is_empty()).then_some(now);
                p.next_audio_at = p.audio.as_ref().map(|_| now);
            }
            Event::KeyframeRequest(_) => p.keyframe_wanted = true,
            Event::MediaEgressStats(s) => {
                let key = (s.mid.to_string(), s.rid.map(|r| r.to_string()));
                p.egress.insert(key, Egress { packets: s.packets, nacks: s.nacks, plis: s.plis, firs: s.firs });
            }
            _ => {}
        }
    }

    fn on_subscriber_event(&mut self, e: Event) {
        let Some(s) = self.subscriber.as_mut() else { return };
        match e {
            Event::IceConnectionStateChange(st) => {
                s.side.ice_connected |= matches!(st, IceConnectionState::Connected | IceConnectionState::Completed);
                if st == IceConnectionState::Disconnected && s.side.join.ready_ms.is_some() {
                    s.side.join.dropped.get_or_insert_with(|| "client ICE disconnected".into());
                }
            }
            Event::MediaIngressStats(st) => {
                // Cumulative per mid; keep the latest per stream and sum at the end.
                s.nacks_by_mid.insert(st.mid, st.nacks);
                s.nacks_out = s.nacks_by_mid.values().sum();
            }
            _ => {}
        }
    }

    /// Time-driven work (media, str0m timeouts, flushes); returns when to come back.
    fn poll(&mut self, now: Instant) -> Instant {
        let mut next = now + Duration::from_millis(250);
        // Drained every time round, not only when due: SDP and candidate changes made by
        // messages want to send at once.
        if let Some(p) = self.publisher.as_mut() {
            if p.side.peer.connected && !p.side.dead {
                p.send_due(now, self.shared);
            }
        }
        if self.publisher.is_some() {
            self.drain(true, now);
        }
        if let Some(s) = self.subscriber.as_mut() {
            s.request_missing_keyframes(now);
        }
        if self.subscriber.is_some() {
            self.drain(false, now);
        }
        if let Some(s) = self.subscriber.as_mut() {
            if now.duration_since(s.last_flush) >= Duration::from_millis(250) {
                s.flush(self.shared);
            }
        }
        let timeout = self.plan.connect_timeout;
        for side in [self.publisher.as_mut().map(|p| &mut p.side), self.subscriber.as_mut().map(|s| &mut s.side)]
            .into_iter()
            .flatten()
        {
            next = next.min(side.next_timeout);
            let late = side.requested_at.is_some_and(|t| now.duration_since(t) > timeout);
            if late && side.join.ready_ms.is_none() && side.join.failed.is_none() {
                // How far it got: the gateway's state, and our ICE and DTLS (str0m issue #932:
                // ICE done but DTLS never finishing shows as `GATHERED, ICE connected`).
                let stage = match (side.last_state, side.ice_connected, side.peer.connected) {
                    (s, _, true) => format!("{s}, ICE and DTLS done here"),
                    (s, true, false) => format!("{s}, ICE connected, DTLS not done"),
                    (s, false, _) => format!("{s}, ICE not connected"),
                };
                side.join.failed = Some(format!("timeout: {stage}"));
                self.shared.live.failed.fetch_add(1, Ordering::Relaxed);
                settle(&self.unsettled);
            }
        }
        if let Some(p) = &self.publisher {
            for t in [p.next_frame_at, p.next_audio_at, p.next_paced()].into_iter().flatten() {
                next = next.min(t);
            }
        }
        next.max(now)
    }

    fn finish(mut self, report: &mut ParticipantReport) {
        if let Some(p) = self.publisher.take() {
            let mut join = p.side.join.clone();
            join.role = "publish".into();
            report.joins.push(join);
            report.keyframe_requests_in = p.side.peer.keyframe_requests as u64;
            report.forced_keyframes = p.forced_keyframes;
            for t in p.video.iter().chain(p.audio.iter()) {
                let key = (t.mid.to_string(), t.rid.map(|r| r.to_string()));
                let Egress { packets, nacks, plis, firs } = p.egress.get(&key).copied().unwrap_or_default();
                report.tx.push(TxReport {
                    stream: t.index.id,
                    kind: t.index.kind.into(),
                    rid: t.rid.map(|r| r.to_string()),
                    packets: t.written,
                    bytes: t.index.sent_bytes.load(Ordering::Relaxed),
                    nacks_in: nacks,
                    plis_in: plis,
                    firs_in: firs,
                    retransmitted: packets.saturating_sub(t.written),
                });
            }
        }
        if let Some(mut s) = self.subscriber.take() {
            s.flush(self.shared);
            let mut join = s.side.join.clone();
            join.role = "subscribe".into();
            report.joins.push(join);
            report.nacks_out = s.nacks_out;
            report.plis_out = s.plis_out;
            for (rx, m) in s.side.peer.rx.streams.iter().zip(s.streams) {
                if let Some(idx) = &m.index {
                    idx.receivers.fetch_sub(1, Ordering::Relaxed);
                    if let Ok(mut l) = idx.latencies.lock() {
                        l.extend_from_slice(&m.latencies);
                    }
                }
                report.rx.push(RxReport {
                    publisher: m.publisher.clone(),
                    stream: m.index.as_ref().map_or(usize::MAX, |i| i.id),
                    kind: if rx.kind == MediaKind::Audio { "audio".into() } else { "video".into() },
                    received: rx.received,
                    bytes: rx.bytes,
                    expected: rx.expected(),
                    lost: rx.lost(),
                    unmatched: m.unmatched,
                    jitter_ms: rx.jitter_ms(),
                    keyframes: rx.keyframes,
                    first_keyframe_ms: rx.first_keyframe_wait().map(|d| d.as_secs_f64() * 1000.0),
                    latency_ms: Percentiles::of_us_as_ms(&m.latencies),
                });
            }
        }
    }
}

impl TxTrack {
    fn new(mid: Mid, rid: Option<Rid>, index: Arc<SentIndex>, clip: Arc<Clip>, packetizer: Box<dyn Packetize>) -> Self {
        Self { mid, rid, index, clip, packetizer, seq: rand::random_range(1000..30000), ts: rand::random(), written: 0 }
    }
}

impl Publisher {
    /// The payload type to send `kind` with, as negotiated (the gateway's answer decides).
    fn pt_for(&self, kind: MediaKind, mid: Mid) -> Option<Pt> {
        let codec = if kind == MediaKind::Audio { Codec::Opus } else { self.codec.codec() };
        self.side.peer.pt_for(mid, codec)
    }

    /// Write every frame and audio packet whose time has come.
    fn send_due(&mut self, now: Instant, shared: &Shared) {
        // More than this behind (a stalled process): skip ahead rather than burst.
        const MAX_BEHIND: Duration = Duration::from_millis(200);
        if let Some(mut at) = self.next_audio_at {
            if now.duration_since(at) > MAX_BEHIND {
                at = now;
            }
            while at <= now {
                self.write_audio(now, shared);
                at += Duration::from_millis(20);
            }
            self.next_audio_at = Some(at);
        }
        if let Some(mut at) = self.next_frame_at {
            if now.duration_since(at) > MAX_BEHIND {
                at = now;
            }
            let frame_time = Duration::from_micros(
                self.video.first().map_or(33_333, |t| t.clip.frame_ticks as u64 * 1_000_000 / 90_000),
            );
            while at <= now {
                self.write_video_frame(now, shared);
                at += frame_time;
            }
            self.next_frame_at = Some(at);
        }
        while self.paced.front().is_some_and(|p| p.at <= now) {
            let Some(p) = self.paced.pop_front() else { break };
            let Some(t) = self.video.get_mut(p.track) else { continue };
            write_packet(&mut self.side.peer, t, p.pt, p.payload, p.ts, p.marker, now, shared, VIDEO);
        }
    }

    /// When the pacer's next packet is due.
    fn next_paced(&self) -> Option<Instant> {
        self.paced.front().map(|p| p.at)
    }

    /// Queue a frame's packets behind what the pacer holds, each leaving when the bucket has
    /// drained the ones before it at `pace_bps`.
    fn pace(&mut self, now: Instant, track: usize, pt: Pt, ts: u32) {
        let n = self.scratch.len();
        let mut free_at = self.pace_free_at;
        for (i, payload) in self.scratch.drain(..).enumerate() {
            let at = pace_slot(&mut free_at, now, payload.len(), self.pace_bps);
            self.paced.push_back(Paced { at, track, pt, ts, marker: i + 1 == n, payload });
        }
        self.pace_free_at = free_at;
    }

    fn write_video_frame(&mut self, now: Instant, shared: &Shared) {
        let Some(first) = self.video.first() else { return };
        let frames = first.clip.frames.len();
        // A keyframe request (at most one forced keyframe per 300 ms): jump to the clip's next
        // keyframe, as an encoder would start a new GOP. Timestamps stay continuous.
        if self.keyframe_wanted
            && self.last_forced_keyframe.is_none_or(|t| now.duration_since(t) >= Duration::from_millis(300))
        {
            self.keyframe_wanted = false;
            if !first.clip.frames[self.frame % frames].keyframe {
                self.frame = first.clip.next_keyframe(self.frame % frames);
                self.forced_keyframes += 1;
            }
            self.last_forced_keyframe = Some(now);
        }
        let frame = self.frame % frames;
        self.frame = (frame + 1) % frames;
        for i in 0..self.video.len() {
            let pt = self.pt_for(MediaKind::Video, self.video[i].mid);
            let t = &mut self.video[i];
            let Some(f) = t.clip.frames.get(frame).cloned() else { continue };
            self.scratch.clear();
            t.packetizer.packetize(&f, &mut self.scratch);
            let (ticks, ts) = (t.clip.frame_ticks, t.ts);
            t.ts = t.ts.wrapping_add(ticks);
            match pt {
                Some(pt) if self.pace_bps > 0 => self.pace(now, i, pt, ts),
                Some(pt) => write_packets(&mut self.side.peer, t, pt, &self.scratch, now, shared, VIDEO),
                None => {}
            }
        }
    }

    fn write_audio(&mut self, now: Instant, shared: &Shared) {
        let Some(mid) = self.audio.as_ref().map(|a| a.mid) else { return };
        let pt = self.pt_for(MediaKind::Audio, mid);
        let Some(t) = self.audio.as_mut() else { return };
        let frames = t.clip.frames.len();
        let f = &t.clip.frames[self.audio_frame % frames];
        let level = t.clip.levels.get(self.audio_frame % t.clip.levels.len().max(1)).copied();
        self.audio_frame = (self.audio_frame + 1) % frames;
        self.scratch.clear();
        let f = f.clone();
        t.packetizer.packetize(&f, &mut self.scratch);
        if let Some(pt) = pt {
            let mut ext = ExtensionValues::default();
            if let Some(level) = level {
                // RFC 6464: −dBov (str0m takes it negated) and voice activity.
                ext.audio_level = Some(-(level.min(127) as i8));
                ext.voice_activity = Some(level < 127);
            }
            write_packets(&mut self.side.peer, t, pt, &self.scratch, now, shared, ext);
        }
        t.ts = t.ts.wrapping_add(960);
    }
}

/// A leaky bucket at `bps`: when a packet of `len` bytes queued at `now` leaves (at once if the
/// bucket is free, else when the packets before it have drained), and the bucket's next free
/// instant moved past it.
fn pace_slot(free_at: &mut Option<Instant>, now: Instant, len: usize, bps: u64) -> Instant {
    let at = free_at.unwrap_or(now).max(now);
    *free_at = Some(at + Duration::from_nanos(len as u64 * 8 * 1_000_000_000 / bps.max(1)));
    at
}

/// Marks a video frame's packets for [`write_packets`] (audio carries its level instead).
const VIDEO: Option<ExtensionValues> = None;

/// Write one frame's payloads on a track (video: `ext` is `None`; audio: its header extension
/// values); record each payload's hash and send instant first.
fn write_packets(
    peer: &mut test_peer::Peer,
    t: &mut TxTrack,
    pt: Pt,
    payloads: &[Vec<u8>],
    now: Instant,
    shared: &Shared,
    ext: impl Into<Option<ExtensionValues>>,
) {
    let ext = ext.into();
    let n = payloads.len();
    let ts = t.ts;
    for (i, p) in payloads.iter().enumerate() {
        if !write_packet(peer, t, pt, p.clone(), ts, i + 1 == n, now, shared, ext.clone()) {
            return;
        }
    }
    // The caller drains the `Rtc` right after: str0m queues the writes and, with no pacer (no
    // BWE), sends them all on that drain.
}

/// Write one packet (`marker`: the last of a video frame); false without a send stream.
#[allow(clippy::too_many_arguments)]
fn write_packet(
    peer: &mut test_peer::Peer,
    t: &mut TxTrack,
    pt: Pt,
    p: Vec<u8>,
    ts: u32,
    marker: bool,
    now: Instant,
    shared: &Shared,
    ext: Option<ExtensionValues>,
) -> bool {
    let video = ext.is_none();
    let mut api = peer.rtc.direct_api();
    let Some(tx) = api.stream_tx_by_mid(t.mid, t.rid) else { return false };
    let len = p.len();
    t.index.record(payload_hash(&p), Instant::now(), len);
    let mut w = RtpWrite::new(pt, t.seq.into(), ts, now, p).marker(video && marker).nackable(video);
    if let Some(ext) = ext {
        w = w.ext_vals(ext);
    }
    tx.write_rtp(w);
    t.seq += 1;
    t.written += 1;
    shared.live.tx_packets.fetch_add(1, Ordering::Relaxed);
    shared.live.tx_bytes.fetch_add(len as u64, Ordering::Relaxed);
    true
}

impl Subscriber {
    /// A packet the peer has classified and counted: match it to what its publisher sent.
    fn on_rtp(&mut self, shared: &Shared, published: &HashMap<String, (String, String)>, c: Classified, p: &RtpPacket) {
        let Some(idx) = c.stream else { return };
        // A stream new to us: whose it is, by our mid's msid and the published streams.
        while self.streams.len() <= idx {
            let mid = self.side.peer.rx.streams[self.streams.len()].mid;
            let (publisher, pub_mid) = self
                .side
                .peer
                .mids
                .get(&mid.to_string())
                .and_then(|(_, stream_id)| published.get(stream_id).cloned())
                .unwrap_or_default();
            self.streams.push(RxMatch {
                index: None,
                publisher,
                mid: pub_mid,
                unmatched: 0,
                last_pli: None,
                latencies: Vec::new(),
            });
        }
        let arrived = p.timestamp;
        let rx = &mut self.streams[idx];
        shared.live.rx_packets.fetch_add(1, Ordering::Relaxed);
        shared.live.rx_bytes.fetch_add(p.payload.len() as u64, Ordering::Relaxed);
        // Which publisher stream (simulcast: which layer) sent this payload, and when.
        let hash = payload_hash(&p.payload);
        if rx.index.is_none() && !rx.publisher.is_empty() {
            for layer in shared.layers(&rx.publisher, &rx.mid) {
                if layer.lookup(hash, arrived).is_some() {
                    layer.receivers.fetch_add(1, Ordering::Relaxed);
                    rx.index = Some(layer);
                    break;
                }
            }
        }
        match rx.index.as_ref().and_then(|i| i.lookup(hash, arrived)) {
            Some(sent) => {
                let us = arrived.saturating_duration_since(sent).as_micros().min(u32::MAX as u128) as u32;
                rx.latencies.push(us);
                self.pending_latency.push((shared.second_of(arrived) as u32, us));
            }
            None => {
                rx.unmatched += 1;
                shared.live.unmatched.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A decoder that has packets but no keyframe asks for one, once a second.
    fn request_missing_keyframes(&mut self, now: Instant) {
        for i in 0..self.streams.len() {
            let rx = &self.side.peer.rx.streams[i];
            let waiting = rx.kind == MediaKind::Video && rx.first_key.is_none();
            let since = self.streams[i].last_pli.or(rx.first_rx);
            if !waiting || since.is_none_or(|t| now.duration_since(t) < Duration::from_secs(1)) {
                continue;
            }
            if self.side.peer.request_keyframe_on(i) {
                self.plis_out += 1;
            }
            self.streams[i].last_pli = Some(now);
        }
    }

    fn flush(&mut self, shared: &Shared) {
        self.last_flush = Instant::now();
        if !self.pending_latency.is_empty() {
            shared.add_latencies(&self.pending_latency);
            self.pending_latency.clear();
        }
    }
}

/// One connection of this participant settled (READY or failed).
fn settle(unsettled: &AtomicU64) {
    let _ = unsettled.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacer_spreads_a_frame_and_queues_the_next_behind_it() {
        let t0 = Instant::now();
        // 1.5 Mbit/s video paced at 2.5x: 3.75 Mbit/s, a 1,200-byte packet every 2.56 ms.
        let bps = 3_750_000;
        let mut free = None;
        let frame: Vec<Instant> = (0..5).map(|_| pace_slot(&mut free, t0, 1200, bps)).collect();
        assert_eq!(frame[0], t0, "an idle pacer sends at once");
        for w in frame.windows(2) {
            assert_eq!(w[1] - w[0], Duration::from_micros(2560));
        }
        // The next frame, 1 ms later, waits for the first one to drain.
        let next = pace_slot(&mut free, t0 + Duration::from_millis(1), 1200, bps);
        assert_eq!(next, t0 + Duration::from_micros(5 * 2560));
        // Long after, the bucket is free again: no credit builds up for a burst.
        let late = t0 + Duration::from_secs(1);
        assert_eq!(pace_slot(&mut free, late, 1200, bps), late);
        assert_eq!(pace_slot(&mut free, late, 1200, bps), late + Duration::from_micros(2560));
    }
}
