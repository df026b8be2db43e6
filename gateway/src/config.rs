//! Gateway configuration (docs/api.md §5): defaults that run on a laptop with no file, an optional
//! TOML file, and `GATEWAY__SECTION__KEY` environment overrides. Unknown keys are errors that
//! name the key.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub http: HttpConfig,
    pub media: MediaConfig,
    pub auth: AuthConfig,
    pub signaling: SignalingConfig,
    pub limits: LimitsConfig,
    pub dev: DevConfig,
    pub log: LogConfig,
    pub shutdown: ShutdownConfig,
    pub webhook: WebhookSettings,
    pub turn: TurnConfig,
    pub cluster: ClusterConfig,
}

/// A cluster of gateways coordinated through Redis (docs/cluster.md). Off (one node, no Redis
/// anywhere) while `redis_url` is empty.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `redis://host:port/db`; empty (the default): no cluster.
    pub redis_url: String,
    /// This node's id in the cluster; empty: the host name and the HTTP port.
    pub node_id: String,
    /// The URL other nodes reach this node's HTTP API at (proxied REST, relayed WebSockets);
    /// empty: `http://` + `http.bind` (a loopback or unspecified bind gives 127.0.0.1).
    pub advertise_url: String,
    /// How often this node refreshes its record (and its load) in Redis.
    pub heartbeat_ms: u64,
    /// A node record not refreshed for this long expires: the node is dead, its rooms are lost.
    pub ttl_ms: u64,
    /// Where a new room goes: `least_loaded` (fewest participants + rooms), `least_rooms`,
    /// `least_busy` (lowest media worker busy ratio) or `random`; draining and full nodes never.
    pub placement: String,
    /// On SIGTERM a node in a cluster first drains: no new rooms, and it waits this long at
    /// most for its rooms to end before it closes what is left (a second signal stops waiting).
    pub drain_wait_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            redis_url: String::new(),
            node_id: String::new(),
            advertise_url: String::new(),
            heartbeat_ms: 1000,
            ttl_ms: 3000,
            placement: "least_loaded".into(),
            drain_wait_ms: 600_000,
        }
    }
}

/// TURN servers the token routes (and WHIP/WHEP `Link` headers) hand out, with credentials
/// minted per participant in coturn's `use-auth-secret` scheme. Both keys or neither.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TurnConfig {
    /// `turn:host:port?transport=udp`, `turns:…` URLs (comma-separated in the environment).
    pub urls: Vec<String>,
    /// coturn's `static-auth-secret`.
    pub secret: String,
}

/// Webhooks to the app backend (docs/api.md "Webhooks"). Off while `urls` is empty.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookSettings {
    /// Every event is POSTed to each of these (comma-separated in GATEWAY__WEBHOOK__URLS).
    pub urls: Vec<String>,
    /// `whsec_<base64 of 24-64 bytes>`: the Standard Webhooks signing key. Required with urls.
    pub secret: String,
    /// Events waiting for delivery (all URLs and rooms); beyond it the oldest are dropped.
    pub queue_capacity: usize,
    /// One attempt's time limit.
    pub timeout_ms: u64,
    /// Wait after the first failed attempt, doubling up to `retry_max_interval_ms`.
    pub retry_initial_ms: u64,
    pub retry_max_interval_ms: u64,
    /// An event still undelivered this long after its first attempt is given up on.
    pub retry_for_s: u64,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// At shutdown, how long to keep delivering what is queued.
    pub shutdown_flush_ms: u64,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        let d = signaling_api::webhook::WebhookConfig::default();
        Self {
            urls: Vec::new(),
            secret: String::new(),
            queue_capacity: d.queue_capacity,
            timeout_ms: d.timeout.as_millis() as u64,
            retry_initial_ms: d.retry_initial.as_millis() as u64,
            retry_max_interval_ms: d.retry_max_interval.as_millis() as u64,
            retry_for_s: d.retry_for.as_secs(),
            concurrency: d.concurrency,
            shutdown_flush_ms: 3000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// address:port of the REST/WebSocket/metrics server.
    pub bind: SocketAddr,
    /// `off`, `self-signed` or `files`.
    pub tls: TlsMode,
    pub cert: Option<String>,
    pub key: Option<String>,
    /// How long a client may take to send a request's headers, counted from the moment the
    /// server waits for them (a new connection, or a kept-alive one after its last response),
    /// before the connection is closed: a connection that sends nothing, or trickles its
    /// headers, must not hold a descriptor forever. Upgraded WebSockets are not affected.
    /// 0 turns it off.
    pub header_read_timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    Off,
    SelfSigned,
    Files,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    pub bind_ip: IpAddr,
    /// Addresses put in candidates instead of the bind address (1:1 NAT). The first is used.
    pub announced_ips: Vec<IpAddr>,
    pub port_min: u16,
    pub port_max: u16,
    /// Media worker threads; 0 means one per core.
    pub workers: usize,
    /// At most one keyframe request per publisher stream per this many ms.
    pub keyframe_throttle_ms: u64,
    /// A keyframe the gateway asked for (new subscriber, layer switch, unrepaired loss) that has
    /// not arrived after this many ms is asked for again.
    pub keyframe_retry_ms: u64,
    /// How long each subscriber's video stream keeps the packets it sent, to answer its NACKs
    /// (str0m's resend buffer), ms. Audio keeps none (it is not retransmitted).
    pub rtx_history_ms: u64,
    /// Estimate each subscriber's bandwidth (TWCC) and choose its simulcast layers, or pause its
    /// video, by it.
    pub bwe: bool,
    /// The bandwidth estimate a subscriber starts from, bits/s.
    pub bwe_initial_bps: u64,
    /// After a subscriber's layer moved down for lack of bandwidth, it moves up again only after
    /// this many ms.
    pub layer_up_hold_ms: u64,
    /// Keep each video layer's packets since its last keyframe and start new subscribers on them
    /// at once instead of asking the publisher for a keyframe (docs/media-quality.md).
    pub keyframe_cache: bool,
    /// Forwarded packets go straight to an encrypted datagram (the vendored str0m's
    /// `send_rtp_now`) instead of through a poll of the subscriber's connection per packet.
    /// A switch to measure against and a fallback; on by default.
    pub direct_send: bool,
    /// Largest data-channel message relayed (payload plus label), bytes.
    pub data_max_message_bytes: usize,
    /// Data-channel messages relayed per second per publisher (bursts of twice that).
    pub data_messages_per_second: u32,
    /// One UDP port per media worker instead of one per connection: worker `i` listens on
    /// `port_min + i` for all its connections (demultiplexed by ICE username, then by the
    /// ICE-authenticated remote address) and sends each loop step's datagrams in one
    /// `sendmmsg` call. Needs a port range at least as large as the worker count.
    pub mux: bool,
    /// One room on every media worker: each room's publishers stay on one worker (its home),
    /// its subscribers go to whichever worker has the fewest, and the home hands each
    /// publisher packet (its payload shared, not copied) to the workers with subscribers of the
    /// room. Off: a room lives on one worker.
    pub spread: bool,
    /// ICE-TCP (RFC 6544): a TCP port on `bind_ip` where clients whose UDP is blocked (and who
    /// have no TURN server) connect; each connection's answer/offer carries a passive TCP host
    /// candidate on it per candidate address (`announced_ips`, or `bind_ip`), at a lower
    /// priority than the UDP one. One listener serves every worker. 0 (the default) is off.
    pub tcp_port: u16,
    /// An offer must be answered (INITIAL → GATHERED) within this.
    pub negotiation_timeout_ms: u64,
    /// ICE + DTLS must complete (GATHERED → READY) within this.
    pub connect_timeout_ms: u64,
    /// A READY connection whose peer sends nothing (not even ICE consent checks, which browsers
    /// send every ~5 s) or whose ICE stays disconnected this long FAILS.
    pub disconnect_grace_ms: u64,
    /// TEST ONLY (0, off, in production): each datagram a media worker forwards costs it this
    /// many extra nanoseconds of wall time (it sleeps), so tests can overload a worker
    /// reproducibly on a shared machine (docs/media-quality.md "Overload").
    pub test_slow_ns: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub api_key: String,
    /// The join-token key with id `default`. Left at its built-in development value while
    /// `token_secrets` is set, it is not a key at all.
    pub token_secret: String,
    /// More join-token keys, so a secret can be rotated without ending sessions: a map
    /// kid → secret (`[auth.token_secrets]`, or GATEWAY__AUTH__TOKEN_SECRETS__<KID>; kids from
    /// the environment are lower-case), or a list of secrets whose kids are derived from them
    /// (comma-separated in GATEWAY__AUTH__TOKEN_SECRETS; the first signs).
    #[serde(skip_serializing_if = "TokenSecrets::is_empty")]
    pub token_secrets: TokenSecrets,
    /// The kid new tokens are signed with: needed when `token_secrets` is a map of several;
    /// otherwise its only (or first) key, or `default` (`token_secret`).
    pub token_kid: String,
}

/// `auth.token_secrets`: kid → secret, or secrets alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenSecrets {
    List(Vec<String>),
    Map(std::collections::BTreeMap<String, String>),
}

impl Default for TokenSecrets {
    fn default() -> Self {
        TokenSecrets::List(Vec::new())
    }
}

impl TokenSecrets {
    pub fn is_empty(&self) -> bool {
        match self {
            TokenSecrets::List(l) => l.is_empty(),
            TokenSecrets::Map(m) => m.is_empty(),
        }
    }

    /// (kid, secret) pairs.
    pub fn keys(&self) -> Vec<(String, String)> {
        match self {
            TokenSecrets::List(l) => l.iter().map(|s| (signaling_api::auth::derived_kid(s), s.clone())).collect(),
            TokenSecrets::Map(m) => m.iter().map(|(k, s)| (k.clone(), s.clone())).collect(),
        }
    }
}

/// The built-in `auth.token_secret`, for a laptop with no config file.
pub const DEV_TOKEN_SECRET: &str = "dev-token-secret-change-me";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SignalingConfig {
    /// A participant whose WebSocket closed without `leave` keeps its connections this long.
    pub reconnect_grace_ms: u64,
    pub ws_max_message_bytes: usize,
    /// Client messages per second per session (bursts of twice that); more get `rate_limited`.
    pub ws_messages_per_second: u32,
    /// Messages queued for a client before it counts as not reading and its session is closed.
    pub ws_outbound_queue: usize,
    /// How long the history of ended connections stays inspectable over REST.
    pub history_retention_s: u64,
    pub default_token_ttl_s: u64,
    pub max_token_ttl_s: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_rooms: usize,
    /// `max_participants` of a room created without one.
    pub default_max_participants: u32,
    /// The most a room may ask for.
    pub max_participants: u32,
    pub max_body_bytes: usize,
    /// Most media sections (tracks) one publish offer may carry.
    pub max_media_sections: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevConfig {
    /// `POST /v1/dev/token`: `auto` (on when http.bind is loopback), `on` or `off`.
    /// Turn it off in production: anyone who reaches it can join any room.
    pub token_route: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: `info`, `debug`, `gateway=debug,str0m=warn`, …
    pub level: String,
    /// `pretty` or `json`.
    pub format: String,
    /// Log participants' IP addresses at info level (they are always at debug).
    pub client_ips: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// On SIGTERM/SIGINT: time to end every connection (clients get FINISHED) and close sockets
    /// before the process exits regardless.
    pub drain_timeout_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { drain_timeout_ms: 5000 }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8080".parse().expect("valid literal"),
            tls: TlsMode::Off,
            cert: None,
            key: None,
            header_read_timeout_ms: 20_000,
        }
    }
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            bind_ip: IpAddr::from([127, 0, 0, 1]),
            announced_ips: Vec::new(),
            port_min: 40000,
            port_max: 40999,
            workers: 0,
            keyframe_throttle_ms: 500,
            keyframe_retry_ms: 500,
            rtx_history_ms: 1_000,
            bwe: true,
            bwe_initial_bps: 1_000_000,
            layer_up_hold_ms: 2_000,
            keyframe_cache: false,
            direct_send: true,
            test_slow_ns: 0,
            data_max_message_bytes: 16 * 1024,
            data_messages_per_second: 50,
            mux: false,
            spread: false,
            tcp_port: 0,
            negotiation_timeout_ms: 30_000,
            connect_timeout_ms: 10_000,
            disconnect_grace_ms: 10_000,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            api_key: "dev-api-key".into(),
            token_secret: DEV_TOKEN_SECRET.into(),
            token_secrets: TokenSecrets::default(),
            token_kid: String::new(),
        }
    }
}

impl Default for SignalingConfig {
    fn default() -> Self {
        Self {
            reconnect_grace_ms: 10_000,
            ws_max_message_bytes: 256 * 1024,
            ws_messages_per_second: 50,
            ws_outbound_queue: 1024,
            history_retention_s: 600,
            default_token_ttl_s: 3600,
            max_token_ttl_s: 7 * 24 * 3600,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_rooms: 1000,
            default_max_participants: 16,
            max_participants: 256,
            max_body_bytes: 64 * 1024,
            max_media_sections: 16,
        }
    }
}

impl Default for DevConfig {
    fn default() -> Self {
        Self { token_route: "auto".into() }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".into(), format: "pretty".into(), client_ips: false }
    }
}

fn valid_kid(k: &str) -> bool {
    !k.is_empty() && k.len() <= 64 && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration key {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, message: message.into() }
}

impl GatewayConfig {
    /// Defaults, then the file (if any), then `GATEWAY__…` variables from `env`.
    pub fn load(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let defaults = config::Config::try_from(&GatewayConfig::default())?;
        let mut b = config::Config::builder().add_source(defaults);
        if let Some(f) = file {
            b = b.add_source(config::File::from(f).format(config::FileFormat::Toml).required(true));
        }
        let vars: config::Map<String, String> = env.into_iter().filter(|(k, _)| k.starts_with("GATEWAY__")).collect();
        b = b.add_source(
            config::Environment::with_prefix("GATEWAY")
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("media.announced_ips")
                .with_list_parse_key("webhook.urls")
                .with_list_parse_key("auth.token_secrets")
                .with_list_parse_key("turn.urls")
                .try_parsing(true)
                .source(Some(vars)),
        );
        let cfg: GatewayConfig = b.build()?.try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.media;
        if m.port_min == 0 || m.port_min > m.port_max {
            return Err(invalid(
                "media.port_min",
                format!("port range {}..={} is empty or inverted", m.port_min, m.port_max),
            ));
        }
        if m.mux && usize::from(m.port_max - m.port_min) + 1 < self.worker_count() {
            return Err(invalid(
                "media.mux",
                format!(
                    "one port per media worker: the range {}..={} is smaller than {} workers",
                    m.port_min,
                    m.port_max,
                    self.worker_count()
                ),
            ));
        }
        if m.spread && self.worker_count() > crate::spread::MAX_WORKERS {
            return Err(invalid(
                "media.spread",
                format!(
                    "rooms are spread over at most {} media workers, not {}: set media.workers",
                    crate::spread::MAX_WORKERS,
                    self.worker_count()
                ),
            ));
        }
        let http = self.http.bind;
        let same_ip = http.ip() == m.bind_ip || http.ip().is_unspecified() || m.bind_ip.is_unspecified();
        if m.tcp_port != 0 && m.tcp_port == http.port() && same_ip {
            return Err(invalid("media.tcp_port", format!("{} is http.bind's port", m.tcp_port)));
        }
        if !(100..=10_000).contains(&m.rtx_history_ms) {
            return Err(invalid("media.rtx_history_ms", "must be between 100 and 10000"));
        }
        if m.bind_ip.is_unspecified() && m.announced_ips.is_empty() {
            return Err(invalid("media.announced_ips", "required when media.bind_ip is unspecified (0.0.0.0 or ::)"));
        }
        if self.http.tls == TlsMode::Files && (self.http.cert.is_none() || self.http.key.is_none()) {
            return Err(invalid("http.cert", "http.tls = \"files\" needs http.cert and http.key"));
        }
        let t = &self.turn;
        if t.urls.is_empty() != t.secret.is_empty() {
            let key = if t.urls.is_empty() { "turn.urls" } else { "turn.secret" };
            return Err(invalid(key, "turn.urls and turn.secret go together"));
        }
        if let Some(bad) = t.urls.iter().find(|u| !(u.starts_with("turn:") || u.starts_with("turns:"))) {
            return Err(invalid("turn.urls", format!("{bad:?} is not a turn: or turns: URL")));
        }
        if !matches!(self.dev.token_route.as_str(), "auto" | "on" | "off" | "true" | "false") {
            return Err(invalid("dev.token_route", "must be auto, on or off"));
        }
        if !matches!(self.log.format.as_str(), "pretty" | "json") {
            return Err(invalid("log.format", "must be pretty or json"));
        }
        if self.auth.api_key.is_empty() {
            return Err(invalid("auth.api_key", "must not be empty"));
        }
        let (keys, kid) = self.token_keys();
        if keys.is_empty() || keys.iter().any(|(_, s)| s.len() < 16) {
            let key = if self.auth.token_secrets.is_empty() { "auth.token_secret" } else { "auth.token_secrets" };
            return Err(invalid(key, "every token secret must be at least 16 characters"));
        }
        if let Some((k, _)) = keys.iter().find(|(k, _)| !valid_kid(k)) {
            return Err(invalid("auth.token_secrets", format!("key id '{k}' must be 1-64 of A-Z a-z 0-9 . _ -")));
        }
        let mut ids: Vec<&String> = keys.iter().map(|(k, _)| k).collect();
        ids.sort();
        ids.dedup();
        if ids.len() != keys.len() {
            return Err(invalid("auth.token_secrets", "a key id appears twice (is `default` also auth.token_secret?)"));
        }
        if !keys.iter().any(|(k, _)| *k == kid) {
            let message = if self.auth.token_kid.is_empty() {
                "required to choose the signing key among several auth.token_secrets".to_owned()
            } else {
                format!("no token key has the id '{kid}'")
            };
            return Err(invalid("auth.token_kid", message));
        }
        if let Err(e) = signaling_api::webhook::validate(&self.webhook()) {
            let key = match e {
                signaling_api::webhook::WebhookConfigError::Secret => "webhook.secret",
                signaling_api::webhook::WebhookConfigError::Url(_) => "webhook.urls",
            };
            return Err(invalid(key, e.to_string()));
        }
        if self.webhook.queue_capacity == 0 || self.webhook.concurrency == 0 {
            return Err(invalid(
                "webhook.queue_capacity",
                "webhook.queue_capacity and webhook.concurrency must be at least 1",
            ));
        }
        let c = &self.cluster;
        if !c.redis_url.is_empty() {
            if !(c.redis_url.starts_with("redis://") || c.redis_url.starts_with("rediss://")) {
                return Err(invalid("cluster.redis_url", "must be a redis:// or rediss:// URL"));
            }
            if c.heartbeat_ms == 0 || c.ttl_ms < 2 * c.heartbeat_ms {
                return Err(invalid("cluster.ttl_ms", "must be at least twice cluster.heartbeat_ms (> 0)"));
            }
            if !c.advertise_url.is_empty() && !c.advertise_url.starts_with("http://") {
                return Err(invalid("cluster.advertise_url", "must be an http:// URL"));
            }
            if !c.node_id.is_empty() && !valid_kid(&c.node_id) {
                return Err(invalid("cluster.node_id", "must be 1-64 of A-Z a-z 0-9 . _ -"));
            }
        }
        if !matches!(c.placement.as_str(), "least_loaded" | "least_rooms" | "least_busy" | "random") {
            return Err(invalid("cluster.placement", "must be least_loaded, least_rooms, least_busy or random"));
        }
        if self.limits.default_max_participants == 0
            || self.limits.default_max_participants > self.limits.max_participants
        {
            return Err(invalid("limits.default_max_participants", "must be between 1 and limits.max_participants"));
        }
        Ok(())
    }

    /// Every join-token key (kid, secret) and the kid that signs: `token_secret` as `default`
    /// (unless it is the built-in value and `token_secrets` is set), then `token_secrets`.
    pub fn token_keys(&self) -> (Vec<(String, String)>, String) {
        let a = &self.auth;
        let mut keys = Vec::new();
        let builtin = a.token_secret == DEV_TOKEN_SECRET && !a.token_secrets.is_empty();
        if !a.token_secret.is_empty() && !builtin {
            keys.push((signaling_api::auth::DEFAULT_KID.to_owned(), a.token_secret.clone()));
        }
        let more = a.token_secrets.keys();
        let kid = if !a.token_kid.is_empty() {
            a.token_kid.clone()
        } else {
            match &a.token_secrets {
                TokenSecrets::List(l) if !l.is_empty() => more[0].0.clone(),
                TokenSecrets::Map(m) if m.len() == 1 && keys.is_empty() => more[0].0.clone(),
                TokenSecrets::Map(m) if !m.is_empty() => String::new(),
                _ => signaling_api::auth::DEFAULT_KID.to_owned(),
            }
        };
        keys.extend(more);
        (keys, kid)
    }

    /// The tracing filter: `RUST_LOG` when it is set (and not empty), else `log.level`.
    pub fn log_filter(&self, rust_log: Option<String>) -> String {
        rust_log.filter(|s| !s.trim().is_empty()).unwrap_or_else(|| self.log.level.clone())
    }

    /// The address in host candidates.
    pub fn candidate_ip(&self) -> IpAddr {
        self.media.announced_ips.first().copied().unwrap_or(self.media.bind_ip)
    }

    pub fn dev_token_route(&self) -> bool {
        match self.dev.token_route.as_str() {
            "on" | "true" => true,
            "off" | "false" => false,
            _ => self.http.bind.ip().is_loopback(),
        }
    }

    pub fn worker_count(&self) -> usize {
        if self.media.workers > 0 {
            self.media.workers
        } else {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        }
    }

    pub fn core(&self) -> gateway_core::CoreConfig {
        gateway_core::CoreConfig {
            keyframe_throttle: Duration::from_millis(self.media.keyframe_throttle_ms),
            negotiation_timeout: Duration::from_millis(self.media.negotiation_timeout_ms),
            connect_timeout: Duration::from_millis(self.media.connect_timeout_ms),
            disconnect_grace: Duration::from_millis(self.media.disconnect_grace_ms),
            stats_interval: Duration::from_secs(1),
            max_media_sections: self.limits.max_media_sections,
            log_client_ips: self.log.client_ips,
            keyframe_retry: Duration::from_millis(self.media.keyframe_retry_ms),
            rtx_history: Duration::from_millis(self.media.rtx_history_ms),
            bwe: self.media.bwe,
            bwe_initial_bps: self.media.bwe_initial_bps,
            layer_up_hold: Duration::from_millis(self.media.layer_up_hold_ms),
            keyframe_cache: self.media.keyframe_cache,
            direct_send: self.media.direct_send,
            direct_round_every: gateway_core::CoreConfig::default().direct_round_every,
            data_max_message_bytes: self.media.data_max_message_bytes,
            data_messages_per_second: self.media.data_messages_per_second,
            ice_tcp: self.ice_tcp_candidates(),
        }
    }

    /// The addresses of our ICE-TCP candidates: `media.tcp_port` on every announced address
    /// (or on the bind address); none when `media.tcp_port` is 0.
    pub fn ice_tcp_candidates(&self) -> Vec<SocketAddr> {
        if self.media.tcp_port == 0 {
            return Vec::new();
        }
        let ips = if self.media.announced_ips.is_empty() {
            vec![self.media.bind_ip]
        } else {
            self.media.announced_ips.clone()
        };
        ips.into_iter().map(|ip| SocketAddr::new(ip, self.media.tcp_port)).collect()
    }

    pub fn webhook(&self) -> signaling_api::webhook::WebhookConfig {
        let w = &self.webhook;
        signaling_api::webhook::WebhookConfig {
            urls: w.urls.iter().map(|u| u.trim().to_owned()).filter(|u| !u.is_empty()).collect(),
            secret: w.secret.clone(),
            queue_capacity: w.queue_capacity,
            timeout: Duration::from_millis(w.timeout_ms),
            retry_initial: Duration::from_millis(w.retry_initial_ms),
            retry_max_interval: Duration::from_millis(w.retry_max_interval_ms),
            retry_for: Duration::from_secs(w.retry_for_s),
            concurrency: w.concurrency,
        }
    }

    /// The cluster is on (`cluster.redis_url` set).
    pub fn clustered(&self) -> bool {
        !self.cluster.redis_url.is_empty()
    }

    /// `cluster.node_id`, or the host name and HTTP port.
    pub fn node_id(&self, http_port: u16) -> String {
        if !self.cluster.node_id.is_empty() {
            return self.cluster.node_id.clone();
        }
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        let host: String =
            host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')).collect();
        format!("{}-{http_port}", if host.is_empty() { "gateway" } else { host.as_str() })
    }

    /// `cluster.advertise_url`, or `http://` + the bound HTTP address (127.0.0.1 for an
    /// unspecified bind).
    pub fn advertise_url(&self, bound: SocketAddr) -> String {
        if !self.cluster.advertise_url.is_empty() {
            return self.cluster.advertise_url.trim_end_matches('/').to_owned();
        }
        let ip = if bound.ip().is_unspecified() { IpAddr::from([127, 0, 0, 1]) } else { bound.ip() };
        format!("http://{}", SocketAddr::new(ip, bound.port()))
    }

    pub fn api(&self) -> signaling_api::ApiConfig {
        signaling_api::ApiConfig {
            api_key: self.auth.api_key.clone(),
            token_secret: self.auth.token_secret.clone(),
            token_keys: self.token_keys().0,
            token_kid: self.token_keys().1,
            dev_token_route: self.dev_token_route(),
            default_max_participants: self.limits.default_max_participants,
            max_participants_limit: self.limits.max_participants,
            max_rooms: self.limits.max_rooms,
            reconnect_grace: Duration::from_millis(self.signaling.reconnect_grace_ms),
            ws_max_message_bytes: self.signaling.ws_max_message_bytes,
            ws_messages_per_second: self.signaling.ws_messages_per_second,
            ws_outbound_queue: self.signaling.ws_outbound_queue.max(16),
            max_body_bytes: self.limits.max_body_bytes,
            default_token_ttl_s: self.signaling.default_token_ttl_s,
            max_token_ttl_s: self.signaling.max_token_ttl_s,
            history_retention: Duration::from_secs(self.signaling.history_retention_s),
            turn: (!self.turn.urls.is_empty()).then(|| signaling_api::auth::TurnConfig {
                urls: self.turn.urls.clone(),
                secret: self.turn.secret.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_work_with_nothing() {
        let c = GatewayConfig::load(None, env(&[])).unwrap();
        assert_eq!(c.http.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(c.media.bind_ip.to_string(), "127.0.0.1");
        assert!(c.dev_token_route());
        assert_eq!(c.http.tls, TlsMode::Off);
    }

    #[test]
    fn env_overrides_with_contract_names() {
        let c = GatewayConfig::load(
            None,
            env(&[
                ("GATEWAY__HTTP__BIND", "0.0.0.0:9000"),
                ("GATEWAY__HTTP__TLS", "self-signed"),
                ("GATEWAY__MEDIA__PORT_MIN", "50000"),
                ("GATEWAY__MEDIA__PORT_MAX", "50010"),
                ("GATEWAY__MEDIA__ANNOUNCED_IPS", "203.0.113.7,198.51.100.1"),
                ("GATEWAY__AUTH__API_KEY", "k"),
                ("GATEWAY__AUTH__TOKEN_SECRET", "0123456789abcdef0123"),
                ("OTHER__THING", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.http.bind.port(), 9000);
        assert_eq!(c.http.tls, TlsMode::SelfSigned);
        assert_eq!((c.media.port_min, c.media.port_max), (50000, 50010));
        assert_eq!(c.candidate_ip().to_string(), "203.0.113.7");
        assert_eq!(c.media.announced_ips.len(), 2);
        assert_eq!(c.auth.api_key, "k");
        assert!(!c.dev_token_route(), "auto is off when bound beyond loopback");
    }

    #[test]
    fn ice_tcp_candidates_follow_the_announced_addresses() {
        let off = GatewayConfig::load(None, env(&[])).unwrap();
        assert!(off.core().ice_tcp.is_empty(), "off by default");
        let on = |extra: &[(&str, &str)]| {
            let mut pairs = vec![("GATEWAY__MEDIA__TCP_PORT", "3478")];
            pairs.extend_from_slice(extra);
            GatewayConfig::load(None, env(&pairs))
        };
        let local = on(&[]).unwrap().core().ice_tcp;
        assert_eq!(local, ["127.0.0.1:3478".parse().unwrap()], "the bind address without announced ones");
        let c = on(&[
            ("GATEWAY__MEDIA__BIND_IP", "0.0.0.0"),
            ("GATEWAY__MEDIA__ANNOUNCED_IPS", "203.0.113.7,198.51.100.1"),
        ])
        .unwrap();
        let want: Vec<std::net::SocketAddr> =
            vec!["203.0.113.7:3478".parse().unwrap(), "198.51.100.1:3478".parse().unwrap()];
        assert_eq!(c.core().ice_tcp, want, "one per announced address, in order");
        let clash = on(&[("GATEWAY__HTTP__BIND", "127.0.0.1:3478")]).unwrap_err().to_string();
        assert!(clash.contains("media.tcp_port"), "{clash}");
    }

    #[test]
    fn webhook_keys_from_env_and_their_checks() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let c = GatewayConfig::load(
            None,
            env(&[
                ("GATEWAY__WEBHOOK__URLS", "http://127.0.0.1:9000/a,https://hooks.example.com/b"),
                ("GATEWAY__WEBHOOK__SECRET", secret),
                ("GATEWAY__WEBHOOK__RETRY_FOR_S", "30"),
            ]),
        )
        .unwrap();
        assert_eq!(c.webhook().urls, ["http://127.0.0.1:9000/a", "https://hooks.example.com/b"]);
        assert_eq!(c.webhook().retry_for, Duration::from_secs(30));
        assert!(GatewayConfig::load(None, env(&[])).unwrap().webhook().urls.is_empty(), "off by default");
        let e = GatewayConfig::load(None, env(&[("GATEWAY__WEBHOOK__URLS", "http://127.0.0.1:9000/a")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("webhook.secret"), "urls without a secret: {e}");
        let e = GatewayConfig::load(
            None,
            env(&[("GATEWAY__WEBHOOK__URLS", "mailto:ops@example.com"), ("GATEWAY__WEBHOOK__SECRET", secret)]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("webhook.urls"), "{e}");
    }

    #[test]
    fn several_token_keys_for_rotation() {
        let old = "the-old-secret-0123456789";
        let new = "the-new-secret-0123456789";
        // Map form from the environment: kids come lower-case.
        let c = GatewayConfig::load(
            None,
            env(&[
                ("GATEWAY__AUTH__TOKEN_SECRET", old),
                ("GATEWAY__AUTH__TOKEN_SECRETS__K2", new),
                ("GATEWAY__AUTH__TOKEN_KID", "k2"),
            ]),
        )
        .unwrap();
        let (keys, kid) = c.token_keys();
        assert_eq!(kid, "k2");
        assert_eq!(keys, [("default".to_owned(), old.to_owned()), ("k2".to_owned(), new.to_owned())]);
        // List form: kids derived, the first signs; the built-in token_secret is no key then.
        let c = GatewayConfig::load(None, env(&[("GATEWAY__AUTH__TOKEN_SECRETS", &format!("{new},{old}"))])).unwrap();
        let (keys, kid) = c.token_keys();
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert_eq!(kid, signaling_api::auth::derived_kid(new));
        assert!(keys.iter().all(|(_, s)| s != DEV_TOKEN_SECRET), "the development secret is not a key");
        // TOML map of several needs token_kid.
        let dir = std::env::temp_dir().join(format!("gwcfg-kid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("g.toml");
        std::fs::write(&f, format!("[auth.token_secrets]\na = \"{old}\"\nb = \"{new}\"\n")).unwrap();
        let e = GatewayConfig::load(Some(&f), env(&[])).unwrap_err().to_string();
        assert!(e.contains("auth.token_kid"), "{e}");
        let c = GatewayConfig::load(Some(&f), env(&[("GATEWAY__AUTH__TOKEN_KID", "b")])).unwrap();
        assert_eq!(c.token_keys().1, "b");
        let e = GatewayConfig::load(Some(&f), env(&[("GATEWAY__AUTH__TOKEN_KID", "zz")])).unwrap_err().to_string();
        assert!(e.contains("no token key has the id 'zz'"), "{e}");
        let e = GatewayConfig::load(None, env(&[("GATEWAY__AUTH__TOKEN_SECRETS", "short")])).unwrap_err().to_string();
        assert!(e.contains("auth.token_secrets"), "{e}");
        // The old configuration keeps working: one key, `default`.
        let c = GatewayConfig::load(None, env(&[("GATEWAY__AUTH__TOKEN_SECRET", old)])).unwrap();
        assert_eq!(c.token_keys(), (vec![("default".to_owned(), old.to_owned())], "default".to_owned()));
    }

    #[test]
    fn rust_log_overrides_the_configured_level() {
        let c = GatewayConfig::default();
        assert_eq!(c.log_filter(None), "info");
        assert_eq!(c.log_filter(Some("gateway=debug".into())), "gateway=debug");
        assert_eq!(c.log_filter(Some("  ".into())), "info", "an empty RUST_LOG is not set");
    }

    #[test]
    fn rtx_history_default_override_and_bounds() {
        let c = GatewayConfig::load(None, env(&[])).unwrap();
        assert_eq!(c.core().rtx_history, Duration::from_secs(1));
        let c = GatewayConfig::load(None, env(&[("GATEWAY__MEDIA__RTX_HISTORY_MS", "2500")])).unwrap();
        assert_eq!(c.core().rtx_history, Duration::from_millis(2500));
        for bad in ["0", "99", "10001"] {
            let err = GatewayConfig::load(None, env(&[("GATEWAY__MEDIA__RTX_HISTORY_MS", bad)])).unwrap_err();
            assert!(err.to_string().contains("media.rtx_history_ms"), "{bad}: {err}");
        }
    }

    #[test]
    fn spread_takes_at_most_64_workers() {
        let spread = |workers: &str| {
            GatewayConfig::load(None, env(&[("GATEWAY__MEDIA__SPREAD", "true"), ("GATEWAY__MEDIA__WORKERS", workers)]))
        };
        assert!(spread("64").unwrap().media.spread);
        let err = spread("65").unwrap_err();
        assert!(err.to_string().contains("media.spread"), "{err}");
    }

    #[test]
    fn turn_urls_and_secret_go_together() {
        let c = GatewayConfig::load(
            None,
            env(&[
                ("GATEWAY__TURN__URLS", "turn:turn.example.com:3478?transport=udp,turns:turn.example.com:5349"),
                ("GATEWAY__TURN__SECRET", "s3cret"),
            ]),
        )
        .unwrap();
        assert_eq!(c.turn.urls.len(), 2);
        assert_eq!(c.api().turn.map(|t| t.secret).as_deref(), Some("s3cret"));
        assert!(GatewayConfig::load(None, env(&[])).unwrap().api().turn.is_none());
        let err = GatewayConfig::load(None, env(&[("GATEWAY__TURN__URLS", "turn:a:3478")])).unwrap_err();
        assert!(err.to_string().contains("turn.secret"), "{err}");
        let err = GatewayConfig::load(None, env(&[("GATEWAY__TURN__SECRET", "x")])).unwrap_err();
        assert!(err.to_string().contains("turn.urls"), "{err}");
        let err =
            GatewayConfig::load(None, env(&[("GATEWAY__TURN__URLS", "http://a"), ("GATEWAY__TURN__SECRET", "x")]))
                .unwrap_err();
        assert!(err.to_string().contains("turn.urls"), "{err}");
    }

    #[test]
    fn file_and_errors_name_the_key() {
        let dir = std::env::temp_dir().join(format!("gwcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("g.toml");
        std::fs::write(&f, "[media]\nport_min = 41000\nport_max = 41001\n").unwrap();
        let c = GatewayConfig::load(Some(&f), env(&[])).unwrap();
        assert_eq!(c.media.port_max, 41001);

        std::fs::write(&f, "[media]\nport_min = 41002\nport_max = 41001\n").unwrap();
        let e = GatewayConfig::load(Some(&f), env(&[])).unwrap_err().to_string();
        assert!(e.contains("media.port_min"), "{e}");

        std::fs::write(&f, "[media]\nport_mni = 1\n").unwrap();
        let e = GatewayConfig::load(Some(&f), env(&[])).unwrap_err().to_string();
        assert!(e.contains("port_mni"), "{e}");
    }
}
