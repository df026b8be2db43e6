//! The cluster's Prometheus metrics (docs/metrics.md): membership seen, heartbeat age, REST
//! requests proxied and WebSocket sessions relayed by node, Redis errors, rooms lost.

use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

#[derive(Clone)]
pub struct ClusterMetrics {
    /// Live nodes in Redis at the last heartbeat, this one included.
    pub members: IntGauge,
    /// Seconds since this node's last successful heartbeat.
    pub heartbeat_age: Gauge,
    /// REST requests this node proxied, by the owner node they went to.
    pub proxied: IntCounterVec,
    /// Client WebSockets this node relayed to an owner node, by that node.
    pub relayed: IntCounterVec,
    /// Relayed WebSockets open now, by owner node.
    pub relayed_open: IntGaugeVec,
    /// Redis operations that failed, by operation.
    pub redis_errors: IntCounterVec,
    /// Rooms this node marked lost when their node stopped heartbeating.
    pub rooms_lost: IntCounter,
    /// 1, labelled with this node's id.
    pub node_info: IntGaugeVec,
}

impl ClusterMetrics {
    pub fn new(registry: &Registry) -> Self {
        let m = Self {
            members: IntGauge::new("gateway_cluster_members", "Live gateway nodes in Redis at the last heartbeat")
                .expect("valid metric"),
            heartbeat_age: Gauge::new(
                "gateway_cluster_heartbeat_age_seconds",
                "Seconds since this node last refreshed its record in Redis",
            )
            .expect("valid metric"),
            proxied: IntCounterVec::new(
                Opts::new(
                    "gateway_cluster_proxied_requests_total",
                    "REST requests proxied to the node owning the room",
                ),
                &["node"],
            )
            .expect("valid metric"),
            relayed: IntCounterVec::new(
                Opts::new(
                    "gateway_cluster_relayed_sessions_total",
                    "Client WebSockets relayed to the node owning the room",
                ),
                &["node"],
            )
            .expect("valid metric"),
            relayed_open: IntGaugeVec::new(
                Opts::new("gateway_cluster_relayed_sessions", "Relayed client WebSockets open now"),
                &["node"],
            )
            .expect("valid metric"),
            redis_errors: IntCounterVec::new(
                Opts::new("gateway_cluster_redis_errors_total", "Redis operations that failed"),
                &["op"],
            )
            .expect("valid metric"),
            rooms_lost: IntCounter::new(
                "gateway_cluster_rooms_lost_total",
                "Rooms marked lost because their node stopped heartbeating",
            )
            .expect("valid metric"),
            node_info: IntGaugeVec::new(Opts::new("gateway_cluster_node_info", "This node's cluster id"), &["node"])
                .expect("valid metric"),
        };
        let _ = registry.register(Box::new(m.members.clone()));
        let _ = registry.register(Box::new(m.heartbeat_age.clone()));
        let _ = registry.register(Box::new(m.proxied.clone()));
        let _ = registry.register(Box::new(m.relayed.clone()));
        let _ = registry.register(Box::new(m.relayed_open.clone()));
        let _ = registry.register(Box::new(m.redis_errors.clone()));
        let _ = registry.register(Box::new(m.rooms_lost.clone()));
        let _ = registry.register(Box::new(m.node_info.clone()));
        m
    }
}
