//! What a participant says to the server under test and hears from it, whichever server that
//! is: the gateway (REST + WebSocket, [`crate::ws`]) or Janus's VideoRoom plugin over its HTTP
//! transport ([`crate::janus`]). The participant (`peer.rs`) speaks only this vocabulary, so the
//! str0m peers, the media and every measurement are the same for both targets; only the
//! signaling differs.
//!
//! Each target's signaling runs as its own task (a driver) that owns the connection to the
//! server: the participant sends [`Command`]s and receives [`Event`]s over unbounded channels,
//! so a slow signaling request never stalls the participant's media loop.

use std::net::IpAddr;

use chrono::{DateTime, FixedOffset};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::api::Api;
use crate::janus::Janus;
use crate::peer::Plan;
use crate::sysmon::{self, GatewaySample, Source};

/// Which server the run drives (`--target`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// This project's gateway (`--url`, `--api-key`).
    #[default]
    Gateway,
    /// Janus 1.1's VideoRoom plugin over its HTTP transport (`--janus-url`).
    Janus,
}

impl TargetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::Gateway => "gateway",
            TargetKind::Janus => "janus",
        }
    }
}

impl std::fmt::Display for TargetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which of a participant's two connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Publish,
    Subscribe,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Publish => "publish",
            Role::Subscribe => "subscribe",
        }
    }
}

/// A stream someone publishes in the room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The server's id for it (gateway: `stream_id`; Janus: `<feed id>:<feed mid>`).
    pub stream_id: String,
    /// The publishing participant: our own name for it (gateway participant id, Janus display).
    pub participant: String,
    /// The publisher's mid for it (the media section of its offer).
    pub mid: String,
}

/// A connection's state as the server reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnState {
    Initial,
    Gathered,
    /// ICE and DTLS done (gateway `READY`, Janus `webrtcup`).
    Ready,
    Finished,
    Failed(String),
}

impl ConnState {
    pub fn name(&self) -> &'static str {
        match self {
            ConnState::Initial => "INITIAL",
            ConnState::Gathered => "GATHERED",
            ConnState::Ready => "READY",
            ConnState::Finished => "FINISHED",
            ConnState::Failed(_) => "FAILED",
        }
    }
}

/// What the server said, in the participant's terms.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// We are in the room; these streams are published already. The participant now publishes
    /// and/or subscribes.
    Joined { streams: Vec<Published> },
    /// Someone started publishing a stream.
    StreamAdded(Published),
    /// The answer to our publish offer.
    Answer { sdp: String },
    /// An offer for our subscribe connection (first or re-offer). `streams` maps our mids to
    /// what they carry where the server says so outside the SDP (Janus); the gateway says it
    /// with `a=msid` lines in the SDP.
    Offer { sdp: String, streams: Vec<(String, Published)> },
    /// A trickled candidate of the server (SDP attribute text).
    Candidate { role: Role, candidate: String },
    /// The server's view of one of our connections.
    Connection {
        role: Role,
        state: ConnState,
        /// When the server says it happened (the gateway's timestamps); for Janus, which has none,
        /// the instant the driver saw it.
        at: Option<DateTime<FixedOffset>>,
        connection_id: Option<String>,
    },
    /// The request that starts this connection has just been sent (join time is measured from
    /// here). The gateway's starts with the participant's own `publish`/`subscribe`; Janus's
    /// subscription starts when the driver sends its `join`, once there is a feed to join.
    Requested { role: Role },
    /// The server refused a request (the gateway's `error` message: `no_ports`, `rate_limited`,
    /// `bad_sdp`, …). A refused `publish` or `subscribe` never gets a connection.
    /// `connection_id`: the connection the refusal is about, if any (then it is not a refused
    /// `publish` or `subscribe`).
    Refused { code: String, message: String, connection_id: Option<String> },
    /// The signaling ended; `Some` if on an error.
    Closed(Option<String>),
}

/// What the participant asks of the server.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Publish with this offer.
    Publish { sdp: String },
    /// Receive every stream of the room (now and later).
    Subscribe,
    /// The answer to the last subscribe offer.
    Answer { sdp: String },
    /// Leave the room.
    Leave,
}

/// One participant's signaling: commands in, events out.
pub struct Signaling {
    pub commands: mpsc::UnboundedSender<Command>,
    pub events: mpsc::UnboundedReceiver<Event>,
}

impl Signaling {
    /// A pair of channels: the participant's end, and the driver's (commands to read, events to
    /// send).
    pub fn channels() -> (Self, mpsc::UnboundedReceiver<Command>, mpsc::UnboundedSender<Event>) {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        (Self { commands: cmd_tx, events: ev_rx }, cmd_rx, ev_tx)
    }
}

/// The server under test.
#[derive(Clone)]
pub enum Target {
    /// This project's gateway: REST with the API key, the WebSocket protocol.
    Gateway(Api),
    /// Janus's VideoRoom plugin over its HTTP transport.
    Janus(Janus),
}

impl Target {
    pub fn name(&self) -> &'static str {
        match self {
            Target::Gateway(_) => "gateway",
            Target::Janus(_) => "janus",
        }
    }

    /// Create a room, or with `exact` use the one of that name if it exists; returns its id.
    pub async fn create_room(&self, name: &str, max_participants: u32, exact: bool) -> anyhow::Result<String> {
        match self {
            Target::Gateway(api) if exact => api.create_or_find_room(name, max_participants).await,
            Target::Gateway(api) => api.create_room(name, max_participants).await,
            Target::Janus(j) => j.create_room(name, exact).await.map(|id| id.to_string()),
        }
    }

    /// Delete a room made by [`Target::create_room`] (best effort).
    pub async fn delete_room(&self, id: &str) {
        match self {
            Target::Gateway(api) => api.delete_room(id).await,
            Target::Janus(j) => {
                if let Ok(room) = id.parse() {
                    j.destroy_room(room).await;
                }
            }
        }
    }

    /// Join `plan.room_id` as `plan.name`: the driver runs until the participant drops its end.
    pub async fn connect(&self, plan: &Plan) -> anyhow::Result<Signaling> {
        match self {
            Target::Gateway(api) => crate::ws::connect(api, plan).await,
            Target::Janus(j) => j.connect(plan).await,
        }
    }

    /// The server's CPU, RSS and (gateway) packet counters now.
    pub async fn sample(&self, source: &Source) -> GatewaySample {
        match self {
            Target::Gateway(api) => sysmon::sample_gateway(api, source).await,
            Target::Janus(_) => GatewaySample {
                proc: match source {
                    Source::Proc(pid) => sysmon::read_proc(pid),
                    Source::Metrics => None,
                },
                packets_out: None,
                packets_in: None,
            },
        }
    }
}

/// `a=candidate` lines of an SDP whose address is not one of `expected` (or is not an IP
/// address at all, e.g. an mDNS name): the addresses named.
pub fn unexpected_candidates(sdp: &str, expected: &[IpAddr]) -> Vec<String> {
    sdp.lines()
        .filter_map(|l| l.trim().strip_prefix("a=candidate:"))
        .filter_map(|c| candidate_address(c).map(str::to_owned))
        .filter(|a| !a.parse::<IpAddr>().is_ok_and(|ip| expected.contains(&ip)))
        .collect()
}

/// The connection address of a candidate (`foundation component transport priority address
/// port typ …`), with or without its `candidate:` prefix.
pub fn candidate_address(candidate: &str) -> Option<&str> {
    let c = candidate.trim();
    let c = c.strip_prefix("a=").unwrap_or(c);
    let c = c.strip_prefix("candidate:").unwrap_or(c);
    c.split_whitespace().nth(4)
}

/// Now as the gateway's event timestamps are written (for targets that have none).
pub fn now_stamp() -> Option<DateTime<FixedOffset>> {
    Some(chrono::Utc::now().fixed_offset())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_outside_the_expected_addresses_are_named() {
        let sdp = "v=0\r\na=candidate:1 1 udp 2015363327 10.213.0.1 45123 typ host\r\n\
                   a=candidate:2 1 udp 2015363327 192.0.2.7 45124 typ host\r\n\
                   a=candidate:3 1 udp 2015363327 abc.local 45125 typ host\r\na=end-of-candidates\r\n";
        let ok: Vec<IpAddr> = vec!["10.213.0.1".parse().unwrap()];
        assert_eq!(unexpected_candidates(sdp, &ok), vec!["192.0.2.7".to_owned(), "abc.local".to_owned()]);
        assert!(unexpected_candidates("a=candidate:1 1 udp 1 10.213.0.1 1 typ host", &ok).is_empty());
        assert_eq!(candidate_address("candidate:1 1 udp 1 10.0.0.9 5000 typ host"), Some("10.0.0.9"));
    }
}
