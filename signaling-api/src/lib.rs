//! The gateway's public contract and its HTTP/WebSocket server.
//!
//! Layout:
//! - `protocol`: wire types for every REST body and WebSocket message, the error shape, and the
//!   connection state machine (always built; clients use it with the `server` feature off).
//! - `events`: what the media plane reports ([`events::MediaEvent`]); always built.
//! - `media`: the interface to the media plane ([`media::MediaPlane`], [`media::EventSink`]).
//! - `auth`: API key and signed join tokens.
//! - `registry`: rooms, participants, sessions, connection history; the event sink.
//! - `lifecycle`: the registry's methods that create and end rooms, participants, sessions and
//!   connections.
//! - `rest`, `ws`: the REST API for app backends and the WebSocket API for clients;
//!   `moderation`: the REST routes that mute, set metadata and send messages.
//! - `webhook`: signed, ordered, retried webhook delivery of room events to the app backend.
//! - `whip`: WHIP ingest and WHEP playback over plain HTTP (RFC 9725, draft-ietf-wish-whep).
//! - `openapi`: the REST API's OpenAPI 3.1 document, generated from the handlers and wire types.
//! - `metrics`: the first Prometheus counters.
//! - `error`: the one error type that renders `{ "error": { code, message } }`.

pub mod events;
pub mod protocol;

#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod error;
#[cfg(feature = "server")]
pub mod lifecycle;
#[cfg(feature = "server")]
pub mod media;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
mod moderation;
#[cfg(feature = "server")]
pub mod openapi;
#[cfg(feature = "server")]
pub mod registry;
#[cfg(feature = "server")]
mod rest;
#[cfg(feature = "server")]
pub mod webhook;
#[cfg(feature = "server")]
mod whip;
#[cfg(feature = "server")]
mod ws;

#[cfg(feature = "server")]
pub use server::*;

#[cfg(feature = "server")]
mod server {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::Duration;

    use axum::Router;

    use crate::auth::Auth;
    use crate::media::MediaPlane;
    use crate::registry::Registry;

    /// Settings of the signaling API (a slice of the gateway config).
    #[derive(Debug, Clone)]
    pub struct ApiConfig {
        pub api_key: String,
        pub token_secret: String,
        /// Several token keys (id, secret) instead of `token_secret` alone (key rotation);
        /// empty: `token_secret` is the one key, id `default`.
        pub token_keys: Vec<(String, String)>,
        /// The key id new tokens are signed with (when `token_keys` is used).
        pub token_kid: String,
        /// Serve `POST /v1/dev/token` (join a room by name without a backend). Development only.
        pub dev_token_route: bool,
        /// `max_participants` of a room created without one.
        pub default_max_participants: u32,
        /// Upper bound a room may ask for.
        pub max_participants_limit: u32,
        pub max_rooms: usize,
        /// How long a participant whose WebSocket dropped keeps its connections.
        pub reconnect_grace: Duration,
        pub ws_max_message_bytes: usize,
        /// Client messages per second per session (bursts of twice that); more get `rate_limited`.
        pub ws_messages_per_second: u32,
        /// Messages queued for a client before it counts as not reading and is closed.
        pub ws_outbound_queue: usize,
        pub max_body_bytes: usize,
        pub default_token_ttl_s: u64,
        pub max_token_ttl_s: u64,
        /// How long a terminal connection's history stays inspectable.
        pub history_retention: Duration,
        /// TURN servers whose credentials the token routes mint (`None`: none are handed out).
        pub turn: Option<crate::auth::TurnConfig>,
    }

    impl Default for ApiConfig {
        fn default() -> Self {
            Self {
                api_key: "dev-api-key".into(),
                token_secret: "dev-token-secret".into(),
                token_keys: Vec::new(),
                token_kid: String::new(),
                dev_token_route: true,
                default_max_participants: 16,
                max_participants_limit: 256,
                max_rooms: 1000,
                reconnect_grace: Duration::from_secs(10),
                ws_max_message_bytes: 256 * 1024,
                ws_messages_per_second: 50,
                ws_outbound_queue: 1024,
                max_body_bytes: 64 * 1024,
                default_token_ttl_s: 3600,
                max_token_ttl_s: 7 * 24 * 3600,
                history_retention: Duration::from_secs(600),
                turn: None,
            }
        }
    }

    /// Everything a handler needs.
    #[derive(Clone)]
    pub struct AppState {
        pub config: Arc<ApiConfig>,
        pub registry: Arc<Registry>,
        pub media: Arc<dyn MediaPlane>,
        pub auth: Auth,
        /// Set when the server drains: new rooms and sessions are refused.
        pub draining: Arc<AtomicBool>,
    }

    impl AppState {
        pub fn new(config: ApiConfig, registry: Arc<Registry>, media: Arc<dyn MediaPlane>) -> Self {
            let auth = if config.token_keys.is_empty() {
                Auth::new(&config.api_key, &config.token_secret)
            } else {
                Auth::with_keys(&config.api_key, &config.token_keys, &config.token_kid)
            };
            Self { config: Arc::new(config), registry, media, auth, draining: Arc::new(AtomicBool::new(false)) }
        }
    }

    /// The REST + WebSocket API, WHIP/WHEP, `/healthz` and `/metrics`.
    pub fn router(state: AppState) -> Router {
        crate::rest::routes(state.clone()).merge(crate::ws::routes(state.clone())).merge(crate::whip::routes(state))
    }

    /// Periodically forget the history of connections that ended long ago (bounded memory).
    pub fn spawn_janitor(state: AppState) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            loop {
                tick.tick().await;
                state.registry.purge_history(state.config.history_retention);
            }
        })
    }
}
