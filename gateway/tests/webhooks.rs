//! Webhooks end to end: a real gateway, str0m peers over loopback, and a real HTTP receiver in
//! Python (`webhook_receiver.py`) that verifies every request with PyPI's `standardwebhooks`,
//! answers 500 to the first attempt of every third event and expects the same `webhook-id`
//! again. Checks the events and their order for a call, a kick, a client that vanishes, a
//! client whose ICE never completes, and a shutdown.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The Python with `standardwebhooks`: $WEBHOOK_PYTHON, or the venv scripts/test.sh makes.
fn python() -> Option<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let candidates =
        [std::env::var_os("WEBHOOK_PYTHON").map(PathBuf::from), Some(repo.join("target/webhook-venv/bin/python"))];
    let found = candidates.into_iter().flatten().find(|p| {
        Command::new(p).arg(receiver_script()).arg("--check").stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").is_err(),
            "CI needs python with standardwebhooks (scripts/test.sh installs it into target/webhook-venv)"
        );
        eprintln!("SKIPPED: no python with standardwebhooks; scripts/test.sh installs it (or set WEBHOOK_PYTHON)");
    }
    found
}

fn receiver_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/webhook_receiver.py")
}

struct Receiver {
    child: Child,
    url: String,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Receiver {
    async fn start(python: &Path, port: u16) -> Receiver {
        let child = Command::new(python)
            .arg(receiver_script())
            .arg(port.to_string())
            .arg(SECRET)
            .arg("3")
            .stdout(Stdio::null())
            .spawn()
            .expect("receiver starts");
        let r = Receiver { child, url: format!("http://127.0.0.1:{port}") };
        let url = r.url.clone();
        let url = &url;
        poll_until("the receiver", 10, || async move {
            reqwest::get(url.as_str()).await.map(|_| ()).map_err(|e| e.to_string())
        })
        .await;
        r
    }

    async fn state(&self) -> Value {
        reqwest::get(&self.url).await.unwrap().json().await.unwrap()
    }

    /// The events of one room, in arrival order, once `done` holds for them.
    async fn room_events(&self, room: &str, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let done = &done;
        poll_until(what, 20, || async move {
            let st = self.state().await;
            let evs: Vec<Value> =
                st["events"].as_array().unwrap().iter().filter(|e| e["room"]["room_id"] == room).cloned().collect();
            if done(&evs) {
                Ok(evs)
            } else {
                Err(format!("{:#}", summary(&evs)))
            }
        })
        .await
    }

    /// Every signature verified; every event answered 500 once came again and was accepted.
    async fn check_delivery(&self) {
        let st = self.state().await;
        assert_eq!(st["bad_signatures"], 0, "{st}");
        assert_eq!(st["duplicates"], 0, "nothing delivered twice after a 2xx: {st}");
        let failed = st["failed_ids"].as_array().unwrap();
        assert!(!failed.is_empty(), "the receiver refused some first attempts");
        assert_eq!(failed, st["redelivered"].as_array().unwrap(), "each refused event came again, same webhook-id");
    }
}

fn summary(evs: &[Value]) -> Value {
    Value::Array(
        evs.iter()
            .map(|e| {
                json!(format!(
                    "{} {} {} {}",
                    e["sequence"],
                    e["type"].as_str().unwrap_or("?"),
                    e["participant"]["participant_id"].as_str().unwrap_or("-"),
                    e["reason"].as_str().unwrap_or("-")
                ))
            })
            .collect(),
    )
}

fn types(evs: &[Value]) -> Vec<String> {
    evs.iter()
        .map(|e| match e["participant"]["participant_id"].as_str() {
            Some(p) => format!("{}:{p}", e["type"].as_str().unwrap()),
            None => e["type"].as_str().unwrap().to_owned(),
        })
        .collect()
}

fn has(evs: &[Value], t: &str) -> bool {
    evs.iter().any(|e| e["type"] == t)
}

/// Per room: sequence 1, 2, 3, … in arrival order (delivery is in order per room, no gaps).
fn assert_sequenced(evs: &[Value]) {
    let seqs: Vec<u64> = evs.iter().map(|e| e["sequence"].as_u64().unwrap()).collect();
    let want: Vec<u64> = (1..=evs.len() as u64).collect();
    assert_eq!(seqs, want, "{:#}", summary(evs));
    for e in evs {
        assert!(e["id"].as_str().unwrap().starts_with("evt_"), "{e}");
        assert!(e["timestamp"].as_str().unwrap().ends_with('Z'), "{e}");
        for field in ["room", "participant", "connection_id", "reason", "track"] {
            assert!(e.get(field).is_some(), "{field} always present: {e}");
        }
    }
}

async fn gateway(
    port_min: u16,
    receiver: &Receiver,
    adjust: impl FnOnce(&mut gateway::config::GatewayConfig),
) -> gateway::server::Running {
    let url = format!("{}/hooks", receiver.url);
    start_gateway_with(port_min, port_min + 9, |c| {
        c.webhook.urls = vec![url];
        c.webhook.secret = SECRET.into();
        c.webhook.retry_initial_ms = 100;
        adjust(c);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_is_reported_in_order_and_signed() {
    let Some(py) = python() else { return };
    let rx = Receiver::start(&py, 48000).await;
    let gw = gateway(48010, &rx, |_| {}).await;
    let api = Api::new(gw.base_url());
    let room = api.create_room("webhook-call").await;
    let (publisher, subs) = call(&api, &room, &["viewer"]).await;
    publisher.send_media(20);
    rx.room_events(&room, "joins and tracks", |e| e.iter().filter(|e| e["type"] == "participant_joined").count() == 2)
        .await;

    publisher.leave();
    publisher.wait("closed", 5, |l| l.ws_closed.is_some()).await;
    subs[0].leave();
    subs[0].wait("closed", 5, |l| l.ws_closed.is_some()).await;
    let (s, _) = api.call("DELETE", &format!("/v1/rooms/{room}"), None).await;
    assert_eq!(s, 204);

    let evs = rx.room_events(&room, "room_finished", |e| has(e, "room_finished")).await;
    assert_sequenced(&evs);
    assert_eq!(
        types(&evs),
        [
            "room_started",
            "participant_joined:pub",
            "track_published:pub",
            "track_published:pub",
            "participant_joined:viewer",
            "track_unpublished:pub",
            "track_unpublished:pub",
            "participant_left:pub",
            "participant_left:viewer",
            "room_finished",
        ],
        "{:#}",
        summary(&evs)
    );
    assert_eq!(evs[0]["room"], json!({ "room_id": room, "name": "webhook-call" }));
    assert_eq!(evs[1]["participant"], json!({ "participant_id": "pub", "name": "pub" }));
    assert!(evs[1]["connection_id"].as_str().unwrap().starts_with("c_"), "joined names its READY connection");
    let kinds: Vec<&str> = evs[2..4].iter().map(|e| e["track"]["kind"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"audio") && kinds.contains(&"video"), "{kinds:?}");
    let ids = |r: std::ops::Range<usize>| {
        let mut v: Vec<String> = evs[r].iter().map(|e| e["track"]["stream_id"].as_str().unwrap().to_owned()).collect();
        v.sort();
        v
    };
    assert_eq!(ids(2..4), ids(5..7), "every published track is unpublished");
    assert_eq!(evs[5]["reason"], "participant_left");
    assert_eq!(evs[7]["reason"], "leave");
    assert_eq!(evs[8]["reason"], "leave");
    assert_eq!(evs[9]["reason"], "room_closed");
    rx.check_delivery().await;
    assert!(api.metric("gateway_webhook_deliveries_total{outcome=\"delivered\"}").await >= 10.0);
    assert!(api.metric("gateway_webhook_attempts_total{result=\"http_5xx\"}").await >= 3.0);
    assert_eq!(api.metric("gateway_webhook_queue_depth").await, 0.0);
    assert_eq!(api.metric("gateway_webhook_dropped_total").await, 0.0);
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kick_vanish_and_shutdown_say_why() {
    let Some(py) = python() else { return };
    let rx = Receiver::start(&py, 48001).await;
    let gw = gateway(48020, &rx, |c| c.signaling.reconnect_grace_ms = 300).await;
    let api = Api::new(gw.base_url());
    let room = api.create_room("webhook-why").await;
    let kicked = Peer::join(&api, &room, "kicked").await;
    kicked.subscribe();
    let vanishing = Peer::join(&api, &room, "vanishing").await;
    vanishing.subscribe();
    let stays = Peer::join(&api, &room, "stays").await;
    stays.subscribe();
    for p in [&kicked, &vanishing, &stays] {
        p.wait("READY", 10, |l| l.connected).await;
    }
    rx.room_events(&room, "three joins", |e| e.iter().filter(|e| e["type"] == "participant_joined").count() == 3).await;

    let (s, _) = api.call("DELETE", &format!("/v1/rooms/{room}/participants/kicked"), None).await;
    assert_eq!(s, 204);
    // The client vanishes: its WebSocket and UDP go without a word.
    drop(vanishing);
    let evs =
        rx.room_events(&room, "two left", |e| e.iter().filter(|e| e["type"] == "participant_left").count() == 2).await;
    let left: Vec<(String, String)> = evs
        .iter()
        .filter(|e| e["type"] == "participant_left")
        .map(|e| (e["participant"]["participant_id"].as_str().unwrap().into(), e["reason"].as_str().unwrap().into()))
        .collect();
    assert!(left.contains(&("kicked".into(), "kicked".into())), "{left:?}");
    assert!(left.contains(&("vanishing".into(), "signaling_lost".into())), "{left:?}");

    // Shutdown: the one still there leaves with `shutdown`, the room finishes, and both are
    // delivered before the gateway is gone.
    gw.shutdown(Duration::from_secs(2)).await;
    let st = rx.state().await;
    let evs: Vec<Value> =
        st["events"].as_array().unwrap().iter().filter(|e| e["room"]["room_id"] == room).cloned().collect();
    assert_sequenced(&evs);
    let n = evs.len();
    assert!(n >= 2, "{:#}", summary(&evs));
    assert_eq!(types(&evs[n - 2..]), ["participant_left:stays", "room_finished"], "{:#}", summary(&evs));
    assert_eq!(evs[n - 2]["reason"], "shutdown");
    assert_eq!(evs[n - 1]["reason"], "shutdown");
    rx.check_delivery().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ice_that_never_completes_fails_without_a_join() {
    let Some(py) = python() else { return };
    let rx = Receiver::start(&py, 48002).await;
    let gw = gateway(48030, &rx, |c| c.media.connect_timeout_ms = 800).await;
    let api = Api::new(gw.base_url());
    let room = api.create_room("webhook-no-ice").await;

    // Answers the offer (GATHERED) but never sends an ICE check.
    let p = Peer::join(&api, &room, "no-ice").await;
    p.ignore_offers();
    p.mute_udp();
    p.raw(json!({ "type": "subscribe" }));
    p.wait("offer", 5, |l| !l.of_type("offer").is_empty()).await;
    let offer = p.with(|l| l.of_type("offer")[0].clone());
    let mut rtc = str0m::Rtc::builder().set_rtp_mode(true).build(std::time::Instant::now());
    let o = str0m::change::SdpOffer::from_sdp_string(offer["sdp"].as_str().unwrap()).unwrap();
    let a = rtc.sdp_api().accept_offer(o).unwrap();
    p.raw(json!({ "type": "answer", "connection_id": offer["connection_id"], "sdp": a.to_sdp_string() }));
    p.wait("FAILED", 5, |l| !l.events("FAILED").is_empty()).await;
    // It leaves (its socket is muted with its UDP, so the close is not recorded): still no
    // participant_left, as it never joined.
    p.leave();
    poll_until("it has left", 5, || async {
        let (_, r) = api.call("GET", &format!("/v1/rooms/{room}"), None).await;
        if r["participants"].as_array().is_some_and(|p| p.is_empty()) {
            Ok(())
        } else {
            Err(r.to_string())
        }
    })
    .await;
    let (s, _) = api.call("DELETE", &format!("/v1/rooms/{room}"), None).await;
    assert_eq!(s, 204);

    let evs = rx.room_events(&room, "room_finished", |e| has(e, "room_finished")).await;
    assert_sequenced(&evs);
    assert_eq!(types(&evs), ["room_started", "connection_failed:no-ice", "room_finished"], "{:#}", summary(&evs));
    assert_eq!(evs[1]["reason"], "ice_timeout");
    assert_eq!(evs[1]["connection_id"], offer["connection_id"]);
    rx.check_delivery().await;
    gw.shutdown(Duration::from_secs(1)).await;
}
