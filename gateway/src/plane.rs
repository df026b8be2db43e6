//! The gateway's [`MediaPlane`]: places rooms on media workers (least loaded), routes each call
//! to the worker that owns the room or connection, and awaits its reply.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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
    /// Held while a subscriber is placed, so that two joins at once (on two runtime threads)
    /// cannot both read the same counts before either adds itself.
    placement: Mutex<()>,
}

/// A subscribe connection on its way to a worker: counted in the worker's `placing` until
/// dropped (also when the call is cancelled or fails).
struct Placing(Arc<AtomicUsize>);

impl Placing {
    fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(counter))
    }
}

impl Drop for Placing {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

fn gone() -> MediaError {
    MediaError::new(ErrorCode::Internal, "media worker is not running")
}

impl GatewayMedia {
    pub fn new(workers: Vec<WorkerHandle>, directory: Arc<Directory>, spread: bool) -> Self {
        let spread = spread && workers.len() > 1;
        Self { workers, rooms: DashMap::new(), directory, spread, placement: Mutex::new(()) }
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
    /// worker with the fewest subscribers, counting those still being placed there (so a burst
    /// of joins spreads too), on a tie not the home, which also carries the room's publishers.
    /// The placement counts until the returned guard drops, after the worker's reply.
    fn subscriber_worker(&self, room_id: &str) -> Result<(usize, Option<Placing>), MediaError> {
        let home = self.room_worker(room_id)?;
        if !self.spread {
            return Ok((home, None));
        }
        let _one_at_a_time = self.placement.lock().unwrap_or_else(|e| e.into_inner());
        // `placing` first: a placement that has just ended (its guard dropped after the reply,
        // `Release`) is then already in the worker's stored count (stored before the reply).
        let load = |h: &WorkerHandle| {
            let placing = h.placing.load(Ordering::Acquire);
            h.subscribers.load(Ordering::Relaxed) + placing
        };
        let w = (0..self.workers.len()).min_by_key(|&i| (load(&self.workers[i]), i == home)).unwrap_or(home);
        Ok((w, Some(Placing::new(&self.workers[w].placing))))
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
        let (w, _placing) = match offer {
            Some(_) => (self.room_worker(&spec.room_id)?, None),
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

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Poll, Token, Waker};
    use std::sync::mpsc;

    /// A handle to no thread: placement reads only its counters.
    fn idle_worker(poll: &Poll) -> WorkerHandle {
        let (tx, _rx) = mpsc::channel();
        WorkerHandle {
            tx,
            waker: Arc::new(Waker::new(poll.registry(), Token(0)).unwrap()),
            rooms: Arc::default(),
            subscribers: Arc::default(),
            placing: Arc::default(),
        }
    }

    #[test]
    fn a_subscriber_still_being_placed_counts_though_its_worker_stores_its_own_count() {
        let (p0, p1) = (Poll::new().unwrap(), Poll::new().unwrap());
        let plane = GatewayMedia::new(vec![idle_worker(&p0), idle_worker(&p1)], Arc::default(), true);
        plane.rooms.insert("r".into(), 0);

        // On a tie the first goes away from the home.
        let (first, guard) = plane.subscriber_worker("r").unwrap();
        assert_eq!(first, 1);
        // The worker has not created it yet and stores the count it has (0) meanwhile.
        plane.workers[first].subscribers.store(0, Ordering::Relaxed);
        let (second, second_guard) = plane.subscriber_worker("r").unwrap();
        assert_eq!(second, 0, "the second join must not land on the worker the first is on its way to");

        // Once answered (created, so the worker's count has it), only the stored count remains.
        plane.workers[first].subscribers.store(1, Ordering::Relaxed);
        drop(guard);
        drop(second_guard);
        assert_eq!(plane.workers[first].placing.load(Ordering::Relaxed), 0);
        assert_eq!(plane.workers[second].placing.load(Ordering::Relaxed), 0);
        let (third, _g) = plane.subscriber_worker("r").unwrap();
        assert_eq!(third, 0, "worker 0 has none, worker 1 has one");
    }

    #[test]
    fn joins_placed_at_once_from_many_threads_are_each_counted_and_split_evenly() {
        let (p0, p1) = (Poll::new().unwrap(), Poll::new().unwrap());
        let plane = GatewayMedia::new(vec![idle_worker(&p0), idle_worker(&p1)], Arc::default(), true);
        plane.rooms.insert("r".into(), 0);
        let start = std::sync::Barrier::new(4);
        let guards: Vec<Placing> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        (0..1_000).map(|_| plane.subscriber_worker("r").unwrap().1.unwrap()).collect::<Vec<_>>()
                    })
                })
                .collect();
            threads.into_iter().flat_map(|t| t.join().unwrap()).collect()
        });
        let placed: Vec<usize> = plane.workers.iter().map(|w| w.placing.load(Ordering::Relaxed)).collect();
        assert_eq!(placed, [2_000, 2_000], "placed evenly, each counted once");
        drop(guards);
        assert!(plane.workers.iter().all(|w| w.placing.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn without_spread_every_subscriber_goes_home_and_nothing_is_counted() {
        let (p0, p1) = (Poll::new().unwrap(), Poll::new().unwrap());
        let plane = GatewayMedia::new(vec![idle_worker(&p0), idle_worker(&p1)], Arc::default(), false);
        plane.rooms.insert("r".into(), 1);
        for _ in 0..3 {
            let (w, guard) = plane.subscriber_worker("r").unwrap();
            assert_eq!(w, 1);
            assert!(guard.is_none());
        }
        assert!(matches!(plane.subscriber_worker("missing"), Err(e) if e.code == ErrorCode::NotFound));
    }
}
