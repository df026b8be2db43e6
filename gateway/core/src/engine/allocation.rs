//! Layer choice per subscriber from its bandwidth estimate and `set_layer`, and steering of
//! str0m's estimator (desired bitrate, probes).

use super::*;

/// A subscriber's bandwidth estimate is a guess until feedback has flowed this long; it does not
/// pause video before then.
pub(super) const BWE_WARMUP: std::time::Duration = std::time::Duration::from_secs(3);

/// How often every subscriber's layers are chosen again (layer bitrates change, layers stop).
pub(super) const REALLOCATE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// While a subscriber is held below its best layers by its estimate, its estimator is asked to
/// probe at most this often.
pub(super) const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Ask for a subscriber's layers to be chosen again (once, however often it is asked).
pub(super) fn queue_reallocation(queue: &mut Vec<ConnKey>, key: ConnKey) {
    if !queue.contains(&key) {
        queue.push(key);
    }
}

/// Tell str0m's estimator what the subscriber's best layers need (it probes toward it; no floor,
/// so a small stream does not probe for bandwidth it will never use), and while the estimate
/// holds a track below its best layer (`fits`: what it allows), ask for a probe every
/// [`PROBE_EVERY`]. Without one, a subscriber whose link cleared waited for str0m's own periodic
/// probe (every 5 s) and then the hold time; and after congestion str0m's estimate was seen to
/// keep sinking for seconds on a clean link until a probe lifted it.
pub(super) fn steer_estimator(
    now: Instant,
    conn: &mut Conn,
    audio_bps: u64,
    choices: &[TrackChoice],
    fits: &[Option<usize>],
    warming_up: bool,
    initial_bps: u64,
) {
    let Conn { rtc, side: Side::Subscribe(sub), .. } = conn else { return };
    // Until a layer's rate is measured (its first 500 ms), the initial estimate stands in, so
    // str0m's initial probing is not held back.
    let desired = desired_bitrate(audio_bps, choices).unwrap_or(initial_bps);
    // Small changes (rates are measured, so they wobble) are not worth telling: every increase
    // above the estimate asks for a probe.
    let changed = sub.bwe_desired.is_none_or(|d| desired.abs_diff(d) * 10 > d);
    let held_below = choices.iter().zip(fits).any(|(c, p)| c.may_go_up && p.is_none_or(|p| p + 1 < c.rates.len()));
    let short = sub.bandwidth().is_some_and(|b| b < desired);
    let probe = !warming_up && held_below && short && sub.next_probe.is_none_or(|t| now >= t);
    if probe {
        // str0m probes when the desired bitrate rises above the estimate; lower it for one of
        // its timeouts first so raising it again counts as a rise.
        rtc.bwe().set_bitrate(Bitrate::ZERO, Bitrate::bps(desired / 2));
        let _ = rtc.handle_input(Input::Timeout(now));
        sub.next_probe = Some(now + PROBE_EVERY);
    }
    if changed || probe {
        sub.bwe_desired = Some(desired);
        rtc.bwe().set_bitrate(Bitrate::ZERO, Bitrate::bps(desired));
        if probe {
            let _ = rtc.handle_input(Input::Timeout(now));
        }
    }
}

impl Engine {
    /// Change which layer a subscriber prefers for one of its video tracks (`None`: the best the
    /// bandwidth allows). The switch happens at the next keyframe of that layer.
    pub fn set_layer(
        &mut self,
        now: Instant,
        connection_id: &str,
        stream_id: &str,
        rid: Option<&str>,
    ) -> Result<(), MediaError> {
        let key = self.key_of(connection_id)?;
        let conn = conn_mut(&mut self.conns, key)?;
        if conn.role() != Role::Subscribe {
            return Err(err(ErrorCode::BadRequest, "set_layer is for subscribe connections"));
        }
        let room_id = Arc::clone(&conn.room);
        let Some(out) = conn.outs_mut().iter_mut().find(|o| &*o.stream_id == stream_id && !o.stopped) else {
            return Err(err(ErrorCode::NotFound, "this connection does not receive that stream"));
        };
        if out.kind != MediaKind::Video {
            return Err(err(ErrorCode::BadRequest, "layers exist for video streams only"));
        }
        let track = self.rooms.get(&room_id).and_then(|r| r.tracks.iter().find(|t| &*t.stream_id == stream_id));
        let preferred = match (rid, track) {
            (None, _) => None,
            (Some(r), Some(t)) => {
                let found = t.layers.iter().find_map(|l| l.rid.filter(|x| x.to_string() == r));
                if found.is_none() {
                    let names: Vec<String> = t.layers.iter().filter_map(|l| l.rid.map(|x| x.to_string())).collect();
                    return Err(err(
                        ErrorCode::BadRequest,
                        if names.is_empty() {
                            "the stream is not simulcast; it has no layers to choose".to_owned()
                        } else {
                            format!("unknown layer {r:?}; the stream has {}", names.join(", "))
                        },
                    ));
                }
                found
            }
            (Some(_), None) => return Err(err(ErrorCode::NotFound, "stream not found")),
        };
        out.preferred = preferred;
        // An explicit choice is not held back by the hysteresis of automatic moves.
        out.last_down = None;
        self.reallocate(now, key);
        self.process(now);
        Ok(())
    }

    /// Choose the layer of each of a subscriber's video tracks: the best the bandwidth estimate
    /// carries (with hysteresis), up to the subscriber's preferred layer; none (video paused,
    /// audio continues) when not even the lowest fits. A new target is asked a keyframe of;
    /// the switch itself happens in [`Self::forward`].
    pub(super) fn reallocate(&mut self, now: Instant, sub_key: ConnKey) {
        let Self { rooms, conns, q, counters, cfg, overload, .. } = self;
        let Some(sub) = conns.get_mut(&sub_key) else { return };
        if sub.role() != Role::Subscribe || sub.state.is_terminal() {
            return;
        }
        let slot = sub.sub().map_or(0, |s| s.shed_slot);
        let Some(room) = rooms.get_mut(&sub.room) else { return };
        let mut audio_bps = 0;
        let mut choices = Vec::new();
        let mut ranked_of = Vec::new();
        for (oi, o) in sub.outs().iter().enumerate() {
            if !o.live || o.stopped {
                continue;
            }
            let Some(track) = room.tracks.iter().find(|t| t.stream_id == o.stream_id) else { continue };
            if o.kind != MediaKind::Video {
                audio_bps += track.layers.iter().map(|l| l.rate.bps()).sum::<u64>();
                continue;
            }
            let mut ranked = track.ranked(now);
            if ranked.is_empty() {
                // Nothing has been sent yet: nothing to choose (the first packet chooses again).
                continue;
            }
            // Capped at the preferred layer while it flows; if it stopped, what flows is offered.
            if let Some(pos) = ranked.iter().position(|&i| o.preferred.is_some() && track.layers[i].rid == o.preferred)
            {
                ranked.truncate(pos + 1);
            }
            let rates = ranked.iter().map(|&i| track.layers[i].rate.bps()).collect();
            // The allocator's own last choice (before an overload cap).
            let current = o.natural.and_then(|t| ranked.iter().position(|&i| i == t));
            let may_go_up = o.last_down.is_none_or(|t| now.saturating_duration_since(t) >= cfg.layer_up_hold);
            choices.push(TrackChoice { rates, current, may_go_up });
            ranked_of.push((oi, ranked));
        }
        let budget = if cfg.bwe { sub.bandwidth().map(|b| b.saturating_sub(audio_bps)) } else { None };
        let mut picks = allocate(budget, &choices);
        // What the estimate alone allows, before the rules below keep video flowing.
        let fits = picks.clone();
        let warming_up = sub.ready_at.is_none_or(|t| now.saturating_duration_since(t) < BWE_WARMUP);
        for ((oi, _), (p, c)) in ranked_of.iter().zip(picks.iter_mut().zip(&choices)) {
            let out = &mut sub.outs_mut()[*oi];
            if p.is_some() || c.rates.is_empty() {
                out.starved_since = None;
            } else if warming_up {
                // The estimate is still the initial guess, not a measurement: start with the
                // lowest layer rather than pause.
                *p = Some(0);
            } else if c.rates.len() == 1 && out.target.is_some() {
                // The only layer: paused only when starved for a while, not on a dip.
                let since = *out.starved_since.get_or_insert(now);
                if now.saturating_duration_since(since) < SINGLE_PAUSE_AFTER {
                    *p = Some(0);
                }
            }
        }
        let mut wanted = Vec::new();
        for ((oi, ranked), pick) in ranked_of.iter().zip(picks.iter()) {
            let out = &mut sub.outs_mut()[*oi];
            out.natural = pick.map(|p| ranked[p]);
            out.lowest = ranked.first().copied();
            // An overloaded worker caps it: the lowest layer only, or no video for this
            // subscriber's quarter (`overload`). Not a move down for the hold time: video comes
            // back as soon as the level falls.
            let capped = if *overload > crate::overload::last_level_with_video(slot) {
                None
            } else if *overload >= 1 {
                pick.map(|_| 0)
            } else {
                *pick
            };
            let shed = capped != *pick;
            let new_target = capped.map(|p| ranked[p]);
            if new_target == out.target {
                continue;
            }
            let old_pos = out.target.and_then(|t| ranked.iter().position(|&i| i == t));
            if !shed && (new_target.is_none() || (old_pos.is_some() && capped < old_pos)) {
                out.last_down = Some(now);
            }
            if new_target.is_none() && out.current.is_some() && !shed {
                counters.video_pauses += 1;
                out.current = None;
            }
            // Shed: `current` stays until the frame in flight has gone out (`fan_out`).
            out.target = new_target;
            if let Some(t) = new_target.filter(|t| out.current != Some(*t)) {
                wanted.push((Arc::clone(&out.stream_id), t));
            }
        }
        if sub.state == ConnectionState::Ready {
            // Still waiting for a keyframe of the target (e.g. the one asked for at the answer
            // arrived before READY and could not be used): ask again, merged by the throttle.
            for o in sub.outs().iter().filter(|o| o.live && !o.stopped && o.kind == MediaKind::Video) {
                if let Some(t) = o.target.filter(|t| o.current != Some(*t)) {
                    if !wanted.iter().any(|(s, l)| *s == o.stream_id && *l == t) {
                        wanted.push((Arc::clone(&o.stream_id), t));
                    }
                }
            }
        }
        if sub.state != ConnectionState::Ready {
            // A keyframe now would arrive before the subscriber can take it; READY asks.
            wanted.clear();
        }
        if cfg.bwe {
            steer_estimator(now, sub, audio_bps, &choices, &fits, warming_up, cfg.bwe_initial_bps);
        }
        sub.drain(now, q);
        let starting: Vec<bool> =
            wanted.iter().map(|(s, _)| sub.outs().iter().any(|o| o.stream_id == *s && o.current.is_none())).collect();
        for ((stream_id, li), starting) in wanted.into_iter().zip(starting) {
            if let Some(track) = room.tracks.iter_mut().find(|t| t.stream_id == stream_id) {
                if !(starting && cached(cfg, track, li)) {
                    want_keyframe(now, track, li, conns, q, counters);
                }
            }
        }
    }
}
