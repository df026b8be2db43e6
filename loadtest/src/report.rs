//! The result of a run: every figure (serialized as `--json`), the human table, and the plot
//! of latency and throughput over time (`--plot`, PNG or SVG).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::run::Config;
use crate::stats::Percentiles;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub config: Config,
    pub video_clips: Vec<ClipInfo>,
    pub participants: ParticipantFigures,
    /// Seconds from the start until every participant had joined (READY or failed).
    pub join_phase_s: f64,
    pub join_ms: JoinFigures,
    pub media: MediaTotals,
    /// Publisher write → subscriber receive, through the gateway, every packet of the run.
    pub latency_ms: Percentiles,
    /// RFC 3550 interarrival jitter, one value per received stream at the end of the run.
    pub jitter_ms: Percentiles,
    /// Per received video stream: first packet → first packet of a keyframe.
    pub first_keyframe_ms: Percentiles,
    pub feedback: Feedback,
    /// From "everyone joined" to the end (without `--ramp`), or the whole ramp.
    pub steady: Window,
    pub gateway: GatewayFigures,
    pub loadtest: LoadtestFigures,
    pub streams: Vec<StreamReport>,
    pub ramp: Option<RampReport>,
    /// One entry per second.
    pub series: Vec<Sample>,
    pub warnings: Vec<String>,
    /// Per node joined through (`--url` repeated; one entry otherwise).
    pub per_node: Vec<NodeFigures>,
}

/// What the participants that joined through one node saw.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct NodeFigures {
    pub url: String,
    pub participants: u64,
    /// Participants that ended with an error.
    pub failed: u64,
    /// RTP packets the participants of this node received.
    pub packets_received: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClipInfo {
    pub name: String,
    pub width: u32,
    pub height: u32,
    pub bitrate_bps: u64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct ParticipantFigures {
    pub planned: u64,
    /// Got `joined` on the WebSocket.
    pub joined: u64,
    /// Connections asked for (publish + subscribe).
    pub connections: u64,
    pub publish_ready: u64,
    pub subscribe_ready: u64,
    /// Connections that did not reach READY, by reason (the gateway's FAILED reason, or
    /// `timeout` for our own connect timeout).
    pub failures: BTreeMap<String, u64>,
    /// Participants that stopped on an error (token, WebSocket), by message.
    pub errors: BTreeMap<String, u64>,
    /// READY connections lost later, by reason (the gateway's FAILED reason, e.g.
    /// `ice_disconnected`, or `client ICE disconnected` when our own agent gave up first).
    pub dropped_after_ready: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct JoinFigures {
    /// INITIAL → READY from the gateway's event timestamps (ms resolution), per connection.
    pub publish: Percentiles,
    pub subscribe: Percentiles,
    /// Request sent (`publish`/`subscribe`) → READY event received, as the client saw it.
    pub client: Percentiles,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct MediaTotals {
    pub sent_packets: u64,
    pub sent_bytes: u64,
    /// Subscriber × stream pairs that received anything.
    pub received_streams: u64,
    pub received_packets: u64,
    pub received_bytes: u64,
    /// Sum over received streams of the sequence-number span (first to last packet seen).
    pub expected_packets: u64,
    pub lost_packets: u64,
    pub loss_pct: f64,
    /// Payloads that matched no packet any publisher sent: corruption (should be 0).
    pub unmatched_payloads: u64,
    pub keyframes_received: u64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Feedback {
    pub nacks_sent_by_subscribers: u64,
    pub plis_sent_by_subscribers: u64,
    pub nacks_received_by_publishers: u64,
    pub plis_received_by_publishers: u64,
    pub firs_received_by_publishers: u64,
    pub keyframe_requests_received_by_publishers: u64,
    pub keyframes_forced_by_requests: u64,
    pub retransmitted_by_publishers: u64,
}

/// Figures over a time window.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Window {
    pub seconds: f64,
    /// Packets the subscribers should have received: for each stream, packets sent in the
    /// window × subscribers receiving it.
    pub expected_packets: u64,
    pub received_packets: u64,
    pub loss_pct: f64,
    pub received_pps: f64,
    /// The gateway's own count (`gateway_rtp_packets_total{direction="out"}`) per second.
    pub gateway_forwarded_pps: Option<f64>,
    /// 100 = one core.
    pub gateway_cpu_pct: Option<f64>,
    pub gateway_cpu_us_per_forwarded_packet: Option<f64>,
    /// The server's CPU per packet the subscribers received (`received_packets`): the figure
    /// that is measured the same way for every target (Janus has no packet counter to read).
    pub gateway_cpu_us_per_delivered_packet: Option<f64>,
    pub loadtest_cpu_pct: f64,
    pub loadtest_saturated: bool,
    /// Share of the window the gateway's / our threads were runnable but waiting for a CPU
    /// (other load on the machine; 100 = one thread waiting all the time).
    pub gateway_cpu_wait_pct: Option<f64>,
    pub loadtest_cpu_wait_pct: Option<f64>,
    /// Share of the machine's CPU time (all CPUs) the hypervisor gave to other guests: on a
    /// shared VM the same load then costs more wall time per packet, and no process counter
    /// shows it.
    pub machine_steal_pct: Option<f64>,
    pub latency_ms: Percentiles,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct GatewayFigures {
    /// `proc` (`--pid`), `metrics` (`/metrics` process_* families) or `none`.
    pub source: String,
    /// Per-second CPU, 100 = one core.
    pub cpu_pct: Percentiles,
    pub rss_mb_max: f64,
    pub rss_mb_end: f64,
    pub forwarded_packets: Option<u64>,
    pub steady_cpu_pct: Option<f64>,
    pub steady_forwarded_pps: Option<f64>,
    pub steady_cpu_us_per_forwarded_packet: Option<f64>,
    /// Server CPU per packet received by the subscribers in the steady window (any target).
    pub steady_cpu_us_per_delivered_packet: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct LoadtestFigures {
    pub threads: usize,
    pub cpu_pct: Percentiles,
    /// Above 90% of its threads in the measured window: figures are a lower bound.
    pub saturated: bool,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct StreamReport {
    pub publisher: String,
    pub mid: String,
    pub rid: Option<String>,
    pub kind: String,
    pub codec: String,
    pub sent_packets: u64,
    pub sent_bytes: u64,
    pub subscribers: u64,
    pub received_packets: u64,
    pub expected_packets: u64,
    pub lost_packets: u64,
    pub loss_pct: f64,
    pub latency_ms: Percentiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct RampStep {
    pub subscribers: usize,
    /// Subscriber × stream pairs being forwarded.
    pub forwarded_streams: u64,
    pub window: Window,
    pub within_thresholds: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RampReport {
    pub steps: Vec<RampStep>,
    /// The last step within the thresholds: the capacity.
    pub knee: Option<RampStep>,
    pub stop_reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t_s: f64,
    pub received_pps: f64,
    pub received_mbps: f64,
    pub expected_pps: f64,
    pub loss_pct: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub gateway_cpu_pct: Option<f64>,
    pub gateway_rss_mb: Option<f64>,
    pub gateway_forwarded_pps: Option<f64>,
    pub loadtest_cpu_pct: f64,
    pub gateway_cpu_wait_pct: Option<f64>,
    pub loadtest_cpu_wait_pct: Option<f64>,
    pub publish_ready: u64,
    pub subscribe_ready: u64,
    pub failed: u64,
}

fn opt(v: Option<f64>, unit: &str) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}{unit}"))
}

fn pcts(p: &Percentiles, unit: &str) -> String {
    if p.count == 0 {
        return "-".into();
    }
    format!(
        "p50 {:.1}{unit}  p95 {:.1}{unit}  p99 {:.1}{unit}  max {:.1}{unit}  (n={})",
        p.p50, p.p95, p.p99, p.max, p.count
    )
}

impl Report {
    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let c = &self.config;
        let p = &self.participants;
        let m = &self.media;
        let _ = writeln!(s, "loadtest against {} ({})", c.target_url(), c.target);
        if self.per_node.len() > 1 {
            for n in &self.per_node {
                let _ = writeln!(
                    s,
                    "  node {}: {} participants, {} failed, {} packets received",
                    n.url, n.participants, n.failed, n.packets_received
                );
            }
        }
        let clips: Vec<String> = self
            .video_clips
            .iter()
            .map(|v| format!("{} {}x{} {:.0} kbit/s", v.name, v.width, v.height, v.bitrate_bps as f64 / 1000.0))
            .collect();
        let _ = writeln!(
            s,
            "  {} room(s) x {} publisher(s){}, {} subscriber(s) over the rooms; video {}; audio {}; join rate {}/s",
            c.rooms,
            c.publishers,
            if c.publishers_subscribe { " (also subscribing)" } else { "" },
            c.subscribers,
            if clips.is_empty() { "off".into() } else { clips.join(", ") },
            if c.audio { "opus 32 kbit/s" } else { "off" },
            c.join_rate
        );
        let rows: Vec<(&str, String)> = vec![
            ("participants", format!("{} planned, {} joined", p.planned, p.joined)),
            ("connections READY", format!("{} of {} (publish {}, subscribe {})", p.publish_ready + p.subscribe_ready, p.connections, p.publish_ready, p.subscribe_ready)),
            ("not READY", if p.failures.is_empty() { "0".into() } else { format!("{:?}", p.failures) }),
            ("errors", if p.errors.is_empty() { "0".into() } else { format!("{:?}", p.errors) }),
            (
                "dropped after READY",
                if p.dropped_after_ready.is_empty() { "0".into() } else { format!("{:?}", p.dropped_after_ready) },
            ),
            ("join phase", format!("{:.1} s", self.join_phase_s)),
            ("join INITIAL→READY publish", pcts(&self.join_ms.publish, " ms")),
            ("join INITIAL→READY subscribe", pcts(&self.join_ms.subscribe, " ms")),
            ("join as the client saw it", pcts(&self.join_ms.client, " ms")),
            ("packets sent", format!("{} ({:.1} MB)", m.sent_packets, m.sent_bytes as f64 / 1e6)),
            ("packets received", format!("{} in {} streams ({:.1} MB)", m.received_packets, m.received_streams, m.received_bytes as f64 / 1e6)),
            ("loss (after NACK repair)", format!("{:.3}% ({} of {})", m.loss_pct, m.lost_packets, m.expected_packets)),
            ("unmatched payloads", m.unmatched_payloads.to_string()),
            ("added latency", pcts(&self.latency_ms, " ms")),
            ("jitter (per stream)", pcts(&self.jitter_ms, " ms")),
            ("first keyframe wait", pcts(&self.first_keyframe_ms, " ms")),
            (
                "NACKs / PLIs",
                format!(
                    "subscribers sent {} / {}; publishers got {} / {} (+{} FIR), resent {}, forced {} keyframes",
                    self.feedback.nacks_sent_by_subscribers,
                    self.feedback.plis_sent_by_subscribers,
                    self.feedback.nacks_received_by_publishers,
                    self.feedback.plis_received_by_publishers,
                    self.feedback.firs_received_by_publishers,
                    self.feedback.retransmitted_by_publishers,
                    self.feedback.keyframes_forced_by_requests
                ),
            ),
            (
                "steady window",
                format!(
                    "{:.0} s: {:.0} pkt/s received, loss {:.3}%, latency p50 {:.1} ms p99 {:.1} ms, machine CPU stolen by the hypervisor {}",
                    self.steady.seconds, self.steady.received_pps, self.steady.loss_pct, self.steady.latency_ms.p50, self.steady.latency_ms.p99,
                    opt(self.steady.machine_steal_pct, "%")
                ),
            ),
            (
                c.target.as_str(),
                format!(
                    "[{}] CPU {} (mean {:.0}%, max {:.0}%), waited for a CPU {}, RSS max {:.0} MB, forwarded {} pkt/s, {} CPU per forwarded packet, {} per delivered packet",
                    self.gateway.source,
                    opt(self.gateway.steady_cpu_pct, "%"),
                    self.gateway.cpu_pct.mean,
                    self.gateway.cpu_pct.max,
                    opt(self.steady.gateway_cpu_wait_pct, "%"),
                    self.gateway.rss_mb_max,
                    opt(self.gateway.steady_forwarded_pps, ""),
                    opt(self.gateway.steady_cpu_us_per_forwarded_packet, " µs"),
                    opt(self.gateway.steady_cpu_us_per_delivered_packet, " µs")
                ),
            ),
            (
                "load tester",
                format!(
                    "CPU {:.0}% mean, {:.0}% max on {} thread(s), waited for a CPU {}{}",
                    self.loadtest.cpu_pct.mean,
                    self.loadtest.cpu_pct.max,
                    self.loadtest.threads,
                    opt(self.steady.loadtest_cpu_wait_pct, "%"),
                    if self.loadtest.saturated { " — SATURATED" } else { "" }
                ),
            ),
        ];
        let width = rows.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0);
        for (k, v) in rows {
            let _ = writeln!(s, "  {k:<width$}  {v}");
        }
        if !self.streams.is_empty() {
            let _ = writeln!(s, "  streams:");
            let _ = writeln!(
                s,
                "    {:<12} {:<6} {:<5} {:>9} {:>5} {:>11} {:>8} {:>9} {:>9}",
                "publisher", "kind", "rid", "sent", "subs", "received", "loss %", "p50 ms", "p99 ms"
            );
            for st in self.streams.iter().take(40) {
                let _ = writeln!(
                    s,
                    "    {:<12} {:<6} {:<5} {:>9} {:>5} {:>11} {:>8.3} {:>9.2} {:>9.2}",
                    st.publisher,
                    st.kind,
                    st.rid.as_deref().unwrap_or("-"),
                    st.sent_packets,
                    st.subscribers,
                    st.received_packets,
                    st.loss_pct,
                    st.latency_ms.p50,
                    st.latency_ms.p99
                );
            }
            if self.streams.len() > 40 {
                let _ = writeln!(s, "    … {} more in --json", self.streams.len() - 40);
            }
        }
        if let Some(r) = &self.ramp {
            let _ = writeln!(s, "  ramp (stopped: {}):", r.stop_reason);
            let _ = writeln!(
                s,
                "    {:>5} {:>8} {:>11} {:>11} {:>8} {:>8} {:>8} {:>9} {:>9} {:>7}",
                "subs",
                "streams",
                "rx pkt/s",
                "gw out/s",
                "loss %",
                "p99 ms",
                "gw CPU",
                "gw µs/pkt",
                "our CPU",
                "steal"
            );
            for st in &r.steps {
                let w = &st.window;
                let _ = writeln!(
                    s,
                    "    {:>5} {:>8} {:>11.0} {:>11} {:>8.3} {:>8.1} {:>8} {:>9} {:>8.0}% {:>7}{}",
                    st.subscribers,
                    st.forwarded_streams,
                    w.received_pps,
                    opt(w.gateway_forwarded_pps, ""),
                    w.loss_pct,
                    w.latency_ms.p99,
                    opt(w.gateway_cpu_pct, "%"),
                    opt(w.gateway_cpu_us_per_forwarded_packet, ""),
                    w.loadtest_cpu_pct,
                    opt(w.machine_steal_pct, "%"),
                    if st.within_thresholds { "" } else { "  x" }
                );
            }
            match &r.knee {
                Some(k) => {
                    let _ = writeln!(
                        s,
                        "  capacity at the knee: {} subscribers, {} forwarded streams, {:.0} packets/s forwarded (gateway count {}), gateway CPU {}",
                        k.subscribers,
                        k.forwarded_streams,
                        k.window.received_pps,
                        opt(k.window.gateway_forwarded_pps, "/s"),
                        opt(k.window.gateway_cpu_pct, "%")
                    );
                }
                None => {
                    let _ = writeln!(s, "  capacity: the first step already broke a threshold");
                }
            }
        }
        for w in &self.warnings {
            let _ = writeln!(s, "  warning: {w}");
        }
        s
    }

    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Latency (p50/p99 per second) above, throughput (packets/s, Mbit/s) and CPU below.
    pub fn plot(&self, path: &Path) -> anyhow::Result<()> {
        use plotters::prelude::*;
        let svg = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("svg"));
        if !register_font() {
            anyhow::bail!("plot: no font found (install fonts-dejavu-core or fonts-liberation)");
        }
        let size = (1200, 800);
        if svg {
            let root = SVGBackend::new(path, size).into_drawing_area();
            self.draw(&root).map_err(|e| anyhow::anyhow!("plot: {e}"))?;
            root.present().map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        } else {
            let root = BitMapBackend::new(path, size).into_drawing_area();
            self.draw(&root).map_err(|e| anyhow::anyhow!("plot: {e}"))?;
            root.present().map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        }
        Ok(())
    }

    fn draw<DB: plotters::prelude::DrawingBackend>(
        &self,
        root: &plotters::prelude::DrawingArea<DB, plotters::coord::Shift>,
    ) -> Result<(), plotters::drawing::DrawingAreaErrorKind<DB::ErrorType>> {
        use plotters::prelude::*;
        root.fill(&WHITE)?;
        let (top, bottom) = root.split_vertically(400);
        let t_max = self.series.last().map_or(1.0, |s| s.t_s).max(1.0);
        let lat: Vec<(f64, f64, f64)> =
            self.series.iter().filter_map(|s| Some((s.t_s, s.latency_p50_ms?, s.latency_p99_ms?))).collect();
        let lat_max = lat.iter().map(|x| x.2).fold(1.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(&top)
            .caption("added latency through the gateway (ms, per second)", ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..t_max, 0.0..lat_max)?;
        chart.configure_mesh().x_desc("s").y_desc("ms").draw()?;
        chart
            .draw_series(LineSeries::new(lat.iter().map(|x| (x.0, x.1)), &BLUE))?
            .label("p50")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        chart
            .draw_series(LineSeries::new(lat.iter().map(|x| (x.0, x.2)), &RED))?
            .label("p99")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;

        let pps_max = self.series.iter().map(|s| s.received_pps.max(s.expected_pps)).fold(1.0, f64::max) * 1.1;
        let cpu_max =
            self.series.iter().map(|s| s.gateway_cpu_pct.unwrap_or(0.0).max(s.loadtest_cpu_pct)).fold(100.0, f64::max)
                * 1.1;
        let mut chart = ChartBuilder::on(&bottom)
            .caption("throughput (packets/s received by subscribers) and CPU (%)", ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .right_y_label_area_size(50)
            .build_cartesian_2d(0.0..t_max, 0.0..pps_max)?
            .set_secondary_coord(0.0..t_max, 0.0..cpu_max);
        chart.configure_mesh().x_desc("s").y_desc("packets/s").draw()?;
        chart.configure_secondary_axes().y_desc("CPU %").draw()?;
        chart
            .draw_series(LineSeries::new(self.series.iter().map(|s| (s.t_s, s.received_pps)), &BLUE))?
            .label("received pkt/s")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        chart
            .draw_series(LineSeries::new(self.series.iter().map(|s| (s.t_s, s.expected_pps)), &CYAN))?
            .label("expected pkt/s")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], CYAN));
        chart
            .draw_secondary_series(LineSeries::new(
                self.series.iter().filter_map(|s| Some((s.t_s, s.gateway_cpu_pct?))),
                &RED,
            ))?
            .label("gateway CPU %")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart
            .draw_secondary_series(LineSeries::new(self.series.iter().map(|s| (s.t_s, s.loadtest_cpu_pct)), &GREEN))?
            .label("loadtest CPU %")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    }
}

/// Text needs a font file, for PNG glyphs and for SVG text layout alike: the first of Debian's
/// usual sans fonts that exists. Returns whether one is registered.
fn register_font() -> bool {
    const CANDIDATES: [&str; 3] = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    ];
    static FOUND: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FOUND.get_or_init(|| {
        for path in CANDIDATES {
            if let Ok(bytes) = std::fs::read(path) {
                // plotters keeps fonts for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                // plotters' own labels ask for other families too: one font serves them all.
                let ok = ["sans-serif", "serif", "monospace"].iter().all(|family| {
                    plotters::style::register_font(family, plotters::style::FontStyle::Normal, bytes).is_ok()
                });
                if ok {
                    return true;
                }
            }
        }
        false
    })
}
