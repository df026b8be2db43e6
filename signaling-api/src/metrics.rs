//! The signaling side's Prometheus metrics. The gateway registers its media metrics in the same
//! registry so `/metrics` shows both. Labels are bounded: never a room, participant or connection id.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub rooms: IntGauge,
    pub participants: IntGauge,
    pub ws_sessions: IntGauge,
    pub connections: IntGaugeVec,
    pub connection_events: IntCounterVec,
    pub transitions: IntCounterVec,
    pub setup_seconds: HistogramVec,
    pub failures: IntCounterVec,
    pub http_requests: IntCounterVec,
}

impl Metrics {
    pub fn new(registry: Registry) -> Self {
        let rooms = IntGauge::new("gateway_rooms", "Rooms that exist").expect("valid metric");
        let participants = IntGauge::new("gateway_participants", "Participants in all rooms").expect("valid metric");
        let ws_sessions = IntGauge::new("gateway_ws_sessions", "Open client WebSocket sessions").expect("valid metric");
        let connections = IntGaugeVec::new(
            Opts::new("gateway_connections", "Live connections by state (INITIAL, GATHERED, READY)"),
            &["state"],
        )
        .expect("valid metric");
        let connection_events = IntCounterVec::new(
            Opts::new("gateway_connection_events_total", "Connection events and state transitions by event"),
            &["role", "event"],
        )
        .expect("valid metric");
        let transitions = IntCounterVec::new(
            Opts::new("gateway_connection_transitions_total", "Connection state transitions by from and to state"),
            &["from", "to"],
        )
        .expect("valid metric");
        let setup_seconds = HistogramVec::new(
            HistogramOpts::new("gateway_connection_setup_seconds", "Time from INITIAL to READY")
                .buckets(vec![0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0]),
            &["role"],
        )
        .expect("valid metric");
        let failures = IntCounterVec::new(
            Opts::new(
                "gateway_connection_failures_total",
                "Connections that ended FAILED, by reason (bad_sdp, ice_timeout, …)",
            ),
            &["role", "reason"],
        )
        .expect("valid metric");
        let http_requests = IntCounterVec::new(
            Opts::new("gateway_http_requests_total", "REST requests by route and status"),
            &["route", "status"],
        )
        .expect("valid metric");
        // Registration fails only for duplicate names, which is a programming error.
        for c in [
            Box::new(rooms.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(participants.clone()),
            Box::new(ws_sessions.clone()),
            Box::new(connections.clone()),
            Box::new(connection_events.clone()),
            Box::new(transitions.clone()),
            Box::new(setup_seconds.clone()),
            Box::new(failures.clone()),
            Box::new(http_requests.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        // Every bounded label value exists from the start, so dashboards and alerts see zeros
        // rather than missing series on an idle gateway.
        for state in ["INITIAL", "GATHERED", "READY"] {
            connections.with_label_values(&[state]);
        }
        for (from, to) in [
            ("INITIAL", "GATHERED"),
            ("GATHERED", "READY"),
            ("READY", "FINISHED"),
            ("INITIAL", "FINISHED"),
            ("GATHERED", "FINISHED"),
            ("INITIAL", "FAILED"),
            ("GATHERED", "FAILED"),
            ("READY", "FAILED"),
        ] {
            transitions.with_label_values(&[from, to]);
        }
        for role in ["publish", "subscribe"] {
            setup_seconds.with_label_values(&[role]);
            for reason in FAILURE_REASONS.iter().chain(["other"].iter()) {
                failures.with_label_values(&[role, reason]);
            }
            for event in ["INITIAL", "SDP_PROCESSED", "GATHERED", "CANDIDATE", "READY", "FINISHED", "FAILED"] {
                connection_events.with_label_values(&[role, event]);
            }
        }
        Self {
            registry,
            rooms,
            participants,
            ws_sessions,
            connections,
            connection_events,
            transitions,
            setup_seconds,
            failures,
            http_requests,
        }
    }

    /// Prometheus text exposition of everything registered.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        let enc = prometheus::TextEncoder::new();
        if enc.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Reasons a connection FAILS with (the part before any `:`); anything else counts as `other`.
pub const FAILURE_REASONS: [&str; 8] = [
    "bad_sdp",
    "negotiation_timeout",
    "ice_timeout",
    "dtls_timeout",
    "ice_disconnected",
    "dtls_error",
    "rtc_error",
    "internal",
];

/// The bounded label for a failure reason: the part before `:` if it is one of ours.
pub fn reason_label(reason: Option<&str>) -> &'static str {
    let head = reason.unwrap_or("").split(':').next().unwrap_or("").trim();
    FAILURE_REASONS.iter().find(|k| **k == head).copied().unwrap_or("other")
}

#[cfg(test)]
mod tests {
    #[test]
    fn failure_reasons_are_bounded() {
        assert_eq!(super::reason_label(Some("bad_sdp: offer has no m= section")), "bad_sdp");
        assert_eq!(super::reason_label(Some("ice_timeout")), "ice_timeout");
        assert_eq!(super::reason_label(Some("something a client typed")), "other");
        assert_eq!(super::reason_label(None), "other");
    }
}
