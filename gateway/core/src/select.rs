//! The layer selector: for one publisher packet and one subscriber track, what to do with it —
//! decided before anything is written, as a plain value (`fan_out` carries it out). A pure
//! function of the subscriber's state and the packet, so every rule is a row in a table test.

/// What happens to one packet for one subscriber track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The subscriber's layer and source: rewrite and write.
    Forward,
    /// Take this packet's source from here on (rebase sequence numbers, timestamps and picture
    /// numbering), then write it: a video start or layer switch at a keyframe, or audio from a
    /// publisher that restarted its stream. `layer_change`: it replaces another layer.
    Switch { layer_change: bool },
    /// Start the track from the layer's cached group of pictures, which ends with this packet.
    StartFromCache,
    /// Not written, and why.
    Drop(Why),
}

/// Why a packet is not written to a subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Another layer than the one the subscriber receives or is switching to.
    OtherLayer,
    /// The subscriber waits for this layer and this is not a keyframe's first packet: a decoder
    /// cannot start on (or change streams at) a delta frame.
    WaitingForKeyframe,
    /// The subscriber's own layer restarted its stream (a new SSRC): it needs a keyframe of it.
    SourceRestarted,
}

/// The subscriber side of the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownState {
    /// The layer being forwarded now (`None`: nothing yet, or paused).
    pub current: Option<usize>,
    /// The layer to receive (`None`: paused or not chosen).
    pub target: Option<usize>,
    /// The packet's source (SSRC) is the one the outgoing stream takes packets from now.
    pub same_source: bool,
}

/// The packet side of the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub video: bool,
    /// The publisher layer it belongs to.
    pub layer: usize,
    /// It is the first packet of a keyframe (and the newest of its layer: one that came late
    /// follows the rest of its frame, which went by).
    pub keyframe: bool,
}

/// Decide. `cache_ready` says whether the layer's keyframe cache holds a whole group of pictures
/// (asked only when a subscriber starts and the cache is on).
pub fn select(down: DownState, p: Packet, cache_on: bool, cache_ready: impl FnOnce() -> bool) -> Verdict {
    if !p.video {
        // Audio has no layers; a new SSRC continues the same outgoing stream.
        return if down.same_source { Verdict::Forward } else { Verdict::Switch { layer_change: false } };
    }
    if down.current == Some(p.layer) && down.same_source {
        return Verdict::Forward;
    }
    if down.target != Some(p.layer) {
        return Verdict::Drop(Why::OtherLayer);
    }
    if down.current.is_none() && cache_on && cache_ready() {
        return Verdict::StartFromCache;
    }
    if !p.keyframe {
        return Verdict::Drop(if down.current == Some(p.layer) {
            Why::SourceRestarted
        } else {
            Why::WaitingForKeyframe
        });
    }
    Verdict::Switch { layer_change: down.current.is_some_and(|c| c != p.layer) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn down(current: Option<usize>, target: Option<usize>, same_source: bool) -> DownState {
        DownState { current, target, same_source }
    }
    const fn video(layer: usize, keyframe: bool) -> Packet {
        Packet { video: true, layer, keyframe }
    }

    #[test]
    fn the_rules_as_a_table() {
        use Verdict::*;
        use Why::*;
        let rows: &[(DownState, Packet, bool, bool, Verdict, &str)] = &[
            (down(Some(1), Some(1), true), video(1, false), false, false, Forward, "its own layer"),
            (down(Some(1), Some(1), true), video(1, true), true, true, Forward, "a keyframe of its own layer"),
            (down(Some(1), Some(1), true), video(0, true), false, false, Drop(OtherLayer), "another layer"),
            (
                down(Some(1), Some(2), true),
                video(2, false),
                false,
                false,
                Drop(WaitingForKeyframe),
                "switching: a delta frame of the target",
            ),
            (
                down(Some(1), Some(2), true),
                video(2, true),
                false,
                false,
                Switch { layer_change: true },
                "switching: the target's keyframe",
            ),
            (down(Some(1), Some(2), true), video(1, false), false, false, Forward, "the old layer until the switch"),
            (
                down(None, Some(0), false),
                video(0, false),
                false,
                false,
                Drop(WaitingForKeyframe),
                "starting: a delta frame",
            ),
            (
                down(None, Some(0), false),
                video(0, true),
                false,
                false,
                Switch { layer_change: false },
                "starting: a keyframe",
            ),
            (down(None, Some(0), false), video(0, false), true, true, StartFromCache, "starting from a whole cache"),
            (
                down(None, Some(0), false),
                video(0, false),
                true,
                false,
                Drop(WaitingForKeyframe),
                "the cache is not whole",
            ),
            (down(Some(0), Some(0), true), video(0, false), true, true, Forward, "the cache only starts tracks"),
            (
                down(Some(0), Some(0), false),
                video(0, false),
                false,
                false,
                Drop(SourceRestarted),
                "its layer restarted: wait",
            ),
            (
                down(Some(0), Some(0), false),
                video(0, true),
                false,
                false,
                Switch { layer_change: false },
                "its layer restarted: the keyframe",
            ),
            (down(None, None, false), video(0, true), true, true, Drop(OtherLayer), "paused"),
            (
                down(Some(0), None, true),
                video(0, true),
                false,
                false,
                Forward,
                "pausing waits for the allocator to clear current",
            ),
        ];
        for (d, p, cache_on, ready, want, what) in rows {
            assert_eq!(select(*d, *p, *cache_on, || *ready), *want, "{what}");
        }
        let audio =
            |same| select(down(None, None, same), Packet { video: false, layer: 0, keyframe: false }, false, || false);
        assert_eq!(audio(true), Forward, "audio of the same source");
        assert_eq!(audio(false), Switch { layer_change: false }, "audio from a restarted source");
    }

    #[test]
    fn the_cache_is_looked_at_only_when_a_track_starts() {
        let mut asked = 0;
        select(down(Some(0), Some(0), true), video(0, true), true, || {
            asked += 1;
            true
        });
        select(down(Some(0), Some(1), true), video(1, true), true, || {
            asked += 1;
            true
        });
        assert_eq!(asked, 0);
    }
}
