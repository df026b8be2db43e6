//! Keyframe policy: subscriber requests relayed through each layer's throttle, the gateway's own
//! requests (with retries), and when a gap counts as lost for good.

use super::*;

pub(super) fn kind_index(kind: KeyframeRequestKind) -> usize {
    usize::from(kind == KeyframeRequestKind::Fir)
}

/// Whether a subscriber starting on a layer can start from its keyframe cache.
pub(super) fn cached(cfg: &CoreConfig, track: &TrackIn, li: usize) -> bool {
    cfg.keyframe_cache && track.layers.get(li).is_some_and(|l| l.gop.complete().is_some())
}

/// Send a layer's merged keyframe request upstream if the throttle allows it now.
pub(super) fn send_due_keyframe_request(
    now: Instant,
    track: &mut TrackIn,
    li: usize,
    conns: &mut super::Conns,
    q: &mut Queues,
    counters: &mut Counters,
) {
    let Some(layer) = track.layers.get_mut(li) else { return };
    let Some(kind) = layer.keyframes.due(now) else { return };
    if let Some((home, room)) = &track.mirror {
        // A mirror (spread room): the home asks the publisher, through its own throttle.
        let (room, stream_id, rid) = (Arc::clone(room), Arc::clone(&track.stream_id), layer.rid);
        q.relay.push((*home, super::relay::Relay::Keyframe { room, stream_id, rid, kind }));
        layer.keyframes.mark_sent(now);
        return;
    }
    let Some(publisher) = conns.get_mut(&track.conn) else { return };
    // Nothing to ask until the publisher's stream exists; the request stays pending.
    let mut api = publisher.rtc.direct_api();
    let Some(rx) = api.stream_rx_by_mid(track.mid, layer.rid) else { return };
    rx.request_keyframe(kind);
    layer.keyframes.mark_sent(now);
    publisher.stats.keyframe_requests_out += 1;
    counters.keyframe_requests_out[kind_index(kind)] += 1;
    publisher.drain(now, q);
}

/// The gateway itself needs a keyframe of a layer (a subscriber starts or switches, or a loss
/// could not be repaired): ask now if the throttle allows, and keep asking every
/// `keyframe_retry` until one arrives.
pub(super) fn want_keyframe(
    now: Instant,
    track: &mut TrackIn,
    li: usize,
    conns: &mut super::Conns,
    q: &mut Queues,
    counters: &mut Counters,
) {
    if track.kind != MediaKind::Video {
        return;
    }
    let Some(layer) = track.layers.get_mut(li) else { return };
    layer.keyframe_wanted.get_or_insert(now);
    layer.keyframes.request(KeyframeRequestKind::Pli);
    send_due_keyframe_request(now, track, li, conns, q, counters);
}

/// How long a gap in a publisher's stream may stay open before it counts as lost for good: four
/// round trips to the publisher (NACK, RTX, and a retry), at least 250 ms; 500 ms while the
/// round trip is unknown.
pub(super) fn give_up_after(publisher: Option<&Conn>) -> std::time::Duration {
    match publisher.and_then(|p| p.stats.rtt_ms) {
        Some(rtt) => std::time::Duration::from_secs_f64((4.0 * rtt / 1000.0).max(0.25)),
        None => std::time::Duration::from_millis(500),
    }
}

impl Engine {
    /// A subscriber asked for a keyframe on one of its tracks: merge it into the throttle of
    /// the layer it receives (or is switching to).
    pub(super) fn relay_keyframe_request(
        &mut self,
        now: Instant,
        sub_key: ConnKey,
        mid: Mid,
        kind: KeyframeRequestKind,
    ) {
        let Self { rooms, conns, q, counters, .. } = self;
        let Some(sub) = conns.get(&sub_key) else { return };
        let Some(out) = sub.outs().iter().find(|o| o.mid == mid) else { return };
        let Some(li) = out.current.or(out.target) else { return };
        let Some(room) = rooms.get_mut(&sub.room) else { return };
        let Some(track) = room.tracks.iter_mut().find(|t| t.stream_id == out.stream_id) else { return };
        let Some(layer) = track.layers.get_mut(li) else { return };
        layer.keyframes.request(kind);
        send_due_keyframe_request(now, track, li, conns, q, counters);
        if track.layers[li].keyframes.poll_timeout().is_some() {
            // Deferred into the merged request the throttle sends when its window ends.
            counters.keyframe_requests_throttled[kind_index(kind)] += 1;
        }
    }
}
