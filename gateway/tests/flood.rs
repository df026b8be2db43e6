//! A UDP flood aimed at one media port must not cost a call on another port its packets. The
//! gateway runs one media worker, so the flooded connection (in another room) and the call share
//! the thread that reads, checks and drops every garbage datagram. Loss repair is off on the call
//! (the subscriber sends no NACKs, the publisher's packets cannot be resent), so what the
//! subscriber receives is what arrived in its first transmission, and the loss is measured, not
//! repaired. `-- --nocapture` prints the flood rate and the call's loss.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_at_another_port_costs_the_call_no_packets() {
    let gw = start_gateway_with(47000, 47009, |c| c.media.workers = 1).await;
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
    assert_ne!(candidate_port(&sub), target_port);
    assert_ne!(candidate_port(&publisher), target_port);

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
    let dropped = t["stats"]["dropped_untrusted_datagrams"].as_u64().unwrap_or(0);
    let sub_conn = sub.connection_id("subscribe").unwrap();
    let (_, s) = api.call("GET", &format!("/v1/connections/{sub_conn}"), None).await;
    let retransmitted = s["stats"]["retransmitted_packets"].as_u64().unwrap_or(0);
    println!(
        "flood: {flooded} datagrams from {FLOOD_THREADS} threads in {took:.2?} ({:.0}/s, {send_errors} send errors) \
         at idle port {target_port}; the worker dropped {dropped} non-STUN ones as untrusted (STUN-shaped ones \
         failed ICE; the kernel dropped what overflowed that socket). Call on another port, same worker, no repair, \
         {sending:.2?} of media: video {video}/{VIDEO_PACKETS} ({video_loss:.2}% loss), audio {audio}/{audio_sent} \
         ({audio_loss:.2}% loss), {retransmitted} retransmissions",
        flooded as f64 / took.as_secs_f64()
    );

    assert!(flooded >= 100_000, "the flood was real: {flooded}");
    assert!(dropped > 0, "the flood reached the gateway and was dropped there: {}", t["stats"]);
    assert_eq!(retransmitted, 0, "repair was off: nothing was resent to the subscriber");
    assert!(video_loss < MAX_LOSS_PERCENT, "video loss {video_loss:.2}% under the flood");
    assert!(audio_loss < MAX_LOSS_PERCENT, "audio loss {audio_loss:.2}% under the flood");
    for (peer, role) in [(&sub, "subscribe"), (&publisher, "publish"), (&idle, "subscribe")] {
        assert_eq!(peer.state_sequence(role), ["INITIAL", "GATHERED", "READY"], "{} kept its connection", peer.name);
    }
    gw.shutdown(Duration::from_secs(1)).await;
}
