//! REST routes with which the app backend moderates and shapes a room (docs/api.md "Moderation
//! and room state"): mute a participant's streams (the gateway stops forwarding them), set
//! participant and room metadata, send a message to one participant or the whole room, and
//! look at one participant. Merged into the API-key-protected routes by `rest.rs`.
//!
//! As everywhere: the target (room, participant) is identified before the body is judged.

use axum::extract::{Path, State};
use axum::routing::{get, post, put};
use axum::{Json, Router};

use crate::error::{ApiError, ApiJson};
use crate::protocol::*;
use crate::AppState;

/// Largest metadata value (serialized JSON), room or participant: it is repeated in `joined`.
pub const MAX_METADATA_BYTES: usize = 4 * 1024;
/// Largest `data` of a backend message (serialized JSON).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/rooms/{room_id}/participants/{participant_id}/mute", post(mute))
        .route("/v1/rooms/{room_id}/participants/{participant_id}/metadata", put(participant_metadata))
        .route("/v1/rooms/{room_id}/metadata", put(room_metadata))
        .route("/v1/rooms/{room_id}/messages", post(message))
        .route("/v1/admin/drain", post(drain).delete(undrain))
}

/// Take no new rooms or sessions (readiness 503), as SIGTERM does, but keep running: take a
/// node out of rotation and let its calls end.
#[utoipa::path(
    post,
    path = "/v1/admin/drain",
    tag = "admin",
    operation_id = "drain",
    security(("api_key" = [])),
    responses(
        (status = 202, description = "Draining: `/healthz` answers 503, new rooms and sessions get 409", body = Health),
        (status = 401, description = "Missing or wrong API key (`unauthorized`)", body = ErrorBody),
    )
)]
pub(crate) async fn drain(State(state): State<AppState>) -> (axum::http::StatusCode, Json<Health>) {
    state.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!("draining on the API's request");
    (axum::http::StatusCode::ACCEPTED, Json(Health { status: "draining".into() }))
}

/// Take new work again.
#[utoipa::path(
    delete,
    path = "/v1/admin/drain",
    tag = "admin",
    operation_id = "undrain",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Taking new work again: `ok`", body = Health),
        (status = 401, description = "Missing or wrong API key (`unauthorized`)", body = ErrorBody),
    )
)]
pub(crate) async fn undrain(State(state): State<AppState>) -> Json<Health> {
    state.draining.store(false, std::sync::atomic::Ordering::Relaxed);
    tracing::info!("no longer draining");
    Json(Health { status: "ok".into() })
}

/// `GET /v1/rooms/{room_id}/participants/{participant_id}` (the route's DELETE is the kick in
/// `rest.rs`).
pub(crate) fn participant_route() -> axum::routing::MethodRouter<AppState> {
    get(participant)
}

#[utoipa::path(
    get,
    path = "/v1/rooms/{room_id}/participants/{participant_id}",
    tag = "participants",
    operation_id = "get_participant",
    security(("api_key" = [])),
    params(("room_id" = String, Path, description = "The room's id"), ("participant_id" = String, Path, description = "The participant's identity")),
    responses(
        (status = 200, description = "The participant, its connections and streams", body = ParticipantDetail),
        (status = 401, description = "Missing or wrong API key (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "No such room or participant (`not_found`)", body = ErrorBody),
    )
)]
pub(crate) async fn participant(
    State(state): State<AppState>,
    Path((room_id, participant_id)): Path<(String, String)>,
) -> Result<Json<ParticipantDetail>, ApiError> {
    state.registry.participant_detail(&room_id, &participant_id).map(Json)
}

fn bounded(value: &serde_json::Value, limit: usize, what: &str) -> Result<(), ApiError> {
    let len = serde_json::to_string(value).map(|s| s.len()).unwrap_or(usize::MAX);
    if len > limit {
        return Err(ApiError::new(ErrorCode::PayloadTooLarge, format!("{what} is {len} bytes; at most {limit}")));
    }
    Ok(())
}

#[utoipa::path(
    post,
    path = "/v1/rooms/{room_id}/participants/{participant_id}/mute",
    tag = "participants",
    operation_id = "mute",
    security(("api_key" = [])),
    params(("room_id" = String, Path, description = "The room's id"), ("participant_id" = String, Path, description = "The participant's identity")),
    request_body = MuteRequest,
    responses(
        (status = 200, description = "The streams it applied to, as they are now", body = MuteResponse),
        (status = 400, description = "Malformed JSON, an unknown field, or a value out of range (`bad_request`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "No such room, participant or stream (`not_found`)", body = ErrorBody),
        (status = 413, description = "The body is over `limits.max_body_bytes` (`payload_too_large`)", body = ErrorBody),
        (status = 500, description = "A fault of the gateway (`internal`)", body = ErrorBody),
    )
)]
pub(crate) async fn mute(
    State(state): State<AppState>,
    Path((room_id, participant_id)): Path<(String, String)>,
    body: Result<ApiJson<MuteRequest>, ApiError>,
) -> Result<Json<MuteResponse>, ApiError> {
    state.registry.check_participant(&room_id, &participant_id)?;
    let ApiJson(req) = body?;
    if req.kind.as_deref().is_some_and(|k| k != "audio" && k != "video") {
        return Err(ApiError::bad_request("kind must be audio or video"));
    }
    // Run to completion even if the backend hangs up: media and records must agree.
    let streams = tokio::spawn(async move {
        state.registry.moderate_mute(state.media.as_ref(), &room_id, &participant_id, &req).await
    })
    .await
    .unwrap_or_else(|e| Err(ApiError::new(ErrorCode::Internal, format!("request task failed: {e}"))))?;
    Ok(Json(MuteResponse { streams }))
}

#[utoipa::path(
    put,
    path = "/v1/rooms/{room_id}/participants/{participant_id}/metadata",
    tag = "participants",
    operation_id = "set_participant_metadata",
    security(("api_key" = [])),
    params(("room_id" = String, Path, description = "The room's id"), ("participant_id" = String, Path, description = "The participant's identity")),
    request_body = MetadataRequest,
    responses(
        (status = 200, description = "The participant with its new metadata (also sent to the room as `participant_metadata`)", body = ParticipantInfo),
        (status = 400, description = "Malformed JSON, an unknown field, or a value out of range (`bad_request`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "No such room or participant (`not_found`)", body = ErrorBody),
        (status = 413, description = "The body is over `limits.max_body_bytes`, or the metadata over 4 KiB (`payload_too_large`)", body = ErrorBody),
    )
)]
pub(crate) async fn participant_metadata(
    State(state): State<AppState>,
    Path((room_id, participant_id)): Path<(String, String)>,
    body: Result<ApiJson<MetadataRequest>, ApiError>,
) -> Result<Json<ParticipantInfo>, ApiError> {
    state.registry.check_participant(&room_id, &participant_id)?;
    let ApiJson(req) = body?;
    bounded(&req.metadata, MAX_METADATA_BYTES, "metadata")?;
    state.registry.set_participant_metadata(&room_id, &participant_id, req.metadata).map(Json)
}

#[utoipa::path(
    put,
    path = "/v1/rooms/{room_id}/metadata",
    tag = "rooms",
    operation_id = "set_room_metadata",
    security(("api_key" = [])),
    params(("room_id" = String, Path, description = "The room's id")),
    request_body = MetadataRequest,
    responses(
        (status = 200, description = "The room's new metadata (also sent to the room as `room_metadata`)", body = RoomMetadata),
        (status = 400, description = "Malformed JSON, an unknown field, or a value out of range (`bad_request`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "No such room (`not_found`)", body = ErrorBody),
        (status = 413, description = "The body is over `limits.max_body_bytes`, or the metadata over 4 KiB (`payload_too_large`)", body = ErrorBody),
    )
)]
pub(crate) async fn room_metadata(
    State(state): State<AppState>,
    Path(room_id): Path<String>,
    body: Result<ApiJson<MetadataRequest>, ApiError>,
) -> Result<Json<RoomMetadata>, ApiError> {
    if !state.registry.has_room(&room_id) {
        return Err(ApiError::not_found("room"));
    }
    let ApiJson(req) = body?;
    bounded(&req.metadata, MAX_METADATA_BYTES, "metadata")?;
    state.registry.set_room_metadata(&room_id, req.metadata).map(Json)
}

#[utoipa::path(
    post,
    path = "/v1/rooms/{room_id}/messages",
    tag = "messages",
    operation_id = "send_message",
    security(("api_key" = [])),
    params(("room_id" = String, Path, description = "The room's id")),
    request_body = SendMessageRequest,
    responses(
        (status = 200, description = "How many sessions it was queued to", body = SendMessageResponse),
        (status = 400, description = "Malformed JSON, an unknown field, or a value out of range (`bad_request`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "No such room, or no such participant in it (`not_found`)", body = ErrorBody),
        (status = 413, description = "The body is over `limits.max_body_bytes`, or `data` over 16 KiB (`payload_too_large`)", body = ErrorBody),
    )
)]
pub(crate) async fn message(
    State(state): State<AppState>,
    Path(room_id): Path<String>,
    body: Result<ApiJson<SendMessageRequest>, ApiError>,
) -> Result<Json<SendMessageResponse>, ApiError> {
    if !state.registry.has_room(&room_id) {
        return Err(ApiError::not_found("room"));
    }
    let ApiJson(req) = body?;
    bounded(&req.data, MAX_MESSAGE_BYTES, "data")?;
    let recipients = state.registry.send_message(&room_id, req.participant_id.as_deref(), req.data)?;
    Ok(Json(SendMessageResponse { recipients }))
}
