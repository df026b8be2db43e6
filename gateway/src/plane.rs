//! The gateway's [`MediaPlane`]: places rooms on media workers (least loaded), routes each call
//! to the worker that owns the room or connection, and awaits its reply.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use dashmap::DashMap;
use signaling_api::media::{ConnectionSpec, IceRestarted, MediaError, MediaPlane};
use signaling_api::protocol::ErrorCode;
use tokio::sync::oneshot;

use crate::worker::{Command, Directory, Reply, WorkerHandle};

pub struct GatewayMedia {
    workers: Vec<WorkerHandle>,
    /// Room → worker index.
    rooms: DashMap<String, usize>,
    /// Connection → worker index (workers remove ended connections).
    directory: Arc<Directory>,
    /// `media.spread`: every room is on every worker; the room's worker above is its home
    /// (publishers), and each subscriber goes to the worker with the fewest.
    spread: bool,
}

fn gone() -> MediaError {
    MediaError::new(ErrorCode::Internal, "media worker is not running")
}

impl GatewayMedia {
    pub fn new(workers: Vec<WorkerHandle>, directory: Arc<Directory>, spread: bool) -> Self {
        let spread = spread && workers.len() > 1;
        Self { workers, rooms: DashMap::new(), directory, spread }
    }

    /// The workers that hold a room: its home, and with `media.spread` every other one too.
    fn holders(&self, home: usize) -> Vec<usize> {
        if self.spread {
            (0..self.workers.len()).collect()
        } else {
            vec![home]
        }
    }

    /// Where a new subscribe connection of a room goes: its home, or with `media.spread` the
    /// worker with the fewest subscribers (counted at once, so a burst of joins spreads too),
    /// on a tie not the home, which also carries the room's publishers.
    fn subscriber_worker(&self, room_id: &str) -> Result<usize, MediaError> {
        let home = self.room_worker(room_id)?;
        if !self.spread {
            return Ok(home);
        }
        let w = (0..self.workers.len())
            .min_by_key(|&i| (self.workers[i].subscribers.load(Ordering::Relaxed), i == home))
            .unwrap_or(home);
        self.workers[w].subscribers.fetch_add(1, Ordering::Relaxed);
        Ok(w)
    }

    pub fn workers(&self) -> &[WorkerHandle] {
        &self.workers
    }

    /// Close a room with a FINISHED reason of our choosing (`shutdown` when the server stops).
    pub async fn close_room_because(&self, room_id: &str, reason: &'static str) {
        if let Some((_, home)) = self.rooms.remove(room_id) {
            for w in self.holders(home) {
                let _ = self.call(w, |reply| Command::CloseRoom { room_id: room_id.to_owned(), reason, reply }).await;
            }
        }
    }

    async fn call<T>(&self, worker: usize, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, MediaError> {
        let (tx, rx) = oneshot::channel();
        let handle = self.workers.get(worker).ok_or_else(gone)?;
        if !handle.send(make(tx)) {
            return Err(gone());
        }
        rx.await.unwrap_or_else(|_| Err(gone()))
    }

    fn room_worker(&self, room_id: &str) -> Result<usize, MediaError> {
        self.rooms.get(room_id).map(|w| *w).ok_or_else(|| MediaError::new(ErrorCode::NotFound, "room not found"))
    }

    fn conn_worker(&self, connection_id: &str) -> Result<usize, MediaError> {
        self.directory
            .get(connection_id)
            .map(|w| *w)
            .ok_or_else(|| MediaError::new(ErrorCode::NotFound, "connection not found"))
    }

    async fn open(&self, spec: ConnectionSpec, offer: Option<String>) -> Result<(), MediaError> {
        let w = match offer {
            Some(_) => self.room_worker(&spec.room_id)?,
            None => self.subscriber_worker(&spec.room_id)?,
        };
        self.open_on(w, spec, |spec, reply| match offer {
            Some(offer) => Command::Publish { spec, offer, reply },
            None => Command::Subscribe { spec, reply },
        })
        .await
    }

    /// Send the command that makes a new connection to its room's worker, with the directory
    /// entry in place for the events it causes.
    async fn open_on(
        &self,
        w: usize,
        spec: ConnectionSpec,
        make: impl FnOnce(ConnectionSpec, Reply<()>) -> Command,
    ) -> Result<(), MediaError> {
        let id = spec.connection_id.clone();
        self.directory.insert(id.clone(), w);
        let r = self.call(w, |reply| make(spec, reply)).await;
        if r.is_err() {
            // Either never created or already ended (FAILED): no entry may stay behind.
            self.directory.remove(&id);
        }
        r
    }
}

#[async_trait::async_trait]
impl MediaPlane for GatewayMedia {
    async fn create_room(&self, room_id: &str) -> Result<(), MediaError> {
        let w =
            (0..self.workers.len()).min_by_key(|&i| self.workers[i].rooms.load(Ordering::Relaxed)).ok_or_else(gone)?;
        for m in self.holders(w).into_iter().filter(|m| *m != w) {
            let home = Some(w);
            self.call(m, |reply| Command::CreateRoom { room_id: room_id.to_owned(), home, reply }).await?;
        }
        self.call(w, |reply| Command::CreateRoom { room_id: room_id.to_owned(), home: None, reply }).await?;
        self.rooms.insert(room_id.to_owned(), w);
        Ok(())
    }

    async fn close_room(&self, room_id: &str) {
        self.close_room_because(room_id, "room_closed").await;
    }

    async fn close_room_with_reason(&self, room_id: &str, reason: &'static str) {
        self.close_room_because(room_id, reason).await;
    }

    async fn publish(&self, spec: ConnectionSpec, offer: String) -> Result<(), MediaError> {
        self.open(spec, Some(offer)).await
    }

    async fn republish(&self, connection_id: &str, offer: String) -> Result<(), MediaError> {
        let w = self.conn_worker(connection_id)?;
        self.call(w, |reply| Command::Republish { connection_id: connection_id.to_owned(), offer, reply }).await
    }

    async fn subscribe(&self, spec: ConnectionSpec) -> Result<(), MediaError> {
        self.open(spec, None).await
    }

    async fn play(&self, spec: ConnectionSpec, publisher: &str, offer: String) -> Result<(), MediaError> {
        let publisher = publisher.to_owned();
        // A player's tracks come from one publisher: it is served where the publisher is.
        let w = self.room_worker(&spec.room_id)?;
        self.open_on(w, spec, |spec, reply| Command::Play { spec, publisher, offer, reply }).await
    }

    async fn resubscribe(&self, connection_id: &str) -> Result<(), MediaError> {
        let w = self.conn_worker(connection_id)?;
        self.call(w, |reply| Command::Resubscribe { connection_id: connection_id.to_owned(), reply }).await
    }

    async fn restart_ice(&self, connection_id: &str) -> Result<(), MediaError> {
        let w = self.conn_worker(connection_id)?;
        self.call(w, |reply| Command::RestartIce { connection_id: connection_id.to_owned(), reply }).await
    }

    async fn restart_ice_remote(
        &self,
        connection_id: &str,
        ufrag: String,
        pwd: String,
    ) -> Result<IceRestarted, MediaError> {
        let w = self.conn_worker(connection_id)?;
        let connection_id = connection_id.to_owned();
        self.call(w, |reply| Command::RestartIceRemote { connection_id, ufrag, pwd, reply }).await
    }

    async fn resend_offer(&self, connection_id: &str) -> Result<(), MediaError> {
        let w = self.conn_worker(connection_id)?;
        self.call(w, |reply| Command::ResendOffer { connection_id: connection_id.to_owned(), reply }).await
    }

    async fn answer(&self, connection_id: &str, sdp: String) -> Result<(), MediaError> {
        let w = self.conn_worker(connection_id)?;
        self.call(w, |reply| Command::Answer { connection_id: connection_id.to_owned(), sdp, reply }).await
    }

    async fn add_candidate(&self, connection_id: &str, candidate: String) -> Result<(), MediaError> {
        let w = self.conn_worker(connection_id)?;
        self.call(w, |reply| Command::Candidate { connection_id: connection_id.to_owned(), candidate, reply }).await
    }

    async fn set_layer(&self, connection_id: &str, stream_id: &str, rid: Option<String>) -> Result<(), MediaError> {
        let w = self.conn_worker(connection_id)?;
        self.call(w, |reply| Command::SetLayer {
            connection_id: connection_id.to_owned(),
            stream_id: stream_id.to_owned(),
            rid,
            reply,
        })
        .await
    }

    async fn set_track_blocked(&self, room_id: &str, stream_id: &str, blocked: bool) -> Result<(), MediaError> {
        let home = self.room_worker(room_id)?;
        // Mirrors first: by the time the home answers, no worker forwards a blocked track.
        for w in self.holders(home).into_iter().filter(|w| *w != home) {
            let _ = self
                .call(w, |reply| Command::SetTrackBlocked {
                    room_id: room_id.to_owned(),
                    stream_id: stream_id.to_owned(),
                    blocked,
                    reply,
                })
                .await;
        }
        self.call(home, |reply| Command::SetTrackBlocked {
            room_id: room_id.to_owned(),
            stream_id: stream_id.to_owned(),
            blocked,
            reply,
        })
        .await
    }

    async fn close_connection(&self, connection_id: &str, reason: &str) {
        if let Ok(w) = self.conn_worker(connection_id) {
            let _ = self
                .call(w, |reply| Command::Close {
                    connection_id: connection_id.to_owned(),
                    reason: reason.to_owned(),
                    reply,
                })
                .await;
        }
    }

    async fn connection_stats(&self, connection_id: &str) -> Option<serde_json::Value> {
        let w = self.conn_worker(connection_id).ok()?;
        let (tx, rx) = oneshot::channel();
        if !self.workers.get(w)?.send(Command::Stats { connection_id: connection_id.to_owned(), reply: tx }) {
            return None;
        }
        rx.await.ok().flatten()
    }
}
