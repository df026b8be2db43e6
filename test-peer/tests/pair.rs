//! Two test peers connected to each other in memory: the drive loop, the SDP steps and the
//! receive side's counting, without a gateway.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::format::Codec;
use str0m::media::MediaKind;
use str0m::rtp::RtpWrite;
use test_peer::vp8::{self, Descriptor};
use test_peer::{Out, Peer, PeerConfig};

/// Drain both peers and carry datagrams across, until neither has anything to send.
fn pump(now: Instant, peers: &mut [Peer; 2]) {
    let mut queue: VecDeque<(usize, SocketAddr, Vec<u8>)> = VecDeque::new();
    loop {
        for (i, p) in peers.iter_mut().enumerate() {
            while let Ok(out) = p.poll_output(now) {
                match out {
                    Out::Transmit(t) => queue.push_back((1 - i, t.source, t.contents.into())),
                    Out::Timeout(_) => break,
                    Out::Rtp(..) | Out::Event(_) => {}
                }
            }
        }
        let Some((to, from, bytes)) = queue.pop_front() else { return };
        peers[to].handle_datagram(now, from, &bytes).expect("datagram accepted");
    }
}

#[test]
fn a_publisher_and_a_receiver_connect_and_count_what_arrives() {
    let start = Instant::now();
    let a = Peer::new(start, "10.0.0.1:1000".parse().unwrap(), &PeerConfig::default()).unwrap();
    let record = PeerConfig { record: true, ..PeerConfig::default() };
    let b = Peer::new(start, "10.0.0.2:2000".parse().unwrap(), &record).unwrap();
    let mut peers = [a, b];
    let offer = peers[0].publish_offer(true, Some(&[])).expect("an offer");
    let answer = peers[1].accept_offer(&offer).expect("accepted");
    peers[0].accept_answer(&answer).expect("answer accepted");
    let mut now = start;
    while !(peers[0].connected && peers[1].connected) {
        assert!(now - start < Duration::from_secs(5), "connects");
        pump(now, &mut peers);
        now += Duration::from_millis(5);
        for p in peers.iter_mut() {
            p.handle_timeout(now).unwrap();
        }
    }
    let mid = peers[0].video_mid.expect("video section");
    let pt = peers[0].pt_for(mid, Codec::Vp8).expect("VP8 negotiated");
    for frame in 0..10u32 {
        let mut payload = Vec::new();
        vp8::push_synthetic_header(&mut payload, true, Descriptor::PictureId(frame as u16), frame == 0);
        payload.resize(200, frame as u8);
        let write = RtpWrite::new(pt, (100 + u64::from(frame)).into(), frame * 3000, now, payload).marker(true);
        assert!(peers[0].write_rtp(mid, None, write));
        pump(now, &mut peers);
        now += Duration::from_millis(33);
    }
    let rx = &peers[1].rx;
    assert_eq!(rx.streams.len(), 1);
    let s = &rx.streams[0];
    assert_eq!((s.kind, s.codec), (MediaKind::Video, Some(Codec::Vp8)));
    assert_eq!((s.received, s.expected(), s.lost(), s.keyframes), (10, 10, 0, 1));
    assert_eq!(s.first_keyframe_wait(), Some(Duration::ZERO));
    assert_eq!(rx.received.len(), 10);
    assert!(rx.received[0].starts_keyframe() && !rx.received[1].starts_keyframe());
    assert_eq!(rx.video_ssrcs().collect::<Vec<_>>(), vec![s.ssrc]);
}
