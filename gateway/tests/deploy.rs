//! The operator files in deploy/ are checked against the real thing: the example config loads,
//! Prometheus's own tools accept its config, systemd accepts the unit, every Grafana query names a
//! metric a live gateway exports, and a real Prometheus server scraping a gateway during a call
//! sees the packet counters rise and the connection gauge match.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// CI installs these tools (scripts/test.sh); a developer machine without them says so.
fn require(tool: &str) -> bool {
    if have(tool) {
        return true;
    }
    assert!(std::env::var("CI").is_err(), "{tool} must be installed in CI (scripts/test.sh installs it)");
    eprintln!("SKIPPED: {tool} is not installed here; scripts/test.sh installs it");
    false
}

#[test]
fn example_config_loads_and_validates() {
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--config", repo().join("deploy/gateway.toml").to_str().unwrap(), "--check-config"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("token_route = \"off\""), "production example keeps the dev route off");
    assert!(!shown.contains("CHANGE-ME"), "secrets are redacted when printed");

    // A broken key is refused with its name.
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--config", repo().join("deploy/gateway.toml").to_str().unwrap(), "--check-config"])
        .env("GATEWAY__MEDIA__PORT_MIN", "50000")
        .env("GATEWAY__MEDIA__PORT_MAX", "40000")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("media.port_min"));
}

#[test]
fn promtool_accepts_the_prometheus_config() {
    if !require("promtool") {
        return;
    }
    let out =
        Command::new("promtool").args(["check", "config"]).arg(repo().join("deploy/prometheus.yml")).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn systemd_accepts_the_unit() {
    if !require("systemd-analyze") {
        return;
    }
    // verify wants ExecStart to exist: check a copy that points at the binary just built.
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/gateway.service")).unwrap();
    let unit = unit.replace("/usr/local/bin/gateway", env!("CARGO_BIN_EXE_gateway"));
    let dir = std::env::temp_dir().join(format!("gw-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("gateway.service:"), "no warnings about the unit: {text}");
}

/// Metric names a PromQL expression refers to.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut cur = String::new();
    for ch in expr.chars().chain(std::iter::once(' ')) {
        if ch.is_ascii_alphanumeric() || ch == '_' {
            cur.push(ch);
        } else {
            if cur.starts_with("gateway_") || cur.starts_with("process_") {
                names.push(std::mem::take(&mut cur));
            }
            cur.clear();
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_names_an_exported_metric() {
    let gw = start_gateway(44300, 44309).await;
    let api = Api::new(gw.base_url());
    api.create_room("dash").await; // one REST request so the request counter has a series
    let text = reqwest::get(format!("{}/metrics", api.base)).await.unwrap().text().await.unwrap();
    let exported: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect();
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("deploy/grafana/dashboards/gateway.json")).unwrap())
            .expect("dashboard is valid JSON");
    let mut checked = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let names = metric_names(expr);
            assert!(!names.is_empty(), "panel {} queries no gateway metric: {expr}", panel["title"]);
            for n in names {
                assert!(exported.contains(&n), "panel {} uses {n}, which the gateway does not export", panel["title"]);
                checked += 1;
            }
        }
    }
    assert!(checked >= 12, "checked {checked} references");
    // The documented metrics are the exported ones.
    let doc = std::fs::read_to_string(repo().join("docs/metrics.md")).unwrap();
    for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).map(|l| l.split(' ').next().unwrap()) {
        assert!(
            doc.contains(&format!("`{family}`")) || family.starts_with("process_"),
            "{family} is not in docs/metrics.md"
        );
    }
    gw.shutdown(Duration::from_secs(1)).await;
}

/// Query Prometheus's HTTP API for one scalar (the sum of the vector).
async fn prom_query(base: &str, q: &str) -> Option<f64> {
    let v: Value = reqwest::Client::new()
        .get(format!("{base}/api/v1/query"))
        .query(&[("query", q)])
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    let result = v["data"]["result"].as_array()?;
    Some(result.iter().filter_map(|r| r["value"][1].as_str()?.parse::<f64>().ok()).sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_sees_the_call() {
    if !require("prometheus") {
        return;
    }
    let gw = start_gateway(44310, 44319).await;
    let api = Api::new(gw.base_url());
    let dir = std::env::temp_dir().join(format!("gw-prom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: gateway\n    static_configs:\n      - targets: [\"{}\"]\n",
            gw.http_addr
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut prom = Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus starts");
    let base = format!("http://127.0.0.1:{port}");

    let room = api.create_room("prom").await;
    let (publisher, subs) = call(&api, &room, &["viewer"]).await;
    publisher.send_media(300);
    let base = &base;
    let wait = |what: &'static str, q: &'static str, ok: fn(f64) -> bool| {
        poll_until(what, 30, move || async move {
            match prom_query(base, q).await {
                Some(v) if ok(v) => Ok(v),
                v => Err(format!("Prometheus says {q} = {v:?}")),
            }
        })
    };
    let out =
        wait("forwarded packets", r#"gateway_rtp_packets_total{direction="out",kind="video"}"#, |v| v >= 100.0).await;
    let ready = wait("two READY connections", r#"gateway_connections{state="READY"}"#, |v| v == 2.0).await;
    println!("Prometheus saw {out} forwarded video packets and {ready} READY connections");
    assert!(
        wait("the packet counter rise", r#"gateway_rtp_packets_total{direction="out",kind="video"}"#, |v| v >= 250.0)
            .await
            >= 250.0
    );
    publisher.leave();
    subs[0].leave();
    wait("no READY connections after leaving", r#"gateway_connections{state="READY"}"#, |v| v == 0.0).await;
    wait("FINISHED transitions", r#"gateway_connection_transitions_total{from="READY",to="FINISHED"}"#, |v| v == 2.0)
        .await;
    let _ = prom.kill();
    let _ = prom.wait();
    let _ = std::fs::remove_dir_all(&dir);
    gw.shutdown(Duration::from_secs(1)).await;
}
