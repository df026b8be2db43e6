//! The str0m client peer the gateway's test tools share: the simulator (`gateway_core::sim`),
//! the socket tests (`gateway/tests/common`) and the load tester (`loadtest/src/peer.rs`).
//!
//! Like str0m itself it does no I/O and reads no clock: it is fed `(Instant, datagram)` inputs
//! and timeouts and yields datagrams to send, events and its next timeout. Each user brings its
//! own transport (a virtual network, tokio sockets, many peers per thread) and signaling.
//!
//! - [`peer`]: [`Peer`], the client `Rtc` (RTP mode, full ICE agent, DTLS client) with the SDP
//!   steps (publish offer, answer, re-offers), candidates, payload types and the drive loop.
//! - [`rx`]: the receive side: every RTP packet classified (mid, rid, kind, codec, keyframe)
//!   and counted per stream (sequence span and loss, jitter, first keyframe), optionally recorded.
//! - [`frames`]: VP8 frames as a decoder takes them: whole, partial, decodable.
//! - [`keyframe`]: does a payload start a keyframe (VP8, VP9, H.264).
//! - [`vp8`]: synthetic VP8 payload descriptors with picture numbering, and reading them back.
//! - [`sdp`]: what the gateway's offers say about their sections (`a=msid`).

pub mod frames;
pub mod keyframe;
pub mod peer;
pub mod rx;
pub mod sdp;
pub mod vp8;

pub use keyframe::starts_keyframe;
pub use peer::{Out, Peer, PeerConfig, SdpError};
pub use rx::{Received, Rx, RxStream};
pub use sdp::msid_by_mid;
