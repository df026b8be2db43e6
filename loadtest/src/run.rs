//! A run: create rooms, start participants at the join rate, let media flow (or ramp
//! subscribers up until a threshold breaks), sample the gateway and ourselves once a second,
//! stop everyone, and turn what they saw into a [`Report`].

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::Api;
use crate::janus::Janus;
use crate::media::{self, AudioSource, VideoCodec};
use crate::peer::{self, MediaPlan, ParticipantReport, Plan};
use crate::report::*;
use crate::signaling::{Target, TargetKind};
use crate::stats::{Percentiles, Shared};
use crate::sysmon::{self, GatewaySample, ProcSample, Source, StealSample};

/// Everything a run needs (the CLI fills it; tests build it directly).
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// The server under test.
    pub target: TargetKind,
    pub url: String,
    /// More gateway nodes of one cluster (`--url` repeated): participants are spread over `url`
    /// and these in turn, and the report counts per node.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra_urls: Vec<String>,
    #[serde(skip)]
    pub api_key: String,
    pub rooms: usize,
    pub publishers: usize,
    pub subscribers: usize,
    /// Publishers also subscribe (a meeting: everyone sees everyone).
    pub publishers_subscribe: bool,
    /// How long media flows once every participant has joined.
    pub duration: Duration,
    pub video: bool,
    pub audio: bool,
    /// Publisher i of a room hears `audio_sources[i % len]`.
    pub audio_sources: Vec<AudioSource>,
    /// Target video bitrate of a single-layer publisher: the clip nearest to it is sent.
    pub video_bitrate: u64,
    /// Simulcast layers per video publisher (1 = no simulcast).
    pub simulcast_layers: usize,
    /// Publishers pace video at this multiple of its bitrate (libwebrtc: 2.5); 0 = each frame
    /// at once.
    pub pacing: f64,
    /// Participants started per second.
    pub join_rate: f64,
    pub codec: VideoCodec,
    pub ramp: Option<Ramp>,
    /// Janus's HTTP API (`--target janus`), e.g. `http://10.213.0.1:8088/janus`.
    pub janus_url: String,
    /// Addresses Janus's candidates may name besides the host of `janus_url`.
    pub janus_media_ips: Vec<IpAddr>,
    /// The server's pid (CPU and RSS from /proc); otherwise the gateway's /metrics, or the one
    /// process named `janus`.
    pub pid: Option<u32>,
    /// Room name prefix; rooms are `<prefix>-<n>` (or exactly `<prefix>` with one room and
    /// `exact_room_name`).
    pub room_prefix: String,
    pub exact_room_name: bool,
    pub local_ip: IpAddr,
    pub connect_timeout: Duration,
    /// Show the live progress line.
    pub progress: bool,
    /// Delete the rooms at the end.
    pub cleanup: bool,
}

impl Config {
    /// The URL of the server under test.
    pub fn target_url(&self) -> &str {
        match self.target {
            TargetKind::Gateway => &self.url,
            TargetKind::Janus => &self.janus_url,
        }
    }
}

/// `--ramp`: add subscribers step by step until a threshold breaks.
#[derive(Debug, Clone, Serialize)]
pub struct Ramp {
    pub step: usize,
    /// Measurement time of a step once its subscribers are READY (plus 1 s to settle).
    pub step_duration: Duration,
    pub max_loss_pct: f64,
    pub max_p99_ms: f64,
    pub max_subscribers: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            target: TargetKind::Gateway,
            url: "http://127.0.0.1:8080".into(),
            extra_urls: Vec::new(),
            api_key: "dev-api-key".into(),
            rooms: 1,
            publishers: 1,
            subscribers: 1,
            publishers_subscribe: false,
            duration: Duration::from_secs(30),
            video: true,
            audio: true,
            audio_sources: vec![AudioSource::Tone],
            video_bitrate: 1_500_000,
            simulcast_layers: 1,
            pacing: 0.0,
            join_rate: 10.0,
            codec: VideoCodec::Vp8,
            ramp: None,
            janus_url: "http://127.0.0.1:8088/janus".into(),
            janus_media_ips: Vec::new(),
            pid: None,
            room_prefix: format!("lt-{:06x}", rand::random::<u32>() & 0xff_ffff),
            exact_room_name: false,
            local_ip: IpAddr::from([127, 0, 0, 1]),
            connect_timeout: Duration::from_secs(20),
            progress: true,
            cleanup: true,
        }
    }
}

/// A participant task and what it is.
struct Running {
    handle: JoinHandle<ParticipantReport>,
    /// Index of the node (`url`, then `extra_urls`) it joined through.
    node: usize,
}

/// State of the run shared with the sampler and the progress line.
struct Monitor {
    samples: Mutex<Vec<Sample>>,
    gateway: Mutex<Vec<(Instant, GatewaySample)>>,
    own: Mutex<Vec<ProcSample>>,
}

/// Counters at one instant, for windowed figures (ramp steps, the steady phase).
#[derive(Clone)]
struct Snapshot {
    at: Instant,
    rx_packets: u64,
    /// Per stream: packets sent so far and subscribers receiving it now.
    sent: Vec<(u64, u64)>,
    gateway: Option<GatewaySample>,
    own: Option<ProcSample>,
    steal: Option<StealSample>,
}

fn snapshot(shared: &Shared, monitor: &Monitor) -> Snapshot {
    let sent = shared
        .streams()
        .iter()
        .map(|s| (s.sent_packets.load(Ordering::Relaxed), s.receivers.load(Ordering::Relaxed)))
        .collect();
    Snapshot {
        at: Instant::now(),
        rx_packets: shared.live.rx_packets.load(Ordering::Relaxed),
        sent,
        gateway: monitor.gateway.lock().unwrap_or_else(|e| e.into_inner()).last().map(|g| g.1),
        own: sysmon::read_proc("self"),
        steal: sysmon::read_steal(),
    }
}

/// Figures over the time between two snapshots.
fn window(shared: &Shared, a: &Snapshot, b: &Snapshot, threads: usize) -> Window {
    let secs = b.at.saturating_duration_since(a.at).as_secs_f64().max(1e-3);
    let expected: u64 =
        b.sent.iter().enumerate().map(|(i, (s, r))| (s - a.sent.get(i).map_or(0, |x| x.0)) * r).sum::<u64>();
    let received = b.rx_packets - a.rx_packets;
    let loss_pct = if expected > 0 { (1.0 - received as f64 / expected as f64).max(0.0) * 100.0 } else { 0.0 };
    let (s0, s1) = (shared.second_of(a.at) + 1, shared.second_of(b.at));
    let latency = Percentiles::of_us_as_ms(&shared.latencies_between(s0.min(s1), s1));
    let gw = match (a.gateway.and_then(|g| g.proc), b.gateway.and_then(|g| g.proc)) {
        (Some(x), Some(y)) => Some(sysmon::cpu_pct(&x, &y)),
        _ => None,
    };
    let gw_out = match (a.gateway.and_then(|g| g.packets_out), b.gateway.and_then(|g| g.packets_out)) {
        (Some(x), Some(y)) => Some((y - x) / secs),
        _ => None,
    };
    let own = match (&a.own, &b.own) {
        (Some(x), Some(y)) => sysmon::cpu_pct(x, y),
        _ => 0.0,
    };
    let cpu_us_per_packet = match (a.gateway.and_then(|g| g.proc), b.gateway.and_then(|g| g.proc), gw_out) {
        (Some(x), Some(y), Some(pps)) if pps > 0.0 => Some((y.cpu_s - x.cpu_s) * 1e6 / (pps * secs)),
        _ => None,
    };
    let cpu_us_per_delivered = match (a.gateway.and_then(|g| g.proc), b.gateway.and_then(|g| g.proc)) {
        (Some(x), Some(y)) if received > 0 => Some((y.cpu_s - x.cpu_s) * 1e6 / received as f64),
        _ => None,
    };
    let gw_wait = match (a.gateway.and_then(|g| g.proc), b.gateway.and_then(|g| g.proc)) {
        (Some(x), Some(y)) => sysmon::wait_pct(&x, &y),
        _ => None,
    };
    let own_wait = match (&a.own, &b.own) {
        (Some(x), Some(y)) => sysmon::wait_pct(x, y),
        _ => None,
    };
    Window {
        seconds: secs,
        gateway_cpu_wait_pct: gw_wait,
        loadtest_cpu_wait_pct: own_wait,
        expected_packets: expected,
        received_packets: received,
        loss_pct,
        received_pps: received as f64 / secs,
        gateway_forwarded_pps: gw_out,
        gateway_cpu_pct: gw,
        gateway_cpu_us_per_forwarded_packet: cpu_us_per_packet,
        gateway_cpu_us_per_delivered_packet: cpu_us_per_delivered,
        loadtest_cpu_pct: own,
        loadtest_saturated: own > 90.0 * threads as f64,
        machine_steal_pct: match (&a.steal, &b.steal) {
            (Some(x), Some(y)) => sysmon::steal_pct(x, y),
            _ => None,
        },
        latency_ms: latency,
    }
}

/// Run the load test and report what happened.
pub async fn run(cfg: Config) -> anyhow::Result<Report> {
    if cfg.rooms == 0 || (cfg.publishers == 0 && cfg.subscribers == 0 && cfg.ramp.is_none()) {
        bail!("nothing to do: no rooms or no participants");
    }
    if !cfg.video && !cfg.audio && cfg.publishers > 0 {
        bail!("publishers need audio or video");
    }
    let target = match cfg.target {
        TargetKind::Gateway => Target::Gateway(Api::new(&cfg.url, &cfg.api_key)?),
        TargetKind::Janus => {
            let codec = (cfg.codec == VideoCodec::H264).then_some("h264");
            Target::Janus(Janus::new(&cfg.janus_url, &cfg.janus_media_ips, codec)?)
        }
    };
    let threads = tokio::runtime::Handle::current().metrics().num_workers();
    let source = match (cfg.pid, cfg.target) {
        (Some(pid), _) => Source::Proc(pid.to_string()),
        (None, TargetKind::Gateway) => Source::Metrics,
        // Janus has no metrics endpoint: its process, if there is exactly one on this machine.
        (None, TargetKind::Janus) => {
            Source::Proc(sysmon::find_pid("janus").context("Janus's CPU and RSS: pass --server-pid")?.to_string())
        }
    };

    let media = Arc::new(media_plan(&cfg)?);
    let per_room =
        cfg.publishers + cfg.subscribers + cfg.ramp.as_ref().map_or(0, |r| r.max_subscribers.div_ceil(cfg.rooms));
    // A named room is shared (browsers, other load testers): leave room for them.
    let floor = if cfg.exact_room_name { 16 } else { 1 };
    let max_participants = per_room.clamp(floor, 256) as u32;
    let mut rooms = Vec::new();
    for i in 0..cfg.rooms {
        let name = if cfg.exact_room_name && cfg.rooms == 1 {
            cfg.room_prefix.clone()
        } else {
            format!("{}-{i}", cfg.room_prefix)
        };
        // A named room may exist already (another load tester, a browser): join it.
        let id = target
            .create_room(&name, max_participants, cfg.exact_room_name)
            .await
            .with_context(|| format!("creating room {name}"))?;
        rooms.push((name, id));
    }

    let start = Instant::now();
    let shared = Arc::new(Shared::new(start));
    let monitor = Arc::new(Monitor {
        samples: Mutex::new(Vec::new()),
        gateway: Mutex::new(Vec::new()),
        own: Mutex::new(Vec::new()),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let (sampler_stop, sampler_rx) = watch::channel(false);
    let sampler = tokio::spawn(sample_loop(
        target.clone(),
        source.clone(),
        Arc::clone(&shared),
        Arc::clone(&monitor),
        sampler_rx,
    ));
    let bar = progress_bar(cfg.progress);
    let progress =
        tokio::spawn(progress_loop(bar.clone(), Arc::clone(&shared), Arc::clone(&monitor), sampler_stop.subscribe()));

    let mut running: Vec<Running> = Vec::new();
    let mut planned = 0usize;
    // Identities are unique per run: several load testers may share a room.
    let run_id = format!("{:04x}", rand::random::<u16>());
    // Participants take the nodes in turn (one node without --url repeated).
    let mut nodes = vec![target.clone()];
    if cfg.target == TargetKind::Gateway {
        for url in &cfg.extra_urls {
            nodes.push(Target::Gateway(Api::new(url, &cfg.api_key)?));
        }
    }
    let turn = std::cell::Cell::new(0usize);
    let spawn = |name: String, room: &str, publish: bool, subscribe: bool, audio_source: usize| -> Running {
        let node = turn.get() % nodes.len();
        turn.set(turn.get() + 1);
        let plan = Plan {
            room_id: room.to_owned(),
            name,
            publish,
            subscribe,
            audio_source,
            local_ip: cfg.local_ip,
            connect_timeout: cfg.connect_timeout,
        };
        let handle = tokio::spawn(peer::run(
            nodes[node].clone(),
            plan,
            Arc::clone(&media),
            Arc::clone(&shared),
            stop_rx.clone(),
        ));
        Running { handle, node }
    };
    let interval = Duration::from_secs_f64(1.0 / cfg.join_rate.max(0.001));
    let mut next_join = Instant::now();
    let mut pace = |n: usize| {
        let at = next_join;
        next_join += interval * n as u32;
        tokio::time::sleep_until(tokio::time::Instant::from_std(at))
    };

    // Publishers first, so subscribers find their streams in the first offer.
    for (r, (_, room)) in rooms.iter().enumerate() {
        for i in 0..cfg.publishers {
            pace(1).await;
            running.push(spawn(format!("pub-{r}-{i}-{run_id}"), room, true, cfg.publishers_subscribe, i));
            planned += 1;
        }
    }
    let mut sub_counter = 0usize;
    let mut add_subscribers = |n: usize, running: &mut Vec<Running>| {
        let mut batch = Vec::new();
        for _ in 0..n {
            let r = sub_counter % rooms.len();
            batch.push((format!("sub-{r}-{}-{run_id}", sub_counter / rooms.len()), rooms[r].1.clone()));
            sub_counter += 1;
        }
        let _ = running;
        batch
    };
    for (name, room) in add_subscribers(cfg.subscribers, &mut running) {
        pace(1).await;
        running.push(spawn(name, &room, false, true, 0));
        planned += 1;
    }
    let join_done = wait_joined(&shared, planned, cfg.connect_timeout + Duration::from_secs(2)).await;
    let join_phase_s = start.elapsed().as_secs_f64();

    let mut ramp_report = None;
    // The steady window starts once the last subscribers have their first packets.
    let settle = (cfg.duration / 2).min(Duration::from_secs(2));
    if cfg.ramp.is_none() {
        tokio::time::sleep(settle).await;
    }
    let steady_from = snapshot(&shared, &monitor);
    if let Some(ramp) = cfg.ramp.clone() {
        let mut steps: Vec<RampStep> = Vec::new();
        let mut stop_reason = format!("reached --ramp-max {} subscribers", ramp.max_subscribers);
        let mut subscribers = cfg.subscribers;
        while subscribers < ramp.max_subscribers {
            let n = ramp.step.min(ramp.max_subscribers - subscribers);
            for (name, room) in add_subscribers(n, &mut running) {
                pace(1).await;
                running.push(spawn(name, &room, false, true, 0));
                planned += 1;
            }
            subscribers += n;
            let joined = wait_joined(&shared, planned, cfg.connect_timeout + Duration::from_secs(2)).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let a = snapshot(&shared, &monitor);
            tokio::time::sleep(ramp.step_duration).await;
            // Let the sampler publish the gateway's counters for the end of the window.
            tokio::time::sleep(Duration::from_millis(1100)).await;
            let b = snapshot(&shared, &monitor);
            let w = window(&shared, &a, &b, threads);
            let streams: u64 = b.sent.iter().map(|(_, r)| r).sum();
            let ok = w.loss_pct <= ramp.max_loss_pct && w.latency_ms.p99 <= ramp.max_p99_ms && joined;
            let step = RampStep { subscribers, forwarded_streams: streams, window: w.clone(), within_thresholds: ok };
            bar.println(format!(
                "ramp: {} subscribers, {} streams: {:.0} pkt/s received, loss {:.2}%, p99 {:.1} ms, gateway CPU {} (waited {}), loadtest CPU {:.0}%, steal {}{}",
                step.subscribers,
                step.forwarded_streams,
                step.window.received_pps,
                step.window.loss_pct,
                step.window.latency_ms.p99,
                step.window.gateway_cpu_pct.map_or("?".into(), |c| format!("{c:.0}%")),
                step.window.gateway_cpu_wait_pct.map_or("?".into(), |c| format!("{c:.0}%")),
                step.window.loadtest_cpu_pct,
                step.window.machine_steal_pct.map_or("?".into(), |c| format!("{c:.0}%")),
                if ok { "" } else { "  <- threshold broken" }
            ));
            let saturated = step.window.loadtest_saturated;
            steps.push(step);
            if !ok {
                stop_reason = if !joined {
                    "subscribers of the last step did not all reach READY".into()
                } else if w.loss_pct > ramp.max_loss_pct {
                    format!("loss {:.2}% > {}%", w.loss_pct, ramp.max_loss_pct)
                } else {
                    format!("p99 latency {:.1} ms > {} ms", w.latency_ms.p99, ramp.max_p99_ms)
                };
                break;
            }
            if saturated {
                stop_reason =
                    "the load generator itself saturated its CPU: the gateway's capacity is higher than this".into();
                break;
            }
        }
        let knee = steps.iter().rev().find(|s| s.within_thresholds).cloned();
        ramp_report = Some(RampReport { steps, knee, stop_reason });
    } else {
        // Ctrl-C or SIGTERM ends the run early, with a full report.
        tokio::select! {
            _ = tokio::time::sleep(cfg.duration - settle) => {}
            _ = interrupted() => bar.println("interrupted: stopping and reporting"),
        }
        // Let the sampler publish the gateway's counters for the end of the window.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let steady_to = snapshot(&shared, &monitor);

    // Stop: publishers and subscribers leave; then collect what each saw.
    let _ = stop_tx.send(true);
    let mut reports = Vec::new();
    let mut node_of = Vec::new();
    for r in running {
        node_of.push(r.node);
        match tokio::time::timeout(Duration::from_secs(10), r.handle).await {
            Ok(Ok(rep)) => reports.push(rep),
            Ok(Err(e)) => reports.push(ParticipantReport { error: Some(format!("task: {e}")), ..Default::default() }),
            Err(_) => reports.push(ParticipantReport { error: Some("did not stop".into()), ..Default::default() }),
        }
    }
    let _ = sampler_stop.send(true);
    let _ = sampler.await;
    let _ = progress.await;
    bar.finish_and_clear();
    // A room named with --room may be someone else's too: it is left alone.
    if cfg.cleanup && !cfg.exact_room_name {
        for (_, id) in &rooms {
            target.delete_room(id).await;
        }
    }

    let steady = window(&shared, &steady_from, &steady_to, threads);
    let per_node = per_node(&cfg, &reports, &node_of);
    let mut report = build_report(
        &cfg,
        &shared,
        &monitor,
        reports,
        planned,
        join_done,
        join_phase_s,
        steady,
        ramp_report,
        &source,
        threads,
        &media,
    );
    report.per_node = per_node;
    Ok(report)
}

/// Participants, failures and packets received, per node joined through (one entry per
/// `--url`).
fn per_node(cfg: &Config, reports: &[ParticipantReport], node_of: &[usize]) -> Vec<NodeFigures> {
    let urls: Vec<&String> = std::iter::once(&cfg.url).chain(cfg.extra_urls.iter()).collect();
    let mut out: Vec<NodeFigures> =
        urls.iter().map(|u| NodeFigures { url: (*u).clone(), ..Default::default() }).collect();
    for (rep, &node) in reports.iter().zip(node_of) {
        let Some(n) = out.get_mut(node) else { continue };
        n.participants += 1;
        if rep.error.is_some() {
            n.failed += 1;
        }
        n.packets_received += rep.rx.iter().map(|r| r.received).sum::<u64>();
    }
    out
}

/// SIGINT or SIGTERM.
async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

fn media_plan(cfg: &Config) -> anyhow::Result<MediaPlan> {
    let video = if cfg.video {
        let layers: Vec<usize> = if cfg.simulcast_layers > 1 {
            (0..cfg.simulcast_layers.min(media::LAYERS.len())).collect()
        } else {
            vec![media::nearest_layer(cfg.video_bitrate)]
        };
        layers.into_iter().map(|l| media::video_clip(cfg.codec, l).map(Arc::new)).collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    let audio = if cfg.audio {
        let sources = if cfg.audio_sources.is_empty() { &[AudioSource::Tone][..] } else { &cfg.audio_sources };
        sources.iter().map(|s| media::audio_clip(*s).map(Arc::new)).collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    Ok(MediaPlan { codec: cfg.codec, video, audio, pacing: cfg.pacing })
}

/// Wait until every planned participant has started and each connection asked for is READY
/// or failed; false on timeout.
async fn wait_joined(shared: &Shared, planned: usize, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let l = &shared.live;
        let started = l.started.load(Ordering::Relaxed) as usize;
        let requested = l.requested.load(Ordering::Relaxed);
        let settled = l.publish_ready.load(Ordering::Relaxed)
            + l.subscribe_ready.load(Ordering::Relaxed)
            + l.failed.load(Ordering::Relaxed);
        if started >= planned && settled >= requested {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn sample_loop(
    target: Target,
    source: Source,
    shared: Arc<Shared>,
    monitor: Arc<Monitor>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut prev: Option<Snapshot> = None;
    let mut prev_bytes = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let g = target.sample(&source).await;
        monitor.gateway.lock().unwrap_or_else(|e| e.into_inner()).push((Instant::now(), g));
        let own = sysmon::read_proc("self");
        if let Some(o) = own {
            monitor.own.lock().unwrap_or_else(|e| e.into_inner()).push(o);
        }
        let snap = snapshot(&shared, &monitor);
        let bytes = shared.live.rx_bytes.load(Ordering::Relaxed);
        if let Some(p) = &prev {
            let w = window(&shared, p, &snap, 1);
            let secs = w.seconds;
            let l = &shared.live;
            monitor.samples.lock().unwrap_or_else(|e| e.into_inner()).push(Sample {
                t_s: snap.at.duration_since(shared.start).as_secs_f64(),
                received_pps: w.received_pps,
                received_mbps: (bytes - prev_bytes) as f64 * 8.0 / secs / 1e6,
                expected_pps: w.expected_packets as f64 / secs,
                loss_pct: w.loss_pct,
                latency_p50_ms: None,
                latency_p99_ms: None,
                gateway_cpu_pct: w.gateway_cpu_pct,
                gateway_rss_mb: g.proc.map(|p| p.rss_bytes as f64 / 1e6),
                gateway_forwarded_pps: w.gateway_forwarded_pps,
                loadtest_cpu_pct: w.loadtest_cpu_pct,
                gateway_cpu_wait_pct: w.gateway_cpu_wait_pct,
                loadtest_cpu_wait_pct: w.loadtest_cpu_wait_pct,
                publish_ready: l.publish_ready.load(Ordering::Relaxed),
                subscribe_ready: l.subscribe_ready.load(Ordering::Relaxed),
                failed: l.failed.load(Ordering::Relaxed),
            });
        }
        prev_bytes = bytes;
        prev = Some(snap);
    }
}

fn progress_bar(show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}") {
        bar.set_style(style);
    }
    bar
}

async fn progress_loop(
    bar: indicatif::ProgressBar,
    shared: Arc<Shared>,
    monitor: Arc<Monitor>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let l = &shared.live;
        let last = monitor.samples.lock().unwrap_or_else(|e| e.into_inner()).last().cloned();
        let now_s = shared.second_of(Instant::now());
        let lat = Percentiles::of_us_as_ms(&shared.latencies_between(now_s.saturating_sub(2), now_s));
        let msg = format!(
            "joined {}/{} ready pub {} sub {} failed {} | rx {:.0} pkt/s {:.1} Mbit/s loss {:.2}% | latency p50 {:.1} p99 {:.1} ms | gateway CPU {} RSS {} | us {:.0}%",
            l.joined.load(Ordering::Relaxed),
            l.started.load(Ordering::Relaxed),
            l.publish_ready.load(Ordering::Relaxed),
            l.subscribe_ready.load(Ordering::Relaxed),
            l.failed.load(Ordering::Relaxed),
            last.as_ref().map_or(0.0, |s| s.received_pps),
            last.as_ref().map_or(0.0, |s| s.received_mbps),
            last.as_ref().map_or(0.0, |s| s.loss_pct),
            lat.p50,
            lat.p99,
            last.as_ref().and_then(|s| s.gateway_cpu_pct).map_or("?".into(), |c| format!("{c:.0}%")),
            last.as_ref().and_then(|s| s.gateway_rss_mb).map_or("?".into(), |m| format!("{m:.0} MB")),
            last.as_ref().map_or(0.0, |s| s.loadtest_cpu_pct),
        );
        bar.set_message(msg);
        bar.tick();
    }
}

#[allow(clippy::too_many_arguments)]
fn build_report(
    cfg: &Config,
    shared: &Shared,
    monitor: &Monitor,
    reports: Vec<ParticipantReport>,
    planned: usize,
    join_done: bool,
    join_phase_s: f64,
    steady: Window,
    ramp: Option<RampReport>,
    source: &Source,
    threads: usize,
    media: &MediaPlan,
) -> Report {
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut dropped: BTreeMap<String, u64> = BTreeMap::new();
    let (mut pub_ready, mut sub_ready, mut connections) = (0u64, 0u64, 0u64);
    let (mut pub_ms, mut sub_ms, mut client_ms) = (Vec::new(), Vec::new(), Vec::new());
    for r in &reports {
        if let Some(e) = &r.error {
            *errors.entry(shorten(e)).or_default() += 1;
        }
        for j in &r.joins {
            connections += 1;
            if let Some(d) = &j.dropped {
                *dropped.entry(d.clone()).or_default() += 1;
            }
            if let Some(ms) = j.ready_ms {
                if j.role == "publish" {
                    pub_ready += 1;
                    pub_ms.push(ms);
                } else {
                    sub_ready += 1;
                    sub_ms.push(ms);
                }
            } else {
                *failures.entry(j.failed.clone().unwrap_or_else(|| "not ready at the end".into())).or_default() += 1;
            }
            if let Some(ms) = j.client_ms {
                client_ms.push(ms);
            }
        }
    }

    // Per published stream: what was sent, and what its subscribers got.
    let mut streams: Vec<StreamReport> = shared
        .streams()
        .iter()
        .map(|s| StreamReport {
            publisher: s.publisher.clone(),
            mid: s.mid.clone(),
            rid: s.rid.clone(),
            kind: s.kind.into(),
            codec: s.codec.clone(),
            sent_packets: s.sent_packets.load(Ordering::Relaxed),
            sent_bytes: s.sent_bytes.load(Ordering::Relaxed),
            ..Default::default()
        })
        .collect();
    let mut media_totals = MediaTotals::default();
    let mut jitter = Vec::new();
    let mut first_key = Vec::new();
    let mut feedback = Feedback::default();
    for r in &reports {
        feedback.nacks_sent_by_subscribers += r.nacks_out;
        feedback.plis_sent_by_subscribers += r.plis_out;
        feedback.keyframe_requests_received_by_publishers += r.keyframe_requests_in;
        feedback.keyframes_forced_by_requests += r.forced_keyframes;
        for t in &r.tx {
            feedback.nacks_received_by_publishers += t.nacks_in;
            feedback.plis_received_by_publishers += t.plis_in;
            feedback.firs_received_by_publishers += t.firs_in;
            feedback.retransmitted_by_publishers += t.retransmitted;
            media_totals.sent_packets += t.packets;
            media_totals.sent_bytes += t.bytes;
        }
        for rx in &r.rx {
            media_totals.received_packets += rx.received;
            media_totals.received_bytes += rx.bytes;
            media_totals.expected_packets += rx.expected;
            media_totals.lost_packets += rx.lost;
            media_totals.unmatched_payloads += rx.unmatched;
            media_totals.keyframes_received += rx.keyframes;
            media_totals.received_streams += 1;
            jitter.push(rx.jitter_ms);
            if let Some(ms) = rx.first_keyframe_ms {
                first_key.push(ms);
            }
            if let Some(s) = streams.get_mut(rx.stream) {
                s.subscribers += 1;
                s.received_packets += rx.received;
                s.expected_packets += rx.expected;
                s.lost_packets += rx.lost;
            }
        }
    }
    for (s, idx) in streams.iter_mut().zip(shared.streams()) {
        s.loss_pct = pct(s.lost_packets, s.expected_packets);
        let lat = idx.latencies.lock().map(|v| v.clone()).unwrap_or_default();
        s.latency_ms = Percentiles::of_us_as_ms(&lat);
    }
    media_totals.loss_pct = pct(media_totals.lost_packets, media_totals.expected_packets);

    let all_latency: Vec<u32> = shared.seconds().iter().flat_map(|s| s.latencies_us.iter().copied()).collect();
    let latency_ms = Percentiles::of_us_as_ms(&all_latency);
    let mut samples = monitor.samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let seconds = shared.seconds();
    for s in samples.iter_mut() {
        let sec = (s.t_s as usize).saturating_sub(1);
        if let Some(b) = seconds.get(sec) {
            let p = Percentiles::of_us_as_ms(&b.latencies_us);
            if p.count > 0 {
                s.latency_p50_ms = Some(p.p50);
                s.latency_p99_ms = Some(p.p99);
            }
        }
    }

    let gw = monitor.gateway.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let gw_proc: Vec<ProcSample> = gw.iter().filter_map(|(_, g)| g.proc).collect();
    let mut gw_cpu: Vec<f64> = gw_proc.windows(2).map(|w| sysmon::cpu_pct(&w[0], &w[1])).collect();
    let own = monitor.own.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut own_cpu: Vec<f64> = own.windows(2).map(|w| sysmon::cpu_pct(&w[0], &w[1])).collect();
    let gateway = GatewayFigures {
        source: if gw_proc.is_empty() { "none".into() } else { source.name().into() },
        cpu_pct: Percentiles::of(&mut gw_cpu),
        rss_mb_max: gw_proc.iter().map(|p| p.rss_bytes as f64 / 1e6).fold(0.0, f64::max),
        rss_mb_end: gw_proc.last().map_or(0.0, |p| p.rss_bytes as f64 / 1e6),
        forwarded_packets: match (gw.first().and_then(|g| g.1.packets_out), gw.last().and_then(|g| g.1.packets_out)) {
            (Some(a), Some(b)) => Some((b - a) as u64),
            _ => None,
        },
        steady_cpu_pct: steady.gateway_cpu_pct,
        steady_forwarded_pps: steady.gateway_forwarded_pps,
        steady_cpu_us_per_forwarded_packet: steady.gateway_cpu_us_per_forwarded_packet,
        steady_cpu_us_per_delivered_packet: steady.gateway_cpu_us_per_delivered_packet,
    };
    let loadtest =
        LoadtestFigures { threads, cpu_pct: Percentiles::of(&mut own_cpu), saturated: steady.loadtest_saturated };

    let mut warnings = Vec::new();
    if !join_done {
        warnings.push("not every connection was READY or FAILED when the join phase timed out".into());
    }
    if !dropped.is_empty() {
        warnings.push(format!(
            "{} READY connection(s) were lost later ({dropped:?}): figures after that point describe fewer subscribers",
            dropped.values().sum::<u64>()
        ));
    }
    if loadtest.saturated {
        warnings.push(format!(
            "the load tester used {:.0}% CPU on {} thread(s) in the measured window: it may be the bottleneck, and the latency it measures includes its own queueing",
            steady.loadtest_cpu_pct, threads
        ));
    }
    let starved = |w: Option<f64>| w.is_some_and(|w| w > 10.0);
    if starved(steady.gateway_cpu_wait_pct) || starved(steady.loadtest_cpu_wait_pct) {
        warnings.push(format!(
            "other load on this machine delayed the test: server threads waited for a CPU {} of the time, ours {}; latency, loss and capacity are pessimistic (a server with many threads on one core, e.g. Janus pinned with taskset, also counts its threads waiting for each other)",
            steady.gateway_cpu_wait_pct.map_or("?".into(), |w| format!("{w:.0}%")),
            steady.loadtest_cpu_wait_pct.map_or("?".into(), |w| format!("{w:.0}%")),
        ));
    }
    if media_totals.unmatched_payloads > 0 {
        warnings.push(format!(
            "{} received payloads matched no sent packet (corruption?)",
            media_totals.unmatched_payloads
        ));
    }
    // The hypervisor's share: a noisy neighbour makes every figure worse without any counter of
    // either process showing it.
    const STEAL_WARN_PCT: f64 = 5.0;
    let stolen: Vec<String> = ramp
        .iter()
        .flat_map(|r| r.steps.iter().map(|s| (format!("{} subscribers", s.subscribers), s.window.machine_steal_pct)))
        .chain(std::iter::once(("the steady phase".to_string(), steady.machine_steal_pct)))
        .filter_map(|(what, p)| p.filter(|p| *p > STEAL_WARN_PCT).map(|p| format!("{what} {p:.0}%")))
        .collect();
    if !stolen.is_empty() {
        warnings.push(format!(
            "the hypervisor gave more than {STEAL_WARN_PCT}% of this machine's CPU time to other guests (steal: {}): latency, loss and capacity are the host's as much as the gateway's; compare runs only at low steal",
            stolen.join(", ")
        ));
    }
    if gateway.source == "none" {
        warnings.push("no gateway CPU/RSS figures: pass --pid, or let /metrics be reachable".into());
    } else if gateway.source == "metrics" {
        warnings.push(
            "gateway CPU from /metrics counts whole CPU-seconds (process_cpu_seconds_total is an integer counter): per-second figures are coarse; pass --pid on the gateway's machine".into(),
        );
    }

    Report {
        config: cfg.clone(),
        video_clips: media
            .video
            .iter()
            .map(|c| ClipInfo {
                name: format!("{}-{}", cfg.codec, c.name),
                width: c.width,
                height: c.height,
                bitrate_bps: c.measured_bps(90_000),
            })
            .collect(),
        participants: ParticipantFigures {
            planned: planned as u64,
            joined: shared.live.joined.load(Ordering::Relaxed),
            connections,
            publish_ready: pub_ready,
            subscribe_ready: sub_ready,
            failures,
            errors,
            dropped_after_ready: dropped.clone(),
        },
        join_phase_s,
        join_ms: JoinFigures {
            publish: Percentiles::of(&mut pub_ms),
            subscribe: Percentiles::of(&mut sub_ms),
            client: Percentiles::of(&mut client_ms),
        },
        media: media_totals,
        latency_ms,
        jitter_ms: Percentiles::of(&mut jitter),
        first_keyframe_ms: Percentiles::of(&mut first_key),
        feedback,
        steady,
        gateway,
        loadtest,
        streams,
        ramp,
        series: samples,
        warnings,
        per_node: Vec::new(),
    }
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

fn shorten(e: &str) -> String {
    e.chars().take(160).collect()
}

#[cfg(test)]
mod per_node_tests {
    use super::*;

    #[test]
    fn participants_are_counted_by_the_node_they_joined_through() {
        let cfg = Config { extra_urls: vec!["http://b".into()], ..Config::default() };
        let ok = ParticipantReport::default();
        let failed = ParticipantReport { error: Some("x".into()), ..Default::default() };
        let figures = per_node(&cfg, &[ok.clone(), failed, ok], &[0, 1, 0]);
        assert_eq!(figures.len(), 2);
        assert_eq!((figures[0].participants, figures[0].failed), (2, 0));
        assert_eq!((figures[1].url.as_str(), figures[1].participants, figures[1].failed), ("http://b", 1, 1));
    }
}
