//! A media worker: one OS thread with a mio event loop that owns an [`Engine`] and the UDP
//! sockets of its rooms' connections. The packet path (read → engine → send) runs entirely on
//! this thread with no locks. The control plane talks to it through a command channel plus a
//! mio `Waker`, and gets replies on oneshots sent only after the events the command caused have
//! been handed to the event sink. With ICE-TCP on it also owns the TCP streams of its
//! connections (`crate::tcp`), handed to it by the listener.

use std::collections::HashMap;
use std::io::{ErrorKind, Read};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use gateway_core::{
    ConnKey, ConnectionSpec, CoreConfig, Engine, MediaError, NewConnection, Output, Protocol, UfragChange,
};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use signaling_api::media::EventSink;
use signaling_api::protocol::ErrorCode;
use tokio::sync::oneshot;

use crate::load::{Load, PassBudget, SlowDown, READ_PER_SOCKET, SOCKET_BUFFER_BYTES};
use crate::metrics::MediaMetrics;
use crate::ports::{BindError, PortPool};
use crate::tcp::{self, DropReason, Link, UfragDirectory};
use crate::udp::SendQueue;

const WAKE: Token = Token(usize::MAX);
/// The worker's shared socket (`media.mux`).
const SHARED: Token = Token(usize::MAX - 1);
/// ICE-TCP streams: `LINKS + n` (below `SHARED`; connection sockets use their small keys).
const LINKS: usize = usize::MAX / 2;
/// Largest datagram we read; WebRTC stays well below.
const RECV_BUF: usize = 2048;

/// At most one warning this often about connections refused for want of a socket.
const SOCKET_WARN_EVERY: Duration = Duration::from_secs(10);
/// What one read of an ICE-TCP stream takes at most.
const TCP_READ_BUF: usize = 16 * 1024;
/// Bytes read from one ICE-TCP stream per loop pass before the others get their turn (a stream
/// that keeps its socket full cannot hold the worker; the rest is read on the next pass).
const TCP_READ_BUDGET: usize = 64 * 1024;
/// How often counters are published to Prometheus.
const METRICS_EVERY: Duration = Duration::from_secs(1);

pub type Reply<T> = oneshot::Sender<Result<T, MediaError>>;

pub enum Command {
    CreateRoom {
        room_id: String,
        /// `media.spread`: the room's home worker, when it is not this one (a mirror).
        home: Option<usize>,
        reply: Reply<()>,
    },
    CloseRoom {
        room_id: String,
        reason: &'static str,
        reply: Reply<()>,
    },
    Publish {
        spec: ConnectionSpec,
        offer: String,
        reply: Reply<()>,
    },
    Republish {
        connection_id: String,
        offer: String,
        reply: Reply<()>,
    },
    Subscribe {
        spec: ConnectionSpec,
        reply: Reply<()>,
    },
    /// A subscribe connection the client offers (WHEP), playing `publisher`'s tracks.
    Play {
        spec: ConnectionSpec,
        publisher: String,
        offer: String,
        reply: Reply<()>,
    },
    Resubscribe {
        connection_id: String,
        reply: Reply<()>,
    },
    /// Restart ICE on a client-offered connection with the client's new credentials (PATCH).
    RestartIceRemote {
        connection_id: String,
        ufrag: String,
        pwd: String,
        reply: Reply<gateway_core::IceRestarted>,
    },
    /// Send a subscribe connection's outstanding offer again.
    ResendOffer {
        connection_id: String,
        reply: Reply<()>,
    },
    /// Re-offer a subscribe connection with new ICE credentials.
    RestartIce {
        connection_id: String,
        reply: Reply<()>,
    },
    Answer {
        connection_id: String,
        sdp: String,
        reply: Reply<()>,
    },
    SetLayer {
        connection_id: String,
        stream_id: String,
        rid: Option<String>,
        reply: Reply<()>,
    },
    SetTrackBlocked {
        room_id: String,
        stream_id: String,
        blocked: bool,
        reply: Reply<()>,
    },
    Candidate {
        connection_id: String,
        candidate: String,
        reply: Reply<()>,
    },
    Close {
        connection_id: String,
        reason: String,
        reply: Reply<()>,
    },
    Stats {
        connection_id: String,
        reply: oneshot::Sender<Option<serde_json::Value>>,
    },
    /// An ICE-TCP stream whose first frame (`first`, a STUN Binding request) names one of this
    /// worker's connections by our ufrag (`crate::tcp`). Non-blocking.
    TcpStream {
        stream: std::net::TcpStream,
        peer: SocketAddr,
        first: Vec<u8>,
    },
    Shutdown,
}

/// What the rest of the process holds of a worker.
#[derive(Clone)]
pub struct WorkerHandle {
    pub(crate) tx: mpsc::Sender<Command>,
    pub(crate) waker: Arc<Waker>,
    /// Rooms pinned to this worker (for least-loaded placement).
    pub rooms: Arc<AtomicUsize>,
    /// Subscribe connections on this worker, as the worker last counted them (spread rooms
    /// place new ones by this plus `placing`).
    pub subscribers: Arc<AtomicUsize>,
    /// Subscribe connections placed on this worker whose create command has not been answered
    /// yet: the worker's own count cannot include them, and storing that count must not
    /// erase them, or two joins in a row could both see this worker as the emptiest.
    pub placing: Arc<AtomicUsize>,
}

impl WorkerHandle {
    pub fn send(&self, cmd: Command) -> bool {
        if self.tx.send(cmd).is_err() {
            return false;
        }
        self.waker.wake().is_ok()
    }
}

/// Shared with the media plane front: connection → worker, cleaned when connections end.
pub type Directory = dashmap::DashMap<String, usize>;

pub struct WorkerSetup {
    pub index: usize,
    pub core: CoreConfig,
    pub bind_ip: IpAddr,
    pub candidate_ip: IpAddr,
    pub ports: Arc<PortPool>,
    pub sink: Arc<dyn EventSink>,
    pub directory: Arc<Directory>,
    pub metrics: MediaMetrics,
    /// `media.mux`: the one socket every connection of this worker uses (bound, non-blocking).
    pub shared: Option<std::net::UdpSocket>,
    /// ICE-TCP on (`media.tcp_port`): the listener's ufrag → worker index, which this worker
    /// keeps current for its connections.
    pub ufrags: Option<Arc<UfragDirectory>>,
    /// `media.spread`: this worker's link to the others.
    pub spread: Option<crate::spread::Link>,
}

/// What `flush_timed` is given for a packet relayed from another worker: every datagram it
/// causes is a forwarded one.
const RELAYED: ConnKey = ConnKey(u64::MAX);

/// Read one datagram. The first read from a socket in a pass (`first`) takes the oldest
/// datagram it holds, whose wait is the socket's longest: only that one is read with its
/// kernel timestamp (`udp::recv_stamped`), the rest with a plain `recv_from`.
fn receive(socket: &UdpSocket, buf: &mut [u8], first: bool) -> std::io::Result<(usize, SocketAddr, Option<Duration>)> {
    if first {
        crate::udp::recv_stamped(socket, buf)
    } else {
        socket.recv_from(buf).map(|(n, source)| (n, source, None))
    }
}

/// A socket shared by every connection of the worker, and what waits to be sent on it.
struct Shared {
    socket: UdpSocket,
    candidate: SocketAddr,
    queue: SendQueue,
}

struct Sock {
    socket: UdpSocket,
    port: u16,
    /// Our candidate address: what the client sends to.
    candidate: SocketAddr,
}

pub fn spawn(setup: WorkerSetup) -> std::io::Result<(WorkerHandle, std::thread::JoinHandle<()>)> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
    let (tx, rx) = mpsc::channel();
    let rooms = Arc::new(AtomicUsize::new(0));
    let subscribers = Arc::new(AtomicUsize::new(0));
    if let Some(link) = &setup.spread {
        link.hub.set_waker(link.me, Arc::clone(&waker));
    }
    let handle = WorkerHandle {
        tx,
        waker,
        rooms: Arc::clone(&rooms),
        subscribers: Arc::clone(&subscribers),
        placing: Arc::new(AtomicUsize::new(0)),
    };
    let join = std::thread::Builder::new()
        .name(format!("media-{}", setup.index))
        .spawn(move || Worker::new(setup, poll, rx, rooms, subscribers).run())?;
    Ok((handle, join))
}

struct Worker {
    setup: WorkerSetup,
    poll: Poll,
    rx: mpsc::Receiver<Command>,
    engine: Engine,
    /// A socket per connection, or
    sockets: HashMap<ConnKey, Sock>,
    /// one socket for all of them (`media.mux`).
    shared: Option<Shared>,
    /// ICE-TCP streams by token (`LINKS + n`), the token of each by the client's address, the
    /// streams with frames queued since the last send, and buffers for reading them.
    links: HashMap<usize, Link>,
    link_by_peer: HashMap<SocketAddr, usize>,
    links_to_send: Vec<usize>,
    /// Streams that used their read budget with data still waiting: read on the next pass
    /// (mio is edge-triggered: no new event would come for what is already there).
    links_to_read: Vec<usize>,
    next_link: usize,
    tcp_read: Vec<u8>,
    tcp_frame: Vec<u8>,
    next_key: u64,
    /// When a connection was last refused for want of a socket, per reason (range exhausted,
    /// out of file descriptors, other): each logged at most every [`SOCKET_WARN_EVERY`].
    socket_warned: [Option<Instant>; 3],
    rooms: Arc<AtomicUsize>,
    subscribers: Arc<AtomicUsize>,
    /// Spread rooms: what the engine produced for other workers, on its way to the hub, and
    /// packets from other workers left for the next pass (its read budget ran out).
    relay_msgs: Vec<(usize, gateway_core::Relay)>,
    relay_pkts: Vec<(usize, gateway_core::RelayedPacket)>,
    relay_pending: bool,
    relayed: u64,
    relay_dropped: u64,
    published: gateway_core::Counters,
    busy: Duration,
    /// Datagrams and frames sent, and their bytes, since the last metrics publication (plain
    /// fields: the packet path touches no shared atomics).
    egress_packets: u64,
    egress_bytes: u64,
    last_metrics: Instant,
    /// `gateway_forward_latency_seconds` of this worker, buffered locally (flushed with the
    /// other metrics once a second) so the packet path touches no shared atomics.
    forward_latency: prometheus::local::LocalHistogram,
    /// Overload (`crate::load`): the level and what it is decided from.
    load: Load,
    /// What this loop pass may still read, and the sockets (tokens) left with datagrams
    /// waiting when it ran out: read first in the next pass (mio is edge-triggered: no new
    /// event comes for what is already there).
    pass: PassBudget,
    deferred: Vec<usize>,
    /// `media.test_slow_ns`.
    slow: SlowDown,
}

impl Worker {
    fn new(
        mut setup: WorkerSetup,
        poll: Poll,
        rx: mpsc::Receiver<Command>,
        rooms: Arc<AtomicUsize>,
        subscribers: Arc<AtomicUsize>,
    ) -> Self {
        let mut engine = Engine::new(setup.core.clone());
        if let Some(link) = &setup.spread {
            engine.set_spread(link.me, link.hub.workers());
        }
        let shared = setup.shared.take().and_then(|std_socket| {
            let port = std_socket.local_addr().ok()?.port();
            let mut socket = UdpSocket::from_std(std_socket);
            if let Err(e) = poll.registry().register(&mut socket, SHARED, Interest::READABLE) {
                tracing::error!(worker = setup.index, error = %e, "shared socket registration failed");
                return None;
            }
            let candidate = SocketAddr::new(setup.candidate_ip, port);
            Some(Shared { socket, candidate, queue: SendQueue::default() })
        });
        let label = setup.index.to_string();
        let forward_latency = setup.metrics.forward_latency.with_label_values(&[label.as_str()]).local();
        Self {
            forward_latency,
            setup,
            poll,
            rx,
            engine,
            sockets: HashMap::new(),
            shared,
            links: HashMap::new(),
            link_by_peer: HashMap::new(),
            links_to_send: Vec::new(),
            links_to_read: Vec::new(),
            next_link: 0,
            tcp_read: Vec::new(),
            tcp_frame: Vec::new(),
            next_key: 1,
            socket_warned: [None; 3],
            rooms,
            subscribers,
            relay_msgs: Vec::new(),
            relay_pkts: Vec::new(),
            relay_pending: false,
            relayed: 0,
            relay_dropped: 0,
            published: Default::default(),
            busy: Duration::ZERO,
            egress_packets: 0,
            egress_bytes: 0,
            last_metrics: Instant::now(),
            load: Load::new(Instant::now()),
            pass: PassBudget::new(Instant::now()),
            deferred: Vec::new(),
            slow: SlowDown::default(),
        }
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        let mut buf = vec![0u8; RECV_BUF];
        // `poll_timeout` scans every connection: compute it once per iteration, after the work.
        let mut next = self.engine.poll_timeout();
        loop {
            let now = Instant::now();
            let wait = next.map(|t| t.saturating_duration_since(now)).unwrap_or(METRICS_EVERY).min(METRICS_EVERY);
            let wait = wait.min(self.load.next_tick().saturating_duration_since(now));
            let idle = self.links_to_read.is_empty() && self.deferred.is_empty() && !self.relay_pending;
            let wait = if idle { wait } else { Duration::ZERO };
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(worker = self.setup.index, error = %e, "poll failed; worker stops");
                return;
            }
            let started = Instant::now();
            self.pass = PassBudget::new(started);
            // What the last pass left unread goes first.
            let mut deferred = std::mem::take(&mut self.deferred);
            for token in deferred.drain(..) {
                self.read_token(token, &mut buf);
            }
            if self.deferred.is_empty() {
                self.deferred = deferred;
            }
            if self.relay_pending {
                self.relays_in();
            }
            for ev in events.iter() {
                if ev.token() == WAKE {
                    // Other workers' track changes before the commands that may rely on them.
                    self.relays_in();
                    if !self.commands() {
                        self.shutdown();
                        return;
                    }
                } else if ev.token() == SHARED || ev.token().0 < LINKS {
                    self.read_token(ev.token().0, &mut buf);
                } else if ev.token().0 >= LINKS {
                    let token = ev.token().0;
                    if ev.is_writable() {
                        self.write_link(token);
                    }
                    if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                        self.read_link(token);
                    }
                }
            }
            if !self.links_to_read.is_empty() {
                let mut tokens = std::mem::take(&mut self.links_to_read);
                for token in tokens.drain(..) {
                    self.read_link(token);
                }
                if self.links_to_read.is_empty() {
                    self.links_to_read = tokens;
                }
            }
            let now = Instant::now();
            next = self.engine.poll_timeout();
            if next.is_some_and(|t| t <= now) {
                self.engine.handle_timeout(now);
                self.flush();
                next = self.engine.poll_timeout();
            }
            let busy = started.elapsed();
            self.busy += busy;
            self.load.add_busy(busy);
            if let Some(level) = self.load.tick(Instant::now(), &mut self.engine) {
                self.flush();
                let label = self.setup.index.to_string();
                self.setup.metrics.overload_level.with_label_values(&[label.as_str()]).set(i64::from(level));
                next = self.engine.poll_timeout();
            }
            if self.last_metrics.elapsed() >= METRICS_EVERY {
                self.publish_metrics();
            }
        }
    }

    /// Read a socket by its token, or leave it for the next pass if this one has read enough.
    fn read_token(&mut self, token: usize, buf: &mut [u8]) {
        if self.pass.spent() {
            if !self.deferred.contains(&token) {
                self.deferred.push(token);
            }
        } else if token == SHARED.0 {
            self.read_shared(buf);
        } else {
            self.read(ConnKey(token as u64), buf);
        }
    }

    /// Read the datagrams waiting on a socket, up to the pass's budget and
    /// [`READ_PER_SOCKET`]; a socket with more waiting is read again in the next pass.
    fn read(&mut self, key: ConnKey, buf: &mut [u8]) {
        let mut read = 0;
        loop {
            let Some(sock) = self.sockets.get(&key) else { return };
            if read >= READ_PER_SOCKET || !self.pass.take() {
                let token = key.0 as usize;
                if !self.deferred.contains(&token) {
                    self.deferred.push(token);
                }
                return;
            }
            read += 1;
            let candidate = sock.candidate;
            match receive(&sock.socket, buf, read == 1) {
                Ok((n, source, waited)) => {
                    let read_at = Instant::now();
                    self.load.note_wait(waited);
                    self.engine.handle_receive(read_at, key, source, candidate, &buf[..n]);
                    self.flush_timed(key, read_at);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // Anything else (an ICMP error on Linux): not fatal; wait for the next readiness.
                Err(_) => return,
            }
        }
    }

    /// Read the datagrams waiting on the shared socket, up to the pass's budget; the engine
    /// finds each one's connection.
    fn read_shared(&mut self, buf: &mut [u8]) {
        let mut first = true;
        loop {
            let Some(shared) = &self.shared else { return };
            if !self.pass.take() {
                if !self.deferred.contains(&SHARED.0) {
                    self.deferred.push(SHARED.0);
                }
                return;
            }
            let candidate = shared.candidate;
            match receive(&shared.socket, buf, std::mem::take(&mut first)) {
                Ok((n, source, waited)) => {
                    let read_at = Instant::now();
                    self.load.note_wait(waited);
                    match self.engine.handle_shared_receive(read_at, source, candidate, &buf[..n]) {
                        Some(key) => self.flush_timed(key, read_at),
                        None => self.flush(),
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }

    /// Carry out what the engine produced for a datagram read at `read_at` on `from`'s socket:
    /// every datagram sent on another connection's socket is a forwarded packet, and the time
    /// from the read to its `sendto` (or the `sendmmsg` carrying it) returning is recorded.
    fn flush_timed(&mut self, from: ConnKey, read_at: Instant) {
        self.sync_ufrags();
        self.push_relays();
        let mut forwarded = 0;
        while let Some(out) = self.engine.poll_output() {
            if let Some(key) = self.carry_out(out) {
                if key != from {
                    forwarded += 1;
                    if self.shared.is_none() {
                        self.forward_latency.observe(read_at.elapsed().as_secs_f64());
                    }
                }
            }
        }
        let sent = self.send_queued();
        if self.shared.is_some() {
            let latency = read_at.elapsed().as_secs_f64();
            forwarded = forwarded.min(sent);
            for _ in 0..forwarded {
                self.forward_latency.observe(latency);
            }
        }
        self.slow.charge(forwarded);
        if forwarded > 0 {
            self.load.add_forwarding(read_at.elapsed());
        }
    }

    /// Carry out everything the engine produced.
    fn flush(&mut self) {
        // Ufrags first: the outputs below carry the answer or offer (and its candidates) to the
        // client, which may open its ICE-TCP stream as soon as it has them.
        self.sync_ufrags();
        self.push_relays();
        while let Some(out) = self.engine.poll_output() {
            self.carry_out(out);
        }
        self.send_queued();
    }

    /// Hand what the engine produced for other workers (spread rooms) to the hub and wake
    /// them: before this flush's events reach the control plane, so a worker always knows a
    /// track before a client can hear of it.
    fn push_relays(&mut self) {
        let Some(link) = &self.setup.spread else { return };
        self.engine.take_relays(&mut self.relay_msgs, &mut self.relay_pkts);
        if self.relay_msgs.is_empty() && self.relay_pkts.is_empty() {
            return;
        }
        let mut wake = 0u64;
        for (to, m) in self.relay_msgs.drain(..) {
            link.hub.send(to, m);
            wake |= 1 << to;
        }
        for (to, p) in self.relay_pkts.drain(..) {
            if link.hub.push_packet(link.me, to, p) {
                self.relayed += 1;
                wake |= 1 << to;
            } else {
                self.relay_dropped += 1;
            }
        }
        while wake != 0 {
            let to = wake.trailing_zeros() as usize;
            wake &= wake - 1;
            link.hub.wake(to);
        }
    }

    /// Take what other workers sent (spread rooms): messages first, then packets, within the
    /// pass's read budget (the rest waits for the next pass).
    fn relays_in(&mut self) {
        let Some(link) = &self.setup.spread else { return };
        let (hub, me) = (Arc::clone(&link.hub), link.me);
        let mut got = false;
        while let Ok(m) = link.rx.try_recv() {
            self.engine.handle_relay(Instant::now(), m);
            got = true;
        }
        if got {
            self.flush();
        }
        self.relay_pending = false;
        let mut first = true;
        for from in (0..hub.workers()).filter(|w| *w != me) {
            loop {
                if !self.pass.take() {
                    self.relay_pending = true;
                    return;
                }
                let Some(p) = hub.pop_packet(from, me) else { break };
                let read_at = p.read_at;
                let now = Instant::now();
                if std::mem::take(&mut first) {
                    // How long it waited for this worker: the overload signal, as a socket's.
                    self.load.note_wait(Some(now.saturating_duration_since(read_at)));
                }
                self.engine.handle_relayed_packet(now, p);
                self.flush_timed(RELAYED, read_at);
            }
        }
    }

    /// Tell the ICE-TCP listener which ufrags are this worker's now (before any reply to the
    /// command that made them, so a client's stream can never arrive before its ufrag).
    fn sync_ufrags(&mut self) {
        let Some(dir) = &self.setup.ufrags else { return };
        let me = self.setup.index;
        for change in self.engine.take_ufrag_changes() {
            match change {
                UfragChange::Added(ufrag) => {
                    dir.insert(ufrag, me);
                }
                UfragChange::Removed(ufrag) => {
                    dir.remove_if(&ufrag, |_, w| *w == me);
                }
            }
        }
    }

    /// Send what waits on the shared socket, in as few calls as the kernel takes; returns how
    /// many datagrams went out.
    fn send_queued(&mut self) -> usize {
        if !self.links_to_send.is_empty() {
            // Taken and put back, so its allocation is kept.
            let mut tokens = std::mem::take(&mut self.links_to_send);
            for token in tokens.drain(..) {
                self.write_link(token);
            }
            self.links_to_send = tokens;
        }
        let Some(shared) = &mut self.shared else { return 0 };
        if shared.queue.is_empty() {
            return 0;
        }
        let engine = &mut self.engine;
        let sent = shared.queue.send(&shared.socket, |buf| engine.recycle(buf));
        if sent.failed > 0 {
            self.setup.metrics.send_errors.inc_by(sent.failed as u64);
        }
        sent.datagrams
    }

    /// Carry out one output; returns the connection a datagram was sent (or, on the shared
    /// socket, queued) on, if one was.
    fn carry_out(&mut self, out: Output) -> Option<ConnKey> {
        match out {
            Output::Transmit { key, proto: Protocol::Tcp, destination, contents } => {
                let link = self.link_by_peer.get(&destination).and_then(|t| self.links.get_mut(t).map(|l| (*t, l)));
                let Some((token, link)) = link.filter(|(_, l)| l.key == key) else {
                    self.setup.metrics.ice_tcp_frames_dropped.with_label_values(&["no_stream"]).inc();
                    return None;
                };
                let was_idle = link.out.is_empty();
                if !link.out.push(&contents) {
                    self.setup.metrics.ice_tcp_frames_dropped.with_label_values(&["send_buffer_full"]).inc();
                    return None;
                }
                if was_idle {
                    self.links_to_send.push(token);
                }
                self.egress_packets += 1;
                self.egress_bytes += contents.len() as u64;
                self.engine.recycle(contents);
                return Some(key);
            }
            Output::Transmit { key, destination, contents, .. } => {
                self.egress_packets += 1;
                self.egress_bytes += contents.len() as u64;
                if let Some(shared) = &mut self.shared {
                    shared.queue.push(destination, contents);
                    return Some(key);
                }
                let sock = self.sockets.get(&key)?;
                let failed = sock.socket.send_to(&contents, destination).is_err();
                // The buffer serves the next forwarded packet.
                self.engine.recycle(contents);
                if failed {
                    self.setup.metrics.send_errors.inc();
                    return None;
                }
                return Some(key);
            }
            Output::Event(e) => self.setup.sink.emit(e),
            Output::Closed { key, connection_id } => {
                self.release(key);
                self.close_links_of(key);
                self.setup.directory.remove(&connection_id);
            }
        }
        None
    }

    fn release(&mut self, key: ConnKey) {
        if let Some(mut sock) = self.sockets.remove(&key) {
            let _ = self.poll.registry().deregister(&mut sock.socket);
            self.setup.ports.release(sock.port);
        }
    }

    /// Bind a socket from the pool for a new connection (or, on the shared socket, only name it).
    fn open_socket(&mut self) -> Result<(ConnKey, SocketAddr), MediaError> {
        if let Some(shared) = &self.shared {
            let key = ConnKey(self.next_key);
            self.next_key += 1;
            return Ok((key, shared.candidate));
        }
        let (std_socket, port) = match self.setup.ports.bind(self.setup.bind_ip) {
            Ok(bound) => bound,
            Err(why) => {
                let message = why.message();
                let (kind, hint) = match why {
                    BindError::Exhausted => {
                        (0, "widen media.port_min..port_max (or use media.mux: one port per worker)")
                    }
                    BindError::OutOfFiles { .. } => (1, "raise the open-file limit (ulimit -n, systemd LimitNOFILE)"),
                    BindError::Other(_) => (2, "check media.bind_ip and the system's socket buffers"),
                };
                let warned = &mut self.socket_warned[kind];
                if warned.is_none_or(|t| t.elapsed() >= SOCKET_WARN_EVERY) {
                    *warned = Some(Instant::now());
                    tracing::warn!(worker = self.setup.index, hint, "refusing a connection: {message}");
                }
                return Err(MediaError::new(ErrorCode::NoPorts, message));
            }
        };
        // A burst or a stalled pass waits in the kernel rather than being dropped.
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&std_socket, SOCKET_BUFFER_BYTES);
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(&std_socket, SOCKET_BUFFER_BYTES);
        // How long datagrams wait in it: the overload signal (`load`).
        crate::udp::enable_rx_timestamps(&std_socket);
        let mut socket = UdpSocket::from_std(std_socket);
        let key = ConnKey(self.next_key);
        self.next_key += 1;
        if let Err(e) = self.poll.registry().register(&mut socket, Token(key.0 as usize), Interest::READABLE) {
            self.setup.ports.release(port);
            return Err(MediaError::new(ErrorCode::Internal, format!("socket registration failed: {e}")));
        }
        let candidate = SocketAddr::new(self.setup.candidate_ip, port);
        self.sockets.insert(key, Sock { socket, port, candidate });
        Ok((key, candidate))
    }

    /// Handle queued commands. Returns false on shutdown.
    fn commands(&mut self) -> bool {
        loop {
            let cmd = match self.rx.try_recv() {
                Ok(c) => c,
                Err(mpsc::TryRecvError::Empty) => {
                    self.subscribers.store(self.engine.subscriber_count(), Ordering::Relaxed);
                    return true;
                }
                Err(mpsc::TryRecvError::Disconnected) => return false,
            };
            let now = Instant::now();
            match cmd {
                Command::Shutdown => return false,
                Command::CreateRoom { room_id, home, reply } => {
                    match home {
                        Some(home) => self.engine.create_mirror_room(&room_id, home),
                        None => self.engine.create_room(&room_id),
                    }
                    self.rooms.store(self.engine.room_count(), Ordering::Relaxed);
                    let _ = reply.send(Ok(()));
                }
                Command::CloseRoom { room_id, reason, reply } => {
                    self.engine.close_room(now, &room_id, reason);
                    self.rooms.store(self.engine.room_count(), Ordering::Relaxed);
                    self.flush();
                    let _ = reply.send(Ok(()));
                }
                Command::Publish { spec, offer, reply } => {
                    let r = self.open(now, spec, Some(offer));
                    let _ = reply.send(r);
                }
                Command::Subscribe { spec, reply } => {
                    let r = self.open(now, spec, None);
                    // Counted before the reply, which ends the plane's `placing` for it.
                    self.subscribers.store(self.engine.subscriber_count(), Ordering::Relaxed);
                    let _ = reply.send(r);
                }
                Command::Play { spec, publisher, offer, reply } => {
                    let r = self.open_with(spec, |engine, new| engine.play(now, new, &publisher, &offer));
                    let _ = reply.send(r);
                }
                Command::Republish { connection_id, offer, reply } => {
                    let r = self.engine.republish(now, &connection_id, &offer);
                    self.flush();
                    let _ = reply.send(r);
                }
                Command::Resubscribe { connection_id, reply } => {
                    let r = self.engine.resubscribe(now, &connection_id);
                    self.flush();
                    let _ = reply.send(r);
                }
                Command::RestartIceRemote { connection_id, ufrag, pwd, reply } => {
                    let r = self.engine.restart_ice_remote(now, &connection_id, &ufrag, &pwd);
                    self.flush();
                    let _ = reply.send(r);
                }
                Command::ResendOffer { connection_id, reply } => {
                    let r = self.engine.resend_offer(&connection_id);
                    self.flush();
                    let _ = reply.send(r);
                }
                Command::RestartIce { connection_id, reply } => {
                    let r = self.engine.restart_ice(now, &connection_id);
                    self.flush();
                    let _ = reply.send(r);
                }
                Command::Answer { connection_id, sdp, reply } => {
                    let r = self.engine.answer(now, &connection_id, &sdp);
                    self.flush();
                    let _ = reply.send(r);
                }
                Command::SetLayer { connection_id, stream_id, rid, reply } => {
                    let r = self.engine.set_layer(now, &connection_id, &stream_id, rid.as_deref());
                    self.flush();
                    let _ = reply.send(r);
                }
                Command::SetTrackBlocked { room_id, stream_id, blocked, reply } => {
                    let r = self.engine.set_track_blocked(now, &room_id, &stream_id, blocked);
                    self.flush();
                    let _ = reply.send(r);
                }
                Command::Candidate { connection_id, candidate, reply } => {
                    let r = self.engine.add_candidate(now, &connection_id, &candidate);
                    self.flush();
                    let _ = reply.send(r);
                }
                Command::Close { connection_id, reason, reply } => {
                    self.engine.close_connection(now, &connection_id, &reason);
                    self.flush();
                    let _ = reply.send(Ok(()));
                }
                Command::Stats { connection_id, reply } => {
                    let stats = self.engine.stats(&connection_id).and_then(|s| serde_json::to_value(s).ok());
                    let _ = reply.send(stats);
                }
                Command::TcpStream { stream, peer, first } => self.adopt_stream(now, stream, peer, &first),
            }
        }
    }

    fn open(&mut self, now: Instant, spec: ConnectionSpec, offer: Option<String>) -> Result<(), MediaError> {
        self.open_with(spec, |engine, new| match offer {
            Some(offer) => engine.publish(now, new, &offer),
            None => engine.subscribe(now, new),
        })
    }

    /// Open a socket for a new connection and let `create` make the connection on it.
    fn open_with(
        &mut self,
        spec: ConnectionSpec,
        create: impl FnOnce(&mut Engine, NewConnection) -> Result<(), MediaError>,
    ) -> Result<(), MediaError> {
        if !self.engine.has_room(&spec.room_id) {
            return Err(MediaError::new(ErrorCode::NotFound, "room not found"));
        }
        let (key, local) = self.open_socket()?;
        let new = NewConnection { key, local, spec };
        let r = create(&mut self.engine, new);
        self.flush();
        if !self.engine.has_connection(key) {
            // Refused before or while it was created: make sure the port is back.
            self.release(key);
        }
        r
    }

    fn publish_metrics(&mut self) {
        let elapsed = self.last_metrics.elapsed();
        self.last_metrics = Instant::now();
        let c = self.engine.counters().clone();
        let m = &self.setup.metrics;
        let p = &self.published;
        // Every counter, as the delta since the last publication (the same order each time).
        let mut previous = Vec::with_capacity(48);
        p.samples(|_, _, v| previous.push(v));
        let mut i = 0;
        c.samples(|fam, labels, v| {
            m.counters[fam.name].with_label_values(labels).inc_by(v.saturating_sub(previous[i]));
            i += 1;
        });
        self.forward_latency.flush();
        for t in self.engine.take_first_frame_times() {
            m.first_frame.observe(t.as_secs_f64());
        }
        let label = self.setup.index.to_string();
        m.worker_busy
            .with_label_values(&[label.as_str()])
            .set(self.busy.as_secs_f64() / elapsed.as_secs_f64().max(1e-3));
        m.worker_connections.with_label_values(&[label.as_str()]).set(self.engine.connection_count() as i64);
        m.overload_level.with_label_values(&[label.as_str()]).set(i64::from(self.load.level()));
        m.queue_delay
            .with_label_values(&[label.as_str()])
            .set(std::mem::take(&mut self.load.wait_max_second).as_secs_f64());
        m.worker_egress_packets.with_label_values(&[label.as_str()]).inc_by(std::mem::take(&mut self.egress_packets));
        m.worker_egress_bytes.with_label_values(&[label.as_str()]).inc_by(std::mem::take(&mut self.egress_bytes));
        if self.setup.spread.is_some() {
            m.worker_relayed.with_label_values(&[label.as_str()]).inc_by(std::mem::take(&mut self.relayed));
            m.worker_relay_dropped.with_label_values(&[label.as_str()]).inc_by(std::mem::take(&mut self.relay_dropped));
        }
        self.subscribers.store(self.engine.subscriber_count(), Ordering::Relaxed);
        self.busy = Duration::ZERO;
        self.published = c;
    }

    fn shutdown(&mut self) {
        let keys: Vec<ConnKey> = self.sockets.keys().copied().collect();
        for k in keys {
            self.release(k);
        }
        let tokens: Vec<usize> = self.links.keys().copied().collect();
        for t in tokens {
            self.close_link(t, None);
        }
    }

    // -----------------------------------------------------------------------------------------
    // ICE-TCP streams
    // -----------------------------------------------------------------------------------------

    /// Take a stream from the listener: bind it to the connection its first frame names (if it
    /// is still here and has room for another stream), then handle that frame and whatever
    /// followed it.
    fn adopt_stream(&mut self, now: Instant, stream: std::net::TcpStream, peer: SocketAddr, first: &[u8]) {
        let dropped = |reason: DropReason| reason.count(&self.setup.metrics);
        // On a dual-stack listener an IPv4 client shows as ::ffff:a.b.c.d; ICE pairs it with
        // our IPv4 candidates only as what it is.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let Some(key) = self.engine.route_stun(first) else {
            dropped(DropReason::UnknownUfrag);
            return;
        };
        if self.links.values().filter(|l| l.key == key).count() >= tcp::MAX_LINKS_PER_CONNECTION
            || self.link_by_peer.contains_key(&peer)
        {
            dropped(DropReason::Limit);
            return;
        }
        // The candidate the client connected to: ours with the stream's local address, else
        // the first (behind a 1:1 NAT the local address is not an announced one).
        let candidates = &self.setup.core.ice_tcp;
        let local_ip = stream.local_addr().ok().map(|a| a.ip().to_canonical());
        let Some(local) = candidates.iter().find(|c| Some(c.ip()) == local_ip).or(candidates.first()).copied() else {
            dropped(DropReason::UnknownUfrag);
            return;
        };
        let mut stream = mio::net::TcpStream::from_std(stream);
        let token = LINKS + self.next_link;
        self.next_link = (self.next_link + 1) % (SHARED.0 - LINKS);
        if let Err(e) =
            self.poll.registry().register(&mut stream, Token(token), Interest::READABLE | Interest::WRITABLE)
        {
            tracing::warn!(worker = self.setup.index, error = %e, "ICE-TCP stream registration failed");
            dropped(DropReason::Closed);
            return;
        }
        let link = Link { stream, key, peer, local, frames: Default::default(), out: Default::default() };
        self.links.insert(token, link);
        self.link_by_peer.insert(peer, token);
        self.setup.metrics.ice_tcp_streams.with_label_values(&["bound"]).inc();
        self.setup.metrics.ice_tcp_open.inc();
        self.engine.handle_tcp_receive(now, key, peer, local, first);
        self.flush();
        self.read_link(token);
    }

    /// Read every frame waiting on a stream into its connection. A frame the framing refuses
    /// or that is not STUN, DTLS or RTP closes the stream (counted), as does the client's close.
    fn read_link(&mut self, token: usize) {
        if self.tcp_read.is_empty() {
            self.tcp_read = vec![0; TCP_READ_BUF];
        }
        let mut frame = std::mem::take(&mut self.tcp_frame);
        let mut budget = TCP_READ_BUDGET;
        let end = loop {
            let Some(link) = self.links.get_mut(&token) else { break None };
            if budget == 0 {
                if !self.links_to_read.contains(&token) {
                    self.links_to_read.push(token);
                }
                break None;
            }
            match link.stream.read(&mut self.tcp_read) {
                Ok(0) => break Some(None),
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    link.frames.push(&self.tcp_read[..n]);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break None,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break Some(None),
            }
            if let Some(reason) = self.take_frames(token, &mut frame) {
                break Some(Some(reason));
            }
        };
        self.tcp_frame = frame;
        if let Some(reason) = end {
            self.close_link(token, reason);
        }
    }

    /// Hand each whole frame a stream's reader holds to the engine; the reason to close the
    /// stream, if one came up.
    fn take_frames(&mut self, token: usize, frame: &mut Vec<u8>) -> Option<DropReason> {
        loop {
            let link = self.links.get_mut(&token)?;
            match link.frames.next_frame() {
                Ok(Some(f)) => {
                    frame.clear();
                    frame.extend_from_slice(f);
                }
                Ok(None) => return None,
                Err(reason) => return Some(reason),
            }
            if !tcp::is_webrtc_packet(frame) {
                return Some(DropReason::Garbage);
            }
            let (key, peer, local) = (link.key, link.peer, link.local);
            let read_at = Instant::now();
            if !self.engine.handle_tcp_receive(read_at, key, peer, local, frame) {
                return Some(DropReason::UnknownUfrag);
            }
            self.flush_timed(key, read_at);
        }
    }

    /// Write what waits for a stream; a broken stream is closed.
    fn write_link(&mut self, token: usize) {
        let Some(link) = self.links.get_mut(&token) else { return };
        if link.out.is_empty() {
            return;
        }
        if link.out.write_to(&mut link.stream).is_err() {
            self.close_link(token, None);
        }
    }

    /// Close every stream of an ended connection, after a last try to send what it queued
    /// (its DTLS close_notify and RTCP BYE).
    fn close_links_of(&mut self, key: ConnKey) {
        if self.links.is_empty() {
            return;
        }
        let tokens: Vec<usize> = self.links.iter().filter(|(_, l)| l.key == key).map(|(t, _)| *t).collect();
        for t in tokens {
            if let Some(link) = self.links.get_mut(&t) {
                let _ = link.out.write_to(&mut link.stream);
            }
            self.close_link(t, None);
        }
    }

    /// Forget a stream and close it; `reason` counts it as dropped by us.
    fn close_link(&mut self, token: usize, reason: Option<DropReason>) {
        let Some(mut link) = self.links.remove(&token) else { return };
        self.link_by_peer.remove(&link.peer);
        let _ = self.poll.registry().deregister(&mut link.stream);
        self.setup.metrics.ice_tcp_open.dec();
        if let Some(reason) = reason {
            reason.count(&self.setup.metrics);
            tracing::debug!(worker = self.setup.index, reason = reason.as_str(), "ICE-TCP stream dropped");
        }
    }
}
