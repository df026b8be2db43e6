//! Connection-level deadlines, which are the gateway's job (str0m has none): an offer left
//! unanswered, ICE that never connects, and a READY peer that goes silent all end FAILED with a
//! reason, and their ports return to the pool.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_offer_and_missing_ice_fail_in_time() {
    let gw = start_gateway_with(44200, 44209, |c| {
        c.media.negotiation_timeout_ms = 800;
        c.media.connect_timeout_ms = 800;
    })
    .await;
    let total = gw.ports.total();
    let api = Api::new(gw.base_url());
    let room = api.create_room("timeouts").await;

    // A client that subscribes but never answers the offer.
    let silent = Peer::join(&api, &room, "silent").await;
    silent.ignore_offers();
    silent.subscribe();
    let t0 = Instant::now();
    silent.wait("FAILED", 5, |l| !l.events("FAILED").is_empty()).await;
    let failed = silent.with(|l| l.events("FAILED")[0].clone());
    assert_eq!(failed["reason"], "negotiation_timeout");
    assert!(t0.elapsed() < Duration::from_secs(3), "failed in {:?}", t0.elapsed());

    // A client that answers (GATHERED) but never sends a single ICE check.
    let answered = Peer::join(&api, &room, "no-ice").await;
    answered.ignore_offers();
    answered.mute_udp();
    answered.raw(json!({ "type": "subscribe" }));
    answered.wait("offer", 5, |l| !l.of_type("offer").is_empty()).await;
    let offer = answered.with(|l| l.of_type("offer")[0].clone());
    let mut rtc = str0m::Rtc::builder().set_rtp_mode(true).build(Instant::now());
    let o = str0m::change::SdpOffer::from_sdp_string(offer["sdp"].as_str().unwrap()).unwrap();
    let a = rtc.sdp_api().accept_offer(o).unwrap();
    answered.raw(json!({ "type": "answer", "connection_id": offer["connection_id"], "sdp": a.to_sdp_string() }));
    answered.wait("GATHERED", 5, |l| !l.events("GATHERED").is_empty()).await;
    answered.wait("FAILED", 5, |l| !l.events("FAILED").is_empty()).await;
    assert_eq!(answered.with(|l| l.events("FAILED")[0]["reason"].clone()), "ice_timeout");
    assert_eq!(answered.state_sequence("subscribe"), ["INITIAL", "GATHERED", "FAILED"]);

    eventually("ports back", 5, || gw.ports.free() == total).await;
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_peer_that_goes_silent_fails_after_the_grace() {
    let gw = start_gateway_with(44210, 44219, |c| c.media.disconnect_grace_ms = 1000).await;
    let total = gw.ports.total();
    let api = Api::new(gw.base_url());
    let room = api.create_room("vanish").await;
    let p = Peer::join(&api, &room, "vanishing").await;
    p.publish();
    p.wait("READY", 10, |l| l.connected && !l.events("READY").is_empty()).await;
    let t0 = Instant::now();
    p.mute_udp();
    p.wait("FAILED", 30, |l| !l.events("FAILED").is_empty()).await;
    let reason = p.with(|l| l.events("FAILED")[0]["reason"].clone());
    assert_eq!(reason, "ice_disconnected");
    assert_eq!(p.state_sequence("publish"), ["INITIAL", "GATHERED", "READY", "FAILED"]);
    println!("silent READY peer FAILED after {:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(4), "the grace period decides, not str0m's ICE timeout");
    eventually("port back", 5, || gw.ports.free() == total).await;
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ice_without_dtls_fails_with_dtls_timeout() {
    let gw = start_gateway_with(44220, 44229, |c| c.media.connect_timeout_ms = 1500).await;
    let total = gw.ports.total();
    let api = Api::new(gw.base_url());
    let room = api.create_room("no-dtls").await;
    let p = Peer::join(&api, &room, "no-dtls").await;
    p.block_dtls();
    p.publish();
    p.wait("FAILED", 10, |l| !l.events("FAILED").is_empty()).await;
    let reason = p.with(|l| l.events("FAILED")[0]["reason"].clone());
    assert_eq!(reason, "dtls_timeout", "ICE connected, DTLS did not");
    assert_eq!(p.state_sequence("publish"), ["INITIAL", "GATHERED", "FAILED"]);
    eventually("port back", 5, || gw.ports.free() == total).await;
    gw.shutdown(Duration::from_secs(1)).await;
}
