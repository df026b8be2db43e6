//! Active speakers: who in a room is speaking, from the audio level (RFC 6464) that publishers
//! put in the header extension of every audio packet. Owns the per-track loudness window and the
//! room's reported speaker list; the engine feeds it packets and asks it every [`TICK`].
//!
//! Levels are in RFC 6464's unit: −dBov, 0 (full scale) to 127 (silence). A track speaks when the
//! mean level of a window is at least [`SPEAKING_DBOV`] and it had [`MIN_PACKETS`] packets; it
//! stays listed for [`HOLD`] after its last loud window, so pauses between words do not make the
//! list flicker. The list is ordered loudest first (a smoothed level) and reported only when the
//! set or the order changes.

use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the list is computed (and at most how often it is reported).
pub const TICK: Duration = Duration::from_millis(200);
/// Loud enough to count as speech: −50 dBov (ambient noise of a quiet room is below −60).
pub const SPEAKING_DBOV: u8 = 50;
/// Packets a window needs (20 ms audio gives 10 per window): a stray packet is not speech.
pub const MIN_PACKETS: u32 = 3;
/// How long a speaker stays listed after its last loud window.
pub const HOLD: Duration = Duration::from_millis(1000);

/// The loudness of one audio track.
#[derive(Debug, Default, Clone)]
pub struct AudioLevel {
    /// Sum of −dBov and packets in the current window.
    sum: u32,
    packets: u32,
    /// Smoothed loudness, 0 (silence) to 1 (0 dBov): 1 − (−dBov)/127.
    smoothed: f32,
    /// Listed until then.
    speaking_until: Option<Instant>,
}

impl AudioLevel {
    /// One packet's level, as the header extension carries it (−dBov; str0m gives it negated,
    /// as a negative number or zero).
    pub fn observe(&mut self, audio_level: i8) {
        self.sum += u32::from(audio_level.unsigned_abs().min(127));
        self.packets += 1;
    }

    /// Close the window: true while the track counts as speaking.
    fn tick(&mut self, now: Instant) -> bool {
        let window = (self.packets >= MIN_PACKETS).then(|| self.sum as f32 / self.packets as f32);
        let loudness = window.map(|dbov| 1.0 - dbov / 127.0).unwrap_or(0.0);
        // Rises at once, falls by half each window: a word is heard at its level, a pause fades.
        self.smoothed = loudness.max(0.5 * self.smoothed + 0.5 * loudness);
        if window.is_some_and(|dbov| dbov <= f32::from(SPEAKING_DBOV)) {
            self.speaking_until = Some(now + HOLD);
        }
        self.sum = 0;
        self.packets = 0;
        self.speaking_until.is_some_and(|t| now < t)
    }

    /// Anything left to compute: packets in the window or a speaker still held.
    fn busy(&self, now: Instant) -> bool {
        self.packets > 0 || self.speaking_until.is_some_and(|t| now < t)
    }
}

/// One listed speaker.
#[derive(Debug, Clone, PartialEq)]
pub struct Listed {
    pub participant_id: Arc<str>,
    pub stream_id: Arc<str>,
    pub level: f32,
}

/// A room's speaker list.
#[derive(Debug, Default)]
pub struct Speakers {
    /// The stream ids last reported, in order.
    reported: Vec<Arc<str>>,
    next_tick: Option<Instant>,
}

impl Speakers {
    /// A level arrived: make sure a tick is due.
    pub fn wake(&mut self, now: Instant) {
        if self.next_tick.is_none() {
            self.next_tick = Some(now + TICK);
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_tick
    }

    /// If a tick is due, close every track's window; returns the new list when it differs from
    /// the last one reported. `tracks` yields (participant, stream, level) of the room's audio.
    pub fn tick<'a>(
        &mut self,
        now: Instant,
        tracks: impl Iterator<Item = (&'a Arc<str>, &'a Arc<str>, &'a mut AudioLevel)>,
    ) -> Option<Vec<Listed>> {
        if self.next_tick.is_none_or(|t| now < t) {
            return None;
        }
        let mut listed = Vec::new();
        let mut busy = false;
        for (participant_id, stream_id, level) in tracks {
            if level.tick(now) {
                listed.push(Listed {
                    participant_id: Arc::clone(participant_id),
                    stream_id: Arc::clone(stream_id),
                    level: level.smoothed,
                });
            }
            busy |= level.busy(now);
        }
        self.next_tick = busy.then(|| now + TICK);
        listed.sort_by(|a, b| b.level.total_cmp(&a.level).then_with(|| a.stream_id.cmp(&b.stream_id)));
        let same =
            listed.len() == self.reported.len() && listed.iter().zip(&self.reported).all(|(l, r)| l.stream_id == *r);
        if same {
            return None;
        }
        self.reported = listed.iter().map(|l| Arc::clone(&l.stream_id)).collect();
        Some(listed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Room {
        tracks: Vec<(Arc<str>, Arc<str>, AudioLevel)>,
        speakers: Speakers,
    }

    impl Room {
        fn new(n: usize) -> Self {
            let tracks =
                (0..n).map(|i| (Arc::from(format!("p{i}")), Arc::from(format!("st{i}")), AudioLevel::default()));
            Self { tracks: tracks.collect(), speakers: Speakers::default() }
        }
        /// 200 ms of 20 ms packets at these levels (None: no packets).
        fn window(&mut self, now: Instant, levels: &[Option<i8>]) -> Option<Vec<String>> {
            for (t, l) in self.tracks.iter_mut().zip(levels) {
                if let Some(l) = l {
                    for _ in 0..10 {
                        t.2.observe(*l);
                    }
                    self.speakers.wake(now);
                }
            }
            let at = now + TICK;
            let list = self.speakers.tick(at, self.tracks.iter_mut().map(|(p, s, l)| (&*p, &*s, l)))?;
            Some(list.into_iter().map(|l| l.stream_id.to_string()).collect())
        }
    }

    #[test]
    fn only_the_loud_track_is_listed_and_reported_once() {
        let mut room = Room::new(2);
        let t0 = Instant::now();
        assert_eq!(room.window(t0, &[Some(-20), Some(-127)]), Some(vec!["st0".to_owned()]));
        for i in 1..5 {
            assert_eq!(room.window(t0 + TICK * i, &[Some(-20), Some(-127)]), None, "unchanged: not repeated");
        }
    }

    #[test]
    fn the_loudest_comes_first_and_a_pause_is_held() {
        let mut room = Room::new(2);
        let t0 = Instant::now();
        assert_eq!(room.window(t0, &[Some(-40), Some(-10)]), Some(vec!["st1".to_owned(), "st0".to_owned()]));
        // st1 stops: still listed through the hold (1 s = 5 windows), then dropped.
        let mut dropped_at = None;
        for i in 1..10 {
            if let Some(list) = room.window(t0 + TICK * i, &[Some(-40), Some(-127)]) {
                if list == ["st0"] {
                    dropped_at = Some(i);
                    break;
                }
            }
        }
        let i = dropped_at.expect("the quiet speaker is dropped");
        assert!((4..=6).contains(&i), "dropped after the hold, at window {i}");
    }

    #[test]
    fn silence_reports_an_empty_list_and_stops_ticking() {
        let mut room = Room::new(1);
        let t0 = Instant::now();
        assert_eq!(room.window(t0, &[Some(-30)]), Some(vec!["st0".to_owned()]));
        let mut last = None;
        for i in 1..12 {
            if let Some(list) = room.window(t0 + TICK * i, &[None]) {
                last = Some(list);
            }
        }
        assert_eq!(last, Some(vec![]), "an empty list once the hold is over");
        assert_eq!(room.speakers.poll_timeout(), None, "nothing left to compute: no more wake-ups");
    }

    #[test]
    fn a_few_loud_packets_are_not_speech() {
        let mut room = Room::new(1);
        let t0 = Instant::now();
        room.tracks[0].2.observe(-10);
        room.tracks[0].2.observe(-10);
        room.speakers.wake(t0);
        let list = room.speakers.tick(t0 + TICK, room.tracks.iter_mut().map(|(p, s, l)| (&*p, &*s, l)));
        assert_eq!(list, None);
    }
}
