//! Merging and throttling of keyframe requests toward one publisher stream.
//!
//! Subscribers' PLI/FIR and the gateway's own requests (a new subscriber, a lost packet) all land
//! here. At most one request goes upstream per interval; requests inside the interval are merged
//! into one pending request that is sent when the interval ends, so none is lost and none
//! storms the publisher. FIR outranks PLI when merged.

use std::time::{Duration, Instant};

use str0m::media::KeyframeRequestKind;

#[derive(Debug, Clone)]
pub struct KeyframeThrottle {
    interval: Duration,
    last_sent: Option<Instant>,
    pending: Option<KeyframeRequestKind>,
    /// Requests seen (from subscribers and the gateway).
    pub requested: u64,
    /// Requests sent upstream.
    pub sent: u64,
}

impl KeyframeThrottle {
    pub fn new(interval: Duration) -> Self {
        Self { interval, last_sent: None, pending: None, requested: 0, sent: 0 }
    }

    /// Note a request; it is sent by the next [`Self::due`] that allows it.
    pub fn request(&mut self, kind: KeyframeRequestKind) {
        self.requested += 1;
        self.pending = Some(match (self.pending, kind) {
            (Some(KeyframeRequestKind::Fir), _) | (_, KeyframeRequestKind::Fir) => KeyframeRequestKind::Fir,
            _ => KeyframeRequestKind::Pli,
        });
    }

    /// The request to send now, if one is pending and the interval allows it.
    pub fn due(&self, now: Instant) -> Option<KeyframeRequestKind> {
        let kind = self.pending?;
        match self.last_sent {
            Some(t) if now < t + self.interval => None,
            _ => Some(kind),
        }
    }

    /// Record that the pending request went out.
    pub fn mark_sent(&mut self, now: Instant) {
        self.pending = None;
        self.last_sent = Some(now);
        self.sent += 1;
    }

    /// When a pending request becomes due (for the engine's timer).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending?;
        self.last_sent.map(|t| t + self.interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use KeyframeRequestKind::*;

    #[test]
    fn first_request_goes_at_once_then_merges() {
        let t0 = Instant::now();
        let mut k = KeyframeThrottle::new(Duration::from_millis(500));
        k.request(Pli);
        assert_eq!(k.due(t0), Some(Pli));
        k.mark_sent(t0);
        k.request(Pli);
        k.request(Fir);
        k.request(Pli);
        assert_eq!(k.due(t0 + Duration::from_millis(100)), None);
        assert_eq!(k.poll_timeout(), Some(t0 + Duration::from_millis(500)));
        assert_eq!(k.due(t0 + Duration::from_millis(500)), Some(Fir));
        k.mark_sent(t0 + Duration::from_millis(500));
        assert_eq!(k.poll_timeout(), None);
        assert_eq!((k.requested, k.sent), (4, 2));
    }

    #[test]
    fn fifty_subscribers_every_100ms_give_two_per_second() {
        let t0 = Instant::now();
        let mut k = KeyframeThrottle::new(Duration::from_millis(500));
        let mut now = t0;
        while now < t0 + Duration::from_secs(10) {
            for _ in 0..50 {
                k.request(Pli);
            }
            if k.due(now).is_some() {
                k.mark_sent(now);
            }
            now += Duration::from_millis(100);
        }
        assert_eq!(k.requested, 5000);
        assert!(k.sent <= 20, "sent {}", k.sent);
        assert!(k.sent >= 19, "sent {}", k.sent);
    }
}
