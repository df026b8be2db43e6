//! Events the media plane reports to the control plane. Plain data, built without the `server`
//! feature so the sans-IO core can produce them directly.

use crate::protocol::{ErrorCode, EventKind, LayerInfo, Role, Speaker};

/// What the media plane needs to know about a new connection: the one description of it, from
/// the signaling API through the media workers into the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionSpec {
    pub room_id: String,
    pub participant_id: String,
    pub connection_id: String,
    pub role: Role,
}

/// A media plane refusal (the sans-IO core's and the media workers' alike), rendered in the
/// contract's error shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct MediaError {
    pub code: ErrorCode,
    pub message: String,
}

impl MediaError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

/// What the media plane reports.
#[derive(Debug, Clone, PartialEq)]
pub enum MediaEvent {
    /// A state change or event of a connection.
    Connection { connection_id: String, event: EventKind, reason: Option<String> },
    /// The answer to a publish offer.
    Answer { connection_id: String, sdp: String },
    /// An offer (first or renegotiation) for a subscribe connection.
    Offer { connection_id: String, sdp: String },
    /// A gateway ICE candidate to trickle to the client.
    Candidate { connection_id: String, candidate: String, sdp_mid: Option<String>, sdp_mline_index: Option<u16> },
    /// A publication appeared in a room.
    StreamAdded { room_id: String, participant_id: String, stream_id: String, kind: String, mid: String },
    /// A publication ended.
    StreamRemoved { room_id: String, participant_id: String, stream_id: String, kind: String, mid: String },
    /// A subscriber will not receive a stream it was offered (it rejected the section), and why.
    StreamUnavailable { connection_id: String, stream_id: String, reason: String, codec: Option<String> },
    /// The simulcast encodings a video publication is sending changed.
    StreamLayers { room_id: String, stream_id: String, layers: Vec<LayerInfo> },
    /// A room's active speakers changed (loudest first; empty when nobody speaks).
    ActiveSpeakers { room_id: String, speakers: Vec<Speaker> },
}

/// The gateway's side of an ICE restart asked for by new ICE credentials alone (a WHIP/WHEP
/// PATCH): its new credentials and candidates (`candidate:…`, without `a=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IceRestarted {
    pub ufrag: String,
    pub pwd: String,
    pub candidates: Vec<String>,
}
