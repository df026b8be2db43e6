//! Webhooks: the app backend is told what happens in its rooms (docs/api.md "Webhooks").
//!
//! The registry calls [`Webhooks::emit`] where a state changes (`lifecycle.rs`, `registry.rs`);
//! this module numbers each room's events, signs them per the Standard Webhooks specification
//! (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of
//! "id.timestamp.body">`) and delivers them:
//! - at least once: a failed attempt (no answer in time, or not 2xx) is repeated with the same
//!   `webhook-id` and body, with exponential backoff, until `retry_for` has passed;
//! - in order per room and URL: a room's next event waits until the previous one is delivered
//!   or given up on (rooms do not wait for each other);
//! - from a bounded queue that never blocks its caller (the media workers call in through the
//!   registry): on overflow the oldest queued event is dropped and counted.
//!
//! `emit` only takes a short lock and wakes the dispatcher task; HTTP happens on tokio tasks,
//! one per (URL, room) lane with events, at most `concurrency` requests at a time.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::{Notify, Semaphore};

use crate::metrics::Metrics;
use crate::protocol::{now_rfc3339, ParticipantInfo, WebhookEvent, WebhookEventType, WebhookRoom, WebhookTrack};

/// Webhook settings (the gateway's `webhook.*` keys).
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Every event goes to each of these (http or https). Empty: webhooks are off.
    pub urls: Vec<String>,
    /// `whsec_<base64>`: the HMAC key.
    pub secret: String,
    /// Events waiting for delivery, all URLs and rooms together; beyond it the oldest is dropped.
    pub queue_capacity: usize,
    /// One attempt's limit (connect + request + answer).
    pub timeout: Duration,
    /// Wait after the first failed attempt; doubles after each one up to `retry_max_interval`.
    pub retry_initial: Duration,
    pub retry_max_interval: Duration,
    /// An event not delivered this long after its first attempt is given up on.
    pub retry_for: Duration,
    /// Requests in flight at once, all lanes together.
    pub concurrency: usize,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            urls: Vec::new(),
            secret: String::new(),
            queue_capacity: 10_000,
            timeout: Duration::from_secs(5),
            retry_initial: Duration::from_millis(500),
            retry_max_interval: Duration::from_secs(30),
            retry_for: Duration::from_secs(300),
            concurrency: 16,
        }
    }
}

/// Why a webhook configuration cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookConfigError {
    #[error("webhook.secret must be whsec_ followed by base64 of 24 to 64 bytes")]
    Secret,
    #[error("webhook.urls: {0} is not an http:// or https:// URL")]
    Url(String),
}

/// The HMAC key in a `whsec_<base64>` secret (the prefix may be left out). The specification
/// asks for 24 to 64 bytes.
pub fn parse_secret(secret: &str) -> Result<Vec<u8>, WebhookConfigError> {
    let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| WebhookConfigError::Secret)?;
    if !(24..=64).contains(&key.len()) {
        return Err(WebhookConfigError::Secret);
    }
    Ok(key)
}

/// Check a configuration without starting anything.
pub fn validate(cfg: &WebhookConfig) -> Result<(), WebhookConfigError> {
    if cfg.urls.is_empty() {
        return Ok(());
    }
    parse_secret(&cfg.secret)?;
    for u in &cfg.urls {
        match u.parse::<axum::http::Uri>() {
            Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() => {}
            _ => return Err(WebhookConfigError::Url(u.clone())),
        }
    }
    Ok(())
}

/// The `webhook-signature` value: `v1,` and the base64 HMAC-SHA256 of `id.timestamp.body`.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &str) -> String {
    // new_from_slice accepts keys of any length for HMAC.
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

/// What the registry knows when something happens; the queue adds id, sequence and time.
#[derive(Debug, Clone)]
pub struct Happening {
    pub kind: WebhookEventType,
    pub room_id: String,
    pub room_name: Option<String>,
    pub participant: Option<ParticipantInfo>,
    pub connection_id: Option<String>,
    pub reason: Option<String>,
    pub track: Option<WebhookTrack>,
}

impl Happening {
    pub fn new(kind: WebhookEventType, room_id: &str, room_name: Option<&String>) -> Self {
        Self {
            kind,
            room_id: room_id.to_owned(),
            room_name: room_name.cloned(),
            participant: None,
            connection_id: None,
            reason: None,
            track: None,
        }
    }
    pub fn participant(mut self, participant_id: &str, name: &str) -> Self {
        self.participant =
            Some(ParticipantInfo { participant_id: participant_id.to_owned(), name: name.to_owned(), metadata: None });
        self
    }
    pub fn connection(mut self, connection_id: &str) -> Self {
        self.connection_id = Some(connection_id.to_owned());
        self
    }
    pub fn reason(mut self, reason: &str) -> Self {
        self.reason = Some(reason.to_owned());
        self
    }
    pub fn track(mut self, track: WebhookTrack) -> Self {
        self.track = Some(track);
        self
    }
}

/// One event, serialized once, as every attempt sends it.
#[derive(Debug)]
struct Prepared {
    id: String,
    room_id: String,
    kind: WebhookEventType,
    body: String,
}

struct Item {
    /// Global enqueue order: the smallest among the lanes' fronts is the oldest queued event.
    order: u64,
    event: Arc<Prepared>,
}

#[derive(Default)]
struct Lane {
    items: VecDeque<Item>,
    /// A task is delivering this lane's events (one at a time, in order).
    running: bool,
}

#[derive(Default)]
struct Queue {
    /// (URL index, room id) → its events in order.
    lanes: HashMap<(usize, String), Lane>,
    /// Items in all lanes (not counting those being delivered).
    queued: usize,
    /// Items taken by a lane task and not yet delivered or given up on.
    in_flight: usize,
    /// Last sequence number per live room.
    sequences: HashMap<String, u64>,
    next_order: u64,
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<axum::body::Bytes>,
>;

struct Shared {
    cfg: WebhookConfig,
    key: Vec<u8>,
    client: HttpClient,
    queue: Mutex<Queue>,
    /// Lanes have work that no task is delivering.
    wake: Notify,
    requests: Semaphore,
    metrics: Metrics,
}

/// The webhook sender. Cheap to clone. Built with [`Webhooks::start`] (needs a tokio runtime).
#[derive(Clone)]
pub struct Webhooks {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks").field("urls", &self.shared.cfg.urls).finish_non_exhaustive()
    }
}

impl Webhooks {
    /// Start the sender, or `None` when no URL is configured (webhooks off: nothing runs and the
    /// registry builds no events).
    pub fn start(cfg: WebhookConfig, metrics: Metrics) -> Result<Option<Self>, WebhookConfigError> {
        if cfg.urls.is_empty() {
            return Ok(None);
        }
        validate(&cfg)?;
        let key = parse_secret(&cfg.secret)?;
        let client = http_client();
        let shared = Arc::new(Shared {
            requests: Semaphore::new(cfg.concurrency.max(1)),
            cfg,
            key,
            client,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            metrics,
        });
        tokio::spawn(dispatch(Arc::clone(&shared)));
        Ok(Some(Self { shared }))
    }

    /// Queue an event for every URL. Never blocks on delivery; takes one short lock.
    pub fn emit(&self, h: Happening) {
        let s = &self.shared;
        let m = &s.metrics;
        m.webhook_events.with_label_values(&[h.kind.as_str()]).inc();
        let mut dropped = 0u64;
        {
            let mut q = lock(&s.queue);
            let seq = {
                let n = q.sequences.entry(h.room_id.clone()).or_insert(0);
                *n += 1;
                *n
            };
            if h.kind == WebhookEventType::RoomFinished {
                q.sequences.remove(&h.room_id);
            }
            let event = WebhookEvent {
                id: crate::registry::new_id("evt"),
                kind: h.kind,
                room: WebhookRoom { room_id: h.room_id.clone(), name: h.room_name },
                participant: h.participant,
                connection_id: h.connection_id,
                reason: h.reason,
                track: h.track,
                sequence: seq,
                timestamp: now_rfc3339(),
            };
            let Ok(body) = serde_json::to_string(&event) else { return };
            let prepared = Arc::new(Prepared { id: event.id, room_id: h.room_id, kind: h.kind, body });
            for url in 0..s.cfg.urls.len() {
                let order = q.next_order;
                q.next_order += 1;
                let lane = q.lanes.entry((url, prepared.room_id.clone())).or_default();
                lane.items.push_back(Item { order, event: Arc::clone(&prepared) });
                q.queued += 1;
                while q.queued > s.cfg.queue_capacity {
                    if !q.drop_oldest() {
                        break;
                    }
                    dropped += 1;
                }
            }
            m.webhook_queue_depth.set((q.queued + q.in_flight) as i64);
        }
        if dropped > 0 {
            m.webhook_dropped.inc_by(dropped);
            tracing::warn!(dropped, "webhook queue full: dropped the oldest events");
        }
        s.wake.notify_one();
    }

    /// Events queued or being delivered.
    pub fn pending(&self) -> usize {
        let q = lock(&self.shared.queue);
        q.queued + q.in_flight
    }

    /// Wait (at most `limit`) until every queued event is delivered or given up on; true if the
    /// queue emptied. Used at shutdown.
    pub async fn flush(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let left = self.pending();
            if left == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                tracing::warn!(left, "webhook events still undelivered at shutdown");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Queue {
    /// Drop the oldest queued item (the smallest `order` among lane fronts); false if none.
    fn drop_oldest(&mut self) -> bool {
        let oldest = self
            .lanes
            .iter()
            .filter_map(|(k, l)| l.items.front().map(|i| (i.order, k.clone())))
            .min_by_key(|(order, _)| *order);
        let Some((_, key)) = oldest else { return false };
        if let Some(lane) = self.lanes.get_mut(&key) {
            if let Some(item) = lane.items.pop_front() {
                tracing::debug!(id = item.event.id, room_id = item.event.room_id, "webhook event dropped");
            }
            if lane.items.is_empty() && !lane.running {
                self.lanes.remove(&key);
            }
        }
        self.queued -= 1;
        true
    }
}

fn lock(m: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    // A panic while holding this lock would be a bug in this file; the queue stays usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An HTTP/1.1 client with rustls (the process's one TLS stack, aws-lc-rs) and Mozilla's roots;
/// http URLs too.
fn http_client() -> HttpClient {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    let tls = match rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions() {
        Ok(b) => b.with_root_certificates(roots).with_no_client_auth(),
        Err(e) => {
            // aws-lc-rs supports the default versions; this would be a build problem.
            tracing::error!(error = %e, "webhook TLS setup failed; https webhook URLs will fail");
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("TLS 1.3 is supported by aws-lc-rs")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        }
    };
    let connector =
        hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().build();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector)
}

/// Start a task for every lane that has events and none delivering them.
async fn dispatch(s: Arc<Shared>) {
    loop {
        s.wake.notified().await;
        let ready: Vec<(usize, String)> = {
            let mut q = lock(&s.queue);
            let keys: Vec<(usize, String)> =
                q.lanes.iter().filter(|(_, l)| !l.running && !l.items.is_empty()).map(|(k, _)| k.clone()).collect();
            for k in &keys {
                if let Some(l) = q.lanes.get_mut(k) {
                    l.running = true;
                }
            }
            keys
        };
        for key in ready {
            tokio::spawn(run_lane(Arc::clone(&s), key));
        }
    }
}

/// Deliver one lane's events, one after the other.
async fn run_lane(s: Arc<Shared>, key: (usize, String)) {
    loop {
        let item = {
            let mut q = lock(&s.queue);
            let next = q.lanes.get_mut(&key).and_then(|l| l.items.pop_front());
            match next {
                Some(item) => {
                    q.queued -= 1;
                    q.in_flight += 1;
                    item
                }
                None => {
                    q.lanes.remove(&key);
                    return;
                }
            }
        };
        deliver(&s, key.0, &item.event).await;
        let mut q = lock(&s.queue);
        q.in_flight -= 1;
        s.metrics.webhook_queue_depth.set((q.queued + q.in_flight) as i64);
    }
}

/// Attempt until delivered or `retry_for` has passed since the first attempt.
async fn deliver(s: &Shared, url_index: usize, ev: &Prepared) {
    let url = &s.cfg.urls[url_index];
    let m = &s.metrics;
    let first = Instant::now();
    let mut wait = s.cfg.retry_initial;
    let mut attempt = 1u32;
    loop {
        let result = {
            let _permit = s.requests.acquire().await;
            attempt_once(s, url, ev).await
        };
        m.webhook_attempts.with_label_values(&[result.label()]).inc();
        if let Attempt::Delivered = result {
            m.webhook_deliveries.with_label_values(&["delivered"]).inc();
            tracing::debug!(id = ev.id, kind = ev.kind.as_str(), attempt, "webhook delivered");
            return;
        }
        if first.elapsed() + wait > s.cfg.retry_for {
            m.webhook_deliveries.with_label_values(&["given_up"]).inc();
            tracing::warn!(
                id = ev.id,
                kind = ev.kind.as_str(),
                room_id = ev.room_id,
                url,
                attempts = attempt,
                last = %result,
                "webhook given up"
            );
            return;
        }
        tracing::info!(id = ev.id, kind = ev.kind.as_str(), url, attempt, last = %result, retry_in = ?wait, "webhook attempt failed");
        tokio::time::sleep(jitter(wait)).await;
        wait = (wait * 2).min(s.cfg.retry_max_interval);
        attempt += 1;
    }
}

/// ±20%, so many lanes failing together do not retry in lockstep.
fn jitter(d: Duration) -> Duration {
    use rand::Rng;
    d.mul_f64(rand::rng().random_range(0.8..1.2))
}

enum Attempt {
    Delivered,
    Status(u16),
    Error(String),
}

impl Attempt {
    fn label(&self) -> &'static str {
        match self {
            Attempt::Delivered => "ok",
            Attempt::Status(s) if *s < 500 => "http_4xx",
            Attempt::Status(_) => "http_5xx",
            Attempt::Error(_) => "error",
        }
    }
}

impl std::fmt::Display for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attempt::Delivered => f.write_str("delivered"),
            Attempt::Status(s) => write!(f, "HTTP {s}"),
            Attempt::Error(e) => f.write_str(e),
        }
    }
}

async fn attempt_once(s: &Shared, url: &str, ev: &Prepared) -> Attempt {
    // The timestamp is the attempt's (receivers refuse stale ones); id and body never change.
    let ts = chrono::Utc::now().timestamp();
    let signature = sign(&s.key, &ev.id, ts, &ev.body);
    let req = axum::http::Request::post(url)
        .header("content-type", "application/json")
        .header("user-agent", concat!("gateway-webhooks/", env!("CARGO_PKG_VERSION")))
        .header("webhook-id", &ev.id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", signature)
        .body(http_body_util::Full::new(axum::body::Bytes::from(ev.body.clone())));
    let req = match req {
        Ok(r) => r,
        Err(e) => return Attempt::Error(format!("bad request: {e}")),
    };
    let exchange = async {
        let resp = s.client.request(req).await.map_err(|e| format!("{e}"))?;
        let status = resp.status().as_u16();
        // Read (and drop) the answer so the connection can be reused.
        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
        Ok::<u16, String>(status)
    };
    match tokio::time::timeout(s.cfg.timeout, exchange).await {
        Ok(Ok(status)) if (200..300).contains(&status) => Attempt::Delivered,
        Ok(Ok(status)) => Attempt::Status(status),
        Ok(Err(e)) => Attempt::Error(e),
        Err(_) => Attempt::Error("timed out".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks libraries' own test suites.
    #[test]
    fn signature_matches_the_specifications_vector() {
        let key = parse_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, r#"{"test": 2432232314}"#);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        // Any change to id, timestamp or body changes it.
        assert_ne!(sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJel", 1614265330, r#"{"test": 2432232314}"#), sig);
        assert_ne!(sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265331, r#"{"test": 2432232314}"#), sig);
        assert_ne!(sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, r#"{"test": 2432232315}"#), sig);
    }

    #[test]
    fn secrets_and_urls_are_checked() {
        assert!(parse_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_ok());
        assert!(parse_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_ok(), "the prefix is optional");
        assert_eq!(parse_secret("whsec_c2hvcnQ="), Err(WebhookConfigError::Secret), "5 bytes is too short");
        assert_eq!(parse_secret("whsec_not base64!"), Err(WebhookConfigError::Secret));
        let ok = WebhookConfig {
            urls: vec!["https://hooks.example.com/gw".into(), "http://127.0.0.1:9/x".into()],
            secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
            ..WebhookConfig::default()
        };
        assert_eq!(validate(&ok), Ok(()));
        let bad = WebhookConfig { urls: vec!["ftp://x".into()], ..ok.clone() };
        assert!(matches!(validate(&bad), Err(WebhookConfigError::Url(_))));
        let nosecret = WebhookConfig { secret: String::new(), ..ok };
        assert_eq!(validate(&nosecret), Err(WebhookConfigError::Secret));
        assert_eq!(validate(&WebhookConfig::default()), Ok(()), "off needs nothing");
    }

    fn happening(room: &str) -> Happening {
        Happening::new(WebhookEventType::RoomStarted, room, None)
    }

    /// A receiver that is not there: every attempt fails at once (connection refused).
    fn unreachable(capacity: usize) -> (Webhooks, Metrics) {
        let metrics = Metrics::new(prometheus::Registry::new());
        let cfg = WebhookConfig {
            urls: vec!["http://127.0.0.1:9/hooks".into()],
            secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
            queue_capacity: capacity,
            retry_initial: Duration::from_millis(50),
            retry_for: Duration::from_millis(200),
            ..WebhookConfig::default()
        };
        (Webhooks::start(cfg, metrics.clone()).unwrap().unwrap(), metrics)
    }

    #[tokio::test]
    async fn a_full_queue_drops_the_oldest_and_counts_it() {
        let (hooks, metrics) = unreachable(3);
        // Emitted back to back, before the dispatcher runs: 5 into a queue of 3.
        for i in 0..5 {
            hooks.emit(happening(&format!("r{i}")));
        }
        assert_eq!(metrics.webhook_dropped.get(), 2);
        {
            let q = lock(&hooks.shared.queue);
            let mut left: Vec<&str> = q.lanes.keys().map(|k| k.1.as_str()).collect();
            left.sort();
            assert_eq!(left, ["r2", "r3", "r4"], "the two oldest went");
        }
        // Nothing reachable: each is given up on after its retry time, and the queue empties.
        assert!(hooks.flush(Duration::from_secs(5)).await);
        assert_eq!(metrics.webhook_deliveries.with_label_values(&["given_up"]).get(), 3);
        assert!(metrics.webhook_attempts.with_label_values(&["error"]).get() >= 6, "retried before giving up");
        assert_eq!(metrics.webhook_queue_depth.get(), 0);
    }

    #[tokio::test]
    async fn sequences_count_per_room_and_restart_after_room_finished() {
        let (hooks, _) = unreachable(100);
        let seq = |hooks: &Webhooks, room: &str| -> Vec<u64> {
            let q = lock(&hooks.shared.queue);
            q.lanes
                .get(&(0, room.to_owned()))
                .map(|l| {
                    l.items
                        .iter()
                        .map(|i| serde_json::from_str::<WebhookEvent>(&i.event.body).unwrap().sequence)
                        .collect()
                })
                .unwrap_or_default()
        };
        hooks.emit(happening("a"));
        hooks.emit(happening("b"));
        hooks.emit(happening("a"));
        hooks.emit(Happening::new(WebhookEventType::RoomFinished, "a", None));
        assert_eq!(seq(&hooks, "a"), [1, 2, 3]);
        assert_eq!(seq(&hooks, "b"), [1]);
        assert!(!lock(&hooks.shared.queue).sequences.contains_key("a"), "a finished room keeps no counter");
    }
}
