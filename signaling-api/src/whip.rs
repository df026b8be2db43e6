//! WHIP ingest (RFC 9725) and WHEP playback (draft-ietf-wish-whep) over plain HTTP, for clients
//! that speak no WebSocket: OBS, ffmpeg, GStreamer, browser WHIP/WHEP libraries.
//!
//! - `POST /v1/whip/{room}` (`{room}`: the room's id or its unique name; Bearer: a join token for
//!   that room that may publish; the participant is its identity) with an `application/sdp`
//!   offer → `201 Created`, `Location: /v1/whip/{room_id}/{connection_id}`, `ETag`, and the
//!   answer, which carries the gateway's candidate (no server trickle).
//! - `POST /v1/whep/{room}/{participant}` (Bearer: a join token for that room that may
//!   subscribe) with a `recvonly` offer plays that participant's audio and video; its resource is
//!   `/v1/whep/{room_id}/{participant}/{connection_id}`.
//! - On a resource: `DELETE` ends the connection (FINISHED, `leave`) → 200; `PATCH` with an
//!   `application/trickle-ice-sdpfrag` adds the client's candidates → 204 (the gateway is
//!   ICE-lite: it learns the client's address from its checks, so trickle only helps); an ICE
//!   restart (`If-Match: *`) → 422, as RFC 9725 §4.3 asks of a session that trickles but does
//!   not restart; an `If-Match` that is not the resource's ETag → 412. Both accept the join
//!   token of the resource's participant (also once it has expired: a broadcast may outlast it)
//!   or the API key.
//! - `OPTIONS` anywhere here answers CORS preflights; every response carries
//!   `Access-Control-Allow-Origin: *` and exposes `Location`, `ETag`, `Link`, `Accept-Patch`
//!   (credentials are bearer tokens, never cookies, so any origin may call).
//!
//! Refusals use the contract's error shape and RFC 9725's statuses: 400 malformed SDP or
//! fragment, 401 missing/invalid token (or one for another room), 403 a token without the
//! permission, 404 unknown room, publisher or resource, 409 room full or server draining,
//! 412, 413, 415 wrong content type, 422 an offer with nothing usable.
//!
//! The participant lifecycle behind these resources (HTTP sessions) is in `lifecycle.rs`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::Router;

use crate::auth::Claims;
use crate::error::ApiError;
use crate::protocol::{ErrorBody, ErrorCode, IceServer, Role};
use crate::AppState;

const SDP: &str = "application/sdp";
/// The OpenAPI document's examples (schemathesis sends them to a live gateway, which takes them).
const WHIP_OFFER_EXAMPLE: &str = "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
    a=group:BUNDLE 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=ice-ufrag:wh1p\r\n\
    a=ice-pwd:whipexampleicepassword0\r\n\
    a=fingerprint:sha-256 0F:74:31:25:CB:A2:13:EC:28:6F:6D:2C:61:FF:5D:C2:BC:B9:DB:3D:98:14:8D:1A:BB:EA:33:0C:A4:60:A8:8E\r\n\
    a=setup:actpass\r\na=mid:0\r\na=sendonly\r\na=msid:- audio0\r\na=rtcp-mux\r\n\
    a=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;useinbandfec=1\r\n";
const WHEP_OFFER_EXAMPLE: &str = "v=0\r\no=- 4611731400430051337 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
    a=group:BUNDLE 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=ice-ufrag:wh3p\r\n\
    a=ice-pwd:whepexampleicepassword0\r\n\
    a=fingerprint:sha-256 0F:74:31:25:CB:A2:13:EC:28:6F:6D:2C:61:FF:5D:C2:BC:B9:DB:3D:98:14:8D:1A:BB:EA:33:0C:A4:60:A8:8E\r\n\
    a=setup:actpass\r\na=mid:0\r\na=recvonly\r\na=rtcp-mux\r\n\
    a=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;useinbandfec=1\r\n";
const TRICKLE_EXAMPLE: &str =
    "a=ice-ufrag:wh1p\r\na=ice-pwd:whipexampleicepassword0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n\
    a=mid:0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 50099 typ host\r\na=end-of-candidates\r\n";
const SDPFRAG: &str = "application/trickle-ice-sdpfrag";
const ENDPOINT_METHODS: &str = "POST, OPTIONS";
const RESOURCE_METHODS: &str = "PATCH, DELETE, OPTIONS";

pub(crate) fn routes(state: AppState) -> Router {
    Router::new()
        .route(
            "/v1/whip/{room}",
            on(MethodFilter::POST, whip_post).options(whip_options_endpoint).fallback(endpoint_not_allowed),
        )
        .route(
            "/v1/whip/{room}/{connection_id}",
            on(MethodFilter::PATCH, whip_patch)
                .delete(whip_delete)
                .options(whip_options_resource)
                .fallback(resource_not_allowed),
        )
        .route(
            "/v1/whep/{room}/{participant}",
            on(MethodFilter::POST, whep_post).options(whep_options_endpoint).fallback(endpoint_not_allowed),
        )
        .route(
            "/v1/whep/{room}/{participant}/{connection_id}",
            on(MethodFilter::PATCH, whep_patch)
                .delete(whep_delete)
                .options(whep_options_resource)
                .fallback(resource_not_allowed),
        )
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(middleware::from_fn(cors))
        .layer(middleware::from_fn_with_state(state.clone(), crate::rest::count_requests))
        .with_state(state)
}

// ---------------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------------

#[utoipa::path(
    post,
    path = "/v1/whip/{room}",
    tag = "whip",
    operation_id = "whip_publish",
    security(("join_token" = [])),
    params(("room" = String, Path, description = "The room's id or its unique name")),
    request_body(content = String, content_type = "application/sdp", description = "An SDP offer (sendonly audio and/or video)", example = json!(WHIP_OFFER_EXAMPLE)),
    responses(
        (status = 201, description = "The session resource: the SDP answer, with the gateway's candidate", body = String, content_type = "application/sdp",
            headers(
                ("Location" = String, description = "The session resource (PATCH, DELETE)"),
                ("ETag" = String, description = "The ICE session's entity tag (`If-Match` of PATCH)"),
                ("Link" = String, description = "TURN servers, RFC 9725 §4.6 (only when `turn` is configured)"),
            )),
        (status = 400, description = "Malformed SDP (`bad_sdp`) or body (`bad_request`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid join token, or one for another room (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "The token may not publish (`forbidden`)", body = ErrorBody),
        (status = 404, description = "No such room (`not_found`)", body = ErrorBody),
        (status = 409, description = "The room is full (`room_full`) or the server is draining (`conflict`)", body = ErrorBody),
        (status = 413, description = "The body is over `limits.max_body_bytes` (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "Not `application/sdp` (`unsupported_media_type`)", body = ErrorBody),
        (status = 422, description = "Nothing in the offer the gateway can use (`unprocessable`)", body = ErrorBody),
        (status = 500, description = "A fault of the gateway (`internal`)", body = ErrorBody),
        (status = 503, description = "No free UDP port in the media range (`no_ports`)", body = ErrorBody),
    )
)]
pub(crate) async fn whip_post(
    State(state): State<AppState>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let claims = join_token(&state, &headers)?;
    let room_id = resolve_room(&state, &room)?;
    if claims.room != room_id {
        return Err(ApiError::unauthorized("the token is for another room"));
    }
    if !claims.can_publish {
        return Err(ApiError::forbidden("this token may not publish"));
    }
    let offer = sdp_body(&headers, SDP, body)?;
    let links = crate::rest::ice_servers(&state, &claims.sub, claims.exp);
    let opened = open(state, claims, offer, None).await?;
    Ok(created(format!("/v1/whip/{room_id}/{}", opened.connection_id), opened, &links))
}

#[utoipa::path(
    post,
    path = "/v1/whep/{room}/{participant}",
    tag = "whep",
    operation_id = "whep_play",
    security(("join_token" = [])),
    params(("room" = String, Path, description = "The room's id or its unique name"), ("participant" = String, Path, description = "The publisher to play")),
    request_body(content = String, content_type = "application/sdp", description = "A recvonly SDP offer", example = json!(WHEP_OFFER_EXAMPLE)),
    responses(
        (status = 201, description = "The session resource: the SDP answer, with the gateway's candidate", body = String, content_type = "application/sdp",
            headers(
                ("Location" = String, description = "The session resource (PATCH, DELETE)"),
                ("ETag" = String, description = "The ICE session's entity tag (`If-Match` of PATCH)"),
                ("Link" = String, description = "TURN servers, RFC 9725 §4.6 (only when `turn` is configured)"),
            )),
        (status = 400, description = "Malformed SDP (`bad_sdp`) or body (`bad_request`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid join token, or one for another room (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "The token may not subscribe (`forbidden`)", body = ErrorBody),
        (status = 404, description = "No such room, or the participant publishes nothing (`not_found`)", body = ErrorBody),
        (status = 409, description = "The room is full (`room_full`) or the server is draining (`conflict`)", body = ErrorBody),
        (status = 413, description = "The body is over `limits.max_body_bytes` (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "Not `application/sdp` (`unsupported_media_type`)", body = ErrorBody),
        (status = 422, description = "Nothing in the offer the gateway can use (`unprocessable`)", body = ErrorBody),
        (status = 500, description = "A fault of the gateway (`internal`)", body = ErrorBody),
        (status = 503, description = "No free UDP port in the media range (`no_ports`)", body = ErrorBody),
    )
)]
pub(crate) async fn whep_post(
    State(state): State<AppState>,
    Path((room, participant)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let claims = join_token(&state, &headers)?;
    let room_id = resolve_room(&state, &room)?;
    if claims.room != room_id {
        return Err(ApiError::unauthorized("the token is for another room"));
    }
    if !state.registry.publishes(&room_id, &participant) {
        return Err(ApiError::not_found("publisher"));
    }
    if !claims.can_subscribe {
        return Err(ApiError::forbidden("this token may not subscribe"));
    }
    let offer = sdp_body(&headers, SDP, body)?;
    let links = crate::rest::ice_servers(&state, &claims.sub, claims.exp);
    let opened = open(state, claims, offer, Some(participant.clone())).await?;
    Ok(created(format!("/v1/whep/{room_id}/{participant}/{}", opened.connection_id), opened, &links))
}

#[utoipa::path(
    patch,
    path = "/v1/whip/{room}/{connection_id}",
    tag = "whip",
    operation_id = "whip_trickle",
    security(("join_token" = []), ("api_key" = [])),
    params(("room" = String, Path, description = "The room's id or its unique name"), ("connection_id" = String, Path, description = "The session's connection id"), ("If-Match" = Option<String>, Header, description = "The resource's ETag; `*` asks for an ICE restart")),
    request_body(content = String, content_type = "application/trickle-ice-sdpfrag", description = "Trickled candidates (RFC 8840)", example = json!(TRICKLE_EXAMPLE)),
    responses(
        (status = 204, description = "The candidates were taken"),
        (status = 400, description = "Malformed body (`bad_request`, `bad_sdp`)", body = ErrorBody),
        (status = 401, description = "No bearer token, or neither the API key nor a join token (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "The join token is not the resource owner's (`forbidden`)", body = ErrorBody),
        (status = 404, description = "No such room or session resource (`not_found`)", body = ErrorBody),
        (status = 412, description = "`If-Match` is not the resource's ETag (`precondition_failed`)", body = ErrorBody),
        (status = 413, description = "The body is over `limits.max_body_bytes` (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "Not `application/trickle-ice-sdpfrag` (`unsupported_media_type`)", body = ErrorBody),
        (status = 200, description = "An ICE restart (`If-Match: *` and the client's new `a=ice-ufrag`/`a=ice-pwd`): the gateway's new credentials and candidates; a new ETag", content_type = "application/trickle-ice-sdpfrag", body = String),
        (status = 500, description = "A fault of the gateway (`internal`)", body = ErrorBody),
    )
)]
pub(crate) async fn whip_patch(
    State(state): State<AppState>,
    Path((room, connection_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let target = Target { room, connection_id, role: Role::Publish, plays: None };
    patch(state, target, headers, body).await
}

#[utoipa::path(
    patch,
    path = "/v1/whep/{room}/{participant}/{connection_id}",
    tag = "whep",
    operation_id = "whep_trickle",
    security(("join_token" = []), ("api_key" = [])),
    params(("room" = String, Path, description = "The room's id or its unique name"), ("participant" = String, Path, description = "The publisher to play"), ("connection_id" = String, Path, description = "The session's connection id"), ("If-Match" = Option<String>, Header, description = "The resource's ETag; `*` asks for an ICE restart")),
    request_body(content = String, content_type = "application/trickle-ice-sdpfrag", description = "Trickled candidates (RFC 8840)", example = json!(TRICKLE_EXAMPLE)),
    responses(
        (status = 204, description = "The candidates were taken"),
        (status = 400, description = "Malformed body (`bad_request`, `bad_sdp`)", body = ErrorBody),
        (status = 401, description = "No bearer token, or neither the API key nor a join token (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "The join token is not the resource owner's (`forbidden`)", body = ErrorBody),
        (status = 404, description = "No such room or session resource (`not_found`)", body = ErrorBody),
        (status = 412, description = "`If-Match` is not the resource's ETag (`precondition_failed`)", body = ErrorBody),
        (status = 413, description = "The body is over `limits.max_body_bytes` (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "Not `application/trickle-ice-sdpfrag` (`unsupported_media_type`)", body = ErrorBody),
        (status = 200, description = "An ICE restart (`If-Match: *` and the client's new `a=ice-ufrag`/`a=ice-pwd`): the gateway's new credentials and candidates; a new ETag", content_type = "application/trickle-ice-sdpfrag", body = String),
        (status = 500, description = "A fault of the gateway (`internal`)", body = ErrorBody),
    )
)]
pub(crate) async fn whep_patch(
    State(state): State<AppState>,
    Path((room, participant, connection_id)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let target = Target { room, connection_id, role: Role::Subscribe, plays: Some(participant) };
    patch(state, target, headers, body).await
}

#[utoipa::path(
    delete,
    path = "/v1/whip/{room}/{connection_id}",
    tag = "whip",
    operation_id = "whip_end",
    security(("join_token" = []), ("api_key" = [])),
    params(("room" = String, Path, description = "The room's id or its unique name"), ("connection_id" = String, Path, description = "The session's connection id")),
    responses(
        (status = 200, description = "Ended: the connection is FINISHED (`leave`)"),
        (status = 401, description = "No bearer token, or neither the API key nor a join token (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "The join token is not the resource owner's (`forbidden`)", body = ErrorBody),
        (status = 404, description = "No such room or session resource (`not_found`)", body = ErrorBody),
        (status = 500, description = "A fault of the gateway (`internal`)", body = ErrorBody),
    )
)]
pub(crate) async fn whip_delete(
    State(state): State<AppState>,
    Path((room, connection_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    delete(state, Target { room, connection_id, role: Role::Publish, plays: None }, headers).await
}

#[utoipa::path(
    delete,
    path = "/v1/whep/{room}/{participant}/{connection_id}",
    tag = "whep",
    operation_id = "whep_end",
    security(("join_token" = []), ("api_key" = [])),
    params(("room" = String, Path, description = "The room's id or its unique name"), ("participant" = String, Path, description = "The publisher to play"), ("connection_id" = String, Path, description = "The session's connection id")),
    responses(
        (status = 200, description = "Ended: the connection is FINISHED (`leave`)"),
        (status = 401, description = "No bearer token, or neither the API key nor a join token (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "The join token is not the resource owner's (`forbidden`)", body = ErrorBody),
        (status = 404, description = "No such room or session resource (`not_found`)", body = ErrorBody),
        (status = 500, description = "A fault of the gateway (`internal`)", body = ErrorBody),
    )
)]
pub(crate) async fn whep_delete(
    State(state): State<AppState>,
    Path((room, participant, connection_id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let target = Target { room, connection_id, role: Role::Subscribe, plays: Some(participant) };
    delete(state, target, headers).await
}

#[utoipa::path(
    options,
    path = "/v1/whip/{room}",
    tag = "whip",
    operation_id = "whip_preflight",
    params(("room" = String, Path, description = "The room's id or its unique name")),
    responses(
        (status = 204, description = "CORS preflight",
            headers(
                ("Access-Control-Allow-Methods" = String),
                ("Access-Control-Allow-Headers" = String),
                ("Accept-Post" = String),
            )),
    )
)]
pub(crate) async fn whip_options_endpoint() -> Response {
    preflight_endpoint()
}

#[utoipa::path(
    options,
    path = "/v1/whip/{room}/{connection_id}",
    tag = "whip",
    operation_id = "whip_resource_preflight",
    params(("room" = String, Path, description = "The room's id or its unique name"), ("connection_id" = String, Path, description = "The session's connection id")),
    responses(
        (status = 204, description = "CORS preflight",
            headers(
                ("Access-Control-Allow-Methods" = String),
                ("Access-Control-Allow-Headers" = String),
                ("Accept-Patch" = String),
            )),
    )
)]
pub(crate) async fn whip_options_resource() -> Response {
    preflight_resource()
}

#[utoipa::path(
    options,
    path = "/v1/whep/{room}/{participant}",
    tag = "whep",
    operation_id = "whep_preflight",
    params(("room" = String, Path, description = "The room's id or its unique name"), ("participant" = String, Path, description = "The publisher to play")),
    responses(
        (status = 204, description = "CORS preflight",
            headers(
                ("Access-Control-Allow-Methods" = String),
                ("Access-Control-Allow-Headers" = String),
                ("Accept-Post" = String),
            )),
    )
)]
pub(crate) async fn whep_options_endpoint() -> Response {
    preflight_endpoint()
}

#[utoipa::path(
    options,
    path = "/v1/whep/{room}/{participant}/{connection_id}",
    tag = "whep",
    operation_id = "whep_resource_preflight",
    params(("room" = String, Path, description = "The room's id or its unique name"), ("participant" = String, Path, description = "The publisher to play"), ("connection_id" = String, Path, description = "The session's connection id")),
    responses(
        (status = 204, description = "CORS preflight",
            headers(
                ("Access-Control-Allow-Methods" = String),
                ("Access-Control-Allow-Headers" = String),
                ("Accept-Patch" = String),
            )),
    )
)]
pub(crate) async fn whep_options_resource() -> Response {
    preflight_resource()
}

fn preflight_endpoint() -> Response {
    preflight(ENDPOINT_METHODS, (header::HeaderName::from_static("accept-post"), SDP))
}

fn preflight_resource() -> Response {
    preflight(RESOURCE_METHODS, (header::HeaderName::from_static("accept-patch"), SDPFRAG))
}

async fn endpoint_not_allowed() -> Response {
    not_allowed(ENDPOINT_METHODS)
}

async fn resource_not_allowed() -> Response {
    not_allowed(RESOURCE_METHODS)
}

// ---------------------------------------------------------------------------------------------
// The work
// ---------------------------------------------------------------------------------------------

/// A WHIP or WHEP session resource as its URL names it.
struct Target {
    room: String,
    connection_id: String,
    role: Role,
    /// WHEP: the publisher in the URL.
    plays: Option<String>,
}

async fn open(
    state: AppState,
    claims: Claims,
    offer: String,
    plays: Option<String>,
) -> Result<crate::lifecycle::HttpOpened, ApiError> {
    if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(ApiError::new(ErrorCode::Conflict, "server is draining"));
    }
    // Runs to the end even if the client goes away: no half-made connection stays behind.
    crate::rest::detached(async move {
        state.registry.open_http_connection(state.media.as_ref(), &claims, offer, plays.as_deref()).await
    })
    .await
}

/// The `201 Created` of a new session, with its TURN servers as RFC 9725 §4.6 `Link` headers.
fn created(location: String, opened: crate::lifecycle::HttpOpened, ice_servers: &[IceServer]) -> Response {
    let mut resp = (StatusCode::CREATED, opened.answer).into_response();
    let h = resp.headers_mut();
    for server in ice_servers {
        for url in &server.urls {
            let link = format!(
                "<{url}>; rel=\"ice-server\"; username=\"{}\"; credential=\"{}\"; credential-type=\"password\"",
                server.username, server.credential
            );
            if let Ok(v) = HeaderValue::from_str(&link) {
                h.append(header::LINK, v);
            }
        }
    }
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(SDP));
    if let Ok(v) = HeaderValue::from_str(&location) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&opened.etag) {
        h.insert(header::ETAG, v);
    }
    resp
}

/// The resource named by `target`, checked against the caller: the API key, or a join token of
/// the resource's participant. Returns its ETag.
fn resource(state: &AppState, target: &Target, headers: &HeaderMap) -> Result<String, ApiError> {
    let caller = caller(state, headers)?;
    let room_id = resolve_room(state, &target.room)?;
    let (participant, _, http) = state
        .registry
        .http_resource(&room_id, &target.connection_id)
        .filter(|(_, role, http)| *role == target.role && http.plays == target.plays)
        .ok_or_else(|| ApiError::not_found("session resource"))?;
    if let Some(claims) = caller {
        if claims.room != room_id || claims.sub != participant {
            return Err(ApiError::forbidden("the token is not the resource owner's"));
        }
    }
    Ok(http.etag)
}

async fn patch(
    state: AppState,
    target: Target,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let etag = resource(&state, &target, &headers)?;
    let fragment = sdp_body(&headers, SDPFRAG, body)?;
    match headers.get(header::IF_MATCH).map(|v| v.to_str().unwrap_or("").trim()) {
        Some("*") => return restart(state, target, &fragment).await,
        Some(tag) if tag != etag => {
            return Err(ApiError::new(ErrorCode::PreconditionFailed, "If-Match is not this session's ETag"))
        }
        _ => {}
    }
    add_candidates(&state, &target.connection_id, &fragment).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The fragment's `a=candidate` lines (and `a=end-of-candidates`) to the media plane.
async fn add_candidates(state: &AppState, connection_id: &str, fragment: &str) -> Result<(), ApiError> {
    let mut candidates = Vec::new();
    for line in fragment.lines().map(str::trim) {
        if let Some(c) = line.strip_prefix("a=candidate:") {
            candidates.push(format!("candidate:{c}"));
        } else if line == "a=end-of-candidates" {
            candidates.push(String::new());
        }
    }
    for c in candidates {
        state.media.add_candidate(connection_id, c).await.map_err(ApiError::from)?;
    }
    Ok(())
}

/// ICE restart (RFC 9725 §4.3): `If-Match: *` and the client's new `a=ice-ufrag`/`a=ice-pwd`.
/// The connection restarts ICE with them; `200` with the gateway's new credentials and
/// candidate as a trickle-ice-sdpfrag, and the new `ETag` of the ICE session.
async fn restart(state: AppState, target: Target, fragment: &str) -> Result<Response, ApiError> {
    let attr = |name: &str| fragment.lines().map(str::trim).find_map(|l| l.strip_prefix(name)).map(str::to_owned);
    let (Some(ufrag), Some(pwd)) = (attr("a=ice-ufrag:"), attr("a=ice-pwd:")) else {
        return Err(ApiError::bad_request("an ICE restart needs a=ice-ufrag and a=ice-pwd"));
    };
    let id = target.connection_id.clone();
    let restarted = state.media.restart_ice_remote(&id, ufrag, pwd).await.map_err(ApiError::from)?;
    let etag = format!("\"{}\"", restarted.ufrag);
    state.registry.set_http_etag(&id, &etag);
    // Its candidates, if it sent any with the credentials.
    add_candidates(&state, &id, fragment).await?;
    let mut body = format!("a=ice-lite\r\na=ice-ufrag:{}\r\na=ice-pwd:{}\r\n", restarted.ufrag, restarted.pwd);
    // Candidates belong to a media section (RFC 8840): the client's first one, by its mid.
    let first_m = fragment.lines().map(str::trim).find(|l| l.starts_with("m="));
    let first_mid = fragment.lines().map(str::trim).find(|l| l.starts_with("a=mid:"));
    if let (Some(m), Some(mid)) = (first_m, first_mid) {
        body.push_str(&format!("{m}\r\n{mid}\r\n"));
    }
    for c in &restarted.candidates {
        body.push_str(&format!("a={c}\r\n"));
    }
    body.push_str("a=end-of-candidates\r\n");
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(SDPFRAG));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    Ok((StatusCode::OK, h, body).into_response())
}

async fn delete(state: AppState, target: Target, headers: HeaderMap) -> Result<StatusCode, ApiError> {
    resource(&state, &target, &headers)?;
    let id = target.connection_id;
    crate::rest::detached(async move {
        state.media.close_connection(&id, "leave").await;
        Ok(())
    })
    .await?;
    Ok(StatusCode::OK)
}

// ---------------------------------------------------------------------------------------------
// Pieces
// ---------------------------------------------------------------------------------------------

fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <join token>"))
}

/// The join token of the request (the API key names no participant, so it cannot open one).
fn join_token(state: &AppState, headers: &HeaderMap) -> Result<Claims, ApiError> {
    state.auth.verify(bearer(headers)?)
}

/// Who asks about a resource: the backend (API key, `None`) or a participant (its token, expired
/// or not: the resource URL is itself an unguessable secret of the session's client).
fn caller(state: &AppState, headers: &HeaderMap) -> Result<Option<Claims>, ApiError> {
    let token = bearer(headers)?;
    if state.auth.check_bearer(Some(&format!("Bearer {token}"))).is_ok() {
        return Ok(None);
    }
    // A session can outlast the token that opened it: its owner may still end it with it.
    state.auth.verify_ignoring_expiry(token).map(Some)
}

/// A room by id, or else by its unique name.
fn resolve_room(state: &AppState, room: &str) -> Result<String, ApiError> {
    if state.registry.has_room(room) {
        return Ok(room.to_owned());
    }
    state.registry.room_id_by_name(room).ok_or_else(|| ApiError::not_found("room"))
}

/// The body as text, if it has the content type `want` (parameters such as `charset` aside).
fn sdp_body(headers: &HeaderMap, want: &str, body: Result<Bytes, BytesRejection>) -> Result<String, ApiError> {
    let ctype = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = ctype.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case(want) {
        return Err(ApiError::new(ErrorCode::UnsupportedMediaType, format!("expected Content-Type: {want}")));
    }
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(ErrorCode::PayloadTooLarge, "request body is too large")
        } else {
            ApiError::bad_request(r.body_text())
        }
    })?;
    let text = String::from_utf8(bytes.to_vec()).map_err(|_| ApiError::new(ErrorCode::BadSdp, "body is not UTF-8"))?;
    if want == SDP && !text.trim_start().starts_with("v=0") {
        return Err(ApiError::new(ErrorCode::BadSdp, "body is not an SDP offer (no v=0 line)"));
    }
    Ok(text)
}

fn preflight(methods: &'static str, accept: (header::HeaderName, &'static str)) -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(methods));
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization, Content-Type, If-Match, ETag"),
    );
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("86400"));
    h.insert(accept.0, HeaderValue::from_static(accept.1));
    resp
}

fn not_allowed(methods: &'static str) -> Response {
    let mut resp = ApiError::new(ErrorCode::MethodNotAllowed, "method not allowed on this route").into_response();
    resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static(methods));
    resp
}

/// Every response may be read by a page of any origin, with the headers a WHIP/WHEP client needs.
async fn cors(req: Request, next: Next) -> Response {
    let preflight = req.method() == Method::OPTIONS;
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    if !preflight {
        h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("Location, ETag, Link, Accept-Patch"));
    }
    resp
}
