//! Sans-IO SFU core. No sockets, no clock, no tokio: the driver feeds it commands, datagrams
//! and `Instant`s and carries out what it returns (datagrams, events, the next wake-up), in the
//! shape of `str0m::Rtc` itself.
//!
//! Layout:
//! - `engine`: [`Engine`], one per media worker: rooms, tracks, forwarding, renegotiation,
//!   keyframe relay, connection deadlines.
//! - `connection`: one WebRTC connection (`str0m::Rtc` + state machine + subscriber tracks).
//! - `keyframe`: merging/throttling of keyframe requests per publisher stream.
//! - `layers`: a published track's encodings (simulcast layers), their bitrates, unrepaired
//!   losses and (optionally) cached group of pictures, and the choice of layer per subscriber
//!   from its bandwidth estimate.
//! - `rewrite`: per-subscriber sequence number rewriting.
//! - `sdp`: SDP text helpers (counting sections, narrowing a section's codecs).
//! - `descriptor`: per-subscriber VP8/VP9 picture numbering, continuous across layer switches.
//! - `sim` (feature `sim`): the engine and str0m client peers on a virtual clock over a seeded,
//!   lossy in-memory network, for scenario tests, fuzzing and benchmarks.

mod connection;
pub mod descriptor;
mod engine;
pub mod keyframe;
pub mod layers;
pub mod rewrite;
pub mod sdp;
#[cfg(any(test, feature = "sim"))]
pub mod sim;

use std::net::SocketAddr;
use std::time::Duration;

pub use connection::{ConnStats, LayerInUse, MediaStats};
pub use engine::{Engine, NewConnection};
pub use signaling_api::events::MediaEvent;
pub use signaling_api::protocol::{ErrorCode, EventKind};

/// Identifies a connection inside one engine; the driver picks it (it names the socket too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey(pub u64);

/// Policy knobs of the core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// At most one keyframe request per publisher stream per this interval.
    pub keyframe_throttle: Duration,
    /// INITIAL → GATHERED must happen within this (an offer left unanswered).
    pub negotiation_timeout: Duration,
    /// GATHERED → READY (ICE + DTLS) must happen within this.
    pub connect_timeout: Duration,
    /// A READY connection whose peer is silent (not even ICE consent checks) or whose ICE is
    /// disconnected this long FAILS.
    pub disconnect_grace: Duration,
    /// How often str0m reports statistics.
    pub stats_interval: Duration,
    /// Most `m=` sections a publish offer may have (each becomes a track every subscriber is
    /// offered).
    pub max_media_sections: usize,
    /// Log participants' IP addresses at info level (otherwise only at debug).
    pub log_client_ips: bool,
    /// A keyframe the gateway asked for (new subscriber, layer switch, unrecoverable loss) that
    /// has not arrived after this is asked for again.
    pub keyframe_retry: Duration,
    /// Estimate each subscriber's bandwidth (TWCC, str0m's estimator and pacer) and choose its
    /// simulcast layers, or pause its video, by it.
    pub bwe: bool,
    /// The estimate a subscriber starts from, bits/s.
    pub bwe_initial_bps: u64,
    /// After a subscriber's layer moved down, it moves up again only after this long.
    pub layer_up_hold: Duration,
    /// Keep each video layer's packets since its last keyframe and start a new subscriber on
    /// them at once (timestamps compressed into a burst) instead of asking the publisher for a
    /// keyframe.
    pub keyframe_cache: bool,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            keyframe_throttle: Duration::from_millis(500),
            negotiation_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            disconnect_grace: Duration::from_secs(10),
            stats_interval: Duration::from_secs(1),
            max_media_sections: 16,
            log_client_ips: false,
            keyframe_retry: Duration::from_millis(500),
            bwe: true,
            bwe_initial_bps: 1_000_000,
            layer_up_hold: Duration::from_secs(2),
            keyframe_cache: false,
        }
    }
}

/// A refused command, with the contract's error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct CoreError {
    pub code: ErrorCode,
    pub message: String,
}

/// What the driver must do.
#[derive(Debug)]
pub enum Output {
    /// Send a datagram from the connection's socket.
    Transmit { key: ConnKey, destination: SocketAddr, contents: Vec<u8> },
    /// Report to the control plane.
    Event(MediaEvent),
    /// The connection ended; its socket and port can be released (after earlier transmits).
    Closed { key: ConnKey, connection_id: String },
}

/// Running totals of one engine, for metrics.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub rtp_packets_in: [u64; 2],
    pub rtp_bytes_in: [u64; 2],
    pub rtp_packets_out: [u64; 2],
    pub rtp_bytes_out: [u64; 2],
    /// Keyframe requests by kind (`[PLI, FIR]`): from subscribers, sent to publishers, and
    /// subscriber requests merged into a later request by the throttle.
    pub keyframe_requests_in: [u64; 2],
    pub keyframe_requests_out: [u64; 2],
    pub keyframe_requests_throttled: [u64; 2],
    /// Publisher packets lost for good (NACK did not repair them in time).
    pub unrecoverable_losses: u64,
    /// Simulcast layer switches (not counting a subscriber's first layer).
    pub layer_switches: u64,
    /// Subscriber tracks paused because not even the lowest layer fit the estimate.
    pub video_pauses: u64,
    /// Subscriber tracks started from the keyframe cache, and the packets replayed for them.
    pub keyframe_cache_starts: u64,
    pub keyframe_cache_packets: u64,
    /// NACKs received from subscribers / sent to publishers (from str0m's stats).
    pub nacks_in: u64,
    pub nacks_out: u64,
    /// Packets resent to subscribers from str0m's buffer.
    pub retransmitted_packets: u64,
    /// Subscriber tracks rejected because the subscriber cannot decode the publication's codec.
    pub codec_unsupported: u64,
    pub garbage_datagrams: u64,
    pub untrusted_datagrams: u64,
    pub failed: u64,
}

impl Counters {
    fn count_in(&mut self, video: bool, bytes: u64) {
        self.rtp_packets_in[usize::from(video)] += 1;
        self.rtp_bytes_in[usize::from(video)] += bytes;
    }
    fn count_out(&mut self, video: bool, bytes: u64) {
        self.rtp_packets_out[usize::from(video)] += 1;
        self.rtp_bytes_out[usize::from(video)] += bytes;
    }
}
