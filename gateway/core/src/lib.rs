//! Sans-IO SFU core. No sockets, no clock, no tokio: the driver feeds it commands, datagrams
//! and `Instant`s and carries out what it returns (datagrams, events, the next wake-up), in the
//! shape of `str0m::Rtc` itself.
//!
//! Layout:
//! - `engine`: [`Engine`], one per media worker: the front (commands, `handle_*`, `poll_*`,
//!   deadlines) in `engine/mod.rs`, and one file per job — `track` (receive side of a published
//!   track), `negotiation` (SDP, renegotiation), `forward` (the packet's path), `keyframes`
//!   (keyframe policy), `allocation` (layer choice, bandwidth steering), `stats`.
//! - `connection`: one WebRTC connection (`str0m::Rtc` + state machine + its role's state).
//! - `downtrack`: a subscriber's copy of one published track (payload-type map, sequence,
//!   timestamp and picture renumbering, the write, the keyframe-cache replay).
//! - `keyframe`: merging/throttling of keyframe requests per publisher stream.
//! - `layers`: the receive side of a published track's encodings (simulcast layers): bitrates,
//!   unrepaired losses, keyframe throttle, the cached group of pictures.
//! - `allocator`: the choice of layer per subscriber track from its bandwidth estimate.
//! - `rewrite`: per-subscriber sequence number rewriting.
//! - `select`: the layer selector, a pure decision per packet and subscriber track.
//! - `sdp`: SDP text helpers (counting sections, narrowing a section's codecs).
//! - `descriptor`: per-subscriber VP8/VP9 picture numbering, continuous across layer switches.
//! - `engine/data.rs`: the data-channel relay (publishers' messages to every other
//!   participant's subscribe connection, with the sender's id, bounded in size and rate).
//! - `speakers`: active speakers from the audio-level header extension (per-track loudness
//!   windows, the room's ordered list).
//! - `sim` (feature `sim`): the engine and str0m client peers (the `test-peer` crate's) on a
//!   virtual clock over a seeded, lossy in-memory network, for scenario tests, fuzzing and
//!   benchmarks.

pub mod allocator;
mod connection;
pub mod descriptor;
mod downtrack;
mod engine;
pub mod keyframe;
pub mod layers;
pub mod overload;
pub mod rewrite;
pub mod sdp;
pub mod select;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod speakers;

use std::net::SocketAddr;
use std::time::Duration;

pub use str0m::net::Protocol;

pub use connection::{ConnStats, LayerInUse, MediaStats};
pub use engine::{Engine, NewConnection, Relay, RelayedPacket, TrackInfo};
pub use signaling_api::events::{ConnectionSpec, IceRestarted, MediaEvent};
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
    /// How long a subscriber's video stream keeps what it sent to answer NACKs (str0m's resend
    /// buffer; str0m's own default is 3 s). Audio streams keep nothing.
    pub rtx_history: Duration,
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
    /// Forwarded packets go straight from the write to an encrypted datagram when the
    /// subscriber's stream has nothing else waiting (str0m's `send_rtp_now`, vendored patch),
    /// with the `Rtc`'s timeout rounds when it asks and at least every `direct_round_every`.
    /// Off: each write is followed by a full poll of the subscriber's `Rtc` (the old path;
    /// kept to measure against).
    pub direct_send: bool,
    /// With `direct_send`: after packets sent straight out, the subscriber's `Rtc` gets a
    /// timeout round at least this often (str0m's own send path asks for one after every
    /// packet; its pacer and estimator adjust in them). The bandwidth scenarios give the
    /// figures of a round after every packet with 5, 10 or 20 ms. `None`: only when the `Rtc`
    /// asks (its own timeouts, every 25 ms or so): ~220 fewer instructions per forwarded
    /// packet, but the estimate climbed back more slowly after a dip in the scenarios
    /// (`docs/performance.md`). Not a config key.
    pub direct_round_every: Option<Duration>,
    /// Largest data-channel message relayed (payload plus label); larger ones are dropped.
    pub data_max_message_bytes: usize,
    /// Data-channel messages relayed per second per publisher (bursts of twice that); more
    /// are dropped.
    pub data_messages_per_second: u32,
    /// ICE-TCP (RFC 6544): the addresses of our passive TCP host candidates, offered beside the
    /// UDP one at a lower priority (empty: no TCP candidates). The driver owns the listener and
    /// the streams; the engine only names the candidates and takes the streams' frames.
    pub ice_tcp: Vec<SocketAddr>,
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
            rtx_history: Duration::from_secs(1),
            bwe: true,
            bwe_initial_bps: 1_000_000,
            layer_up_hold: Duration::from_secs(2),
            keyframe_cache: false,
            direct_send: true,
            direct_round_every: Some(Duration::from_millis(20)),
            data_max_message_bytes: 16 * 1024,
            data_messages_per_second: 50,
            ice_tcp: Vec::new(),
        }
    }
}

/// A refused command, with the contract's error code: the one error type of the media plane,
/// shared with the signaling API.
pub use signaling_api::events::MediaError;

/// What the driver must do.
#[derive(Debug)]
pub enum Output {
    /// Send a datagram from the connection's socket (`proto` UDP), or a frame on the
    /// connection's TCP stream to `destination` (`proto` TCP, ICE-TCP).
    Transmit { key: ConnKey, proto: Protocol, destination: SocketAddr, contents: Vec<u8> },
    /// Report to the control plane.
    Event(MediaEvent),
    /// The connection ended; its socket and port can be released (after earlier transmits).
    Closed { key: ConnKey, connection_id: String },
}

/// A change to the engine's index of our ICE username fragments, for a driver that finds a
/// connection's worker by ufrag outside the engine (ICE-TCP: one listener for every worker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UfragChange {
    Added(String),
    Removed(String),
}

/// Running totals of one engine, for metrics. [`Counters::samples`] names every field, so a
/// counter added here does not compile until it says which `/metrics` family it feeds.
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
    /// Publisher packets not forwarded because the app backend muted their track.
    pub moderated_drops: u64,
    /// Data-channel messages from publishers, and what became of them: written to subscribers
    /// (one per subscriber), dropped as too large, over the sender's rate, or because the
    /// subscriber's channel was not open or its send buffer full.
    pub data_received: u64,
    pub data_forwarded: u64,
    pub data_dropped_size: u64,
    pub data_dropped_rate: u64,
    pub data_dropped_full: u64,
    /// Datagrams on a shared socket (`media.mux`) that belong to no connection.
    pub unrouted_datagrams: u64,
    /// Video frames not sent to a subscriber because its worker was overloaded (`overload`).
    pub overload_dropped_frames: u64,
}

/// A counter family on `/metrics`: its name, help text and label names.
#[derive(Debug)]
pub struct CounterFamily {
    pub name: &'static str,
    pub help: &'static str,
    pub labels: &'static [&'static str],
}

macro_rules! family {
    ($id:ident, $name:literal, $help:literal, [$($label:literal),*]) => {
        pub const $id: CounterFamily = CounterFamily { name: $name, help: $help, labels: &[$($label),*] };
    };
}

/// The families [`Counters`] feeds.
pub mod families {
    use super::CounterFamily;
    family!(
        RTP_PACKETS,
        "gateway_rtp_packets_total",
        "RTP packets received from publishers (in) and sent to subscribers (out)",
        ["direction", "kind"]
    );
    family!(RTP_BYTES, "gateway_rtp_bytes_total", "RTP payload bytes in and out", ["direction", "kind"]);
    family!(KEYFRAME_REQUESTS, "gateway_keyframe_requests_total", "Keyframe requests from subscribers (in), to publishers (out), merged by the throttle (throttled), by kind (pli, fir)", ["direction", "kind"]);
    family!(
        UNRECOVERABLE,
        "gateway_unrecoverable_losses_total",
        "Publisher packets lost for good (NACK did not bring them back in time); each leads to a keyframe request",
        []
    );
    family!(
        LAYER_SWITCHES,
        "gateway_layer_switches_total",
        "Simulcast layer switches for subscribers (set_layer or bandwidth estimate), not counting the first layer",
        []
    );
    family!(
        VIDEO_PAUSES,
        "gateway_video_pauses_total",
        "Subscriber video tracks paused because not even the lowest layer fit the bandwidth estimate",
        []
    );
    family!(
        KEYFRAME_CACHE_STARTS,
        "gateway_keyframe_cache_starts_total",
        "Subscriber video tracks started from the keyframe cache instead of a keyframe request (media.keyframe_cache)",
        []
    );
    family!(
        KEYFRAME_CACHE_PACKETS,
        "gateway_keyframe_cache_packets_total",
        "Packets replayed from the keyframe cache to start subscribers",
        []
    );
    family!(
        NACKS,
        "gateway_nacks_total",
        "NACKs received from subscribers (in) and sent to publishers (out)",
        ["direction"]
    );
    family!(
        RETRANSMITTED,
        "gateway_retransmitted_packets_total",
        "Packets resent to subscribers from the send buffer (RTX) in answer to NACKs",
        []
    );
    family!(STREAMS_UNAVAILABLE, "gateway_streams_unavailable_total", "Streams a subscriber was offered but cannot receive, by reason (codec_unsupported: it cannot decode the publication's codec)", ["reason"]);
    family!(
        MODERATED,
        "gateway_moderated_packets_total",
        "Publisher packets forwarded to nobody because the app backend muted their track",
        []
    );
    family!(
        DATA_MESSAGES,
        "gateway_data_messages_total",
        "Data-channel messages: received from publishers, forwarded (one per subscriber), dropped (too large, over the sender's rate, subscriber channel not open or full)",
        ["result"]
    );
    family!(
        OVERLOAD_DROPPED_FRAMES,
        "gateway_overload_dropped_frames_total",
        "Video frames not sent to a subscriber because its media worker was overloaded and shed its video (whole frames; docs/media-quality.md)",
        []
    );
    family!(
        DROPPED_DATAGRAMS,
        "gateway_dropped_datagrams_total",
        "Datagrams dropped before reaching a connection",
        ["reason"]
    );

    /// Every family, once.
    pub const ALL: &[&CounterFamily] = &[
        &RTP_PACKETS,
        &RTP_BYTES,
        &KEYFRAME_REQUESTS,
        &UNRECOVERABLE,
        &LAYER_SWITCHES,
        &VIDEO_PAUSES,
        &KEYFRAME_CACHE_STARTS,
        &KEYFRAME_CACHE_PACKETS,
        &NACKS,
        &RETRANSMITTED,
        &STREAMS_UNAVAILABLE,
        &DROPPED_DATAGRAMS,
        &MODERATED,
        &DATA_MESSAGES,
        &OVERLOAD_DROPPED_FRAMES,
    ];
}

impl Counters {
    /// Every counter with its family and label values, always in the same order. The
    /// destructuring names every field: a new one is a compile error until it is exported here.
    pub fn samples(&self, mut f: impl FnMut(&'static CounterFamily, &[&'static str], u64)) {
        use families::*;
        let Counters {
            rtp_packets_in,
            rtp_bytes_in,
            rtp_packets_out,
            rtp_bytes_out,
            keyframe_requests_in,
            keyframe_requests_out,
            keyframe_requests_throttled,
            unrecoverable_losses,
            layer_switches,
            video_pauses,
            keyframe_cache_starts,
            keyframe_cache_packets,
            nacks_in,
            nacks_out,
            retransmitted_packets,
            codec_unsupported,
            garbage_datagrams,
            untrusted_datagrams,
            moderated_drops,
            data_received,
            data_forwarded,
            data_dropped_size,
            data_dropped_rate,
            data_dropped_full,
            unrouted_datagrams,
            overload_dropped_frames,
        } = self;
        for (i, kind) in ["audio", "video"].into_iter().enumerate() {
            f(&RTP_PACKETS, &["in", kind], rtp_packets_in[i]);
            f(&RTP_BYTES, &["in", kind], rtp_bytes_in[i]);
            f(&RTP_PACKETS, &["out", kind], rtp_packets_out[i]);
            f(&RTP_BYTES, &["out", kind], rtp_bytes_out[i]);
        }
        for (i, kind) in ["pli", "fir"].into_iter().enumerate() {
            f(&KEYFRAME_REQUESTS, &["in", kind], keyframe_requests_in[i]);
            f(&KEYFRAME_REQUESTS, &["out", kind], keyframe_requests_out[i]);
            f(&KEYFRAME_REQUESTS, &["throttled", kind], keyframe_requests_throttled[i]);
        }
        f(&UNRECOVERABLE, &[], *unrecoverable_losses);
        f(&LAYER_SWITCHES, &[], *layer_switches);
        f(&VIDEO_PAUSES, &[], *video_pauses);
        f(&KEYFRAME_CACHE_STARTS, &[], *keyframe_cache_starts);
        f(&KEYFRAME_CACHE_PACKETS, &[], *keyframe_cache_packets);
        f(&NACKS, &["in"], *nacks_in);
        f(&NACKS, &["out"], *nacks_out);
        f(&RETRANSMITTED, &[], *retransmitted_packets);
        f(&STREAMS_UNAVAILABLE, &["codec_unsupported"], *codec_unsupported);
        f(&DROPPED_DATAGRAMS, &["garbage"], *garbage_datagrams);
        f(&DROPPED_DATAGRAMS, &["untrusted_source"], *untrusted_datagrams);
        f(&MODERATED, &[], *moderated_drops);
        f(&DATA_MESSAGES, &["received"], *data_received);
        f(&DATA_MESSAGES, &["forwarded"], *data_forwarded);
        f(&DATA_MESSAGES, &["dropped_size"], *data_dropped_size);
        f(&DATA_MESSAGES, &["dropped_rate"], *data_dropped_rate);
        f(&DATA_MESSAGES, &["dropped_full"], *data_dropped_full);
        f(&DROPPED_DATAGRAMS, &["unknown_destination"], *unrouted_datagrams);
        f(&OVERLOAD_DROPPED_FRAMES, &[], *overload_dropped_frames);
    }

    fn count_in(&mut self, video: bool, bytes: u64) {
        self.rtp_packets_in[usize::from(video)] += 1;
        self.rtp_bytes_in[usize::from(video)] += bytes;
    }
    fn count_out(&mut self, video: bool, bytes: u64) {
        self.count_out_many(video, 1, bytes);
    }

    fn count_out_many(&mut self, video: bool, packets: u64, bytes: u64) {
        self.rtp_packets_out[usize::from(video)] += packets;
        self.rtp_bytes_out[usize::from(video)] += bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every sample belongs to a listed family and carries one value per label name; every
    /// family is fed; no (family, labels) pair appears twice; each field lands in its own sample.
    #[test]
    fn counters_export_every_field_to_a_listed_family() {
        let mut seen: Vec<(&str, Vec<&str>)> = Vec::new();
        Counters::default().samples(|fam, labels, v| {
            assert_eq!(v, 0);
            assert!(families::ALL.iter().any(|f| std::ptr::eq(*f, fam) || f.name == fam.name), "{} listed", fam.name);
            assert_eq!(labels.len(), fam.labels.len(), "{} label values", fam.name);
            let key = (fam.name, labels.to_vec());
            assert!(!seen.contains(&key), "{key:?} twice");
            seen.push(key);
        });
        for f in families::ALL {
            assert!(seen.iter().any(|(n, _)| *n == f.name), "{} is fed", f.name);
        }
        // Distinct values come out distinct: no field is exported twice or dropped.
        let c = Counters {
            rtp_packets_in: [1, 2],
            rtp_bytes_in: [3, 4],
            rtp_packets_out: [5, 6],
            rtp_bytes_out: [7, 8],
            keyframe_requests_in: [9, 10],
            keyframe_requests_out: [11, 12],
            keyframe_requests_throttled: [13, 14],
            unrecoverable_losses: 15,
            layer_switches: 16,
            video_pauses: 17,
            keyframe_cache_starts: 18,
            keyframe_cache_packets: 19,
            nacks_in: 20,
            nacks_out: 21,
            retransmitted_packets: 22,
            codec_unsupported: 23,
            garbage_datagrams: 24,
            untrusted_datagrams: 25,
            moderated_drops: 26,
            data_received: 27,
            data_forwarded: 28,
            data_dropped_size: 29,
            data_dropped_rate: 30,
            data_dropped_full: 31,
            unrouted_datagrams: 32,
            overload_dropped_frames: 33,
        };
        let mut values = Vec::new();
        c.samples(|_, _, v| values.push(v));
        values.sort_unstable();
        assert_eq!(values, (1..=33).collect::<Vec<u64>>());
    }
}
