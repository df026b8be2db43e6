//! The command line. Every flag is documented in loadtest/README.md as well.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{Parser, ValueEnum};

use crate::media::{AudioSource, VideoCodec};
use crate::run::{Config, Ramp};
use crate::signaling::TargetKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Parser, Debug)]
#[command(
    name = "loadtest",
    version,
    about = "Synthetic WebRTC publishers and subscribers against a gateway, through its public API only",
    after_help = "Scenarios (LiveKit-style):\n  \
        audio 10xN:   --publishers 10 --video off --subscribers N\n  \
        meeting NxN:  --publishers N --publishers-subscribe --subscribers 0\n  \
        livestream:   --publishers 1 --subscribers N\n  \
        capacity:     --publishers 1 --subscribers 0 --ramp --ramp-step 20"
)]
pub struct Args {
    /// The server under test: this project's gateway, or Janus 1.1's VideoRoom plugin over its
    /// HTTP transport (see --janus-url) with the same participants, media and measurements.
    #[arg(long, value_enum, default_value = "gateway")]
    pub target: TargetKind,
    /// Janus's HTTP API (with --target janus). Its host must be an IP address: Janus's
    /// candidates may name only it (and --janus-media-ip); an SDP naming any other address is
    /// refused.
    #[arg(long, default_value = "http://127.0.0.1:8088/janus")]
    pub janus_url: String,
    /// Another address Janus's candidates may name (repeatable).
    #[arg(long)]
    pub janus_media_ip: Vec<IpAddr>,
    /// Base URL of the gateway's REST/WebSocket API.
    /// Repeat it for the nodes of a cluster: participants are spread over them in turn and the
    /// report counts per node.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: Vec<String>,
    /// The gateway's REST API key (`auth.api_key`).
    #[arg(long, env = "LOADTEST_API_KEY", default_value = "dev-api-key")]
    pub api_key: String,
    /// Rooms to create; each gets the publishers and subscribers below.
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// Publishers per room (audio and/or video, see --video/--audio).
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Subscribe-only participants in all, spread over the rooms in turn (each receives every
    /// stream of its room).
    #[arg(long, default_value_t = 10)]
    pub subscribers: usize,
    /// Publishers also subscribe to everyone else (a meeting).
    #[arg(long)]
    pub publishers_subscribe: bool,
    /// How long media flows once everyone has joined (e.g. 30s, 2m, 500ms).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Publish video.
    #[arg(long, value_enum, default_value = "on")]
    pub video: OnOff,
    /// Publish audio (Opus, 32 kbit/s, 20 ms packets).
    #[arg(long, value_enum, default_value = "on")]
    pub audio: OnOff,
    /// What publishers' microphones hear, one per publisher in turn (comma-separated, e.g.
    /// `tone,silence`: the first publisher of each room a tone, the second silence, ...). Every
    /// audio packet carries its level (RFC 6464), as browsers send it.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "tone")]
    pub audio_source: Vec<AudioSource>,
    /// Video bitrate of a single-layer publisher, e.g. 1.5M, 500k: the committed clip nearest to
    /// it is sent (150k 320x180, 500k 640x360, 1.5M 1280x720).
    #[arg(long, default_value = "1.5M", value_parser = parse_bitrate)]
    pub video_bitrate: u64,
    /// Simulcast layers per video publisher, 1-3 (q 150k, h 500k, f 1.5M); 1 = no simulcast.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3))]
    pub simulcast_layers: u8,
    /// Pace publishers' video as a browser does: its packets leave at this multiple of the
    /// video bitrate (libwebrtc's pacer: 2.5), so a frame's packets are spread out instead of
    /// sent at once. 0 (the default) sends each frame's packets in one burst, the worst case
    /// for the server's queueing.
    #[arg(long, default_value_t = 0.0)]
    pub pacing: f64,
    /// Participants started per second.
    #[arg(long, default_value_t = 10.0)]
    pub join_rate: f64,
    /// Video codec.
    #[arg(long, value_enum, default_value = "vp8")]
    pub codec: VideoCodec,
    /// Add subscribers step by step until loss or p99 latency passes its threshold, and report
    /// the capacity at the knee (instead of --duration).
    #[arg(long)]
    pub ramp: bool,
    /// Subscribers added per ramp step (spread over the rooms).
    #[arg(long, default_value_t = 10)]
    pub ramp_step: usize,
    /// Measurement time of each ramp step (after its subscribers are READY and 1 s to settle).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub ramp_step_duration: Duration,
    /// Ramp threshold: loss in percent.
    #[arg(long, default_value_t = 1.0)]
    pub max_loss: f64,
    /// Ramp threshold: p99 added latency in ms.
    #[arg(long, default_value_t = 50.0)]
    pub max_p99_ms: f64,
    /// Ramp stops here at the latest (subscribers, all rooms).
    #[arg(long, default_value_t = 1000)]
    pub ramp_max: usize,
    /// The server's pid, for CPU and RSS from /proc (same machine); otherwise they come from
    /// the gateway's /metrics (process_cpu_seconds_total, process_resident_memory_bytes), or,
    /// for Janus, from the one process named `janus`.
    #[arg(long, alias = "server-pid")]
    pub pid: Option<u32>,
    /// Write every figure as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Plot latency and throughput over time (.png or .svg).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Room name prefix (rooms are <prefix>-0, <prefix>-1, …); default random.
    #[arg(long)]
    pub room_prefix: Option<String>,
    /// One room with exactly this name, created if missing and joined if it exists (e.g. a
    /// browser's room); it is not deleted at the end.
    #[arg(long, conflicts_with = "room_prefix")]
    pub room: Option<String>,
    /// Address our UDP sockets bind to; the gateway must be able to reach it.
    #[arg(long, default_value = "127.0.0.1")]
    pub local_ip: IpAddr,
    /// A connection not READY within this counts as failed (`timeout`).
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Tokio worker threads (default: the CPUs this process may run on).
    #[arg(long)]
    pub threads: Option<usize>,
    /// No live progress line.
    #[arg(long)]
    pub quiet: bool,
    /// Keep the rooms at the end (they are deleted by default).
    #[arg(long)]
    pub keep_rooms: bool,
}

/// Where to write results.
pub struct Outputs {
    pub json: Option<PathBuf>,
    pub plot: Option<PathBuf>,
}

impl Args {
    pub fn into_config(self) -> anyhow::Result<(Config, Outputs)> {
        if self.join_rate <= 0.0 {
            bail!("--join-rate must be positive");
        }
        if !(self.pacing == 0.0 || (1.0..=100.0).contains(&self.pacing)) {
            bail!("--pacing must be 0 (no pacing) or between 1 and 100 (times the video bitrate)");
        }
        if let Some(p) = &self.plot {
            let ok = p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "svg"));
            if !ok {
                bail!("--plot must end in .png or .svg");
            }
        }
        let defaults = Config::default();
        let exact = self.room.is_some();
        let cfg = Config {
            target: self.target,
            janus_url: self.janus_url,
            janus_media_ips: self.janus_media_ip,
            url: self.url.first().cloned().unwrap_or_else(|| defaults.url.clone()),
            extra_urls: self.url.iter().skip(1).cloned().collect(),
            api_key: self.api_key,
            rooms: if exact { 1 } else { self.rooms },
            publishers: self.publishers,
            subscribers: self.subscribers,
            publishers_subscribe: self.publishers_subscribe,
            duration: self.duration,
            video: self.video == OnOff::On,
            audio: self.audio == OnOff::On,
            audio_sources: self.audio_source,
            video_bitrate: self.video_bitrate,
            simulcast_layers: usize::from(self.simulcast_layers),
            pacing: self.pacing,
            join_rate: self.join_rate,
            codec: self.codec,
            ramp: self.ramp.then_some(Ramp {
                step: self.ramp_step.max(1),
                step_duration: self.ramp_step_duration,
                max_loss_pct: self.max_loss,
                max_p99_ms: self.max_p99_ms,
                max_subscribers: self.ramp_max,
            }),
            pid: self.pid,
            room_prefix: self.room.or(self.room_prefix).unwrap_or(defaults.room_prefix),
            exact_room_name: exact,
            local_ip: self.local_ip,
            connect_timeout: self.connect_timeout,
            progress: !self.quiet,
            cleanup: !self.keep_rooms,
        };
        Ok((cfg, Outputs { json: self.json, plot: self.plot }))
    }
}

/// `30s`, `2m`, `500ms`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.find(|c: char| c.is_ascii_alphabetic()).map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let v: f64 = num.trim().parse().map_err(|_| format!("not a duration: {s}"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("unknown unit in {s}: use ms, s, m or h")),
    };
    if !(secs.is_finite() && secs >= 0.0) {
        return Err(format!("not a duration: {s}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `1.5M`, `500k`, `800000` (bit/s).
pub fn parse_bitrate(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1e3),
        Some('m' | 'M') => (&s[..s.len() - 1], 1e6),
        _ => (s, 1.0),
    };
    let v: f64 = num.parse().map_err(|_| format!("not a bitrate: {s}"))?;
    Ok((v * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_bitrates_parse() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert!(parse_duration("5x").is_err());
        assert_eq!(parse_bitrate("1.5M"), Ok(1_500_000));
        assert_eq!(parse_bitrate("500k"), Ok(500_000));
        assert_eq!(parse_bitrate("800000"), Ok(800_000));
    }

    #[test]
    fn url_repeated_spreads_over_the_nodes_of_a_cluster() {
        let a = Args::try_parse_from(["loadtest", "--url", "http://a:8080", "--url", "http://b:8081"]).unwrap();
        let (cfg, _) = a.into_config().unwrap();
        assert_eq!(cfg.url, "http://a:8080");
        assert_eq!(cfg.extra_urls, ["http://b:8081"]);
        let (one, _) = Args::try_parse_from(["loadtest"]).unwrap().into_config().unwrap();
        assert_eq!((one.url.as_str(), one.extra_urls.len()), ("http://127.0.0.1:8080", 0));
    }

    #[test]
    fn the_documented_command_line_parses() {
        let a = Args::try_parse_from([
            "loadtest",
            "--url",
            "http://127.0.0.1:8080",
            "--api-key",
            "K",
            "--rooms",
            "4",
            "--publishers",
            "2",
            "--subscribers",
            "10",
            "--duration",
            "30s",
            "--video",
            "on",
            "--audio",
            "off",
            "--video-bitrate",
            "500k",
            "--simulcast-layers",
            "2",
            "--join-rate",
            "5",
            "--codec",
            "h264",
            "--ramp",
        ])
        .unwrap();
        let (cfg, _) = a.into_config().unwrap();
        assert_eq!((cfg.rooms, cfg.publishers, cfg.subscribers), (4, 2, 10));
        assert!(cfg.video && !cfg.audio && cfg.ramp.is_some());
        assert_eq!(cfg.codec, VideoCodec::H264);
        assert_eq!(cfg.target, TargetKind::Gateway);
    }

    #[test]
    fn janus_target_flags_parse() {
        let a = Args::try_parse_from([
            "loadtest",
            "--target",
            "janus",
            "--janus-url",
            "http://10.213.0.1:8088/janus",
            "--janus-media-ip",
            "10.213.0.3",
            "--server-pid",
            "42",
        ])
        .unwrap();
        let (cfg, _) = a.into_config().unwrap();
        assert_eq!(cfg.target, TargetKind::Janus);
        assert_eq!(cfg.target_url(), "http://10.213.0.1:8088/janus");
        assert_eq!(cfg.janus_media_ips, vec!["10.213.0.3".parse::<IpAddr>().unwrap()]);
        assert_eq!(cfg.pid, Some(42));
    }
}
