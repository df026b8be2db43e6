//! Assembles the gateway: metrics registry, port pool, media workers, the media plane, the
//! signaling API and the web client, served over HTTP or HTTPS. Used by `main` and by the
//! integration tests, which start a real gateway on ephemeral ports.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum_server::accept::NoDelayAcceptor;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use signaling_api::media::{EventSink, MediaPlane};
use signaling_api::registry::Registry;
use signaling_api::AppState;

use crate::cluster::Cluster;
use crate::config::{GatewayConfig, TlsMode};
use crate::http_deadline::FirstBytesDeadline;
use crate::metrics::MediaMetrics;
use crate::plane::GatewayMedia;
use crate::ports::PortPool;
use crate::worker::{self, Command, Directory, WorkerSetup};

/// A started gateway.
pub struct Running {
    pub http_addr: SocketAddr,
    pub tls: bool,
    pub state: AppState,
    pub ports: Arc<PortPool>,
    media: Arc<GatewayMedia>,
    /// This node in a cluster (`cluster.redis_url`), with its heartbeat task.
    pub cluster: Option<(Arc<Cluster>, tokio::task::JoinHandle<()>)>,
    /// At shutdown, how long queued webhook events may still be delivered.
    webhook_flush: Duration,
    server: tokio::task::JoinHandle<()>,
    server_handle: axum_server::Handle<SocketAddr>,
    workers: Vec<std::thread::JoinHandle<()>>,
    /// The ICE-TCP listener (`media.tcp_port`), if on.
    ice_tcp: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// `http://…` or `https://…` base URL of the API.
    pub fn base_url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.http_addr)
    }

    /// In a cluster: stop taking new rooms (the node's record says so at once, `/healthz`
    /// answers 503) and wait until this node's rooms have ended, at most `wait`. Nothing on a
    /// single node.
    pub async fn drain_cluster(&self, wait: Duration) {
        let Some((cluster, _)) = &self.cluster else { return };
        cluster.drain();
        let deadline = tokio::time::Instant::now() + wait;
        tracing::info!(
            rooms = self.state.registry.room_ids().len(),
            "draining: no new rooms; waiting for calls to end"
        );
        while !self.state.registry.room_ids().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stop taking new work, end every connection FINISHED (clients get the events), close
    /// sockets, stop the workers and the HTTP server.
    pub async fn shutdown(self, drain: Duration) {
        let state = &self.state;
        state.draining.store(true, Ordering::Relaxed);
        let rooms = state.registry.room_ids();
        let close_all = async {
            for room in &rooms {
                let _ = state.registry.close_room(self.media.as_ref(), room, "shutdown").await;
            }
        };
        if tokio::time::timeout(drain, close_all).await.is_err() {
            tracing::warn!("drain time over before every room was closed");
        }
        state.registry.close_all_sessions(1001, "shutdown");
        // Tell the app backend what the shutdown ended (participant_left, room_finished).
        if let Some(hooks) = state.registry.webhooks() {
            hooks.flush(self.webhook_flush).await;
        }
        self.server_handle.graceful_shutdown(Some(drain));
        let _ = tokio::time::timeout(drain + Duration::from_secs(1), self.server).await;
        if let Some(listener) = self.ice_tcp {
            listener.abort();
        }
        if let Some((cluster, heartbeat)) = self.cluster {
            heartbeat.abort();
            cluster.leave().await;
        }
        for w in self.media.workers() {
            w.send(Command::Shutdown);
        }
        for j in self.workers {
            let _ = j.join();
        }
    }
}

pub async fn start(cfg: GatewayConfig) -> anyhow::Result<Running> {
    let prom = prometheus::Registry::new();
    let api_metrics = signaling_api::metrics::Metrics::new(prom.clone());
    let webhooks =
        signaling_api::webhook::Webhooks::start(cfg.webhook(), api_metrics.clone()).context("webhook configuration")?;
    let media_metrics = MediaMetrics::new(&prom);
    // In a cluster the node's id and advertised URL come from the bound HTTP port: bind first.
    let mut early_listener = None;
    let cluster = if cfg.clustered() {
        let listener = std::net::TcpListener::bind(cfg.http.bind)
            .with_context(|| format!("http.bind: cannot listen on {}", cfg.http.bind))?;
        let cluster = Cluster::new(&cfg, listener.local_addr()?, &prom, media_metrics.clone())?;
        early_listener = Some(listener);
        Some(cluster)
    } else {
        None
    };
    let directory = cluster.clone().map(|c| c as Arc<dyn signaling_api::media::RoomDirectory>);
    let registry = Arc::new(Registry::new(api_metrics).with_webhooks(webhooks).with_directory(directory));
    // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, …
    let _ = prom.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()));
    // With `media.mux` worker i owns port `port_min + i` and no port is taken per connection.
    let ports = Arc::new(if cfg.media.mux {
        PortPool::new(1, 0)
    } else {
        PortPool::new(cfg.media.port_min, cfg.media.port_max)
    });
    let directory = Arc::new(Directory::new());
    // ICE-TCP: one listener for every worker, bound before the workers start so a taken port
    // fails the start.
    let ice_tcp = if cfg.media.tcp_port != 0 {
        let addr = SocketAddr::new(cfg.media.bind_ip, cfg.media.tcp_port);
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("media.tcp_port: cannot listen for ICE-TCP on {addr}"))?;
        tracing::info!(%addr, candidates = ?cfg.core().ice_tcp, "ICE-TCP listener");
        Some((listener, Arc::new(crate::tcp::UfragDirectory::new())))
    } else {
        None
    };

    if cfg.media.test_slow_ns > 0 {
        tracing::warn!(
            ns = cfg.media.test_slow_ns,
            "media.test_slow_ns is set: media workers are slowed on purpose (test only)"
        );
    }
    crate::load::set_test_slow_ns(cfg.media.test_slow_ns);
    let mut handles = Vec::new();
    let mut joins = Vec::new();
    let mut spread_links = if cfg.media.spread && cfg.worker_count() > 1 {
        crate::spread::Hub::links(cfg.worker_count()).into_iter().map(Some).collect()
    } else {
        Vec::new()
    };
    for index in 0..cfg.worker_count() {
        let label = index.to_string();
        media_metrics.worker_busy.with_label_values(&[label.as_str()]).set(0.0);
        media_metrics.overload_level.with_label_values(&[label.as_str()]).set(0);
        media_metrics.queue_delay.with_label_values(&[label.as_str()]).set(0.0);
        media_metrics.worker_connections.with_label_values(&[label.as_str()]).set(0);
        let shared = if cfg.media.mux {
            let port = cfg.media.port_min + index as u16;
            let addr = SocketAddr::new(cfg.media.bind_ip, port);
            let (socket, send, recv) = crate::udp::bind_shared(addr)
                .with_context(|| format!("media.mux: cannot bind the shared media port {addr}"))?;
            tracing::info!(worker = index, %addr, send_buffer = send, recv_buffer = recv, "shared media socket");
            Some(socket)
        } else {
            None
        };
        let (h, j) = worker::spawn(WorkerSetup {
            index,
            core: cfg.core(),
            bind_ip: cfg.media.bind_ip,
            candidate_ip: cfg.candidate_ip(),
            ports: Arc::clone(&ports),
            sink: Arc::clone(&registry) as Arc<dyn EventSink>,
            directory: Arc::clone(&directory),
            metrics: media_metrics.clone(),
            shared,
            ufrags: ice_tcp.as_ref().map(|(_, u)| Arc::clone(u)),
            spread: spread_links.get_mut(index).and_then(Option::take),
        })
        .context("starting a media worker")?;
        handles.push(h);
        joins.push(j);
    }
    let ice_tcp = match ice_tcp {
        Some((listener, ufrags)) => Some(
            crate::tcp::spawn_listener(listener, ufrags, handles.clone(), media_metrics.clone())
                .context("starting the ICE-TCP listener")?,
        ),
        None => None,
    };
    let media = Arc::new(GatewayMedia::new(handles, directory, cfg.media.spread));
    let state = AppState::new(cfg.api(), Arc::clone(&registry), Arc::clone(&media) as Arc<dyn MediaPlane>);
    let mut app = signaling_api::router(state.clone()).merge(crate::web::routes());
    if let Some(c) = &cluster {
        app = app.layer(axum::middleware::from_fn_with_state(Arc::clone(c), crate::cluster::route::route));
    }
    let cluster = cluster.map(|c| {
        let heartbeat = c.start(state.clone());
        tracing::info!(node = %c.node_id, url = %c.url, placement = ?c.placement, "cluster: on");
        (c, heartbeat)
    });
    signaling_api::spawn_janitor(state.clone());
    {
        let ports = Arc::clone(&ports);
        let m = media_metrics.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let free = ports.free();
                m.ports_free.set(free as i64);
                m.ports_in_use.set((ports.total() - free) as i64);
            }
        });
    }

    // An unusable media address fails the start now, not the first call.
    std::net::UdpSocket::bind((cfg.media.bind_ip, 0))
        .with_context(|| format!("media.bind_ip: cannot bind UDP on {}", cfg.media.bind_ip))?;
    let listener = match early_listener {
        Some(l) => l,
        None => std::net::TcpListener::bind(cfg.http.bind)
            .with_context(|| format!("http.bind: cannot listen on {}", cfg.http.bind))?,
    };
    listener.set_nonblocking(true)?;
    let http_addr = listener.local_addr()?;
    let handle = axum_server::Handle::new();
    let service = app.into_make_service();
    let tls = cfg.http.tls != TlsMode::Off;
    // Every accepted connection goes without Nagle's algorithm: signaling messages are small
    // and often come in pairs (an event, then the offer or the candidate it announces), and the
    // second waited for the client's delayed ACK of the first, 40 ms on Linux, on every step of
    // a join. Its first bytes (after the TLS handshake, which has its own 10 s) must arrive
    // within the header timeout, as its headers must: see `http_deadline`.
    let header_timeout =
        (cfg.http.header_read_timeout_ms > 0).then(|| Duration::from_millis(cfg.http.header_read_timeout_ms));
    let server = if tls {
        let rustls = tls_config(&cfg).await?;
        let mut srv = axum_server::from_tcp_rustls(listener, rustls)?
            .map(|tls| FirstBytesDeadline::new(tls.acceptor(NoDelayAcceptor::new()), header_timeout))
            .handle(handle.clone());
        header_read_timeout(srv.http_builder(), header_timeout);
        tokio::spawn(async move {
            if let Err(e) = srv.serve(service).await {
                tracing::error!(error = %e, "HTTPS server stopped");
            }
        })
    } else {
        let mut srv = axum_server::from_tcp(listener)?
            .acceptor(FirstBytesDeadline::new(NoDelayAcceptor::new(), header_timeout))
            .handle(handle.clone());
        header_read_timeout(srv.http_builder(), header_timeout);
        tokio::spawn(async move {
            if let Err(e) = srv.serve(service).await {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        })
    };
    let webhook_flush = Duration::from_millis(cfg.webhook.shutdown_flush_ms);
    Ok(Running {
        http_addr,
        tls,
        state,
        ports,
        media,
        cluster,
        webhook_flush,
        server,
        server_handle: handle,
        workers: joins,
        ice_tcp,
    })
}

/// Close HTTP/1 connections whose request headers have not all arrived `timeout` after the
/// server began waiting for them (`http.header_read_timeout_ms`; `None`: never). hyper has the
/// deadline but enforces it only with a timer, which axum-server does not give it: without this
/// a connection that sends nothing (or trickles its headers) was kept open forever, one
/// descriptor each.
fn header_read_timeout(
    builder: &mut hyper_util::server::conn::auto::Builder<TokioExecutor>,
    timeout: Option<Duration>,
) {
    builder.http1().timer(TokioTimer::new()).header_read_timeout(timeout);
}

/// TLS from files, or a self-signed certificate made now with rcgen for the bind address,
/// localhost and the announced addresses (a secure context for getUserMedia on a LAN).
async fn tls_config(cfg: &GatewayConfig) -> anyhow::Result<axum_server::tls_rustls::RustlsConfig> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match cfg.http.tls {
        TlsMode::Files => {
            let (cert, key) = (cfg.http.cert.as_deref().unwrap_or(""), cfg.http.key.as_deref().unwrap_or(""));
            axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                .await
                .with_context(|| format!("http.cert/http.key: cannot load {cert} / {key}"))
        }
        _ => {
            let mut names = vec!["localhost".to_owned(), cfg.http.bind.ip().to_string()];
            names.extend(cfg.media.announced_ips.iter().map(|ip| ip.to_string()));
            let ck = rcgen::generate_simple_self_signed(names).context("generating the self-signed certificate")?;
            let cert = ck.cert.pem().into_bytes();
            let key = ck.signing_key.serialize_pem().into_bytes();
            axum_server::tls_rustls::RustlsConfig::from_pem(cert, key)
                .await
                .context("loading the self-signed certificate")
        }
    }
}
