//! The OpenAPI contract against the real binary: a live gateway serves, at `GET /v1/openapi.json`
//! and without auth, the document checked in as docs/openapi.json, and schemathesis (PyPI; in the
//! venv scripts/test.sh makes) runs a bounded number of generated requests per operation against
//! it: no 5xx, every status, content type, header and body as documented, schema-invalid input
//! refused, deleted rooms gone, the API key enforced (gateway/tests/schemathesis.toml says which
//! checks and why).
//!
//! Ports: HTTP 24000, media 24010-24029 (below the kernel's ephemeral range, 32768-60999, so no
//! client socket elsewhere on the machine can hold them).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const HTTP_PORT: u16 = 24000;
const MEDIA_PORTS: (u16, u16) = (24010, 24029);
/// Generated requests per operation and phase (bounded: the whole run takes well under 90 s);
/// SCHEMATHESIS_EXAMPLES overrides it for a longer exploration.
const EXAMPLES: &str = "100";
/// Fixed, so a failure reproduces; SCHEMATHESIS_SEED overrides it to explore further.
const SEED: &str = "20261205";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// schemathesis: $SCHEMATHESIS, or the venv scripts/test.sh makes.
fn schemathesis() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("SCHEMATHESIS").map(PathBuf::from),
        Some(repo().join("target/schemathesis-venv/bin/schemathesis")),
    ];
    let found = candidates.into_iter().flatten().find(|p| {
        Command::new(p).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").is_err(),
            "CI needs schemathesis (scripts/test.sh installs it into target/schemathesis-venv)"
        );
        eprintln!("SKIPPED: no schemathesis; scripts/test.sh installs it (or set SCHEMATHESIS)");
    }
    found
}

struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_gateway(log: &Path) -> Gateway {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .env_remove("RUST_LOG")
        .env("GATEWAY__HTTP__BIND", format!("127.0.0.1:{HTTP_PORT}"))
        .env("GATEWAY__MEDIA__PORT_MIN", MEDIA_PORTS.0.to_string())
        .env("GATEWAY__MEDIA__PORT_MAX", MEDIA_PORTS.1.to_string())
        .env("GATEWAY__MEDIA__WORKERS", "1")
        // One UDP port for every session: the WHIP/WHEP examples open many in a row.
        .env("GATEWAY__MEDIA__MUX", "true")
        .env("GATEWAY__AUTH__API_KEY", API_KEY)
        .env("GATEWAY__LOG__LEVEL", "warn")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Gateway(child)
}

/// `gateway openapi` prints the checked-in document (for client generators, without a server).
#[test]
fn the_openapi_subcommand_prints_the_checked_in_document() {
    let out = Command::new(env!("CARGO_BIN_EXE_gateway")).arg("openapi").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let checked_in = std::fs::read_to_string(repo().join("docs/openapi.json")).unwrap();
    assert!(
        out.stdout == checked_in.as_bytes(),
        "`gateway openapi` prints another document than docs/openapi.json; regenerate it with: \
         UPDATE_OPENAPI=1 cargo test -p signaling-api --test api openapi_document"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_gateway_serves_the_checked_in_document_and_conforms_to_it() {
    let out = repo().join("test-output/openapi");
    std::fs::create_dir_all(&out).unwrap();
    let gateway_log = out.join("gateway.log");
    let mut gateway = start_gateway(&gateway_log);
    let base = format!("http://127.0.0.1:{HTTP_PORT}");
    let url = format!("{base}/v1/openapi.json");
    let served = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // A gateway that exited (a port taken, a config refused) fails at once, with its log.
            if let Some(status) = gateway.0.try_wait().unwrap() {
                panic!(
                    "the gateway exited ({status}) before serving its OpenAPI document; its log:\n{}",
                    std::fs::read_to_string(&gateway_log).unwrap_or_default()
                );
            }
            let seen = match reqwest::get(&url).await {
                Ok(r) if r.status() == 200 => {
                    let ctype = r.headers().get("content-type").map(|v| v.to_str().unwrap_or("").to_owned());
                    break (ctype, r.text().await.unwrap());
                }
                other => format!("{other:?}"),
            };
            assert!(
                Instant::now() < deadline,
                "timed out waiting for the gateway to serve its OpenAPI document: {seen}; its log:\n{}",
                std::fs::read_to_string(&gateway_log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert_eq!(served.0.as_deref(), Some("application/json"));
    let checked_in = std::fs::read_to_string(repo().join("docs/openapi.json")).unwrap();
    assert!(
        served.1 == checked_in,
        "the gateway serves another document than docs/openapi.json; regenerate it with: \
         UPDATE_OPENAPI=1 cargo test -p signaling-api --test api openapi_document"
    );

    let doc: serde_json::Value = serde_json::from_str(&checked_in).unwrap();
    let Some(st) = schemathesis() else { return };
    // The room and join token of the WHIP/WHEP operations (schemathesis.toml).
    let api = Api::new(base.clone());
    let room = api.create_room("schemathesis-stage").await;
    let join_token = api.token(&room, "st-publisher").await;
    // A participant with a live connection for the participant and connection routes: a WHIP
    // session opened with the document's example offer.
    let offer = doc["paths"]["/v1/whip/{room}"]["post"]["requestBody"]["content"]["application/sdp"]["example"]
        .as_str()
        .expect("the WHIP operation documents an example offer")
        .to_owned();
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/whip/schemathesis-stage"))
        .bearer_auth(&join_token)
        .header("content-type", "application/sdp")
        .body(offer)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "the example offer is taken");
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let connection_id = location.rsplit('/').next().unwrap().to_owned();
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let seed = std::env::var("SCHEMATHESIS_SEED").unwrap_or_else(|_| SEED.to_owned());
    let examples = std::env::var("SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| EXAMPLES.to_owned());
    let log_path = out.join("schemathesis.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let started = Instant::now();
    let mut run = Command::new(st)
        .current_dir(&out)
        .env("SCHEMATHESIS_HOOKS", here.join("schemathesis_hooks.py"))
        .env("ST_JOIN_TOKEN", &join_token)
        .env("ST_ROOM_ID", &room)
        .env("ST_CONNECTION_ID", &connection_id)
        .env("NO_COLOR", "1")
        .arg("--config-file")
        .arg(here.join("schemathesis.toml"))
        .args(["run", &url, "--checks", "all", "--exclude-checks", "positive_data_acceptance"])
        .args(["--max-examples", &examples, "--seed", &seed, "--workers", "2"])
        .args(["--header", &format!("Authorization: Bearer {API_KEY}")])
        .args(["--request-timeout", "30", "--no-color"])
        .arg("--report-junit-path")
        .arg(out.join("schemathesis-junit.xml"))
        .args(["--report", "junit"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(status) = run.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(if examples == EXAMPLES { 150 } else { 1800 }) {
            let _ = run.kill();
            let _ = run.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let took = started.elapsed();
    let report = std::fs::read_to_string(&log_path).unwrap_or_default();
    let tail: Vec<&str> = report.lines().rev().take(150).collect::<Vec<_>>().into_iter().rev().collect();
    eprintln!("schemathesis took {:.1} s (log: {})", took.as_secs_f64(), log_path.display());
    let Some(status) = status else {
        panic!("schemathesis ran out of time:\n{}", tail.join("\n"));
    };
    assert!(status.success(), "schemathesis found non-conforming responses ({status}):\n{}", tail.join("\n"));
    // Bounded and not trivially empty: every selected operation was tested.
    let summary = report.lines().find(|l| l.trim_start().starts_with("Tested:")).unwrap_or("");
    eprintln!("schemathesis: {} | {}", summary.trim(), report.lines().last().unwrap_or("").trim());
    let operations: usize = doc["paths"].as_object().unwrap().values().map(|p| p.as_object().unwrap().len()).sum();
    // All but the two the config leaves out (drain, websocket) and the document's own route,
    // which schemathesis skips when it loads the document from it.
    let expected = format!("Tested: {}", operations - 3);
    assert!(report.contains(&expected), "schemathesis did not test every selected operation:\n{}", tail.join("\n"));
    // The documented example offer opened a real WHIP session (the media plane took it).
    let whip_created =
        api.metric(r#"gateway_http_requests_total{method="POST",route="/v1/whip/{room}",status="201"}"#).await;
    let metrics = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
    let whip_lines: Vec<&str> =
        metrics.lines().filter(|l| l.starts_with("gateway_http_requests_total{") && l.contains("/v1/wh")).collect();
    assert!(whip_created >= 1.0, "the WHIP example offer opened no session:\n{}", whip_lines.join("\n"));
    let served_5xx: f64 = {
        metrics
            .lines()
            .filter(|l| l.starts_with("gateway_http_requests_total{") && l.contains("status=\"5"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(served_5xx, 0.0, "the gateway answered 5xx (its /metrics says so)");
    eprintln!("schemathesis: {whip_created} WHIP sessions opened from the documented example");
    // What the gateway answered, per route, method and status (also in test-output/openapi/).
    let answered: Vec<String> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("gateway_http_requests_total{"))
        .filter_map(|l| l.split_once("} "))
        .map(|(labels, n)| format!("{} {n}", labels.replace("\",", " ").replace('"', "")))
        .collect();
    std::fs::write(out.join("statuses.txt"), answered.join("\n") + "\n").unwrap();
    let gateway_out = std::fs::read_to_string(&gateway_log).unwrap_or_default();
    assert!(!gateway_out.contains("panicked"), "the gateway panicked:\n{gateway_out}");
}
