//! Moderation through the media plane: the app backend mutes a publisher's video over REST and
//! the gateway stops forwarding it (audio goes on), subscribers hear `track_muted`; unmuted,
//! the video comes back from a keyframe the gateway asks for.

mod common;

use std::time::Duration;

use common::*;
use str0m::media::MediaKind;

fn count(p: &Peer, kind: MediaKind) -> usize {
    p.with(|l| l.rtp.iter().filter(|(k, _)| *k == kind).count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_muted_stream_is_not_forwarded_until_unmuted() {
    let gw = start_gateway(48100, 48109).await;
    let api = Api::new(gw.base_url());
    let room = api.create_room("moderation").await;
    let (publisher, subs) = call(&api, &room, &["viewer"]).await;
    let viewer = &subs[0];
    publisher.send_media(1000);
    viewer
        .wait("video and audio", 10, |l| {
            l.rtp.iter().any(|(k, _)| *k == MediaKind::Video) && l.rtp.iter().any(|(k, _)| *k == MediaKind::Audio)
        })
        .await;

    let mute = format!("/v1/rooms/{room}/participants/pub/mute");
    let (s, v) = api.call("POST", &mute, Some(serde_json::json!({ "kind": "video", "muted": true }))).await;
    assert_eq!(s, 200, "{v}");
    viewer.wait("track_muted", 5, |l| l.of_type("track_muted").iter().any(|m| m["moderated"] == true)).await;
    // What was on the wire when the mute landed has arrived by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (v1, a1) = (count(viewer, MediaKind::Video), count(viewer, MediaKind::Audio));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (v2, a2) = (count(viewer, MediaKind::Video), count(viewer, MediaKind::Audio));
    assert_eq!(v2, v1, "no video while muted");
    assert!(a2 >= a1 + 30, "audio goes on: {a1} -> {a2}");
    // The muted packets are counted.
    api.metric_reaches("gateway_moderated_packets_total", 100.0, 5).await;

    let kf_before = publisher.with(|l| l.keyframe_requests);
    let (s, _) = api.call("POST", &mute, Some(serde_json::json!({ "kind": "video", "muted": false }))).await;
    assert_eq!(s, 200);
    viewer.wait("track_unmuted", 5, |l| !l.of_type("track_unmuted").is_empty()).await;
    viewer.wait("video again", 5, |l| l.rtp.iter().filter(|(k, _)| *k == MediaKind::Video).count() > v2 + 20).await;
    assert!(publisher.with(|l| l.keyframe_requests) > kf_before, "the gateway asked for a keyframe to resume");
    let (s, room_view) = api.call("GET", &format!("/v1/rooms/{room}"), None).await;
    assert_eq!(s, 200);
    assert!(room_view["streams"].as_array().unwrap().iter().all(|s| s["muted"] == false && s["moderated"] == false));
    gw.shutdown(Duration::from_secs(1)).await;
}
