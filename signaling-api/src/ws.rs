//! WebSocket API for clients (docs/api.md §3). One task reads client messages and acts on them; one
//! writer task drains the session's outbound queue, which the registry fills in event order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use crate::auth::Claims;
use crate::error::ApiError;
use crate::media::ConnectionSpec;
use crate::protocol::*;
use crate::registry::{new_id, Outbound, Participant, SessionHandle};
use crate::AppState;

pub(crate) fn routes(state: AppState) -> Router {
    Router::new().route("/v1/ws", get(upgrade)).with_state(state)
}

/// Bytes read from a client's WebSocket per poll.
const WS_READ_BUFFER: usize = 8 * 1024;

async fn upgrade(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let claims = match authorize(&state, query.get("token").map(String::as_str)) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(r) => {
            return ApiError::bad_request(format!("WebSocket upgrade required: {}", r.body_text())).into_response()
        }
    };
    // tungstenite zero-fills its whole read buffer (128 KiB by default) every time the socket is
    // polled, and keeps it per connection; signaling messages are a few KiB, and a longer frame
    // (up to the message limit) still gets the room it needs.
    ws.max_message_size(state.config.ws_max_message_bytes)
        .max_frame_size(state.config.ws_max_message_bytes)
        .read_buffer_size(WS_READ_BUFFER)
        .on_upgrade(move |socket| run_session(state, claims, socket))
}

/// Everything that can refuse a client before the upgrade.
fn authorize(state: &AppState, token: Option<&str>) -> Result<Claims, ApiError> {
    let token = token.filter(|t| !t.is_empty()).ok_or_else(|| ApiError::unauthorized("missing token"))?;
    let claims = state.auth.verify(token)?;
    if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(ApiError::new(ErrorCode::Conflict, "server is draining"));
    }
    let room = state.registry.rooms.get(&claims.room).ok_or_else(|| ApiError::not_found("room"))?;
    if !room.participants.contains_key(&claims.sub) && room.participants.len() >= room.max_participants as usize {
        return Err(ApiError::new(ErrorCode::RoomFull, "room is full"));
    }
    Ok(claims)
}

/// Result of admitting a session to its room.
struct Admitted {
    /// The session this one replaces, and its connections.
    replaced: Option<(u64, Vec<String>)>,
}

/// Put the session in its room and queue `joined` while the room is locked, so no room event
/// can reach the client before it or repeat what it lists.
fn admit(state: &AppState, claims: &Claims, session: u64) -> Result<Admitted, ApiError> {
    let reg = &state.registry;
    let mut room = reg.rooms.get_mut(&claims.room).ok_or_else(|| ApiError::not_found("room"))?;
    let replaced = room.participants.get(&claims.sub).map(|p| (p.session, p.connections.clone()));
    if replaced.is_none() && room.participants.len() >= room.max_participants as usize {
        return Err(ApiError::new(ErrorCode::RoomFull, "room is full"));
    }
    room.participants.insert(
        claims.sub.clone(),
        Participant {
            participant_id: claims.sub.clone(),
            name: claims.name.clone(),
            session,
            disconnected_at: None,
            connections: replaced.as_ref().map(|r| r.1.clone()).unwrap_or_default(),
        },
    );
    if replaced.is_none() {
        reg.metrics.participants.inc();
    }
    let mut participants: Vec<ParticipantInfo> = room
        .participants
        .values()
        .filter(|p| p.participant_id != claims.sub)
        .map(|p| ParticipantInfo { participant_id: p.participant_id.clone(), name: p.name.clone() })
        .collect();
    participants.sort_by(|a, b| a.participant_id.cmp(&b.participant_id));
    let joined = ServerMessage::Joined {
        room_id: claims.room.clone(),
        participant_id: claims.sub.clone(),
        participants,
        streams: room.streams.clone(),
    };
    reg.send_to_session(session, Outbound::Message(joined));
    Ok(Admitted { replaced })
}

async fn run_session(state: AppState, claims: Claims, socket: WebSocket) {
    let reg = state.registry.clone();
    let session = reg.next_session_id();
    let (tx, rx) = mpsc::channel::<Outbound>(state.config.ws_outbound_queue);
    let kill = Arc::new(tokio::sync::Notify::new());
    let (sink, mut stream) = socket.split();
    reg.sessions.insert(session, SessionHandle { tx: tx.clone(), kill: Arc::clone(&kill) });
    reg.metrics.ws_sessions.inc();
    let writer = tokio::spawn(write_loop(sink, rx));

    let room_id = claims.room.clone();
    let participant_id = claims.sub.clone();
    match admit(&state, &claims, session) {
        Ok(Admitted { replaced }) => {
            match replaced {
                Some((old_session, old_conns)) => {
                    for id in old_conns {
                        state.media.close_connection(&id, "replaced").await;
                    }
                    reg.send_to_session(old_session, Outbound::Close(1000, "replaced".into()));
                    reg.sessions.remove(&old_session);
                }
                None => {
                    let info = ParticipantInfo { participant_id: participant_id.clone(), name: claims.name.clone() };
                    reg.broadcast(&room_id, Some(&participant_id), ServerMessage::ParticipantJoined(info));
                }
            }
            tracing::info!(room_id, participant_id, session, "participant joined");
        }
        Err(e) => {
            let _ = tx.try_send(Outbound::Message(ServerMessage::Error {
                code: e.code,
                message: e.message,
                connection_id: None,
            }));
            let _ = tx.try_send(Outbound::Close(1008, "refused".into()));
            reg.sessions.remove(&session);
            drop(tx);
            let _ = writer.await;
            reg.metrics.ws_sessions.dec();
            return;
        }
    }

    let mut left = false;
    let mut bucket = TokenBucket::new(state.config.ws_messages_per_second);
    loop {
        let msg = tokio::select! {
            m = stream.next() => match m {
                Some(m) => m,
                None => break,
            },
            _ = kill.notified() => break,
        };
        let text = match msg {
            Ok(Message::Text(t)) => t,
            Ok(Message::Binary(_)) => {
                send_error(&reg, session, ApiError::bad_request("binary messages are not part of the protocol"), None);
                continue;
            }
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(Message::Close(_)) | Err(_) => break,
        };
        match bucket.take(Instant::now()) {
            Take::Ok => {}
            Take::Refused { tell } => {
                if tell {
                    let e = ApiError::new(ErrorCode::RateLimited, "too many messages; slow down");
                    send_error(&reg, session, e, None);
                }
                continue;
            }
        }
        if handle_text(&state, &claims, session, text.as_str()).await {
            left = true;
            break;
        }
    }

    if !left {
        // The socket dropped without `leave`: keep the connections for the grace period.
        let still_ours = match reg.rooms.get_mut(&room_id) {
            Some(mut room) => match room.participants.get_mut(&participant_id) {
                Some(p) if p.session == session => {
                    p.disconnected_at = Some(Instant::now());
                    true
                }
                _ => false,
            },
            None => false,
        };
        if still_ours {
            let state = state.clone();
            let (room_id, participant_id) = (room_id.clone(), participant_id.clone());
            tokio::spawn(async move {
                tokio::time::sleep(state.config.reconnect_grace).await;
                remove_participant(&state, &room_id, &participant_id, session, "signaling_lost").await;
            });
        }
    }
    reg.sessions.remove(&session);
    drop(tx);
    // A client that stopped reading can block the writer on TCP backpressure: give it a moment.
    let mut writer = writer;
    if tokio::time::timeout(std::time::Duration::from_secs(2), &mut writer).await.is_err() {
        writer.abort();
    }
    reg.metrics.ws_sessions.dec();
    tracing::info!(room_id, participant_id, session, left, "session ended");
}

async fn write_loop(mut sink: futures_util::stream::SplitSink<WebSocket, Message>, mut rx: mpsc::Receiver<Outbound>) {
    while let Some(out) = rx.recv().await {
        match out {
            Outbound::Message(m) => {
                let Ok(text) = serde_json::to_string(&m) else { continue };
                if sink.send(Message::Text(text.into())).await.is_err() {
                    break;
                }
            }
            Outbound::Close(code, reason) => {
                let _ = sink.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
                break;
            }
        }
    }
    let _ = sink.close().await;
}

fn send_error(reg: &crate::registry::Registry, session: u64, e: ApiError, connection_id: Option<String>) {
    reg.send_to_session(
        session,
        Outbound::Message(ServerMessage::Error { code: e.code, message: e.message, connection_id }),
    );
}

/// Per-session limit on client messages: `rate` per second with bursts of twice that.
struct TokenBucket {
    rate: f64,
    tokens: f64,
    at: Instant,
    last_told: Option<Instant>,
}

enum Take {
    Ok,
    /// Refused; `tell` is true at most once a second, so refusals are not amplified.
    Refused {
        tell: bool,
    },
}

impl TokenBucket {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Self { rate, tokens: 2.0 * rate, at: Instant::now(), last_told: None }
    }

    fn take(&mut self, now: Instant) -> Take {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(2.0 * self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Take::Ok;
        }
        let tell = self.last_told.is_none_or(|t| now.duration_since(t) >= std::time::Duration::from_secs(1));
        if tell {
            self.last_told = Some(now);
        }
        Take::Refused { tell }
    }
}

/// Handle one client message; returns true when the client left.
async fn handle_text(state: &AppState, claims: &Claims, session: u64, text: &str) -> bool {
    let msg: ClientMessage = match serde_json::from_str(text) {
        Ok(m) => m,
        Err(e) => {
            send_error(&state.registry, session, ApiError::bad_request(format!("invalid message: {e}")), None);
            return false;
        }
    };
    let reg = &state.registry;
    let (room_id, pid) = (claims.room.as_str(), claims.sub.as_str());
    let result: Result<(), (ApiError, Option<String>)> = match msg {
        ClientMessage::Publish { sdp } => {
            if !claims.can_publish {
                Err((ApiError::forbidden("this token may not publish"), None))
            } else {
                open_or_renegotiate(state, claims, session, Role::Publish, Some(sdp)).await
            }
        }
        ClientMessage::Subscribe {} => {
            if !claims.can_subscribe {
                Err((ApiError::forbidden("this token may not subscribe"), None))
            } else {
                open_or_renegotiate(state, claims, session, Role::Subscribe, None).await
            }
        }
        ClientMessage::Answer { connection_id, sdp } => match owned(state, claims, session, &connection_id) {
            Ok(()) => state.media.answer(&connection_id, sdp).await.map_err(|e| (e.into(), Some(connection_id))),
            Err(e) => Err((e, Some(connection_id))),
        },
        ClientMessage::Candidate(c) => match owned(state, claims, session, &c.connection_id) {
            Ok(()) => state
                .media
                .add_candidate(&c.connection_id, c.candidate)
                .await
                .map_err(|e| (e.into(), Some(c.connection_id))),
            Err(e) => Err((e, Some(c.connection_id))),
        },
        ClientMessage::SetLayer { connection_id, stream_id, rid } => {
            match owned(state, claims, session, &connection_id) {
                Ok(()) => state
                    .media
                    .set_layer(&connection_id, &stream_id, rid)
                    .await
                    .map_err(|e| (e.into(), Some(connection_id))),
                Err(e) => Err((e, Some(connection_id))),
            }
        }
        ClientMessage::Leave {} => {
            remove_participant(state, room_id, pid, session, "leave").await;
            reg.send_to_session(session, Outbound::Close(1000, "leave".into()));
            return true;
        }
    };
    if let Err((e, conn)) = result {
        send_error(reg, session, e, conn);
    }
    false
}

/// The connection exists and belongs to this participant; anything else is `not_found`, so one
/// participant learns nothing about another's connections.
fn owned(state: &AppState, claims: &Claims, session: u64, connection_id: &str) -> Result<(), ApiError> {
    match state.registry.connections.get(connection_id) {
        Some(c) if c.room_id == claims.room && c.participant_id == claims.sub && c.session == session => Ok(()),
        _ => Err(ApiError::not_found("connection")),
    }
}

async fn open_or_renegotiate(
    state: &AppState,
    claims: &Claims,
    session: u64,
    role: Role,
    offer: Option<String>,
) -> Result<(), (ApiError, Option<String>)> {
    let reg = &state.registry;
    if !is_current(state, claims, session) {
        return Err((ApiError::not_found("room"), None));
    }
    if let Some(id) = reg.live_connection_with_role(&claims.room, &claims.sub, role) {
        let r = match offer {
            Some(sdp) => state.media.republish(&id, sdp).await,
            None => state.media.resubscribe(&id).await,
        };
        return r.map_err(|e| (e.into(), Some(id)));
    }
    let spec = ConnectionSpec {
        room_id: claims.room.clone(),
        participant_id: claims.sub.clone(),
        connection_id: new_id("c"),
        role,
    };
    if !reg.insert_connection(&spec, session) {
        return Err((ApiError::not_found("room"), None));
    }
    let id = spec.connection_id.clone();
    let r = match offer {
        Some(sdp) => state.media.publish(spec, sdp).await,
        None => state.media.subscribe(spec).await,
    };
    if let Err(e) = &r {
        // The media plane refused before it created anything: record the failure so the
        // connection's history tells the story and nothing stays half-made.
        let not_created = reg.connections.get(&id).is_some_and(|c| c.events.is_empty());
        if not_created {
            reg.connections.remove(&id);
            if let Some(mut room) = reg.rooms.get_mut(&claims.room) {
                if let Some(p) = room.participants.get_mut(&claims.sub) {
                    p.connections.retain(|c| c != &id);
                }
            }
            return Err((ApiError::from(e.clone()), None));
        }
    }
    if r.is_ok() && !is_current(state, claims, session) {
        // Removed (kicked, replaced, room closed) while the media plane was opening it.
        state.media.close_connection(&id, "participant_removed").await;
    }
    r.map_err(|e| (e.into(), Some(id)))
}

/// This session still speaks for its participant.
fn is_current(state: &AppState, claims: &Claims, session: u64) -> bool {
    state.registry.rooms.get(&claims.room).and_then(|r| r.participants.get(&claims.sub).map(|p| p.session))
        == Some(session)
}

/// End a participant: close its connections (FINISHED with `reason`), take it out of its room and
/// tell the others. Does nothing if another session has replaced `session` meanwhile.
pub(crate) async fn remove_participant(
    state: &AppState,
    room_id: &str,
    participant_id: &str,
    session: u64,
    reason: &str,
) {
    let reg = &state.registry;
    // Out of the room first, so nothing new can be opened for it while its connections close.
    let removed = match reg.rooms.get_mut(room_id) {
        Some(mut room) => match room.participants.get(participant_id) {
            Some(p) if p.session == session => room.participants.remove(participant_id),
            _ => None,
        },
        None => None,
    };
    let Some(p) = removed else { return };
    reg.metrics.participants.dec();
    for id in &p.connections {
        let live = reg.connections.get(id).is_some_and(|c| !c.state.is_terminal());
        if live {
            state.media.close_connection(id, reason).await;
        }
    }
    let info = ParticipantInfo { participant_id: p.participant_id, name: p.name };
    reg.broadcast(room_id, None, ServerMessage::ParticipantLeft(info));
    tracing::info!(room_id, participant_id, reason, "participant left");
}
