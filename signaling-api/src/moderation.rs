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
async fn drain(State(state): State<AppState>) -> (axum::http::StatusCode, Json<Health>) {
    state.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!("draining on the API's request");
    (axum::http::StatusCode::ACCEPTED, Json(Health { status: "draining".into() }))
}

/// Take new work again.
async fn undrain(State(state): State<AppState>) -> Json<Health> {
    state.draining.store(false, std::sync::atomic::Ordering::Relaxed);
    tracing::info!("no longer draining");
    Json(Health { status: "ok".into() })
}

/// `GET /v1/rooms/{room_id}/participants/{participant_id}` (the route's DELETE is the kick in
/// `rest.rs`).
pub(crate) fn participant_route() -> axum::routing::MethodRouter<AppState> {
    get(participant)
}

async fn participant(
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

async fn mute(
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

async fn participant_metadata(
    State(state): State<AppState>,
    Path((room_id, participant_id)): Path<(String, String)>,
    body: Result<ApiJson<MetadataRequest>, ApiError>,
) -> Result<Json<ParticipantInfo>, ApiError> {
    state.registry.check_participant(&room_id, &participant_id)?;
    let ApiJson(req) = body?;
    bounded(&req.metadata, MAX_METADATA_BYTES, "metadata")?;
    state.registry.set_participant_metadata(&room_id, &participant_id, req.metadata).map(Json)
}

async fn room_metadata(
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

async fn message(
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
