//! The SFU media gateway server.
//!
//! Layout:
//! - `admin`: `gateway admin …`, the REST API as terminal commands.
//! - `cluster`: several gateways as one service, coordinated through Redis (`cluster.redis_url`).
//! - `config`: the configuration (defaults, TOML file, `GATEWAY__…` env), validated.
//! - `http_deadline`: a deadline for a new HTTP connection's first bytes (slow clients).
//! - `server`: assembles and starts everything; `main` and the tests call [`server::start`].
//! - `worker`: media worker threads: a mio loop around the sans-IO `gateway_core::Engine`.
//! - `plane`: the `MediaPlane` the signaling API calls; places rooms on workers.
//! - `ports`: the UDP port pool.
//! - `limits`: the open-file limit, raised to the hard limit at start.
//! - `udp`: a worker's shared socket (`media.mux`) and its batched sends (`sendmmsg`).
//! - `tcp`: ICE-TCP (`media.tcp_port`): the listener, RFC 4571 framing, a worker's streams.
//! - `metrics`: media-plane Prometheus metrics.
//! - `web`: the browser client served at `/`.

pub mod admin;
pub mod cluster;
pub mod config;
pub mod http_deadline;
pub mod limits;
pub mod load;
pub mod metrics;
pub mod plane;
pub mod ports;
pub mod server;
pub mod spread;
pub mod tcp;
pub mod udp;
pub mod web;
pub mod worker;
