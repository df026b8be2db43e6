//! A UDP flood aimed at one media port must not cost a call on another port its packets. The
//! gateway runs one media worker, so the flooded connection (in another room) and the call share
//! the thread that reads, checks and drops every garbage datagram. Loss repair is off on the call
//! (the subscriber sends no NACKs, the publisher's packets cannot be resent), so what the
//! subscriber receives is what arrived in its first transmission, and the loss is measured, not
//! repaired. `-- --nocapture` prints the flood rate and the call's loss.
//!
//! In single-port mode (`media.mux`, `TEST_MEDIA_MUX=1`) "another port" is another worker's
//! shared port, so the gateway runs two workers there. A flood at the very port a call shares
//! (`a_flood_at_the_shared_port_leaves_the_call_up`) shares that socket's receive queue with the
//! call: the call must stay up, and its loss is measured.

mod common;

use std::collections::HashSet;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use str0m::media::MediaKind;

/// Packets per medium the publisher sends during the flood (one video per 10 ms, audio every 20 ms).
const VIDEO_PACKETS: usize = 500;
/// Threads sending the flood: with two, the flood alone can keep both cores of a CI machine busy.
const FLOOD_THREADS: usize = 2;
/// Largest flood, in datagrams per thread (loopback only).
const FLOOD_MAX: u64 = 2_000_000;
/// Loss bound: below 1% with no repair. On loopback the call loses nothing by itself; a worker
/// starved by the flood would show up as receive-buffer overflow on the call's sockets.
const MAX_LOSS_PERCENT: f64 = 1.0;

fn distinct(peer: &Peer, kind: MediaKind) -> usize {
    peer.with(|l| l.rtp.iter().filter(|(k, _)| *k == kind).map(|(_, p)| p.clone()).collect::<HashSet<_>>().len())
}

fn candidate_port(peer: &Peer) -> u16 {
    peer.with(|l| {
        let c = l.of_type("candidate");
        let c = c.first().expect("the gateway trickled its candidate");
        // "candidate:… udp <priority> <ip> <port> typ host"
        let parts: Vec<&str> = c["candidate"].as_str().unwrap().split_whitespace().collect();
        parts[5].parse().unwrap()
    })
}

struct Flooded {
    video_loss: f64,
    audio_loss: f64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_at_another_port_costs_the_call_no_packets() {
    // Per-connection ports: one worker reads both sockets. Single-port mode: the idle peer's
    // room is on worker 0's port, the call's on worker 1's.
    let workers = if mux_mode() { 2 } else { 1 };
    let f = flood_a_call(47000, 47009, workers, false, false).await;
    assert!(f.video_loss < MAX_LOSS_PERCENT, "video loss {:.2}% under the flood", f.video_loss);
    assert!(f.audio_loss < MAX_LOSS_PERCENT, "audio loss {:.2}% under the flood", f.audio_loss);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_at_the_shared_port_leaves_the_call_up() {
    // Both rooms on the one port of the one worker: the flood fills the queue the call reads.
    let f = flood_a_call(47010, 47019, 1, true, true).await;
    // Whatever the kernel drops of the call when the worker cannot drain the flood, the call
    // keeps most of its media and its connections (asserted in flood_a_call).
    assert!(f.video_loss < 50.0, "video loss {:.2}% under a flood of its own port", f.video_loss);
    assert!(f.audio_loss < 50.0, "audio loss {:.2}% under a flood of its own port", f.audio_loss);
}

/// Flood the port of an idle peer in another room while a call with repair off sends 5 s of
/// media; returns the call's loss after checking the flood was real and every connection lived.
async fn flood_a_call(port_min: u16, port_max: u16, workers: usize, mux: bool, same_port: bool) -> Flooded {
    let gw = start_gateway_with(port_min, port_max, |c| {
        c.media.workers = workers;
        c.media.mux |= mux;
    })
    .await;
    let api = Api::new(gw.base_url());

    // The target: a READY subscribe connection in another room with nothing to receive.
    let other_room = api.create_room("flood-target").await;
    let idle = Peer::join(&api, &other_room, "idle").await;
    idle.subscribe();
    idle.wait("idle subscribe READY", 10, |l| l.connected).await;
    let target_port = candidate_port(&idle);

    // The call, with repair off.
    let room = api.create_room("flood-call").await;
    let publisher = Peer::join(&api, &room, "pub").await;
    publisher.no_repair();
    publisher.publish();
    publisher.wait("publish READY", 10, |l| l.connected).await;
    let sub = Peer::join(&api, &room, "sub").await;
    sub.no_repair();
    sub.subscribe();
    sub.wait("subscribe READY", 10, |l| l.connected).await;
    if same_port {
        // Single-port mode, one worker: the flood hits the one socket the call shares.
        assert_eq!(candidate_port(&sub), target_port);
    } else {
        assert_ne!(candidate_port(&sub), target_port);
        assert_ne!(candidate_port(&publisher), target_port);
    }

    // The flood: strangers send STUN-, DTLS-, RTP-, RTCP-shaped and random datagrams at the idle
    // port as fast as they can, until the call's media is through (bounded count).
    let stop = Arc::new(AtomicBool::new(false));
    let flood = |stop: Arc<AtomicBool>| {
        std::thread::spawn(move || {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut rtp_shaped = vec![0u8; 1200];
            rtp_shaped[..12].copy_from_slice(&[0x80, 96, 0, 1, 0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef]);
            let shapes: [&[u8]; 5] = [
                &[0u8, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
                &[22u8, 254, 253, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0],
                &rtp_shaped,
                &[0x81u8, 200, 0, 6, 0, 0, 0, 1],
                &[0xffu8; 64],
            ];
            let (t0, mut sent, mut errors) = (Instant::now(), 0u64, 0u64);
            while !stop.load(Ordering::Relaxed) && sent < FLOOD_MAX {
                if s.send_to(shapes[(sent % 5) as usize], ("127.0.0.1", target_port)).is_err() {
                    errors += 1;
                }
                sent += 1;
            }
            (sent, errors, t0.elapsed())
        })
    };
    let floods: Vec<_> = (0..FLOOD_THREADS).map(|_| flood(Arc::clone(&stop))).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let t0 = Instant::now();
    publisher.send_media(VIDEO_PACKETS);
    // Sending takes ~5 s; then allow a moment for the last packets to arrive.
    publisher
        .wait("all media written", 30, |l| {
            l.sent.iter().filter(|(k, _)| *k == MediaKind::Video).count() >= VIDEO_PACKETS
        })
        .await;
    let sending = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut flooded, mut send_errors, mut took) = (0, 0, Duration::ZERO);
    for f in floods {
        let (sent, errors, elapsed) = f.join().unwrap();
        (flooded, send_errors, took) = (flooded + sent, send_errors + errors, took.max(elapsed));
    }

    let audio_sent = publisher.with(|l| l.sent.iter().filter(|(k, _)| *k == MediaKind::Audio).count());
    let (video, audio) = (distinct(&sub, MediaKind::Video), distinct(&sub, MediaKind::Audio));
    let loss = |got: usize, sent: usize| 100.0 * (sent.saturating_sub(got)) as f64 / sent as f64;
    let (video_loss, audio_loss) = (loss(video, VIDEO_PACKETS), loss(audio, audio_sent));

    let target = idle.connection_id("subscribe").unwrap();
    let (_, t) = api.call("GET", &format!("/v1/connections/{target}"), None).await;
    // Non-STUN datagrams from a source ICE never authenticated (STUN-shaped ones go to str0m).
    // On a shared socket (single-port mode) the strangers' datagrams belong to no connection.
    let dropped = if gw.ports.total() == 0 {
        api.metric(r#"gateway_dropped_datagrams_total{reason="unknown_destination"}"#).await as u64
    } else {
        t["stats"]["dropped_untrusted_datagrams"].as_u64().unwrap_or(0)
    };
    let sub_conn = sub.connection_id("subscribe").unwrap();
    let (_, s) = api.call("GET", &format!("/v1/connections/{sub_conn}"), None).await;
    let retransmitted = s["stats"]["retransmitted_packets"].as_u64().unwrap_or(0);
    let place = if same_port { "Call on the flooded port itself" } else { "Call on another port" };
    println!(
        "flood: {flooded} datagrams from {FLOOD_THREADS} threads in {took:.2?} ({:.0}/s, {send_errors} send errors) \
         at idle port {target_port}; the worker dropped {dropped} non-STUN ones as untrusted (STUN-shaped ones \
         failed ICE; the kernel dropped what overflowed that socket). {place}, no repair, \
         {sending:.2?} of media: video {video}/{VIDEO_PACKETS} ({video_loss:.2}% loss), audio {audio}/{audio_sent} \
         ({audio_loss:.2}% loss), {retransmitted} retransmissions",
        flooded as f64 / took.as_secs_f64()
    );

    assert!(flooded >= 100_000, "the flood was real: {flooded}");
    assert!(dropped > 0, "the flood reached the gateway and was dropped there: {}", t["stats"]);
    assert_eq!(retransmitted, 0, "repair was off: nothing was resent to the subscriber");
    for (peer, role) in [(&sub, "subscribe"), (&publisher, "publish"), (&idle, "subscribe")] {
        assert_eq!(peer.state_sequence(role), ["INITIAL", "GATHERED", "READY"], "{} kept its connection", peer.name);
    }
    gw.shutdown(Duration::from_secs(1)).await;
    Flooded { video_loss, audio_loss }
}
