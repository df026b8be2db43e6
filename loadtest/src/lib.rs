//! A load tester for the gateway that speaks only its public API: REST (rooms and tokens with
//! the API key), the WebSocket protocol, and WebRTC media over UDP with str0m peers. Synthetic
//! publishers replay real encoded clips (VP8 or H.264, Opus) in real time; subscribers measure
//! what the gateway delivers: join time, loss, end-to-end added latency, jitter, feedback, and the
//! gateway's CPU and memory. The same participants can drive Janus's VideoRoom plugin instead
//! (`--target janus`), for a side-by-side comparison (loadtest/compare.sh).
//!
//! Layout:
//! - `cli`: the `loadtest` command line ([`cli::Args`]) → [`run::Config`].
//! - `run`: rooms, joins at a rate, steady phase or `--ramp`, sampling, the [`report::Report`].
//! - `peer`: one participant: its signaling session, publish and subscribe str0m peers.
//! - `signaling`: the participant's vocabulary with any server ([`signaling::Event`],
//!   [`signaling::Command`]) and the server under test ([`signaling::Target`]).
//! - `ws`: the gateway's signaling (join token, WebSocket protocol).
//! - `janus`: Janus's VideoRoom over its HTTP transport (`--target janus`).
//! - `media`: the committed clips (IVF, Annex-B, Ogg) and RTP packetizers.
//! - `stats`: payload-keyed send index for latency, shared counters, percentiles.
//! - `sysmon`: CPU/RSS from /proc or the gateway's /metrics.
//! - `report`: the human table, `--json`, `--plot`.
//! - `api`: the REST client.
//! - `floor`: the kernel's CPU per sent datagram, the floor under a forwarder's cost (`udp-floor`).

pub mod api;
pub mod cli;
pub mod floor;
pub mod janus;
pub mod media;
pub mod peer;
pub mod report;
pub mod run;
pub mod signaling;
pub mod stats;
pub mod sysmon;
pub mod ws;

pub use report::Report;
pub use run::{run, Config, Ramp};
