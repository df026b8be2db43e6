//! One room on several media workers (`media.spread`). Every worker holds the room; the
//! worker that holds its publishers (the room's *home*) owns each track, and the others hold a
//! *mirror* of it for their own subscribers:
//!
//! - home → mirrors: [`Relay::TrackAdded`] / [`Relay::TrackRemoved`] / [`Relay::LayerPaused`]
//!   to every worker (a mirror creates the track and re-offers its subscribers), and every
//!   publisher packet, as a [`RelayedPacket`] whose payload is the same `Arc`, to each worker
//!   that has subscribers in the room; data-channel messages likewise ([`Relay::Data`]).
//! - mirror → home: [`Relay::Interest`] when its first subscriber in the room arrives or its
//!   last one leaves, and [`Relay::Keyframe`] where a home track would send a PLI/FIR to the
//!   publisher (the home merges it into the same throttle).
//!
//! A mirror runs the same receive side as the home on what it is handed (layer activity and
//! rate, its own keyframe cache and gap tracking, keyframe detection), so layer choice,
//! switching and starting from the cache work for its subscribers as they do on the home; the
//! home alone computes active speakers, reports layers and counts ingress. The engine only
//! queues what crosses workers: the driver carries it (see `gateway/src/spread.rs`).

use super::*;
use crate::engine::forward::Inbound;

/// The publisher key a mirror track carries: it names no connection of the mirror's engine.
pub(super) const MIRROR: ConnKey = ConnKey(u64::MAX);

/// A message between the workers of a spread room (everything but packets).
#[derive(Clone, Debug)]
pub enum Relay {
    TrackAdded(Arc<TrackInfo>),
    TrackRemoved {
        room: Arc<str>,
        stream_ids: Vec<Arc<str>>,
    },
    LayerPaused {
        room: Arc<str>,
        stream_id: Arc<str>,
        rid: Option<Rid>,
        paused: bool,
    },
    /// A data-channel message, already wrapped (`data`), for the subscribers of other
    /// participants than `sender`.
    Data {
        room: Arc<str>,
        sender: Arc<str>,
        reliable: bool,
        text: Arc<[u8]>,
    },
    /// Worker `from` has subscribers in the room (`on`) or no more.
    Interest {
        room: Arc<str>,
        from: usize,
        on: bool,
    },
    /// A mirror's keyframe request for a layer of a home track.
    Keyframe {
        room: Arc<str>,
        stream_id: Arc<str>,
        rid: Option<Rid>,
        kind: KeyframeRequestKind,
    },
}

/// A published track as a mirror needs it.
#[derive(Debug)]
pub struct TrackInfo {
    pub room: Arc<str>,
    pub stream_id: Arc<str>,
    pub owner: Arc<str>,
    pub mid: Mid,
    pub kind: MediaKind,
    pub rids: Vec<Option<Rid>>,
    pub codec: Option<PayloadParams>,
    pub blocked: bool,
}

/// A publisher packet handed to another worker: the payload is shared, never copied.
#[derive(Clone)]
pub struct RelayedPacket {
    pub(super) room: Arc<str>,
    pub(super) stream_id: Arc<str>,
    pub(super) rid: Option<Rid>,
    pub(super) params: PayloadParams,
    pub(super) p: Inbound,
    /// When the home read it (the mirror's added latency counts from here).
    pub read_at: Instant,
}

impl std::fmt::Debug for RelayedPacket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayedPacket").field("stream_id", &self.stream_id).field("seq", &self.p.seq).finish()
    }
}

/// This engine's place among the workers of a spread room.
#[derive(Clone, Copy, Debug)]
pub(super) struct Spread {
    pub(super) me: usize,
    pub(super) workers: usize,
}

impl Spread {
    fn others(self) -> impl Iterator<Item = usize> {
        (0..self.workers).filter(move |w| *w != self.me)
    }
}

/// Bits of a worker set (at most 64 workers are spread over).
pub(super) fn bit(worker: usize) -> u64 {
    1u64.checked_shl(worker as u32).unwrap_or(0)
}

/// The workers in a set, lowest first.
pub(super) fn members(mut set: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        let w = (set != 0).then(|| set.trailing_zeros() as usize)?;
        set &= set - 1;
        Some(w)
    })
}

impl Engine {
    /// This engine is worker `me` of `workers` that spread rooms over each other.
    pub fn set_spread(&mut self, me: usize, workers: usize) {
        self.spread = (workers > 1).then_some(Spread { me, workers: workers.min(64) });
    }

    /// Hold a mirror of the room whose home is worker `home`: its tracks arrive as
    /// [`Relay::TrackAdded`], its packets as [`RelayedPacket`]s.
    pub fn create_mirror_room(&mut self, room_id: &str, home: usize) {
        self.rooms.entry(Arc::from(room_id)).or_default().home = Some(home);
    }

    /// What waits to go to other workers since the last call: messages (target worker,
    /// message) and packets (target worker, packet), appended to the caller's buffers.
    pub fn take_relays(&mut self, messages: &mut Vec<(usize, Relay)>, packets: &mut Vec<(usize, RelayedPacket)>) {
        messages.append(&mut self.q.relay);
        packets.append(&mut self.q.relayed);
    }

    /// Subscribe connections on this engine (the plane places new ones by it).
    pub fn subscriber_count(&self) -> usize {
        self.subscribers
    }

    /// A message from another worker.
    pub fn handle_relay(&mut self, now: Instant, relay: Relay) {
        match relay {
            Relay::TrackAdded(info) => self.mirror_track(now, &info),
            Relay::TrackRemoved { room, stream_ids } => {
                let Some(r) = self.rooms.get_mut(&room).filter(|r| r.home.is_some()) else { return };
                r.tracks.retain(|t| !stream_ids.contains(&t.stream_id));
                self.end_orphaned_players(now, &room, &stream_ids);
                self.renegotiate_room(now, &room);
            }
            Relay::LayerPaused { room, stream_id, rid, paused } => {
                let Some(r) = self.rooms.get_mut(&room) else { return };
                let Some(track) = r.tracks.iter_mut().find(|t| t.stream_id == stream_id) else { return };
                if let Some(layer) = track.layers.iter_mut().find(|l| l.rid == rid) {
                    layer.paused = paused;
                }
                for (k, _) in &track.outs {
                    queue_reallocation(&mut self.realloc, *k);
                }
            }
            Relay::Data { room, sender, reliable, text } => self.deliver_data(now, &room, &sender, reliable, &text),
            Relay::Interest { room, from, on } => {
                let Some(r) = self.rooms.get_mut(&room).filter(|r| r.home.is_none()) else { return };
                if on {
                    r.relay_to |= bit(from);
                } else {
                    r.relay_to &= !bit(from);
                }
            }
            Relay::Keyframe { room, stream_id, rid, kind } => {
                let Self { rooms, conns, q, counters, .. } = self;
                let Some(r) = rooms.get_mut(&room) else { return };
                let Some(track) = r.tracks.iter_mut().find(|t| t.stream_id == stream_id && t.mirror.is_none()) else {
                    return;
                };
                let Some(li) = track.layers.iter().position(|l| l.rid == rid) else { return };
                track.layers[li].keyframes.request(kind);
                send_due_keyframe_request(now, track, li, conns, q, counters);
            }
        }
        self.process(now);
    }

    /// A publisher packet from the room's home: the same receive side and fan-out as a
    /// packet read here, for this worker's subscribers.
    pub fn handle_relayed_packet(&mut self, now: Instant, r: RelayedPacket) {
        let Some(room) = self.rooms.get_mut(&r.room).filter(|room| room.home.is_some()) else { return };
        let Some(ti) = room.tracks.iter().position(|t| t.stream_id == r.stream_id) else { return };
        let Some(li) = room.tracks[ti].layer_index(r.rid, self.cfg.keyframe_throttle) else { return };
        self.take_in(now, &r.room, ti, li, r.p, r.params);
        self.process(now);
    }

    fn mirror_track(&mut self, now: Instant, info: &TrackInfo) {
        let Some(room) = self.rooms.get_mut(&info.room) else { return };
        let Some(home) = room.home else { return };
        if room.tracks.iter().any(|t| t.stream_id == info.stream_id) {
            return;
        }
        let layers = info.rids.iter().map(|r| LayerIn::new(*r, self.cfg.keyframe_throttle)).collect();
        room.tracks.push(TrackIn {
            stream_id: Arc::clone(&info.stream_id),
            owner: Arc::clone(&info.owner),
            conn: MIRROR,
            mid: info.mid,
            kind: info.kind,
            layers,
            outs: Vec::new(),
            announced: Vec::new(),
            codec: info.codec,
            level: Default::default(),
            blocked: info.blocked,
            mirror: Some((home, Arc::clone(&info.room))),
        });
        let room_id = Arc::clone(&info.room);
        self.renegotiate_room(now, &room_id);
    }

    /// On a room's home: tell every other worker (`relay_all`) about a track change.
    pub(super) fn relay_all(&mut self, room_id: &str, make: impl Fn() -> Relay) {
        let Some(spread) = self.spread else { return };
        if self.rooms.get(room_id).is_none_or(|r| r.home.is_some()) {
            return;
        }
        for w in spread.others() {
            self.q.relay.push((w, make()));
        }
    }

    /// On a mirror: tell the home when this worker's first subscriber in the room arrived or
    /// its last one left.
    pub(super) fn note_interest(&mut self, room_id: &str) {
        let Some(spread) = self.spread else { return };
        let Some(key) = self.rooms.get_key_value(room_id).map(|(k, _)| Arc::clone(k)) else { return };
        let Some(room) = self.rooms.get_mut(&key) else { return };
        let Some(home) = room.home else { return };
        let on = !room.conns.is_empty();
        if on != room.interest_sent {
            room.interest_sent = on;
            self.q.relay.push((home, Relay::Interest { room: key, from: spread.me, on }));
        }
    }
}

/// On a home: queue a publisher packet for every worker with subscribers in its room.
#[allow(clippy::too_many_arguments)]
pub(super) fn relay_packet(
    q: &mut Queues,
    relay_to: u64,
    room: &Arc<str>,
    track: &TrackIn,
    li: usize,
    p: &Inbound,
    params: PayloadParams,
    now: Instant,
) {
    for w in members(relay_to) {
        q.relayed.push((
            w,
            RelayedPacket {
                room: Arc::clone(room),
                stream_id: Arc::clone(&track.stream_id),
                rid: track.layers.get(li).and_then(|l| l.rid),
                params,
                p: p.clone(),
                read_at: now,
            },
        ));
    }
}
