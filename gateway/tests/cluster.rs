//! A cluster of three gateway processes coordinated through a real `redis-server` (Debian's,
//! installed by scripts/test.sh), all on loopback: rooms spread over the nodes; a publisher
//! joining through node A and a subscriber through node B meet in the room node C owns and the
//! payloads arrive intact with C's candidates; racing creates of one name give one owner; a Redis
//! outage mid-call keeps media flowing and the nodes re-register; draining moves new rooms
//! elsewhere; a killed node is detected within the TTL, its relayed sockets close with
//! `room_lost`, and its room's name can be created again elsewhere.
//! Ports: 21000 (Redis), 21001-21003 (HTTP), 21100-21349 (media).

mod common;

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use str0m::media::MediaKind;

const REDIS_PORT: u16 = 21000;
const TTL_MS: u64 = 1200;

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn redis() -> Proc {
    let c = Command::new("redis-server")
        .args(["--port", &REDIS_PORT.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server (apt-get install redis-server)");
    Proc(c)
}

fn node(id: &str, http: u16, media: u16) -> Proc {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gateway"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("GATEWAY_")) {
        c.env_remove(k);
    }
    c.env("GATEWAY__LOG__LEVEL", "warn")
        .env("GATEWAY__HTTP__BIND", format!("127.0.0.1:{http}"))
        .env("GATEWAY__MEDIA__PORT_MIN", media.to_string())
        .env("GATEWAY__MEDIA__PORT_MAX", (media + 49).to_string())
        .env("GATEWAY__MEDIA__WORKERS", "1")
        .env("GATEWAY__AUTH__API_KEY", API_KEY)
        .env("GATEWAY__AUTH__TOKEN_SECRET", "integration-test-secret-0123456789")
        .env("GATEWAY__CLUSTER__REDIS_URL", format!("redis://127.0.0.1:{REDIS_PORT}"))
        .env("GATEWAY__CLUSTER__NODE_ID", id)
        .env("GATEWAY__CLUSTER__HEARTBEAT_MS", "300")
        .env("GATEWAY__CLUSTER__TTL_MS", TTL_MS.to_string())
        .stdout(Stdio::null());
    Proc(c.spawn().expect("gateway starts"))
}

async fn redis_conn() -> Option<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{REDIS_PORT}")).ok()?;
    client.get_multiplexed_async_connection().await.ok()
}

async fn hget(key: &str, field: &str) -> Option<String> {
    let mut c = redis_conn().await?;
    redis::cmd("HGET").arg(key).arg(field).query_async(&mut c).await.ok().flatten()
}

async fn owner(room: &str) -> String {
    hget(&format!("gateway:room:{room}"), "node").await.unwrap_or_default()
}

fn received(p: &Peer, kind: MediaKind) -> Vec<Vec<u8>> {
    p.with(|l| l.rtp.iter().filter(|(k, _)| *k == kind).map(|(_, b)| b.clone()).collect())
}

fn sent(p: &Peer, kind: MediaKind) -> Vec<Vec<u8>> {
    p.with(|l| l.sent.iter().filter(|(k, _)| *k == kind).map(|(_, b)| b.clone()).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_through_redis() {
    let mut redis_proc = Some(redis());
    let ids = ["a", "b", "c"];
    let mut nodes: Vec<Option<Proc>> =
        ids.iter().enumerate().map(|(i, id)| Some(node(id, 21001 + i as u16, 21100 + 100 * i as u16))).collect();
    let apis: Vec<Api> = (0..3).map(|i| Api::new(format!("http://127.0.0.1:{}", 21001 + i))).collect();
    for api in &apis {
        poll_until("every node sees three members", 10, || async move {
            let url = format!("{}/metrics", api.base);
            let ok = reqwest::get(url).await.map_err(|e| e.to_string())?;
            let text = ok.text().await.map_err(|e| e.to_string())?;
            let members = text.lines().find_map(|l| l.strip_prefix("gateway_cluster_members ")).unwrap_or("0");
            if members.trim() == "3" {
                Ok(())
            } else {
                Err(format!("members {members}"))
            }
        })
        .await;
    }

    // Rooms spread: three rooms created through A land on three different nodes.
    let mut rooms = Vec::new();
    for i in 0..3 {
        rooms.push(apis[0].create_room(&format!("spread-{i}")).await);
    }
    let mut owners = HashSet::new();
    for r in &rooms {
        owners.insert(owner(r).await);
    }
    assert_eq!(owners, HashSet::from(["a".to_owned(), "b".to_owned(), "c".to_owned()]), "rooms spread");
    let mut room_c = String::new();
    for r in &rooms {
        if owner(r).await == "c" {
            room_c = r.clone();
        }
    }
    // Every node lists the whole cluster and answers for a room it does not own.
    let (s, list) = apis[1].call("GET", "/v1/rooms", None).await;
    assert_eq!(s, 200);
    assert_eq!(list["rooms"].as_array().unwrap().len(), 3, "{list}");
    let (s, detail) = apis[0].call("GET", &format!("/v1/rooms/{room_c}"), None).await;
    assert_eq!((s, detail["room_id"].as_str().unwrap()), (200, room_c.as_str()));

    // Publisher through A, subscriber through B, in C's room.
    let publisher = Peer::join(&apis[0], &room_c, "pub").await;
    publisher.publish();
    publisher.wait("publish READY", 10, |l| l.connected).await;
    let sub = Peer::join(&apis[1], &room_c, "sub").await;
    sub.subscribe();
    sub.wait("subscribe READY", 10, |l| l.connected).await;
    // The candidates are C's (media range 21300-21349), whichever node the socket reached.
    let cands: Vec<String> = sub
        .with(|l| l.of_type("candidate").iter().filter_map(|m| m["candidate"].as_str().map(str::to_owned)).collect());
    assert!(!cands.is_empty() && cands.iter().all(|c| c.contains(" 213")), "C's candidates: {cands:?}");
    publisher.send_media(100);
    sub.wait("all media", 15, |l| l.rtp.len() >= 150).await;
    assert_eq!(received(&sub, MediaKind::Video), sent(&publisher, MediaKind::Video), "video intact");
    assert_eq!(received(&sub, MediaKind::Audio), sent(&publisher, MediaKind::Audio), "audio intact");
    assert!(apis[0].metric(r#"gateway_cluster_relayed_sessions_total{node="c"}"#).await >= 1.0);
    assert!(apis[1].metric(r#"gateway_cluster_relayed_sessions_total{node="c"}"#).await >= 1.0);

    // Racing creates of one name on every node: exactly one room, one owner.
    let creates = (0..6).map(|i| {
        let base = apis[i % 3].base.clone();
        async move { Api::new(base).call("POST", "/v1/rooms", Some(json!({ "name": "race" }))).await }
    });
    let results = futures_util::future::join_all(creates).await;
    let won: Vec<_> = results.iter().filter(|(s, _)| *s == 201).collect();
    assert_eq!(won.len(), 1, "{results:?}");
    assert!(results.iter().all(|(s, _)| *s == 201 || *s == 409), "{results:?}");
    let race_id = won[0].1["room_id"].as_str().unwrap().to_owned();
    assert!(!owner(&race_id).await.is_empty());

    // Redis stopped mid-call: media keeps flowing, placements fail clearly, nodes re-register.
    drop(redis_proc.take());
    let before = sub.with(|l| l.rtp.len());
    publisher.send_media(100);
    sub.wait("media during the Redis outage", 10, |l| l.rtp.len() >= before + 150).await;
    let (s, e) = apis[0].call("POST", "/v1/rooms", Some(json!({ "name": "no-redis" }))).await;
    assert_eq!((s, e["error"]["code"].as_str()), (503, Some("cluster_unavailable")), "{e}");
    redis_proc = Some(redis());
    let rc = room_c.clone();
    poll_until("nodes re-register and re-assert their rooms", 10, || {
        let rc = rc.clone();
        async move {
            let url = hget("gateway:node:a", "url").await;
            let c = hget("gateway:node:c", "url").await;
            let o = owner(&rc).await;
            if url.is_some() && c.is_some() && o == "c" {
                Ok(())
            } else {
                Err(format!("a {url:?} c {c:?} owner {o}"))
            }
        }
    })
    .await;
    let before = sub.with(|l| l.rtp.len());
    publisher.send_media(50);
    sub.wait("media after Redis is back", 10, |l| l.rtp.len() >= before + 75).await;

    // Drain B: its /healthz says 503, new rooms go elsewhere.
    let (s, _) = apis[1].call("POST", "/v1/admin/drain", None).await;
    assert_eq!(s, 202);
    let hz = reqwest::get(format!("{}/healthz", apis[1].base)).await.unwrap().status().as_u16();
    assert_eq!(hz, 503);
    tokio::time::sleep(Duration::from_millis(400)).await;
    for i in 0..4 {
        let r = apis[1].create_room(&format!("drained-{i}")).await;
        assert_ne!(owner(&r).await, "b", "no new room on a draining node");
    }

    // Kill C: its relayed sockets close with room_lost, the loss is seen within the TTL, and
    // its room's name can be created again on a live node.
    let name_c = detail["name"].as_str().unwrap().to_owned();
    let t0 = Instant::now();
    drop(nodes[2].take());
    publisher.wait("relayed socket closed", 5, |l| l.ws_closed.is_some()).await;
    assert_eq!(publisher.with(|l| l.ws_closed), Some(1011));
    sub.wait("relayed socket closed", 5, |l| l.ws_closed.is_some()).await;
    let rc = room_c.clone();
    poll_until("C's room marked lost", 5, || {
        let rc = rc.clone();
        async move {
            let st = hget(&format!("gateway:room:{rc}"), "status").await;
            if st.as_deref() == Some("lost") {
                Ok(())
            } else {
                Err(format!("{st:?}"))
            }
        }
    })
    .await;
    let detected = t0.elapsed();
    assert!(detected < Duration::from_millis(TTL_MS + 1500), "detected after {detected:?}");
    let (s, e) = apis[0].call("GET", &format!("/v1/rooms/{room_c}"), None).await;
    assert_eq!(s, 404, "{e}");
    let again = apis[0].create_room(&name_c).await;
    let o = owner(&again).await;
    assert!(o == "a", "recreated on a live, non-draining node: {o}");
    eprintln!("node loss detected in {detected:?}");
    drop(nodes);
    drop(redis_proc);
}
