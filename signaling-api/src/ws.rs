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
use crate::protocol::*;
use crate::registry::{Outbound, SessionHandle};
use crate::AppState;

pub(crate) fn routes(state: AppState) -> Router {
    Router::new().route("/v1/ws", get(upgrade)).with_state(state)
}

/// Bytes read from a client's WebSocket per poll.
const WS_READ_BUFFER: usize = 8 * 1024;

/// Upgrade to the client WebSocket of one participant (messages: docs/api.md §3).
#[utoipa::path(
    get,
    path = "/v1/ws",
    tag = "websocket",
    operation_id = "websocket",
    params(("token" = String, Query, description = "A join token (URL-encoded)")),
    responses(
        (status = 101, description = "Switching Protocols: the WebSocket session begins with `joined`"),
        (status = 400, description = "Not a WebSocket upgrade request (`bad_request`)", body = ErrorBody),
        (status = 401, description = "Missing, invalid, expired or forged token (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "The token's room is gone (`not_found`)", body = ErrorBody),
        (status = 409, description = "The room is full (`room_full`) or the server is draining (`conflict`)", body = ErrorBody),
    )
)]
pub(crate) async fn upgrade(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let claims = match authorize(&state, query.get("token").map(String::as_str)) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    // `resume=1`: take over this participant's session and connections (docs/protocol.md).
    let resume = query.get("resume").is_some_and(|v| v == "1" || v == "true");
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
        .on_upgrade(move |socket| run_session(state, claims, resume, socket))
}

/// Everything that can refuse a client before the upgrade.
fn authorize(state: &AppState, token: Option<&str>) -> Result<Claims, ApiError> {
    let token = token.filter(|t| !t.is_empty()).ok_or_else(|| ApiError::unauthorized("missing token"))?;
    let claims = state.auth.verify(token)?;
    if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(ApiError::new(ErrorCode::Conflict, "server is draining"));
    }
    state.registry.check_admission(&claims.room, &claims.sub)?;
    Ok(claims)
}

async fn run_session(state: AppState, claims: Claims, resume: bool, socket: WebSocket) {
    let reg = state.registry.clone();
    let (tx, rx) = mpsc::channel::<Outbound>(state.config.ws_outbound_queue);
    let kill = Arc::new(tokio::sync::Notify::new());
    let (sink, mut stream) = socket.split();
    let session = reg.open_session(SessionHandle { tx: tx.clone(), kill: Arc::clone(&kill) });
    reg.metrics.ws_sessions.inc();
    let writer = tokio::spawn(write_loop(sink, rx));

    let room_id = claims.room.clone();
    let participant_id = claims.sub.clone();
    if let Err(e) = reg.join(state.media.as_ref(), &claims, session, resume).await {
        let _ = tx.try_send(Outbound::Message(ServerMessage::Error {
            code: e.code,
            message: e.message,
            connection_id: None,
        }));
        let _ = tx.try_send(Outbound::Close(1008, "refused".into()));
        reg.close_session(session);
        drop(tx);
        let _ = writer.await;
        reg.metrics.ws_sessions.dec();
        return;
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
            Ok(Message::Close(_)) => break,
            Err(e) => {
                if too_big(e) {
                    // RFC 6455 §7.4.1: 1009, the message is too big to process. The session
                    // ends as if the socket dropped (the participant gets the reconnect grace).
                    let limit = state.config.ws_max_message_bytes;
                    let _ = tx.try_send(Outbound::Close(1009, format!("message over {limit} bytes")));
                }
                break;
            }
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
        let still_ours = reg.signaling_lost(&room_id, &participant_id, session);
        if still_ours {
            let state = state.clone();
            let (room_id, participant_id) = (room_id.clone(), participant_id.clone());
            tokio::spawn(async move {
                tokio::time::sleep(state.config.reconnect_grace).await;
                let reg = &state.registry;
                reg.remove_participant(state.media.as_ref(), &room_id, &participant_id, session, "signaling_lost")
                    .await;
            });
        }
    }
    reg.close_session(session);
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

/// A read error that is a message or frame over the size limit.
fn too_big(e: axum::Error) -> bool {
    e.into_inner().downcast::<tungstenite::Error>().is_ok_and(|e| matches!(*e, tungstenite::Error::Capacity(_)))
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
                reg.open_connection(state.media.as_ref(), claims, session, Role::Publish, Some(sdp)).await
            }
        }
        ClientMessage::Subscribe {} => {
            if !claims.can_subscribe {
                Err((ApiError::forbidden("this token may not subscribe"), None))
            } else {
                reg.open_connection(state.media.as_ref(), claims, session, Role::Subscribe, None).await
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
        ClientMessage::RestartIce { connection_id } => match owned(state, claims, session, &connection_id) {
            Ok(()) => state.media.restart_ice(&connection_id).await.map_err(|e| (e.into(), Some(connection_id))),
            Err(e) => Err((e, Some(connection_id))),
        },
        ClientMessage::Mute { stream_id, muted } => {
            reg.set_muted(claims, session, &stream_id, muted).map_err(|e| (e, None))
        }
        ClientMessage::Leave {} => {
            reg.remove_participant(state.media.as_ref(), room_id, pid, session, "leave").await;
            reg.send_to_session(session, Outbound::Close(1000, "leave".into()));
            return true;
        }
    };
    if let Err((mut e, conn)) = result {
        if e.code == ErrorCode::Unprocessable {
            // An offer with nothing usable in it: `bad_sdp` on the WebSocket, as before
            // `unprocessable` existed (WHIP answers it with 422).
            e.code = ErrorCode::BadSdp;
        }
        send_error(reg, session, e, conn);
    }
    false
}

/// The connection exists and belongs to this participant; anything else is `not_found`, so one
/// participant learns nothing about another's connections.
fn owned(state: &AppState, claims: &Claims, session: u64, connection_id: &str) -> Result<(), ApiError> {
    if state.registry.owns_connection(claims, session, connection_id) {
        Ok(())
    } else {
        Err(ApiError::not_found("connection"))
    }
}
