//! The data-channel relay: what a participant sends on a data channel of its publish connection
//! reaches every other participant's subscribe connection, wrapped with the sender's id, on the
//! gateway's reliable channel (`gateway`) or its unreliable one (`gateway-unreliable`: unordered,
//! no retransmissions) as the sender's channel was. Bounded: a message larger than
//! `data_max_message_bytes` or beyond the sender's `data_messages_per_second` is dropped, and so
//! is a copy for a subscriber whose channel is not open yet or whose SCTP send buffer is full —
//! each counted, none waited for, so data never holds media back. Client-offered (WHEP)
//! connections neither send nor receive data.
//!
//! Wire format of a relayed message (one text message, JSON):
//! `{ "participant_id", "label", "binary", "data" }` — `label` is the sender's channel label,
//! `data` the text as sent, or base64 when `binary`.

use base64::Engine as _;
use str0m::channel::{ChannelConfig, ChannelData, ChannelId, Reliability};

use super::*;

/// The labels of the two channels the gateway opens on every subscribe connection it offers.
pub(crate) const RELIABLE_LABEL: &str = "gateway";
pub(crate) const UNRELIABLE_LABEL: &str = "gateway-unreliable";

/// A publisher's data channels and its message allowance.
#[derive(Default)]
pub(crate) struct DataIn {
    /// Channels the publisher opened: id, label, sent reliably (ordered, retransmitted).
    pub channels: Vec<(ChannelId, Arc<str>, bool)>,
    pub bucket: Option<DataBucket>,
}

/// The gateway's two channels on a subscribe connection.
#[derive(Default, Clone, Copy)]
pub(crate) struct DataOut {
    pub reliable: Option<ChannelId>,
    pub unreliable: Option<ChannelId>,
}

/// `rate` messages per second with bursts of twice that.
pub(crate) struct DataBucket {
    tokens: f64,
    at: Instant,
}

impl DataBucket {
    fn take(&mut self, now: Instant, rate: u32) -> bool {
        let rate = f64::from(rate.max(1));
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * rate).min(2.0 * rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The config of the gateway's unreliable channel: unordered, never retransmitted.
pub(crate) fn unreliable_config() -> ChannelConfig {
    ChannelConfig {
        label: UNRELIABLE_LABEL.into(),
        ordered: false,
        reliability: Reliability::MaxRetransmits { retransmits: 0 },
        ..Default::default()
    }
}

#[derive(serde::Serialize)]
struct Envelope<'a> {
    participant_id: &'a str,
    label: &'a str,
    binary: bool,
    data: std::borrow::Cow<'a, str>,
}

impl Engine {
    /// A publisher opened a data channel: remember its label and whether it is reliable.
    pub(super) fn data_channel_opened(&mut self, key: ConnKey, id: ChannelId, label: String) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        let reliable = conn
            .rtc
            .channel(id)
            .and_then(|c| c.config().map(|c| c.ordered && c.reliability == Reliability::Reliable))
            .unwrap_or(true);
        let Side::Publish(side) = &mut conn.side else { return };
        side.data.channels.retain(|(c, _, _)| *c != id);
        side.data.channels.push((id, Arc::from(label.as_str()), reliable));
        conn.span.in_scope(|| tracing::debug!(label, reliable, "data channel opened"));
    }

    /// Relay one message a publisher sent to every other participant's subscribe connection.
    pub(super) fn relay_data(&mut self, now: Instant, key: ConnKey, msg: ChannelData) {
        let Self { conns, counters, cfg, .. } = self;
        let Some(publisher) = conns.get_mut(&key) else { return };
        let Side::Publish(side) = &mut publisher.side else { return };
        counters.data_received += 1;
        let (label, reliable) = side
            .data
            .channels
            .iter()
            .find(|(c, _, _)| *c == msg.id)
            .map(|(_, l, r)| (Arc::clone(l), *r))
            .unwrap_or_else(|| (Arc::from(""), true));
        if msg.data.len() + label.len() > cfg.data_max_message_bytes {
            counters.data_dropped_size += 1;
            return;
        }
        let bucket = side.data.bucket.get_or_insert_with(|| DataBucket {
            tokens: 2.0 * f64::from(cfg.data_messages_per_second.max(1)),
            at: now,
        });
        if !bucket.take(now, cfg.data_messages_per_second) {
            counters.data_dropped_rate += 1;
            return;
        }
        let data = if msg.binary {
            std::borrow::Cow::Owned(base64::engine::general_purpose::STANDARD.encode(&msg.data))
        } else {
            String::from_utf8_lossy(&msg.data)
        };
        let envelope = Envelope { participant_id: &publisher.participant, label: &label, binary: msg.binary, data };
        let Ok(text) = serde_json::to_vec(&envelope) else { return };
        let text: Arc<[u8]> = text.into();
        let sender = Arc::clone(&publisher.participant);
        let room_id = Arc::clone(&publisher.room);
        self.deliver_data(now, &room_id, &sender, reliable, &text);
        // A spread room: the workers with subscribers of their own deliver it there.
        let Some(room) = self.rooms.get(&room_id) else { return };
        for w in super::relay::members(room.relay_to) {
            let (room, sender, text) = (Arc::clone(&room_id), Arc::clone(&sender), Arc::clone(&text));
            self.q.relay.push((w, Relay::Data { room, sender, reliable, text }));
        }
    }

    /// Write a wrapped data message to every subscribe connection of the room on this engine
    /// that is not `sender`'s.
    pub(super) fn deliver_data(&mut self, now: Instant, room_id: &str, sender: &Arc<str>, reliable: bool, text: &[u8]) {
        let Self { conns, rooms, q, counters, .. } = self;
        let Some(room) = rooms.get(room_id) else { return };
        for k in &room.conns {
            let Some(sub) = conns.get_mut(k) else { continue };
            if sub.participant == *sender || sub.state != ConnectionState::Ready {
                continue;
            }
            let Side::Subscribe(s) = &sub.side else { continue };
            let channel = if reliable { s.data.reliable } else { s.data.unreliable };
            let written = channel
                .and_then(|id| sub.rtc.channel(id))
                .is_some_and(|mut c| matches!(c.write(false, text), Ok(true)));
            if written {
                counters.data_forwarded += 1;
                sub.drain(now, q);
            } else {
                counters.data_dropped_full += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Bursts of twice the rate, then the rate: a flood is cut, a steady sender is not.
    #[test]
    fn the_bucket_allows_bursts_of_twice_the_rate_then_the_rate() {
        let t0 = Instant::now();
        let mut b = DataBucket { tokens: 20.0, at: t0 };
        let burst = (0..100).filter(|_| b.take(t0, 10)).count();
        assert_eq!(burst, 20);
        assert!(!b.take(t0 + Duration::from_millis(50), 10), "half a token after 50 ms");
        assert!(b.take(t0 + Duration::from_millis(100), 10), "a whole one after 100 ms");
        // A sender at the rate is never refused.
        let steady = (1..=50).filter(|i| b.take(t0 + Duration::from_millis(100 + 100 * i), 10)).count();
        assert_eq!(steady, 50);
    }
}
