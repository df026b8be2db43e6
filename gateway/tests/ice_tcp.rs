//! ICE-TCP (`media.tcp_port`, RFC 6544 passive candidates, RFC 4571 framing) through a real
//! gateway on loopback, with str0m test peers whose only candidate is an active TCP one: a TCP
//! publisher reaches READY and its media reaches a TCP subscriber and a UDP subscriber; the
//! connection's stats show the TCP pair. Then the TCP port is abused — garbage, a stream naming
//! an unknown ufrag, oversized frames (first and after binding), a stream that says nothing, one
//! its client closes mid-frame, a frame that is not STUN/DTLS/RTP on a bound stream — each stream
//! is closed and counted in `/metrics`, one host holding more than 16 streams without a first frame
//! is refused beyond them, a stream bound by a forged check floods RTP-shaped frames for 2 s (each
//! dropped as unauthenticated) — and every call keeps its media flowing.
//!
//! Ports: ICE-TCP 50250 with UDP media 50260-50299, and 50251 with `media.mux` on 50256-50257.

mod common;

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use str0m::format::Codec;
use str0m::ice::{StunMessage, TransId};
use str0m::media::MediaKind;
use str0m::rtp::RtpWrite;
use str0m::Event;
use test_peer::vp8::{self, Descriptor};
use test_peer::{Out, PeerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// What a TCP peer has seen.
#[derive(Default)]
struct TcpLog {
    messages: Vec<Value>,
    connected: bool,
    /// Video RTP payloads received.
    video: Vec<Vec<u8>>,
    /// Our connection's first SDP from the gateway (answer or offer).
    remote_sdp: Option<String>,
    /// TCP streams we opened, by the gateway address they go to.
    streams: Vec<SocketAddr>,
}

/// A participant whose one connection runs over ICE-TCP: a str0m peer with an active TCP host
/// candidate, signaling over the WebSocket, one RFC 4571-framed stream per gateway address.
struct TcpPeer {
    log: Arc<Mutex<TcpLog>>,
}

impl TcpPeer {
    async fn join(api: &Api, room: &str, name: &str, publish: bool) -> TcpPeer {
        let token = api.token(room, name).await;
        let (ws, _) = tokio_tungstenite::connect_async(api.ws_url(&token)).await.expect("ws connects");
        let log = Arc::new(Mutex::new(TcpLog::default()));
        tokio::spawn(run_tcp_peer(name.to_owned(), ws, publish, Arc::clone(&log)));
        TcpPeer { log }
    }

    fn with<R>(&self, f: impl FnOnce(&TcpLog) -> R) -> R {
        f(&self.log.lock().unwrap())
    }

    fn connection_id(&self) -> Option<String> {
        self.with(|l| {
            l.messages
                .iter()
                .find(|m| m["type"] == "connection_event")
                .map(|m| m["connection_id"].as_str().unwrap().to_owned())
        })
    }

    fn events(&self, event: &str) -> usize {
        self.with(|l| l.messages.iter().filter(|m| m["type"] == "connection_event" && m["event"] == event).count())
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn run_tcp_peer(name: String, ws: Ws, publish: bool, log: Arc<Mutex<TcpLog>>) {
    // RFC 6544: an active candidate's port is 9 (it connects, nothing connects to it).
    let local: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let cfg = PeerConfig { tcp: true, ..PeerConfig::default() };
    let mut peer = test_peer::Peer::new(Instant::now(), local, &cfg).expect("peer");
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (frames_tx, mut frames_rx) = mpsc::unbounded_channel::<(SocketAddr, Vec<u8>)>();
    let mut streams: HashMap<SocketAddr, OwnedWriteHalf> = HashMap::new();
    let first = if publish {
        json!({ "type": "publish", "sdp": peer.publish_offer(true, Some(&[])).expect("offer") })
    } else {
        json!({ "type": "subscribe" })
    };
    ws_tx.send(Message::Text(first.to_string().into())).await.unwrap();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let (mut n, mut keyframe_owed) = (0u64, true);
    loop {
        let timeout = loop {
            match peer.poll_output(Instant::now()) {
                Ok(Out::Timeout(t)) => break t,
                Ok(Out::Transmit(t)) => {
                    let w = match streams.entry(t.destination) {
                        Entry::Occupied(e) => e.into_mut(),
                        Entry::Vacant(e) => {
                            let Ok(s) = TcpStream::connect(t.destination).await else { continue };
                            let _ = s.set_nodelay(true);
                            let (r, w) = s.into_split();
                            tokio::spawn(read_frames(r, t.destination, frames_tx.clone()));
                            log.lock().unwrap().streams.push(t.destination);
                            e.insert(w)
                        }
                    };
                    let mut framed = (t.contents.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&t.contents);
                    if w.write_all(&framed).await.is_err() {
                        streams.remove(&t.destination);
                    }
                }
                Ok(Out::Rtp(c, p)) => {
                    if c.kind == MediaKind::Video {
                        log.lock().unwrap().video.push(p.payload.to_vec());
                    }
                }
                Ok(Out::Event(Event::Connected)) => log.lock().unwrap().connected = true,
                Ok(Out::Event(Event::KeyframeRequest(_))) => keyframe_owed = true,
                Ok(Out::Event(_)) => {}
                Err(_) => break Instant::now() + Duration::from_millis(20),
            }
        };
        let wait = timeout.saturating_duration_since(Instant::now()).min(Duration::from_millis(50));
        tokio::select! {
            Some((from, data)) = frames_rx.recv() => {
                let _ = peer.handle_datagram(Instant::now(), from, &data);
            }
            m = ws_rx.next() => {
                let Some(Ok(Message::Text(t))) = m else {
                    if matches!(m, Some(Ok(_))) { continue }
                    return;
                };
                let v: Value = serde_json::from_str(&t).unwrap();
                match v["type"].as_str() {
                    Some("answer") => {
                        let sdp = v["sdp"].as_str().unwrap();
                        log.lock().unwrap().remote_sdp.get_or_insert_with(|| sdp.to_owned());
                        peer.accept_answer(sdp).expect("the gateway's answer is acceptable");
                    }
                    Some("offer") => {
                        let sdp = v["sdp"].as_str().unwrap();
                        log.lock().unwrap().remote_sdp.get_or_insert_with(|| sdp.to_owned());
                        let answer = peer.accept_offer(sdp).expect("the gateway's offer is acceptable");
                        let reply = json!({ "type": "answer", "connection_id": v["connection_id"], "sdp": answer });
                        let _ = ws_tx.send(Message::Text(reply.to_string().into())).await;
                    }
                    Some("candidate") => {
                        peer.add_remote_candidate(v["candidate"].as_str().unwrap());
                    }
                    _ => {}
                }
                log.lock().unwrap().messages.push(v);
            }
            _ = tick.tick(), if publish && peer.connected => {
                // One VP8-shaped video packet (a keyframe first and when asked) and one audio packet.
                n += 1;
                let now = Instant::now();
                for (kind, mid) in [(MediaKind::Video, peer.video_mid), (MediaKind::Audio, peer.audio_mid)] {
                    let Some(mid) = mid else { continue };
                    let codec = if kind == MediaKind::Video { Codec::Vp8 } else { Codec::Opus };
                    let Some(pt) = peer.pt_for(mid, codec) else { continue };
                    let mut payload = Vec::new();
                    if kind == MediaKind::Video {
                        vp8::push_synthetic_header(&mut payload, true, Descriptor::Plain, std::mem::take(&mut keyframe_owed));
                    }
                    payload.extend_from_slice(format!("{name}-{kind:?}-{n}-").as_bytes());
                    payload.resize(if kind == MediaKind::Video { 900 } else { 120 }, 7);
                    let clock = if kind == MediaKind::Video { 90 } else { 48 };
                    let write = RtpWrite::new(pt, (1000 + n).into(), (n * 20 * clock) as u32, now, payload).marker(true);
                    peer.write_rtp(mid, None, write.nackable(true));
                }
            }
            _ = tokio::time::sleep(wait) => {
                let _ = peer.handle_timeout(Instant::now());
            }
        }
    }
}

/// Frames of one stream into the peer, until it closes.
async fn read_frames(
    mut r: tokio::net::tcp::OwnedReadHalf,
    from: SocketAddr,
    tx: mpsc::UnboundedSender<(SocketAddr, Vec<u8>)>,
) {
    loop {
        let mut len = [0u8; 2];
        if r.read_exact(&mut len).await.is_err() {
            return;
        }
        let mut frame = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if r.read_exact(&mut frame).await.is_err() || tx.send((from, frame)).is_err() {
            return;
        }
    }
}

/// A STUN Binding request as a client's first check would be, naming `ufrag` as ours (its
/// integrity is not valid: no password is known here), RFC 4571-framed.
fn framed_binding_request(ufrag: &str) -> Vec<u8> {
    let username = format!("{ufrag}:abcd");
    let msg = StunMessage::binding_request(&username, TransId::new(), true, 7, 1_000, false);
    let mut buf = vec![0u8; 512];
    let n = msg.to_bytes(Some(b"not-the-password"), &mut buf, |_, _| [0u8; 20]).unwrap();
    let mut framed = (n as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&buf[..n]);
    framed
}

/// The gateway closes the stream (EOF or reset) within `secs`; whatever it sent first is ignored.
async fn closed_by_gateway(s: &mut TcpStream, secs: u64) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// Streams the gateway dropped for `reason`, or (`abandoned`) that their client closed first.
async fn dropped(api: &Api, reason: &str) -> f64 {
    if reason == "abandoned" {
        return api.metric("gateway_ice_tcp_streams_total{result=\"abandoned\"}").await;
    }
    api.metric(&format!("gateway_ice_tcp_streams_dropped_total{{reason=\"{reason}\"}}")).await
}

fn ufrag_of(sdp: &str) -> String {
    sdp.lines().find_map(|l| l.strip_prefix("a=ice-ufrag:")).expect("ufrag").trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ice_tcp_calls_connect_and_abuse_of_the_port_is_dropped_and_counted() {
    ice_tcp(50250, 50260, 50299, false).await;
}

/// The same beside `media.mux` (UDP on one port per worker, 50256-50257).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ice_tcp_beside_one_udp_port_per_worker() {
    ice_tcp(50251, 50256, 50257, true).await;
}

async fn ice_tcp(tcp_port: u16, port_min: u16, port_max: u16, mux: bool) {
    let gw = start_gateway_with(port_min, port_max, |c| {
        c.media.tcp_port = tcp_port;
        c.media.mux = mux;
    })
    .await;
    let api = Api::new(gw.base_url());
    let tcp_addr: SocketAddr = format!("127.0.0.1:{tcp_port}").parse().unwrap();

    // A stream that never says anything: closed after the first-frame timeout (5 s), counted;
    // opened first so its wait overlaps the rest of the test.
    let mut silent = TcpStream::connect(tcp_addr).await.unwrap();

    // A TCP publisher, a TCP subscriber and a UDP subscriber in one room.
    let room = api.create_room(&format!("ice-tcp-{tcp_port}")).await;
    let started = Instant::now();
    let publisher = TcpPeer::join(&api, &room, "tcp-pub", true).await;
    eventually("the TCP publisher READY", 10, || publisher.events("READY") == 1 && publisher.with(|l| l.connected))
        .await;
    let publish_ready = started.elapsed();
    let answer = publisher.with(|l| l.remote_sdp.clone()).unwrap();
    // The answer carries the passive TCP candidate after the UDP one, at a lower priority.
    let candidates: Vec<&str> = answer.lines().filter(|l| l.starts_with("a=candidate:")).collect();
    assert_eq!(candidates.len(), 2, "one UDP and one TCP candidate:\n{answer}");
    let prio = |c: &str| c.split_whitespace().nth(3).unwrap().parse::<u32>().unwrap();
    assert!(candidates[0].contains(" udp ") && candidates[1].contains(" tcp "), "{candidates:?}");
    assert!(candidates[1].contains(&format!("127.0.0.1 {tcp_port} typ host tcptype passive")), "{candidates:?}");
    assert!(prio(candidates[1]) < prio(candidates[0]), "TCP below UDP: {candidates:?}");
    assert_eq!(publisher.with(|l| l.streams.clone()), [tcp_addr], "the publisher used the TCP candidate only");

    let tcp_sub = TcpPeer::join(&api, &room, "tcp-sub", false).await;
    let udp_sub = Peer::join(&api, &room, "udp-sub").await;
    udp_sub.subscribe();
    eventually("the TCP subscriber READY", 10, || tcp_sub.events("READY") == 1 && tcp_sub.with(|l| l.connected)).await;
    udp_sub.wait("the UDP subscriber READY", 10, |l| l.connected).await;
    // The subscriber's candidates were trickled (UDP, then TCP) after its answer.
    let trickled: Vec<String> = tcp_sub.with(|l| {
        l.messages
            .iter()
            .filter(|m| m["type"] == "candidate")
            .map(|m| m["candidate"].as_str().unwrap().to_owned())
            .collect()
    });
    assert_eq!(trickled.len(), 2, "{trickled:?}");
    assert!(
        trickled[0].contains(" udp ") && trickled[1].contains(" tcp ") && trickled[1].contains("tcptype passive"),
        "{trickled:?}"
    );

    let from_pub =
        |payloads: Vec<Vec<u8>>| payloads.iter().filter(|p| p.windows(13).any(|w| w == b"tcp-pub-Video")).count();
    let udp_video = || {
        udp_sub
            .with(|l| from_pub(l.rtp.iter().filter(|(k, _)| *k == MediaKind::Video).map(|(_, p)| p.clone()).collect()))
    };
    let tcp_video = || tcp_sub.with(|l| from_pub(l.video.clone()));
    eventually("the publisher's video at both subscribers", 10, || udp_video() >= 20 && tcp_video() >= 20).await;

    // The gateway's view of the TCP connections: the nominated pair is TCP, to our passive candidate.
    for (who, id) in [("publish", publisher.connection_id().unwrap()), ("subscribe", tcp_sub.connection_id().unwrap())]
    {
        let pair = poll_until(&format!("{who}: selected pair"), 5, || {
            let (api, id) = (&api, id.clone());
            async move {
                let (s, b) = api.call("GET", &format!("/v1/connections/{id}"), None).await;
                let pair = b["stats"]["selected_pair"].clone();
                if s == 200 && pair.is_object() {
                    Ok(pair)
                } else {
                    Err(b.to_string())
                }
            }
        })
        .await;
        assert_eq!(pair["protocol"], "tcp", "{who}: {pair}");
        assert_eq!(pair["local_type"], "host", "{who}: {pair}");
        assert_eq!(pair["tcptype"], "passive", "{who}: {pair}");
        assert_eq!(pair["local"], tcp_addr.to_string(), "{who}: {pair}");
    }
    assert_eq!(api.metric("gateway_ice_tcp_streams_total{result=\"bound\"}").await, 2.0);
    assert_eq!(api.metric("gateway_ice_tcp_streams_open").await, 2.0);

    // Abuse. Each case: the stream is closed by the gateway and counted under its reason.
    let live_ufrag = ufrag_of(&answer);
    let mut cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("garbage", "a first frame that is not STUN", [&[0u8, 5][..], b"hello"].concat()),
        // "GE" reads as an 18245-byte length: refused before a byte of the frame is read.
        ("oversized", "HTTP on the port", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        ("unknown_ufrag", "a Binding request naming no connection", framed_binding_request("nosuchufrag")),
        ("abandoned", "half a frame, then the client closes", vec![0, 40, 0, 1]),
    ];
    // Bound to the live publisher by a (forged) first check, then misbehaving.
    let forged = framed_binding_request(&live_ufrag);
    cases.push((
        "oversized",
        "a bound stream sending a 4000-byte frame",
        [&forged[..], &[0x0f, 0xa0], &[0x80; 100]].concat(),
    ));
    cases.push((
        "garbage",
        "a bound stream sending a frame that is not STUN, DTLS or RTP",
        [&forged[..], &[0, 3, 0x40, 1, 2]].concat(),
    ));
    for (reason, what, bytes) in &cases {
        let before = dropped(&api, reason).await;
        let mut s = TcpStream::connect(tcp_addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        if *reason == "abandoned" {
            s.shutdown().await.unwrap();
        }
        assert!(closed_by_gateway(&mut s, 3).await, "{what}: the gateway closes the stream");
        poll_until(&format!("{what}: counted as {reason}"), 3, || {
            let api = &api;
            async move {
                let now = dropped(api, reason).await;
                if now == before + 1.0 {
                    Ok(())
                } else {
                    Err(format!("{before} → {now}"))
                }
            }
        })
        .await;
    }
    // One host holding streams open without a first frame: beyond 16 waiting from its address,
    // the next is closed at once (overload); other addresses still get through.
    let from = |ip: &str| {
        let (ip, to) = (ip.to_owned(), tcp_addr);
        async move {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
            s.connect(to).await.unwrap()
        }
    };
    let before = dropped(&api, "overload").await;
    let mut holders = Vec::new();
    for _ in 0..16 {
        holders.push(from("127.0.0.2").await);
    }
    let mut one_too_many = from("127.0.0.2").await;
    assert!(closed_by_gateway(&mut one_too_many, 3).await, "the 17th stream waiting from one address is closed");
    assert_eq!(dropped(&api, "overload").await, before + 1.0);
    let mut elsewhere = from("127.0.0.3").await;
    elsewhere.write_all(&framed_binding_request("nosuchufrag")).await.unwrap();
    assert!(closed_by_gateway(&mut elsewhere, 3).await);
    assert_eq!(dropped(&api, "overload").await, before + 1.0, "another address is not refused");
    drop(holders);

    // The silent stream went at its first-frame timeout.
    assert!(closed_by_gateway(&mut silent, 6).await, "a silent stream is closed");
    assert_eq!(dropped(&api, "timeout").await, 1.0);

    // A flood on a stream bound to the live publisher's connection (a forged check, then
    // RTP-shaped frames as fast as loopback takes them, 2 s): its frames are dropped as from an
    // unauthenticated source, and the worker keeps serving the call beside it.
    let untrusted = "gateway_dropped_datagrams_total{reason=\"untrusted_source\"}";
    let untrusted_before = api.metric(untrusted).await;
    let mut flood = TcpStream::connect(tcp_addr).await.unwrap();
    flood.write_all(&forged).await.unwrap();
    let (u, t) = (udp_video(), tcp_video());
    let flooding = tokio::spawn(async move {
        let mut frame = vec![0x80u8; 1202];
        frame[..2].copy_from_slice(&1200u16.to_be_bytes());
        let chunk = frame.repeat(50);
        let (until, mut sent) = (Instant::now() + Duration::from_secs(2), 0u64);
        while Instant::now() < until && flood.write_all(&chunk).await.is_ok() {
            sent += 50;
        }
        sent
    });
    let sent = flooding.await.unwrap();
    let (du, dt) = (udp_video() - u, tcp_video() - t);
    let refused = api.metric(untrusted).await - untrusted_before;
    eprintln!("ICE-TCP flood (mux {mux}): {sent} frames written in 2 s, {refused} dropped as untrusted so far; the subscribers got {du} (UDP) and {dt} (TCP) video packets meanwhile (~100 sent)");
    assert!(refused > 0.0, "the flood's frames reached the connection and were refused");
    assert!(du >= 60 && dt >= 60, "the call kept flowing during the flood: {du} / {dt} of ~100");

    // Every call is unaffected: still READY, no FAILED, and video keeps coming to both
    // subscribers. The forged streams never reached the publisher's connection.
    let (u, t) = (udp_video(), tcp_video());
    eventually("more video at both subscribers after the abuse", 10, || udp_video() >= u + 25 && tcp_video() >= t + 25)
        .await;
    for p in [&publisher, &tcp_sub] {
        assert_eq!(p.events("FAILED"), 0);
    }
    assert!(udp_sub.with(|l| l.events("FAILED").is_empty()));
    assert_eq!(api.metric("gateway_ice_tcp_streams_open").await, 2.0, "only the two real streams stay open");
    eprintln!(
        "ICE-TCP (mux {mux}): publish READY {} ms after joining; {} cases of abuse dropped and counted; accepted streams {}",
        publish_ready.as_millis(),
        cases.len() + 1,
        api.metric("gateway_ice_tcp_streams_total{result=\"accepted\"}").await
    );
    gw.shutdown(Duration::from_secs(2)).await;
}
