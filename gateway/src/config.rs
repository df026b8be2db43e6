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
    /// One UDP port per media worker instead of one per connection: worker `i` listens on
    /// `port_min + i` for all its connections (demultiplexed by ICE username, then by the
    /// ICE-authenticated remote address) and sends each loop step's datagrams in one
    /// `sendmmsg` call. Needs a port range at least as large as the worker count.
    pub mux: bool,
    /// An offer must be answered (INITIAL → GATHERED) within this.
    pub negotiation_timeout_ms: u64,
    /// ICE + DTLS must complete (GATHERED → READY) within this.
    pub connect_timeout_ms: u64,
    /// A READY connection whose peer sends nothing (not even ICE consent checks, which browsers
    /// send every ~5 s) or whose ICE stays disconnected this long FAILS.
    pub disconnect_grace_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub api_key: String,
    pub token_secret: String,
}

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
        Self { bind: "127.0.0.1:8080".parse().expect("valid literal"), tls: TlsMode::Off, cert: None, key: None }
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
            bwe: true,
            bwe_initial_bps: 1_000_000,
            layer_up_hold_ms: 2_000,
            keyframe_cache: false,
            direct_send: true,
            mux: false,
            negotiation_timeout_ms: 30_000,
            connect_timeout_ms: 10_000,
            disconnect_grace_ms: 10_000,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self { api_key: "dev-api-key".into(), token_secret: "dev-token-secret-change-me".into() }
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
        if m.bind_ip.is_unspecified() && m.announced_ips.is_empty() {
            return Err(invalid("media.announced_ips", "required when media.bind_ip is unspecified (0.0.0.0 or ::)"));
        }
        if self.http.tls == TlsMode::Files && (self.http.cert.is_none() || self.http.key.is_none()) {
            return Err(invalid("http.cert", "http.tls = \"files\" needs http.cert and http.key"));
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
        if self.auth.token_secret.len() < 16 {
            return Err(invalid("auth.token_secret", "must be at least 16 characters"));
        }
        if self.limits.default_max_participants == 0
            || self.limits.default_max_participants > self.limits.max_participants
        {
            return Err(invalid("limits.default_max_participants", "must be between 1 and limits.max_participants"));
        }
        Ok(())
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
            bwe: self.media.bwe,
            bwe_initial_bps: self.media.bwe_initial_bps,
            layer_up_hold: Duration::from_millis(self.media.layer_up_hold_ms),
            keyframe_cache: self.media.keyframe_cache,
            direct_send: self.media.direct_send,
        }
    }

    pub fn api(&self) -> signaling_api::ApiConfig {
        signaling_api::ApiConfig {
            api_key: self.auth.api_key.clone(),
            token_secret: self.auth.token_secret.clone(),
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
