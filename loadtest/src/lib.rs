//! A load tester for the gateway that speaks only its public API: REST (rooms and tokens with
//! the API key), the WebSocket protocol, and WebRTC media over UDP with str0m peers. Synthetic
//! publishers replay real encoded clips (VP8 or H.264, Opus) in real time; subscribers measure
//! what the gateway delivers: join time, loss, end-to-end added latency, jitter, feedback, and the
//! gateway's CPU and memory.
//!
//! Layout:
//! - `cli`: the `loadtest` command line ([`cli::Args`]) → [`run::Config`].
//! - `run`: rooms, joins at a rate, steady phase or `--ramp`, sampling, the [`report::Report`].
//! - `peer`: one participant: WebSocket session, publish and subscribe str0m peers.
//! - `media`: the committed clips (IVF, Annex-B, Ogg) and RTP packetizers.
//! - `stats`: payload-keyed send index for latency, shared counters, percentiles.
//! - `sysmon`: CPU/RSS from /proc or the gateway's /metrics.
//! - `report`: the human table, `--json`, `--plot`.
//! - `api`: the REST client.

pub mod api;
pub mod cli;
pub mod media;
pub mod peer;
pub mod report;
pub mod run;
pub mod stats;
pub mod sysmon;

pub use report::Report;
pub use run::{run, Config, Ramp};
