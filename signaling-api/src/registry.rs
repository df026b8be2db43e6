//! The control plane's view of the world: rooms, participants, client sessions and every
//! connection's state and history. It is also the [`EventSink`] the media plane reports to: an
//! event is recorded and forwarded to the owning client session in the order it was emitted.
//!
//! Room, participant and connection lifecycle: `lifecycle.rs`.
//!
//! Locking: `DashMap` entries are held only for short, synchronous updates, never across an
//! `.await`. The media packet path never comes here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::mpsc;

use crate::media::{EventSink, MediaEvent};
use crate::metrics::Metrics;
use crate::protocol::*;
use crate::webhook::{Happening, Webhooks};

/// What a session's writer task sends to the client.
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound {
    Message(ServerMessage),
    /// Close the socket with this code and reason, after everything queued before it.
    Close(u16, String),
}

/// A client session as the rest of the server reaches it.
pub struct SessionHandle {
    /// Bounded: a client that stops reading cannot make the server buffer without limit.
    pub tx: mpsc::Sender<Outbound>,
    /// Fired when the queue overflows: the session is closed as a slow consumer.
    pub kill: std::sync::Arc<tokio::sync::Notify>,
}

pub struct Room {
    pub room_id: String,
    pub name: Option<String>,
    pub max_participants: u32,
    pub created_at: String,
    pub participants: HashMap<String, Participant>,
    pub streams: Vec<StreamInfo>,
    /// Set by the app backend; sent in `joined` and `room_metadata`.
    pub metadata: Option<serde_json::Value>,
    /// The stream ids of the last `active_speakers` sent, in order (muted streams left out).
    pub speakers: Vec<String>,
}

pub struct Participant {
    pub participant_id: String,
    pub name: String,
    /// The session that currently speaks for this participant.
    pub session: u64,
    /// Set while the WebSocket is gone and the grace period runs.
    pub disconnected_at: Option<Instant>,
    pub connections: Vec<String>,
    /// `participant_joined` went to the webhooks for this session (at its first READY
    /// connection); `participant_left` goes only then.
    pub announced: bool,
    /// Its publications the webhooks were told of (`track_published`), to be unpublished.
    pub announced_tracks: Vec<WebhookTrack>,
    /// Set by the app backend; kept when a new session replaces this one.
    pub metadata: Option<serde_json::Value>,
    /// Spoken for by WHIP/WHEP resources, not a WebSocket: it stays in the room while one of
    /// its connections lives (see `lifecycle.rs`, "HTTP sessions").
    pub http: bool,
}

impl Participant {
    pub fn new(participant_id: &str, name: &str, session: u64, connections: Vec<String>) -> Self {
        Self {
            participant_id: participant_id.to_owned(),
            name: name.to_owned(),
            session,
            disconnected_at: None,
            connections,
            announced: false,
            announced_tracks: Vec::new(),
            metadata: None,
            http: false,
        }
    }

    pub fn info(&self) -> ParticipantInfo {
        ParticipantInfo {
            participant_id: self.participant_id.clone(),
            name: self.name.clone(),
            metadata: self.metadata.clone(),
        }
    }
}

pub struct ConnRecord {
    pub connection_id: String,
    pub room_id: String,
    pub participant_id: String,
    pub session: u64,
    pub role: Role,
    pub state: ConnectionState,
    pub events: Vec<ConnectionEvent>,
    pub created_at: Instant,
    pub ended_at: Option<Instant>,
    /// Made by a WHIP/WHEP POST: its resource can be PATCHed and DELETEd.
    pub http: Option<HttpResource>,
}

/// What a WHIP/WHEP session resource is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResource {
    /// WHEP: the participant whose tracks it plays (`None` for WHIP).
    pub plays: Option<String>,
    /// The ETag of its ICE session (our ICE ufrag, quoted).
    pub etag: String,
}

impl ConnRecord {
    pub fn summary(&self) -> ConnectionSummary {
        ConnectionSummary {
            connection_id: self.connection_id.clone(),
            role: self.role,
            state: self.state,
            code: self.state.code(),
        }
    }
}

/// Registry of rooms, sessions and connections.
///
/// Its maps are its own: every change goes through its methods (here: sessions' queues, the
/// media plane's events; `lifecycle.rs`: rooms, participants, connections).
pub struct Registry {
    pub(crate) rooms: DashMap<String, Room>,
    /// Room name → room id, for uniqueness of names.
    pub(crate) names: DashMap<String, String>,
    pub(crate) connections: DashMap<String, ConnRecord>,
    pub(crate) sessions: DashMap<u64, SessionHandle>,
    /// Answers awaited by a WHIP/WHEP POST, by connection: the media plane emits the answer
    /// before its call returns, and the POST's response carries it.
    pub(crate) http_answers: DashMap<String, Option<String>>,
    pub metrics: Metrics,
    /// Where room events go for the app backend; `None` when webhooks are off (then no event
    /// is even built).
    pub(crate) webhooks: Option<Webhooks>,
    /// A cluster's room directory (rooms → their node); `None` on a single node.
    pub(crate) directory: Option<std::sync::Arc<dyn crate::media::RoomDirectory>>,
    next_session: AtomicU64,
}

/// Random id with a readable prefix: `r_…`, `c_…`, `st_…`.
pub fn new_id(prefix: &str) -> String {
    use rand::Rng;
    let n: u128 = rand::rng().random();
    format!("{prefix}_{:024x}", n & ((1u128 << 96) - 1))
}

impl Registry {
    pub fn new(metrics: Metrics) -> Self {
        Self {
            rooms: DashMap::new(),
            names: DashMap::new(),
            connections: DashMap::new(),
            sessions: DashMap::new(),
            http_answers: DashMap::new(),
            metrics,
            webhooks: None,
            directory: None,
            next_session: AtomicU64::new(1),
        }
    }

    /// Send room events to these webhooks (from now on).
    pub fn with_webhooks(mut self, webhooks: Option<Webhooks>) -> Self {
        self.webhooks = webhooks;
        self
    }

    /// Record every room created or closed here in a cluster's directory (from now on).
    pub fn with_directory(mut self, directory: Option<std::sync::Arc<dyn crate::media::RoomDirectory>>) -> Self {
        self.directory = directory;
        self
    }

    pub fn webhooks(&self) -> Option<&Webhooks> {
        self.webhooks.as_ref()
    }

    /// Queue a webhook event; the closure runs only when webhooks are on.
    pub(crate) fn hook(&self, happening: impl FnOnce() -> Happening) {
        if let Some(w) = &self.webhooks {
            w.emit(happening());
        }
    }

    pub(crate) fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Queue a message for a session; a closed session is ignored. A session whose queue is
    /// full is not reading: it is told to close (its participant then gets the reconnect grace).
    pub fn send_to_session(&self, session: u64, out: Outbound) {
        let overflowed = match self.sessions.get(&session) {
            Some(h) => match h.tx.try_send(out) {
                Err(mpsc::error::TrySendError::Full(_)) => {
                    h.kill.notify_one();
                    true
                }
                _ => false,
            },
            None => false,
        };
        if overflowed {
            tracing::warn!(session, "client is not reading its WebSocket; closing the session");
        }
    }

    /// Send to every present participant of a room, optionally sparing one.
    pub fn broadcast(&self, room_id: &str, except: Option<&str>, msg: ServerMessage) {
        let targets: Vec<u64> = match self.rooms.get(room_id) {
            Some(room) => room
                .participants
                .values()
                .filter(|p| Some(p.participant_id.as_str()) != except && p.disconnected_at.is_none())
                .map(|p| p.session)
                .collect(),
            None => return,
        };
        for s in targets {
            self.send_to_session(s, Outbound::Message(msg.clone()));
        }
    }

    /// Register a connection before the media plane hears of it, so its events have a home.
    /// Refused (false) unless `session` still speaks for the participant.
    pub(crate) fn insert_connection(&self, spec: &crate::media::ConnectionSpec, session: u64) -> bool {
        {
            let Some(mut room) = self.rooms.get_mut(&spec.room_id) else { return false };
            match room.participants.get_mut(&spec.participant_id) {
                Some(p) if p.session == session => p.connections.push(spec.connection_id.clone()),
                _ => return false,
            }
        }
        self.connections.insert(
            spec.connection_id.clone(),
            ConnRecord {
                connection_id: spec.connection_id.clone(),
                room_id: spec.room_id.clone(),
                participant_id: spec.participant_id.clone(),
                session,
                role: spec.role,
                state: ConnectionState::Initial,
                events: Vec::new(),
                created_at: Instant::now(),
                ended_at: None,
                http: None,
            },
        );
        true
    }

    /// The connection ids of a participant that are not terminal yet.
    pub(crate) fn live_connections(&self, room_id: &str, participant_id: &str) -> Vec<String> {
        let ids: Vec<String> = match self.rooms.get(room_id) {
            Some(room) => match room.participants.get(participant_id) {
                Some(p) => p.connections.clone(),
                None => return Vec::new(),
            },
            None => return Vec::new(),
        };
        ids.into_iter().filter(|id| self.connections.get(id).is_some_and(|c| !c.state.is_terminal())).collect()
    }

    /// The participant's live connection with this role, if any.
    pub(crate) fn live_connection_with_role(&self, room_id: &str, participant_id: &str, role: Role) -> Option<String> {
        self.live_connections(room_id, participant_id)
            .into_iter()
            .find(|id| self.connections.get(id).is_some_and(|c| c.role == role))
    }

    /// Remove terminal connection records older than `retention`; returns how many went.
    pub fn purge_history(&self, retention: Duration) -> usize {
        let now = Instant::now();
        let before = self.connections.len();
        self.connections.retain(|_, c| c.ended_at.is_none_or(|t| now.duration_since(t) < retention));
        before - self.connections.len()
    }

    fn record_event(&self, connection_id: &str, event: EventKind, reason: Option<String>) {
        let Some(mut rec) = self.connections.get_mut(connection_id) else {
            return;
        };
        if let Some(state) = event.state() {
            if state != ConnectionState::Initial {
                if rec.state.advance(state).is_err() {
                    // The media plane enforces the machine; a refused step here is a bug, not input.
                    tracing::warn!(connection_id, from = ?rec.state, to = ?state, "ignored invalid transition");
                    return;
                }
                let m = &self.metrics;
                let (from, to) = (EventKind::from(rec.state).as_str(), event.as_str());
                m.connections.with_label_values(&[from]).dec();
                m.transitions.with_label_values(&[from, to]).inc();
                let role = role_label(rec.role);
                match state {
                    ConnectionState::Ready => {
                        m.setup_seconds.with_label_values(&[role]).observe(rec.created_at.elapsed().as_secs_f64());
                    }
                    ConnectionState::Failed => {
                        let why = crate::metrics::reason_label(reason.as_deref());
                        m.failures.with_label_values(&[role, why]).inc();
                    }
                    _ => {}
                }
                rec.state = state;
                if state.is_terminal() {
                    rec.ended_at = Some(Instant::now());
                }
            }
            if !state.is_terminal() {
                self.metrics.connections.with_label_values(&[event.as_str()]).inc();
            }
        }
        let role = rec.role;
        self.metrics.connection_events.with_label_values(&[role_label(role), event.as_str()]).inc();
        if event == EventKind::SdpProcessed && reason.as_deref() == Some(ICE_RESTART_REASON) {
            self.metrics.ice_restarts.with_label_values(&[role_label(role)]).inc();
        }
        let ev = ConnectionEvent {
            connection_id: connection_id.to_owned(),
            role,
            event,
            code: event.code(),
            at: now_rfc3339(),
            reason,
            sdp: None,
        };
        rec.events.push(ev.clone());
        let session = rec.session;
        let (room_id, participant_id) = (rec.room_id.clone(), rec.participant_id.clone());
        let http_ended = rec.http.is_some() && rec.state.is_terminal();
        drop(rec);
        let reason = ev.reason.clone();
        self.send_to_session(session, Outbound::Message(ServerMessage::ConnectionEvent(ev)));
        if self.webhooks.is_some() {
            match event {
                EventKind::Ready => self.hook_ready(&room_id, &participant_id, session, connection_id),
                EventKind::Failed => {
                    self.hook_failed(&room_id, &participant_id, session, connection_id, reason.as_deref())
                }
                _ => {}
            }
        }
        if http_ended {
            self.release_idle_http_participant(&room_id, &participant_id);
        }
    }

    /// A connection became READY: the participant's first one (this session) makes it
    /// `participant_joined`, followed by the tracks it already publishes.
    fn hook_ready(&self, room_id: &str, participant_id: &str, session: u64, connection_id: &str) {
        let Some(mut guard) = self.rooms.get_mut(room_id) else { return };
        let room = &mut *guard;
        let Some(p) = room.participants.get_mut(participant_id) else { return };
        if p.session != session || p.announced {
            return;
        }
        p.announced = true;
        let name = room.name.as_ref();
        self.hook(|| {
            Happening::new(WebhookEventType::ParticipantJoined, room_id, name)
                .participant(participant_id, &p.name)
                .connection(connection_id)
        });
        for s in room.streams.iter().filter(|s| s.participant_id == participant_id) {
            let track = webhook_track(s);
            p.announced_tracks.push(track.clone());
            self.hook(|| {
                Happening::new(WebhookEventType::TrackPublished, room_id, name)
                    .participant(participant_id, &p.name)
                    .track(track)
            });
        }
    }

    /// A connection FAILED: `connection_failed`; and if that leaves a joined participant with
    /// no live connection, it has left (`failed`) until a connection of it is READY again.
    fn hook_failed(&self, room_id: &str, participant_id: &str, session: u64, connection_id: &str, why: Option<&str>) {
        let Some(mut guard) = self.rooms.get_mut(room_id) else { return };
        let room = &mut *guard;
        let name = room.name.as_ref();
        let display = room.participants.get(participant_id).map(|p| p.name.clone()).unwrap_or_default();
        self.hook(|| {
            let h = Happening::new(WebhookEventType::ConnectionFailed, room_id, name)
                .participant(participant_id, &display)
                .connection(connection_id);
            match why {
                Some(r) => h.reason(r),
                None => h,
            }
        });
        let Some(p) = room.participants.get_mut(participant_id) else { return };
        if p.session != session || !p.announced {
            return;
        }
        let live = p.connections.iter().any(|id| self.connections.get(id).is_some_and(|c| !c.state.is_terminal()));
        if !live {
            p.announced = false;
            let tracks = std::mem::take(&mut p.announced_tracks);
            self.hook_left(room_id, name, participant_id, &p.name, tracks, "failed");
        }
    }

    /// `track_unpublished` for each announced track, then `participant_left`.
    pub(crate) fn hook_left(
        &self,
        room_id: &str,
        room_name: Option<&String>,
        participant_id: &str,
        name: &str,
        tracks: Vec<WebhookTrack>,
        reason: &str,
    ) {
        for t in tracks {
            self.hook(|| {
                Happening::new(WebhookEventType::TrackUnpublished, room_id, room_name)
                    .participant(participant_id, name)
                    .track(t)
                    .reason("participant_left")
            });
        }
        self.hook(|| {
            Happening::new(WebhookEventType::ParticipantLeft, room_id, room_name)
                .participant(participant_id, name)
                .reason(reason)
        });
    }

    fn session_of(&self, connection_id: &str) -> Option<u64> {
        self.connections.get(connection_id).map(|c| c.session)
    }
}

fn webhook_track(s: &StreamInfo) -> WebhookTrack {
    WebhookTrack { stream_id: s.stream_id.clone(), kind: s.kind.clone(), mid: s.mid.clone() }
}

fn role_label(role: Role) -> &'static str {
    match role {
        Role::Publish => "publish",
        Role::Subscribe => "subscribe",
    }
}

impl EventSink for Registry {
    fn emit(&self, event: MediaEvent) {
        match event {
            MediaEvent::Connection { connection_id, event, reason } => {
                self.record_event(&connection_id, event, reason);
            }
            MediaEvent::Answer { connection_id, sdp } => {
                if let Some(mut slot) = self.http_answers.get_mut(&connection_id) {
                    *slot = Some(sdp);
                    return;
                }
                if let Some(s) = self.session_of(&connection_id) {
                    self.send_to_session(s, Outbound::Message(ServerMessage::Answer { connection_id, sdp }));
                }
            }
            MediaEvent::Offer { connection_id, sdp } => {
                if let Some(s) = self.session_of(&connection_id) {
                    self.send_to_session(s, Outbound::Message(ServerMessage::Offer { connection_id, sdp }));
                }
            }
            MediaEvent::Candidate { connection_id, candidate, sdp_mid, sdp_mline_index } => {
                if let Some(s) = self.session_of(&connection_id) {
                    let msg = ServerMessage::Candidate(CandidateMessage {
                        connection_id,
                        candidate,
                        sdp_mid,
                        sdp_mline_index,
                    });
                    self.send_to_session(s, Outbound::Message(msg));
                }
            }
            MediaEvent::StreamAdded { room_id, participant_id, stream_id, kind, mid } => {
                let info = StreamInfo {
                    participant_id,
                    stream_id,
                    kind,
                    mid,
                    layers: Vec::new(),
                    muted: false,
                    moderated: false,
                };
                {
                    let Some(mut guard) = self.rooms.get_mut(&room_id) else { return };
                    let room = &mut *guard;
                    room.streams.push(info.clone());
                    // Published to the webhooks once its publisher has joined (else at that point).
                    if let Some(p) = room.participants.get_mut(&info.participant_id).filter(|p| p.announced) {
                        let track = webhook_track(&info);
                        p.announced_tracks.push(track.clone());
                        self.hook(|| {
                            Happening::new(WebhookEventType::TrackPublished, &room_id, room.name.as_ref())
                                .participant(&p.participant_id, &p.name)
                                .track(track)
                        });
                    }
                }
                self.broadcast(&room_id, None, ServerMessage::StreamAdded(info));
            }
            MediaEvent::StreamRemoved { room_id, participant_id, stream_id, kind, mid } => {
                let info = StreamInfo {
                    participant_id,
                    stream_id,
                    kind,
                    mid,
                    layers: Vec::new(),
                    muted: false,
                    moderated: false,
                };
                {
                    let Some(mut guard) = self.rooms.get_mut(&room_id) else { return };
                    let room = &mut *guard;
                    room.streams.retain(|s| s.stream_id != info.stream_id);
                    if let Some(p) = room.participants.get_mut(&info.participant_id) {
                        if let Some(i) = p.announced_tracks.iter().position(|t| t.stream_id == info.stream_id) {
                            let track = p.announced_tracks.remove(i);
                            self.hook(|| {
                                Happening::new(WebhookEventType::TrackUnpublished, &room_id, room.name.as_ref())
                                    .participant(&p.participant_id, &p.name)
                                    .track(track)
                                    .reason("unpublished")
                            });
                        }
                    }
                }
                self.broadcast(&room_id, None, ServerMessage::StreamRemoved(info));
            }
            MediaEvent::StreamUnavailable { connection_id, stream_id, reason, codec } => {
                if let Some(s) = self.session_of(&connection_id) {
                    let msg = ServerMessage::StreamUnavailable { connection_id, stream_id, reason, codec };
                    self.send_to_session(s, Outbound::Message(msg));
                }
            }
            MediaEvent::ActiveSpeakers { room_id, mut speakers } => {
                // A muted stream is never listed: the media plane measures the levels of what
                // arrives and holds a speaker for a second after its last loud moment, which
                // would keep someone who just muted listed (and relisted when the order
                // changes). Sent only when the filtered list changed.
                {
                    let Some(mut guard) = self.rooms.get_mut(&room_id) else { return };
                    let room = &mut *guard;
                    speakers.retain(|sp| {
                        !room.streams.iter().any(|s| s.stream_id == sp.stream_id && (s.muted || s.moderated))
                    });
                    let listed: Vec<String> = speakers.iter().map(|sp| sp.stream_id.clone()).collect();
                    if listed == room.speakers {
                        return;
                    }
                    room.speakers = listed;
                }
                self.broadcast(&room_id, None, ServerMessage::ActiveSpeakers { speakers });
            }
            MediaEvent::StreamLayers { room_id, stream_id, layers } => {
                // Kept with the stream, so `joined` and the REST room view carry it too.
                let info = {
                    let Some(mut room) = self.rooms.get_mut(&room_id) else { return };
                    let Some(s) = room.streams.iter_mut().find(|s| s.stream_id == stream_id) else { return };
                    s.layers = layers;
                    s.clone()
                };
                self.broadcast(&room_id, None, ServerMessage::StreamLayers(info));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_session_that_does_not_read_is_killed_not_buffered() {
        let reg = Registry::new(Metrics::new(prometheus::Registry::new()));
        let (tx, _rx) = mpsc::channel(8);
        let kill = std::sync::Arc::new(tokio::sync::Notify::new());
        reg.sessions.insert(7, SessionHandle { tx, kill: kill.clone() });
        let msg = || {
            Outbound::Message(ServerMessage::Error {
                code: ErrorCode::BadRequest,
                message: "x".into(),
                connection_id: None,
            })
        };
        for _ in 0..8 {
            reg.send_to_session(7, msg());
        }
        let fired = tokio::time::timeout(std::time::Duration::from_millis(50), kill.notified()).await;
        assert!(fired.is_err(), "not killed while the queue has room");
        reg.send_to_session(7, msg());
        let fired = tokio::time::timeout(std::time::Duration::from_millis(50), kill.notified()).await;
        assert!(fired.is_ok(), "killed on overflow");
    }
}
