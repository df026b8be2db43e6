//! Wire types of the public contract (docs/api.md): every REST body and WebSocket message, the error
//! shape, and the erizo-like connection state machine. Clients (tests, the load tester) use these
//! with the `server` feature off.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Stable error codes of the contract. Serialized in snake_case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    BadSdp,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Conflict,
    RoomFull,
    PayloadTooLarge,
    RateLimited,
    NoPorts,
    Internal,
    /// A WHIP/WHEP request body that is not `application/sdp` (or, for PATCH,
    /// `application/trickle-ice-sdpfrag`).
    UnsupportedMediaType,
    /// Well-formed but unusable: an offer with no audio or video the gateway can use (WHIP/WHEP;
    /// the WebSocket reports it as `bad_sdp`).
    Unprocessable,
    /// A WHIP/WHEP PATCH whose `If-Match` names another ICE session than the resource's ETag.
    PreconditionFailed,
    /// A cluster of gateways cannot place or find a room now (its Redis is unreachable, or the
    /// node that owns the room is): retry later.
    ClusterUnavailable,
}

impl ErrorCode {
    /// The HTTP status that goes with the code (docs/api.md table).
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest | ErrorCode::BadSdp => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::Conflict | ErrorCode::RoomFull => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::RateLimited => 429,
            ErrorCode::NoPorts | ErrorCode::ClusterUnavailable => 503,
            ErrorCode::Internal => 500,
            ErrorCode::UnsupportedMediaType => 415,
            ErrorCode::Unprocessable => 422,
            ErrorCode::PreconditionFailed => 412,
        }
    }
}

/// `{ "error": { "code", "message" } }`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}

// ---------------------------------------------------------------------------------------------
// Connection state machine (docs/api.md §1)
// ---------------------------------------------------------------------------------------------

/// The role of a connection within its participant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Publish,
    Subscribe,
}

/// The states a connection walks through. Only moves forward; see [`ConnectionState::advance`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ConnectionState {
    Initial,
    Gathered,
    Ready,
    Finished,
    Failed,
}

/// Every event a connection reports: the states plus two events that are not states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventKind {
    Initial,
    SdpProcessed,
    Gathered,
    Candidate,
    Ready,
    Finished,
    Failed,
}

/// Why a transition was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("connection state cannot go from {from:?} to {to:?}")]
pub struct InvalidTransition {
    pub from: ConnectionState,
    pub to: ConnectionState,
}

impl ConnectionState {
    /// erizo's numeric code for the state.
    pub fn code(self) -> u16 {
        EventKind::from(self).code()
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, ConnectionState::Finished | ConnectionState::Failed)
    }

    /// The one transition function: INITIAL → GATHERED → READY → FINISHED, and any
    /// non-terminal state → FAILED. FINISHED is allowed from any non-terminal state (a connection
    /// can be closed on purpose before it ever connected). Each state is entered once.
    pub fn advance(self, to: ConnectionState) -> Result<ConnectionState, InvalidTransition> {
        use ConnectionState::*;
        let ok = match (self, to) {
            (Initial, Gathered) | (Gathered, Ready) => true,
            (from, Finished | Failed) => !from.is_terminal(),
            _ => false,
        };
        if ok {
            Ok(to)
        } else {
            Err(InvalidTransition { from: self, to })
        }
    }
}

impl From<ConnectionState> for EventKind {
    fn from(s: ConnectionState) -> Self {
        match s {
            ConnectionState::Initial => EventKind::Initial,
            ConnectionState::Gathered => EventKind::Gathered,
            ConnectionState::Ready => EventKind::Ready,
            ConnectionState::Finished => EventKind::Finished,
            ConnectionState::Failed => EventKind::Failed,
        }
    }
}

impl EventKind {
    /// erizo's numeric codes.
    pub fn code(self) -> u16 {
        match self {
            EventKind::Initial => 101,
            EventKind::Gathered => 103,
            EventKind::Ready => 104,
            EventKind::Finished => 105,
            EventKind::Candidate => 201,
            EventKind::SdpProcessed => 203,
            EventKind::Failed => 500,
        }
    }

    /// The state this event enters, if it is a state.
    pub fn state(self) -> Option<ConnectionState> {
        match self {
            EventKind::Initial => Some(ConnectionState::Initial),
            EventKind::Gathered => Some(ConnectionState::Gathered),
            EventKind::Ready => Some(ConnectionState::Ready),
            EventKind::Finished => Some(ConnectionState::Finished),
            EventKind::Failed => Some(ConnectionState::Failed),
            EventKind::SdpProcessed | EventKind::Candidate => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Initial => "INITIAL",
            EventKind::SdpProcessed => "SDP_PROCESSED",
            EventKind::Gathered => "GATHERED",
            EventKind::Candidate => "CANDIDATE",
            EventKind::Ready => "READY",
            EventKind::Finished => "FINISHED",
            EventKind::Failed => "FAILED",
        }
    }
}

/// The `reason` of the `SDP_PROCESSED` event of a renegotiation that restarted ICE (new ICE
/// credentials; the connection keeps its id and state: a READY connection stays READY).
pub const ICE_RESTART_REASON: &str = "ice_restart";

/// One step in a connection's life: a WebSocket message and an item of the REST history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ConnectionEvent {
    pub connection_id: String,
    pub role: Role,
    pub event: EventKind,
    pub code: u16,
    /// RFC 3339 with milliseconds, UTC.
    pub at: String,
    #[schema(required = true)]
    pub reason: Option<String>,
    #[schema(required = true)]
    pub sdp: Option<String>,
}

/// A history item as the REST API shows it: the same object as the WebSocket message, `type` included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HistoryItem {
    ConnectionEvent(ConnectionEvent),
}

/// Current time in the contract's timestamp format.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

// ---------------------------------------------------------------------------------------------
// REST bodies (docs/api.md §2)
// ---------------------------------------------------------------------------------------------

// The input rules of the REST routes are stated in the OpenAPI document as patterns (ECMA-262
// regexes that Python's `re` reads alike; `schema(pattern)` takes only a literal). "Control" is
// Unicode's Cc (what `char::is_control` means); "space" at either end is Unicode's White_Space
// (what `str::trim` strips). signaling-api/tests/api.rs checks that they say what the server does.

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRoomRequest {
    /// Unique among the server's rooms; any script, 1–64 characters, no control characters, no
    /// space at either end.
    #[serde(default)]
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "^[^\\u0000-\\u0020\\u007F-\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000]\
     ([^\\u0000-\\u001F\\u007F-\\u009F]*[^\\u0000-\\u0020\\u007F-\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000])?$"
    )]
    pub name: Option<String>,
    /// Up to the server's `limits.max_participants` (256 by default); absent: its
    /// `limits.default_max_participants` (16).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_participants: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RoomCreated {
    pub room_id: String,
    #[schema(required = true)]
    pub name: Option<String>,
    pub max_participants: u32,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RoomSummary {
    pub room_id: String,
    #[schema(required = true)]
    pub name: Option<String>,
    pub participants: usize,
    pub streams: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RoomList {
    pub rooms: Vec<RoomSummary>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ConnectionSummary {
    pub connection_id: String,
    pub role: Role,
    pub state: ConnectionState,
    pub code: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ParticipantDetail {
    pub participant_id: String,
    pub name: String,
    pub connections: Vec<ConnectionSummary>,
    pub streams: Vec<StreamInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RoomDetail {
    pub room_id: String,
    #[schema(required = true)]
    pub name: Option<String>,
    pub max_participants: u32,
    pub created_at: String,
    pub participants: Vec<ParticipantDetail>,
    pub streams: Vec<StreamInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// The participant's identity in the room (1–64 of `A-Z a-z 0-9 - _ . +`).
    #[schema(pattern = "^[A-Za-z0-9._+-]{1,64}$", min_length = 1, max_length = 64)]
    pub participant: String,
    /// Display name; defaults to `participant`.
    #[serde(default)]
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*\
     [^\\u0000-\\u0020\\u007F-\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000]\
     [^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    pub name: Option<String>,
    #[serde(default)]
    pub can_publish: Option<bool>,
    #[serde(default)]
    pub can_subscribe: Option<bool>,
    /// Lifetime in seconds, up to the server's `signaling.max_token_ttl_s` (604800 by default);
    /// absent: `signaling.default_token_ttl_s` (3600).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub ttl_s: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    pub token: String,
    pub expires_at: String,
    /// TURN servers with credentials minted for this participant (coturn `use-auth-secret`),
    /// valid until the token expires; absent unless `turn.urls` and `turn.secret` are set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ice_servers: Vec<IceServer>,
}

/// An ICE server in the browser's `RTCIceServer` shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IceServer {
    pub urls: Vec<String>,
    pub username: String,
    pub credential: String,
}

/// `POST /v1/dev/token` (development only, see README): join a room by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DevTokenRequest {
    /// The room's name (created if it does not exist).
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "^[^\\u0000-\\u0020\\u007F-\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000]\
     ([^\\u0000-\\u001F\\u007F-\\u009F]*[^\\u0000-\\u0020\\u007F-\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000])?$"
    )]
    pub room: String,
    #[schema(pattern = "^[A-Za-z0-9._+-]{1,64}$", min_length = 1, max_length = 64)]
    pub participant: String,
    /// Display name; defaults to `participant`.
    #[serde(default)]
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*\
     [^\\u0000-\\u0020\\u007F-\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000]\
     [^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DevTokenResponse {
    pub token: String,
    pub room_id: String,
    pub participant_id: String,
    pub expires_at: String,
    /// As in [`TokenResponse::ice_servers`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ice_servers: Vec<IceServer>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConnectionDetail {
    pub connection_id: String,
    pub room_id: String,
    pub participant_id: String,
    pub role: Role,
    pub state: ConnectionState,
    pub code: u16,
    pub events: Vec<HistoryItem>,
    pub stats: serde_json::Value,
}

/// `POST /v1/rooms/{room_id}/participants/{participant_id}/mute`: the participant's streams
/// to mute or unmute — one (`stream_id`), those of a `kind`, or all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MuteRequest {
    #[serde(default)]
    pub stream_id: Option<String>,
    /// `audio` or `video`.
    #[serde(default)]
    pub kind: Option<String>,
    pub muted: bool,
}

/// The streams a mute request applied to, as they are now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MuteResponse {
    pub streams: Vec<StreamInfo>,
}

/// `PUT …/metadata`: any JSON value (`null` clears it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MetadataRequest {
    pub metadata: serde_json::Value,
}

/// `PUT /v1/rooms/{room_id}/metadata` →
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RoomMetadata {
    pub room_id: String,
    #[schema(required = true)]
    pub metadata: Option<serde_json::Value>,
}

/// `POST /v1/rooms/{room_id}/messages`: `data` to one participant, or to everyone present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendMessageRequest {
    #[serde(default)]
    pub participant_id: Option<String>,
    pub data: serde_json::Value,
}

/// How many sessions the message was queued to (participants in their reconnect grace get
/// nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SendMessageResponse {
    pub recipients: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
}

// ---------------------------------------------------------------------------------------------
// WebSocket messages (docs/api.md §3)
// ---------------------------------------------------------------------------------------------

/// A publication in a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StreamInfo {
    pub participant_id: String,
    pub stream_id: String,
    /// `audio` or `video`.
    pub kind: String,
    /// The publisher's mid.
    pub mid: String,
    /// Simulcast video: its encodings, in the publisher's order, and which it is sending now
    /// (absent for a single encoding). `set_layer` takes these rids; a `stream_layers` message
    /// says when the set being sent changes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerInfo>,
    /// The publisher has muted it (`mute`); `track_muted`/`track_unmuted` say when this changes.
    #[serde(default)]
    pub muted: bool,
    /// The app backend muted it (`POST …/participants/{id}/mute`): the gateway forwards none of
    /// it, and only the backend can unmute it.
    #[serde(default)]
    pub moderated: bool,
}

/// `track_muted` / `track_unmuted`: a publisher muted or unmuted one of its streams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackMute {
    pub participant_id: String,
    pub stream_id: String,
    /// `audio` or `video`.
    pub kind: String,
    /// The app backend muted it (and the gateway stopped forwarding it), not the publisher.
    #[serde(default)]
    pub moderated: bool,
}

/// One entry of `active_speakers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Speaker {
    pub participant_id: String,
    pub stream_id: String,
    /// Loudness from 0 (silence) to 1 (full scale), from the audio-level header extension.
    pub level: f32,
}

/// One simulcast encoding of a published video stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LayerInfo {
    pub rid: String,
    /// The publisher is sending it (packets within the last second or so, not paused).
    pub active: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ParticipantInfo {
    pub participant_id: String,
    pub name: String,
    /// Set by the app backend (`PUT …/participants/{id}/metadata`); absent until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
}

/// `RTCIceCandidateInit` as browsers send and expect it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CandidateMessage {
    pub connection_id: String,
    pub candidate: String,
    #[serde(rename = "sdpMid", default)]
    pub sdp_mid: Option<String>,
    #[serde(rename = "sdpMLineIndex", default)]
    pub sdp_mline_index: Option<u16>,
}

/// Client → gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    Publish {
        sdp: String,
    },
    Subscribe {},
    Answer {
        connection_id: String,
        sdp: String,
    },
    Candidate(CandidateMessage),
    Leave {},
    /// Choose the simulcast layer (`rid`) a subscribe connection receives of one video stream;
    /// `null` (or absent) returns to automatic choice by bandwidth. The chosen layer is the
    /// highest the gateway sends: it goes lower when the subscriber's bandwidth estimate cannot
    /// carry it. The switch happens at the layer's next keyframe (which the gateway requests).
    SetLayer {
        connection_id: String,
        stream_id: String,
        #[serde(default)]
        rid: Option<String>,
    },
    /// Mute (`true`) or unmute one of this participant's own published streams. The room hears
    /// `track_muted`/`track_unmuted`; the client stops sending (or sends silence) itself.
    Mute {
        stream_id: String,
        muted: bool,
    },
    /// Restart ICE on this participant's subscribe connection (its ICE failed or went
    /// disconnected, e.g. the client changed networks): the gateway offers again with new ICE
    /// credentials and trickles its candidate after the answer. The connection keeps its id and
    /// state. A publisher restarts ICE with a new `publish` offer carrying new credentials.
    RestartIce {
        connection_id: String,
    },
}

/// Gateway → client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Joined {
        room_id: String,
        participant_id: String,
        participants: Vec<ParticipantInfo>,
        streams: Vec<StreamInfo>,
        /// The room's metadata, if the app backend set any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        metadata: Option<serde_json::Value>,
        /// This socket resumed the participant's session (`resume=1` on the upgrade): its
        /// connections live on under the same ids, nothing was republished or resubscribed.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        resumed: bool,
        /// With `resumed`: the participant's connections that are still alive (id, role,
        /// state), which the client goes on with; one it had that is not listed has ended.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        connections: Vec<ConnectionSummary>,
    },
    Answer {
        connection_id: String,
        sdp: String,
    },
    Offer {
        connection_id: String,
        sdp: String,
    },
    Candidate(CandidateMessage),
    ConnectionEvent(ConnectionEvent),
    ParticipantJoined(ParticipantInfo),
    ParticipantLeft(ParticipantInfo),
    StreamAdded(StreamInfo),
    StreamRemoved(StreamInfo),
    /// The simulcast encodings a publisher sends changed (one started or stopped).
    StreamLayers(StreamInfo),
    /// This subscribe connection will not receive a stream it was offered: `reason`
    /// `codec_unsupported` (the client cannot decode `codec`, the one codec the publication
    /// carries; the gateway does not transcode) or `rejected` (the client declined it).
    StreamUnavailable {
        connection_id: String,
        stream_id: String,
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        codec: Option<String>,
    },
    /// A publisher muted one of its streams (also sent to the publisher).
    TrackMuted(TrackMute),
    TrackUnmuted(TrackMute),
    /// The room's speakers changed: loudest first; empty when nobody speaks. Sent when the set
    /// or its order changes, at most every 200 ms.
    ActiveSpeakers {
        speakers: Vec<Speaker>,
    },
    /// The app backend set a participant's metadata (`null`/absent: cleared). To the whole room.
    ParticipantMetadata(ParticipantInfo),
    /// The app backend set the room's metadata (`null`: cleared). To the whole room.
    RoomMetadata {
        room_id: String,
        metadata: Option<serde_json::Value>,
    },
    /// A message from the app backend (`POST /v1/rooms/{id}/messages`), to this participant or
    /// the whole room. `from` is `backend`.
    Message {
        from: String,
        data: serde_json::Value,
    },
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        connection_id: Option<String>,
    },
}

// ---------------------------------------------------------------------------------------------
// Webhooks (docs/api.md "Webhooks"): what an app backend is told, signed per Standard Webhooks
// ---------------------------------------------------------------------------------------------

/// What happened. Per room, in this order of life: `room_started`, then per participant
/// `participant_joined` (its first READY connection), its `track_published`/`track_unpublished`,
/// `participant_left` (only after `participant_joined`), and last `room_finished`.
/// `connection_failed` may come at any point between the first and the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookEventType {
    RoomStarted,
    RoomFinished,
    ParticipantJoined,
    ParticipantLeft,
    TrackPublished,
    TrackUnpublished,
    ConnectionFailed,
}

impl WebhookEventType {
    pub const ALL: [WebhookEventType; 7] = [
        WebhookEventType::RoomStarted,
        WebhookEventType::RoomFinished,
        WebhookEventType::ParticipantJoined,
        WebhookEventType::ParticipantLeft,
        WebhookEventType::TrackPublished,
        WebhookEventType::TrackUnpublished,
        WebhookEventType::ConnectionFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WebhookEventType::RoomStarted => "room_started",
            WebhookEventType::RoomFinished => "room_finished",
            WebhookEventType::ParticipantJoined => "participant_joined",
            WebhookEventType::ParticipantLeft => "participant_left",
            WebhookEventType::TrackPublished => "track_published",
            WebhookEventType::TrackUnpublished => "track_unpublished",
            WebhookEventType::ConnectionFailed => "connection_failed",
        }
    }
}

/// The room an event is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookRoom {
    pub room_id: String,
    pub name: Option<String>,
}

/// The publication a `track_published`/`track_unpublished` is about (as in `stream_added`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookTrack {
    pub stream_id: String,
    /// `audio` or `video`.
    pub kind: String,
    /// The publisher's mid.
    pub mid: String,
}

/// The body of one webhook request. Every field is always present (`null` when it does not
/// apply), so receivers can rely on the shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookEvent {
    /// Unique per event and the same on every retry of it (also the `webhook-id` header):
    /// receivers deduplicate by it.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: WebhookEventType,
    pub room: WebhookRoom,
    pub participant: Option<ParticipantInfo>,
    pub connection_id: Option<String>,
    /// `participant_left`: leave, kicked, replaced, signaling_lost, room_closed, shutdown or
    /// failed; `track_unpublished`: unpublished or participant_left; `connection_failed`: the
    /// FAILED reason; `room_finished`: room_closed or shutdown.
    pub reason: Option<String>,
    pub track: Option<WebhookTrack>,
    /// 1, 2, 3, … per room, in the order the events happened: a gap means an event was dropped
    /// (queue overflow) or given up on.
    pub sequence: u64,
    /// When it happened (RFC 3339 with milliseconds, UTC).
    pub timestamp: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_only_move_forward() {
        use ConnectionState::*;
        assert_eq!(Initial.advance(Gathered), Ok(Gathered));
        assert_eq!(Gathered.advance(Ready), Ok(Ready));
        assert_eq!(Ready.advance(Finished), Ok(Finished));
        assert_eq!(Initial.advance(Failed), Ok(Failed));
        assert_eq!(Initial.advance(Finished), Ok(Finished));
        assert!(Initial.advance(Ready).is_err());
        assert!(Ready.advance(Gathered).is_err());
        assert!(Gathered.advance(Gathered).is_err());
        assert!(Finished.advance(Failed).is_err());
        assert!(Failed.advance(Finished).is_err());
        assert!(Ready.advance(Initial).is_err());
    }

    #[test]
    fn codes_match_erizo() {
        assert_eq!(ConnectionState::Initial.code(), 101);
        assert_eq!(ConnectionState::Gathered.code(), 103);
        assert_eq!(ConnectionState::Ready.code(), 104);
        assert_eq!(ConnectionState::Finished.code(), 105);
        assert_eq!(ConnectionState::Failed.code(), 500);
        assert_eq!(EventKind::Candidate.code(), 201);
        assert_eq!(EventKind::SdpProcessed.code(), 203);
    }

    #[test]
    fn messages_have_contract_shape() {
        let m: ClientMessage = serde_json::from_str(
            r#"{"type":"candidate","connection_id":"c_1","candidate":"candidate:1 1 udp 1 127.0.0.1 5000 typ host","sdpMid":"0","sdpMLineIndex":0}"#,
        )
        .unwrap();
        assert!(matches!(m, ClientMessage::Candidate(ref c) if c.sdp_mid.as_deref() == Some("0")));
        let m: ClientMessage = serde_json::from_str(r#"{"type":"subscribe"}"#).unwrap();
        assert_eq!(m, ClientMessage::Subscribe {});

        let ev = ServerMessage::ConnectionEvent(ConnectionEvent {
            connection_id: "c_1".into(),
            role: Role::Publish,
            event: EventKind::Ready,
            code: 104,
            at: "2026-11-21T10:24:33.720Z".into(),
            reason: None,
            sdp: None,
        });
        let v: serde_json::Value = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["type"], "connection_event");
        assert_eq!(v["event"], "READY");
        assert_eq!(v["role"], "publish");
        assert!(v["reason"].is_null());
        let e = ServerMessage::Error { code: ErrorCode::BadSdp, message: "x".into(), connection_id: None };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["code"], "bad_sdp");
        assert!(v.get("connection_id").is_none());
    }

    #[test]
    fn history_item_carries_type() {
        let h = HistoryItem::ConnectionEvent(ConnectionEvent {
            connection_id: "c".into(),
            role: Role::Subscribe,
            event: EventKind::SdpProcessed,
            code: 203,
            at: now_rfc3339(),
            reason: None,
            sdp: None,
        });
        let v = serde_json::to_value(&h).unwrap();
        assert_eq!(v["type"], "connection_event");
        assert_eq!(v["event"], "SDP_PROCESSED");
    }
}
