//! The REST and WebSocket API against a fake media plane: no sockets for REST (`oneshot`), a
//! local listener for WebSocket sessions. Checks routes, error shapes, auth, limits and the
//! ordering of events a client sees.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use signaling_api::media::{ConnectionSpec, EventSink, MediaError, MediaEvent, MediaPlane};
use signaling_api::metrics::Metrics;
use signaling_api::protocol::{ErrorCode, EventKind};
use signaling_api::registry::Registry;
use signaling_api::{router, ApiConfig, AppState};
use tokio_tungstenite::tungstenite::Message;
use tower::ServiceExt;

mod contract;

const KEY: &str = "unit-key";
const SDPFRAG_TYPE: &str = "application/trickle-ice-sdpfrag";

/// A media plane that answers at once and reports the events a real one would.
struct FakeMedia {
    sink: Arc<Registry>,
    calls: Mutex<Vec<String>>,
}

impl FakeMedia {
    fn ev(&self, id: &str, e: EventKind, reason: Option<&str>) {
        self.sink.emit(MediaEvent::Connection { connection_id: id.into(), event: e, reason: reason.map(Into::into) });
    }
}

#[async_trait::async_trait]
impl MediaPlane for FakeMedia {
    async fn create_room(&self, room_id: &str) -> Result<(), MediaError> {
        self.calls.lock().unwrap().push(format!("create_room {room_id}"));
        Ok(())
    }
    async fn close_room(&self, room_id: &str) {
        self.calls.lock().unwrap().push(format!("close_room {room_id}"));
    }
    async fn publish(&self, spec: ConnectionSpec, offer: String) -> Result<(), MediaError> {
        let id = spec.connection_id.as_str();
        self.ev(id, EventKind::Initial, None);
        if !offer.starts_with("v=0") {
            self.ev(id, EventKind::Failed, Some("bad_sdp: not SDP"));
            return Err(MediaError::new(ErrorCode::BadSdp, "not SDP"));
        }
        if offer.contains("nothing-usable") {
            self.ev(id, EventKind::Failed, Some("bad_sdp: nothing usable"));
            return Err(MediaError::new(ErrorCode::Unprocessable, "offer has no audio or video with a usable codec"));
        }
        self.ev(id, EventKind::SdpProcessed, None);
        self.sink.emit(MediaEvent::Answer { connection_id: id.into(), sdp: "v=0 answer".into() });
        self.sink.emit(MediaEvent::Candidate {
            connection_id: id.into(),
            candidate: "candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host".into(),
            sdp_mid: Some("0".into()),
            sdp_mline_index: Some(0),
        });
        self.ev(id, EventKind::Candidate, None);
        self.ev(id, EventKind::Gathered, None);
        self.sink.emit(MediaEvent::StreamAdded {
            room_id: spec.room_id.clone(),
            participant_id: spec.participant_id.clone(),
            stream_id: "st_1".into(),
            kind: "video".into(),
            mid: "0".into(),
        });
        Ok(())
    }
    async fn play(&self, spec: ConnectionSpec, publisher: &str, offer: String) -> Result<(), MediaError> {
        let id = spec.connection_id.as_str();
        self.calls.lock().unwrap().push(format!("play {publisher}"));
        if offer.contains("nothing-usable") {
            self.ev(id, EventKind::Initial, None);
            self.ev(id, EventKind::Failed, Some("bad_sdp: nothing usable"));
            return Err(MediaError::new(ErrorCode::Unprocessable, "no section for the publisher's codecs"));
        }
        self.ev(id, EventKind::Initial, None);
        self.ev(id, EventKind::SdpProcessed, None);
        self.sink.emit(MediaEvent::Answer {
            connection_id: id.into(),
            sdp: "v=0\r\na=ice-ufrag:fakeufrag\r\na=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host\r\n".into(),
        });
        self.ev(id, EventKind::Candidate, None);
        self.ev(id, EventKind::Gathered, None);
        Ok(())
    }
    async fn republish(&self, _: &str, _: String) -> Result<(), MediaError> {
        Ok(())
    }
    async fn subscribe(&self, spec: ConnectionSpec) -> Result<(), MediaError> {
        self.ev(&spec.connection_id, EventKind::Initial, None);
        self.sink.emit(MediaEvent::Offer { connection_id: spec.connection_id, sdp: "v=0 offer".into() });
        Ok(())
    }
    async fn resubscribe(&self, _: &str) -> Result<(), MediaError> {
        Ok(())
    }
    /// As the engine: a subscribe connection gets a new offer, answered at once here (the
    /// answer's SDP_PROCESSED carries `ice_restart`); anything else is refused.
    async fn restart_ice(&self, connection_id: &str) -> Result<(), MediaError> {
        self.calls.lock().unwrap().push(format!("restart_ice {connection_id}"));
        let detail = self
            .sink
            .connection_detail(connection_id)
            .filter(|d| !d.state.is_terminal())
            .ok_or_else(|| MediaError::new(ErrorCode::NotFound, "connection not found"))?;
        if detail.role != signaling_api::protocol::Role::Subscribe {
            return Err(MediaError::new(ErrorCode::BadRequest, "restart_ice is for subscribe connections"));
        }
        self.sink.emit(MediaEvent::Offer { connection_id: connection_id.into(), sdp: "v=0 restart offer".into() });
        self.ev(connection_id, EventKind::SdpProcessed, Some("ice_restart"));
        Ok(())
    }
    async fn restart_ice_remote(
        &self,
        connection_id: &str,
        ufrag: String,
        _: String,
    ) -> Result<signaling_api::media::IceRestarted, MediaError> {
        self.calls.lock().unwrap().push(format!("restart_ice_remote {connection_id} {ufrag}"));
        self.ev(connection_id, EventKind::SdpProcessed, Some("ice_restart"));
        Ok(signaling_api::media::IceRestarted {
            ufrag: "newufrag".into(),
            pwd: "newpasswordnewpassword".into(),
            candidates: vec!["candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host".into()],
        })
    }
    async fn resend_offer(&self, connection_id: &str) -> Result<(), MediaError> {
        self.calls.lock().unwrap().push(format!("resend_offer {connection_id}"));
        Ok(())
    }
    async fn answer(&self, connection_id: &str, _: String) -> Result<(), MediaError> {
        self.ev(connection_id, EventKind::SdpProcessed, None);
        Ok(())
    }
    async fn add_candidate(&self, _: &str, _: String) -> Result<(), MediaError> {
        Ok(())
    }
    async fn set_layer(&self, _: &str, stream_id: &str, _: Option<String>) -> Result<(), MediaError> {
        Err(MediaError::new(ErrorCode::NotFound, format!("no stream {stream_id}")))
    }
    async fn close_connection(&self, connection_id: &str, reason: &str) {
        self.ev(connection_id, EventKind::Finished, Some(reason));
    }
    async fn set_track_blocked(&self, room_id: &str, stream_id: &str, blocked: bool) -> Result<(), MediaError> {
        self.calls.lock().unwrap().push(format!("blocked {room_id} {stream_id} {blocked}"));
        Ok(())
    }
    async fn connection_stats(&self, _: &str) -> Option<Value> {
        Some(json!({ "rtp_packets_in": 7 }))
    }
}

fn app_with(config: ApiConfig) -> (axum::Router, AppState, Arc<FakeMedia>) {
    let registry = Arc::new(Registry::new(Metrics::new(prometheus::Registry::new())));
    let media = Arc::new(FakeMedia { sink: Arc::clone(&registry), calls: Mutex::new(Vec::new()) });
    let state = AppState::new(config, registry, Arc::clone(&media) as Arc<dyn MediaPlane>);
    (router(state.clone()), state, media)
}

fn app() -> (axum::Router, AppState, Arc<FakeMedia>) {
    app_with(ApiConfig { api_key: KEY.into(), reconnect_grace: Duration::from_millis(200), ..ApiConfig::default() })
}

async fn call(app: &axum::Router, method: &str, uri: &str, body: Option<&str>, auth: bool) -> (StatusCode, Value) {
    let mut b = Request::builder().method(method).uri(uri);
    if auth {
        b = b.header("authorization", format!("Bearer {KEY}"));
    }
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    let req = b.body(body.map(|s| Body::from(s.to_owned())).unwrap_or_else(Body::empty)).unwrap();
    let (status, _, bytes) = send_checked(app, req).await;
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Send a request; the response (status, headers, body) is checked against the OpenAPI document.
async fn send_checked(app: &axum::Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let (method, uri) = (req.method().to_string(), req.uri().to_string());
    let resp = app.clone().oneshot(req).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
    let ctype = headers.get("content-type").and_then(|v| v.to_str().ok());
    contract::check(&method, &uri, status.as_u16(), ctype, &bytes);
    (status, headers, bytes)
}

fn assert_error(v: &Value, code: &str) {
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
}

#[tokio::test]
async fn rooms_crud_and_errors() {
    let (app, _, media) = app();
    let (s, room) = call(&app, "POST", "/v1/rooms", Some(r#"{"name":"standup","max_participants":4}"#), true).await;
    assert_eq!(s, StatusCode::CREATED);
    let id = room["room_id"].as_str().unwrap().to_owned();
    assert_eq!(room["max_participants"], 4);
    assert!(room["created_at"].as_str().unwrap().ends_with('Z'));
    assert!(media.calls.lock().unwrap().contains(&format!("create_room {id}")));

    let (s, v) = call(&app, "POST", "/v1/rooms", Some(r#"{"name":"standup"}"#), true).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_error(&v, "conflict");
    let long = "é".repeat(65);
    for bad in [" padded", "tab\there", "", long.as_str()] {
        let body = json!({ "name": bad }).to_string();
        let (s, v) = call(&app, "POST", "/v1/rooms", Some(&body), true).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "room name {bad:?}");
        assert_error(&v, "bad_request");
    }
    let (s, v) = call(&app, "POST", "/v1/rooms", Some(r#"{"max_participants":0}"#), true).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&v, "bad_request");
    let (s, v) = call(&app, "POST", "/v1/rooms", Some("{oops"), true).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&v, "bad_request");
    let (s, v) = call(&app, "POST", "/v1/rooms", Some(r#"{"nmae":"x"}"#), true).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "unknown fields are refused: {v}");
    let (s, _) = call(&app, "POST", "/v1/rooms", None, true).await;
    assert_eq!(s, StatusCode::CREATED, "an empty body means defaults");

    let (s, list) = call(&app, "GET", "/v1/rooms", None, true).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["rooms"].as_array().unwrap().len(), 2);
    let (s, detail) = call(&app, "GET", &format!("/v1/rooms/{id}"), None, true).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(detail["name"], "standup");
    assert_eq!(detail["participants"], json!([]));

    let (s, _) = call(&app, "DELETE", &format!("/v1/rooms/{id}"), None, true).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(media.calls.lock().unwrap().contains(&format!("close_room {id}")));
    let (s, v) = call(&app, "GET", &format!("/v1/rooms/{id}"), None, true).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&v, "not_found");
    let (s, _) = call(&app, "POST", "/v1/rooms", Some(r#"{"name":"standup"}"#), true).await;
    assert_eq!(s, StatusCode::CREATED, "a deleted room's name is free again");
}

#[tokio::test]
async fn auth_routes_and_limits() {
    let (app, _, _) = app();
    let (s, v) = call(&app, "GET", "/v1/rooms", None, false).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error(&v, "unauthorized");
    let (s, v) = call(&app, "PATCH", "/v1/rooms", None, true).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_error(&v, "method_not_allowed");
    let (s, v) = call(&app, "GET", "/v2/nothing", None, true).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&v, "not_found");
    let big = format!(r#"{{"name":"{}"}}"#, "a".repeat(100_000));
    let (s, v) = call(&app, "POST", "/v1/rooms", Some(&big), true).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error(&v, "payload_too_large");
    let (s, v) = call(&app, "GET", "/healthz", None, false).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (s, _) = call(&app, "GET", "/metrics", None, false).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn tokens_kick_and_connections() {
    let (app, state, _) = app();
    let (_, room) = call(&app, "POST", "/v1/rooms", Some("{}"), true).await;
    let id = room["room_id"].as_str().unwrap();

    // The target is identified before the payload is judged.
    let (s, v) = call(&app, "POST", "/v1/rooms/r_nope/tokens", Some("{garbage"), true).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&v, "not_found");
    let (s, v) = call(&app, "POST", &format!("/v1/rooms/{id}/tokens"), Some(r#"{"participant":""}"#), true).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&v, "bad_request");
    let (s, v) =
        call(&app, "POST", &format!("/v1/rooms/{id}/tokens"), Some(r#"{"participant":"a","ttl_s":0}"#), true).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, tok) = call(
        &app,
        "POST",
        &format!("/v1/rooms/{id}/tokens"),
        Some(r#"{"participant":"alice","can_publish":false}"#),
        true,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let claims = state.auth.verify(tok["token"].as_str().unwrap()).unwrap();
    assert_eq!(
        (claims.room.as_str(), claims.sub.as_str(), claims.can_publish, claims.can_subscribe),
        (id, "alice", false, true)
    );
    assert!(tok["expires_at"].as_str().unwrap().ends_with('Z'));

    let (s, v) = call(&app, "DELETE", &format!("/v1/rooms/{id}/participants/nobody"), None, true).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&v, "not_found");
    let (s, v) = call(&app, "GET", "/v1/connections/c_missing", None, true).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&v, "not_found");
}

// ---------------------------------------------------------------------------------------------
// WebSocket sessions over a local listener
// ---------------------------------------------------------------------------------------------

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("127.0.0.1:{}", addr.port())
}

async fn next(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("message in time");
        match m {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(Message::Close(f))) => return json!({ "type": "__closed", "code": f.map(|f| u16::from(f.code)) }),
            Some(Ok(_)) => continue,
            other => return json!({ "type": "__gone", "detail": format!("{other:?}") }),
        }
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

async fn join(addr: &str, state: &AppState, room: &str, who: &str) -> Ws {
    let (token, _) = state.auth.issue(room, who, who, true, true, 60).unwrap();
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws?token={token}")).await.unwrap();
    ws
}

#[tokio::test]
async fn websocket_flow_and_event_order() {
    let (app, state, _) = app();
    let (_, room) = call(&app, "POST", "/v1/rooms", Some(r#"{"max_participants":2}"#), true).await;
    let room = room["room_id"].as_str().unwrap().to_owned();
    let addr = serve(app.clone()).await;

    let mut alice = join(&addr, &state, &room, "alice").await;
    let j = next(&mut alice).await;
    assert_eq!((j["type"].as_str(), j["participant_id"].as_str()), (Some("joined"), Some("alice")));
    send(&mut alice, json!({ "type": "publish", "sdp": "v=0 offer" })).await;
    // INITIAL, SDP_PROCESSED, then the answer, then the candidate after it, then GATHERED.
    let order: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..7 {
            let m = next(&mut alice).await;
            v.push(format!(
                "{}{}",
                m["type"].as_str().unwrap(),
                m["event"].as_str().map(|e| format!(":{e}")).unwrap_or_default()
            ));
        }
        v
    };
    assert_eq!(
        order,
        [
            "connection_event:INITIAL",
            "connection_event:SDP_PROCESSED",
            "answer",
            "candidate",
            "connection_event:CANDIDATE",
            "connection_event:GATHERED",
            "stream_added"
        ]
    );

    let mut bob = join(&addr, &state, &room, "bob").await;
    let j = next(&mut bob).await;
    assert_eq!(j["participants"], json!([{ "participant_id": "alice", "name": "alice" }]));
    assert_eq!(j["streams"].as_array().unwrap().len(), 1);
    assert_eq!(next(&mut alice).await["type"], "participant_joined");

    // The room is full for a third identity: refused at the upgrade.
    let (token, _) = state.auth.issue(&room, "carol", "carol", true, true, 60).unwrap();
    match tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws?token={token}")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 409),
        other => panic!("expected room_full, got {other:?}"),
    }

    // Bob subscribes; alice's connection is not bob's to touch.
    send(&mut bob, json!({ "type": "subscribe" })).await;
    assert_eq!(next(&mut bob).await["event"], "INITIAL");
    let offer = next(&mut bob).await;
    assert_eq!(offer["type"], "offer");
    let alice_conn = state.registry.connections_of(&room, "alice").pop().unwrap();
    send(&mut bob, json!({ "type": "answer", "connection_id": alice_conn, "sdp": "v=0" })).await;
    let e = next(&mut bob).await;
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("not_found")));

    // Kick bob: FINISHED for his connection, then the socket closes; alice hears he left.
    let (s, _) = call(&app, "DELETE", &format!("/v1/rooms/{room}/participants/bob"), None, true).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let f = next(&mut bob).await;
    assert_eq!((f["event"].as_str(), f["reason"].as_str()), (Some("FINISHED"), Some("kicked")));
    assert_eq!(next(&mut bob).await["type"], "__closed");
    let left = next(&mut alice).await;
    assert_eq!((left["type"].as_str(), left["participant_id"].as_str()), (Some("participant_left"), Some("bob")));

    // Alice joins again from a second socket: the old session is replaced.
    let mut alice2 = join(&addr, &state, &room, "alice").await;
    assert_eq!(next(&mut alice2).await["type"], "joined");
    let f = next(&mut alice).await;
    assert_eq!((f["event"].as_str(), f["reason"].as_str()), (Some("FINISHED"), Some("replaced")));
    let stream_removed_or_close = next(&mut alice).await;
    assert!(
        matches!(stream_removed_or_close["type"].as_str(), Some("__closed") | Some("stream_removed")),
        "{stream_removed_or_close}"
    );

    // Leave: FINISHED events first, then a normal close.
    send(&mut alice2, json!({ "type": "leave" })).await;
    assert_eq!(next(&mut alice2).await["type"], "__closed");
    let (_, detail) = call(&app, "GET", &format!("/v1/rooms/{room}"), None, true).await;
    assert_eq!(detail["participants"], json!([]));
}

#[tokio::test]
async fn dropped_socket_keeps_connections_for_the_grace_period() {
    let (app, state, _) = app();
    let (_, room) = call(&app, "POST", "/v1/rooms", Some("{}"), true).await;
    let room = room["room_id"].as_str().unwrap().to_owned();
    let addr = serve(app.clone()).await;
    let mut ws = join(&addr, &state, &room, "dan").await;
    next(&mut ws).await;
    send(&mut ws, json!({ "type": "subscribe" })).await;
    let init = next(&mut ws).await;
    let conn = init["connection_id"].as_str().unwrap().to_owned();
    drop(ws);
    tokio::time::sleep(Duration::from_millis(80)).await;
    let (_, d) = call(&app, "GET", &format!("/v1/connections/{conn}"), None, true).await;
    assert_eq!(d["state"], "INITIAL", "kept during the grace period");
    assert_eq!(d["stats"]["rtp_packets_in"], 7);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (_, d) = call(&app, "GET", &format!("/v1/connections/{conn}"), None, true).await;
    assert_eq!(d["state"], "FINISHED");
    assert_eq!(d["events"].as_array().unwrap().last().unwrap()["reason"], "signaling_lost");
    let (_, r) = call(&app, "GET", &format!("/v1/rooms/{room}"), None, true).await;
    assert_eq!(r["participants"], json!([]));
}

#[tokio::test]
async fn dev_token_route_creates_rooms_by_name_and_can_be_off() {
    let (app, _, _) = app();
    let (s, v) = call(&app, "POST", "/v1/dev/token", Some(r#"{"room":"lobby","participant":"x"}"#), false).await;
    assert_eq!(s, StatusCode::OK);
    let (_, v2) = call(&app, "POST", "/v1/dev/token", Some(r#"{"room":"lobby","participant":"y"}"#), false).await;
    assert_eq!(v["room_id"], v2["room_id"], "same name, same room");
    let (app, _, _) = app_with(ApiConfig { dev_token_route: false, ..ApiConfig::default() });
    let (s, v) = call(&app, "POST", "/v1/dev/token", Some(r#"{"room":"lobby","participant":"x"}"#), false).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&v, "not_found");
}

#[tokio::test]
async fn draining_refuses_new_work_and_says_so() {
    let (app, state, _) = app();
    let (_, room) = call(&app, "POST", "/v1/rooms", Some("{}"), true).await;
    let room = room["room_id"].as_str().unwrap().to_owned();
    state.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    // Readiness says no (a load balancer sends no one new), liveness still yes.
    let (s, v) = call(&app, "GET", "/healthz", None, false).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("draining")));
    let (s, v) = call(&app, "GET", "/livez", None, false).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (s, v) = call(&app, "POST", "/v1/rooms", Some("{}"), true).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_error(&v, "conflict");
    let addr = serve(app.clone()).await;
    let (token, _) = state.auth.issue(&room, "late", "late", true, true, 60).unwrap();
    match tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws?token={token}")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 409),
        other => panic!("a draining server refuses new sessions, got {other:?}"),
    }
}

#[tokio::test]
async fn message_floods_are_rate_limited_and_the_session_survives() {
    let (app, state, _) = app();
    let (_, room) = call(&app, "POST", "/v1/rooms", Some("{}"), true).await;
    let room = room["room_id"].as_str().unwrap().to_owned();
    let addr = serve(app.clone()).await;
    let mut ws = join(&addr, &state, &room, "flooder").await;
    assert_eq!(next(&mut ws).await["type"], "joined");
    // 300 messages at once: the first ~100 (burst) are handled, the rest refused.
    for _ in 0..300 {
        ws.send(Message::Text(r#"{"type":"nope"}"#.into())).await.unwrap();
    }
    let mut codes = Vec::new();
    while let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(Duration::from_millis(500), ws.next()).await {
        let v: Value = serde_json::from_str(&t).unwrap();
        codes.push(v["code"].as_str().unwrap_or("").to_owned());
    }
    let limited = codes.iter().filter(|c| *c == "rate_limited").count();
    let handled = codes.iter().filter(|c| *c == "bad_request").count();
    assert!((1..=2).contains(&limited), "refusals are reported, not amplified: {limited}");
    assert!((100..=130).contains(&handled), "about one burst handled: {handled}");
    // After a pause the same session works normally.
    tokio::time::sleep(Duration::from_millis(300)).await;
    send(&mut ws, json!({ "type": "subscribe" })).await;
    assert_eq!(next(&mut ws).await["event"], "INITIAL");
    assert_eq!(next(&mut ws).await["type"], "offer");
}

#[tokio::test]
async fn websocket_message_size_limit_closes_only_the_offender() {
    let (app, state, _) = app();
    let (_, room) = call(&app, "POST", "/v1/rooms", Some("{}"), true).await;
    let room = room["room_id"].as_str().unwrap().to_owned();
    let addr = serve(app.clone()).await;
    let mut bystander = join(&addr, &state, &room, "bystander").await;
    assert_eq!(next(&mut bystander).await["type"], "joined");
    let mut big = join(&addr, &state, &room, "big").await;
    assert_eq!(next(&mut big).await["type"], "joined");
    // 100 KB: far beyond one read of the socket, within the 256 KiB limit — handled.
    let padded = format!(r#"{{"type":"nope","pad":"{}"}}"#, "a".repeat(100_000));
    big.send(Message::Text(padded.into())).await.unwrap();
    let v = next(&mut big).await;
    assert_eq!(v["code"], "bad_request", "a long message is read whole and answered: {v}");
    // Over the limit: that session ends, nothing else does.
    let huge = format!(r#"{{"type":"nope","pad":"{}"}}"#, "a".repeat(300 * 1024));
    let _ = big.send(Message::Text(huge.into())).await;
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match big.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return true,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert_eq!(closed, Ok(true), "an oversized message closes its session");
    // The bystander may first hear of the departure (a room event); its session still works.
    send(&mut bystander, json!({ "type": "subscribe" })).await;
    let mut heard = Vec::new();
    loop {
        let v = next(&mut bystander).await;
        if v["event"] == "INITIAL" {
            break;
        }
        assert!(heard.len() < 5 && !v["type"].as_str().unwrap_or("").starts_with("__"), "{heard:?} then {v}");
        heard.push(v);
    }
    assert_eq!(next(&mut bystander).await["type"], "offer", "after {heard:?}");
}

#[tokio::test]
async fn room_and_display_names_may_use_any_script() {
    let (app, state, _) = app();
    let (s, room) = call(&app, "POST", "/v1/rooms", Some(r#"{"name":"café 山田"}"#), true).await;
    assert_eq!(s, StatusCode::CREATED, "{room}");
    assert_eq!(room["name"], "café 山田");
    let limit = "é".repeat(64);
    let (s, _) = call(&app, "POST", "/v1/rooms", Some(&json!({ "name": limit }).to_string()), true).await;
    assert_eq!(s, StatusCode::CREATED, "64 characters (128 bytes) fit");

    // The dev route: the room by its name, the display name apart from the safe identity.
    let body = json!({ "room": "café 山田", "participant": "p-1", "name": "Zoë 山田" }).to_string();
    let (s, v) = call(&app, "POST", "/v1/dev/token", Some(&body), false).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["room_id"], room["room_id"]);
    assert_eq!(state.auth.verify(v["token"].as_str().unwrap()).unwrap().name, "Zoë 山田");
    let body = json!({ "room": "café 山田", "participant": "Zoë", "name": "Zoë" }).to_string();
    let (s, v) = call(&app, "POST", "/v1/dev/token", Some(&body), false).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "identities stay ASCII-safe");
    assert_error(&v, "bad_request");
    let body = json!({ "room": "café 山田", "participant": "p-2", "name": "a\u{7}b" }).to_string();
    let (s, _) = call(&app, "POST", "/v1/dev/token", Some(&body), false).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "no control characters in display names");

    // Others see the display name.
    let addr = serve(app.clone()).await;
    let room_id = room["room_id"].as_str().unwrap();
    let (token, _) = state.auth.issue(room_id, "p-1", "Zoë 山田", true, true, 60).unwrap();
    let (mut zoe, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws?token={token}")).await.unwrap();
    assert_eq!(next(&mut zoe).await["type"], "joined");
    let mut bob = join(&addr, &state, room_id, "bob").await;
    let j = next(&mut bob).await;
    assert_eq!(j["participants"], json!([{ "participant_id": "p-1", "name": "Zoë 山田" }]));
}

#[tokio::test]
async fn a_publisher_mutes_its_own_streams_and_the_room_hears_it() {
    let (app, state, _) = app();
    let (_, room) = call(&app, "POST", "/v1/rooms", Some("{}"), true).await;
    let room = room["room_id"].as_str().unwrap().to_owned();
    let addr = serve(app.clone()).await;
    let mut alice = join(&addr, &state, &room, "alice").await;
    assert_eq!(next(&mut alice).await["type"], "joined");
    let mut bob = join(&addr, &state, &room, "bob").await;
    assert_eq!(next(&mut bob).await["type"], "joined");
    assert_eq!(next(&mut alice).await["type"], "participant_joined");
    send(&mut alice, json!({ "type": "publish", "sdp": "v=0 offer" })).await;
    let added = loop {
        let m = next(&mut bob).await;
        if m["type"] == "stream_added" {
            break m;
        }
    };
    assert_eq!(added["muted"], false);

    // Bob cannot mute alice's stream, and an unknown stream is not found.
    for (who, stream) in [(&mut bob, "st_1"), (&mut alice, "st_nope")] {
        send(who, json!({ "type": "mute", "stream_id": stream, "muted": true })).await;
        let e = loop {
            let m = next(who).await;
            if m["type"] == "error" {
                break m;
            }
        };
        assert_eq!(e["code"], "not_found", "{e}");
    }

    send(&mut alice, json!({ "type": "mute", "stream_id": "st_1", "muted": true })).await;
    let want = json!({ "type": "track_muted", "participant_id": "alice", "stream_id": "st_1", "kind": "video", "moderated": false });
    assert_eq!(next(&mut bob).await, want);
    // Muting twice changes nothing and says nothing; unmuting is heard.
    send(&mut alice, json!({ "type": "mute", "stream_id": "st_1", "muted": true })).await;
    send(&mut alice, json!({ "type": "mute", "stream_id": "st_1", "muted": false })).await;
    assert_eq!(next(&mut bob).await["type"], "track_unmuted");
    send(&mut alice, json!({ "type": "mute", "stream_id": "st_1", "muted": true })).await;
    assert_eq!(next(&mut bob).await["type"], "track_muted");

    // A late joiner and the REST view see the state.
    let mut carol = join(&addr, &state, &room, "carol").await;
    let j = next(&mut carol).await;
    assert_eq!(j["streams"][0]["muted"], true, "{j}");
    let (_, r) = call(&app, "GET", &format!("/v1/rooms/{room}"), None, true).await;
    assert_eq!(r["streams"][0]["muted"], true);
}

#[tokio::test]
async fn active_speakers_reach_the_whole_room() {
    let (app, state, media) = app();
    let (_, room) = call(&app, "POST", "/v1/rooms", Some("{}"), true).await;
    let room = room["room_id"].as_str().unwrap().to_owned();
    let addr = serve(app.clone()).await;
    let mut alice = join(&addr, &state, &room, "alice").await;
    assert_eq!(next(&mut alice).await["type"], "joined");
    let mut bob = join(&addr, &state, &room, "bob").await;
    assert_eq!(next(&mut bob).await["type"], "joined");
    assert_eq!(next(&mut alice).await["type"], "participant_joined");
    let speaker =
        signaling_api::protocol::Speaker { participant_id: "alice".into(), stream_id: "st_a".into(), level: 0.5 };
    media.sink.emit(MediaEvent::ActiveSpeakers { room_id: room.clone(), speakers: vec![speaker] });
    let want = json!({ "type": "active_speakers", "speakers": [{ "participant_id": "alice", "stream_id": "st_a", "level": 0.5 }] });
    assert_eq!(next(&mut alice).await, want);
    assert_eq!(next(&mut bob).await, want);
}

#[tokio::test]
async fn a_muted_stream_is_never_listed_as_speaking() {
    let (app, state, media) = app();
    let (room, mut alice, mut bob) = alice_publishes_to_bob(&app, &state).await;
    let speaker = |who: &str, stream: &str, level: f32| signaling_api::protocol::Speaker {
        participant_id: who.into(),
        stream_id: stream.into(),
        level,
    };
    let speakers = |list: Vec<signaling_api::protocol::Speaker>| MediaEvent::ActiveSpeakers {
        room_id: room.clone(),
        speakers: list,
    };

    media.sink.emit(speakers(vec![speaker("alice", "st_1", 0.5)]));
    assert_eq!(next_of(&mut bob, "active_speakers").await["speakers"][0]["stream_id"], "st_1");

    // Alice mutes while the media plane still holds her as a speaker (it measures what
    // arrives, and keeps a speaker listed for a moment after the last loud packet).
    send(&mut alice, json!({ "type": "mute", "stream_id": "st_1", "muted": true })).await;
    assert_eq!(next(&mut bob).await["type"], "track_muted");
    media.sink.emit(speakers(vec![speaker("bob", "st_b", 0.6), speaker("alice", "st_1", 0.4)]));
    let m = next_of(&mut bob, "active_speakers").await;
    let listed: Vec<&str> =
        m["speakers"].as_array().unwrap().iter().map(|s| s["stream_id"].as_str().unwrap()).collect();
    assert_eq!(listed, ["st_b"], "{m}");
    // A list that differs only by the muted stream is the same list: not sent again.
    media.sink.emit(speakers(vec![speaker("alice", "st_1", 0.3), speaker("bob", "st_b", 0.6)]));
    media.sink.emit(speakers(vec![]));
    assert_eq!(next_of(&mut bob, "active_speakers").await["speakers"], json!([]));

    // Unmuted, she is listed again.
    send(&mut alice, json!({ "type": "mute", "stream_id": "st_1", "muted": false })).await;
    assert_eq!(next(&mut bob).await["type"], "track_unmuted");
    media.sink.emit(speakers(vec![speaker("alice", "st_1", 0.5)]));
    assert_eq!(next_of(&mut bob, "active_speakers").await["speakers"][0]["stream_id"], "st_1");
}

// ---------------------------------------------------------------------------------------------
// Moderation and room state from the app backend
// ---------------------------------------------------------------------------------------------

/// A room where alice has published (stream `st_1`) and bob has seen it added.
async fn alice_publishes_to_bob(app: &axum::Router, state: &AppState) -> (String, Ws, Ws) {
    let (_, room) = call(app, "POST", "/v1/rooms", Some("{}"), true).await;
    let room = room["room_id"].as_str().unwrap().to_owned();
    let addr = serve(app.clone()).await;
    let mut alice = join(&addr, state, &room, "alice").await;
    assert_eq!(next(&mut alice).await["type"], "joined");
    let mut bob = join(&addr, state, &room, "bob").await;
    assert_eq!(next(&mut bob).await["type"], "joined");
    send(&mut alice, json!({ "type": "publish", "sdp": "v=0 offer" })).await;
    assert_eq!(next_of(&mut bob, "stream_added").await["stream_id"], "st_1");
    (room, alice, bob)
}

/// The next message of a type, skipping others.
async fn next_of(ws: &mut Ws, t: &str) -> Value {
    loop {
        let m = next(ws).await;
        if m["type"] == t || m["type"].as_str().is_some_and(|x| x.starts_with("__")) {
            return m;
        }
    }
}

#[tokio::test]
async fn the_backend_mutes_a_stream_and_only_it_can_unmute() {
    let (app, state, media) = app();
    let (room, mut alice, mut bob) = alice_publishes_to_bob(&app, &state).await;
    let mute = format!("/v1/rooms/{room}/participants/alice/mute");

    // Targets first: unknown room, unknown participant (even with a bad body); then the body.
    let (s, v) = call(&app, "POST", "/v1/rooms/r_nope/participants/alice/mute", Some("{bad"), true).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&v, "not_found");
    let (s, v) = call(&app, "POST", &format!("/v1/rooms/{room}/participants/nobody/mute"), Some("{bad"), true).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["error"]["message"], "participant not found");
    let (s, v) = call(&app, "POST", &mute, Some(r#"{"muted":"yes"}"#), true).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&v, "bad_request");
    let (s, v) = call(&app, "POST", &mute, Some(r#"{"muted":true,"kind":"smell"}"#), true).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = call(&app, "POST", &mute, Some(r#"{"muted":true,"stream_id":"st_nope"}"#), true).await;
    assert_eq!((s, v["error"]["message"].as_str()), (StatusCode::NOT_FOUND, Some("stream not found")));
    let (s, v) = call(&app, "POST", &mute, Some(r#"{"muted":true,"kind":"audio"}"#), true).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "alice publishes no audio: {v}");
    let (s, _) = call(&app, "POST", &mute, Some(r#"{"muted":true}"#), false).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // Mute: the media plane stops the stream, everyone hears it, the views show it.
    let (s, v) = call(&app, "POST", &mute, Some(r#"{"muted":true,"kind":"video"}"#), true).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["streams"][0]["stream_id"], "st_1");
    assert_eq!((v["streams"][0]["muted"].as_bool(), v["streams"][0]["moderated"].as_bool()), (Some(true), Some(true)));
    assert!(media.calls.lock().unwrap().contains(&format!("blocked {room} st_1 true")));
    let want = json!({ "type": "track_muted", "participant_id": "alice", "stream_id": "st_1", "kind": "video", "moderated": true });
    assert_eq!(next_of(&mut bob, "track_muted").await, want);
    assert_eq!(next_of(&mut alice, "track_muted").await, want, "the publisher is told too");
    let (_, r) = call(&app, "GET", &format!("/v1/rooms/{room}"), None, true).await;
    assert_eq!(r["streams"][0]["moderated"], true);

    // The publisher cannot lift it.
    send(&mut alice, json!({ "type": "mute", "stream_id": "st_1", "muted": false })).await;
    let e = next_of(&mut alice, "error").await;
    assert_eq!(e["code"], "forbidden", "{e}");

    // The backend can; a second unmute changes nothing and says nothing.
    let (s, v) = call(&app, "POST", &mute, Some(r#"{"muted":false,"stream_id":"st_1"}"#), true).await;
    assert_eq!((s, v["streams"][0]["muted"].as_bool()), (StatusCode::OK, Some(false)));
    assert!(media.calls.lock().unwrap().contains(&format!("blocked {room} st_1 false")));
    let m = next_of(&mut bob, "track_unmuted").await;
    assert_eq!(m["moderated"], false);
    let (s, _) = call(&app, "POST", &mute, Some(r#"{"muted":false}"#), true).await;
    assert_eq!(s, StatusCode::OK);
    send(&mut bob, json!({ "type": "subscribe" })).await;
    assert_eq!(next(&mut bob).await["event"], "INITIAL", "no second track_unmuted came before");
}

#[tokio::test]
async fn metadata_and_messages_reach_the_room() {
    let (app, state, _) = app();
    let (_, room) = call(&app, "POST", "/v1/rooms", Some("{}"), true).await;
    let room = room["room_id"].as_str().unwrap().to_owned();
    let addr = serve(app.clone()).await;
    let mut alice = join(&addr, &state, &room, "alice").await;
    assert_eq!(next(&mut alice).await["type"], "joined");
    let mut bob = join(&addr, &state, &room, "bob").await;
    assert_eq!(next(&mut bob).await["type"], "joined");
    assert_eq!(next(&mut alice).await["type"], "participant_joined");

    // Participant metadata: to everyone, in the REST views, and to late joiners.
    let path = format!("/v1/rooms/{room}/participants/alice/metadata");
    let (s, v) = call(&app, "PUT", &path, Some(r#"{"metadata":{"role":"host","hand":false}}"#), true).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v, json!({ "participant_id": "alice", "name": "alice", "metadata": { "role": "host", "hand": false } }));
    let want = json!({ "type": "participant_metadata", "participant_id": "alice", "name": "alice", "metadata": { "role": "host", "hand": false } });
    assert_eq!(next(&mut bob).await, want);
    assert_eq!(next(&mut alice).await, want);
    let (s, p) = call(&app, "GET", &format!("/v1/rooms/{room}/participants/alice"), None, true).await;
    assert_eq!((s, &p["metadata"]["role"]), (StatusCode::OK, &json!("host")));
    let (s, _) = call(&app, "GET", &format!("/v1/rooms/{room}/participants/nobody"), None, true).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Room metadata.
    let (s, v) =
        call(&app, "PUT", &format!("/v1/rooms/{room}/metadata"), Some(r#"{"metadata":"quiz at 3"}"#), true).await;
    assert_eq!((s, v["metadata"].as_str()), (StatusCode::OK, Some("quiz at 3")));
    let want = json!({ "type": "room_metadata", "room_id": room, "metadata": "quiz at 3" });
    assert_eq!(next(&mut bob).await, want);
    assert_eq!(next(&mut alice).await, want);
    let mut carol = join(&addr, &state, &room, "carol").await;
    let j = next(&mut carol).await;
    assert_eq!(j["metadata"], "quiz at 3", "{j}");
    let alice_in =
        j["participants"].as_array().unwrap().iter().find(|p| p["participant_id"] == "alice").unwrap().clone();
    assert_eq!(alice_in["metadata"]["role"], "host", "{j}");
    assert_eq!(next(&mut alice).await["type"], "participant_joined");
    assert_eq!(next(&mut bob).await["type"], "participant_joined");

    // Messages: to one, then to all.
    let msgs = format!("/v1/rooms/{room}/messages");
    let (s, v) =
        call(&app, "POST", &msgs, Some(r#"{"participant_id":"bob","data":{"text":"you are next"}}"#), true).await;
    assert_eq!((s, v["recipients"].as_u64()), (StatusCode::OK, Some(1)));
    assert_eq!(
        next(&mut bob).await,
        json!({ "type": "message", "from": "backend", "data": { "text": "you are next" } })
    );
    let (s, v) = call(&app, "POST", &msgs, Some(r#"{"data":[1,2,3]}"#), true).await;
    assert_eq!((s, v["recipients"].as_u64()), (StatusCode::OK, Some(3)));
    for ws in [&mut alice, &mut bob, &mut carol] {
        assert_eq!(next(ws).await, json!({ "type": "message", "from": "backend", "data": [1, 2, 3] }));
    }

    // Refusals: unknown targets before bodies, sizes, shapes.
    let (s, _) = call(&app, "POST", &msgs, Some(r#"{"participant_id":"nobody","data":1}"#), true).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = call(&app, "POST", "/v1/rooms/r_nope/messages", Some("{bad"), true).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&v, "not_found");
    let (s, v) = call(&app, "PUT", "/v1/rooms/r_nope/metadata", Some("{bad"), true).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, v) = call(&app, "POST", &msgs, Some(r#"{"text":"no data field"}"#), true).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&v, "bad_request");
    let big = format!(r#"{{"metadata":"{}"}}"#, "x".repeat(5000));
    let (s, v) = call(&app, "PUT", &path, Some(&big), true).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error(&v, "payload_too_large");
    let big = format!(r#"{{"data":"{}"}}"#, "x".repeat(20_000));
    let (s, v) = call(&app, "POST", &msgs, Some(&big), true).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error(&v, "payload_too_large");

    // Clearing with null.
    let (s, v) = call(&app, "PUT", &path, Some(r#"{"metadata":null}"#), true).await;
    assert_eq!(s, StatusCode::OK);
    assert!(v.get("metadata").is_none(), "{v}");
}

// ---------------------------------------------------------------------------------------------
// Conventions: Location, readiness/liveness, method label and latency histogram, 1009
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn created_resources_have_a_location_and_requests_are_measured() {
    let (app, _, _) = app();
    let auth = format!("Bearer {KEY}");
    let json_body = ("content-type", "application/json");
    let (s, h, body) = http(&app, "POST", "/v1/rooms", &[("authorization", &auth), json_body], "{}").await;
    assert_eq!(s, StatusCode::CREATED);
    let location = h["location"].to_str().unwrap().to_owned();
    let body: Value = serde_json::from_str(&body).unwrap();
    let id = body["room_id"].as_str().unwrap();
    assert_eq!(location, format!("/v1/rooms/{id}"));
    let (s, v) = call(&app, "GET", &location, None, true).await;
    assert_eq!((s, v["room_id"].as_str()), (StatusCode::OK, Some(id)), "the Location answers");

    let uri = format!("/v1/rooms/{id}/tokens");
    let (s, h, _) =
        http(&app, "POST", &uri, &[("authorization", &auth), json_body], r#"{"participant":"alice"}"#).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(h["location"], format!("/v1/rooms/{id}/participants/alice").as_str());

    let (s, _) = call(&app, "DELETE", &format!("/v1/rooms/{id}"), None, true).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, _, text) = http(&app, "GET", "/metrics", &[], "").await;
    for series in [
        r#"gateway_http_requests_total{method="POST",route="/v1/rooms",status="201"} 1"#,
        r#"gateway_http_requests_total{method="GET",route="/v1/rooms/{room_id}",status="200"} 1"#,
        r#"gateway_http_requests_total{method="DELETE",route="/v1/rooms/{room_id}",status="204"} 1"#,
        r#"gateway_http_request_duration_seconds_count{method="POST",route="/v1/rooms"} 1"#,
        r#"gateway_http_request_duration_seconds_count{method="POST",route="/v1/rooms/{room_id}/tokens"} 1"#,
    ] {
        assert!(
            text.lines().any(|l| l == series),
            "missing {series} in\n{}",
            text.lines().filter(|l| l.starts_with("gateway_http")).collect::<Vec<_>>().join("\n")
        );
    }
}

#[tokio::test]
async fn an_oversized_message_is_answered_with_1009() {
    let (app, state, _) =
        app_with(ApiConfig { api_key: KEY.into(), ws_max_message_bytes: 4096, ..ApiConfig::default() });
    let (_, room) = call(&app, "POST", "/v1/rooms", Some("{}"), true).await;
    let room = room["room_id"].as_str().unwrap().to_owned();
    let addr = serve(app.clone()).await;
    let mut ws = join(&addr, &state, &room, "big").await;
    assert_eq!(next(&mut ws).await["type"], "joined");
    let huge = format!(r#"{{"type":"nope","pad":"{}"}}"#, "a".repeat(8000));
    ws.send(Message::Text(huge.into())).await.unwrap();
    let closed = next_of(&mut ws, "__closed").await;
    assert_eq!(closed["code"], 1009, "{closed}");
}

// ---------------------------------------------------------------------------------------------
// Webhooks: the reasons a fake media plane can produce (replaced, failed)
// ---------------------------------------------------------------------------------------------

/// A receiver that records every body after checking its signature with the gateway's own
/// `sign` (the independent check is gateway/tests/webhooks.rs with PyPI's standardwebhooks).
async fn hook_receiver(secret: &'static str) -> (String, Arc<Mutex<Vec<Value>>>) {
    use axum::http::HeaderMap;
    let got = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&got);
    let app = axum::Router::new().route(
        "/hooks",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let seen = Arc::clone(&seen);
            async move {
                let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                let key = signaling_api::webhook::parse_secret(secret).unwrap();
                let ts: i64 = h("webhook-timestamp").parse().unwrap();
                assert_eq!(h("webhook-signature"), signaling_api::webhook::sign(&key, &h("webhook-id"), ts, &body));
                seen.lock().unwrap().push(serde_json::from_str::<Value>(&body).unwrap());
                StatusCode::NO_CONTENT
            }
        }),
    );
    let addr = serve(app).await;
    (format!("http://{addr}/hooks"), got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_say_replaced_and_failed_and_never_left_without_joined() {
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let (url, got) = hook_receiver(SECRET).await;
    let metrics = Metrics::new(prometheus::Registry::new());
    let cfg = signaling_api::webhook::WebhookConfig { urls: vec![url], secret: SECRET.into(), ..Default::default() };
    let hooks = signaling_api::webhook::Webhooks::start(cfg, metrics.clone()).unwrap();
    let registry = Arc::new(Registry::new(metrics).with_webhooks(hooks));
    let media = Arc::new(FakeMedia { sink: Arc::clone(&registry), calls: Mutex::new(Vec::new()) });
    let config = ApiConfig { api_key: KEY.into(), ..ApiConfig::default() };
    let state = AppState::new(config, Arc::clone(&registry), Arc::clone(&media) as Arc<dyn MediaPlane>);
    let app = router(state.clone());
    let (_, room) = call(&app, "POST", "/v1/rooms", Some(r#"{"name":"hooks"}"#), true).await;
    let room = room["room_id"].as_str().unwrap().to_owned();
    let addr = serve(app.clone()).await;

    // alice publishes; READY makes her joined, with her track.
    let mut alice = join(&addr, &state, &room, "alice").await;
    assert_eq!(next(&mut alice).await["type"], "joined");
    send(&mut alice, json!({ "type": "publish", "sdp": "v=0 offer" })).await;
    let conn = next_of(&mut alice, "answer").await["connection_id"].as_str().unwrap().to_owned();
    media.ev(&conn, EventKind::Ready, None);
    // The same identity joins again: the first session leaves (`replaced`), the second joins
    // only at its own READY.
    let mut alice2 = join(&addr, &state, &room, "alice").await;
    assert_eq!(next(&mut alice2).await["type"], "joined");
    // (A real media plane removes the old session's publication as its connection closes.)
    media.sink.emit(MediaEvent::StreamRemoved {
        room_id: room.clone(),
        participant_id: "alice".into(),
        stream_id: "st_1".into(),
        kind: "video".into(),
        mid: "0".into(),
    });
    send(&mut alice2, json!({ "type": "publish", "sdp": "v=0 offer" })).await;
    let conn2 = next_of(&mut alice2, "answer").await["connection_id"].as_str().unwrap().to_owned();
    media.ev(&conn2, EventKind::Ready, None);
    // Its only connection FAILS: connection_failed, then left (`failed`).
    media.ev(&conn2, EventKind::Failed, Some("ice_disconnected"));
    // bob never gets READY: his failure says connection_failed and nothing else.
    let mut bob = join(&addr, &state, &room, "bob").await;
    assert_eq!(next(&mut bob).await["type"], "joined");
    send(&mut bob, json!({ "type": "subscribe" })).await;
    let bob_conn = next_of(&mut bob, "offer").await["connection_id"].as_str().unwrap().to_owned();
    media.ev(&bob_conn, EventKind::Failed, Some("ice_timeout"));
    let (s, _) = call(&app, "DELETE", &format!("/v1/rooms/{room}"), None, true).await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    assert!(registry.webhooks().unwrap().flush(Duration::from_secs(5)).await);
    let evs = got.lock().unwrap().clone();
    let seen: Vec<String> = evs
        .iter()
        .map(|e| {
            format!(
                "{} {} {}",
                e["type"].as_str().unwrap(),
                e["participant"]["participant_id"].as_str().unwrap_or("-"),
                e["reason"].as_str().unwrap_or("-")
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            "room_started - -",
            "participant_joined alice -",
            "track_published alice -",
            "track_unpublished alice participant_left",
            "participant_left alice replaced",
            "participant_joined alice -",
            "track_published alice -",
            "connection_failed alice ice_disconnected",
            "track_unpublished alice participant_left",
            "participant_left alice failed",
            "connection_failed bob ice_timeout",
            "room_finished - room_closed",
        ],
        "{evs:#?}"
    );
    let seqs: Vec<u64> = evs.iter().map(|e| e["sequence"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=12).collect::<Vec<u64>>());
}

// ---------------------------------------------------------------------------------------------
// WHIP and WHEP
// ---------------------------------------------------------------------------------------------

/// A request with any headers; the response's status, headers and body text.
async fn http(
    app: &axum::Router,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, axum::http::HeaderMap, String) {
    let mut b = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let (status, headers, bytes) = send_checked(app, b.body(Body::from(body.to_owned())).unwrap()).await;
    (status, headers, String::from_utf8_lossy(&bytes).into_owned())
}

fn error_code(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    v["error"]["code"].as_str().unwrap_or("").to_owned()
}

const OFFER: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n";

async fn named_room(app: &axum::Router, body: &str) -> String {
    let (_, room) = call(app, "POST", "/v1/rooms", Some(body), true).await;
    room["room_id"].as_str().unwrap().to_owned()
}

fn token(state: &AppState, room: &str, who: &str, publish: bool, subscribe: bool) -> String {
    format!("Bearer {}", state.auth.issue(room, who, who, publish, subscribe, 60).unwrap().0)
}

/// POST an offer to a WHIP/WHEP endpoint with a bearer header.
async fn post_offer(
    app: &axum::Router,
    uri: &str,
    auth: &str,
    offer: &str,
) -> (StatusCode, axum::http::HeaderMap, String) {
    http(app, "POST", uri, &[("authorization", auth), ("content-type", "application/sdp")], offer).await
}

#[tokio::test]
async fn whip_session_resource_lifecycle() {
    let (app, state, media) = app();
    let room = named_room(&app, r#"{"name":"stage"}"#).await;
    let addr = serve(app.clone()).await;
    let mut bob = join(&addr, &state, &room, "bob").await;
    assert_eq!(next(&mut bob).await["type"], "joined");
    let alice = token(&state, &room, "alice", true, true);

    // By the room's name; the participant is the token's identity.
    let (s, h, answer) = post_offer(&app, "/v1/whip/stage", &alice, OFFER).await;
    assert_eq!(s, StatusCode::CREATED, "{answer}");
    assert_eq!(h["content-type"], "application/sdp");
    assert_eq!(answer, "v=0 answer");
    let location = h["location"].to_str().unwrap().to_owned();
    let conn = location.strip_prefix(&format!("/v1/whip/{room}/")).expect("resource under the room's id").to_owned();
    let etag = h["etag"].to_str().unwrap().to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    assert_eq!(h["access-control-allow-origin"], "*");
    assert!(h["access-control-expose-headers"].to_str().unwrap().contains("Location"));

    // The room sees it like any publisher.
    let joined = next(&mut bob).await;
    assert_eq!(
        (joined["type"].as_str(), joined["participant_id"].as_str()),
        (Some("participant_joined"), Some("alice"))
    );
    assert_eq!(next(&mut bob).await["type"], "stream_added");
    let (_, r) = call(&app, "GET", &format!("/v1/rooms/{room}"), None, true).await;
    let p = r["participants"].as_array().unwrap().iter().find(|p| p["participant_id"] == "alice").unwrap().clone();
    assert_eq!(p["connections"][0]["connection_id"], conn.as_str());
    assert_eq!(p["connections"][0]["role"], "publish");
    let (_, d) = call(&app, "GET", &format!("/v1/connections/{conn}"), None, true).await;
    let events: Vec<&str> = d["events"].as_array().unwrap().iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["INITIAL", "SDP_PROCESSED", "CANDIDATE", "GATHERED"]);

    // PATCH: trickle is taken; an ICE restart (RFC 9725 §4.3) answers the gateway's new
    // credentials and candidate with a new ETag, after which only that ETag matches; a restart
    // without credentials is refused; the type must fit.
    let frag = "a=ice-ufrag:x\r\na=ice-pwd:y\r\nm=audio 9 RTP/AVP 0\r\na=mid:0\r\n\
                a=candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host\r\na=end-of-candidates\r\n";
    let sdpfrag = ("content-type", "application/trickle-ice-sdpfrag");
    let (s, _, b) =
        http(&app, "PATCH", &location, &[("authorization", &alice), sdpfrag, ("if-match", &etag)], frag).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let (s, h, b) =
        http(&app, "PATCH", &location, &[("authorization", &alice), sdpfrag, ("if-match", "*")], frag).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!((h["content-type"].to_str().unwrap(), h["etag"].to_str().unwrap()), (SDPFRAG_TYPE, "\"newufrag\""));
    for line in ["a=ice-ufrag:newufrag", "a=ice-pwd:newpasswordnewpassword", "m=audio 9 RTP/AVP 0", "a=mid:0"] {
        assert!(b.lines().any(|l| l == line), "{line} in {b}");
    }
    assert!(b.contains("a=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host\r\na=end-of-candidates"), "{b}");
    assert!(media.calls.lock().unwrap().iter().any(|c| c.ends_with(" x") && c.starts_with("restart_ice_remote")));
    let (s, _, b) =
        http(&app, "PATCH", &location, &[("authorization", &alice), sdpfrag, ("if-match", &etag)], frag).await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::PRECONDITION_FAILED, "precondition_failed"), "the old ETag");
    let (s, _, b) =
        http(&app, "PATCH", &location, &[("authorization", &alice), sdpfrag, ("if-match", "\"newufrag\"")], frag).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "the new ETag: {b}");
    let no_creds = "m=audio 9 RTP/AVP 0\r\na=mid:0\r\na=end-of-candidates\r\n";
    let (s, _, b) =
        http(&app, "PATCH", &location, &[("authorization", &alice), sdpfrag, ("if-match", "*")], no_creds).await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::BAD_REQUEST, "bad_request"), "a restart without credentials");
    let (s, _, b) =
        http(&app, "PATCH", &location, &[("authorization", &alice), sdpfrag, ("if-match", "\"other\"")], frag).await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::PRECONDITION_FAILED, "precondition_failed"));
    let (s, _, b) =
        http(&app, "PATCH", &location, &[("authorization", &alice), ("content-type", "application/sdp")], frag).await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"));

    // DELETE: only its owner (or the backend); then FINISHED `leave`, and alice leaves the room.
    let (s, _, b) = http(&app, "DELETE", &location, &[], "").await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::UNAUTHORIZED, "unauthorized"));
    let carol = token(&state, &room, "carol", true, true);
    let (s, _, b) = http(&app, "DELETE", &location, &[("authorization", &carol)], "").await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::FORBIDDEN, "forbidden"));
    let (s, _, b) = http(&app, "DELETE", &format!("/v1/whip/{room}/c_nope"), &[("authorization", &alice)], "").await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::NOT_FOUND, "not_found"));
    let (s, h, _) = http(&app, "DELETE", &location, &[("authorization", &alice)], "").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["access-control-allow-origin"], "*");
    let (_, d) = call(&app, "GET", &format!("/v1/connections/{conn}"), None, true).await;
    assert_eq!(
        (d["state"].as_str(), d["events"].as_array().unwrap().last().unwrap()["reason"].as_str()),
        (Some("FINISHED"), Some("leave"))
    );
    let left = next(&mut bob).await;
    assert_eq!((left["type"].as_str(), left["participant_id"].as_str()), (Some("participant_left"), Some("alice")));
    let (_, r) = call(&app, "GET", &format!("/v1/rooms/{room}"), None, true).await;
    assert_eq!(r["participants"].as_array().unwrap().len(), 1, "only bob: {r}");
    let (s, _, _) = http(&app, "DELETE", &location, &[("authorization", &alice)], "").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "an ended resource is gone");
    assert_eq!(state.registry.census().live_connections, 0);
}

#[tokio::test]
async fn whip_and_whep_refusals_use_rfc_statuses_and_the_error_shape() {
    let (app, state, _) = app();
    let room = named_room(&app, r#"{"name":"hall","max_participants":2}"#).await;
    let other = named_room(&app, "{}").await;
    let alice = token(&state, &room, "alice", true, true);
    let whip = format!("/v1/whip/{room}");
    // (what, uri, headers, body, status, code)
    type Case<'a> = (&'a str, String, Vec<(&'a str, String)>, &'a str, StatusCode, &'a str);
    let cases: Vec<Case> = vec![
        (
            "no token",
            whip.clone(),
            vec![("content-type", "application/sdp".into())],
            OFFER,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "forged token",
            whip.clone(),
            vec![("authorization", "Bearer x.y.z".into()), ("content-type", "application/sdp".into())],
            OFFER,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "API key is no join token",
            whip.clone(),
            vec![("authorization", format!("Bearer {KEY}")), ("content-type", "application/sdp".into())],
            OFFER,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "token for another room",
            format!("/v1/whip/{other}"),
            vec![("authorization", alice.clone()), ("content-type", "application/sdp".into())],
            OFFER,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "unknown room",
            "/v1/whip/r_nope".into(),
            vec![("authorization", alice.clone()), ("content-type", "text/plain".into())],
            "junk",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "may not publish",
            whip.clone(),
            vec![("authorization", token(&state, &room, "v", false, true)), ("content-type", "application/sdp".into())],
            OFFER,
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            "wrong content type",
            whip.clone(),
            vec![("authorization", alice.clone()), ("content-type", "application/json".into())],
            OFFER,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "no content type",
            whip.clone(),
            vec![("authorization", alice.clone())],
            OFFER,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "not SDP",
            whip.clone(),
            vec![("authorization", alice.clone()), ("content-type", "application/sdp".into())],
            "hello",
            StatusCode::BAD_REQUEST,
            "bad_sdp",
        ),
        (
            "empty body",
            whip.clone(),
            vec![("authorization", alice.clone()), ("content-type", "application/sdp".into())],
            "",
            StatusCode::BAD_REQUEST,
            "bad_sdp",
        ),
        (
            "unusable offer",
            whip.clone(),
            vec![("authorization", alice.clone()), ("content-type", "application/sdp; charset=utf-8".into())],
            "v=0\r\nnothing-usable\r\n",
            StatusCode::UNPROCESSABLE_ENTITY,
            "unprocessable",
        ),
        (
            "WHEP of nobody",
            format!("/v1/whep/{room}/nobody"),
            vec![("authorization", alice.clone()), ("content-type", "application/sdp".into())],
            OFFER,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "WHEP unknown room",
            "/v1/whep/r_nope/alice".into(),
            vec![("authorization", alice.clone()), ("content-type", "application/sdp".into())],
            OFFER,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
    ];
    for (what, uri, headers, body, status, code) in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (s, h, b) = http(&app, "POST", &uri, &headers, body).await;
        assert_eq!((s, error_code(&b).as_str()), (status, code), "{what}: {b}");
        assert_eq!(h["access-control-allow-origin"], "*", "{what}");
    }
    // A refused offer leaves no participant and no live connection behind.
    let (_, r) = call(&app, "GET", &format!("/v1/rooms/{room}"), None, true).await;
    assert_eq!(r["participants"], json!([]), "{r}");
    assert_eq!(state.registry.census().live_connections, 0);

    // Too large.
    let big = format!("v=0\r\n{}", "a=x\r\n".repeat(20_000));
    let (s, _, b) = post_offer(&app, &whip, &alice, &big).await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"));
    // Other methods: 405 with Allow, in the error shape.
    let (s, h, b) = http(&app, "GET", &whip, &[("authorization", &alice)], "").await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"));
    assert_eq!(h["allow"], "POST, OPTIONS");
    let (s, h, b) = http(&app, "POST", &format!("{whip}/c_x"), &[("authorization", &alice)], "").await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"));
    assert_eq!(h["allow"], "PATCH, DELETE, OPTIONS");
    // CORS preflight, no token needed.
    let preflight = [("origin", "http://page.example"), ("access-control-request-method", "POST")];
    let (s, h, _) = http(&app, "OPTIONS", &whip, &preflight, "").await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(h["access-control-allow-origin"], "*");
    assert_eq!(h["access-control-allow-methods"], "POST, OPTIONS");
    let allowed = h["access-control-allow-headers"].to_str().unwrap().to_ascii_lowercase();
    assert!(allowed.contains("authorization") && allowed.contains("content-type"), "{allowed}");
    assert_eq!(h["accept-post"], "application/sdp");
    let (s, h, _) = http(&app, "OPTIONS", &format!("/v1/whep/{room}/alice/c_x"), &preflight, "").await;
    assert_eq!((s, h["accept-patch"].to_str().unwrap()), (StatusCode::NO_CONTENT, "application/trickle-ice-sdpfrag"));

    // A full room: 409 room_full.
    let (s, _, _) = post_offer(&app, &whip, &alice, OFFER).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _, _) = post_offer(&app, &whip, &token(&state, &room, "bob", true, true), OFFER).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _, b) = post_offer(&app, &whip, &token(&state, &room, "carol", true, true), OFFER).await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::CONFLICT, "room_full"));
    // Draining: 409 conflict.
    state.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    let (s, _, b) = post_offer(&app, &whip, &alice, OFFER).await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::CONFLICT, "conflict"));
}

#[tokio::test]
async fn whep_plays_a_publisher_and_sessions_replace_as_websocket_ones_do() {
    let (app, state, media) = app();
    let room = named_room(&app, r#"{"name":"show"}"#).await;
    let alice = token(&state, &room, "alice", true, true);
    let (s, h, _) = post_offer(&app, "/v1/whip/show", &alice, OFFER).await;
    assert_eq!(s, StatusCode::CREATED);
    let whip_conn = h["location"].to_str().unwrap().rsplit('/').next().unwrap().to_owned();

    // A viewer plays alice; its resource is under the publisher's id.
    let viewer = token(&state, &room, "viewer", false, true);
    let (s, h, answer) = post_offer(&app, "/v1/whep/show/alice", &viewer, OFFER).await;
    assert_eq!(s, StatusCode::CREATED, "{answer}");
    assert!(answer.contains("a=candidate:"), "the answer carries the gateway's candidate: {answer}");
    assert_eq!(h["etag"], "\"fakeufrag\"");
    let location = h["location"].to_str().unwrap().to_owned();
    let whep_conn = location.strip_prefix(&format!("/v1/whep/{room}/alice/")).unwrap().to_owned();
    assert!(media.calls.lock().unwrap().contains(&"play alice".to_owned()));
    let (_, d) = call(&app, "GET", &format!("/v1/connections/{whep_conn}"), None, true).await;
    assert_eq!((d["role"].as_str(), d["participant_id"].as_str()), (Some("subscribe"), Some("viewer")));
    // A token that may not subscribe cannot play; the resource is not reachable as a WHIP one.
    let (s, _, b) = post_offer(&app, "/v1/whep/show/alice", &token(&state, &room, "x", true, false), OFFER).await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::FORBIDDEN, "forbidden"));
    let (s, _, _) =
        http(&app, "DELETE", &format!("/v1/whip/{room}/{whep_conn}"), &[("authorization", &viewer)], "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, _) =
        http(&app, "DELETE", &format!("/v1/whep/{room}/bob/{whep_conn}"), &[("authorization", &viewer)], "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // The backend may end it with the API key; kick ends the viewer like any participant.
    let (s, _, b) = post_offer(&app, "/v1/whep/show/alice", &viewer, "v=0\r\nnothing-usable\r\n").await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::UNPROCESSABLE_ENTITY, "unprocessable"));
    let (s, _) = call(&app, "DELETE", &format!("/v1/rooms/{room}/participants/viewer"), None, true).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, d) = call(&app, "GET", &format!("/v1/connections/{whep_conn}"), None, true).await;
    assert_eq!(d["events"].as_array().unwrap().last().unwrap()["reason"], "kicked");

    // A second WHIP POST of alice replaces her first connection; she stays in the room.
    let (s, h, _) = post_offer(&app, "/v1/whip/show", &alice, OFFER).await;
    assert_eq!(s, StatusCode::CREATED);
    let second = h["location"].to_str().unwrap().to_owned();
    let (_, d) = call(&app, "GET", &format!("/v1/connections/{whip_conn}"), None, true).await;
    assert_eq!(
        (d["state"].as_str(), d["events"].as_array().unwrap().last().unwrap()["reason"].as_str()),
        (Some("FINISHED"), Some("replaced"))
    );
    // The backend ends it with the API key.
    let (s, _, _) = http(&app, "DELETE", &second, &[("authorization", &format!("Bearer {KEY}"))], "").await;
    assert_eq!(s, StatusCode::OK);
    let (_, r) = call(&app, "GET", &format!("/v1/rooms/{room}"), None, true).await;
    assert_eq!(r["participants"], json!([]), "{r}");

    // A WebSocket join of a WHIP identity replaces the HTTP session, like any older session.
    let (s, h, _) = post_offer(&app, "/v1/whip/show", &alice, OFFER).await;
    assert_eq!(s, StatusCode::CREATED);
    let third = h["location"].to_str().unwrap().rsplit('/').next().unwrap().to_owned();
    let addr = serve(app.clone()).await;
    let mut ws = join(&addr, &state, &room, "alice").await;
    assert_eq!(next(&mut ws).await["type"], "joined");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (_, d) = call(&app, "GET", &format!("/v1/connections/{third}"), None, true).await;
    assert_eq!(d["events"].as_array().unwrap().last().unwrap()["reason"], "replaced");
    let (_, r) = call(&app, "GET", &format!("/v1/rooms/{room}"), None, true).await;
    assert_eq!(r["participants"].as_array().unwrap().len(), 1, "alice, now on her WebSocket: {r}");
}

#[tokio::test]
async fn token_routes_mint_turn_credentials_when_configured() {
    let turn = signaling_api::auth::TurnConfig {
        urls: vec!["turn:turn.test:3478?transport=udp".into()],
        secret: "north-secret".into(),
    };
    let (relay, state, _) =
        app_with(ApiConfig { api_key: KEY.into(), turn: Some(turn.clone()), ..ApiConfig::default() });
    let (_, room) = call(&relay, "POST", "/v1/rooms", Some(r#"{"name":"relay"}"#), true).await;
    let room = room["room_id"].as_str().unwrap().to_owned();
    let (s, tok) =
        call(&relay, "POST", &format!("/v1/rooms/{room}/tokens"), Some(r#"{"participant":"alice"}"#), true).await;
    assert_eq!(s, StatusCode::CREATED);
    let exp = state.auth.verify(tok["token"].as_str().unwrap()).unwrap().exp;
    let server = &tok["ice_servers"][0];
    assert_eq!(server["urls"], json!(["turn:turn.test:3478?transport=udp"]));
    assert_eq!(server["username"], format!("{exp}:alice"), "valid as long as the token");
    assert_eq!(server["credential"], turn.credentials("alice", exp).credential.as_str());
    let (s, dev) = call(&relay, "POST", "/v1/dev/token", Some(r#"{"room":"relay","participant":"bob"}"#), false).await;
    assert_eq!(s, StatusCode::OK);
    assert!(dev["ice_servers"][0]["username"].as_str().unwrap().ends_with(":bob"), "{dev}");
    // WHIP hands them out as RFC 9725 Link headers.
    let auth = token(&state, &room, "carol", true, true);
    let (s, h, _) = post_offer(&relay, "/v1/whip/relay", &auth, OFFER).await;
    assert_eq!(s, StatusCode::CREATED);
    let link = h["link"].to_str().unwrap();
    assert!(link.starts_with("<turn:turn.test:3478?transport=udp>; rel=\"ice-server\"; username=\""), "{link}");
    assert!(link.contains(":carol\"; credential=\"") && link.ends_with("credential-type=\"password\""), "{link}");

    // Without `turn` configured, nothing is handed out.
    let (plain, _, _) = app();
    let (_, room) = call(&plain, "POST", "/v1/rooms", Some("{}"), true).await;
    let uri = format!("/v1/rooms/{}/tokens", room["room_id"].as_str().unwrap());
    let (_, tok) = call(&plain, "POST", &uri, Some(r#"{"participant":"alice"}"#), true).await;
    assert!(tok.get("ice_servers").is_none(), "{tok}");
}

// ---------------------------------------------------------------------------------------------
// The OpenAPI document
// ---------------------------------------------------------------------------------------------

/// The generated document is the checked-in one, and it is what `GET /v1/openapi.json` serves.
#[tokio::test]
async fn openapi_document_is_checked_in_and_served() {
    let generated = signaling_api::openapi::openapi_json_text();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "docs/openapi.json differs from the document the server generates; regenerate it with: \
         UPDATE_OPENAPI=1 cargo test -p signaling-api --test api openapi_document"
    );
    let (served, _, _) = app();
    let (s, h, body) = http(&served, "GET", "/v1/openapi.json", &[], "").await;
    assert_eq!((s, h["content-type"].to_str().unwrap()), (StatusCode::OK, "application/json"));
    assert_eq!(body, generated, "served without auth, byte for byte");

    // The WebSocket upgrade's refusals are documented too (the upgrade itself is tested over
    // real sockets above).
    let (s, _, _) = http(&served, "GET", "/v1/ws", &[], "").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (app, state, _) = app();
    let room = named_room(&app, "{}").await;
    let (token, _) = state.auth.issue(&room, "p", "p", true, true, 60).unwrap();
    let (s, _, b) = http(&app, "GET", &format!("/v1/ws?token={token}"), &[], "").await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::BAD_REQUEST, "bad_request"), "not an upgrade request");
}

/// Found by schemathesis: serde fills a struct from a JSON array positionally, so `[null, null]`
/// created a room and sent a message. Every REST body must be an object.
#[tokio::test]
async fn bodies_that_are_not_json_objects_are_refused() {
    let (app, _, _) = app();
    let room = named_room(&app, r#"{"name":"objects"}"#).await;
    let routes = [
        ("POST", "/v1/rooms".to_owned()),
        ("POST", format!("/v1/rooms/{room}/tokens")),
        ("POST", format!("/v1/rooms/{room}/messages")),
        ("PUT", format!("/v1/rooms/{room}/metadata")),
        ("POST", "/v1/dev/token".to_owned()),
    ];
    for (method, uri) in &routes {
        for body in ["[null, null]", r#"["a", "b", true, false, 60]"#, "null", "7", r#""text""#] {
            let (s, v) = call(&app, method, uri, Some(body), true).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{method} {uri} {body}: {v}");
            assert_error(&v, "bad_request");
        }
    }
    let (s, v) = call(&app, "POST", "/v1/rooms", Some(r#"{"max_participants":"many"}"#), true).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["error"]["message"].as_str().unwrap().contains("max_participants"), "names the field: {v}");
    let (_, list) = call(&app, "GET", "/v1/rooms", None, true).await;
    assert_eq!(list["rooms"].as_array().unwrap().len(), 1, "no room was made: {list}");
}

/// The input rules the OpenAPI document states (patterns, lengths) are the server's: a name the
/// schema allows is taken, one it refuses is refused.
#[tokio::test]
async fn the_documented_name_rules_are_the_servers() {
    let doc = signaling_api::openapi::openapi_document();
    let schema = |name: &str| {
        let mut root = doc["components"]["schemas"][name].clone();
        root["components"] = doc["components"].clone();
        jsonschema::options().with_draft(jsonschema::Draft::Draft202012).build(&root).unwrap()
    };
    let (create_room, token, dev) = (schema("CreateRoomRequest"), schema("TokenRequest"), schema("DevTokenRequest"));
    let (app, _, _) = app();
    let room = named_room(&app, "{}").await;
    let long64 = "é".repeat(64);
    let long65 = "é".repeat(65);
    let names = [
        "a",
        "standup",
        "x y",
        "会議室",
        long64.as_str(),
        long65.as_str(),
        "",
        " a",
        "a ",
        "\ta",
        "a\n",
        "a\u{85}",
        "\u{a0}a",
        "a\u{3000}",
        "a\u{7f}b",
        "a\u{9f}",
        "\u{feff}a",
        "a\u{200b}",
        "Ünïcødé 🎉",
    ];
    for (i, name) in names.iter().enumerate() {
        let body = json!({ "name": name });
        let (s, v) = call(&app, "POST", "/v1/rooms", Some(&body.to_string()), true).await;
        let documented = create_room.is_valid(&body);
        assert_eq!(s == StatusCode::CREATED, documented, "room name {name:?}: schema {documented}, server {s} {v}");
        let display = json!({ "participant": format!("p{i}"), "name": name });
        let (s, v) = call(&app, "POST", &format!("/v1/rooms/{room}/tokens"), Some(&display.to_string()), true).await;
        let documented = token.is_valid(&display);
        assert_eq!(s == StatusCode::CREATED, documented, "display name {name:?}: schema {documented}, server {s} {v}");
    }
    for (i, who) in
        ["alice", "a.b-c_d+e", "A9", &"x".repeat(64), &"x".repeat(65), "", "a b", "ä", "a/b", "a\n"].iter().enumerate()
    {
        let body = json!({ "room": format!("dev-{i}"), "participant": who });
        let (s, v) = call(&app, "POST", "/v1/dev/token", Some(&body.to_string()), false).await;
        let documented = dev.is_valid(&body);
        assert_eq!(s == StatusCode::OK, documented, "participant {who:?}: schema {documented}, server {s} {v}");
    }
}

/// `restart_ice` (docs/protocol.md "ICE restart"): the participant's own subscribe connection
/// gets a new offer on the same connection id and an `SDP_PROCESSED` with reason
/// `ice_restart` in its history and on the socket, counted in `gateway_ice_restarts_total`;
/// an unknown id, another participant's connection, a publish connection and a message without
/// an id are refused in the contract's error shape and the socket stays open.
#[tokio::test]
async fn restart_ice_reoffers_the_own_subscribe_connection_and_refuses_the_rest() {
    let (app, state, media) = app();
    let (_, room) = call(&app, "POST", "/v1/rooms", Some("{}"), true).await;
    let room = room["room_id"].as_str().unwrap().to_owned();
    let addr = serve(app.clone()).await;
    let mut alice = join(&addr, &state, &room, "alice").await;
    assert_eq!(next(&mut alice).await["type"], "joined");
    let mut bob = join(&addr, &state, &room, "bob").await;
    assert_eq!(next(&mut bob).await["type"], "joined");
    send(&mut alice, json!({ "type": "subscribe" })).await;
    let sub = next_of(&mut alice, "offer").await["connection_id"].as_str().unwrap().to_owned();
    send(&mut alice, json!({ "type": "publish", "sdp": "v=0 offer" })).await;
    let publ = next_of(&mut alice, "answer").await["connection_id"].as_str().unwrap().to_owned();
    send(&mut bob, json!({ "type": "subscribe" })).await;
    let bobs = next_of(&mut bob, "offer").await["connection_id"].as_str().unwrap().to_owned();
    let metric = |state: &AppState, role: &str| {
        let text = state.registry.metrics.render();
        let line = format!("gateway_ice_restarts_total{{role=\"{role}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(line.as_str())).map(|v| v.trim().to_owned())
    };
    assert_eq!(metric(&state, "subscribe").as_deref(), Some("0"), "the series exists from the start");

    send(&mut alice, json!({ "type": "restart_ice", "connection_id": sub })).await;
    let offer = next_of(&mut alice, "offer").await;
    assert_eq!(offer["connection_id"], sub.as_str(), "the same connection is re-offered");
    let ev = next_of(&mut alice, "connection_event").await;
    assert_eq!(
        (ev["connection_id"].as_str(), ev["event"].as_str(), ev["code"].as_u64(), ev["reason"].as_str()),
        (Some(sub.as_str()), Some("SDP_PROCESSED"), Some(203), Some("ice_restart"))
    );
    assert_eq!(metric(&state, "subscribe").as_deref(), Some("1"));
    assert_eq!(metric(&state, "publish").as_deref(), Some("0"));
    let (_, detail) = call(&app, "GET", &format!("/v1/connections/{sub}"), None, true).await;
    let history = detail["events"].as_array().unwrap();
    assert!(
        history.iter().any(|e| e["event"] == "SDP_PROCESSED" && e["reason"] == "ice_restart"),
        "the history shows the restart: {history:?}"
    );
    assert_eq!(detail["state"], "INITIAL", "the state is untouched (the fake never connects)");

    let refused = [
        (json!({ "type": "restart_ice", "connection_id": "c_nope" }), "not_found", Some("c_nope")),
        (json!({ "type": "restart_ice", "connection_id": bobs }), "not_found", Some(bobs.as_str())),
        (json!({ "type": "restart_ice", "connection_id": publ }), "bad_request", Some(publ.as_str())),
        (json!({ "type": "restart_ice" }), "bad_request", None),
    ];
    for (msg, code, conn) in refused {
        send(&mut alice, msg.clone()).await;
        let e = next_of(&mut alice, "error").await;
        assert_eq!((e["code"].as_str(), e["connection_id"].as_str()), (Some(code), conn), "{msg}: {e}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    }
    // Bob's connection was never passed to the media plane; the publish one was, and refused.
    let calls = media.calls.lock().unwrap().clone();
    assert!(!calls.iter().any(|c| c.contains(&bobs)), "{calls:?}");
    assert!(calls.iter().any(|c| *c == format!("restart_ice {publ}")), "{calls:?}");
    assert_eq!(metric(&state, "subscribe").as_deref(), Some("1"), "refusals count nothing");
    // The socket stays open.
    send(&mut alice, json!({ "type": "restart_ice", "connection_id": sub })).await;
    assert_eq!(next_of(&mut alice, "offer").await["connection_id"], sub.as_str());
}

async fn join_resuming(addr: &str, state: &AppState, room: &str, who: &str) -> Ws {
    let (token, _) = state.auth.issue(room, who, who, true, true, 60).unwrap();
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws?token={token}&resume=1")).await.unwrap();
    ws
}

/// Nothing arrives on this socket for a moment.
async fn quiet(ws: &mut Ws) -> Option<Value> {
    match tokio::time::timeout(Duration::from_millis(300), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => Some(serde_json::from_str(&t).unwrap()),
        _ => None,
    }
}

/// `resume=1` (docs/protocol.md "ICE restart"): a client whose network changed opens a new
/// socket that takes over its session — the same connections (ids, states), no FINISHED, the
/// room hears nothing, the old socket is closed with `resumed` — also from within the reconnect
/// grace of a socket that dropped. With nothing to resume it is an ordinary join.
#[tokio::test]
async fn a_resumed_session_keeps_its_connections_and_the_room_hears_nothing() {
    let (app, state, media) = app();
    let (_, room) = call(&app, "POST", "/v1/rooms", Some("{}"), true).await;
    let room = room["room_id"].as_str().unwrap().to_owned();
    let addr = serve(app.clone()).await;
    let mut bob = join(&addr, &state, &room, "bob").await;
    assert_eq!(next(&mut bob).await["type"], "joined");
    let mut alice = join(&addr, &state, &room, "alice").await;
    assert_eq!(next(&mut alice).await["type"], "joined");
    assert_eq!(next_of(&mut bob, "participant_joined").await["participant_id"], "alice");
    send(&mut alice, json!({ "type": "subscribe" })).await;
    let sub = next_of(&mut alice, "offer").await["connection_id"].as_str().unwrap().to_owned();
    send(&mut alice, json!({ "type": "publish", "sdp": "v=0 offer" })).await;
    let publ = next_of(&mut alice, "answer").await["connection_id"].as_str().unwrap().to_owned();
    assert_eq!(next_of(&mut bob, "stream_added").await["participant_id"], "alice");

    let mut resumed = join_resuming(&addr, &state, &room, "alice").await;
    let j = next(&mut resumed).await;
    assert_eq!((j["type"].as_str(), j["resumed"].as_bool()), (Some("joined"), Some(true)), "{j}");
    assert_eq!(j["streams"].as_array().map(Vec::len), Some(1), "the room as it is: {j}");
    let mut live: Vec<(String, String)> = j["connections"]
        .as_array()
        .expect("the live connections")
        .iter()
        .map(|c| (c["connection_id"].as_str().unwrap().to_owned(), c["role"].as_str().unwrap().to_owned()))
        .collect();
    live.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(live, [(publ.clone(), "publish".to_owned()), (sub.clone(), "subscribe".to_owned())], "{j}");
    let closed = next_of(&mut alice, "__closed").await;
    assert_eq!(closed["code"], 1000, "the old socket is closed: {closed}");
    // An offer the old socket may have lost goes out again; the publish connection has none.
    let calls = media.calls.lock().unwrap().clone();
    assert!(calls.contains(&format!("resend_offer {sub}")), "{calls:?}");
    assert!(!calls.contains(&format!("resend_offer {publ}")), "{calls:?}");
    assert_eq!(quiet(&mut bob).await, None, "the room hears nothing of it");
    for id in [&sub, &publ] {
        let (_, d) = call(&app, "GET", &format!("/v1/connections/{id}"), None, true).await;
        let events: Vec<&str> = d["events"].as_array().unwrap().iter().map(|e| e["event"].as_str().unwrap()).collect();
        assert!(!events.contains(&"FINISHED") && !events.contains(&"FAILED"), "{id} goes on: {events:?}");
    }
    // The connections are the new socket's now: its restart_ice is served.
    send(&mut resumed, json!({ "type": "restart_ice", "connection_id": sub })).await;
    assert_eq!(next_of(&mut resumed, "offer").await["connection_id"], sub.as_str());
    let ev = next_of(&mut resumed, "connection_event").await;
    assert_eq!(ev["reason"], "ice_restart");

    // The resumed socket drops; a resume within the reconnect grace (200 ms here) takes over.
    drop(resumed);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut again = join_resuming(&addr, &state, &room, "alice").await;
    assert_eq!(next(&mut again).await["resumed"], true);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (_, d) = call(&app, "GET", &format!("/v1/connections/{sub}"), None, true).await;
    assert_ne!(d["state"], "FINISHED", "the grace of the dropped socket ended nothing");
    assert_eq!(quiet(&mut bob).await, None, "the room still heard nothing");

    // Nothing to resume: an ordinary join (no `resumed`), which the room hears.
    let mut carol = join_resuming(&addr, &state, &room, "carol").await;
    let j = next(&mut carol).await;
    assert_eq!((j["type"].as_str(), j.get("resumed")), (Some("joined"), None), "{j}");
    assert_eq!(next_of(&mut bob, "participant_joined").await["participant_id"], "carol");
}
