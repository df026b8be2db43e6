//! The interface between the signaling API and the media plane. The gateway implements
//! [`MediaPlane`] with its media workers; tests implement it with a fake. Events flow back through
//! [`EventSink`], called synchronously and in order by the media plane, so that an `answer` always
//! reaches the client before the candidates and state events that follow it.

pub use crate::events::{ConnectionSpec, IceRestarted, MediaError, MediaEvent};

/// The media plane as the signaling API sees it. Every call returns once the media plane has
/// acted; the events it caused have already been given to the [`EventSink`] by then.
#[async_trait::async_trait]
pub trait MediaPlane: Send + Sync + 'static {
    /// Prepare a room (pins it to a media worker).
    async fn create_room(&self, room_id: &str) -> Result<(), MediaError>;
    /// Close every connection in the room (FINISHED, reason `room_closed`) and forget it.
    async fn close_room(&self, room_id: &str);
    /// The same with another FINISHED reason (`shutdown` when the server stops).
    async fn close_room_with_reason(&self, room_id: &str, reason: &'static str) {
        let _ = reason;
        self.close_room(room_id).await
    }
    /// Open a publish connection with the client's offer. The answer is emitted as
    /// [`MediaEvent::Answer`]. On a rejected offer the connection ends FAILED and the error is returned.
    async fn publish(&self, spec: ConnectionSpec, offer: String) -> Result<(), MediaError>;
    /// Renegotiate an existing publish connection with a new offer.
    async fn republish(&self, connection_id: &str, offer: String) -> Result<(), MediaError>;
    /// Open a subscribe connection; the offer is emitted as [`MediaEvent::Offer`].
    async fn subscribe(&self, spec: ConnectionSpec) -> Result<(), MediaError>;
    /// Open a subscribe connection with the client's offer (WHEP) that plays `publisher`'s
    /// tracks; the answer is emitted as [`MediaEvent::Answer`]. Refused with `not_found` when
    /// the publisher sends nothing in the room, `unprocessable` when no section of the offer can
    /// carry one of its tracks (the connection then ends FAILED).
    async fn play(&self, spec: ConnectionSpec, publisher: &str, offer: String) -> Result<(), MediaError>;
    /// Ask for a fresh offer on an existing subscribe connection.
    async fn resubscribe(&self, connection_id: &str) -> Result<(), MediaError>;
    /// Restart ICE on a subscribe connection: a new offer with new ICE credentials (made once
    /// any outstanding offer is answered). `bad_request` for another kind of connection.
    async fn restart_ice(&self, connection_id: &str) -> Result<(), MediaError>;
    /// Restart ICE on a connection the client offered (WHIP publish, WHEP play) with the
    /// client's new ICE credentials alone (a PATCH, RFC 9725 §4.3); returns the gateway's new
    /// credentials and candidates. A media plane that cannot refuses with `unprocessable`.
    async fn restart_ice_remote(
        &self,
        connection_id: &str,
        ufrag: String,
        pwd: String,
    ) -> Result<IceRestarted, MediaError> {
        let _ = (connection_id, ufrag, pwd);
        Err(MediaError::new(crate::protocol::ErrorCode::Unprocessable, "ICE restart is not supported here"))
    }
    /// Send a subscribe connection's outstanding offer again, if it has one (a resumed
    /// session's new socket may never have seen it). Nothing otherwise.
    async fn resend_offer(&self, connection_id: &str) -> Result<(), MediaError> {
        let _ = connection_id;
        Ok(())
    }
    /// Apply the client's answer to the latest gateway offer.
    async fn answer(&self, connection_id: &str, sdp: String) -> Result<(), MediaError>;
    /// Add a trickled remote candidate (`candidate:…`); an empty string ends candidates.
    async fn add_candidate(&self, connection_id: &str, candidate: String) -> Result<(), MediaError>;
    /// Choose the simulcast layer a subscribe connection receives of one stream (`None`:
    /// automatic).
    async fn set_layer(&self, connection_id: &str, stream_id: &str, rid: Option<String>) -> Result<(), MediaError>;
    /// Stop (`true`) or resume forwarding one published stream to its subscribers (the app
    /// backend's mute). A media plane without that control refuses.
    async fn set_track_blocked(&self, room_id: &str, stream_id: &str, blocked: bool) -> Result<(), MediaError> {
        let _ = (room_id, stream_id, blocked);
        Err(MediaError::new(crate::protocol::ErrorCode::Internal, "this media plane cannot stop a stream"))
    }
    /// End a connection on purpose (FINISHED with `reason`). Unknown ids are ignored.
    async fn close_connection(&self, connection_id: &str, reason: &str);
    /// Live statistics of a connection, if it is still open.
    async fn connection_stats(&self, connection_id: &str) -> Option<serde_json::Value>;
}

/// Receives [`MediaEvent`]s. Implementations must be quick and never block on the media plane.
pub trait EventSink: Send + Sync + 'static {
    fn emit(&self, event: MediaEvent);
}

/// A cluster's directory of rooms (the gateway's `cluster::store`, in Redis): which node owns
/// each room. The registry claims a room there before it creates it and releases it when the
/// room closes; without a cluster there is none and nothing is asked.
#[async_trait::async_trait]
pub trait RoomDirectory: Send + Sync + 'static {
    /// Record the room (and its name) as this node's, atomically: `conflict` when a live room
    /// elsewhere has the name, `cluster_unavailable` when the directory cannot be reached.
    async fn claim(&self, room_id: &str, name: Option<&str>) -> Result<(), crate::error::ApiError>;
    /// Forget the room (and its name) if they are still this node's. Never fails: what it
    /// cannot do now, the node's next heartbeat does.
    async fn release(&self, room_id: &str, name: Option<&str>);
}
