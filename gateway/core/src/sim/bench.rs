//! Benchmark support on top of the simulation: a publisher and N subscribers connected to one
//! engine, publisher datagrams prepared outside the measured region, and a measured region that
//! is only the engine's work: `handle_receive` of each publisher datagram (SRTP unprotect,
//! forwarding, one SRTP protect per subscriber), its due timers, and taking every output.
//! Nothing goes on the simulated network while measuring; between batches the network runs
//! briefly so ICE consent, RTCP and the engine's liveness deadlines stay satisfied.
//!
//! SRTP profile: str0m 0.25 has no setting for the profiles it offers or accepts (its DTLS,
//! dimpl, always prefers AEAD_AES_256_GCM, then AEAD_AES_128_GCM, then AES_CM_128_HMAC_SHA1_80).
//! To measure the others, [`install_srtp_override`] installs a process-wide crypto provider
//! whose DTLS reports the negotiated keying material as the chosen profile on both ends (the
//! material is cut to that profile's length; both ends cut the same bytes, so the keys agree).
//! The SRTP that follows is the real implementation of that profile.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use str0m::crypto::dtls::{
    DtlsCert, DtlsImplError, DtlsInstance, DtlsOutput, DtlsProvider, DtlsVersion, KeyingMaterial, ProtocolVersion,
    SrtpProfile,
};
use str0m::crypto::{CryptoError, CryptoProvider};
use str0m::format::Codec;
use str0m::media::MediaKind;
use str0m::rtp::RtpWrite;
use test_peer::vp8::{self, Descriptor};
use test_peer::Out;

use super::Sim;
use crate::{ConnKey, CoreConfig, Engine, Output, Relay, RelayedPacket};

/// SRTP profiles a benchmark can force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Srtp {
    /// What str0m negotiates by itself (and with every browser): AEAD_AES_256_GCM.
    AeadAes256Gcm,
    AeadAes128Gcm,
    AesCm128HmacSha1_80,
}

impl fmt::Display for Srtp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Srtp::AeadAes256Gcm => "aes256gcm",
            Srtp::AeadAes128Gcm => "aes128gcm",
            Srtp::AesCm128HmacSha1_80 => "aescm-sha1",
        })
    }
}

static FORCED: AtomicU8 = AtomicU8::new(0);
static INNER: OnceLock<CryptoProvider> = OnceLock::new();

/// Install the overriding provider as the process default (once; before any `Rtc` is built),
/// then pick the profile for connections made from now on.
pub fn install_srtp_override(profile: Srtp) {
    let inner = INNER.get_or_init(str0m::crypto::from_feature_flags);
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        static DTLS: ForcedProfileDtls = ForcedProfileDtls;
        let mut p = inner.clone();
        p.dtls_provider = &DTLS;
        p.install_process_default();
    });
    FORCED.store(profile as u8, Ordering::Relaxed);
}

#[derive(Debug)]
struct ForcedProfileDtls;

impl DtlsProvider for ForcedProfileDtls {
    fn generate_certificate(&self) -> Option<DtlsCert> {
        INNER.get()?.dtls_provider.generate_certificate()
    }

    fn new_dtls(
        &self,
        cert: &DtlsCert,
        now: Instant,
        version: DtlsVersion,
        mtu: Option<usize>,
    ) -> Result<Box<dyn DtlsInstance>, CryptoError> {
        let inner = INNER.get().expect("installed before use").dtls_provider.new_dtls(cert, now, version, mtu)?;
        Ok(Box::new(ForcedProfileInstance { inner, forced: FORCED.load(Ordering::Relaxed) }))
    }
}

#[derive(Debug)]
struct ForcedProfileInstance {
    inner: Box<dyn DtlsInstance>,
    forced: u8,
}

impl DtlsInstance for ForcedProfileInstance {
    fn set_active(&mut self, active: bool) {
        self.inner.set_active(active)
    }
    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        self.inner.handle_packet(packet)
    }
    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        match self.inner.poll_output(buf) {
            DtlsOutput::KeyingMaterial(km, negotiated) => {
                let (profile, len) = match self.forced {
                    x if x == Srtp::AeadAes128Gcm as u8 => (SrtpProfile::AEAD_AES_128_GCM, 16 * 2 + 12 * 2),
                    x if x == Srtp::AesCm128HmacSha1_80 as u8 => (SrtpProfile::AES128_CM_SHA1_80, 16 * 2 + 14 * 2),
                    _ => return DtlsOutput::KeyingMaterial(km, negotiated),
                };
                let bytes: &[u8] = &km;
                DtlsOutput::KeyingMaterial(KeyingMaterial::new(&bytes[..len.min(bytes.len())]), profile)
            }
            other => other,
        }
    }
    fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsImplError> {
        self.inner.handle_timeout(now)
    }
    fn send_application_data(&mut self, data: &[u8]) -> Result<usize, DtlsImplError> {
        self.inner.send_application_data(data)
    }
    fn is_active(&self) -> bool {
        self.inner.is_active()
    }
    fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.inner.protocol_version()
    }
    fn is_closing(&self) -> bool {
        self.inner.is_closing()
    }
    fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }
    fn close(&mut self) -> Result<(), DtlsImplError> {
        self.inner.close()
    }
}

/// Virtual time between two publisher packets (500 packets/s, a 1080p-class video stream).
const PACKET_INTERVAL: Duration = Duration::from_millis(2);
/// Datagrams handled between two timer checks in [`Fanout::forward`].
const TIMER_CHECK_EVERY: usize = 8;
/// Most publisher packets in one measured batch: 1 s of virtual time, well inside ICE consent
/// and the engine's disconnect grace.
pub const MAX_BATCH: usize = 500;

/// One publisher fanned out to `subscribers` subscribers.
pub struct Fanout {
    pub sim: Sim,
    publisher: usize,
    key: ConnKey,
    from: SocketAddr,
    to: SocketAddr,
    seq: u64,
    payload_len: usize,
    /// Datagrams for the publisher, delivered after the measured region.
    back: Vec<(SocketAddr, Vec<u8>)>,
    /// Datagrams handled between two timer checks in [`Fanout::forward`] (a media worker's
    /// loop pass reads every ready datagram before it looks at timers).
    pub timer_check_every: usize,
}

/// A prepared publisher datagram and the instant it arrives.
pub struct Datagram {
    pub at: Instant,
    pub bytes: Vec<u8>,
    /// SRTP (not SRTCP), by RFC 5761 demultiplexing.
    pub rtp: bool,
}

impl Fanout {
    /// Connect a publisher and `subscribers` subscribers (each receiving its audio and video).
    pub fn new(subscribers: usize, payload_len: usize, seed: u64) -> Self {
        // Bandwidth estimation off: the measured region sends at 4 Mbit/s without letting virtual
        // time pass, which an estimator would not believe for long.
        let cfg = CoreConfig { stats_interval: Duration::from_secs(1), bwe: false, ..CoreConfig::default() };
        Self::with_config(subscribers, payload_len, seed, cfg)
    }

    /// As [`Fanout::new`] with the engine's configuration given (bandwidth estimation on, the
    /// old send path, …).
    pub fn with_config(subscribers: usize, payload_len: usize, seed: u64, cfg: CoreConfig) -> Self {
        let mut sim = Sim::new(seed, cfg);
        let publisher = sim.add_peer("pub");
        sim.publish(publisher);
        assert!(sim.run_until(Duration::from_secs(10), |s| s.peers[publisher].connected), "publisher connects");
        let subs: Vec<usize> = (0..subscribers).map(|i| sim.add_peer(&format!("sub{i}"))).collect();
        for &s in &subs {
            sim.subscribe(s);
        }
        let all = subs.clone();
        assert!(
            sim.run_until(Duration::from_secs(30), move |s| all.iter().all(|&i| s.peers[i].connected)),
            "subscribers connect"
        );
        // Media until every subscriber has started on a keyframe (the gateway forwards video to a
        // subscriber only from a keyframe on, and asks the publisher for one at READY).
        let all = subs.clone();
        let started = move |s: &Sim| all.iter().all(|&i| s.first_keyframe_at(i).is_some());
        for _ in 0..250 {
            if started(&sim) {
                break;
            }
            sim.send_media(publisher, 1);
            sim.run_for(Duration::from_millis(20));
        }
        assert!(started(&sim), "every subscriber receives video");
        Self::connected(sim, publisher, payload_len)
    }

    /// Around a simulation whose `publisher` is connected and whose subscribers receive.
    fn connected(sim: Sim, publisher: usize, payload_len: usize) -> Self {
        let key = sim.peers[publisher].key.expect("publisher has a connection");
        let to = sim.sockets.iter().find(|(_, k)| **k == key).map(|(a, _)| *a).expect("publisher socket");
        let from = sim.peers[publisher].addr;
        // Continue the publisher's sequence numbers: a jump of 2^15 or more would make the
        // receiver guess the wrong SRTP rollover counter.
        let seq = sim.peers[publisher].layers.first().map_or(1000, |l| l.seq) - 1;
        Self { sim, publisher, key, from, to, seq, payload_len, back: Vec::new(), timer_check_every: TIMER_CHECK_EVERY }
    }

    /// Write `n` (≤ [`MAX_BATCH`]) video packets at the publisher, one every 2 ms of virtual time
    /// from now, and return the datagrams it sends (RTP and whatever RTCP comes with them),
    /// without delivering them.
    pub fn prepare(&mut self, n: usize) -> Vec<Datagram> {
        let mut out = Vec::with_capacity(n + 8);
        let p = &mut self.sim.peers[self.publisher];
        let Some(mid) = p.client.video_mid else { return out };
        let Some(pt) = p.client.pt_for(mid, Codec::Vp8) else { return out };
        let mut at = self.sim.now;
        for _ in 0..n.min(MAX_BATCH) {
            at += PACKET_INTERVAL;
            self.seq += 1;
            // A one-packet VP8 delta frame (payload descriptor with S set, P bit set), numbered.
            let mut payload = Vec::with_capacity(self.payload_len.max(10));
            vp8::push_synthetic_header(&mut payload, true, Descriptor::Plain, false);
            payload.extend_from_slice(&self.seq.to_be_bytes());
            payload.resize(self.payload_len.max(10), 0);
            let ts = (p.frames + 1).wrapping_mul(20 * 90);
            let write = RtpWrite::new(pt, self.seq.into(), ts, at, payload).marker(true).nackable(true);
            if !p.client.write_rtp(mid, None, write) {
                break;
            }
            p.frames += 1;
            loop {
                match p.client.poll_output(at) {
                    Ok(Out::Transmit(t)) => {
                        let bytes: Vec<u8> = t.contents.into();
                        let rtp = bytes.len() > 1 && !(192..=223).contains(&bytes[1]);
                        out.push(Datagram { at, bytes, rtp });
                    }
                    // Stats and feedback events of the publisher are of no interest here.
                    Ok(Out::Event(_) | Out::Rtp(..)) => {}
                    _ => break,
                }
            }
        }
        // The simulation's own writer continues after these.
        if let Some(l) = p.layers.first_mut() {
            l.seq = self.seq + 1;
        }
        out
    }

    /// The measured part: the engine receives each datagram at its instant, runs due timers, and
    /// every output is taken (and dropped). Returns the datagrams the engine sent.
    pub fn forward(&mut self, batch: &[Datagram]) -> usize {
        self.forward_then(batch, |_| {})
    }

    /// [`Fanout::forward`], calling `after` with the engine after each datagram's outputs
    /// were taken (a spread room's home hands its relayed packets on there).
    fn forward_then(&mut self, batch: &[Datagram], mut after: impl FnMut(&mut Engine)) -> usize {
        let mut sent = 0;
        let engine = &mut self.sim.engine;
        for (i, d) in batch.iter().enumerate() {
            engine.handle_receive(d.at, self.key, self.from, self.to, &d.bytes);
            // The media worker looks at timers once per loop iteration, after reading what its
            // sockets had; `poll_timeout` scans every connection, so not per datagram here either.
            if i % self.timer_check_every.max(1) == 0 && engine.poll_timeout().is_some_and(|t| t <= d.at) {
                engine.handle_timeout(d.at);
            }
            while let Some(o) = engine.poll_output() {
                match o {
                    // What goes back to the publisher (STUN answers to its consent checks, RTCP)
                    // is delivered, or its ICE agent would give up after ~40 s.
                    Output::Transmit { destination, contents, .. } if destination == self.from => {
                        self.back.push((destination, contents));
                    }
                    Output::Transmit { contents, .. } => {
                        sent += 1;
                        // Sent: its buffer goes back, as the media worker hands it back after
                        // `sendto`.
                        engine.recycle(std::hint::black_box(contents));
                    }
                    Output::Event(e) => self.sim.events.push(e),
                    Output::Closed { .. } => {}
                }
            }
            after(engine);
        }
        if let Some(last) = batch.last() {
            self.sim.now = self.sim.now.max(last.at);
        }
        sent
    }

    fn deliver_back(&mut self) {
        for (to, bytes) in std::mem::take(&mut self.back) {
            self.sim.send(Some(self.publisher), false, self.to, to, bytes);
        }
    }

    /// Unmeasured: let the network run a little so consent checks and RTCP flow both ways.
    pub fn keepalive(&mut self) {
        self.deliver_back();
        self.sim.run_for(Duration::from_millis(30));
    }

    /// How many subscribers still receive (a benchmark must not measure a dying call).
    pub fn live_subscribers(&self) -> usize {
        self.sim.engine.connection_count().saturating_sub(1)
    }

    /// The SRTP profile the publisher's connection ended up with (inferred from the tag).
    pub fn srtp_profile(&self) -> Option<String> {
        let id = self.sim.peers[self.publisher].connection_id.clone()?;
        self.sim.engine.stats(&id)?.srtp_profile
    }

    /// Video packets the subscribers received during setup and keepalives.
    pub fn received_video(&self) -> usize {
        video_received(&self.sim)
    }
}

/// Video packets the peers of a simulation received (decoded by their clients).
fn video_received(sim: &Sim) -> usize {
    sim.peers.iter().map(|p| p.rx.received.iter().filter(|r| r.kind == MediaKind::Video).count()).sum()
}

/// Packets in flight between the two engines of a [`SpreadFanout`] (the gateway's queue per
/// worker pair has the same bound).
const RELAY_QUEUE: usize = 4096;

/// One publisher's room spread over two engines as two media workers hold it with
/// `media.spread`: the home (worker 0) holds the publisher and the first half of the
/// subscribers, the mirror (worker 1) the other half, and the home hands every publisher packet
/// to the mirror as a [`RelayedPacket`] (the payload's `Arc`, not a copy). Measured either on one
/// thread ([`SpreadFanout::forward_serial`]) or with the mirror on a second thread behind a
/// bounded lock-free queue ([`SpreadFanout::forward_parallel`]), as the gateway's workers run.
pub struct SpreadFanout {
    pub home: Fanout,
    pub mirror: Sim,
    /// Subscribers on the home and on the mirror.
    pub split: (usize, usize),
    relays: Vec<(usize, Relay)>,
    packets: Vec<(usize, RelayedPacket)>,
}

impl SpreadFanout {
    /// Connect a publisher and `subscribers` subscribers, split over the two engines.
    pub fn new(subscribers: usize, payload_len: usize, seed: u64, cfg: CoreConfig) -> Self {
        let mut home = Sim::new(seed, cfg.clone());
        home.engine.set_spread(0, 2);
        let mut mirror = Sim::new(seed ^ 0x5eed, cfg);
        mirror.now = home.now;
        mirror.engine.set_spread(1, 2);
        mirror.engine.create_mirror_room(&home.room, 0);
        let (mut relays, mut packets) = (Vec::new(), Vec::new());
        let mut pair = Pair { home: &mut home, mirror: &mut mirror, relays: &mut relays, packets: &mut packets };
        let split = (subscribers - subscribers / 2, subscribers / 2);
        let publisher = pair.home.add_peer("pub");
        pair.home.publish(publisher);
        assert!(pair.run_until(Duration::from_secs(10), |h, _| h.peers[publisher].connected), "publisher connects");
        let on_home: Vec<usize> = (0..split.0).map(|i| pair.home.add_peer(&format!("sub{i}"))).collect();
        let on_mirror: Vec<usize> = (0..split.1).map(|i| pair.mirror.add_peer(&format!("sub{i}"))).collect();
        for &i in &on_home {
            pair.home.subscribe(i);
        }
        for &i in &on_mirror {
            pair.mirror.subscribe(i);
        }
        let connected = |h: &Sim, m: &Sim| {
            on_home.iter().all(|&i| h.peers[i].connected) && on_mirror.iter().all(|&i| m.peers[i].connected)
        };
        assert!(pair.run_until(Duration::from_secs(30), connected), "subscribers connect on both engines");
        // Media until every subscriber on either engine has started on a keyframe (the mirror
        // asks the home for one; the home's publisher answers it).
        let started = |h: &Sim, m: &Sim| {
            on_home.iter().all(|&i| h.first_keyframe_at(i).is_some())
                && on_mirror.iter().all(|&i| m.first_keyframe_at(i).is_some())
        };
        for _ in 0..250 {
            if started(pair.home, pair.mirror) {
                break;
            }
            pair.home.send_media(publisher, 1);
            pair.run_for(Duration::from_millis(20));
        }
        assert!(started(pair.home, pair.mirror), "every subscriber on both engines receives video");
        Self { home: Fanout::connected(home, publisher, payload_len), mirror, split, relays, packets }
    }

    /// Publisher datagrams for the next measured batch (see [`Fanout::prepare`]).
    pub fn prepare(&mut self, n: usize) -> Vec<Datagram> {
        self.home.prepare(n)
    }

    /// Both engines on this thread: each relayed packet goes to the mirror as soon as the home
    /// queued it. Returns the datagrams both engines sent.
    pub fn forward_serial(&mut self, batch: &[Datagram]) -> usize {
        let Self { home, mirror, relays, packets, .. } = self;
        let every = home.timer_check_every.max(1);
        let mut n = 0;
        let mut mirror_sent = 0;
        let home_sent = home.forward_then(batch, |engine| {
            engine.take_relays(relays, packets);
            for (_, p) in packets.drain(..) {
                mirror_sent += mirror_take(mirror, p, &mut n, every);
            }
        });
        home_sent + mirror_sent
    }

    /// The mirror on a second thread, fed through a bounded lock-free queue as the gateway's
    /// workers are (where the gateway drops a packet on a full queue, this waits: the benchmark
    /// measures throughput, not loss). Returns the datagrams both engines sent.
    pub fn forward_parallel(&mut self, batch: &[Datagram]) -> usize {
        let Self { home, mirror, relays, packets, .. } = self;
        let every = home.timer_check_every.max(1);
        let queue = ArrayQueue::new(RELAY_QUEUE);
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            let worker = s.spawn(|| {
                let (mut n, mut sent) = (0, 0);
                loop {
                    // Read the flag before the queue: once it is set, one more empty pop means
                    // the home pushed everything.
                    let finished = done.load(Ordering::Acquire);
                    match queue.pop() {
                        Some(p) => sent += mirror_take(mirror, p, &mut n, every),
                        None if finished => break,
                        None => std::hint::spin_loop(),
                    }
                }
                sent
            });
            let home_sent = home.forward_then(batch, |engine| {
                engine.take_relays(relays, packets);
                for (_, mut p) in packets.drain(..) {
                    while let Err(back) = queue.push(p) {
                        p = back;
                        std::hint::spin_loop();
                    }
                }
            });
            done.store(true, Ordering::Release);
            home_sent + worker.join().expect("the mirror's thread")
        })
    }

    /// Unmeasured: both networks run a little (consent, RTCP, relays both ways).
    pub fn keepalive(&mut self) {
        self.home.deliver_back();
        Pair {
            home: &mut self.home.sim,
            mirror: &mut self.mirror,
            relays: &mut self.relays,
            packets: &mut self.packets,
        }
        .run_for(Duration::from_millis(30));
    }

    /// Subscribers still receiving on either engine.
    pub fn live_subscribers(&self) -> usize {
        self.home.live_subscribers() + self.mirror.engine.connection_count()
    }

    /// Video packets the mirror's subscribers received (relayed from the home, decoded by their
    /// clients) during setup and keepalives.
    pub fn mirror_received_video(&self) -> usize {
        video_received(&self.mirror)
    }
}

/// The two engines of a spread room with their networks, stepped together (unmeasured).
struct Pair<'a> {
    home: &'a mut Sim,
    mirror: &'a mut Sim,
    relays: &'a mut Vec<(usize, Relay)>,
    packets: &'a mut Vec<(usize, RelayedPacket)>,
}

impl Pair<'_> {
    fn run_for(&mut self, d: Duration) {
        let _ = self.run_until(d, |_, _| false);
    }

    /// Run both networks until `done` holds or `limit` of virtual time has passed, handing
    /// relays across every millisecond.
    fn run_until(&mut self, limit: Duration, done: impl Fn(&Sim, &Sim) -> bool) -> bool {
        let end = self.home.now + limit;
        while self.home.now < end {
            if done(self.home, self.mirror) {
                return true;
            }
            let step = (self.home.now + Duration::from_millis(1)).min(end);
            self.home.run_until_time(step, |_| false);
            let now = self.home.now;
            if self.mirror.now < now {
                self.mirror.run_until_time(now, |_| false);
            }
            self.exchange();
        }
        done(self.home, self.mirror)
    }

    /// Hand what each engine queued for the other across.
    fn exchange(&mut self) {
        let Self { home, mirror, relays, packets } = self;
        home.engine.take_relays(relays, packets);
        for (_, r) in relays.drain(..) {
            mirror.engine.handle_relay(mirror.now, r);
        }
        for (_, p) in packets.drain(..) {
            mirror.engine.handle_relayed_packet(mirror.now, p);
        }
        mirror.pump_engine();
        mirror.engine.take_relays(relays, packets);
        for (_, r) in relays.drain(..) {
            home.engine.handle_relay(home.now, r);
        }
        home.pump_engine();
    }
}

/// A relayed packet on the mirror: its fan-out, due timers every `every` packets, every output
/// taken. Returns the datagrams sent.
fn mirror_take(mirror: &mut Sim, p: RelayedPacket, n: &mut usize, every: usize) -> usize {
    let at = p.read_at;
    let engine = &mut mirror.engine;
    engine.handle_relayed_packet(at, p);
    if *n % every == 0 && engine.poll_timeout().is_some_and(|t| t <= at) {
        engine.handle_timeout(at);
    }
    *n += 1;
    let mut sent = 0;
    while let Some(o) = engine.poll_output() {
        match o {
            Output::Transmit { contents, .. } => {
                sent += 1;
                std::hint::black_box(contents);
            }
            Output::Event(e) => mirror.events.push(e),
            Output::Closed { .. } => {}
        }
    }
    mirror.now = mirror.now.max(at);
    sent
}

/// CPU time this thread has run, from the scheduler (`/proc/thread-self/schedstat`, ns). The
/// benchmarks measure this rather than wall time: on a shared machine other processes' load
/// inflates wall time, not the CPU the engine itself needed.
pub fn thread_cpu_time() -> Duration {
    let ns = std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
        .unwrap_or(0);
    Duration::from_nanos(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_fans_out_to_every_subscriber() {
        let mut f = Fanout::new(3, 1000, 1);
        let batch = f.prepare(50);
        assert!(batch.len() >= 50);
        let sent = f.forward(&batch);
        assert!(sent >= 150, "one SRTP datagram per packet per subscriber: {sent}");
        f.keepalive();
        assert_eq!(f.live_subscribers(), 3);
        assert_eq!(f.srtp_profile().as_deref(), Some("AEAD_AES_256_GCM"));
    }

    #[test]
    fn a_spread_room_fans_out_on_both_engines_serial_and_parallel() {
        let cfg = CoreConfig { stats_interval: Duration::from_secs(1), bwe: false, ..CoreConfig::default() };
        let mut f = SpreadFanout::new(5, 1000, 3, cfg);
        assert_eq!(f.split, (3, 2));
        assert_eq!(f.mirror.engine.subscriber_count(), 2, "the mirror serves its half");
        let relayed_before = f.mirror_received_video();
        assert!(relayed_before > 0, "the mirror's subscribers decoded relayed video during setup");
        for parallel in [false, true] {
            let batch = f.prepare(40);
            let packets = batch.iter().filter(|d| d.rtp).count();
            let sent = if parallel { f.forward_parallel(&batch) } else { f.forward_serial(&batch) };
            // Every packet reaches all five subscribers, three sent by the home, two by the mirror.
            assert!(sent >= packets * 5, "parallel={parallel}: {sent} < {packets} x 5");
            f.keepalive();
            assert_eq!(f.live_subscribers(), 5, "parallel={parallel}");
        }
    }
}
