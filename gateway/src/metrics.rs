//! Media-plane metrics, registered in the same registry as the signaling metrics. Workers
//! publish deltas once a second, so the packet path touches no shared counters.

use std::collections::HashMap;
use std::sync::Arc;

use prometheus::{
    GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct MediaMetrics {
    /// The engine's counters, one family each (`gateway_core::families`), by name.
    pub counters: Arc<HashMap<&'static str, IntCounterVec>>,
    pub first_frame: Histogram,
    /// Per media worker: datagram read → `sendto` returned, per forwarded packet.
    pub forward_latency: HistogramVec,
    pub send_errors: IntCounter,
    pub worker_busy: GaugeVec,
    pub worker_connections: IntGaugeVec,
    /// Per media worker: how much video it sheds (`gateway_core::overload`), and the longest
    /// a datagram waited in its sockets in the last second.
    pub overload_level: IntGaugeVec,
    pub queue_delay: GaugeVec,
    /// Per media worker: datagrams (and ICE-TCP frames) it sent, and their bytes: how the
    /// egress is shared between workers.
    pub worker_egress_packets: IntCounterVec,
    pub worker_relayed: IntCounterVec,
    pub worker_relay_dropped: IntCounterVec,
    pub worker_egress_bytes: IntCounterVec,
    pub ports_in_use: IntGauge,
    pub ports_free: IntGauge,
    pub build_info: IntGaugeVec,
    /// ICE-TCP (`crate::tcp`): streams accepted and bound to a connection, streams closed for
    /// breaking a rule, frames dropped on the way out, and streams open now.
    pub ice_tcp_streams: IntCounterVec,
    pub ice_tcp_dropped: IntCounterVec,
    pub ice_tcp_frames_dropped: IntCounterVec,
    pub ice_tcp_open: IntGauge,
}

impl MediaMetrics {
    pub fn new(registry: &Registry) -> Self {
        let m = Self {
            counters: Arc::new(
                gateway_core::families::ALL
                    .iter()
                    .map(|f| (f.name, IntCounterVec::new(Opts::new(f.name, f.help), f.labels).expect("valid metric")))
                    .collect(),
            ),
            first_frame: Histogram::with_opts(
                HistogramOpts::new(
                    "gateway_time_to_first_frame_seconds",
                    "From a subscriber track becoming receivable (answered and READY) to its first keyframe forwarded",
                )
                .buckets(vec![0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0]),
            )
            .expect("valid metric"),
            forward_latency: HistogramVec::new(
                HistogramOpts::new(
                    "gateway_forward_latency_seconds",
                    "Per forwarded packet: from the publisher's datagram read off its socket to the send to the subscriber returned",
                )
                .buckets(vec![
                    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                    0.1,
                ]),
                &["worker"],
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
            overload_level: IntGaugeVec::new(
                Opts::new(
                    "gateway_overload_level",
                    "How much video a media worker sheds because it cannot keep up: 0 none, 1 lowest simulcast layers only, 2-4 a quarter, half, three quarters of its subscribers without video, 5 no video",
                ),
                &["worker"],
            )
            .expect("valid metric"),
            queue_delay: GaugeVec::new(
                Opts::new(
                    "gateway_worker_queue_delay_seconds",
                    "The longest a datagram waited in a media worker's socket before it was read, in the last second (kernel receive timestamp vs read time)",
                ),
                &["worker"],
            )
            .expect("valid metric"),
            worker_egress_packets: IntCounterVec::new(
                Opts::new(
                    "gateway_worker_egress_packets_total",
                    "Datagrams and ICE-TCP frames a media worker sent (forwarded media, RTCP, STUN, DTLS)",
                ),
                &["worker"],
            )
            .expect("valid metric"),
            worker_egress_bytes: IntCounterVec::new(
                Opts::new("gateway_worker_egress_bytes_total", "Bytes of the datagrams and frames a media worker sent"),
                &["worker"],
            )
            .expect("valid metric"),
            worker_relayed: IntCounterVec::new(
                Opts::new(
                    "gateway_worker_relayed_packets_total",
                    "Publisher packets a media worker handed to other workers for their subscribers (media.spread)",
                ),
                &["worker"],
            )
            .expect("valid metric"),
            worker_relay_dropped: IntCounterVec::new(
                Opts::new(
                    "gateway_worker_relay_dropped_total",
                    "Publisher packets not handed to another worker because its queue from this one was full (media.spread)",
                ),
                &["worker"],
            )
            .expect("valid metric"),
            ports_in_use: IntGauge::new("gateway_udp_ports_in_use", "UDP ports of the media range in use")
                .expect("valid metric"),
            ports_free: IntGauge::new("gateway_udp_ports_free", "UDP ports of the media range free")
                .expect("valid metric"),
            build_info: IntGaugeVec::new(Opts::new("gateway_build_info", "Build information"), &["version"])
                .expect("valid metric"),
            ice_tcp_streams: IntCounterVec::new(
                Opts::new(
                    "gateway_ice_tcp_streams_total",
                    "ICE-TCP streams accepted on media.tcp_port (accepted), tied to a connection by their first STUN message (bound), closed by the client before their first frame (abandoned)",
                ),
                &["result"],
            )
            .expect("valid metric"),
            ice_tcp_dropped: IntCounterVec::new(
                Opts::new(
                    "gateway_ice_tcp_streams_dropped_total",
                    "ICE-TCP streams closed by the gateway, by reason (garbage, oversized, unknown_ufrag, timeout, overload, limit)",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            ice_tcp_frames_dropped: IntCounterVec::new(
                Opts::new(
                    "gateway_ice_tcp_frames_dropped_total",
                    "Frames not sent on an ICE-TCP stream: its send buffer was full (send_buffer_full) or the stream was gone (no_stream)",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            ice_tcp_open: IntGauge::new("gateway_ice_tcp_streams_open", "ICE-TCP streams bound to a connection now")
                .expect("valid metric"),
        };
        for c in [
            Box::new(m.first_frame.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.forward_latency.clone()),
            Box::new(m.send_errors.clone()),
            Box::new(m.worker_busy.clone()),
            Box::new(m.worker_connections.clone()),
            Box::new(m.overload_level.clone()),
            Box::new(m.queue_delay.clone()),
            Box::new(m.worker_egress_packets.clone()),
            Box::new(m.worker_relayed.clone()),
            Box::new(m.worker_relay_dropped.clone()),
            Box::new(m.worker_egress_bytes.clone()),
            Box::new(m.ports_in_use.clone()),
            Box::new(m.ports_free.clone()),
            Box::new(m.build_info.clone()),
            Box::new(m.ice_tcp_streams.clone()),
            Box::new(m.ice_tcp_dropped.clone()),
            Box::new(m.ice_tcp_frames_dropped.clone()),
            Box::new(m.ice_tcp_open.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        for c in m.counters.values() {
            registry.register(Box::new(c.clone())).expect("metric names are unique");
        }
        // Every series exists from the start (at 0), so dashboards and alerts see it before the
        // first event.
        gateway_core::Counters::default().samples(|fam, labels, _| {
            m.counters[fam.name].with_label_values(labels);
        });
        m.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for result in ["accepted", "bound", "abandoned"] {
            m.ice_tcp_streams.with_label_values(&[result]);
        }
        for reason in crate::tcp::DropReason::DROPS {
            m.ice_tcp_dropped.with_label_values(&[reason.as_str()]);
        }
        for reason in ["send_buffer_full", "no_stream"] {
            m.ice_tcp_frames_dropped.with_label_values(&[reason]);
        }
        m
    }
}
