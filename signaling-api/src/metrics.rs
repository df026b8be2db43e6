//! The signaling side's Prometheus metrics. The gateway registers its media metrics in the same
//! registry so `/metrics` shows both. Labels are bounded: never a room, participant or connection id.

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub rooms: IntGauge,
    pub participants: IntGauge,
    pub ws_sessions: IntGauge,
    pub connections: IntGaugeVec,
    pub connection_events: IntCounterVec,
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
            Box::new(http_requests.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Self { registry, rooms, participants, ws_sessions, connections, connection_events, http_requests }
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
