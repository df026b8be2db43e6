//! Bad input against a real gateway: each gets the contract's error shape, the server stays up,
//! nothing leaks, and a connection that was created ends FAILED with a reason.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use str0m::media::MediaKind;
use tokio_tungstenite::tungstenite::Message;

/// A raw WebSocket client for sending arbitrary text.
struct RawWs {
    ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
}

impl RawWs {
    async fn connect(api: &Api, token: &str) -> RawWs {
        let (ws, _) = tokio_tungstenite::connect_async(api.ws_url(token)).await.expect("upgrade");
        let mut r = RawWs { ws };
        let joined = r.next_of("joined").await;
        assert!(joined["participant_id"].is_string());
        r
    }
    async fn send(&mut self, text: &str) {
        self.ws.send(Message::Text(text.to_owned().into())).await.unwrap();
    }
    async fn next_of(&mut self, t: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let m =
                tokio::time::timeout_at(deadline, self.ws.next()).await.unwrap_or_else(|_| panic!("no {t} message"));
            if let Some(Ok(Message::Text(s))) = m {
                let v: Value = serde_json::from_str(&s).unwrap();
                if v["type"] == t {
                    return v;
                }
            }
        }
    }
}

const NO_USABLE_CODEC: &str = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 18\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendonly\r\na=rtcp-mux\r\n\
a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\n\
a=fingerprint:sha-256 00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF\r\n\
a=setup:actpass\r\na=rtpmap:18 G729/8000\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_bad_input_gets_errors_and_leaks_nothing() {
    let gw = start_gateway(44100, 44119).await;
    let total = gw.ports.total();
    let api = Api::new(gw.base_url());
    let room = api.create_room("bad-ws").await;
    let token = api.token(&room, "mallory").await;
    let mut ws = RawWs::connect(&api, &token).await;

    // Malformed JSON and unknown types.
    ws.send("{not json").await;
    let e = ws.next_of("error").await;
    assert_eq!(e["code"], "bad_request");
    ws.send(r#"{"type":"teleport"}"#).await;
    assert_eq!(ws.next_of("error").await["code"], "bad_request");

    // An offer that is not SDP: the connection is created, then FAILED with a reason.
    ws.send(&json!({ "type": "publish", "sdp": "hello" }).to_string()).await;
    let e = ws.next_of("error").await;
    assert_eq!(e["code"], "bad_sdp");
    let conn = e["connection_id"].as_str().expect("error names the connection").to_owned();
    let (s, d) = api.call("GET", &format!("/v1/connections/{conn}"), None).await;
    assert_eq!(s, 200);
    assert_eq!(d["state"], "FAILED");
    assert_eq!(d["code"], 500);
    let reason = d["events"].as_array().unwrap().last().unwrap()["reason"].as_str().unwrap().to_owned();
    assert!(reason.starts_with("bad_sdp"), "{reason}");

    // A well-formed SDP with no codec we can use.
    ws.send(&json!({ "type": "publish", "sdp": NO_USABLE_CODEC }).to_string()).await;
    let e = ws.next_of("error").await;
    assert_eq!(e["code"], "bad_sdp", "{e}");

    // Unknown connection ids (and another participant's) are not_found.
    ws.send(&json!({ "type": "answer", "connection_id": "c_nope", "sdp": "v=0" }).to_string()).await;
    let e = ws.next_of("error").await;
    assert_eq!(e["code"], "not_found");
    ws.send(&json!({ "type": "candidate", "connection_id": conn, "candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host", "sdpMid": "0", "sdpMLineIndex": 0 }).to_string()).await;
    assert_eq!(ws.next_of("error").await["code"], "not_found", "a FAILED connection is gone from the media plane");

    // Too many media sections are refused before any parsing.
    let many = format!("v=0\r\n{}", "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n".repeat(17));
    ws.send(&json!({ "type": "publish", "sdp": many }).to_string()).await;
    let e = ws.next_of("error").await;
    assert_eq!(e["code"], "bad_sdp");
    assert!(e["message"].as_str().unwrap().contains("media sections"), "{e}");

    // The session still works: a subscribe succeeds.
    ws.send(r#"{"type":"subscribe"}"#).await;
    let offer = ws.next_of("offer").await;
    assert!(offer["sdp"].as_str().unwrap().starts_with("v=0"));
    let sub_conn = offer["connection_id"].as_str().unwrap().to_owned();

    // mDNS candidates (Chrome's default) are ignored silently; a malformed one is an error.
    let mdns = "candidate:1 1 udp 2113937151 6f1e2a3b-1c2d-4e5f-8a9b-0c1d2e3f4a5b.local 54321 typ host";
    ws.send(&json!({ "type": "candidate", "connection_id": sub_conn, "candidate": mdns, "sdpMid": "0", "sdpMLineIndex": 0 }).to_string()).await;
    ws.send(&json!({ "type": "candidate", "connection_id": sub_conn, "candidate": "candidate:garbage", "sdpMid": "0", "sdpMLineIndex": 0 }).to_string()).await;
    let e = ws.next_of("error").await;
    assert_eq!(e["code"], "bad_request");
    assert!(e["message"].as_str().unwrap().contains("candidate"), "the error is the malformed one's: {e}");

    let failed = api.metric(r#"gateway_connection_failures_total{reason="bad_sdp",role="publish"}"#).await;
    assert_eq!(failed, 3.0, "three rejected offers counted by reason");

    // Nothing leaked: failed connections released their ports (one is held by the subscribe;
    // in single-port mode no connection holds a port of its own).
    let held = usize::from(!mux_mode());
    eventually("ports back", 5, || gw.ports.free() == total - held).await;
    let (_, h) = api.call("GET", "/healthz", None).await;
    assert_eq!(h["status"], "ok");
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_api_keys_are_enforced() {
    let gw = start_gateway(44120, 44129).await;
    let api = Api::new(gw.base_url());
    let room = api.create_room("auth-room").await;
    let client = reqwest::Client::new();

    // Missing and wrong API key.
    let r = client.get(format!("{}/v1/rooms", api.base)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "unauthorized");
    let r = client.get(format!("{}/v1/rooms", api.base)).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(r.status(), 401);

    // Forged, expired and missing tokens are refused at the upgrade with 401 and the error body.
    let good = api.token(&room, "alice").await;
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    parts[2] = "AAAA".repeat(10);
    let forged = parts.join(".");
    let (_, b) =
        api.call("POST", &format!("/v1/rooms/{room}/tokens"), Some(json!({ "participant": "eve", "ttl_s": 1 }))).await;
    let expiring = b["token"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for (token, why) in [(forged.as_str(), "signature"), (expiring.as_str(), "expired"), ("", "missing")] {
        let r = client.get(api.ws_url(token).replacen("ws", "http", 1)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{why}");
        let b: Value = r.json().await.unwrap();
        assert_eq!(b["error"]["code"], "unauthorized", "{why}");
        assert!(b["error"]["message"].as_str().unwrap().contains(why), "{why}: {b}");
        match tokio_tungstenite::connect_async(api.ws_url(token)).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
            other => panic!("{why}: upgrade must be refused, got {other:?}"),
        }
    }

    // A subscribe-only token cannot publish.
    let (_, b) = api
        .call(
            "POST",
            &format!("/v1/rooms/{room}/tokens"),
            Some(json!({ "participant": "viewer", "can_publish": false })),
        )
        .await;
    let mut ws = RawWs::connect(&api, b["token"].as_str().unwrap()).await;
    ws.send(&json!({ "type": "publish", "sdp": NO_USABLE_CODEC }).to_string()).await;
    assert_eq!(ws.next_of("error").await["code"], "forbidden");

    // A token for a deleted room is not_found at the upgrade.
    let (s, _) = api.call("DELETE", &format!("/v1/rooms/{room}"), None).await;
    assert_eq!(s, 204);
    let r = client.get(api.ws_url(&good).replacen("ws", "http", 1)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_udp_does_not_disturb_a_call() {
    let gw = start_gateway(44130, 44139).await;
    let api = Api::new(gw.base_url());
    let room = api.create_room("garbage").await;
    let (publisher, mut subs) = call(&api, &room, &["sub"]).await;
    let sub = subs.remove(0);

    // Every gateway port of this range gets garbage shaped as STUN, DTLS, RTP and random bytes
    // from a stranger while the call runs.
    let stranger = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = done.clone();
    let flood = tokio::spawn(async move {
        let shapes: [&[u8]; 4] = [
            &[0u8, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42],
            &[22u8, 254, 253, 0, 0, 0, 0, 0, 0, 0, 1],
            &[0x80u8, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 9, 9],
            &[0xffu8; 64],
        ];
        // Bounded: until the call's media is through, at most 200,000 datagrams.
        let (t0, mut sent) = (std::time::Instant::now(), 0u64);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) && sent < 200_000 {
            for port in 44130..=44139u16 {
                let _ = stranger.send_to(shapes[(sent % 4) as usize], ("127.0.0.1", port)).await;
                sent += 1;
            }
            if sent % 2000 == 0 {
                tokio::task::yield_now().await;
            }
        }
        (sent, t0.elapsed())
    });
    publisher.send_media(100);
    sub.wait("all media", 15, |l| l.rtp.iter().filter(|(k, _)| *k == MediaKind::Video).count() >= 100).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (flooded, took) = flood.await.unwrap();
    let got = sub.with(|l| l.rtp.iter().filter(|(k, _)| *k == MediaKind::Video).count());
    println!(
        "flood: {flooded} datagrams in {took:?} ({:.0}/s) at the call's and 8 idle ports; the call delivered {got}/100 video packets",
        flooded as f64 / took.as_secs_f64()
    );
    assert!(flooded >= 5_000, "the flood was real: {flooded}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let states = sub.state_sequence("subscribe");
    assert_eq!(states, ["INITIAL", "GATHERED", "READY"], "the call survived");
    assert_eq!(publisher.state_sequence("publish"), ["INITIAL", "GATHERED", "READY"]);
    let conn = sub.connection_id("subscribe").unwrap();
    let (_, d) = api.call("GET", &format!("/v1/connections/{conn}"), None).await;
    if mux_mode() {
        // On the shared port a stranger's datagrams belong to no connection.
        let dropped = api.metric(r#"gateway_dropped_datagrams_total{reason="unknown_destination"}"#).await;
        assert!(dropped > 0.0, "garbage was seen and dropped before any connection");
        gw.shutdown(Duration::from_secs(1)).await;
        return;
    }
    assert!(
        d["stats"]["dropped_untrusted_datagrams"].as_u64().unwrap() > 0,
        "garbage was seen and dropped: {}",
        d["stats"]
    );
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_exhaustion_is_no_ports_and_recovers() {
    let gw = start_gateway(44140, 44142).await; // three ports
    let api = Api::new(gw.base_url());
    let room = api.create_room("ports").await;
    if mux_mode() {
        // One port per worker, none per connection: more connections than ports all get in.
        let mut sockets = Vec::new();
        for who in ["a", "b", "c", "d", "e"] {
            let mut ws = RawWs::connect(&api, &api.token(&room, who).await).await;
            ws.send(r#"{"type":"subscribe"}"#).await;
            assert!(ws.next_of("offer").await["sdp"].is_string());
            sockets.push(ws);
        }
        gw.shutdown(Duration::from_secs(1)).await;
        return;
    }
    let mut sockets = Vec::new();
    for who in ["a", "b", "c"] {
        let mut ws = RawWs::connect(&api, &api.token(&room, who).await).await;
        ws.send(r#"{"type":"subscribe"}"#).await;
        ws.next_of("offer").await;
        sockets.push(ws);
    }
    assert_eq!(gw.ports.free(), 0);
    let mut d = RawWs::connect(&api, &api.token(&room, "d").await).await;
    d.send(r#"{"type":"subscribe"}"#).await;
    let e = d.next_of("error").await;
    assert_eq!(e["code"], "no_ports", "{e}");
    // One leaves; its port comes back and the refused participant gets in.
    sockets[0].send(r#"{"type":"leave"}"#).await;
    eventually("a port freed", 5, || gw.ports.free() == 1).await;
    d.send(r#"{"type":"subscribe"}"#).await;
    assert!(d.next_of("offer").await["sdp"].is_string());
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_bad_requests_does_not_starve_healthy_ones() {
    let gw = start_gateway(44150, 44151).await;
    let api = Api::new(gw.base_url());
    let base = api.base.clone();
    // 8 clients hammer the API with garbage for ~2 s (bounded count), loopback only.
    let mut attackers = Vec::new();
    for i in 0..8 {
        let base = base.clone();
        attackers.push(tokio::spawn(async move {
            let c = reqwest::Client::new();
            let mut n = 0u32;
            let t0 = std::time::Instant::now();
            while t0.elapsed() < Duration::from_secs(2) && n < 5000 {
                let r = match n % 4 {
                    0 => {
                        c.post(format!("{base}/v1/rooms"))
                            .bearer_auth(API_KEY)
                            .header("content-type", "application/json")
                            .body("{{{{")
                            .send()
                            .await
                    }
                    1 => c.get(format!("{base}/v1/rooms")).bearer_auth("wrong-key").send().await,
                    2 => c.get(format!("{base}/v1/ws?token=forged.{i}.{n}")).send().await,
                    _ => c.delete(format!("{base}/v1/rooms/r_nope{n}")).bearer_auth(API_KEY).send().await,
                };
                if let Ok(r) = r {
                    assert!(r.status().is_client_error(), "bad input gets a 4xx: {}", r.status());
                }
                n += 1;
            }
            n
        }));
    }
    // Meanwhile a healthy backend keeps working.
    let mut latencies = Vec::new();
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        let t = std::time::Instant::now();
        let (s, _) = api.call("GET", "/v1/rooms", None).await;
        assert_eq!(s, 200);
        latencies.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut sent = 0;
    for a in attackers {
        sent += a.await.unwrap();
    }
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    println!(
        "{sent} bad requests; {} healthy ones, median {:?}, p99 {:?}",
        latencies.len(),
        latencies[latencies.len() / 2],
        p99
    );
    assert!(sent >= 1000, "the burst was real: {sent}");
    assert!(p99 < Duration::from_millis(500), "healthy requests kept being served: p99 {p99:?}");
    gw.shutdown(Duration::from_secs(1)).await;
}

/// Replies that follow each other go out at once: without `TCP_NODELAY` on the server's
/// sockets, the second of two small messages waited for the client's delayed ACK of the first
/// (40 ms on Linux, up to 200 ms on Windows), which every join step with two messages in a row
/// (an event, then the offer or candidate it announces) paid. Two bad frames in one segment get
/// two `error` replies; the median gap between them over 30 rounds must be far below 40 ms
/// (the client's first rounds are acknowledged at once, later ones are not). 60 messages stay
/// under the socket's rate limit (a burst of 100).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_replies_are_not_held_for_the_clients_ack() {
    let gw = start_gateway(44160, 44169).await;
    let api = Api::new(gw.base_url());
    let room = api.create_room("no-nagle").await;
    let token = api.token(&room, "quick").await;
    let mut ws = RawWs::connect(&api, &token).await;
    let mut gaps = Vec::new();
    for _ in 0..30 {
        ws.ws.feed(Message::Text("{".into())).await.unwrap();
        ws.ws.feed(Message::Text("{".into())).await.unwrap();
        ws.ws.flush().await.unwrap();
        ws.next_of("error").await;
        let first = std::time::Instant::now();
        ws.next_of("error").await;
        gaps.push(first.elapsed());
    }
    gaps.sort();
    assert!(gaps[gaps.len() / 2] < Duration::from_millis(15), "gaps between the two replies: {gaps:?}");
    gw.shutdown(Duration::from_secs(1)).await;
}

/// Slowloris: a connection that sends nothing, or trickles its request headers a line at a time,
/// is closed once `http.header_read_timeout_ms` has passed, instead of holding a descriptor
/// forever; a WebSocket session idle for longer is not affected, and new requests are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_trickling_http_connections_are_closed_sessions_are_not() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = start_gateway_with(44230, 44239, |c| c.http.header_read_timeout_ms = 600).await;
    let api = Api::new(gw.base_url());
    let room = api.create_room("slow-clients").await;
    let session = Peer::join(&api, &room, "idle-session").await;

    let addr = gw.base_url().trim_start_matches("http://").to_owned();
    let t0 = std::time::Instant::now();
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut trickle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // The first byte of both "POST" and the HTTP/2 preface, then nothing.
    let mut ambiguous = tokio::net::TcpStream::connect(&addr).await.unwrap();
    ambiguous.write_all(b"P").await.unwrap();
    trickle.write_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n").await.unwrap();
    let (mut trickle_rx, mut trickle_tx) = trickle.into_split();
    let writer = tokio::spawn(async move {
        // One more header line every 100 ms, never the blank line that ends them.
        for i in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if trickle_tx.write_all(format!("X-Slow-{i}: 1\r\n").as_bytes()).await.is_err() {
                return i;
            }
        }
        50
    });
    let mut buf = [0u8; 256];
    let closed = |r: std::io::Result<usize>| matches!(r, Ok(0) | Err(_));
    let silent_read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    let silent_at = t0.elapsed();
    assert!(silent_read.is_ok_and(closed), "the silent connection is closed");
    let trickle_read = tokio::time::timeout(Duration::from_secs(5), trickle_rx.read(&mut buf)).await;
    let trickle_at = t0.elapsed();
    let n = trickle_read.expect("the trickling connection is closed within 5 s");
    assert!(n.map_or(true, |n| n == 0 || buf[..n].starts_with(b"HTTP/1.1 408")), "closed, at most with a 408");
    let ambiguous_read = tokio::time::timeout(Duration::from_secs(5), ambiguous.read(&mut buf)).await;
    assert!(ambiguous_read.is_ok_and(closed), "the connection that sent one ambiguous byte is closed");
    println!("silent connection closed after {silent_at:?}, trickling one after {trickle_at:?}");
    assert!(silent_at >= Duration::from_millis(500), "not before the timeout: {silent_at:?}");
    assert!(trickle_at < Duration::from_millis(2500), "trickling does not extend the deadline: {trickle_at:?}");
    let lines = writer.await.unwrap();
    assert!(lines < 50, "the server stopped taking the trickled lines");

    // The session, idle all this time (> 2 timeouts), still answers.
    tokio::time::sleep(Duration::from_millis(1500).saturating_sub(t0.elapsed())).await;
    session.subscribe();
    session.wait("the subscribe offer on the idle session", 10, |l| !l.of_type("offer").is_empty()).await;
    let (s, _) = api.call("GET", "/healthz", None).await;
    assert_eq!(s, 200);
    gw.shutdown(Duration::from_secs(1)).await;
}
