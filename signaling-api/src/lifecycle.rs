//! The lifecycle of rooms, participants, sessions and connections, as methods of the
//! [`Registry`]: every change to its maps happens here or in `registry.rs`, so `rest.rs` and
//! `ws.rs` only translate HTTP and WebSocket to these calls and back.
//!
//! Owns the rules: a name names one room; a participant is spoken for by one session at a time
//! (a second session replaces the first); a participant is taken out of its room before its
//! connections close, so nothing new is opened for it meanwhile; a connection the media plane
//! refused before creating it leaves no record.
//!
//! Methods that act on media take the [`MediaPlane`] as an argument: the registry is the media
//! plane's event sink, so it is built first and cannot own it.

use std::time::Instant;

use crate::auth::Claims;
use crate::error::ApiError;
use crate::media::{ConnectionSpec, MediaPlane};
use crate::protocol::*;
use crate::registry::{new_id, ConnRecord, HttpResource, Outbound, Participant, Registry, Room, SessionHandle};
use crate::webhook::Happening;

/// Counts of what the registry holds, for tests and leak checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Census {
    pub rooms: usize,
    pub names: usize,
    pub participants: usize,
    pub sessions: usize,
    /// Connection records, terminal ones included until their history is purged.
    pub connections: usize,
    pub live_connections: usize,
}

/// A participant's admission to its room.
pub enum Joined {
    /// First session of this participant.
    New,
    /// It replaced an earlier session of the same participant.
    Replaced,
    /// It took over an earlier session of the same participant (`resume`), connections and all.
    Resumed,
}

/// What admitting a session did to the participant's earlier one.
enum Admission {
    New,
    /// The earlier session, as it left the participant: its connections end.
    Replaced(Participant),
    /// The earlier session's id: the participant, its connections and what the webhooks were
    /// told carry over to the new session.
    Resumed(u64),
}

impl Registry {
    // -----------------------------------------------------------------------------------------
    // Rooms
    // -----------------------------------------------------------------------------------------

    /// Create a room (the media plane pins it to a worker first). Inputs are validated by the
    /// caller; here: the room limit and the uniqueness of the name.
    pub async fn create_room(
        &self,
        media: &dyn MediaPlane,
        name: Option<String>,
        max_participants: u32,
        max_rooms: usize,
    ) -> Result<RoomCreated, ApiError> {
        if self.rooms.len() >= max_rooms {
            return Err(ApiError::new(ErrorCode::Conflict, "room limit of this server reached"));
        }
        let room_id = new_id("r");
        if let Some(name) = &name {
            match self.names.entry(name.clone()) {
                dashmap::Entry::Occupied(_) => {
                    return Err(ApiError::new(ErrorCode::Conflict, format!("room name '{name}' is taken")))
                }
                dashmap::Entry::Vacant(v) => {
                    v.insert(room_id.clone());
                }
            }
        }
        // In a cluster the room (and its name) must be this node's in the directory first: two
        // nodes creating one name race there, and one of them wins.
        if let Some(d) = &self.directory {
            if let Err(e) = d.claim(&room_id, name.as_deref()).await {
                if let Some(name) = &name {
                    self.names.remove(name);
                }
                return Err(e);
            }
        }
        if let Err(e) = media.create_room(&room_id).await {
            if let Some(name) = &name {
                self.names.remove(name);
            }
            if let Some(d) = &self.directory {
                d.release(&room_id, name.as_deref()).await;
            }
            return Err(e.into());
        }
        let created_at = now_rfc3339();
        self.rooms.insert(
            room_id.clone(),
            Room {
                room_id: room_id.clone(),
                name: name.clone(),
                max_participants,
                created_at: created_at.clone(),
                participants: Default::default(),
                streams: Vec::new(),
                metadata: None,
                speakers: Vec::new(),
            },
        );
        self.metrics.rooms.set(self.rooms.len() as i64);
        self.hook(|| Happening::new(WebhookEventType::RoomStarted, &room_id, name.as_ref()));
        tracing::info!(room_id, ?name, "room created");
        Ok(RoomCreated { room_id, name, max_participants, created_at })
    }

    /// Close a room: every connection ends FINISHED (`room_closed`), every session is closed,
    /// the name is free again.
    pub async fn delete_room(&self, media: &dyn MediaPlane, room_id: &str) -> Result<(), ApiError> {
        self.close_room(media, room_id, "room_closed").await
    }

    /// Close a room because of `reason` (`room_closed`, or `shutdown` when the server stops:
    /// then sessions are closed with 1001). The webhooks hear every joined participant leave
    /// with that reason, then `room_finished`.
    pub async fn close_room(
        &self,
        media: &dyn MediaPlane,
        room_id: &str,
        reason: &'static str,
    ) -> Result<(), ApiError> {
        if !self.rooms.contains_key(room_id) {
            return Err(ApiError::not_found("room"));
        }
        media.close_room_with_reason(room_id, reason).await;
        let mut name = None;
        if let Some((_, room)) = self.rooms.remove(room_id) {
            name.clone_from(&room.name);
            if let Some(name) = &room.name {
                self.names.remove(name);
            }
            let code = if reason == "shutdown" { 1001 } else { 1000 };
            for p in room.participants.values() {
                self.send_to_session(p.session, Outbound::Close(code, reason.into()));
            }
            self.metrics.participants.sub(room.participants.len() as i64);
            if self.webhooks.is_some() {
                let mut left: Vec<&Participant> = room.participants.values().filter(|p| p.announced).collect();
                left.sort_by(|a, b| a.participant_id.cmp(&b.participant_id));
                for p in left {
                    let tracks = p.announced_tracks.clone();
                    self.hook_left(room_id, room.name.as_ref(), &p.participant_id, &p.name, tracks, reason);
                }
                self.hook(|| {
                    Happening::new(WebhookEventType::RoomFinished, room_id, room.name.as_ref()).reason(reason)
                });
            }
        }
        self.metrics.rooms.set(self.rooms.len() as i64);
        if let Some(d) = &self.directory {
            d.release(room_id, name.as_deref()).await;
        }
        tracing::info!(room_id, reason, "room closed");
        Ok(())
    }

    pub fn has_room(&self, room_id: &str) -> bool {
        self.rooms.contains_key(room_id)
    }

    /// The id of the room with this name.
    pub fn room_id_by_name(&self, name: &str) -> Option<String> {
        self.names.get(name).map(|id| id.clone())
    }

    pub fn room_ids(&self) -> Vec<String> {
        self.rooms.iter().map(|r| r.key().clone()).collect()
    }

    /// Every room, sorted by id.
    pub fn room_summaries(&self) -> Vec<RoomSummary> {
        let mut rooms: Vec<RoomSummary> = self
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
        rooms
    }

    /// A room with its participants (sorted by id), their connections and streams.
    pub fn room_detail(&self, room_id: &str) -> Option<RoomDetail> {
        let room = self.rooms.get(room_id)?;
        let mut participants: Vec<ParticipantDetail> = room
            .participants
            .values()
            .map(|p| ParticipantDetail {
                participant_id: p.participant_id.clone(),
                name: p.name.clone(),
                connections: p
                    .connections
                    .iter()
                    .filter_map(|id| self.connections.get(id).map(|c| c.summary()))
                    .collect(),
                streams: room.streams.iter().filter(|s| s.participant_id == p.participant_id).cloned().collect(),
                metadata: p.metadata.clone(),
            })
            .collect();
        participants.sort_by(|a, b| a.participant_id.cmp(&b.participant_id));
        Some(RoomDetail {
            room_id: room.room_id.clone(),
            name: room.name.clone(),
            max_participants: room.max_participants,
            created_at: room.created_at.clone(),
            participants,
            streams: room.streams.clone(),
            metadata: room.metadata.clone(),
        })
    }

    // -----------------------------------------------------------------------------------------
    // Sessions and participants
    // -----------------------------------------------------------------------------------------

    /// Register a client session's outbound queue; returns its id.
    pub fn open_session(&self, handle: SessionHandle) -> u64 {
        let session = self.next_session_id();
        self.sessions.insert(session, handle);
        session
    }

    /// Forget a session's queue (its writer then ends once the queue is drained).
    pub fn close_session(&self, session: u64) {
        self.sessions.remove(&session);
    }

    /// Close every session with this WebSocket close code and reason.
    pub fn close_all_sessions(&self, code: u16, reason: &str) {
        let sessions: Vec<u64> = self.sessions.iter().map(|s| *s.key()).collect();
        for s in sessions {
            self.send_to_session(s, Outbound::Close(code, reason.to_owned()));
        }
    }

    /// Would this identity be let into the room now (checked before a WebSocket upgrade)?
    pub fn check_admission(&self, room_id: &str, participant_id: &str) -> Result<(), ApiError> {
        let room = self.rooms.get(room_id).ok_or_else(|| ApiError::not_found("room"))?;
        if !room.participants.contains_key(participant_id) && room.participants.len() >= room.max_participants as usize
        {
            return Err(ApiError::new(ErrorCode::RoomFull, "room is full"));
        }
        Ok(())
    }

    /// Let a session speak for its participant: `joined` is queued to it while the room is
    /// locked (so no room event reaches the client before it or repeats what it lists), the
    /// others hear `participant_joined`, and a session this one replaces loses its connections
    /// (FINISHED, `replaced`) and is closed.
    ///
    /// With `resume` a WebSocket participant that is still in the room (its old socket alive or
    /// in the reconnect grace) is taken over instead: its connections keep their ids and go on
    /// (a client that changed networks then restarts ICE on them), the room hears nothing, and
    /// the old socket is closed with reason `resumed`. Nothing to resume: an ordinary join.
    pub async fn join(
        &self,
        media: &dyn MediaPlane,
        claims: &Claims,
        session: u64,
        resume: bool,
    ) -> Result<Joined, ApiError> {
        let admission = self.admit(claims, session, resume)?;
        let (room_id, participant_id) = (claims.room.as_str(), claims.sub.as_str());
        let joined = match admission {
            Admission::Resumed(old) => {
                let connections =
                    self.rooms.get(room_id).and_then(|r| Some(r.participants.get(participant_id)?.connections.clone()));
                let mut subscribers = Vec::new();
                for id in connections.unwrap_or_default() {
                    if let Some(mut c) = self.connections.get_mut(&id) {
                        c.session = session;
                        if c.role == Role::Subscribe && !c.state.is_terminal() && c.http.is_none() {
                            subscribers.push(id.clone());
                        }
                    }
                }
                self.send_to_session(old, Outbound::Close(1000, "resumed".into()));
                self.sessions.remove(&old);
                // An offer sent to the old socket after its network went was lost with it; its
                // answer, if one is still on the way there, is not the old socket's to give any
                // more (the connection is this session's), so the offer goes out again.
                for id in subscribers {
                    let _ = media.resend_offer(&id).await;
                }
                tracing::info!(room_id, participant_id, session, old, "session resumed");
                return Ok(Joined::Resumed);
            }
            Admission::Replaced(old) => {
                for id in old.connections {
                    media.close_connection(&id, "replaced").await;
                }
                self.send_to_session(old.session, Outbound::Close(1000, "replaced".into()));
                self.sessions.remove(&old.session);
                if old.announced {
                    // The old session leaves; the new one joins at its first READY connection.
                    let room_name = self.rooms.get(room_id).and_then(|r| r.name.clone());
                    let name = old.name.as_str();
                    self.hook_left(room_id, room_name.as_ref(), participant_id, name, old.announced_tracks, "replaced");
                }
                Joined::Replaced
            }
            Admission::New => {
                let metadata =
                    self.rooms.get(room_id).and_then(|r| r.participants.get(participant_id)?.metadata.clone());
                let info =
                    ParticipantInfo { participant_id: participant_id.to_owned(), name: claims.name.clone(), metadata };
                self.broadcast(room_id, Some(participant_id), ServerMessage::ParticipantJoined(info));
                Joined::New
            }
        };
        tracing::info!(room_id, participant_id, session, "participant joined");
        Ok(joined)
    }

    /// The room part of [`Registry::join`]; returns the participant as the replaced session
    /// left it (its session, connections and what the webhooks were told).
    fn admit(&self, claims: &Claims, session: u64, resume: bool) -> Result<Admission, ApiError> {
        let mut room = self.rooms.get_mut(&claims.room).ok_or_else(|| ApiError::not_found("room"))?;
        if !room.participants.contains_key(&claims.sub) && room.participants.len() >= room.max_participants as usize {
            return Err(ApiError::new(ErrorCode::RoomFull, "room is full"));
        }
        let admission = match room.participants.get_mut(&claims.sub) {
            // An HTTP (WHIP/WHEP) participant has no socket to take over: it is replaced.
            Some(p) if resume && !p.http => {
                let old = std::mem::replace(&mut p.session, session);
                p.disconnected_at = None;
                p.name = claims.name.clone();
                Admission::Resumed(old)
            }
            existing => {
                let (connections, metadata) =
                    existing.map(|p| (p.connections.clone(), p.metadata.clone())).unwrap_or_default();
                let mut admitted = Participant::new(&claims.sub, &claims.name, session, connections);
                admitted.metadata = metadata;
                match room.participants.insert(claims.sub.clone(), admitted) {
                    Some(old) => Admission::Replaced(old),
                    None => {
                        self.metrics.participants.inc();
                        Admission::New
                    }
                }
            }
        };
        let resumed = matches!(admission, Admission::Resumed(_));
        // A resumed session learns which of its connections are still alive (one may have failed
        // while the client was away): those it may go on with.
        let connections: Vec<ConnectionSummary> = match (resumed, room.participants.get(&claims.sub)) {
            (true, Some(p)) => p
                .connections
                .iter()
                .filter_map(|id| self.connections.get(id).filter(|c| !c.state.is_terminal()).map(|c| c.summary()))
                .collect(),
            _ => Vec::new(),
        };
        let mut participants: Vec<ParticipantInfo> =
            room.participants.values().filter(|p| p.participant_id != claims.sub).map(Participant::info).collect();
        participants.sort_by(|a, b| a.participant_id.cmp(&b.participant_id));
        let joined = ServerMessage::Joined {
            room_id: claims.room.clone(),
            participant_id: claims.sub.clone(),
            participants,
            streams: room.streams.clone(),
            metadata: room.metadata.clone(),
            resumed,
            connections,
        };
        self.send_to_session(session, Outbound::Message(joined));
        Ok(admission)
    }

    /// The session's WebSocket dropped without `leave`. If it still speaks for its participant,
    /// the participant is marked disconnected and true is returned: the caller then gives it
    /// the reconnect grace before [`Registry::remove_participant`].
    pub fn signaling_lost(&self, room_id: &str, participant_id: &str, session: u64) -> bool {
        match self.rooms.get_mut(room_id) {
            Some(mut room) => match room.participants.get_mut(participant_id) {
                Some(p) if p.session == session => {
                    p.disconnected_at = Some(Instant::now());
                    true
                }
                _ => false,
            },
            None => false,
        }
    }

    /// This session still speaks for its participant.
    pub fn speaks_for(&self, room_id: &str, participant_id: &str, session: u64) -> bool {
        self.rooms.get(room_id).and_then(|r| r.participants.get(participant_id).map(|p| p.session)) == Some(session)
    }

    /// End a participant: take it out of its room, close its connections (FINISHED with
    /// `reason`) and tell the others. Does nothing if another session has replaced `session`.
    pub async fn remove_participant(
        &self,
        media: &dyn MediaPlane,
        room_id: &str,
        participant_id: &str,
        session: u64,
        reason: &str,
    ) {
        // Out of the room first, so nothing new can be opened for it while its connections close.
        let removed = match self.rooms.get_mut(room_id) {
            Some(mut room) => match room.participants.get(participant_id) {
                Some(p) if p.session == session => {
                    room.participants.remove(participant_id).map(|p| (p, room.name.clone()))
                }
                _ => None,
            },
            None => None,
        };
        let Some((p, room_name)) = removed else { return };
        self.metrics.participants.dec();
        for id in &p.connections {
            let live = self.connections.get(id).is_some_and(|c| !c.state.is_terminal());
            if live {
                media.close_connection(id, reason).await;
            }
        }
        let info = p.info();
        if p.announced {
            self.hook_left(room_id, room_name.as_ref(), participant_id, &p.name, p.announced_tracks, reason);
        }
        self.broadcast(room_id, None, ServerMessage::ParticipantLeft(info));
        tracing::info!(room_id, participant_id, reason, "participant left");
    }

    /// Remove a participant on the backend's request; its session is closed with `kicked`.
    pub async fn kick(&self, media: &dyn MediaPlane, room_id: &str, participant_id: &str) -> Result<(), ApiError> {
        let session = {
            let room = self.rooms.get(room_id).ok_or_else(|| ApiError::not_found("room"))?;
            let p = room.participants.get(participant_id).ok_or_else(|| ApiError::not_found("participant"))?;
            p.session
        };
        self.remove_participant(media, room_id, participant_id, session, "kicked").await;
        self.send_to_session(session, Outbound::Close(1000, "kicked".into()));
        tracing::info!(room_id, participant_id, "participant kicked");
        Ok(())
    }

    /// The participant mutes or unmutes one of its own streams; the room hears of a change.
    pub fn set_muted(&self, claims: &Claims, session: u64, stream_id: &str, muted: bool) -> Result<(), ApiError> {
        let changed = {
            let mut room = self.rooms.get_mut(&claims.room).ok_or_else(|| ApiError::not_found("room"))?;
            if room.participants.get(&claims.sub).map(|p| p.session) != Some(session) {
                return Err(ApiError::not_found("room"));
            }
            let stream = room
                .streams
                .iter_mut()
                .find(|s| s.stream_id == stream_id && s.participant_id == claims.sub)
                .ok_or_else(|| ApiError::not_found("stream"))?;
            if stream.moderated && !muted {
                return Err(ApiError::forbidden("muted by the app backend: only it can unmute this stream"));
            }
            if stream.muted == muted {
                None
            } else {
                stream.muted = muted;
                Some(TrackMute {
                    participant_id: stream.participant_id.clone(),
                    stream_id: stream.stream_id.clone(),
                    kind: stream.kind.clone(),
                    moderated: false,
                })
            }
        };
        if let Some(t) = changed {
            let msg = if muted { ServerMessage::TrackMuted(t) } else { ServerMessage::TrackUnmuted(t) };
            self.broadcast(&claims.room, None, msg);
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Moderation and room state from the app backend
    // -----------------------------------------------------------------------------------------

    /// A participant of a room (its detail as in the room view).
    pub fn participant_detail(&self, room_id: &str, participant_id: &str) -> Result<ParticipantDetail, ApiError> {
        let room = self.room_detail(room_id).ok_or_else(|| ApiError::not_found("room"))?;
        room.participants
            .into_iter()
            .find(|p| p.participant_id == participant_id)
            .ok_or_else(|| ApiError::not_found("participant"))
    }

    /// The room and participant exist (checked before a request's body is judged).
    pub fn check_participant(&self, room_id: &str, participant_id: &str) -> Result<(), ApiError> {
        let room = self.rooms.get(room_id).ok_or_else(|| ApiError::not_found("room"))?;
        if room.participants.contains_key(participant_id) {
            Ok(())
        } else {
            Err(ApiError::not_found("participant"))
        }
    }

    /// The app backend mutes (the media plane stops forwarding; the publisher cannot unmute)
    /// or unmutes a participant's streams: one, those of a kind, or all. The room hears
    /// `track_muted`/`track_unmuted` with `moderated` for each stream whose state changed.
    /// Unmuting lifts only the backend's mute, never the publisher's own.
    pub async fn moderate_mute(
        &self,
        media: &dyn MediaPlane,
        room_id: &str,
        participant_id: &str,
        req: &MuteRequest,
    ) -> Result<Vec<StreamInfo>, ApiError> {
        let selected = |s: &StreamInfo| {
            s.participant_id == participant_id
                && req.stream_id.as_ref().is_none_or(|id| *id == s.stream_id)
                && req.kind.as_ref().is_none_or(|k| *k == s.kind)
        };
        let targets: Vec<String> = {
            let room = self.rooms.get(room_id).ok_or_else(|| ApiError::not_found("room"))?;
            if !room.participants.contains_key(participant_id) {
                return Err(ApiError::not_found("participant"));
            }
            room.streams.iter().filter(|s| selected(s)).map(|s| s.stream_id.clone()).collect()
        };
        if targets.is_empty() {
            return Err(ApiError::not_found("stream"));
        }
        for id in &targets {
            match media.set_track_blocked(room_id, id, req.muted).await {
                Ok(()) => {}
                // Unpublished meanwhile: nothing left to stop.
                Err(e) if e.code == ErrorCode::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mut changed = Vec::new();
        let mut now = Vec::new();
        {
            let mut room = self.rooms.get_mut(room_id).ok_or_else(|| ApiError::not_found("room"))?;
            for s in room.streams.iter_mut().filter(|s| targets.contains(&s.stream_id)) {
                let before = (s.muted, s.moderated);
                if req.muted {
                    (s.muted, s.moderated) = (true, true);
                } else if s.moderated {
                    (s.muted, s.moderated) = (false, false);
                }
                if before != (s.muted, s.moderated) {
                    let t = TrackMute {
                        participant_id: s.participant_id.clone(),
                        stream_id: s.stream_id.clone(),
                        kind: s.kind.clone(),
                        moderated: req.muted,
                    };
                    changed.push(if s.muted { ServerMessage::TrackMuted(t) } else { ServerMessage::TrackUnmuted(t) });
                }
                now.push(s.clone());
            }
        }
        for msg in changed {
            self.broadcast(room_id, None, msg);
        }
        tracing::info!(room_id, participant_id, muted = req.muted, streams = now.len(), "moderation: mute");
        Ok(now)
    }

    /// Set (or clear with `null`) a participant's metadata; the room hears `participant_metadata`.
    pub fn set_participant_metadata(
        &self,
        room_id: &str,
        participant_id: &str,
        metadata: serde_json::Value,
    ) -> Result<ParticipantInfo, ApiError> {
        let info = {
            let mut room = self.rooms.get_mut(room_id).ok_or_else(|| ApiError::not_found("room"))?;
            let p = room.participants.get_mut(participant_id).ok_or_else(|| ApiError::not_found("participant"))?;
            p.metadata = Some(metadata).filter(|m| !m.is_null());
            p.info()
        };
        self.broadcast(room_id, None, ServerMessage::ParticipantMetadata(info.clone()));
        Ok(info)
    }

    /// Set (or clear with `null`) the room's metadata; the room hears `room_metadata`.
    pub fn set_room_metadata(&self, room_id: &str, metadata: serde_json::Value) -> Result<RoomMetadata, ApiError> {
        let metadata = Some(metadata).filter(|m| !m.is_null());
        {
            let mut room = self.rooms.get_mut(room_id).ok_or_else(|| ApiError::not_found("room"))?;
            room.metadata = metadata.clone();
        }
        let msg = ServerMessage::RoomMetadata { room_id: room_id.to_owned(), metadata: metadata.clone() };
        self.broadcast(room_id, None, msg);
        Ok(RoomMetadata { room_id: room_id.to_owned(), metadata })
    }

    /// A `message` from the app backend to one participant (`to`) or everyone present; returns
    /// how many sessions it was queued to.
    pub fn send_message(&self, room_id: &str, to: Option<&str>, data: serde_json::Value) -> Result<usize, ApiError> {
        let sessions: Vec<u64> = {
            let room = self.rooms.get(room_id).ok_or_else(|| ApiError::not_found("room"))?;
            let present = |p: &&Participant| p.disconnected_at.is_none();
            match to {
                Some(pid) => {
                    let p = room.participants.get(pid).ok_or_else(|| ApiError::not_found("participant"))?;
                    Some(p).filter(present).map(|p| p.session).into_iter().collect()
                }
                None => room.participants.values().filter(present).map(|p| p.session).collect(),
            }
        };
        let msg = ServerMessage::Message { from: "backend".into(), data };
        for s in &sessions {
            self.send_to_session(*s, Outbound::Message(msg.clone()));
        }
        Ok(sessions.len())
    }

    // -----------------------------------------------------------------------------------------
    // Connections
    // -----------------------------------------------------------------------------------------

    /// Publish (with the client's offer) or subscribe: renegotiates the participant's live
    /// connection of that role, or opens a new one. Errors carry the connection they concern.
    pub async fn open_connection(
        &self,
        media: &dyn MediaPlane,
        claims: &Claims,
        session: u64,
        role: Role,
        offer: Option<String>,
    ) -> Result<(), (ApiError, Option<String>)> {
        if !self.speaks_for(&claims.room, &claims.sub, session) {
            return Err((ApiError::not_found("room"), None));
        }
        if let Some(id) = self.live_connection_with_role(&claims.room, &claims.sub, role) {
            let r = match offer {
                Some(sdp) => media.republish(&id, sdp).await,
                None => media.resubscribe(&id).await,
            };
            return r.map_err(|e| (e.into(), Some(id)));
        }
        let spec = ConnectionSpec {
            room_id: claims.room.clone(),
            participant_id: claims.sub.clone(),
            connection_id: new_id("c"),
            role,
        };
        if !self.insert_connection(&spec, session) {
            return Err((ApiError::not_found("room"), None));
        }
        let id = spec.connection_id.clone();
        let r = match offer {
            Some(sdp) => media.publish(spec, sdp).await,
            None => media.subscribe(spec).await,
        };
        if let Err(e) = &r {
            // Refused before the media plane created anything: leave no half-made record. A
            // connection that was created has its FAILED event in its history instead.
            if self.forget_unborn(&claims.room, &claims.sub, &id) {
                return Err((ApiError::from(e.clone()), None));
            }
        }
        if r.is_ok() && !self.speaks_for(&claims.room, &claims.sub, session) {
            // Removed (kicked, replaced, room closed) while the media plane was opening it.
            media.close_connection(&id, "participant_removed").await;
        }
        r.map_err(|e| (e.into(), Some(id)))
    }

    /// Drop a connection record that never had an event; true if it was dropped.
    fn forget_unborn(&self, room_id: &str, participant_id: &str, connection_id: &str) -> bool {
        let unborn = self.connections.get(connection_id).is_some_and(|c| c.events.is_empty());
        if !unborn {
            return false;
        }
        self.connections.remove(connection_id);
        if let Some(mut room) = self.rooms.get_mut(room_id) {
            if let Some(p) = room.participants.get_mut(participant_id) {
                p.connections.retain(|c| c != connection_id);
            }
        }
        true
    }

    /// The connection exists and belongs to this session's participant.
    pub fn owns_connection(&self, claims: &Claims, session: u64, connection_id: &str) -> bool {
        self.connections
            .get(connection_id)
            .is_some_and(|c| c.room_id == claims.room && c.participant_id == claims.sub && c.session == session)
    }

    /// A connection's state and history (stats are the media plane's to add).
    pub fn connection_detail(&self, connection_id: &str) -> Option<ConnectionDetail> {
        let c = self.connections.get(connection_id)?;
        Some(ConnectionDetail {
            connection_id: c.connection_id.clone(),
            room_id: c.room_id.clone(),
            participant_id: c.participant_id.clone(),
            role: c.role,
            state: c.state,
            code: c.state.code(),
            events: c.events.iter().cloned().map(HistoryItem::ConnectionEvent).collect(),
            stats: serde_json::Value::Null,
        })
    }

    /// Ids of every connection record of a participant (live or ended), in no particular order.
    pub fn connections_of(&self, room_id: &str, participant_id: &str) -> Vec<String> {
        self.connections
            .iter()
            .filter(|c| c.room_id == room_id && c.participant_id == participant_id)
            .map(|c| c.connection_id.clone())
            .collect()
    }

    pub fn census(&self) -> Census {
        let participants = self.rooms.iter().map(|r| r.participants.len()).sum();
        Census {
            rooms: self.rooms.len(),
            names: self.names.len(),
            participants,
            sessions: self.sessions.len(),
            connections: self.connections.len(),
            live_connections: self.connections.iter().filter(|c| !c.state.is_terminal()).count(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP sessions (WHIP ingest, WHEP playback)
// ---------------------------------------------------------------------------------------------
//
// A WHIP or WHEP client has no WebSocket: its participant (the token's identity) is spoken for
// by an *HTTP session*, a session number with no queue behind it (messages for it are dropped).
// All WHIP/WHEP resources of one identity share it. It is in the room while one of its
// connections lives: DELETE, a kick, the room closing, a media failure (ICE or DTLS timeouts,
// a peer silent past `disconnect_grace`) or, for WHEP, the publisher leaving end a connection,
// and with the last one the participant leaves the room (`participant_left`). There is no
// `signaling_lost`: nothing is there to be lost. A WebSocket join with the same identity
// replaces the HTTP session like any older session (its connections end `replaced`), and a
// WHIP/WHEP POST replaces a WebSocket session likewise. A second WHIP POST of one identity
// replaces its earlier WHIP connection (OBS reconnecting after a crash); WHEP connections add up
// (one viewer may play several publishers).

/// A WHIP/WHEP connection the media plane accepted: its id and the answer to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpOpened {
    pub connection_id: String,
    pub answer: String,
    pub etag: String,
}

impl Registry {
    /// Open a WHIP (publish, `plays: None`) or WHEP (subscribe, playing `plays`) connection with
    /// the client's offer for the token's participant, admitting it to the room through its HTTP
    /// session. Permissions and the room are the caller's to check first.
    pub async fn open_http_connection(
        &self,
        media: &dyn MediaPlane,
        claims: &Claims,
        offer: String,
        plays: Option<&str>,
    ) -> Result<HttpOpened, ApiError> {
        let role = if plays.is_some() { Role::Subscribe } else { Role::Publish };
        let (room_id, participant_id) = (claims.room.as_str(), claims.sub.as_str());
        let spec = ConnectionSpec {
            room_id: room_id.to_owned(),
            participant_id: participant_id.to_owned(),
            connection_id: new_id("c"),
            role,
        };
        let id = spec.connection_id.clone();
        // The record exists before the participant lists it, so a connection of the same
        // participant ending meanwhile never sees it idle.
        let fresh = self.next_session_id();
        self.connections.insert(
            id.clone(),
            ConnRecord {
                connection_id: id.clone(),
                room_id: room_id.to_owned(),
                participant_id: participant_id.to_owned(),
                session: fresh,
                role,
                state: ConnectionState::Initial,
                events: Vec::new(),
                created_at: Instant::now(),
                ended_at: None,
                http: Some(HttpResource { plays: plays.map(str::to_owned), etag: String::new() }),
            },
        );
        let admitted = match self.admit_http(claims, fresh, &id) {
            Ok(a) => a,
            Err(e) => {
                self.connections.remove(&id);
                return Err(e);
            }
        };
        if let Some(mut rec) = self.connections.get_mut(&id) {
            rec.session = admitted.session;
        }
        match admitted.replaced {
            Some(old) => {
                for c in old.connections {
                    media.close_connection(&c, "replaced").await;
                }
                self.send_to_session(old.session, Outbound::Close(1000, "replaced".into()));
                self.sessions.remove(&old.session);
                if old.announced {
                    let room_name = self.rooms.get(room_id).and_then(|r| r.name.clone());
                    let name = old.name.as_str();
                    self.hook_left(room_id, room_name.as_ref(), participant_id, name, old.announced_tracks, "replaced");
                }
            }
            None if admitted.new => {
                let metadata =
                    self.rooms.get(room_id).and_then(|r| r.participants.get(participant_id)?.metadata.clone());
                let info =
                    ParticipantInfo { participant_id: participant_id.to_owned(), name: claims.name.clone(), metadata };
                self.broadcast(room_id, Some(participant_id), ServerMessage::ParticipantJoined(info));
                tracing::info!(room_id, participant_id, "participant joined over HTTP (WHIP/WHEP)");
            }
            None => {}
        }
        if role == Role::Publish {
            // A new WHIP session of this identity replaces its earlier one.
            let earlier: Vec<String> = self
                .live_connections(room_id, participant_id)
                .into_iter()
                .filter(|c| *c != id && self.connections.get(c).is_some_and(|r| r.role == Role::Publish))
                .collect();
            for c in earlier {
                media.close_connection(&c, "replaced").await;
            }
        }
        self.http_answers.insert(id.clone(), None);
        let r = match plays {
            Some(publisher) => media.play(spec, publisher, offer).await,
            None => media.publish(spec, offer).await,
        };
        let answer = self.http_answers.remove(&id).and_then(|(_, a)| a);
        if let Err(e) = r {
            // Refused before the media plane created anything: no record stays behind (a created
            // one has its FAILED event in its history, and ending released the participant).
            if self.forget_unborn(room_id, participant_id, &id) {
                self.release_idle_http_participant(room_id, participant_id);
            }
            return Err(e.into());
        }
        if !self.speaks_for(room_id, participant_id, admitted.session) {
            // Removed (kicked, replaced, room closed) while the media plane was opening it.
            media.close_connection(&id, "participant_removed").await;
            return Err(ApiError::not_found("participant"));
        }
        let Some(answer) = answer else {
            media.close_connection(&id, "internal").await;
            return Err(ApiError::new(ErrorCode::Internal, "the media plane gave no answer"));
        };
        let etag = format!("\"{}\"", ice_ufrag(&answer).unwrap_or(id.as_str()));
        if let Some(mut rec) = self.connections.get_mut(&id) {
            if let Some(h) = rec.http.as_mut() {
                h.etag = etag.clone();
            }
        }
        tracing::info!(room_id, participant_id, connection_id = id, ?plays, "HTTP session resource created");
        Ok(HttpOpened { connection_id: id, answer, etag })
    }

    /// The room part of [`Registry::open_http_connection`], under the room's lock: join the HTTP
    /// session of the participant (or make one), replacing a WebSocket session, and list the
    /// connection.
    fn admit_http(&self, claims: &Claims, fresh: u64, connection_id: &str) -> Result<HttpAdmission, ApiError> {
        let mut room = self.rooms.get_mut(&claims.room).ok_or_else(|| ApiError::not_found("room"))?;
        let full = room.participants.len() >= room.max_participants as usize;
        match room.participants.get_mut(&claims.sub) {
            Some(p) if p.http => {
                p.connections.push(connection_id.to_owned());
                return Ok(HttpAdmission { session: p.session, new: false, replaced: None });
            }
            None if full => return Err(ApiError::new(ErrorCode::RoomFull, "room is full")),
            _ => {}
        }
        let old = room.participants.get(&claims.sub);
        let metadata = old.and_then(|p| p.metadata.clone());
        let mut connections = old.map(|p| p.connections.clone()).unwrap_or_default();
        connections.push(connection_id.to_owned());
        let mut admitted = Participant::new(&claims.sub, &claims.name, fresh, connections);
        admitted.http = true;
        admitted.metadata = metadata;
        let replaced = room.participants.insert(claims.sub.clone(), admitted);
        if replaced.is_none() {
            self.metrics.participants.inc();
        }
        Ok(HttpAdmission { session: fresh, new: replaced.is_none(), replaced })
    }

    /// An HTTP participant none of whose connections lives any more leaves its room.
    pub(crate) fn release_idle_http_participant(&self, room_id: &str, participant_id: &str) {
        let (removed, room_name) = {
            let Some(mut room) = self.rooms.get_mut(room_id) else { return };
            let idle = room.participants.get(participant_id).is_some_and(|p| {
                p.http && !p.connections.iter().any(|c| self.connections.get(c).is_some_and(|r| !r.state.is_terminal()))
            });
            if !idle {
                return;
            }
            (room.participants.remove(participant_id), room.name.clone())
        };
        let Some(p) = removed else { return };
        self.metrics.participants.dec();
        self.broadcast(room_id, None, ServerMessage::ParticipantLeft(p.info()));
        if p.announced {
            self.hook_left(room_id, room_name.as_ref(), participant_id, &p.name, p.announced_tracks, "leave");
        }
        tracing::info!(room_id, participant_id, "participant left (its last WHIP/WHEP connection ended)");
    }

    /// The participant publishes at least one stream in the room.
    pub fn publishes(&self, room_id: &str, participant_id: &str) -> bool {
        self.rooms.get(room_id).is_some_and(|r| r.streams.iter().any(|s| s.participant_id == participant_id))
    }

    /// The live WHIP/WHEP resource `connection_id` of room `room_id`: its participant, role and
    /// ETag.
    /// A WHIP/WHEP resource's ICE session changed (an ICE restart by PATCH): its new ETag.
    pub fn set_http_etag(&self, connection_id: &str, etag: &str) {
        if let Some(h) = self.connections.get_mut(connection_id).as_deref_mut().and_then(|c| c.http.as_mut()) {
            h.etag = etag.to_owned();
        }
    }

    pub fn http_resource(&self, room_id: &str, connection_id: &str) -> Option<(String, Role, HttpResource)> {
        let c = self.connections.get(connection_id)?;
        if c.room_id != room_id || c.state.is_terminal() {
            return None;
        }
        let h = c.http.clone()?;
        Some((c.participant_id.clone(), c.role, h))
    }
}

struct HttpAdmission {
    /// The HTTP session that speaks for the participant now.
    session: u64,
    /// The participant was not in the room.
    new: bool,
    /// The participant as the WebSocket session it replaced left it.
    replaced: Option<Participant>,
}

/// The `a=ice-ufrag` of an SDP (the first one; BUNDLE shares it).
fn ice_ufrag(sdp: &str) -> Option<&str> {
    sdp.lines().find_map(|l| l.trim_end().strip_prefix("a=ice-ufrag:"))
}
