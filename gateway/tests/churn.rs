//! Churn: rooms created and deleted, join → publish → subscribe → leave cycles, and clients that
//! vanish mid-handshake. Afterwards every port is back, no room, connection or session remains,
//! tasks and file descriptors are back to baseline, and RSS growth is bounded.
//!
//! Size by environment: `CHURN_ROOMS` (default 8) × `CHURN_CYCLES` (default 4 per room) full
//! cycles, plus as many vanishing clients; `CHURN_PARALLEL` rooms (default 1) churn at the same
//! time. A cycle is latency-bound (~0.25 s, mostly ICE and DTLS round trips), so long runs use
//! parallel rooms: `CHURN_ROOMS=60 CHURN_CYCLES=20 CHURN_PARALLEL=6 cargo test --release -p
//! gateway --test churn -- --nocapture` is the soak the test script runs.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) * 4
}

/// Counts of one room's churn.
#[derive(Default)]
struct Churned {
    full_cycles: usize,
    vanished: usize,
    /// Cycles whose first burst of media never reached the subscriber (a second burst did).
    missed_first_media: usize,
}

/// The gateway's view of a connection, for a failure report.
async fn gateway_view(api: &Api, peer: &Peer, role: &str) -> String {
    let Some(id) = peer.connection_id(role) else { return format!("{}: no {role} connection", peer.name) };
    let (_, d) = api.call("GET", &format!("/v1/connections/{id}"), None).await;
    let s = &d["stats"];
    format!(
        "{} {role} {id} {}: rtp in {}, out {}, egress {}",
        peer.name, d["state"], s["rtp_packets_in"], s["rtp_packets_out"], s["egress"]
    )
}

/// One room: `cycles` times a publisher and a subscriber join, exchange media and leave, and a
/// client subscribes and vanishes. Every other room is deleted at the end, ghosts possibly still
/// in their grace period.
async fn churn_room(api: &Api, r: usize, cycles: usize) -> Churned {
    let room = api.create_room(&format!("churn-{r}")).await;
    let mut n = Churned::default();
    for c in 0..cycles {
        let (publisher, subs) = call(api, &room, &[&format!("s{c}")]).await;
        publisher.send_media(10);
        let deadline = Instant::now() + Duration::from_secs(5);
        while subs[0].with(|l| l.rtp.is_empty()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if subs[0].with(|l| l.rtp.is_empty()) {
            // Seen about once in 12,000 release-soak cycles: a fresh subscriber gets none of the
            // first burst. Report it with the gateway's view, then check a second burst arrives.
            let sent = publisher.with(|l| l.sent.len());
            eprintln!(
                "churn-{r} cycle {c}: no media 5 s after the publisher wrote {sent} packets; gateway: {}; {}",
                gateway_view(api, &publisher, "publish").await,
                gateway_view(api, &subs[0], "subscribe").await
            );
            n.missed_first_media += 1;
            publisher.send_media(10);
            subs[0].wait("media after a second burst", 10, |l| !l.rtp.is_empty()).await;
        }
        publisher.leave();
        subs[0].leave();
        for p in [&publisher, &subs[0]] {
            p.wait("closed", 10, |l| l.ws_closed.is_some()).await;
        }
        n.full_cycles += 1;

        // A client that vanishes mid-handshake: subscribes, then its socket drops.
        let token = api.token(&room, &format!("ghost{c}")).await;
        let (mut ws, _) = tokio_tungstenite::connect_async(api.ws_url(&token)).await.unwrap();
        ws.send(Message::Text(json!({ "type": "subscribe" }).to_string().into())).await.unwrap();
        drop(ws);
        n.vanished += 1;
    }
    if r % 2 == 0 {
        let (s, _) = api.call("DELETE", &format!("/v1/rooms/{room}"), None).await;
        assert_eq!(s, 204);
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_leaves_nothing_behind() {
    let rooms = env_or("CHURN_ROOMS", 8);
    let cycles = env_or("CHURN_CYCLES", 4);
    let parallel = env_or("CHURN_PARALLEL", 1).max(1);
    let gw = start_gateway_with(44500, 44599, |c| {
        c.signaling.reconnect_grace_ms = 300;
        c.media.negotiation_timeout_ms = 1000;
        c.limits.max_rooms = 100_000;
    })
    .await;
    let api = Api::new(gw.base_url());
    let total_ports = gw.ports.total();
    let tokio_rt = tokio::runtime::Handle::current();

    // Warm up once so lazily created things (pools, TLS-free HTTP client) are in the baseline.
    let warm = api.create_room("warm").await;
    let (p, s) = call(&api, &warm, &["w"]).await;
    p.leave();
    s[0].leave();
    api.call("DELETE", &format!("/v1/rooms/{warm}"), None).await;
    eventually("warm-up ports back", 10, || gw.ports.free() == total_ports).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (fds0, tasks0, rss0) = (open_fds(), tokio_rt.metrics().num_alive_tasks(), rss_kib());

    let t0 = Instant::now();
    let Churned { full_cycles, vanished, missed_first_media } = futures_util::stream::iter(0..rooms)
        .map(|r| churn_room(&api, r, cycles))
        .buffer_unordered(parallel)
        .fold(Churned::default(), |a, b| async move {
            Churned {
                full_cycles: a.full_cycles + b.full_cycles,
                vanished: a.vanished + b.vanished,
                missed_first_media: a.missed_first_media + b.missed_first_media,
            }
        })
        .await;
    let elapsed = t0.elapsed();

    // Ghosts' grace periods end; their connections end FINISHED and free their ports.
    eventually("every port back in the pool", 15, || gw.ports.free() == total_ports).await;
    let reg = &gw.state.registry;
    eventually("every participant gone", 10, || reg.census().participants == 0).await;
    // A participant leaves its room before its connections have closed (so nothing new can be
    // opened for it meanwhile): their FINISHED events may follow a moment later.
    eventually("no live connection remains", 10, || reg.census().live_connections == 0).await;
    assert_eq!(reg.census().sessions, 0, "no session remains");
    // Delete the rest of the rooms; history is purged by the janitor (forced here).
    for id in reg.room_ids() {
        api.call("DELETE", &format!("/v1/rooms/{id}"), None).await;
    }
    let census = reg.census();
    assert!(census.rooms == 0 && census.names == 0, "no room remains: {census:?}");
    reg.purge_history(Duration::ZERO);
    assert_eq!(reg.census().connections, 0, "history purged");
    assert_eq!(api.metric(r#"gateway_connections{state="READY"}"#).await, 0.0);
    assert_eq!(api.metric("gateway_participants").await, 0.0);
    assert_eq!(api.metric("gateway_ws_sessions").await, 0.0);

    tokio::time::sleep(Duration::from_millis(500)).await;
    let (fds1, tasks1, rss1) = (open_fds(), tokio_rt.metrics().num_alive_tasks(), rss_kib());
    println!(
        "{full_cycles} full cycles + {vanished} vanishing clients in {rooms} rooms ({parallel} at a time) in {elapsed:.1?}: \
         fds {fds0} -> {fds1}, tasks {tasks0} -> {tasks1}, RSS {rss0} -> {rss1} KiB; \
         {missed_first_media} cycles missed their first media burst"
    );
    assert!(missed_first_media * 100 <= full_cycles.max(100), "first media missed in {missed_first_media} cycles");
    assert!(fds1 <= fds0 + 2, "file descriptors back to baseline: {fds0} -> {fds1}");
    assert!(tasks1 <= tasks0 + 1, "tasks back to baseline: {tasks0} -> {tasks1}");
    // Bound: 64 MiB over the baseline for the test process, which also holds every test peer's
    // buffers until they are dropped; the figure is printed for the record.
    assert!(rss1 < rss0 + 64 * 1024, "RSS growth bounded: {rss0} -> {rss1} KiB");
    gw.shutdown(Duration::from_secs(1)).await;
}
