//! One WebRTC connection terminated by the gateway: a `str0m::Rtc` plus the state the SFU keeps
//! around it (state machine, deadlines, the subscriber's outgoing tracks, statistics).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use signaling_api::protocol::{ConnectionState, EventKind, Role};
use str0m::change::SdpPendingOffer;
use str0m::{Event, Input, Output as RtcOutput, Rtc};

use crate::downtrack::DownTrack;
use crate::engine::data::{DataIn, DataOut};
use crate::{ConnKey, MediaEvent, Output};

/// At most this many due timeouts are fed in one drain; str0m never needs more than a few.
const MAX_DUE_TIMEOUTS_PER_DRAIN: usize = 64;
/// Remote addresses remembered as authenticated by ICE.
const MAX_TRUSTED: usize = 8;

/// Queues the engine fills while it works; the driver empties `out`.
#[derive(Default)]
pub(crate) struct Queues {
    pub out: VecDeque<Output>,
    /// str0m events waiting to be handled, in order.
    pub work: VecDeque<(ConnKey, Event)>,
    /// Connections that hit a fatal error, with the reason.
    pub doomed: Vec<(ConnKey, String)>,
    /// Spread rooms (`engine::relay`): messages and packets for other workers.
    pub relay: Vec<(usize, crate::engine::Relay)>,
    pub relayed: Vec<(usize, crate::engine::RelayedPacket)>,
    /// Buffers of datagrams the driver has sent, handed back ([`crate::Engine::recycle`]): a
    /// direct send encrypts into one instead of allocating (and freeing) one per packet.
    pub spare: Vec<Vec<u8>>,
}

/// Live statistics, shown by `GET /v1/connections/{id}`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnStats {
    pub rtp_packets_in: u64,
    pub rtp_bytes_in: u64,
    pub rtp_packets_out: u64,
    pub rtp_bytes_out: u64,
    pub keyframe_requests_in: u64,
    pub keyframe_requests_out: u64,
    /// Packets str0m resent from its buffer in answer to NACKs (subscribe connections).
    pub retransmitted_packets: u64,
    pub dropped_untrusted_datagrams: u64,
    pub peer_bytes_rx: u64,
    pub peer_bytes_tx: u64,
    pub rtt_ms: Option<f64>,
    pub ingress_loss_fraction: Option<f32>,
    pub egress_loss_fraction: Option<f32>,
    pub ingress: Vec<MediaStats>,
    pub egress: Vec<MediaStats>,
    /// The ICE candidate pair in use.
    pub selected_pair: Option<SelectedPair>,
    /// The codec each mid carries, as seen in forwarded packets.
    pub codecs: Vec<CodecInUse>,
    /// The negotiated SRTP profile, inferred from the first SRTP packet received (see
    /// `infer_srtp_profile`); `None` until the peer has sent RTP.
    pub srtp_profile: Option<String>,
    /// Subscribe connections: the bandwidth estimate toward the subscriber (TWCC, or REMB if
    /// that is lower), bits/s.
    pub bwe_estimate_bps: Option<u64>,
    /// Subscribe connections: simulcast layer switches made for this subscriber.
    pub layer_switches: u64,
    /// Subscribe connections: the layer each video track receives.
    pub layers: Vec<LayerInUse>,
    /// Publish connections: lost packets that NACK did not bring back in time (each led to a
    /// keyframe request).
    pub unrecoverable_losses: u64,
    /// ICE restarts applied (the publisher's restart offers, the subscriber's `restart_ice`).
    pub ice_restarts: u64,
    /// From the last ICE restart being applied to ICE connected again, in milliseconds
    /// (`null` before the first restart, and while one is in progress).
    pub ice_restart_ms: Option<u64>,
}

/// Which layer of a published video track a subscriber receives.
#[derive(Debug, Clone, Serialize)]
pub struct LayerInUse {
    pub mid: String,
    pub stream_id: String,
    /// The rid forwarded now (`null` without simulcast or when nothing is forwarded).
    pub rid: Option<String>,
    /// The rid being switched to (equal to `rid` when settled).
    pub target_rid: Option<String>,
    /// The subscriber's `set_layer` choice (`null`: automatic).
    pub preferred_rid: Option<String>,
    /// No layer fits the bandwidth estimate: video is paused, audio continues.
    pub paused: bool,
    /// The subscriber rejected the stream, and why (`codec_unsupported`: it cannot decode the
    /// publication's codec, named in `codec`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub codec: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SelectedPair {
    /// `udp`, or `tcp` for ICE-TCP.
    pub protocol: String,
    /// Our candidate's type: `host` (an ICE-lite server has no other kind).
    pub local_type: &'static str,
    /// With `tcp`: our candidate's TCP role, `passive` (RFC 6544; the client connects).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcptype: Option<&'static str>,
    pub local: String,
    pub remote: String,
    pub rtt_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CodecInUse {
    pub mid: String,
    pub codec: String,
    #[serde(skip)]
    pub codec_id: str0m::format::Codec,
}

/// Per-mid counters from str0m's stats events.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MediaStats {
    pub mid: String,
    pub rid: Option<String>,
    pub packets: u64,
    pub bytes: u64,
    pub nacks: u64,
    pub plis: u64,
    pub firs: u64,
    pub loss: Option<f32>,
    pub rtt_ms: Option<f64>,
    pub jitter: Option<u32>,
    /// Over the last stats interval.
    pub bitrate_bps: Option<u64>,
    #[serde(skip)]
    pub at: Option<std::time::Instant>,
}

pub(crate) struct Conn {
    pub key: ConnKey,
    pub id: Arc<str>,
    pub room: Arc<str>,
    pub participant: Arc<str>,
    /// Its role, with the state only that role has.
    pub side: Side,
    pub rtc: Rtc,
    pub state: ConnectionState,
    /// The address in our host candidate (announced or bind address) and the socket's port.
    pub local: SocketAddr,
    pub created: Instant,
    pub gathered_at: Option<Instant>,
    pub ready_at: Option<Instant>,
    pub ice_connected: bool,
    /// Last datagram accepted from the peer (STUN consent, RTCP, media).
    pub last_rx: Instant,
    /// When the last ICE restart was applied: the peer asked for it over signaling, so the
    /// disconnect grace counts from here too (a restart late in the grace still recovers).
    pub restarted_at: Option<Instant>,
    /// An ICE restart was applied and ICE has not connected again since.
    pub restarting: bool,
    /// During a restart: where the client last reached us under the new credentials (str0m
    /// answered its check there). Media goes there until the client nominates a pair.
    pub restart_path: Option<SocketAddr>,
    /// During a restart: the client has reached us under the new credentials and video was
    /// started over for it (`Engine::ice_restart_done`), before it nominated.
    pub restart_reached: bool,
    pub next_timeout: Option<Instant>,
    /// When the `Rtc` was last given a timeout.
    pub last_round: Option<Instant>,
    /// Remote addresses ICE has authenticated (we have sent to them). Only these may feed DTLS,
    /// RTP and RTCP into the `Rtc`, so a spoofed datagram cannot fail a healthy connection.
    pub trusted: Vec<SocketAddr>,
    /// Our host candidate was added to the `Rtc` (and trickled to the client).
    pub candidate_added: bool,
    /// Our host candidates as the `Rtc` holds them (UDP, then ICE-TCP passive ones), as SDP
    /// `candidate:` values, for trickling.
    pub candidates: Vec<String>,
    pub first_mid: Option<String>,
    /// The client's latest offer (client-offered connections: publish, WHEP): replayed with new
    /// ICE credentials for an ICE restart asked for by them alone (WHIP/WHEP PATCH).
    pub remote_offer: Option<String>,
    pub stats: ConnStats,
    /// `connection{connection_id, room, participant, role}`: every log line of this connection
    /// carries these, so its life can be followed by grepping the id.
    pub span: tracing::Span,
}

/// What a connection does, with the state only that role has: role checks are matches.
pub(crate) enum Side {
    /// The client sends media up (the client offers).
    Publish(PublishSide),
    /// The gateway sends the room's media down: the gateway offers (WebSocket clients), or the
    /// client offers once and the gateway answers with one publisher's tracks (WHEP, `plays`).
    Subscribe(SubscribeSide),
}

#[derive(Default)]
pub(crate) struct PublishSide {
    /// The one payload type each media section of our answer left the publisher (by mid), so
    /// each publication carries one definite codec.
    pub sending_pts: Vec<(String, u8)>,
    /// Its data channels and message allowance (the relay, `engine/data.rs`).
    pub data: DataIn,
}

#[derive(Default)]
pub(crate) struct SubscribeSide {
    /// The participant whose tracks this connection plays, when the client offered it (WHEP):
    /// its sections are fixed by that one offer, so it is never re-offered; it ends when none of
    /// its tracks is left. `None`: a gateway-offered connection that follows the whole room.
    pub plays: Option<Arc<str>>,
    /// Our offer waiting for the client's answer (one at a time).
    pub pending: Option<SdpPendingOffer>,
    pub offered: bool,
    /// Something changed while an offer was pending: offer again after the answer.
    pub offer_wanted: bool,
    /// The client asked for an ICE restart (`restart_ice`): the next offer carries new
    /// credentials.
    pub restart_wanted: bool,
    /// The pending offer carries an ICE restart: its answer switches to the new credentials.
    pub restart_offered: bool,
    pub last_offer: Option<String>,
    /// An unchanged offer was sent again; its answer has nothing to apply.
    pub idle_reoffer: bool,
    /// The subscriber's copy of every published track it is offered.
    pub outs: Vec<DownTrack>,
    /// Latest TWCC estimate and latest REMB toward this peer, bits/s.
    pub twcc_estimate: Option<u64>,
    pub remb_estimate: Option<u64>,
    /// The desired bitrate last given to str0m's estimator.
    pub bwe_desired: Option<u64>,
    /// When the estimator may next be asked to probe for a higher layer.
    pub next_probe: Option<Instant>,
    /// The gateway's reliable and unreliable data channels (gateway-offered connections).
    pub data: DataOut,
    /// Which quarter of the worker's subscribers this one is in when an overloaded worker
    /// sheds video (`overload::shed_slot`).
    pub shed_slot: u8,
}

impl SubscribeSide {
    /// What the link toward the peer carries, as far as we know (`None`: no estimate).
    pub fn bandwidth(&self) -> Option<u64> {
        match (self.twcc_estimate, self.remb_estimate) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl Side {
    pub fn new(role: Role) -> Self {
        match role {
            Role::Publish => Side::Publish(PublishSide::default()),
            Role::Subscribe => Side::Subscribe(SubscribeSide::default()),
        }
    }
}

impl Conn {
    pub fn role(&self) -> Role {
        match self.side {
            Side::Publish(_) => Role::Publish,
            Side::Subscribe(_) => Role::Subscribe,
        }
    }

    /// The subscribe side (`None` for a publish connection).
    pub fn sub(&self) -> Option<&SubscribeSide> {
        match &self.side {
            Side::Subscribe(s) => Some(s),
            Side::Publish(_) => None,
        }
    }

    pub fn sub_mut(&mut self) -> Option<&mut SubscribeSide> {
        match &mut self.side {
            Side::Subscribe(s) => Some(s),
            Side::Publish(_) => None,
        }
    }

    /// The subscriber's tracks (none for a publish connection).
    pub fn outs(&self) -> &[DownTrack] {
        self.sub().map(|s| s.outs.as_slice()).unwrap_or_default()
    }

    pub fn outs_mut(&mut self) -> &mut [DownTrack] {
        match self.sub_mut() {
            Some(s) => &mut s.outs,
            None => &mut [],
        }
    }

    /// The bandwidth estimate toward a subscriber (`None`: none yet, or a publish connection).
    pub fn bandwidth(&self) -> Option<u64> {
        self.sub().and_then(SubscribeSide::bandwidth)
    }

    /// Move the state machine and report the step. Returns false if the step is not allowed.
    pub fn enter(&mut self, q: &mut Queues, state: ConnectionState, reason: Option<String>) -> bool {
        if state != ConnectionState::Initial {
            match self.state.advance(state) {
                Ok(s) => self.state = s,
                Err(_) => return false,
            }
        }
        let _in = self.span.enter();
        tracing::info!(
            state = EventKind::from(state).as_str(),
            reason = reason.as_deref().unwrap_or(""),
            "connection state"
        );
        self.event(q, EventKind::from(state), reason);
        true
    }

    /// Report an event that is not a state (SDP_PROCESSED, CANDIDATE) or a state already entered.
    pub fn event(&self, q: &mut Queues, event: EventKind, reason: Option<String>) {
        q.out.push_back(Output::Event(MediaEvent::Connection { connection_id: self.id.to_string(), event, reason }));
    }

    /// Hand a datagram str0m produced to the driver.
    pub fn transmit(&mut self, mut t: str0m::net::Transmit, q: &mut Queues) {
        if self.restarting {
            t.destination = restart_destination(&mut self.restart_path, &t.contents, t.destination);
        }
        // Most recently used last, so the active peer is never the one evicted.
        if self.trusted.last() != Some(&t.destination) {
            self.trusted.retain(|a| *a != t.destination);
            if self.trusted.len() >= MAX_TRUSTED {
                self.trusted.remove(0);
            }
            self.trusted.push(t.destination);
        }
        q.out.push_back(Output::Transmit {
            key: self.key,
            proto: t.proto,
            destination: t.destination,
            contents: t.contents.into(),
        });
    }

    /// A packet went straight out (`send_rtp_now`). Such a send usually changes nothing else
    /// in the `Rtc` (vendored str0m: it re-polls only when it queued output or moved a timeout
    /// earlier, e.g. a stream's first Sender Report or the end of a probe cluster), so no
    /// poll is needed: its next timeout is the one it had. Its pacer and estimator still get a
    /// timeout round after sends at least every `round_every` (see
    /// `CoreConfig::direct_round_every`), not one per packet, at the engine's timer pass.
    /// Otherwise it is polled as after any other write.
    pub fn sent_directly(&mut self, now: Instant, round_every: Option<Duration>, q: &mut Queues) {
        match self.rtc.idle_timeout() {
            Some(t) => {
                let round = round_every.map(|d| self.last_round.map_or(now, |r| (r + d).max(now)));
                self.next_timeout = Some(round.map_or(t, |r| t.min(r)));
            }
            None => self.drain(now, q),
        }
    }

    /// Poll the `Rtc` until it only has a future timeout left: transmits go out, events are
    /// queued for the engine. str0m keeps a single undelivered incoming packet in RTP mode, so
    /// this runs after every input, write and SDP change.
    pub fn drain(&mut self, now: Instant, q: &mut Queues) {
        let mut due = 0;
        loop {
            match self.rtc.poll_output() {
                Ok(RtcOutput::Timeout(t)) => {
                    self.next_timeout = Some(t);
                    if t <= now && due < MAX_DUE_TIMEOUTS_PER_DRAIN && self.rtc.is_alive() {
                        due += 1;
                        self.last_round = Some(now);
                        if let Err(e) = self.rtc.handle_input(Input::Timeout(now)) {
                            q.doomed.push((self.key, format!("rtc_error: {e}")));
                            return;
                        }
                        continue;
                    }
                    return;
                }
                Ok(RtcOutput::Transmit(t)) => self.transmit(t, q),
                Ok(RtcOutput::Event(e)) => q.work.push_back((self.key, e)),
                Err(e) => {
                    q.doomed.push((self.key, classify_error(&e.to_string())));
                    return;
                }
            }
        }
    }

    /// The earliest moment the engine must look at this connection.
    pub fn poll_timeout(&self, cfg: &crate::CoreConfig) -> Option<Instant> {
        let own = match self.state {
            ConnectionState::Initial => Some(self.created + cfg.negotiation_timeout),
            ConnectionState::Gathered => self.gathered_at.map(|t| t + cfg.connect_timeout),
            ConnectionState::Ready => Some(self.lost_at(cfg)),
            _ => None,
        };
        match (own, self.next_timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When a READY connection counts as lost: its ICE-authenticated peer has sent nothing at
    /// all (media, RTCP, STUN requests or indications) for the grace period. str0m's ICE-lite
    /// agent's own verdict is not used: it reports Disconnected 15 s after the last Binding
    /// *request*, but RFC 8445 §11 lets a peer that sends media keep only indications (libnice,
    /// and so GStreamer's webrtcbin, sends one every 25 s and no consent checks), so a healthy
    /// call would fail. A peer that really went away goes silent and fails on this rule alone.
    /// An ICE restart counts as a sign of life (the peer asked for it), once per restart.
    fn lost_at(&self, cfg: &crate::CoreConfig) -> Instant {
        self.last_rx.max(self.restarted_at.unwrap_or(self.last_rx)) + cfg.disconnect_grace
    }

    /// An ICE restart was applied to the `Rtc` (new local credentials): count it, and give the
    /// peer a fresh grace to reach us under the new credentials.
    pub fn ice_restarted(&mut self, now: Instant) {
        self.restarted_at = Some(now);
        self.restarting = true;
        self.restart_path = None;
        self.restart_reached = false;
        self.stats.ice_restarts += 1;
        self.stats.ice_restart_ms = None;
        let n = self.stats.ice_restarts;
        self.span.in_scope(|| tracing::info!(restarts = n, "ICE restart"));
    }

    /// The client answered under the new credentials for the first time during a restart
    /// (str0m answered its check): true once per restart.
    pub fn restart_reached_now(&mut self) -> bool {
        let now = self.restarting && self.restart_path.is_some() && !self.restart_reached;
        self.restart_reached |= now;
        now
    }

    /// ICE connected (again): if a restart was in progress, it is done. Returns true if video
    /// still has to start over for it (the client was not reached before it nominated).
    pub fn ice_reconnected(&mut self, now: Instant) -> bool {
        if !std::mem::take(&mut self.restarting) {
            return false;
        }
        self.restart_path = None;
        let owed = !std::mem::take(&mut self.restart_reached);
        let ms = self.restarted_at.map(|t| now.saturating_duration_since(t).as_millis() as u64);
        self.stats.ice_restart_ms = ms;
        self.span.in_scope(|| tracing::info!(ms = ms.unwrap_or(0), "ICE connected again after the restart"));
        owed
    }

    /// The reason to fail this connection now, if a connection-level deadline passed.
    pub fn expired(&self, now: Instant, cfg: &crate::CoreConfig) -> Option<&'static str> {
        match self.state {
            ConnectionState::Initial if now >= self.created + cfg.negotiation_timeout => Some("negotiation_timeout"),
            ConnectionState::Gathered if self.gathered_at.is_some_and(|t| now >= t + cfg.connect_timeout) => {
                Some(if self.ice_connected { "dtls_timeout" } else { "ice_timeout" })
            }
            ConnectionState::Ready if now >= self.lost_at(cfg) => Some("ice_disconnected"),
            _ => None,
        }
    }
}

/// Where a datagram str0m made goes while an ICE restart is in progress, and where the client
/// was last reached. A STUN datagram (str0m answering a check that passed the new password)
/// shows where the client is now. Until the client nominates a pair of the new ICE session,
/// str0m keeps sending everything else to the old pair, which may have gone with the client's
/// old network, and a browser may take seconds to nominate (Chromium keeps its old pair until
/// it times out). The new path is authenticated, and DTLS/SRTP do not depend on addresses
/// (RFC 8445 §9: data goes on during a restart), so everything goes there at once — and a
/// browser that receives on its new pair switches to it sooner.
fn restart_destination(path: &mut Option<SocketAddr>, contents: &[u8], destination: SocketAddr) -> SocketAddr {
    if contents.first().is_some_and(|b| *b < 4) {
        *path = Some(destination);
        return destination;
    }
    path.unwrap_or(destination)
}

fn classify_error(e: &str) -> String {
    if e.to_ascii_lowercase().contains("dtls") {
        format!("dtls_error: {e}")
    } else {
        format!("rtc_error: {e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn during_a_restart_media_follows_the_newest_answered_check() {
        let old: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        let new: SocketAddr = "10.0.9.2:6000".parse().unwrap();
        let (stun, rtp, dtls) = ([0x01u8, 0x01, 0, 0], [0x80u8, 0x60, 0, 1], [22u8, 0xfe, 0xfd]);
        let mut path = None;
        assert_eq!(restart_destination(&mut path, &rtp, old), old, "no check answered yet: str0m's choice");
        assert_eq!(restart_destination(&mut path, &stun, new), new, "the answer goes where the check came from");
        assert_eq!(path, Some(new));
        assert_eq!(restart_destination(&mut path, &rtp, old), new, "media to the new path");
        assert_eq!(restart_destination(&mut path, &dtls, old), new, "DTLS too");
        assert_eq!(restart_destination(&mut path, &stun, old), old, "a check answered on the old path");
        assert_eq!(restart_destination(&mut path, &rtp, new), old, "the newest answered check wins");
    }
}
