//! REST API for app backends (docs/api.md §2): rooms, join tokens, kick, connection inspection,
//! health and metrics. Every refusal uses the contract's error shape.

use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};

use crate::error::{ApiError, ApiJson};
use crate::protocol::*;
use crate::registry::{new_id, Outbound, Room};
use crate::AppState;

pub(crate) fn routes(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/rooms", post(create_room).get(list_rooms))
        .route("/v1/rooms/{room_id}", get(get_room).delete(delete_room))
        .route("/v1/rooms/{room_id}/tokens", post(create_token))
        .route("/v1/rooms/{room_id}/participants/{participant_id}", delete(kick))
        .route("/v1/connections/{connection_id}", get(get_connection))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    let mut open = Router::new().route("/healthz", get(healthz)).route("/metrics", get(metrics));
    if state.config.dev_token_route {
        open = open.route("/v1/dev/token", post(dev_token));
    }
    api.merge(open)
        .fallback(|| async { ApiError::not_found("route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(ErrorCode::MethodNotAllowed, "method not allowed on this route")
        })
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .with_state(state)
}

async fn require_api_key(State(state): State<AppState>, headers: HeaderMap, req: Request, next: Next) -> Response {
    let header = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match state.auth.check_bearer(header) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

async fn count_requests(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".to_owned());
    let resp = next.run(req).await;
    if route != "/metrics" {
        state.registry.metrics.http_requests.with_label_values(&[route.as_str(), resp.status().as_str()]).inc();
    }
    resp
}

async fn healthz(State(state): State<AppState>) -> Json<Health> {
    let draining = state.draining.load(std::sync::atomic::Ordering::Relaxed);
    Json(Health { status: if draining { "draining" } else { "ok" }.into() })
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.registry.metrics.render())
}

/// A name or participant id: 1–64 characters that are safe in URLs and SDP msid tokens.
pub(crate) fn valid_identifier(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'))
}

fn valid_display_name(s: &str) -> bool {
    !s.trim().is_empty() && s.chars().count() <= 128 && !s.chars().any(char::is_control)
}

async fn create_room(
    State(state): State<AppState>,
    body: Result<ApiJson<CreateRoomRequest>, ApiError>,
) -> Result<(StatusCode, Json<RoomCreated>), ApiError> {
    // An empty body means "all defaults".
    let req = match body {
        Ok(ApiJson(r)) => r,
        Err(e) if e.message.contains("Content-Type") => CreateRoomRequest::default(),
        Err(e) => return Err(e),
    };
    let room = detached(async move { create_room_inner(&state, req).await }).await?;
    Ok((StatusCode::CREATED, Json(room)))
}

pub(crate) async fn create_room_inner(state: &AppState, req: CreateRoomRequest) -> Result<RoomCreated, ApiError> {
    if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(ApiError::new(ErrorCode::Conflict, "server is draining"));
    }
    if let Some(name) = &req.name {
        if !valid_identifier(name) {
            return Err(ApiError::bad_request("name must be 1-64 characters of A-Z a-z 0-9 - _ . +"));
        }
    }
    let max = req.max_participants.unwrap_or(state.config.default_max_participants);
    if max == 0 || max > state.config.max_participants_limit {
        return Err(ApiError::bad_request(format!(
            "max_participants must be between 1 and {}",
            state.config.max_participants_limit
        )));
    }
    let reg = &state.registry;
    if reg.rooms.len() >= state.config.max_rooms {
        return Err(ApiError::new(ErrorCode::Conflict, "room limit of this server reached"));
    }
    let room_id = new_id("r");
    if let Some(name) = &req.name {
        match reg.names.entry(name.clone()) {
            dashmap::Entry::Occupied(_) => {
                return Err(ApiError::new(ErrorCode::Conflict, format!("room name '{name}' is taken")))
            }
            dashmap::Entry::Vacant(v) => {
                v.insert(room_id.clone());
            }
        }
    }
    if let Err(e) = state.media.create_room(&room_id).await {
        if let Some(name) = &req.name {
            reg.names.remove(name);
        }
        return Err(e.into());
    }
    let created_at = now_rfc3339();
    reg.rooms.insert(
        room_id.clone(),
        Room {
            room_id: room_id.clone(),
            name: req.name.clone(),
            max_participants: max,
            created_at: created_at.clone(),
            participants: Default::default(),
            streams: Vec::new(),
        },
    );
    reg.metrics.rooms.set(reg.rooms.len() as i64);
    tracing::info!(room_id, name = ?req.name, "room created");
    Ok(RoomCreated { room_id, name: req.name, max_participants: max, created_at })
}

async fn list_rooms(State(state): State<AppState>) -> Json<RoomList> {
    let mut rooms: Vec<RoomSummary> = state
        .registry
        .rooms
        .iter()
        .map(|r| RoomSummary {
            room_id: r.room_id.clone(),
            name: r.name.clone(),
            participants: r.participants.len(),
            streams: r.streams.len(),
        })
        .collect();
    rooms.sort_by(|a, b| a.room_id.cmp(&b.room_id));
    Json(RoomList { rooms })
}

async fn get_room(State(state): State<AppState>, Path(room_id): Path<String>) -> Result<Json<RoomDetail>, ApiError> {
    let reg = &state.registry;
    let room = reg.rooms.get(&room_id).ok_or_else(|| ApiError::not_found("room"))?;
    let mut participants: Vec<ParticipantDetail> = room
        .participants
        .values()
        .map(|p| ParticipantDetail {
            participant_id: p.participant_id.clone(),
            name: p.name.clone(),
            connections: p.connections.iter().filter_map(|id| reg.connections.get(id).map(|c| c.summary())).collect(),
            streams: room.streams.iter().filter(|s| s.participant_id == p.participant_id).cloned().collect(),
        })
        .collect();
    participants.sort_by(|a, b| a.participant_id.cmp(&b.participant_id));
    Ok(Json(RoomDetail {
        room_id: room.room_id.clone(),
        name: room.name.clone(),
        max_participants: room.max_participants,
        created_at: room.created_at.clone(),
        participants,
        streams: room.streams.clone(),
    }))
}

async fn delete_room(State(state): State<AppState>, Path(room_id): Path<String>) -> Result<StatusCode, ApiError> {
    detached(async move { delete_room_inner(&state, &room_id).await }).await
}

/// Run a handler's state changes to completion even if the client goes away mid-request:
/// a dropped future must not leave a name reserved or a room half-closed.
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(work)
        .await
        .unwrap_or_else(|e| Err(ApiError::new(ErrorCode::Internal, format!("request task failed: {e}"))))
}

async fn delete_room_inner(state: &AppState, room_id: &str) -> Result<StatusCode, ApiError> {
    let room_id = room_id.to_owned();
    let reg = &state.registry;
    if !reg.rooms.contains_key(&room_id) {
        return Err(ApiError::not_found("room"));
    }
    state.media.close_room(&room_id).await;
    if let Some((_, room)) = reg.rooms.remove(&room_id) {
        if let Some(name) = &room.name {
            reg.names.remove(name);
        }
        for p in room.participants.values() {
            reg.send_to_session(p.session, Outbound::Close(1000, "room_closed".into()));
        }
        reg.metrics.participants.sub(room.participants.len() as i64);
    }
    reg.metrics.rooms.set(reg.rooms.len() as i64);
    tracing::info!(room_id, "room deleted");
    Ok(StatusCode::NO_CONTENT)
}

async fn create_token(
    State(state): State<AppState>,
    Path(room_id): Path<String>,
    body: Result<ApiJson<TokenRequest>, ApiError>,
) -> Result<(StatusCode, Json<TokenResponse>), ApiError> {
    if !state.registry.rooms.contains_key(&room_id) {
        return Err(ApiError::not_found("room"));
    }
    let ApiJson(req) = body?;
    if !valid_identifier(&req.participant) {
        return Err(ApiError::bad_request("participant must be 1-64 characters of A-Z a-z 0-9 - _ . +"));
    }
    let name = req.name.clone().unwrap_or_else(|| req.participant.clone());
    if !valid_display_name(&name) {
        return Err(ApiError::bad_request("name must be 1-128 printable characters"));
    }
    let ttl = req.ttl_s.unwrap_or(state.config.default_token_ttl_s);
    if ttl == 0 || ttl > state.config.max_token_ttl_s {
        return Err(ApiError::bad_request(format!("ttl_s must be between 1 and {}", state.config.max_token_ttl_s)));
    }
    let (token, exp) = state.auth.issue(
        &room_id,
        &req.participant,
        &name,
        req.can_publish.unwrap_or(true),
        req.can_subscribe.unwrap_or(true),
        ttl,
    )?;
    Ok((StatusCode::CREATED, Json(TokenResponse { token, expires_at: crate::auth::unix_to_rfc3339(exp) })))
}

async fn dev_token(
    State(state): State<AppState>,
    body: Result<ApiJson<DevTokenRequest>, ApiError>,
) -> Result<Json<DevTokenResponse>, ApiError> {
    let ApiJson(req) = body?;
    if !valid_identifier(&req.room) || !valid_identifier(&req.participant) {
        return Err(ApiError::bad_request("room and participant must be 1-64 characters of A-Z a-z 0-9 - _ . +"));
    }
    let existing = state.registry.names.get(&req.room).map(|id| id.clone());
    let room_id = match existing {
        Some(id) => id,
        None => {
            match create_room_inner(&state, CreateRoomRequest { name: Some(req.room.clone()), max_participants: None })
                .await
            {
                Ok(r) => r.room_id,
                // Lost a race with another joiner creating the same room.
                Err(e) if e.code == ErrorCode::Conflict => {
                    state.registry.names.get(&req.room).map(|id| id.clone()).ok_or(e)?
                }
                Err(e) => return Err(e),
            }
        }
    };
    let ttl = state.config.default_token_ttl_s;
    let (token, exp) = state.auth.issue(&room_id, &req.participant, &req.participant, true, true, ttl)?;
    Ok(Json(DevTokenResponse {
        token,
        room_id,
        participant_id: req.participant,
        expires_at: crate::auth::unix_to_rfc3339(exp),
    }))
}

async fn kick(
    State(state): State<AppState>,
    Path((room_id, participant_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let reg = &state.registry;
    let session = {
        let room = reg.rooms.get(&room_id).ok_or_else(|| ApiError::not_found("room"))?;
        let p = room.participants.get(&participant_id).ok_or_else(|| ApiError::not_found("participant"))?;
        p.session
    };
    let st = state.clone();
    let (room, pid) = (room_id.clone(), participant_id.clone());
    detached(async move {
        crate::ws::remove_participant(&st, &room, &pid, session, "kicked").await;
        st.registry.send_to_session(session, Outbound::Close(1000, "kicked".into()));
        Ok(())
    })
    .await?;
    tracing::info!(room_id, participant_id, "participant kicked");
    Ok(StatusCode::NO_CONTENT)
}

async fn get_connection(
    State(state): State<AppState>,
    Path(connection_id): Path<String>,
) -> Result<Json<ConnectionDetail>, ApiError> {
    let mut detail = {
        let c = state.registry.connections.get(&connection_id).ok_or_else(|| ApiError::not_found("connection"))?;
        ConnectionDetail {
            connection_id: c.connection_id.clone(),
            room_id: c.room_id.clone(),
            participant_id: c.participant_id.clone(),
            role: c.role,
            state: c.state,
            code: c.state.code(),
            events: c.events.iter().cloned().map(HistoryItem::ConnectionEvent).collect(),
            stats: serde_json::Value::Null,
        }
    };
    detail.stats = if detail.state.is_terminal() {
        serde_json::json!({})
    } else {
        state.media.connection_stats(&connection_id).await.unwrap_or_else(|| serde_json::json!({}))
    };
    Ok(Json(detail))
}
