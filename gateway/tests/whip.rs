//! WHIP ingest and WHEP playback against a real gateway: str0m peers that know only HTTP (no
//! WebSocket) publish and play over loopback UDP, next to a WebSocket subscriber, and every
//! step of the resource lifecycle is checked through the public API (connection history, room
//! view, events the room hears). Media ports 48500-48599.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use str0m::format::Codec;
use str0m::media::MediaKind;
use str0m::rtp::RtpWrite;
use test_peer::vp8::{self, Descriptor};
use test_peer::{Out, PeerConfig};
use tokio::net::UdpSocket;

/// What an HTTP-only peer saw and sent.
#[derive(Default)]
struct Seen {
    connected: bool,
    /// RTP payloads received, by kind.
    rtp: Vec<(MediaKind, Vec<u8>)>,
    sent: Vec<(MediaKind, Vec<u8>)>,
}

/// A str0m peer driven on its own task; it publishes (`send`) or only receives.
struct HttpPeer {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    /// Where the gateway put its session resource.
    location: String,
    etag: String,
}

impl Drop for HttpPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl HttpPeer {
    fn seen<R>(&self, f: impl FnOnce(&Seen) -> R) -> R {
        f(&self.seen.lock().unwrap())
    }

    async fn wait(&self, what: &str, f: impl Fn(&Seen) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.seen(&f) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn connection_id(&self) -> String {
        self.location.rsplit('/').next().unwrap().to_owned()
    }
}

/// POST an offer with a bearer token; the status, the response headers and its body.
async fn post(url: &str, token: &str, content_type: &str, body: String) -> (u16, reqwest::header::HeaderMap, String) {
    let r = reqwest::Client::new()
        .post(url)
        .bearer_auth(token)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    (status, headers, r.text().await.unwrap())
}

async fn request(method: &str, url: &str, token: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let mut b = reqwest::Client::new()
        .request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), url)
        .bearer_auth(token)
        .body(body.to_owned());
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let r = b.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// What an HTTP peer offers.
#[derive(Clone, Copy, PartialEq)]
enum Offer {
    /// WHIP: audio, and video if true.
    Publish(bool),
    /// WHEP: receive-only audio and video.
    Play,
}

/// Open a WHIP or WHEP session with a fresh str0m peer and drive it.
async fn open(api: &Api, endpoint: &str, token: &str, name: &str, what: Offer) -> Result<HttpPeer, (u16, String)> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut peer = test_peer::Peer::new(Instant::now(), socket.local_addr().unwrap(), &PeerConfig::default()).unwrap();
    let play = what == Offer::Play;
    let offer = match what {
        Offer::Play => peer.play_offer(),
        Offer::Publish(video) => peer.publish_offer(true, video.then_some(&[][..])),
    }
    .unwrap();
    let (status, headers, answer) = post(&format!("{}{endpoint}", api.base), token, "application/sdp", offer).await;
    if status != 201 {
        return Err((status, answer));
    }
    assert_eq!(headers["content-type"], "application/sdp");
    assert!(answer.contains("a=candidate:"), "the answer carries the gateway's candidate: {answer}");
    peer.accept_answer(&answer).expect("answer accepted");
    // ICE-lite gateway: its candidate is in the answer; str0m's client learns it from there or here.
    for line in answer.lines().filter_map(|l| l.trim().strip_prefix("a=")) {
        if line.starts_with("candidate:") {
            peer.add_remote_candidate(line);
        }
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    tokio::spawn(drive(peer, socket, name.to_owned(), !play, Arc::clone(&seen), Arc::clone(&stop)));
    Ok(HttpPeer {
        seen,
        stop,
        location: headers["location"].to_str().unwrap().to_owned(),
        etag: headers["etag"].to_str().unwrap().to_owned(),
    })
}

async fn drive(
    mut peer: test_peer::Peer,
    socket: UdpSocket,
    name: String,
    send: bool,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 2048];
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut n = 0u64;
    let mut keyframe_owed = true;
    while !stop.load(Ordering::Relaxed) {
        let timeout = loop {
            match peer.poll_output(Instant::now()) {
                Ok(Out::Timeout(t)) => break t,
                Ok(Out::Transmit(t)) => {
                    let _ = socket.send_to(&t.contents, t.destination).await;
                }
                Ok(Out::Rtp(c, p)) => seen.lock().unwrap().rtp.push((c.kind, p.payload.to_vec())),
                Ok(Out::Event(str0m::Event::Connected)) => seen.lock().unwrap().connected = true,
                Ok(Out::Event(str0m::Event::KeyframeRequest(_))) => keyframe_owed = true,
                Ok(Out::Event(_)) => {}
                Err(_) => break Instant::now() + Duration::from_millis(50),
            }
        };
        let wait = timeout.saturating_duration_since(Instant::now()).min(Duration::from_millis(50));
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                if let Ok((len, source)) = r {
                    let _ = peer.handle_datagram(Instant::now(), source, &buf[..len]);
                }
            }
            _ = tick.tick(), if send && peer.connected => {
                n += 1;
                for (kind, mid) in [(MediaKind::Video, peer.video_mid), (MediaKind::Audio, peer.audio_mid)] {
                    let Some(mid) = mid else { continue };
                    let codec = if kind == MediaKind::Video { Codec::Vp8 } else { Codec::Opus };
                    let Some(pt) = peer.pt_for(mid, codec) else { continue };
                    let mut payload = Vec::new();
                    if kind == MediaKind::Video {
                        vp8::push_synthetic_header(&mut payload, true, Descriptor::Plain, std::mem::take(&mut keyframe_owed));
                    }
                    payload.extend_from_slice(format!("{name}-{kind:?}-{n}-").as_bytes());
                    payload.resize(if kind == MediaKind::Video { 700 } else { 100 }, n as u8);
                    let clock = if kind == MediaKind::Video { 90 } else { 48 };
                    let write = RtpWrite::new(pt, (1000 + n).into(), (n * 10 * clock) as u32, Instant::now(), payload.clone())
                        .marker(true)
                        .nackable(true);
                    if peer.write_rtp(mid, None, write) {
                        seen.lock().unwrap().sent.push((kind, payload));
                    }
                }
            }
            _ = tokio::time::sleep(wait) => {
                let _ = peer.handle_timeout(Instant::now());
            }
        }
    }
}

/// Received payloads of `kind` that the publisher sent byte for byte, and how many there were.
fn matched(receiver: &[(MediaKind, Vec<u8>)], sent: &[(MediaKind, Vec<u8>)], kind: MediaKind) -> (usize, usize) {
    let got: Vec<&Vec<u8>> = receiver.iter().filter(|(k, _)| *k == kind).map(|(_, p)| p).collect();
    let exact = got.iter().filter(|p| sent.iter().any(|(k, s)| *k == kind && s == **p)).count();
    (exact, got.len())
}

async fn connection(api: &Api, id: &str) -> Value {
    let (s, d) = api.call("GET", &format!("/v1/connections/{id}"), None).await;
    assert_eq!(s, 200, "{d}");
    d
}

fn events(d: &Value) -> Vec<String> {
    d["events"].as_array().unwrap().iter().map(|e| e["event"].as_str().unwrap().to_owned()).collect()
}

fn last_reason(d: &Value) -> Option<String> {
    d["events"].as_array().unwrap().last().and_then(|e| e["reason"].as_str()).map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whip_publisher_reaches_the_room_and_whep_plays_it() {
    let gw = start_gateway(48500, 48549).await;
    let api = Api::new(gw.base_url());
    let room = api.create_room("whip stage").await;
    // A WebSocket subscriber, there before the broadcaster.
    let sub = Peer::join(&api, &room, "sub").await;
    sub.subscribe();
    sub.wait("subscriber READY", 10, |l| l.events("READY").len() == 1).await;

    // OBS-like: a publish offer over HTTP, addressed by the room's name.
    let obs_token = api.token(&room, "obs").await;
    let obs = open(&api, "/v1/whip/whip%20stage", &obs_token, "obs", Offer::Publish(true)).await.expect("WHIP 201");
    assert!(obs.location.starts_with(&format!("/v1/whip/{room}/c_")), "{}", obs.location);
    obs.wait("publisher connected", |s| s.connected).await;
    sub.wait("stream_added for obs", 10, |l| {
        l.of_type("stream_added").iter().filter(|m| m["participant_id"] == "obs").count() == 2
    })
    .await;
    assert!(sub.with(|l| l.of_type("participant_joined").iter().any(|m| m["participant_id"] == "obs")));
    // The WebSocket subscriber decodes what the WHIP publisher sends, byte for byte.
    sub.wait("video from obs", 10, |l| l.rtp.iter().filter(|(k, _)| *k == MediaKind::Video).count() >= 30).await;
    let sent = obs.seen(|s| s.sent.clone());
    let (exact, got) = sub.with(|l| matched(&l.rtp, &sent, MediaKind::Video));
    assert_eq!(exact, got, "every video payload the subscriber got is one obs sent");
    let (exact, got) = sub.with(|l| matched(&l.rtp, &sent, MediaKind::Audio));
    assert!(got > 10 && exact == got, "audio {exact}/{got}");

    // The connection walks the erizo states and is inspectable like any other.
    let d = connection(&api, &obs.connection_id()).await;
    assert_eq!((d["role"].as_str(), d["participant_id"].as_str()), (Some("publish"), Some("obs")));
    assert_eq!(events(&d), ["INITIAL", "SDP_PROCESSED", "CANDIDATE", "GATHERED", "READY"]);
    assert!(d["stats"]["rtp_packets_in"].as_u64().unwrap() > 0, "{d}");

    // Trickle by PATCH is taken (and changes nothing: the gateway is ICE-lite).
    let frag = "a=ice-ufrag:abcd\r\na=ice-pwd:0123456789abcdef01234567\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n\
                a=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host\r\na=end-of-candidates\r\n";
    let url = format!("{}{}", api.base, obs.location);
    let sdpfrag = ("content-type", "application/trickle-ice-sdpfrag");
    let (s, b) = request("PATCH", &url, &obs_token, &[sdpfrag, ("if-match", &obs.etag)], frag).await;
    assert_eq!(s, 204, "{b}");
    // ICE restart by PATCH (RFC 9725 §4.3): the client's new credentials in, the gateway's new
    // ones and its candidate out, with a new ETag; same connection, `SDP_PROCESSED` `ice_restart`.
    let (s, b) = request("PATCH", &url, &obs_token, &[sdpfrag, ("if-match", "*")], frag).await;
    assert_eq!(s, 200, "ICE restart by PATCH: {b}");
    let ufrag = b.lines().find_map(|l| l.trim().strip_prefix("a=ice-ufrag:")).expect("our new ufrag").to_owned();
    assert_ne!(format!("\"{ufrag}\""), obs.etag, "new credentials");
    assert!(b.lines().any(|l| l.trim().strip_prefix("a=ice-pwd:").is_some_and(|p| p.len() >= 22)), "{b}");
    assert!(b.contains("a=candidate:") && b.contains("a=end-of-candidates"), "{b}");
    let d = connection(&api, &obs.connection_id()).await;
    assert_eq!(d["state"], "READY", "{d}");
    assert!(d["events"].as_array().unwrap().iter().any(|e| e["reason"] == "ice_restart"), "{d}");
    assert_eq!(d["stats"]["ice_restarts"], 1, "{d}");
    let (s, _) = request("PATCH", &url, &obs_token, &[sdpfrag, ("if-match", &obs.etag)], frag).await;
    assert_eq!(s, 412, "the old ETag no longer matches");
    let (s, b) = request("PATCH", &url, &obs_token, &[sdpfrag, ("if-match", &format!("\"{ufrag}\""))], frag).await;
    assert_eq!(s, 204, "the new one does: {b}");
    let (s, _) = request("PATCH", &url, &obs_token, &[sdpfrag, ("if-match", "*")], frag).await;
    assert_eq!(s, 400, "the same credentials again are no restart");

    // A viewer that knows only HTTP plays obs (WHEP), with its own identity.
    let viewer_token = api.token(&room, "viewer").await;
    let viewer =
        open(&api, &format!("/v1/whep/{room}/obs"), &viewer_token, "viewer", Offer::Play).await.expect("WHEP 201");
    assert!(viewer.location.starts_with(&format!("/v1/whep/{room}/obs/c_")), "{}", viewer.location);
    viewer.wait("viewer video", |s| s.rtp.iter().filter(|(k, _)| *k == MediaKind::Video).count() >= 30).await;
    viewer.wait("viewer audio", |s| s.rtp.iter().filter(|(k, _)| *k == MediaKind::Audio).count() >= 10).await;
    let sent = obs.seen(|s| s.sent.clone());
    for kind in [MediaKind::Video, MediaKind::Audio] {
        let (exact, got) = viewer.seen(|s| matched(&s.rtp, &sent, kind));
        assert_eq!(exact, got, "{kind:?}: every payload the viewer got is one obs sent");
    }
    let d = connection(&api, &viewer.connection_id()).await;
    assert_eq!((d["role"].as_str(), d["participant_id"].as_str()), (Some("subscribe"), Some("viewer")));
    assert_eq!(events(&d), ["INITIAL", "SDP_PROCESSED", "CANDIDATE", "GATHERED", "READY"]);
    let layers = d["stats"]["layers"].as_array().cloned().unwrap_or_default();
    assert_eq!(layers.len(), 1, "one video track chosen for by the allocator: {d}");
    // The viewer is a participant of the room (it counts toward max_participants).
    let (_, r) = api.call("GET", &format!("/v1/rooms/{room}"), None).await;
    let ids: Vec<&str> =
        r["participants"].as_array().unwrap().iter().map(|p| p["participant_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["obs", "sub", "viewer"]);

    // DELETE ends the WHEP session (FINISHED, leave) and the viewer leaves the room.
    let (s, _) = request("DELETE", &format!("{}{}", api.base, viewer.location), &viewer_token, &[], "").await;
    assert_eq!(s, 200);
    let d = connection(&api, &viewer.connection_id()).await;
    assert_eq!((d["state"].as_str(), last_reason(&d).as_deref()), (Some("FINISHED"), Some("leave")));
    sub.wait("viewer left", 5, |l| l.of_type("participant_left").iter().any(|m| m["participant_id"] == "viewer")).await;

    // A second viewer; then the publisher DELETEs: WHIP ends FINISHED (leave), the viewer's
    // connection ends FINISHED (publisher_left), and both leave the room.
    let second =
        open(&api, &format!("/v1/whep/{room}/obs"), &viewer_token, "viewer", Offer::Play).await.expect("WHEP 201");
    second.wait("second viewer video", |s| s.rtp.iter().any(|(k, _)| *k == MediaKind::Video)).await;
    let (s, _) = request("DELETE", &url, &obs_token, &[], "").await;
    assert_eq!(s, 200);
    let d = connection(&api, &obs.connection_id()).await;
    assert_eq!((d["state"].as_str(), last_reason(&d).as_deref()), (Some("FINISHED"), Some("leave")));
    let d = connection(&api, &second.connection_id()).await;
    assert_eq!((d["state"].as_str(), last_reason(&d).as_deref()), (Some("FINISHED"), Some("publisher_left")));
    sub.wait("stream_removed, obs and viewer left", 5, |l| {
        let left = l.of_type("participant_left");
        l.of_type("stream_removed").len() == 2
            && left.iter().any(|m| m["participant_id"] == "obs")
            && left.iter().filter(|m| m["participant_id"] == "viewer").count() == 2
    })
    .await;
    let (_, r) = api.call("GET", &format!("/v1/rooms/{room}"), None).await;
    assert_eq!(r["participants"].as_array().unwrap().len(), 1, "only the WebSocket subscriber: {r}");
    let (s, _) = request("DELETE", &url, &obs_token, &[], "").await;
    assert_eq!(s, 404, "an ended resource is gone");

    // Kick ends a WHIP session like any participant's.
    let again =
        open(&api, &format!("/v1/whip/{room}"), &obs_token, "obs", Offer::Publish(true)).await.expect("WHIP 201");
    again.wait("publisher connected", |s| s.connected).await;
    let (s, _) = api.call("DELETE", &format!("/v1/rooms/{room}/participants/obs"), None).await;
    assert_eq!(s, 204);
    let d = connection(&api, &again.connection_id()).await;
    assert_eq!((d["state"].as_str(), last_reason(&d).as_deref()), (Some("FINISHED"), Some("kicked")));
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_whip_and_whep_offers_are_refused_by_the_core() {
    let gw = start_gateway(48550, 48599).await;
    let api = Api::new(gw.base_url());
    let room = api.create_room("whip refusals").await;
    let token = api.token(&room, "obs").await;
    let whip = format!("{}/v1/whip/{room}", api.base);
    // Valid SDP, no codec the gateway can use: 422. Not SDP at all: 400.
    let unusable = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n\
                    m=video 9 UDP/TLS/RTP/SAVPF 120\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendonly\r\n\
                    a=ice-ufrag:abcd\r\na=ice-pwd:0123456789abcdef01234567\r\n\
                    a=fingerprint:sha-256 00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF\r\n\
                    a=setup:actpass\r\na=rtcp-mux\r\na=rtpmap:120 NOPE/90000\r\n";
    let (s, _, b) = post(&whip, &token, "application/sdp", unusable.to_owned()).await;
    assert_eq!(s, 422, "{b}");
    assert!(b.contains("\"unprocessable\""), "{b}");
    let (s, _, b) = post(&whip, &token, "application/sdp", "v=0\r\ngarbage".into()).await;
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("\"bad_sdp\""), "{b}");

    // A publisher of audio only (its stream exists once it is READY); a viewer offering video
    // only gets 422.
    let obs = open(&api, &format!("/v1/whip/{room}"), &token, "obs", Offer::Publish(false)).await.expect("WHIP 201");
    obs.wait("publisher connected", |s| s.connected).await;
    poll_until("obs's audio stream", 5, || async {
        let (_, r) = api.call("GET", &format!("/v1/rooms/{room}"), None).await;
        if r["streams"].as_array().map_or(0, |s| s.len()) == 1 {
            Ok(())
        } else {
            Err(r.to_string())
        }
    })
    .await;
    let viewer = api.token(&room, "viewer").await;
    let whep = format!("{}/v1/whep/{room}/obs", api.base);
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut p = test_peer::Peer::new(Instant::now(), socket.local_addr().unwrap(), &PeerConfig::default()).unwrap();
    let mut sdp = p.rtc.sdp_api();
    sdp.add_media(MediaKind::Video, str0m::media::Direction::RecvOnly, None, None, None);
    let (offer, _) = sdp.apply().unwrap();
    let (s, _, b) = post(&whep, &viewer, "application/sdp", offer.to_sdp_string()).await;
    assert_eq!(s, 422, "{b}");
    // The refused viewer left nothing behind: no participant, no live connection of its own.
    let (_, r) = api.call("GET", &format!("/v1/rooms/{room}"), None).await;
    let ids: Vec<&str> =
        r["participants"].as_array().unwrap().iter().map(|p| p["participant_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["obs"], "{r}");
    let (s, _, b) =
        post(&format!("{}/v1/whep/{room}/nobody", api.base), &viewer, "application/sdp", "v=0\r\n".into()).await;
    assert_eq!(s, 404, "{b}");
    gw.shutdown(Duration::from_secs(2)).await;
}
