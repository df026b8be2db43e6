//! REST API for app backends (docs/api.md §2): rooms, join tokens, kick, connection inspection,
//! health and metrics. Every refusal uses the contract's error shape.

use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::error::{ApiError, ApiJson};
use crate::protocol::*;
use crate::AppState;

pub(crate) fn routes(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/rooms", post(create_room).get(list_rooms))
        .route("/v1/rooms/{room_id}", get(get_room).delete(delete_room))
        .route("/v1/rooms/{room_id}/tokens", post(create_token))
        .route("/v1/rooms/{room_id}/participants/{participant_id}", crate::moderation::participant_route().delete(kick))
        .route("/v1/connections/{connection_id}", get(get_connection))
        // Moderation and room state from the app backend (mute, metadata, messages).
        .merge(crate::moderation::routes())
        .route_layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    let mut open = Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(crate::openapi::openapi_json));
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

pub(crate) async fn count_requests(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".to_owned());
    // A bounded label: the methods the API has, anything else is `other`.
    let method: &'static str = match req.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    };
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    if route != "/metrics" {
        let m = &state.registry.metrics;
        m.http_requests.with_label_values(&[route.as_str(), resp.status().as_str(), method]).inc();
        m.http_seconds.with_label_values(&[method, route.as_str()]).observe(started.elapsed().as_secs_f64());
    }
    resp
}

/// Readiness: 200 `ok` while new work is taken, 503 `draining` once shutdown began (a load
/// balancer then sends no one new here).
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    operation_id = "healthz",
    responses(
        (status = 200, description = "Ready: `ok`", body = Health),
        (status = 503, description = "Draining: `draining` (send no one new here)", body = Health),
    )
)]
pub(crate) async fn healthz(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, Json(Health { status: "draining".into() }))
    } else {
        (StatusCode::OK, Json(Health { status: "ok".into() }))
    }
}

/// Liveness: 200 while the process serves HTTP at all, draining or not.
#[utoipa::path(
    get,
    path = "/livez",
    tag = "health",
    operation_id = "livez",
    responses((status = 200, description = "The process serves HTTP: `ok`", body = Health))
)]
pub(crate) async fn livez() -> Json<Health> {
    Json(Health { status: "ok".into() })
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    operation_id = "metrics",
    responses((status = 200, description = "Prometheus text format (docs/metrics.md)", body = String, content_type = "text/plain"))
)]
pub(crate) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.registry.metrics.render())
}

const ROOM_NAME_RULE: &str =
    "room name must be 1-64 characters (any script), without control characters or leading/trailing spaces";
const DISPLAY_NAME_RULE: &str = "name must be 1-128 printable characters";

/// A participant id: 1–64 characters that are safe in URLs and SDP msid tokens.
pub(crate) fn valid_identifier(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'))
}

/// A room name: 1–64 characters of any script (spaces inside allowed), no control characters,
/// no leading or trailing whitespace. Rooms are addressed by id; the name is only looked up.
pub(crate) fn valid_room_name(s: &str) -> bool {
    !s.is_empty() && s.chars().count() <= 64 && s.trim() == s && !s.chars().any(char::is_control)
}

fn valid_display_name(s: &str) -> bool {
    !s.trim().is_empty() && s.chars().count() <= 128 && !s.chars().any(char::is_control)
}

#[utoipa::path(
    post,
    path = "/v1/rooms",
    tag = "rooms",
    operation_id = "create_room",
    security(("api_key" = [])),
    request_body(content = Option<CreateRoomRequest>, description = "Optional: an empty body (no Content-Type) takes every default."),
    responses(
        (status = 201, description = "The room", body = RoomCreated,
            headers(("Location" = String, description = "`/v1/rooms/{room_id}`")),
            links(
                ("GetRoom" = (operation_id = "get_room", parameters(("room_id" = "$response.body#/room_id")))),
                ("CreateToken" = (operation_id = "create_token", parameters(("room_id" = "$response.body#/room_id")))),
                ("SetRoomMetadata" = (operation_id = "set_room_metadata", parameters(("room_id" = "$response.body#/room_id")))),
                ("DeleteRoom" = (operation_id = "delete_room", parameters(("room_id" = "$response.body#/room_id")))),
            )),
        (status = 400, description = "Malformed JSON, an unknown field, or a value out of range (`bad_request`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key (`unauthorized`)", body = ErrorBody),
        (status = 409, description = "The name is taken, the server's room limit is reached, or the server is draining (`conflict`)", body = ErrorBody),
        (status = 413, description = "The body is over `limits.max_body_bytes` (`payload_too_large`)", body = ErrorBody),
        (status = 500, description = "A fault of the gateway (`internal`)", body = ErrorBody),
    )
)]
pub(crate) async fn create_room(
    State(state): State<AppState>,
    body: Result<ApiJson<CreateRoomRequest>, ApiError>,
) -> Result<(StatusCode, [(header::HeaderName, String); 1], Json<RoomCreated>), ApiError> {
    // An empty body means "all defaults".
    let req = match body {
        Ok(ApiJson(r)) => r,
        Err(e) if e.message.contains("Content-Type") => CreateRoomRequest::default(),
        Err(e) => return Err(e),
    };
    let room = detached(async move { create_room_inner(&state, req).await }).await?;
    let location = format!("/v1/rooms/{}", room.room_id);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(room)))
}

async fn create_room_inner(state: &AppState, req: CreateRoomRequest) -> Result<RoomCreated, ApiError> {
    if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(ApiError::new(ErrorCode::Conflict, "server is draining"));
    }
    if let Some(name) = &req.name {
        if !valid_room_name(name) {
            return Err(ApiError::bad_request(ROOM_NAME_RULE));
        }
    }
    let max = req.max_participants.unwrap_or(state.config.default_max_participants);
    if max == 0 || max > state.config.max_participants_limit {
        return Err(ApiError::bad_request(format!(
            "max_participants must be between 1 and {}",
            state.config.max_participants_limit
        )));
    }
    state.registry.create_room(state.media.as_ref(), req.name, max, state.config.max_rooms).await
}

#[utoipa::path(
    get,
    path = "/v1/rooms",
    tag = "rooms",
    operation_id = "list_rooms",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Every room", body = RoomList),
        (status = 401, description = "Missing or wrong API key (`unauthorized`)", body = ErrorBody),
    )
)]
pub(crate) async fn list_rooms(State(state): State<AppState>) -> Json<RoomList> {
    Json(RoomList { rooms: state.registry.room_summaries() })
}

#[utoipa::path(
    get,
    path = "/v1/rooms/{room_id}",
    tag = "rooms",
    operation_id = "get_room",
    security(("api_key" = [])),
    params(("room_id" = String, Path, description = "The room's id")),
    responses(
        (status = 200, description = "The room, its participants and its streams", body = RoomDetail),
        (status = 401, description = "Missing or wrong API key (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "No such room (`not_found`)", body = ErrorBody),
    )
)]
pub(crate) async fn get_room(
    State(state): State<AppState>,
    Path(room_id): Path<String>,
) -> Result<Json<RoomDetail>, ApiError> {
    state.registry.room_detail(&room_id).map(Json).ok_or_else(|| ApiError::not_found("room"))
}

#[utoipa::path(
    delete,
    path = "/v1/rooms/{room_id}",
    tag = "rooms",
    operation_id = "delete_room",
    security(("api_key" = [])),
    params(("room_id" = String, Path, description = "The room's id")),
    responses(
        (status = 204, description = "Closed: every connection in it ended FINISHED (`room_closed`)"),
        (status = 401, description = "Missing or wrong API key (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "No such room (`not_found`)", body = ErrorBody),
        (status = 500, description = "A fault of the gateway (`internal`)", body = ErrorBody),
    )
)]
pub(crate) async fn delete_room(
    State(state): State<AppState>,
    Path(room_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    detached(async move { state.registry.delete_room(state.media.as_ref(), &room_id).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Run a handler's state changes to completion even if the client goes away mid-request:
/// a dropped future must not leave a name reserved or a room half-closed.
pub(crate) async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(work)
        .await
        .unwrap_or_else(|e| Err(ApiError::new(ErrorCode::Internal, format!("request task failed: {e}"))))
}

#[utoipa::path(
    post,
    path = "/v1/rooms/{room_id}/tokens",
    tag = "rooms",
    operation_id = "create_token",
    security(("api_key" = [])),
    params(("room_id" = String, Path, description = "The room's id")),
    request_body = TokenRequest,
    responses(
        (status = 201, description = "A signed join token for that room and identity", body = TokenResponse,
            headers(("Location" = String, description = "`/v1/rooms/{room_id}/participants/{participant}`"))),
        (status = 400, description = "Malformed JSON, an unknown field, or a value out of range (`bad_request`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "No such room (`not_found`)", body = ErrorBody),
        (status = 413, description = "The body is over `limits.max_body_bytes` (`payload_too_large`)", body = ErrorBody),
        (status = 500, description = "A fault of the gateway (`internal`)", body = ErrorBody),
    )
)]
pub(crate) async fn create_token(
    State(state): State<AppState>,
    Path(room_id): Path<String>,
    body: Result<ApiJson<TokenRequest>, ApiError>,
) -> Result<(StatusCode, [(header::HeaderName, String); 1], Json<TokenResponse>), ApiError> {
    if !state.registry.has_room(&room_id) {
        return Err(ApiError::not_found("room"));
    }
    let ApiJson(req) = body?;
    if !valid_identifier(&req.participant) {
        return Err(ApiError::bad_request("participant must be 1-64 characters of A-Z a-z 0-9 - _ . +"));
    }
    let name = req.name.clone().unwrap_or_else(|| req.participant.clone());
    if !valid_display_name(&name) {
        return Err(ApiError::bad_request(DISPLAY_NAME_RULE));
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
    // The participant the token admits (GET shows it once it has joined).
    let location = format!("/v1/rooms/{room_id}/participants/{}", req.participant);
    let ice_servers = ice_servers(&state, &req.participant, exp);
    let body = TokenResponse { token, expires_at: crate::auth::unix_to_rfc3339(exp), ice_servers };
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(body)))
}

#[utoipa::path(
    post,
    path = "/v1/dev/token",
    tag = "dev",
    operation_id = "dev_token",
    request_body = DevTokenRequest,
    responses(
        (status = 200, description = "A join token for the room of that name (created if it did not exist)", body = DevTokenResponse,
            links(
                ("GetRoom" = (operation_id = "get_room", parameters(("room_id" = "$response.body#/room_id")))),
                ("GetParticipant" = (operation_id = "get_participant", parameters(
                    ("room_id" = "$response.body#/room_id"), ("participant_id" = "$response.body#/participant_id")))),
            )),
        (status = 400, description = "Malformed JSON, an unknown field, or a value out of range (`bad_request`)", body = ErrorBody),
        (status = 404, description = "The route is off (`dev.token_route = off`) (`not_found`)", body = ErrorBody),
        (status = 409, description = "The server's room limit is reached, or the server is draining (`conflict`)", body = ErrorBody),
        (status = 413, description = "The body is over `limits.max_body_bytes` (`payload_too_large`)", body = ErrorBody),
        (status = 500, description = "A fault of the gateway (`internal`)", body = ErrorBody),
    )
)]
pub(crate) async fn dev_token(
    State(state): State<AppState>,
    body: Result<ApiJson<DevTokenRequest>, ApiError>,
) -> Result<Json<DevTokenResponse>, ApiError> {
    let ApiJson(req) = body?;
    if !valid_room_name(&req.room) {
        return Err(ApiError::bad_request(ROOM_NAME_RULE));
    }
    if !valid_identifier(&req.participant) {
        return Err(ApiError::bad_request("participant must be 1-64 characters of A-Z a-z 0-9 - _ . +"));
    }
    let name = req.name.clone().unwrap_or_else(|| req.participant.clone());
    if !valid_display_name(&name) {
        return Err(ApiError::bad_request(DISPLAY_NAME_RULE));
    }
    let existing = state.registry.room_id_by_name(&req.room);
    let room_id = match existing {
        Some(id) => id,
        None => {
            match create_room_inner(&state, CreateRoomRequest { name: Some(req.room.clone()), max_participants: None })
                .await
            {
                Ok(r) => r.room_id,
                // Lost a race with another joiner creating the same room.
                Err(e) if e.code == ErrorCode::Conflict => state.registry.room_id_by_name(&req.room).ok_or(e)?,
                Err(e) => return Err(e),
            }
        }
    };
    let ttl = state.config.default_token_ttl_s;
    let (token, exp) = state.auth.issue(&room_id, &req.participant, &name, true, true, ttl)?;
    let ice_servers = ice_servers(&state, &req.participant, exp);
    Ok(Json(DevTokenResponse {
        token,
        room_id,
        participant_id: req.participant,
        expires_at: crate::auth::unix_to_rfc3339(exp),
        ice_servers,
    }))
}

/// TURN credentials for a participant, valid as long as its token (none without `turn`).
pub(crate) fn ice_servers(state: &AppState, participant: &str, expires: u64) -> Vec<IceServer> {
    state.config.turn.as_ref().map(|t| vec![t.credentials(participant, expires)]).unwrap_or_default()
}

#[utoipa::path(
    delete,
    path = "/v1/rooms/{room_id}/participants/{participant_id}",
    tag = "participants",
    operation_id = "kick",
    security(("api_key" = [])),
    params(("room_id" = String, Path, description = "The room's id"), ("participant_id" = String, Path, description = "The participant's identity")),
    responses(
        (status = 204, description = "Kicked: its connections ended FINISHED (`kicked`) and its socket closed"),
        (status = 401, description = "Missing or wrong API key (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "No such room or participant (`not_found`)", body = ErrorBody),
        (status = 500, description = "A fault of the gateway (`internal`)", body = ErrorBody),
    )
)]
pub(crate) async fn kick(
    State(state): State<AppState>,
    Path((room_id, participant_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    detached(async move { state.registry.kick(state.media.as_ref(), &room_id, &participant_id).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    get,
    path = "/v1/connections/{connection_id}",
    tag = "connections",
    operation_id = "get_connection",
    security(("api_key" = [])),
    params(("connection_id" = String, Path, description = "The connection's id")),
    responses(
        (status = 200, description = "Its state, every event so far, and live stats (`{}` once it ended)", body = ConnectionDetail),
        (status = 401, description = "Missing or wrong API key (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "No such connection, or its history was forgotten (`not_found`)", body = ErrorBody),
    )
)]
pub(crate) async fn get_connection(
    State(state): State<AppState>,
    Path(connection_id): Path<String>,
) -> Result<Json<ConnectionDetail>, ApiError> {
    let mut detail =
        state.registry.connection_detail(&connection_id).ok_or_else(|| ApiError::not_found("connection"))?;
    detail.stats = if detail.state.is_terminal() {
        serde_json::json!({})
    } else {
        state.media.connection_stats(&connection_id).await.unwrap_or_else(|| serde_json::json!({}))
    };
    Ok(Json(detail))
}
