//! The Janus signaling of `loadtest --target janus` against a fake Janus HTTP transport (axum,
//! in-process) that answers with the message shapes of Janus 1.1's documentation (janus.js
//! protocol, VideoRoom plugin): the request sequence a participant makes (session, attach,
//! join as publisher, configure with the offer, subscriber join with `streams: [{feed}]`,
//! `start` with the answer, `subscribe` for a later publisher, destroy), the events it turns
//! Janus's answers into, room creation, and the refusal of any SDP or trickled candidate that
//! names an address outside the expected set.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};
use loadtest::janus::Janus;
use loadtest::peer::Plan;
use loadtest::signaling::{Command, ConnState, Event, Published, Role, Signaling, Target};
use serde_json::{json, Value};
use tokio::sync::Notify;

/// Our range for test ports (45000-45999 belongs to this suite's owner; the loadtest smoke
/// test uses 45000-45049).
const PORTS: std::ops::RangeInclusive<u16> = 45950..=45999;
const JANUS_IP: &str = "127.0.0.1";
const ROGUE_IP: &str = "192.0.2.44";

/// What the fake Janus does and what it was asked.
#[derive(Default)]
struct Fake {
    /// Every request: (path, body).
    log: Mutex<Vec<(String, Value)>>,
    /// Events waiting for the long-poll, per session.
    queue: Mutex<Vec<(u64, Value)>>,
    notify: Notify,
    next_id: Mutex<u64>,
    /// Address in the publisher's answer / the subscriber's offers.
    answer_ip: Mutex<String>,
    offer_ip: Mutex<String>,
    rooms: Mutex<Vec<u64>>,
    /// Feeds the (one) subscription has: Janus's `updated` lists old and new streams.
    subscribed: Mutex<Vec<u64>>,
}

type Shared = Arc<Fake>;

impl Fake {
    fn id(&self) -> u64 {
        let mut n = self.next_id.lock().unwrap();
        *n += 1;
        1000 + *n
    }

    fn push(&self, session: u64, ev: Value) {
        self.queue.lock().unwrap().push((session, ev));
        self.notify.notify_waiters();
    }

    fn requests(&self) -> Vec<(String, Value)> {
        self.log.lock().unwrap().clone()
    }
}

fn sdp(kind: &str, ip: &str) -> String {
    format!(
        "v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=VideoRoom\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 {ip}\r\n\
         a=mid:0\r\na=candidate:1 1 udp 2015363327 {ip} 45555 typ host\r\na=end-of-candidates\r\na={kind}\r\n"
    )
}

fn plugin_event(session: u64, sender: u64, transaction: &Value, data: Value, jsep: Option<Value>) -> Value {
    let mut ev = json!({
        "janus": "event", "session_id": session, "sender": sender, "transaction": transaction,
        "plugindata": { "plugin": "janus.plugin.videoroom", "data": data },
    });
    if let Some(j) = jsep {
        ev["jsep"] = j;
    }
    ev
}

async fn root(State(f): State<Shared>, Json(body): Json<Value>) -> Json<Value> {
    f.log.lock().unwrap().push(("/janus".into(), body.clone()));
    assert_eq!(body["janus"], "create");
    Json(json!({ "janus": "success", "transaction": body["transaction"], "data": { "id": f.id() } }))
}

async fn session(State(f): State<Shared>, Path(s): Path<u64>, Json(body): Json<Value>) -> Json<Value> {
    f.log.lock().unwrap().push((format!("/janus/{s}"), body.clone()));
    let t = &body["transaction"];
    match body["janus"].as_str() {
        Some("attach") => {
            assert_eq!(body["plugin"], "janus.plugin.videoroom");
            Json(json!({ "janus": "success", "session_id": s, "transaction": t, "data": { "id": f.id() } }))
        }
        Some("destroy") => Json(json!({ "janus": "success", "session_id": s, "transaction": t })),
        _ => Json(json!({ "janus": "error", "transaction": t, "error": { "code": 456, "reason": "unknown" } })),
    }
}

async fn handle(State(f): State<Shared>, Path((s, h)): Path<(u64, u64)>, Json(body): Json<Value>) -> Json<Value> {
    f.log.lock().unwrap().push((format!("/janus/{s}/{h}"), body.clone()));
    let t = body["transaction"].clone();
    let ack = Json(json!({ "janus": "ack", "session_id": s, "transaction": t }));
    if body["janus"] == "hangup" {
        return Json(json!({ "janus": "success", "session_id": s, "transaction": t }));
    }
    assert_eq!(body["janus"], "message");
    let req = &body["body"];
    match req["request"].as_str().unwrap_or("") {
        "create" => {
            let room = req["room"].as_u64().unwrap();
            f.rooms.lock().unwrap().push(room);
            Json(json!({
                "janus": "success", "session_id": s, "transaction": t, "sender": h,
                "plugindata": { "plugin": "janus.plugin.videoroom",
                                "data": { "videoroom": "created", "room": room, "permanent": false } },
            }))
        }
        "join" if req["ptype"] == "publisher" => {
            let data = json!({
                "videoroom": "joined", "room": req["room"], "description": "Room", "id": 77, "private_id": 5,
                "publishers": [{ "id": 11, "display": "alice", "streams": [
                    { "type": "audio", "mindex": 0, "mid": "0", "codec": "opus" },
                    { "type": "video", "mindex": 1, "mid": "1", "codec": "vp8" },
                ] }],
            });
            f.push(s, plugin_event(s, h, &t, data, None));
            ack
        }
        "configure" => {
            assert_eq!(body["jsep"]["type"], "offer");
            let ip = f.answer_ip.lock().unwrap().clone();
            let data = json!({ "videoroom": "event", "room": 1, "configured": "ok", "audio_codec": "opus", "video_codec": "vp8" });
            f.push(s, plugin_event(s, h, &t, data, Some(json!({ "type": "answer", "sdp": sdp("answer", &ip) }))));
            if ip == JANUS_IP {
                f.push(s, json!({ "janus": "webrtcup", "session_id": s, "sender": h }));
            }
            ack
        }
        "join" | "subscribe" => {
            let new: Vec<u64> =
                req["streams"].as_array().unwrap().iter().map(|x| x["feed"].as_u64().unwrap()).collect();
            let feeds = {
                let mut all = f.subscribed.lock().unwrap();
                all.extend(new);
                all.clone()
            };
            let streams: Vec<Value> = feeds
                .iter()
                .enumerate()
                .flat_map(|(i, f)| {
                    let who = if *f == 11 { "alice" } else { "bob" };
                    [
                        json!({ "type": "audio", "mindex": 2 * i, "mid": (2 * i).to_string(), "feed_id": f,
                                "feed_mid": "0", "feed_display": who, "send": true, "ready": false }),
                        json!({ "type": "video", "mindex": 2 * i + 1, "mid": (2 * i + 1).to_string(), "feed_id": f,
                                "feed_mid": "1", "feed_display": who, "send": true, "ready": false }),
                    ]
                })
                .collect();
            let what = if req["request"] == "join" { "attached" } else { "updated" };
            let ip = f.offer_ip.lock().unwrap().clone();
            let data = json!({ "videoroom": what, "room": 1, "streams": streams });
            f.push(s, plugin_event(s, h, &t, data, Some(json!({ "type": "offer", "sdp": sdp("offer", &ip) }))));
            ack
        }
        "start" => {
            assert_eq!(body["jsep"]["type"], "answer");
            f.push(s, plugin_event(s, h, &t, json!({ "videoroom": "event", "room": 1, "started": "ok" }), None));
            f.push(s, json!({ "janus": "webrtcup", "session_id": s, "sender": h }));
            ack
        }
        other => panic!("unexpected request {other}: {body}"),
    }
}

/// The long-poll: whatever is queued for the session (up to `maxev`), or a keepalive after a
/// while, as Janus does.
async fn poll(State(f): State<Shared>, Path(s): Path<u64>) -> Json<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    loop {
        let notified = f.notify.notified();
        tokio::pin!(notified);
        // Registered before the queue is looked at, so a push in between is not missed.
        notified.as_mut().enable();
        let ready: Vec<Value> = {
            let mut q = f.queue.lock().unwrap();
            let (mine, rest): (Vec<_>, Vec<_>) = q.drain(..).partition(|(sess, _)| *sess == s);
            *q = rest;
            mine.into_iter().map(|(_, v)| v).collect()
        };
        if !ready.is_empty() {
            return Json(Value::Array(ready));
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Json(json!([{ "janus": "keepalive" }]));
        }
    }
}

async fn start_fake() -> (Shared, SocketAddr) {
    let fake: Shared = Arc::new(Fake::default());
    *fake.answer_ip.lock().unwrap() = JANUS_IP.into();
    *fake.offer_ip.lock().unwrap() = JANUS_IP.into();
    let app = Router::new()
        .route("/janus", post(root))
        .route("/janus/{session}", post(session).get(poll))
        .route("/janus/{session}/{handle}", post(handle))
        .with_state(Arc::clone(&fake));
    let mut listener = None;
    for port in PORTS {
        if let Ok(l) = tokio::net::TcpListener::bind((JANUS_IP, port)).await {
            listener = Some(l);
            break;
        }
    }
    let listener = listener.expect("a free port in 45950-45999");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (fake, addr)
}

fn plan(name: &str, publish: bool, subscribe: bool) -> Plan {
    Plan {
        room_id: "4242".into(),
        name: name.into(),
        publish,
        subscribe,
        local_ip: JANUS_IP.parse().unwrap(),
        connect_timeout: Duration::from_secs(5),
        audio_source: 0,
    }
}

async fn next(sig: &mut Signaling) -> Event {
    tokio::time::timeout(Duration::from_secs(5), sig.events.recv())
        .await
        .expect("an event within 5 s")
        .expect("the driver is running")
}

/// Events until one matches, returning the ones skipped too.
async fn until(sig: &mut Signaling, what: impl Fn(&Event) -> bool) -> (Event, Vec<Event>) {
    let mut skipped = Vec::new();
    loop {
        let ev = next(sig).await;
        if what(&ev) {
            return (ev, skipped);
        }
        skipped.push(ev);
    }
}

fn requests_of(fake: &Fake) -> Vec<String> {
    fake.requests()
        .iter()
        .map(|(_, b)| match b["janus"].as_str().unwrap_or("") {
            "message" => format!("message:{}", b["body"]["request"].as_str().unwrap_or("")),
            other => other.to_owned(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meeting_participant_publishes_and_subscribes_in_janus_order() {
    let (fake, addr) = start_fake().await;
    let janus = Janus::new(&format!("http://{addr}/janus"), &[], None).unwrap();
    let target = Target::Janus(janus.clone());

    // The room: exactly the create body the comparison relies on.
    let room = target.create_room("lt-x-0", 16, false).await.unwrap();
    let created = fake.requests().into_iter().find(|(_, b)| b["body"]["request"] == "create").unwrap().1;
    assert_eq!(
        created["body"],
        json!({ "request": "create", "room": room.parse::<u64>().unwrap(), "publishers": 100, "bitrate": 0 })
    );
    assert_eq!(requests_of(&fake), ["create", "attach", "message:create", "destroy"], "a control session of its own");
    fake.log.lock().unwrap().clear();

    let mut sig = target.connect(&plan("carol", true, true)).await.unwrap();
    let joined = next(&mut sig).await;
    assert_eq!(
        joined,
        Event::Joined {
            streams: vec![
                Published { stream_id: "11:0".into(), participant: "alice".into(), mid: "0".into() },
                Published { stream_id: "11:1".into(), participant: "alice".into(), mid: "1".into() },
            ]
        }
    );
    let join = fake.requests()[2].1.clone();
    assert_eq!(join["body"]["ptype"], "publisher");
    assert_eq!(join["body"]["room"], 4242);
    assert_eq!(join["body"]["display"], "carol");

    sig.commands.send(Command::Publish { sdp: "v=0\r\n".into() }).unwrap();
    let (answer, before) = until(&mut sig, |e| matches!(e, Event::Answer { .. })).await;
    assert!(matches!(
        &before[..],
        [Event::Connection { role: Role::Publish, state: ConnState::Initial, at: Some(_), .. }]
    ));
    assert!(matches!(answer, Event::Answer { sdp } if sdp.contains(JANUS_IP)));
    let (ready, _) = until(&mut sig, |e| matches!(e, Event::Connection { state: ConnState::Ready, .. })).await;
    assert!(matches!(ready, Event::Connection { role: Role::Publish, .. }));

    sig.commands.send(Command::Subscribe).unwrap();
    let (offer, before) = until(&mut sig, |e| matches!(e, Event::Offer { .. })).await;
    assert!(before.contains(&Event::Requested { role: Role::Subscribe }), "join time starts at the subscriber join");
    let Event::Offer { streams, .. } = offer else { unreachable!() };
    assert_eq!(streams.len(), 2);
    assert_eq!(streams[1].0, "1");
    assert_eq!(streams[1].1, Published { stream_id: "11:1".into(), participant: "alice".into(), mid: "1".into() });
    sig.commands.send(Command::Answer { sdp: "v=0\r\nanswer".into() }).unwrap();
    let (ready, _) = until(&mut sig, |e| matches!(e, Event::Connection { state: ConnState::Ready, .. })).await;
    assert!(matches!(ready, Event::Connection { role: Role::Subscribe, .. }));

    // A later publisher: its streams are announced, and the subscription asks for it.
    let (pub_handle, session) = {
        let log = fake.requests();
        let (path, _) = log.iter().find(|(_, b)| b["body"]["request"] == "configure").unwrap();
        let mut parts = path.trim_start_matches("/janus/").split('/');
        let s: u64 = parts.next().unwrap().parse().unwrap();
        (parts.next().unwrap().parse::<u64>().unwrap(), s)
    };
    let bob = json!({ "videoroom": "event", "room": 4242, "publishers": [{ "id": 12, "display": "bob", "streams": [
        { "type": "audio", "mindex": 0, "mid": "0" }, { "type": "video", "mindex": 1, "mid": "1" } ] }] });
    fake.push(session, plugin_event(session, pub_handle, &Value::Null, bob, None));
    let (added, _) = until(&mut sig, |e| matches!(e, Event::StreamAdded(_))).await;
    assert_eq!(
        added,
        Event::StreamAdded(Published { stream_id: "12:0".into(), participant: "bob".into(), mid: "0".into() })
    );
    let (offer, _) = until(&mut sig, |e| matches!(e, Event::Offer { .. })).await;
    let Event::Offer { streams, .. } = offer else { unreachable!() };
    assert_eq!(streams.len(), 4, "the updated offer carries alice's and bob's streams");
    sig.commands.send(Command::Answer { sdp: "v=0\r\nanswer2".into() }).unwrap();

    sig.commands.send(Command::Leave).unwrap();
    let (closed, _) = until(&mut sig, |e| matches!(e, Event::Closed(_))).await;
    assert_eq!(closed, Event::Closed(None));

    assert_eq!(
        requests_of(&fake),
        [
            "create",
            "attach",
            "message:join",
            "message:configure",
            "attach",
            "message:join",
            "message:start",
            "message:subscribe",
            "message:start",
            "destroy"
        ]
    );
    let log = fake.requests();
    let configure = &log[3].1;
    assert_eq!(configure["jsep"]["type"], "offer");
    assert_eq!(configure["jsep"]["trickle"], false, "our candidates are all in the SDP");
    let sub_join = &log[5].1["body"];
    assert_eq!(sub_join["ptype"], "subscriber");
    assert_eq!(sub_join["streams"], json!([{ "feed": 11 }]));
    assert_eq!(log[6].1["jsep"]["type"], "answer");
    assert_eq!(log[7].1["body"]["streams"], json!([{ "feed": 12 }]));
    // The subscriber's requests go to a second handle, the publisher's to the first.
    assert_ne!(log[3].0, log[5].0);
    assert_eq!(log[5].0, log[6].0);

    target.delete_room(&room).await;
    assert!(fake
        .requests()
        .iter()
        .any(|(_, b)| b["body"] == json!({ "request": "destroy", "room": room.parse::<u64>().unwrap() })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdps_naming_unexpected_addresses_are_refused() {
    let (fake, addr) = start_fake().await;
    *fake.answer_ip.lock().unwrap() = ROGUE_IP.into();
    *fake.offer_ip.lock().unwrap() = ROGUE_IP.into();
    let janus = Janus::new(&format!("http://{addr}/janus"), &[], None).unwrap();
    assert_eq!(janus.expected(), &[JANUS_IP.parse::<IpAddr>().unwrap()]);
    let target = Target::Janus(janus);
    let mut sig = target.connect(&plan("dave", true, true)).await.unwrap();
    assert!(matches!(next(&mut sig).await, Event::Joined { .. }));

    sig.commands.send(Command::Publish { sdp: "v=0\r\n".into() }).unwrap();
    let (failed, skipped) =
        until(&mut sig, |e| matches!(e, Event::Connection { state: ConnState::Failed(_), .. })).await;
    let Event::Connection { role: Role::Publish, state: ConnState::Failed(reason), .. } = failed else {
        panic!("{failed:?}")
    };
    assert!(reason.contains(ROGUE_IP), "{reason}");
    assert!(!skipped.iter().any(|e| matches!(e, Event::Answer { .. })), "the answer never reaches the peer");

    sig.commands.send(Command::Subscribe).unwrap();
    let (failed, skipped) =
        until(&mut sig, |e| matches!(e, Event::Connection { state: ConnState::Failed(_), .. })).await;
    let Event::Connection { role: Role::Subscribe, state: ConnState::Failed(reason), .. } = failed else {
        panic!("{failed:?}")
    };
    assert!(reason.contains(ROGUE_IP), "{reason}");
    assert!(!skipped.iter().any(|e| matches!(e, Event::Offer { .. })), "the offer never reaches the peer");

    // A trickled candidate with a rogue address is refused as well (on the publisher's handle).
    let (session, pub_handle) = {
        let log = fake.requests();
        let (path, _) = log.iter().find(|(_, b)| b["body"]["request"] == "configure").unwrap();
        let mut parts = path.trim_start_matches("/janus/").split('/');
        (parts.next().unwrap().parse::<u64>().unwrap(), parts.next().unwrap().parse::<u64>().unwrap())
    };
    let trickle = json!({ "janus": "trickle", "session_id": session, "sender": pub_handle,
        "candidate": { "sdpMid": "0", "sdpMLineIndex": 0, "candidate": format!("candidate:9 1 udp 1 {ROGUE_IP} 5000 typ host") } });
    fake.push(session, trickle);
    let (failed, skipped) =
        until(&mut sig, |e| matches!(e, Event::Connection { state: ConnState::Failed(_), .. })).await;
    assert!(
        matches!(&failed, Event::Connection { state: ConnState::Failed(r), .. } if r.contains(ROGUE_IP)),
        "{failed:?}"
    );
    assert!(!skipped.iter().any(|e| matches!(e, Event::Candidate { .. })));

    sig.commands.send(Command::Leave).unwrap();
    until(&mut sig, |e| matches!(e, Event::Closed(_))).await;
    let reqs = requests_of(&fake);
    assert!(!reqs.contains(&"message:start".to_owned()), "no answer is sent to a refused offer: {reqs:?}");
    assert_eq!(reqs.iter().filter(|r| *r == "hangup").count(), 3, "each refusal hangs its handle up: {reqs:?}");
}
