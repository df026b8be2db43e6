//! `gateway [--config FILE]`: starts the SFU with working defaults (HTTP on 127.0.0.1:8080,
//! media on 127.0.0.1, the web client at `/`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use gateway::config::GatewayConfig;

#[derive(Parser)]
#[command(version, about = "SFU media gateway: multi-party WebRTC rooms")]
struct Args {
    /// TOML configuration file; every key can be overridden by GATEWAY__SECTION__KEY.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Load and validate the configuration (file + environment), print it, and exit.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Operate a running gateway over its REST API (rooms, tokens, participants, connections,
    /// drain).
    Admin(gateway::admin::AdminArgs),
    /// Print the REST API's OpenAPI 3.1 document (the one `GET /v1/openapi.json` serves) and
    /// exit.
    Openapi,
}

/// `gateway admin …`: one REST command, printed; exit status 1 on a refusal.
fn admin(args: &gateway::admin::AdminArgs) -> std::process::ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gateway admin: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(gateway::admin::run(args)) {
        Ok(out) => {
            print!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gateway admin: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing(cfg: &GatewayConfig) {
    // RUST_LOG, when set, overrides log.level (the usual way to turn up one module for a while).
    let spec = cfg.log_filter(std::env::var("RUST_LOG").ok());
    let filter = tracing_subscriber::EnvFilter::try_new(&spec).unwrap_or_else(|_| "info".into());
    let b = tracing_subscriber::fmt().with_env_filter(filter);
    if cfg.log.format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

async fn terminated() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// Raise the open-file limit (see `gateway::limits`) and say what the gateway has.
fn open_files(cfg: &GatewayConfig) {
    match gateway::limits::raise_open_files() {
        Ok(l) => {
            if l.now != l.before {
                tracing::info!(limit = l.now, was = l.before, "open-file limit raised to the hard limit");
            }
            if let Some(need) = gateway::limits::needed_open_files(cfg) {
                if l.now < need {
                    tracing::warn!(
                        limit = l.now,
                        hard = l.hard,
                        need,
                        "the open-file limit is below what the media port range can use: connections past it are refused \
                         (no_ports); raise it (ulimit -n, systemd LimitNOFILE) or narrow media.port_min..port_max"
                    );
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match &args.command {
        Some(Command::Admin(a)) => return admin(a),
        Some(Command::Openapi) => {
            print!("{}", signaling_api::openapi::openapi_json_text());
            return std::process::ExitCode::SUCCESS;
        }
        None => {}
    }
    let cfg = match GatewayConfig::load(args.config.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gateway: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if args.check_config {
        let mut shown = cfg.clone();
        shown.auth.api_key = "<redacted>".into();
        shown.auth.token_secret = "<redacted>".into();
        shown.auth.token_secrets = match shown.auth.token_secrets {
            gateway::config::TokenSecrets::List(l) => {
                gateway::config::TokenSecrets::List(l.iter().map(|_| "<redacted>".into()).collect())
            }
            gateway::config::TokenSecrets::Map(m) => {
                gateway::config::TokenSecrets::Map(m.into_keys().map(|k| (k, "<redacted>".into())).collect())
            }
        };
        if !shown.webhook.secret.is_empty() {
            shown.webhook.secret = "<redacted>".into();
        }
        println!("{}", toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}")));
        return std::process::ExitCode::SUCCESS;
    }
    init_tracing(&cfg);
    open_files(&cfg);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gateway: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let running = match gateway::server::start(cfg.clone()).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("gateway: {e:#}");
                return std::process::ExitCode::from(2);
            }
        };
        let url = running.base_url();
        tracing::info!(
            http = %url,
            media = %format!("{}:{}-{}", cfg.candidate_ip(), cfg.media.port_min, cfg.media.port_max),
            workers = cfg.worker_count(),
            dev_token_route = cfg.dev_token_route(),
            "gateway started; open {url}/ in a browser"
        );
        terminated().await;
        if cfg.clustered() {
            // A second signal stops the wait.
            tokio::select! {
                _ = running.drain_cluster(Duration::from_millis(cfg.cluster.drain_wait_ms)) => {}
                _ = terminated() => {}
            }
        }
        tracing::info!("shutting down: ending every connection");
        running.shutdown(Duration::from_millis(cfg.shutdown.drain_timeout_ms)).await;
        tracing::info!("stopped");
        std::process::ExitCode::SUCCESS
    })
}
