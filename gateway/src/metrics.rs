//! Media-plane metrics, registered in the same registry as the signaling metrics. Workers
//! publish deltas once a second, so the packet path touches no shared counters.

use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

#[derive(Clone)]
pub struct MediaMetrics {
    pub rtp_packets: IntCounterVec,
    pub rtp_bytes: IntCounterVec,
    pub keyframe_requests: IntCounterVec,
    pub nacks: IntCounterVec,
    pub retransmitted: IntCounter,
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
                    "Keyframe requests (PLI/FIR) from subscribers (in), to publishers (out), merged by the throttle (throttled)",
                ),
                &["direction"],
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
        m.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for direction in ["in", "out"] {
            for kind in ["audio", "video"] {
                m.rtp_packets.with_label_values(&[direction, kind]);
                m.rtp_bytes.with_label_values(&[direction, kind]);
            }
            m.nacks.with_label_values(&[direction]);
            m.keyframe_requests.with_label_values(&[direction]);
        }
        m.keyframe_requests.with_label_values(&["throttled"]);
        for reason in ["garbage", "untrusted_source"] {
            m.dropped_datagrams.with_label_values(&[reason]);
        }
        m
    }
}
