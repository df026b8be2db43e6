//! The open-file limit, on the real binary started the way a shell starts it: the gateway
//! raises its soft limit to the hard one, warns when its configuration could use more than it
//! has, and when it does run out of file descriptors it refuses new connections in words
//! (`no_ports`, 503, naming file descriptors) and takes them again once some end. Media ports
//! 44170-44199.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use test_peer::PeerConfig;

const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway");

/// The gateway binary under `sh` with `ulimit -S -n soft` and `ulimit -H -n hard`, logging to
/// `log`; returns it once `/healthz` answers.
async fn spawn(http_port: u16, soft: u64, hard: u64, log: &Path) -> Spawned {
    let file = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new("sh");
    // Only this test's settings: RUST_LOG would override the log level the checks read, and a
    // GATEWAY__ variable of the caller's would change the gateway.
    cmd.env_remove("RUST_LOG");
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("GATEWAY__")) {
        cmd.env_remove(k);
    }
    let child = Spawned(
        cmd.arg("-c")
            .arg(format!("ulimit -S -n {soft} && ulimit -H -n {hard} && exec \"$0\""))
            .arg(GATEWAY)
            .env("GATEWAY__HTTP__BIND", format!("127.0.0.1:{http_port}"))
            .env("GATEWAY__MEDIA__PORT_MIN", "44170")
            .env("GATEWAY__MEDIA__PORT_MAX", "44199")
            .env("GATEWAY__MEDIA__WORKERS", "1")
            // Sessions that never connect keep their socket for the whole test.
            .env("GATEWAY__MEDIA__CONNECT_TIMEOUT_MS", "60000")
            .env("GATEWAY__AUTH__API_KEY", API_KEY)
            .env("GATEWAY__LOG__LEVEL", "info")
            .env("GATEWAY__LOG__FORMAT", "json")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{http_port}/healthz")).await {
            if r.status().is_success() {
                return child;
            }
        }
        assert!(
            Instant::now() < deadline,
            "gateway did not start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The spawned gateway; stopped (SIGTERM, then SIGKILL) when dropped, also when a test fails.
struct Spawned(Child);

impl Spawned {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.0.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The soft and hard "Max open files" of a process, from `/proc/<pid>/limits`.
fn open_file_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let v: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    (v[0], v[1])
}

/// The gateway's log lines (JSON) whose message contains `needle`.
fn logged(log: &Path, needle: &str) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"].as_str().is_some_and(|m| m.contains(needle)))
        .collect()
}

fn test_output(name: &str) -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../test-output");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
    // A hard limit this test may set without privileges: at most the current one.
    let current = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let hard = current.maximum.unwrap_or(1 << 20).min(8192);
    assert!(hard > 256, "this machine's hard open-file limit ({hard}) leaves nothing to raise");
    let log = test_output("limits-raise.log");
    let port = 44168;
    let child = spawn(port, 256, hard, &log).await;
    let (soft_now, hard_now) = open_file_limits(child.id());
    let raised = logged(&log, "open-file limit raised");
    drop(child);
    assert_eq!((soft_now, hard_now), (hard, hard), "the soft limit is raised to the hard one");
    assert_eq!(raised.len(), 1, "the raise is logged once");
    assert_eq!(raised[0]["fields"]["was"], 256);
    assert_eq!(raised[0]["fields"]["limit"], hard);
    // 30 ports need ~124 descriptors: 8192 is plenty, so no warning.
    assert!(logged(&log, "open-file limit is below").is_empty());
}

/// A WHIP publish offer from a fresh str0m peer (never driven: the session stays waiting for
/// ICE, holding its socket).
fn whip_offer() -> String {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut peer = test_peer::Peer::new(Instant::now(), socket.local_addr().unwrap(), &PeerConfig::default()).unwrap();
    peer.publish_offer(true, Some(&[][..])).unwrap()
}

/// POST a WHIP offer on a connection of its own (closed after the reply, as most WHIP
/// clients do): the status, the `Location` and the body.
async fn whip(base: &str, room: &str, token: &str) -> (u16, Option<String>, String) {
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let r = client
        .post(format!("{base}/v1/whip/{room}"))
        .bearer_auth(token)
        .header("content-type", "application/sdp")
        .body(whip_offer())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let location = r.headers().get("location").map(|l| l.to_str().unwrap().to_owned());
    (status, location, r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_refuses_in_words_and_recovers() {
    let log = test_output("limits-exhausted.log");
    let port = 44167;
    // Room for the gateway's own ~14 descriptors and ~18 sessions (here; the count depends on the
    // machine): far fewer than the 30 ports of its range.
    let child = spawn(port, 32, 32, &log).await;
    let base = format!("http://127.0.0.1:{port}");
    let api = Api::new(base.clone());
    let room = api.create_room_of("limits", 40).await;

    let mut open = Vec::new();
    let mut refusal = None;
    for i in 0..30 {
        let token = api.token(&room, &format!("whip-{i}")).await;
        let (status, location, body) = whip(&base, &room, &token).await;
        match status {
            201 => open.push((location.expect("a session has a Location"), token)),
            503 => {
                refusal = Some(body);
                break;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let refusal = refusal.expect("the gateway ran out of descriptors before its 30 ports");
    println!("{} WHIP sessions opened, then: {refusal}", open.len());
    let error: Value = serde_json::from_str(&refusal).unwrap();
    assert_eq!(error["error"]["code"], "no_ports", "{error}");
    assert!(error["error"]["message"].as_str().unwrap().contains("file descriptor"), "the refusal says why: {error}");
    assert!(!open.is_empty() && open.len() < 30, "some sessions opened, fewer than the ports: {}", open.len());

    // Sessions end: the next one opens again, and the gateway still answers.
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    for (location, token) in open.drain(..3) {
        let r = client.delete(format!("{base}{location}")).bearer_auth(&token).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "DELETE {location}");
    }
    let token = api.token(&room, "whip-after").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _, body) = whip(&base, &room, &token).await;
        if status == 201 {
            break;
        }
        assert!(Instant::now() < deadline, "no session opens after three ended: {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reqwest::get(format!("{base}/healthz")).await.unwrap().status().is_success());

    let pid = child.id();
    let (soft, _) = open_file_limits(pid);
    drop(child);
    assert_eq!(soft, 32, "nothing to raise when the hard limit is the soft one");
    let warned = logged(&log, "open-file limit is below");
    assert_eq!(warned.len(), 1, "the start says the limit is below what 30 ports can use");
    assert_eq!(warned[0]["fields"]["need"], 2 * 30 + 64);
    let refused = logged(&log, "refusing a connection: the gateway has no file descriptor left");
    assert_eq!(refused.len(), 1, "one warning for the refusals (at most one per 10 s)");
}
