//! The signaling side's Prometheus metrics. The gateway registers its media metrics in the same
//! registry so `/metrics` shows both. Labels are bounded: never a room, participant or connection id.

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

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
    /// ICE restarts applied (a publisher's restart offer, a subscriber's `restart_ice`), by role.
    pub ice_restarts: IntCounterVec,
    pub http_requests: IntCounterVec,
    /// REST latency by method and route.
    pub http_seconds: HistogramVec,
    /// Webhook events emitted, by type.
    pub webhook_events: IntCounterVec,
    /// Webhook events' fate per URL: `delivered` or `given_up` (retried until `retry_for`).
    pub webhook_deliveries: IntCounterVec,
    /// Every webhook request: `ok`, `http_4xx`, `http_5xx`, `error` (no answer, timeout).
    pub webhook_attempts: IntCounterVec,
    /// Webhook events queued or being delivered.
    pub webhook_queue_depth: IntGauge,
    /// Webhook events dropped because the queue was full (the oldest go first).
    pub webhook_dropped: IntCounter,
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
        let ice_restarts = IntCounterVec::new(
            Opts::new(
                "gateway_ice_restarts_total",
                "ICE restarts applied (a publisher's restart offer, a subscriber's restart_ice), by role",
            ),
            &["role"],
        )
        .expect("valid metric");
        let http_requests = IntCounterVec::new(
            Opts::new("gateway_http_requests_total", "REST requests by route, status and method"),
            &["route", "status", "method"],
        )
        .expect("valid metric");
        let http_seconds = HistogramVec::new(
            HistogramOpts::new("gateway_http_request_duration_seconds", "REST request latency, by method and route")
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            &["method", "route"],
        )
        .expect("valid metric");
        let webhook_events =
            IntCounterVec::new(Opts::new("gateway_webhook_events_total", "Webhook events emitted, by type"), &["type"])
                .expect("valid metric");
        let webhook_deliveries = IntCounterVec::new(
            Opts::new(
                "gateway_webhook_deliveries_total",
                "Webhook events per URL by outcome: delivered, or given_up after retrying",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let webhook_attempts = IntCounterVec::new(
            Opts::new(
                "gateway_webhook_attempts_total",
                "Webhook HTTP requests by result (ok, http_4xx, http_5xx, error)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let webhook_queue_depth =
            IntGauge::new("gateway_webhook_queue_depth", "Webhook events queued or being delivered")
                .expect("valid metric");
        let webhook_dropped =
            IntCounter::new("gateway_webhook_dropped_total", "Webhook events dropped because the queue was full")
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
            Box::new(ice_restarts.clone()),
            Box::new(http_requests.clone()),
            Box::new(http_seconds.clone()),
            Box::new(webhook_events.clone()),
            Box::new(webhook_deliveries.clone()),
            Box::new(webhook_attempts.clone()),
            Box::new(webhook_queue_depth.clone()),
            Box::new(webhook_dropped.clone()),
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
            ice_restarts.with_label_values(&[role]);
            for reason in FAILURE_REASONS.iter().chain(["other"].iter()) {
                failures.with_label_values(&[role, reason]);
            }
            for event in ["INITIAL", "SDP_PROCESSED", "GATHERED", "CANDIDATE", "READY", "FINISHED", "FAILED"] {
                connection_events.with_label_values(&[role, event]);
            }
        }
        for t in crate::protocol::WebhookEventType::ALL {
            webhook_events.with_label_values(&[t.as_str()]);
        }
        for o in ["delivered", "given_up"] {
            webhook_deliveries.with_label_values(&[o]);
        }
        for r in ["ok", "http_4xx", "http_5xx", "error"] {
            webhook_attempts.with_label_values(&[r]);
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
            ice_restarts,
            http_requests,
            http_seconds,
            webhook_events,
            webhook_deliveries,
            webhook_attempts,
            webhook_queue_depth,
            webhook_dropped,
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
