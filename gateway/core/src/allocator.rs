//! The bandwidth allocator: given a subscriber's bandwidth estimate and its video tracks'
//! layers, the layer for each track (or none: video paused), and the bitrate to ask the
//! estimator to probe for. Pure, so it is unit tested on its own.
//!
//! Layers are ranked by measured bitrate, not by rid names: browsers name them freely ("q/h/f",
//! "l/m/h", "0/1/2") and order them either way in the SDP.

use std::time::Duration;

/// One video track of a subscriber, as the allocator sees it.
#[derive(Debug, Clone)]
pub struct TrackChoice {
    /// Bitrates of the layers it may use, lowest first (already capped at the subscriber's
    /// preferred layer). A layer whose rate is not known yet counts as 0.
    pub rates: Vec<u64>,
    /// Position in `rates` of the layer it receives now (`None`: paused or not started).
    pub current: Option<usize>,
    /// It may move up (the hold time since its last move down has passed).
    pub may_go_up: bool,
}

/// Up-switches need the estimate to exceed what the higher layers need by this factor, so an
/// estimate hovering at a layer's rate does not flap between two layers.
pub const UP_HEADROOM: f64 = 1.15;

/// Pausing video is drastic and estimates are noisy (random loss alone pulls a delay/loss
/// estimator down): a simulcast track keeps its lowest layer until the estimate falls below this
/// share of what that layer needs.
pub const PAUSE_BELOW: f64 = 0.75;

/// A track with one layer to offer (no simulcast, or capped at its lowest by `set_layer`) has
/// nothing lower to fall back to: pausing it blanks the picture. It keeps flowing until the
/// estimate falls below this share of its rate, and (the caller's part, [`SINGLE_PAUSE_AFTER`])
/// stays there for a while. Seen with Chromium on a clean loopback path: the estimate dipped
/// below a non-simulcast stream's rate for a moment and the gateway paused the only layer.
pub const SINGLE_PAUSE_BELOW: f64 = 0.5;

/// How long a single-layer track must have been starved (below [`SINGLE_PAUSE_BELOW`]) before it
/// pauses.
pub const SINGLE_PAUSE_AFTER: Duration = Duration::from_secs(5);

/// The estimator is asked to find this much more than the best layers need, so probing can
/// prove the headroom an up-switch waits for ([`UP_HEADROOM`]) plus a margin for rate noise.
pub const DESIRED_HEADROOM: f64 = 1.25;

/// The bitrate a subscriber would use with the best layers it may receive: audio plus, per
/// video track, the highest layer it may get (the last of `rates`), with [`DESIRED_HEADROOM`]
/// over the video. `None` while no video rate is known (nothing measured yet).
pub fn desired_bitrate(audio_bps: u64, tracks: &[TrackChoice]) -> Option<u64> {
    let video: u64 = tracks.iter().filter_map(|t| t.rates.last()).sum();
    (video > 0).then(|| audio_bps + (video as f64 * DESIRED_HEADROOM) as u64)
}

/// Choose a layer for each video track within `budget` bits/s (`None`: no estimate, take the
/// best). Every track first gets its lowest layer while they fit, in order; then tracks move up
/// one layer at a time, round-robin, while the total fits. Hysteresis: a track moves up from
/// its current layer only if the allocation still holds with `UP_HEADROOM` and `may_go_up`; it
/// moves down as soon as the budget cannot carry it.
pub fn allocate(budget: Option<u64>, tracks: &[TrackChoice]) -> Vec<Option<usize>> {
    let Some(budget) = budget else {
        return tracks.iter().map(|t| t.rates.len().checked_sub(1)).collect();
    };
    let relaxed = greedy(budget as f64, tracks);
    let strict = greedy(budget as f64 / UP_HEADROOM, tracks);
    let lenient = greedy(budget as f64 / PAUSE_BELOW, tracks);
    let lenient_single = greedy(budget as f64 / SINGLE_PAUSE_BELOW, tracks);
    tracks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let cur = t.current.filter(|c| *c < t.rates.len());
            let nearly = if t.rates.len() == 1 { lenient_single[i] } else { lenient[i] };
            match (cur, relaxed[i], strict[i]) {
                // Not even the lowest layer fits, but nearly: keep it rather than pause.
                (Some(_), None, _) if nearly.is_some() => Some(0),
                // The current layer no longer fits: down (or paused).
                (Some(c), r, _) if r.is_none_or(|r| r < c) => r,
                // Starting (or resuming): what fits without headroom is fine.
                (None, r, _) if t.may_go_up => r,
                // Up only with headroom and once the hold time has passed.
                (c, _, s) if t.may_go_up && s > c => s,
                (c, _, _) => c,
            }
        })
        .collect()
}

fn greedy(budget: f64, tracks: &[TrackChoice]) -> Vec<Option<usize>> {
    let mut left = budget;
    let mut choice: Vec<Option<usize>> = vec![None; tracks.len()];
    for (i, t) in tracks.iter().enumerate() {
        if let Some(&r) = t.rates.first() {
            if (r as f64) <= left {
                choice[i] = Some(0);
                left -= r as f64;
            }
        }
    }
    loop {
        let mut moved = false;
        for (i, t) in tracks.iter().enumerate() {
            let Some(c) = choice[i] else { continue };
            let Some(&next) = t.rates.get(c + 1) else { continue };
            let extra = next.saturating_sub(t.rates[c]) as f64;
            if extra <= left {
                choice[i] = Some(c + 1);
                left -= extra;
                moved = true;
            }
        }
        if !moved {
            return choice;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(rates: &[u64], current: Option<usize>) -> TrackChoice {
        TrackChoice { rates: rates.to_vec(), current, may_go_up: true }
    }

    const SIMULCAST: [u64; 3] = [150_000, 500_000, 1_500_000];

    #[test]
    fn no_estimate_takes_the_best() {
        assert_eq!(allocate(None, &[t(&SIMULCAST, None), t(&[300_000], Some(0))]), vec![Some(2), Some(0)]);
    }

    #[test]
    fn the_estimate_picks_the_highest_layer_that_fits() {
        assert_eq!(allocate(Some(2_000_000), &[t(&SIMULCAST, None)]), vec![Some(2)]);
        assert_eq!(allocate(Some(700_000), &[t(&SIMULCAST, None)]), vec![Some(1)]);
        assert_eq!(allocate(Some(200_000), &[t(&SIMULCAST, None)]), vec![Some(0)]);
        // Not even the lowest: paused.
        assert_eq!(allocate(Some(100_000), &[t(&SIMULCAST, None)]), vec![None]);
        // A video already flowing pauses only well below its lowest layer's needs.
        assert_eq!(allocate(Some(130_000), &[t(&SIMULCAST, Some(0))]), vec![Some(0)]);
        assert_eq!(allocate(Some(100_000), &[t(&SIMULCAST, Some(0))]), vec![None]);
    }

    #[test]
    fn a_single_layer_pauses_only_far_below_its_rate() {
        // 400 kbit/s and nothing lower: kept down to half its rate (the caller adds the time).
        assert_eq!(allocate(Some(250_000), &[t(&[400_000], Some(0))]), vec![Some(0)]);
        assert_eq!(allocate(Some(190_000), &[t(&[400_000], Some(0))]), vec![None]);
        // Starting (or resuming) still needs the whole rate.
        assert_eq!(allocate(Some(390_000), &[t(&[400_000], None)]), vec![None]);
        assert_eq!(allocate(Some(400_000), &[t(&[400_000], None)]), vec![Some(0)]);
        // The lowest of several layers keeps the stricter rule: there is a layer to come back on.
        assert_eq!(allocate(Some(100_000), &[t(&SIMULCAST, Some(0))]), vec![None]);
    }

    #[test]
    fn the_desired_bitrate_is_the_best_layers_with_headroom_and_no_floor() {
        assert_eq!(desired_bitrate(40_000, &[t(&SIMULCAST, Some(0))]), Some(40_000 + 1_875_000));
        // Capped by set_layer at the middle layer: only what that needs.
        assert_eq!(desired_bitrate(0, &[t(&SIMULCAST[..2], Some(0)), t(&[200_000], None)]), Some(875_000));
        // A small stream asks for little (no floor at the initial estimate).
        assert_eq!(desired_bitrate(0, &[t(&[100_000], Some(0))]), Some(125_000));
        assert_eq!(desired_bitrate(40_000, &[t(&[0], None)]), None, "nothing measured yet");
    }

    #[test]
    fn moving_up_needs_headroom_moving_down_does_not() {
        // 1.6 Mbit/s carries the top layer, but not with 15% headroom: stay at the middle.
        assert_eq!(allocate(Some(1_600_000), &[t(&SIMULCAST, Some(1))]), vec![Some(1)]);
        assert_eq!(allocate(Some(1_800_000), &[t(&SIMULCAST, Some(1))]), vec![Some(2)]);
        // On the top layer, 1.6 Mbit/s still carries it: stay; 1.4 does not: down.
        assert_eq!(allocate(Some(1_600_000), &[t(&SIMULCAST, Some(2))]), vec![Some(2)]);
        assert_eq!(allocate(Some(1_400_000), &[t(&SIMULCAST, Some(2))]), vec![Some(1)]);
        // Inside the hold time: no move up even with plenty.
        let held = TrackChoice { may_go_up: false, ..t(&SIMULCAST, Some(0)) };
        assert_eq!(allocate(Some(9_000_000), &[held]), vec![Some(0)]);
    }

    #[test]
    fn tracks_share_the_budget_lowest_layers_first() {
        let two = [t(&SIMULCAST, None), t(&SIMULCAST, None)];
        assert_eq!(allocate(Some(350_000), &two), vec![Some(0), Some(0)]);
        assert_eq!(allocate(Some(1_100_000), &two), vec![Some(1), Some(1)]);
        // Only one track's lowest layer fits: the second pauses, the first keeps video.
        assert_eq!(allocate(Some(200_000), &two), vec![Some(0), None]);
    }
}
