//! A cluster of gateways coordinated through Redis (docs/cluster.md), on when
//! `cluster.redis_url` is set; without it none of this exists and nothing changes.
//!
//! - `store`: the Redis keys and the Lua scripts that change them atomically.
//! - `route`: the HTTP middleware that serves every REST route on every node: a request for a
//!   room owned elsewhere is proxied to its owner, listings merge the whole cluster, a new room
//!   is placed on the least loaded node.
//! - `relay`: a client WebSocket that lands on a node not owning its room is relayed to the
//!   owner's.
//! - `metrics`: membership, heartbeat age, proxied and relayed traffic by node, Redis errors.
//!
//! This module ([`Cluster`]) holds the node's identity, the heartbeat task (refresh the node
//! record with the live load, sync the node's rooms, reap dead nodes) and the registry's
//! [`RoomDirectory`] (claim a room before creating it, release it when it closes). Nothing on
//! the media path touches Redis: an outage stops placements and lookups, never a call.

pub mod metrics;
pub mod relay;
pub mod route;
pub mod store;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use signaling_api::error::ApiError;
use signaling_api::media::RoomDirectory;
use signaling_api::protocol::ErrorCode;
use signaling_api::AppState;

use crate::config::GatewayConfig;
use crate::metrics::MediaMetrics;
use metrics::ClusterMetrics;
use store::{Claim, NodeRecord, Store};

/// The header a node adds to what it proxies or relays: the receiver serves it locally.
pub const HOP_HEADER: &str = "x-gateway-cluster-hop";

/// Where a new room goes (`cluster.placement`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Fewest participants + rooms.
    LeastLoaded,
    LeastRooms,
    /// Lowest mean media worker busy ratio.
    LeastBusy,
    Random,
}

impl Placement {
    pub fn parse(s: &str) -> Self {
        match s {
            "least_rooms" => Placement::LeastRooms,
            "least_busy" => Placement::LeastBusy,
            "random" => Placement::Random,
            _ => Placement::LeastLoaded,
        }
    }

    /// The node for a new room among `nodes`: never a draining or full one; ties are broken at
    /// random so equal nodes share the new rooms.
    pub fn choose(self, nodes: &[NodeRecord]) -> Option<&NodeRecord> {
        use rand::seq::IndexedRandom;
        let open: Vec<&NodeRecord> =
            nodes.iter().filter(|n| !n.draining && (n.capacity == 0 || n.rooms < n.capacity)).collect();
        let score = |n: &NodeRecord| -> f64 {
            match self {
                Placement::LeastLoaded => (n.participants + n.rooms) as f64,
                Placement::LeastRooms => n.rooms as f64,
                Placement::LeastBusy => n.busy,
                Placement::Random => 0.0,
            }
        };
        let best = open.iter().map(|n| score(n)).fold(f64::INFINITY, f64::min);
        let ties: Vec<&NodeRecord> = open.into_iter().filter(|n| score(n) <= best + 1e-9).collect();
        ties.choose(&mut rand::rng()).copied()
    }
}

/// This node in the cluster.
pub struct Cluster {
    pub node_id: String,
    /// This node's HTTP API as other nodes reach it.
    pub url: String,
    media: String,
    capacity: u64,
    pub store: Store,
    pub metrics: ClusterMetrics,
    pub placement: Placement,
    heartbeat: Duration,
    ttl: Duration,
    /// Proxied REST requests.
    pub http: reqwest::Client,
    /// The signaling API's state (set once it exists: the registry is built with this
    /// directory first).
    state: OnceLock<AppState>,
    /// Rooms claimed in Redis but not yet in the registry: the heartbeat keeps them.
    pending: Mutex<HashMap<String, (String, Instant)>>,
    /// Wakes the heartbeat now (drain, undrain).
    wake: tokio::sync::Notify,
    media_metrics: MediaMetrics,
    workers: usize,
}

impl Cluster {
    pub fn new(
        cfg: &GatewayConfig,
        http_addr: std::net::SocketAddr,
        prom: &prometheus::Registry,
        media_metrics: MediaMetrics,
    ) -> anyhow::Result<Arc<Self>> {
        let c = &cfg.cluster;
        let heartbeat = Duration::from_millis(c.heartbeat_ms);
        // A Redis call may take at most a heartbeat (and never under 200 ms): a hung Redis
        // cannot hold a request long.
        let timeout = heartbeat.max(Duration::from_millis(200));
        let store = Store::new(&c.redis_url, timeout).map_err(|e| anyhow::anyhow!("cluster.redis_url: {e}"))?;
        let node_id = cfg.node_id(http_addr.port());
        let metrics = ClusterMetrics::new(prom);
        metrics.node_info.with_label_values(&[node_id.as_str()]).set(1);
        // Other nodes close a kept-alive connection that has been idle for
        // `http.header_read_timeout_ms`: drop idle ones well before, or a request written as the
        // other end closes one would fail (a written request is not retried).
        let idle_ms = match cfg.http.header_read_timeout_ms {
            0 => 10_000,
            t => (t / 2).min(10_000),
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_millis(idle_ms))
            .build()?;
        Ok(Arc::new(Self {
            url: cfg.advertise_url(http_addr),
            media: format!("{}:{}-{}", cfg.candidate_ip(), cfg.media.port_min, cfg.media.port_max),
            capacity: cfg.limits.max_rooms as u64,
            node_id,
            store,
            metrics,
            placement: Placement::parse(&c.placement),
            heartbeat,
            ttl: Duration::from_millis(c.ttl_ms),
            http,
            state: OnceLock::new(),
            pending: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
            media_metrics,
            workers: cfg.worker_count(),
        }))
    }

    /// Hand over the signaling API's state and start the heartbeat.
    pub fn start(self: &Arc<Self>, state: AppState) -> tokio::task::JoinHandle<()> {
        let _ = self.state.set(state);
        let c = Arc::clone(self);
        tokio::spawn(async move { c.heartbeat_loop().await })
    }

    pub fn state(&self) -> &AppState {
        self.state.get().expect("the cluster is started with the API state")
    }

    pub fn draining(&self) -> bool {
        self.state.get().is_some_and(|s| s.draining.load(Ordering::Relaxed))
    }

    /// Refresh the record now (the drain state changed).
    pub fn beat_now(&self) {
        self.wake.notify_one();
    }

    /// Stop taking new rooms (SIGTERM in a cluster): the record says so at once.
    pub fn drain(&self) {
        if let Some(s) = self.state.get() {
            s.draining.store(true, Ordering::Relaxed);
        }
        self.beat_now();
    }

    /// Leave the cluster at shutdown: the record goes at once (its rooms were released as they
    /// closed) instead of expiring.
    pub async fn leave(&self) {
        if let Err(e) = self.store.remove_node(&self.node_id).await {
            tracing::warn!(error = %e, "cluster: could not remove this node's record");
        }
    }

    fn forwarded_packets(&self) -> u64 {
        (0..self.workers)
            .map(|i| self.media_metrics.forward_latency.with_label_values(&[i.to_string().as_str()]).get_sample_count())
            .sum()
    }

    fn busy(&self) -> f64 {
        if self.workers == 0 {
            return 0.0;
        }
        let sum: f64 = (0..self.workers)
            .map(|i| self.media_metrics.worker_busy.with_label_values(&[i.to_string().as_str()]).get())
            .sum();
        sum / self.workers as f64
    }

    /// The rooms Redis should hold for this node: the registry's and those being claimed.
    fn local_rooms(&self) -> Vec<(String, String)> {
        let state = self.state();
        let mut rooms: Vec<(String, String)> =
            state.registry.room_summaries().into_iter().map(|r| (r.room_id, r.name.unwrap_or_default())).collect();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.retain(|id, (_, at)| !state.registry.has_room(id) && at.elapsed() < Duration::from_secs(30));
        rooms.extend(pending.iter().map(|(id, (name, _))| (id.clone(), name.clone())));
        rooms
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        let mut last_ok: Option<Instant> = None;
        let mut failing = false;
        let mut prev = (Instant::now(), self.forwarded_packets());
        loop {
            let rooms = self.local_rooms();
            let census = self.state().registry.census();
            let now = Instant::now();
            let forwarded = self.forwarded_packets();
            let secs = now.duration_since(prev.0).as_secs_f64();
            let pps = if secs > 0.0 { forwarded.saturating_sub(prev.1) as f64 / secs } else { 0.0 };
            prev = (now, forwarded);
            let record = NodeRecord {
                id: self.node_id.clone(),
                url: self.url.clone(),
                media: self.media.clone(),
                capacity: self.capacity,
                rooms: rooms.len() as u64,
                participants: census.participants as u64,
                packets_per_s: pps,
                busy: self.busy(),
                draining: self.draining(),
                heartbeat_at_ms: unix_ms(),
            };
            match self.store.heartbeat(&record, self.ttl, &rooms).await {
                Ok(existed) => {
                    if !existed {
                        tracing::info!(node = %self.node_id, url = %self.url, rooms = rooms.len(), "cluster: registered in Redis");
                    } else if failing {
                        tracing::info!(node = %self.node_id, "cluster: Redis reachable again");
                    }
                    failing = false;
                    last_ok = Some(Instant::now());
                    match self.store.reap().await {
                        Ok(lost) if !lost.is_empty() => {
                            self.metrics.rooms_lost.inc_by(lost.len() as u64);
                            tracing::warn!(rooms = ?lost, "cluster: rooms lost with a node that stopped heartbeating");
                        }
                        Ok(_) => {}
                        Err(e) => self.redis_error("reap", &e),
                    }
                    match self.store.members().await {
                        Ok(m) => self.metrics.members.set(m.len() as i64),
                        Err(e) => self.redis_error("members", &e),
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "cluster: heartbeat failed; calls go on, new rooms wait for Redis");
                    }
                    failing = true;
                    self.redis_error("heartbeat", &e);
                }
            }
            let age = last_ok.map(|t| t.elapsed().as_secs_f64()).unwrap_or(f64::INFINITY);
            self.metrics.heartbeat_age.set(if age.is_finite() { age } else { -1.0 });
            tokio::select! {
                _ = tokio::time::sleep(self.heartbeat) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    pub fn redis_error(&self, op: &str, e: &store::StoreError) {
        self.metrics.redis_errors.with_label_values(&[op]).inc();
        tracing::debug!(op, error = %e, "cluster: Redis error");
    }

    /// The live nodes, this one's drain state taken from here (its record may be a heartbeat
    /// old).
    pub async fn members(&self) -> Result<Vec<NodeRecord>, ApiError> {
        let mut nodes = self.store.members().await.map_err(|e| {
            self.redis_error("members", &e);
            ApiError::from(e)
        })?;
        for n in &mut nodes {
            if n.id == self.node_id {
                n.draining = self.draining();
            }
        }
        Ok(nodes)
    }
}

#[async_trait::async_trait]
impl RoomDirectory for Cluster {
    async fn claim(&self, room_id: &str, name: Option<&str>) -> Result<(), ApiError> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(room_id.to_owned(), (name.unwrap_or("").to_owned(), Instant::now()));
        let r = self.store.claim(&self.node_id, room_id, name).await;
        let refused = |e: ApiError| {
            self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(room_id);
            Err(e)
        };
        match r {
            Ok(Claim::Ok) => Ok(()),
            Ok(Claim::Taken) => refused(ApiError::new(
                ErrorCode::Conflict,
                format!("room name '{}' is taken", name.unwrap_or_default()),
            )),
            Ok(Claim::Unregistered) => refused(ApiError::new(
                ErrorCode::ClusterUnavailable,
                "this node is not registered in the cluster yet; retry",
            )),
            Err(e) => {
                self.redis_error("claim", &e);
                refused(e.into())
            }
        }
    }

    async fn release(&self, room_id: &str, _name: Option<&str>) {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(room_id);
        if let Err(e) = self.store.release(&self.node_id, room_id).await {
            // The next heartbeat that reaches Redis releases it.
            self.redis_error("release", &e);
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, rooms: u64, participants: u64, busy: f64, draining: bool) -> NodeRecord {
        NodeRecord { id: id.into(), rooms, participants, busy, draining, capacity: 10, ..Default::default() }
    }

    #[test]
    fn placement_skips_draining_and_full_nodes_and_picks_the_least_loaded() {
        let nodes = [node("a", 1, 9, 0.9, false), node("b", 3, 2, 0.1, false), node("c", 0, 0, 0.0, true)];
        assert_eq!(Placement::LeastLoaded.choose(&nodes).unwrap().id, "b");
        assert_eq!(Placement::LeastRooms.choose(&nodes).unwrap().id, "a");
        assert_eq!(Placement::LeastBusy.choose(&nodes).unwrap().id, "b");
        let full = [node("a", 10, 0, 0.0, false), node("b", 0, 0, 0.0, true)];
        assert!(Placement::Random.choose(&full).is_none(), "full and draining nodes take nothing");
        // Ties are shared at random.
        let even = [node("a", 0, 0, 0.0, false), node("b", 0, 0, 0.0, false)];
        let picks: std::collections::HashSet<String> =
            (0..64).map(|_| Placement::LeastLoaded.choose(&even).unwrap().id.clone()).collect();
        assert_eq!(picks.len(), 2);
    }

    #[test]
    fn cluster_config_is_validated() {
        let mut cfg = GatewayConfig::default();
        cfg.cluster.redis_url = "redis://127.0.0.1:6379".into();
        cfg.validate().unwrap();
        cfg.cluster.ttl_ms = cfg.cluster.heartbeat_ms;
        assert!(cfg.validate().unwrap_err().to_string().contains("cluster.ttl_ms"));
        cfg.cluster.ttl_ms = 3000;
        cfg.cluster.placement = "nearest".into();
        assert!(cfg.validate().unwrap_err().to_string().contains("cluster.placement"));
        cfg.cluster.placement = "least_busy".into();
        cfg.cluster.redis_url = "http://x".into();
        assert!(cfg.validate().unwrap_err().to_string().contains("cluster.redis_url"));
        assert_eq!(cfg.advertise_url("0.0.0.0:8080".parse().unwrap()), "http://127.0.0.1:8080");
    }
}
