//! The REST API's machine-readable contract: an OpenAPI 3.1 document generated from the
//! handlers' `#[utoipa::path]` annotations and the wire types' `ToSchema` derives, served at
//! `GET /v1/openapi.json` and checked in as `docs/openapi.json` (a test fails when they
//! differ; `UPDATE_OPENAPI=1 cargo test -p signaling-api --test api openapi` rewrites it).
//!
//! Every operation lists each status it can answer: the REST tests validate every response
//! against this document (an undocumented status fails them), and `scripts/test.sh` runs
//! schemathesis against a live gateway with it.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::path::ParameterIn;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Ref, Required};
use utoipa::{Modify, OpenApi};

use crate::protocol::*;

/// The security schemes the operations name.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The server's API key (`auth.api_key`), for app backends."))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "join_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "A join token minted by `POST /v1/rooms/{room_id}/tokens`, for one participant of one room.",
                    ))
                    .build(),
            ),
        );
    }
}

/// What the annotations cannot say: `POST /v1/rooms` takes an optional body (no body at all
/// means every default, a JSON `null` is refused), and an optional header is a string when sent
/// (never `null`).
struct Tidy;

impl Modify for Tidy {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.options,
                &mut item.head,
                &mut item.patch,
                &mut item.trace,
            ];
            for op in operations.into_iter().flatten() {
                if op.operation_id.as_deref() == Some("create_room") {
                    if let Some(body) = op.request_body.as_mut() {
                        body.required = Some(Required::False);
                        for content in body.content.values_mut() {
                            content.schema = Some(Ref::from_schema_name("CreateRoomRequest").into());
                        }
                    }
                }
                for param in op.parameters.iter_mut().flatten() {
                    if param.parameter_in == ParameterIn::Header {
                        param.schema = Some(ObjectBuilder::new().schema_type(Type::String).into());
                    }
                }
            }
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "SFU media gateway API",
        description = "The REST API for app backends, WHIP ingest and WHEP playback, and the \
            health and metrics routes. Every error has the shape `{ \"error\": { \"code\", \"message\" } }` \
            (`ErrorBody`); `code` is one of `ErrorCode`. The WebSocket messages after the upgrade \
            at `/v1/ws` are described in docs/api.md §3. A method a path does not list is answered \
            405 (`method_not_allowed`), an unknown path 404 (`not_found`)."
    ),
    paths(
        crate::rest::create_room,
        crate::rest::list_rooms,
        crate::rest::get_room,
        crate::rest::delete_room,
        crate::rest::create_token,
        crate::moderation::participant,
        crate::rest::kick,
        crate::moderation::mute,
        crate::moderation::participant_metadata,
        crate::moderation::room_metadata,
        crate::moderation::message,
        crate::rest::get_connection,
        crate::moderation::drain,
        crate::moderation::undrain,
        crate::rest::dev_token,
        crate::rest::healthz,
        crate::rest::livez,
        crate::rest::metrics,
        openapi_json,
        crate::ws::upgrade,
        crate::whip::whip_post,
        crate::whip::whip_patch,
        crate::whip::whip_delete,
        crate::whip::whip_options_endpoint,
        crate::whip::whip_options_resource,
        crate::whip::whep_post,
        crate::whip::whep_patch,
        crate::whip::whep_delete,
        crate::whip::whep_options_endpoint,
        crate::whip::whep_options_resource,
    ),
    components(schemas(ErrorBody, ErrorDetail, ErrorCode)),
    modifiers(&SecuritySchemes, &Tidy),
    tags(
        (name = "rooms", description = "Rooms and join tokens"),
        (name = "participants", description = "Participants: look, kick, mute, metadata"),
        (name = "messages", description = "Messages from the app backend to a room"),
        (name = "connections", description = "A connection's state and its history"),
        (name = "admin", description = "Taking the node out of rotation"),
        (name = "health", description = "Readiness, liveness, metrics and this document"),
        (name = "dev", description = "Development only (`dev.token_route`)"),
        (name = "websocket", description = "The client WebSocket (docs/api.md §3)"),
        (name = "whip", description = "WHIP ingest (RFC 9725)"),
        (name = "whep", description = "WHEP playback (draft-ietf-wish-whep)"),
    )
)]
pub struct ApiDoc;

/// The document, as served and as checked in (pretty JSON, keys sorted, a final newline).
pub fn openapi_json_text() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| {
        let mut value = serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document serializes");
        fix_link_keys(&mut value);
        let mut text = serde_json::to_string_pretty(&value).expect("JSON serializes");
        text.push('\n');
        text
    })
}

/// utoipa 5 writes a Link Object's `operationId` and `operationRef` in snake case; OpenAPI
/// (and every tool that follows links) spells them in camel case.
fn fix_link_keys(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(links) = map.get_mut("links").and_then(serde_json::Value::as_object_mut) {
                for link in links.values_mut().filter_map(serde_json::Value::as_object_mut) {
                    for (from, to) in [("operation_id", "operationId"), ("operation_ref", "operationRef")] {
                        if let Some(v) = link.remove(from) {
                            link.insert(to.to_owned(), v);
                        }
                    }
                }
            }
            map.values_mut().for_each(fix_link_keys);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(fix_link_keys),
        _ => {}
    }
}

/// The document as a JSON value.
pub fn openapi_document() -> serde_json::Value {
    serde_json::from_str(openapi_json_text()).expect("the OpenAPI document parses")
}

/// This document: the public contract of the REST API (no auth).
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "health",
    operation_id = "openapi",
    responses((status = 200, description = "This OpenAPI document", content_type = "application/json", body = Object))
)]
pub(crate) async fn openapi_json() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json_text())
}
