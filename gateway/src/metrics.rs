//! Media-plane metrics, registered in the same registry as the signaling metrics. Workers
//! publish deltas once a second, so the packet path touches no shared counters.

use prometheus::{
    GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct MediaMetrics {
    pub rtp_packets: IntCounterVec,
    pub rtp_bytes: IntCounterVec,
    pub keyframe_requests: IntCounterVec,
    pub nacks: IntCounterVec,
    pub retransmitted: IntCounter,
    pub unrecoverable: IntCounter,
    pub layer_switches: IntCounter,
    pub video_pauses: IntCounter,
    pub streams_unavailable: IntCounterVec,
    pub first_frame: Histogram,
    pub dropped_datagrams: IntCounterVec,
    pub send_errors: IntCounter,
    pub worker_busy: GaugeVec,
    pub worker_connections: IntGaugeVec,
    pub ports_in_use: IntGauge,
    pub ports_free: IntGauge,
    pub build_info: IntGaugeVec,
}

impl MediaMetrics {
    pub fn new(registry: &Registry) -> Self {
        let m = Self {
            rtp_packets: IntCounterVec::new(
                Opts::new(
                    "gateway_rtp_packets_total",
                    "RTP packets received from publishers (in) and sent to subscribers (out)",
                ),
                &["direction", "kind"],
            )
            .expect("valid metric"),
            rtp_bytes: IntCounterVec::new(
                Opts::new("gateway_rtp_bytes_total", "RTP payload bytes in and out"),
                &["direction", "kind"],
            )
            .expect("valid metric"),
            keyframe_requests: IntCounterVec::new(
                Opts::new(
                    "gateway_keyframe_requests_total",
                    "Keyframe requests from subscribers (in), to publishers (out), merged by the throttle (throttled), by kind (pli, fir)",
                ),
                &["direction", "kind"],
            )
            .expect("valid metric"),
            nacks: IntCounterVec::new(
                Opts::new("gateway_nacks_total", "NACKs received from subscribers (in) and sent to publishers (out)"),
                &["direction"],
            )
            .expect("valid metric"),
            retransmitted: IntCounter::new(
                "gateway_retransmitted_packets_total",
                "Packets resent to subscribers from the send buffer (RTX) in answer to NACKs",
            )
            .expect("valid metric"),
            unrecoverable: IntCounter::new(
                "gateway_unrecoverable_losses_total",
                "Publisher packets lost for good (NACK did not bring them back in time); each leads to a keyframe request",
            )
            .expect("valid metric"),
            layer_switches: IntCounter::new(
                "gateway_layer_switches_total",
                "Simulcast layer switches for subscribers (set_layer or bandwidth estimate), not counting the first layer",
            )
            .expect("valid metric"),
            video_pauses: IntCounter::new(
                "gateway_video_pauses_total",
                "Subscriber video tracks paused because not even the lowest layer fit the bandwidth estimate",
            )
            .expect("valid metric"),
            streams_unavailable: IntCounterVec::new(
                Opts::new(
                    "gateway_streams_unavailable_total",
                    "Streams a subscriber was offered but cannot receive, by reason (codec_unsupported: it cannot decode the publication's codec)",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            first_frame: Histogram::with_opts(
                HistogramOpts::new(
                    "gateway_time_to_first_frame_seconds",
                    "From a subscriber track becoming receivable (answered and READY) to its first keyframe forwarded",
                )
                .buckets(vec![0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0]),
            )
            .expect("valid metric"),
            dropped_datagrams: IntCounterVec::new(
                Opts::new("gateway_dropped_datagrams_total", "Datagrams dropped before reaching a connection"),
                &["reason"],
            )
            .expect("valid metric"),
            send_errors: IntCounter::new("gateway_udp_send_errors_total", "UDP sends that failed")
                .expect("valid metric"),
            worker_busy: GaugeVec::new(
                Opts::new("gateway_worker_busy_ratio", "Share of the last second a media worker spent working"),
                &["worker"],
            )
            .expect("valid metric"),
            worker_connections: IntGaugeVec::new(
                Opts::new("gateway_worker_connections", "Connections owned by a media worker"),
                &["worker"],
            )
            .expect("valid metric"),
            ports_in_use: IntGauge::new("gateway_udp_ports_in_use", "UDP ports of the media range in use")
                .expect("valid metric"),
            ports_free: IntGauge::new("gateway_udp_ports_free", "UDP ports of the media range free")
                .expect("valid metric"),
            build_info: IntGaugeVec::new(Opts::new("gateway_build_info", "Build information"), &["version"])
                .expect("valid metric"),
        };
        for c in [
            Box::new(m.rtp_packets.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.rtp_bytes.clone()),
            Box::new(m.keyframe_requests.clone()),
            Box::new(m.nacks.clone()),
            Box::new(m.retransmitted.clone()),
            Box::new(m.unrecoverable.clone()),
            Box::new(m.layer_switches.clone()),
            Box::new(m.video_pauses.clone()),
            Box::new(m.streams_unavailable.clone()),
            Box::new(m.first_frame.clone()),
            Box::new(m.dropped_datagrams.clone()),
            Box::new(m.send_errors.clone()),
            Box::new(m.worker_busy.clone()),
            Box::new(m.worker_connections.clone()),
            Box::new(m.ports_in_use.clone()),
            Box::new(m.ports_free.clone()),
            Box::new(m.build_info.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        // Exported from the start (at 0), so dashboards and alerts see the series before the first.
        m.streams_unavailable.with_label_values(&["codec_unsupported"]);
        m.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for direction in ["in", "out"] {
            for kind in ["audio", "video"] {
                m.rtp_packets.with_label_values(&[direction, kind]);
                m.rtp_bytes.with_label_values(&[direction, kind]);
            }
            m.nacks.with_label_values(&[direction]);
        }
        for direction in ["in", "out", "throttled"] {
            for kind in ["pli", "fir"] {
                m.keyframe_requests.with_label_values(&[direction, kind]);
            }
        }
        for reason in ["garbage", "untrusted_source"] {
            m.dropped_datagrams.with_label_values(&[reason]);
        }
        m
    }
}
