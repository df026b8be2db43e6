//! [`Peer`]: a client str0m `Rtc` as the gateway's clients use one — RTP mode, a full ICE agent
//! with one host candidate, the DTLS client — with the steps every test tool repeats: building
//! it (optionally knowing only Opus and one video codec), the publish offer (audio, video,
//! simulcast rids), taking the gateway's answer, answering its offers (noting each section's
//! `a=msid`), trickled candidates, the payload type to send a codec with, writing RTP, asking
//! for keyframes, and the drive loop: datagrams and timeouts in, [`Out`] out, with the
//! receive side ([`crate::rx`]) fed on the way.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::bwe::Bitrate;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::error::IceError;
use str0m::format::Codec;
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, Mid, Pt, Rid, Simulcast, SimulcastLayer};
use str0m::net::{Protocol, Receive, TcpType, Transmit};
use str0m::rtp::{RtpPacket, RtpWrite};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcError};

use crate::rx::{Classified, Rx};

/// How to build a [`Peer`].
#[derive(Debug, Clone, Default)]
pub struct PeerConfig {
    /// Know only Opus and this video codec (a client that can decode nothing else); `None`:
    /// str0m's default codecs.
    pub video_codec: Option<Codec>,
    /// str0m's stats events (`MediaIngressStats`, `MediaEgressStats`, …) at this interval.
    pub stats_interval: Option<Duration>,
    /// Keep every received packet whole in `rx.received`.
    pub record: bool,
    /// ICE over TCP only (RFC 6544): the one candidate is an active TCP host candidate at
    /// `local`, so the agent pairs it with the remote's passive TCP candidates only, and
    /// received data is handed to the `Rtc` as TCP. The driver owns the streams (RFC 4571
    /// framing) and sends each TCP transmit on the stream to its destination.
    pub tcp: bool,
}

/// What [`Peer::poll_output`] yields.
#[derive(Debug)]
pub enum Out {
    /// A datagram to send from the peer's address.
    Transmit(Transmit),
    /// RTP received, already counted (and recorded) by the receive side.
    Rtp(Classified, RtpPacket),
    /// Any other event. `Connected` and `KeyframeRequest` are also noted on the peer first.
    Event(Event),
    /// Nothing more until this instant (or the next input).
    Timeout(Instant),
}

/// An SDP step that did not happen.
#[derive(Debug)]
pub enum SdpError {
    /// An answer came with no offer of ours outstanding.
    NoPendingOffer,
    /// The text is not SDP str0m can parse.
    Parse(String),
    /// str0m refused it.
    Rejected(RtcError),
}

impl fmt::Display for SdpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SdpError::NoPendingOffer => f.write_str("no offer pending"),
            SdpError::Parse(e) => write!(f, "unparsable SDP: {e}"),
            SdpError::Rejected(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for SdpError {}

/// One client connection (publish or subscribe).
pub struct Peer {
    pub rtc: Rtc,
    /// Our address: the host candidate, and where datagrams come to.
    pub local: SocketAddr,
    /// ICE and DTLS are done (`Event::Connected`).
    pub connected: bool,
    /// `Event::KeyframeRequest`s received (PLI/FIR from the gateway).
    pub keyframe_requests: usize,
    pub rx: Rx,
    /// Our mid → (publishing participant, stream id), from the `a=msid` lines of the offers.
    pub mids: HashMap<String, (String, String)>,
    /// The sections of our publish offer.
    pub audio_mid: Option<Mid>,
    pub video_mid: Option<Mid>,
    pending: Option<SdpPendingOffer>,
    proto: Protocol,
    /// Moved to a new address ([`Peer::move_to`]): its host candidate is added with the next
    /// ICE restart (our offer's answer, or the gateway's restart offer).
    candidate_due: bool,
}

impl Peer {
    /// A peer at `local` (its only candidate) built at `now`.
    pub fn new(now: Instant, local: SocketAddr, cfg: &PeerConfig) -> Result<Self, IceError> {
        let mut b = Rtc::builder().set_rtp_mode(true);
        if let Some(interval) = cfg.stats_interval {
            b = b.set_stats_interval(Some(interval));
        }
        if let Some(video) = cfg.video_codec {
            b = b.clear_codecs().enable_opus(true, false);
            b = match video {
                Codec::H264 => b.enable_h264(true),
                Codec::Vp9 => b.enable_vp9(true),
                Codec::Av1 => b.enable_av1(true),
                _ => b.enable_vp8(true),
            };
        }
        let mut rtc = b.build(now);
        let proto = if cfg.tcp { Protocol::Tcp } else { Protocol::Udp };
        let candidate = if cfg.tcp {
            Candidate::builder().tcp().host(local).tcptype(TcpType::Active).build()?
        } else {
            Candidate::host(local, "udp")?
        };
        rtc.add_local_candidate(candidate);
        Ok(Self {
            rtc,
            local,
            connected: false,
            keyframe_requests: 0,
            rx: Rx::new(now, cfg.record),
            mids: HashMap::new(),
            audio_mid: None,
            video_mid: None,
            pending: None,
            proto,
            candidate_due: false,
        })
    }

    /// A datagram (or, with `PeerConfig::tcp`, a frame of a stream) from `from` arrived at
    /// `now`. Drain [`Peer::poll_output`] before the next input: in RTP mode str0m keeps only
    /// one undelivered packet.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8]) -> Result<(), RtcError> {
        let Ok(contents) = data.try_into() else { return Ok(()) };
        let r = Receive { proto: self.proto, source: from, destination: self.local, contents };
        self.rtc.handle_input(Input::Receive(now, r))
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), RtcError> {
        self.rtc.handle_input(Input::Timeout(now))
    }

    /// The next output. A timeout that is already due is handled here at `now` (after writing
    /// media str0m can ask for `now` itself), so `Out::Timeout` is always in the future.
    pub fn poll_output(&mut self, now: Instant) -> Result<Out, RtcError> {
        loop {
            match self.rtc.poll_output()? {
                Output::Timeout(t) if t <= now => self.rtc.handle_input(Input::Timeout(now))?,
                Output::Timeout(t) => return Ok(Out::Timeout(t)),
                Output::Transmit(t) => return Ok(Out::Transmit(t)),
                Output::Event(Event::RtpPacket(p)) => {
                    let c = self.rx.on_rtp(&mut self.rtc, &p);
                    return Ok(Out::Rtp(c, p));
                }
                Output::Event(e) => {
                    match &e {
                        Event::Connected => self.connected = true,
                        Event::KeyframeRequest(_) => self.keyframe_requests += 1,
                        _ => {}
                    }
                    return Ok(Out::Event(e));
                }
            }
        }
    }

    /// The publish offer: a send-only audio section if `audio`, and a send-only video section
    /// if `video` is given — with these rids as simulcast layers when there are several.
    /// `None` when there is nothing to offer.
    pub fn publish_offer(&mut self, audio: bool, video: Option<&[&str]>) -> Option<String> {
        let mut api = self.rtc.sdp_api();
        let audio_mid = audio.then(|| api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None));
        let video_mid = video.map(|rids| {
            let simulcast = (rids.len() > 1).then(|| {
                let mut s = Simulcast::new();
                for rid in rids {
                    s.add_send_layer(SimulcastLayer::new(rid));
                }
                s
            });
            api.add_media(MediaKind::Video, Direction::SendOnly, None, None, simulcast)
        });
        let (offer, pending) = api.apply()?;
        self.audio_mid = audio_mid;
        self.video_mid = video_mid;
        self.pending = Some(pending);
        Some(offer.to_sdp_string())
    }

    /// A playback offer (WHEP): one receive-only audio and one receive-only video section.
    pub fn play_offer(&mut self) -> Option<String> {
        let mut api = self.rtc.sdp_api();
        api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
        api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
        let (offer, pending) = api.apply()?;
        self.pending = Some(pending);
        Some(offer.to_sdp_string())
    }

    /// Take the gateway's answer to our outstanding offer.
    pub fn accept_answer(&mut self, sdp: &str) -> Result<(), SdpError> {
        let pending = self.pending.take().ok_or(SdpError::NoPendingOffer)?;
        let answer = SdpAnswer::from_sdp_string(sdp).map_err(|e| SdpError::Parse(e.to_string()))?;
        self.rtc.sdp_api().accept_answer(pending, answer).map_err(SdpError::Rejected)?;
        self.add_due_candidate();
        Ok(())
    }

    /// Answer an offer of the gateway (first or re-offer); its sections' `a=msid` lines go into
    /// [`Peer::mids`]. Returns the answer's SDP.
    pub fn accept_offer(&mut self, sdp: &str) -> Result<String, SdpError> {
        self.mids.extend(crate::sdp::msid_by_mid(sdp));
        let offer = SdpOffer::from_sdp_string(sdp).map_err(|e| SdpError::Parse(e.to_string()))?;
        let answer = self.rtc.sdp_api().accept_offer(offer).map_err(SdpError::Rejected)?;
        self.add_due_candidate();
        Ok(answer.to_sdp_string())
    }

    /// Our address changes (a phone moving from Wi-Fi to LTE): datagrams now come to `local`,
    /// and the host candidate on it is added at the next ICE restart — not before, so the old
    /// session cannot quietly recover without one.
    pub fn move_to(&mut self, local: SocketAddr) {
        self.local = local;
        self.candidate_due = true;
    }

    /// An ICE restart offer (new credentials, as a browser's `restartIce()` makes) for the
    /// connection we offered: the same sections, no candidates (ours is added with the answer).
    pub fn ice_restart_offer(&mut self) -> Option<String> {
        let mut api = self.rtc.sdp_api();
        api.ice_restart(false);
        let (offer, pending) = api.apply()?;
        self.pending = Some(pending);
        self.candidate_due = true;
        Some(offer.to_sdp_string())
    }

    fn add_due_candidate(&mut self) {
        if std::mem::take(&mut self.candidate_due) {
            if let Ok(c) = Candidate::host(self.local, "udp") {
                self.rtc.add_local_candidate(c);
            }
        }
    }

    /// Add a trickled candidate (its SDP attribute text); false if it does not parse.
    pub fn add_remote_candidate(&mut self, candidate: &str) -> bool {
        match Candidate::from_sdp_string(candidate) {
            Ok(c) => {
                self.rtc.add_remote_candidate(c);
                true
            }
            Err(_) => false,
        }
    }

    /// The payload type to send `codec` with on `mid`, as negotiated (the remote side's list
    /// decides). H.264: packetization-mode 1 constrained baseline if offered, as the load
    /// tester's clips are; otherwise the first match.
    pub fn pt_for(&self, mid: Mid, codec: Codec) -> Option<Pt> {
        let remote = self.rtc.media(mid)?.remote_pts();
        let config = self.rtc.codec_config();
        let matches = || config.params().iter().filter(|p| p.spec().codec == codec && remote.contains(&p.pt()));
        let baseline = |p: &&str0m::format::PayloadParams| {
            p.spec().format.packetization_mode == Some(1)
                && p.spec().format.profile_level_id.is_some_and(|id| id >> 16 == 0x42)
        };
        let best = if codec == Codec::H264 { matches().find(baseline) } else { None };
        best.or_else(|| matches().next()).map(|p| p.pt())
    }

    /// Write one RTP packet on the stream of `mid` (and `rid`); false if there is none (yet).
    pub fn write_rtp(&mut self, mid: Mid, rid: Option<Rid>, write: RtpWrite) -> bool {
        let mut api = self.rtc.direct_api();
        let Some(tx) = api.stream_tx_by_mid(mid, rid) else { return false };
        tx.write_rtp(write);
        true
    }

    /// Ask for a keyframe (PLI) on every video stream received.
    pub fn request_keyframes(&mut self) {
        let ssrcs: Vec<_> = self.rx.video_ssrcs().collect();
        for ssrc in ssrcs {
            if let Some(rx) = self.rtc.direct_api().stream_rx(&ssrc) {
                rx.request_keyframe(KeyframeRequestKind::Pli);
            }
        }
    }

    /// Send a REMB (receiver estimated maximum bitrate) on every video stream received, as a
    /// receiver without TWCC feedback does.
    pub fn request_remb(&mut self, bps: u64) {
        let ssrcs: Vec<_> = self.rx.video_ssrcs().collect();
        for ssrc in ssrcs {
            if let Some(rx) = self.rtc.direct_api().stream_rx(&ssrc) {
                rx.request_remb(Bitrate::bps(bps));
            }
        }
    }

    /// Ask for a keyframe on one received stream (by index into `rx.streams`); false if str0m
    /// has no such stream.
    pub fn request_keyframe_on(&mut self, stream: usize) -> bool {
        let Some(ssrc) = self.rx.streams.get(stream).map(|s| s.ssrc) else { return false };
        let mut api = self.rtc.direct_api();
        let Some(rx) = api.stream_rx(&ssrc) else { return false };
        rx.request_keyframe(KeyframeRequestKind::Pli);
        true
    }
}
