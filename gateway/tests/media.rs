//! Media through a real gateway over loopback UDP, with str0m test peers that use only the
//! public API: one publishes, two subscribe and get the payloads intact, a late joiner gets the
//! existing streams by re-offer and causes a keyframe request upstream, leaving ends FINISHED
//! and every port returns to the pool.

mod common;

use std::time::Duration;

use common::*;
use str0m::media::MediaKind;

fn received(p: &Peer, kind: MediaKind) -> Vec<Vec<u8>> {
    p.with(|l| l.rtp.iter().filter(|(k, _)| *k == kind).map(|(_, b)| b.clone()).collect())
}

fn sent(p: &Peer, kind: MediaKind) -> Vec<Vec<u8>> {
    p.with(|l| l.sent.iter().filter(|(k, _)| *k == kind).map(|(_, b)| b.clone()).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_fan_out_late_join_and_leave() {
    fan_out_late_join_and_leave(44000, 44049, false).await;
}

/// The same with `media.mux`: each worker's connections share one port (44050 or 44051).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_fan_out_late_join_and_leave_on_one_port_per_worker() {
    fan_out_late_join_and_leave(44050, 44051, true).await;
}

async fn fan_out_late_join_and_leave(port_min: u16, port_max: u16, mux: bool) {
    let gw = start_gateway_with(port_min, port_max, |c| c.media.mux = mux).await;
    let total_ports = gw.ports.total();
    let api = Api::new(gw.base_url());
    let room = api.create_room("media-room").await;

    let publisher = Peer::join(&api, &room, "pub").await;
    publisher.publish();
    publisher.wait("publish READY", 10, |l| !l.events("READY").is_empty() && l.connected).await;
    assert_eq!(publisher.state_sequence("publish"), ["INITIAL", "GATHERED", "READY"]);

    let sub1 = Peer::join(&api, &room, "sub1").await;
    let sub2 = Peer::join(&api, &room, "sub2").await;
    for s in [&sub1, &sub2] {
        s.wait("joined lists the publisher's streams", 5, |l| {
            l.of_type("joined").first().is_some_and(|j| j["streams"].as_array().is_some_and(|a| a.len() == 2))
        })
        .await;
        s.subscribe();
    }
    for s in [&sub1, &sub2] {
        s.wait("subscribe READY", 10, |l| l.connected && !l.events("READY").is_empty()).await;
        assert_eq!(s.state_sequence("subscribe"), ["INITIAL", "GATHERED", "READY"]);
        // The offer declares the SSRCs it will send, with msid naming the publisher, and RTX.
        let offer = s.with(|l| l.offers[0].clone());
        assert!(offer.contains("a=msid:pub "), "offer names the publisher in msid:\n{offer}");
        assert!(offer.contains("a=ssrc-group:FID"), "video has an RTX group:\n{offer}");
        assert!(offer.matches("a=ssrc:").count() >= 3, "SSRCs declared:\n{offer}");
        assert!(offer.contains("m=application"), "data channel present");
    }

    // 100 video + 50 audio packets with distinct payloads; every one arrives intact at both.
    publisher.send_media(100);
    for s in [&sub1, &sub2] {
        s.wait("all media", 15, |l| l.rtp.len() >= 150).await;
    }
    let sent_video = sent(&publisher, MediaKind::Video);
    let sent_audio = sent(&publisher, MediaKind::Audio);
    assert_eq!((sent_video.len(), sent_audio.len()), (100, 50));
    for s in [&sub1, &sub2] {
        assert_eq!(received(s, MediaKind::Video), sent_video, "{} video payloads intact and in order", s.name);
        assert_eq!(received(s, MediaKind::Audio), sent_audio, "{} audio payloads intact and in order", s.name);
    }

    // Prometheus counts what flowed. Each worker publishes its counters once a second on its own
    // clock, so wait until every figure has arrived rather than for one sum: with two workers
    // one may already count what the other has not published yet.
    let series = r#"gateway_rtp_packets_total{direction="out",kind="video"}"#;
    let apir = &api;
    let egress = poll_until("forwarded media counted by every worker, every forward under 100 ms", 5, || async move {
        let out = apir.metric(series).await;
        let into = apir.metric(r#"gateway_rtp_packets_total{direction="in",kind="video"}"#).await;
        // The gateway timed every forwarded packet from its read to its send (300 media packets to
        // the two subscribers, plus what flowed while they joined); on loopback each well under 100 ms.
        let (mut timed, mut under_100ms) = (0.0, 0.0);
        // Per-worker egress (published with the latency above).
        let mut egress = Vec::new();
        for w in ["0", "1"] {
            timed += apir.metric(&format!(r#"gateway_forward_latency_seconds_count{{worker="{w}"}}"#)).await;
            under_100ms +=
                apir.metric(&format!(r#"gateway_forward_latency_seconds_bucket{{worker="{w}",le="0.1"}}"#)).await;
            let packets = apir.metric(&format!(r#"gateway_worker_egress_packets_total{{worker="{w}"}}"#)).await;
            let bytes = apir.metric(&format!(r#"gateway_worker_egress_bytes_total{{worker="{w}"}}"#)).await;
            egress.push((packets, bytes));
        }
        // Spread: one subscriber on each worker, so each sent that subscriber's 150 packets.
        // Otherwise the room's worker sent at least the 300 forwarded media packets.
        let egress_done =
            if spread_mode() { egress.iter().all(|e| e.0 >= 150.0) } else { egress.iter().any(|e| e.0 >= 300.0) };
        // The count and the bucket come from two scrapes: equal once no worker published between.
        if out >= 200.0 && into >= 100.0 && timed >= 300.0 && egress_done && under_100ms == timed {
            Ok(egress)
        } else {
            Err(format!(
                "{series} = {out}, in = {into}, timed = {timed}, under 100 ms = {under_100ms}, egress = {egress:?}"
            ))
        }
    })
    .await;
    if !spread_mode() {
        assert!(egress.iter().any(|e| e.0 == 0.0 && e.1 == 0.0), "a room is served by one worker: {egress:?}");
    }
    assert!(egress.iter().all(|e| e.1 >= e.0 * 12.0), "bytes counted with the packets: {egress:?}");
    assert_eq!(api.metric(r#"gateway_connections{state="READY"}"#).await, 3.0);
    assert_eq!(api.metric(r#"gateway_connection_setup_seconds_count{role="subscribe"}"#).await, 2.0);
    assert_eq!(api.metric(r#"gateway_connection_transitions_total{from="GATHERED",to="READY"}"#).await, 3.0);

    // A second `subscribe` with nothing changed still gets an offer, and its answer applies cleanly.
    let offers = sub2.with(|l| l.offers.len());
    sub2.subscribe();
    sub2.wait("a repeated offer", 5, |l| l.offers.len() == offers + 1).await;
    sub2.wait("SDP_PROCESSED for the re-answer", 5, |l| l.events("SDP_PROCESSED").len() >= 2).await;
    assert!(sub2.with(|l| l.of_type("error").is_empty()), "no errors: {:?}", sub2.with(|l| l.of_type("error")));

    // A late joiner gets the existing streams and a keyframe request goes upstream, while the
    // publisher keeps sending as a camera does (3 s at 100 video packets/s). A paused publisher
    // would not do: its layers count as inactive after a while, so a subscriber joining then has
    // nothing to target and asks only once media resumes (under load the join alone can take that long).
    let video_before = sent(&publisher, MediaKind::Video).len();
    publisher.send_media(300);
    tokio::time::sleep(Duration::from_millis(600)).await; // past the keyframe throttle window

    // Counted from here, so a request drawn by the first burst cannot pass for the late joiner's.
    let keyframe_requests_before = publisher.with(|l| l.keyframe_requests);
    let sub3 = Peer::join(&api, &room, "sub3").await;
    sub3.subscribe();
    sub3.wait("subscribe READY", 10, |l| l.connected && !l.events("READY").is_empty()).await;
    let offer = sub3.with(|l| l.offers[0].clone());
    assert_eq!(offer.matches("m=video").count(), 1, "late joiner's offer carries the video stream");
    assert_eq!(offer.matches("m=audio").count(), 1, "and the audio stream");
    publisher
        .wait("a keyframe request for the late joiner", 5, |l| l.keyframe_requests > keyframe_requests_before)
        .await;
    publisher
        .wait("the second burst sent", 15, |l| {
            l.sent.iter().filter(|(k, _)| *k == MediaKind::Video).count() == video_before + 300
        })
        .await;
    // From the keyframe it asked for to the end of the burst: every packet, intact and in order.
    let video_at = |p: &Peer| received(p, MediaKind::Video).len();
    sub3.wait("media at the late joiner", 10, |l| l.rtp.iter().filter(|(k, _)| *k == MediaKind::Video).count() >= 20)
        .await;
    let mut got = video_at(&sub3);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = video_at(&sub3);
        if now == got {
            break;
        }
        got = now;
    }
    assert_eq!(received(&sub3, MediaKind::Video), sent_video_tail(&publisher, got));

    // sub1 leaves: FINISHED, socket closed normally, the others are told.
    let sub1_conn = sub1.connection_id("subscribe").unwrap();
    sub1.leave();
    sub1.wait("FINISHED and close", 5, |l| !l.events("FINISHED").is_empty() && l.ws_closed == Some(1000)).await;
    assert_eq!(sub1.state_sequence("subscribe"), ["INITIAL", "GATHERED", "READY", "FINISHED"]);
    sub2.wait("participant_left", 5, |l| l.of_type("participant_left").iter().any(|m| m["participant_id"] == "sub1"))
        .await;
    let (status, detail) = api.call("GET", &format!("/v1/connections/{sub1_conn}"), None).await;
    assert_eq!(status, 200);
    assert_eq!(detail["state"], "FINISHED");
    assert_eq!(detail["events"].as_array().unwrap().last().unwrap()["reason"], "leave");

    // The publisher leaves: subscribers see stream_removed and get a re-offer without it.
    let offers_before = sub2.with(|l| l.offers.len());
    publisher.leave();
    sub2.wait("stream_removed", 5, |l| l.of_type("stream_removed").len() == 2).await;
    sub2.wait("re-offer", 5, |l| l.offers.len() > offers_before).await;
    let last = sub2.with(|l| l.offers.last().unwrap().clone());
    assert!(
        last.contains("m=video 0 ") || last.contains("m=video 0\r"),
        "stopped video section in the re-offer:\n{last}"
    );

    sub2.leave();
    sub3.leave();
    for s in [&sub2, &sub3] {
        s.wait("closed", 5, |l| l.ws_closed.is_some()).await;
    }
    eventually("every port back in the pool", 5, || gw.ports.free() == total_ports).await;
    if mux {
        assert_eq!(total_ports, 0, "no port is taken per connection");
        // Each candidate named a worker's one port.
        let candidates: Vec<String> = sub2.with(|l| {
            l.of_type("candidate").iter().map(|m| m["candidate"].as_str().unwrap_or_default().to_owned()).collect()
        });
        assert!(!candidates.is_empty(), "the gateway trickled its candidate");
        let on_shared = candidates
            .iter()
            .all(|c| c.contains(&format!(" {port_min} typ")) || c.contains(&format!(" {port_max} typ")));
        assert!(on_shared, "candidates name the shared ports");
        let apir = &api;
        poll_until("the workers hold no connection", 5, || async move {
            let mut n = 0.0;
            for w in ["0", "1"] {
                n += apir.metric(&format!(r#"gateway_worker_connections{{worker="{w}"}}"#)).await;
            }
            if n == 0.0 {
                Ok(())
            } else {
                Err(format!("{n} connections"))
            }
        })
        .await;
    }
    let (_, rooms) = api.call("GET", &format!("/v1/rooms/{room}"), None).await;
    assert_eq!(rooms["participants"].as_array().unwrap().len(), 0);
    gw.shutdown(Duration::from_secs(1)).await;
}

fn sent_video_tail(p: &Peer, n: usize) -> Vec<Vec<u8>> {
    let all = sent(p, MediaKind::Video);
    all[all.len() - n..].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_pli_storm_is_merged_and_throttled() {
    let gw = start_gateway(44060, 44069).await;
    let api = Api::new(gw.base_url());
    let room = api.create_room("pli-room").await;
    let (publisher, subs) = call(&api, &room, &["s1", "s2"]).await;
    publisher.send_media(400); // 4 s of video at 100 packets/s
    for s in &subs {
        s.wait("video", 5, |l| l.rtp.iter().any(|(k, _)| *k == MediaKind::Video)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let pub_conn = publisher.connection_id("publish").unwrap();
    let stat = |d: &serde_json::Value, k: &str| d["stats"][k].as_u64().unwrap();
    let (_, d) = api.call("GET", &format!("/v1/connections/{pub_conn}"), None).await;
    let out_before = stat(&d, "keyframe_requests_out");
    let seen_before = publisher.with(|l| l.keyframe_requests);
    // Two subscribers each ask every 50 ms for 2 s: 80 requests.
    let t0 = std::time::Instant::now();
    for s in &subs {
        s.request_keyframes(40);
    }
    for s in &subs {
        s.wait("all PLIs sent", 10, |l| l.plis_sent == 40).await;
    }
    let storm = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (_, d) = api.call("GET", &format!("/v1/connections/{pub_conn}"), None).await;
    let upstream = stat(&d, "keyframe_requests_out") - out_before;
    let mut received = 0;
    for s in &subs {
        let id = s.connection_id("subscribe").unwrap();
        let (_, d) = api.call("GET", &format!("/v1/connections/{id}"), None).await;
        received += stat(&d, "keyframe_requests_in");
    }
    println!("{received} subscriber PLIs over {storm:?} became {upstream} upstream keyframe requests");
    assert!(received >= 80, "the gateway saw the storm: {received}");
    // One per 500 ms window, plus the merged one that fires when the last window closes.
    let windows = (storm.as_millis() / 500) as u64 + 2;
    assert!(upstream >= 2 && upstream <= windows, "{upstream} upstream requests for {windows} windows");
    assert!(publisher.with(|l| l.keyframe_requests) > seen_before, "requests reached the publisher");
    gw.shutdown(Duration::from_secs(1)).await;
}

/// Loss on a subscriber's downlink is repaired from the gateway's send buffer (RTX); loss on the
/// publisher's uplink is NACKed upstream by the gateway. Every video payload arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_packets_are_recovered_on_both_legs() {
    let gw = start_gateway(44070, 44079).await;
    let api = Api::new(gw.base_url());
    let room = api.create_room("loss-room").await;
    let (publisher, mut subs) = call(&api, &room, &["sub"]).await;
    let sub = subs.remove(0);

    // A receiver cannot ask for what precedes the first packet it sees, so the stream starts
    // clean; then loss on both legs.
    publisher.send_media(5);
    sub.wait("the first packets", 10, |l| l.rtp.iter().filter(|(k, _)| *k == MediaKind::Video).count() >= 5).await;
    publisher.lossy(0, 17); // ~6% of the publisher's RTP never reaches the gateway
    sub.lossy(13, 0); // ~8% of the gateway's RTP never reaches the subscriber
    publisher.send_media(195);
    sub.wait("every video payload", 20, |l| l.rtp.iter().filter(|(k, _)| *k == MediaKind::Video).count() >= 200).await;
    let mut got = received(&sub, MediaKind::Video);
    let mut want = sent(&publisher, MediaKind::Video);
    got.sort();
    got.dedup();
    want.sort();
    assert_eq!(got, want, "all 200 video payloads recovered");
    let (up, down) = (publisher.with(|l| l.dropped_tx), sub.with(|l| l.dropped_rx));
    println!("recovered every packet with {up} dropped upstream and {down} dropped downstream");
    assert!(up >= 10 && down >= 10, "loss really happened on both legs: {up} {down}");

    // The repair is visible to operators: NACK counters, and per-connection stats.
    let apir = &api;
    poll_until("NACK counters", 6, || async move {
        let nin = apir.metric(r#"gateway_nacks_total{direction="in"}"#).await;
        let nout = apir.metric(r#"gateway_nacks_total{direction="out"}"#).await;
        if nin > 0.0 && nout > 0.0 {
            Ok(())
        } else {
            Err(format!("in={nin} out={nout}"))
        }
    })
    .await;
    // str0m reports stats once a second: wait for a report that covers the repair. The
    // bitrate is that of the last report's interval, 0 once the media has stopped (waiting for
    // the counters above can outlast it), so the publisher keeps sending while this waits.
    let path = format!("/v1/connections/{}", sub.connection_id("subscribe").unwrap());
    let path = &path;
    let publisher = &publisher;
    let d = poll_until("retransmissions counted and a bitrate reported", 10, || async move {
        publisher.send_media(10);
        let (_, d) = apir.call("GET", path, None).await;
        let rated = d["stats"]["egress"]
            .as_array()
            .is_some_and(|e| e.iter().any(|m| m["bitrate_bps"].as_u64().unwrap_or(0) > 10_000));
        // The bitrate needs a second report: on a loaded machine it may come after the count.
        if d["stats"]["retransmitted_packets"].as_u64().unwrap() >= 10 && rated {
            Ok(d)
        } else {
            Err(d["stats"].to_string())
        }
    })
    .await;
    let stats = &d["stats"];
    assert_eq!(stats["selected_pair"]["protocol"], "udp", "{stats}");
    let (_, p) =
        api.call("GET", &format!("/v1/connections/{}", publisher.connection_id("publish").unwrap()), None).await;
    assert_eq!(p["stats"]["srtp_profile"], "AEAD_AES_256_GCM", "{}", p["stats"]);
    assert_eq!(stats["selected_pair"]["remote"], sub.local.to_string());
    let codecs: Vec<&str> = stats["codecs"].as_array().unwrap().iter().map(|c| c["codec"].as_str().unwrap()).collect();
    assert!(codecs.iter().any(|c| c.starts_with("vp8/90000")), "{codecs:?}");
    assert!(codecs.iter().any(|c| c.starts_with("opus/48000")), "{codecs:?}");
    assert!(stats["egress"].as_array().unwrap().iter().any(|m| m["nacks"].as_u64().unwrap() > 0), "{stats}");
    assert!(
        stats["egress"].as_array().unwrap().iter().any(|m| m["bitrate_bps"].as_u64().unwrap_or(0) > 10_000),
        "{stats}"
    );
    println!("retransmitted {} packets to the subscriber", stats["retransmitted_packets"]);
    api.metric_reaches("gateway_retransmitted_packets_total", 10.0, 5).await;
    gw.shutdown(Duration::from_secs(1)).await;
}
