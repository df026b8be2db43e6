//! The binary's lifecycle: start-up fails fast and names the offending key; SIGTERM ends every
//! connection FINISHED (reason `shutdown`, the client is told and its socket closed with 1001)
//! and the process exits within the drain time.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn gateway() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gateway"));
    c.env("GATEWAY__LOG__LEVEL", "warn").stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

#[test]
fn bad_configuration_fails_fast_naming_the_key() {
    // 192.0.2.1 (TEST-NET-1) is not an address of this machine: binding fails, nothing is sent.
    let cases: [(&str, &str, &str); 4] = [
        ("GATEWAY__MEDIA__PORTMIN", "41000", "portmin"),
        ("GATEWAY__MEDIA__PORT_MIN", "45000", "media.port_min"),
        ("GATEWAY__HTTP__BIND", "192.0.2.1:8080", "http.bind"),
        ("GATEWAY__MEDIA__BIND_IP", "192.0.2.1", "media.bind_ip"),
    ];
    for (key, value, named) in cases {
        let t0 = Instant::now();
        let out = gateway()
            .env(key, value)
            .env("GATEWAY__MEDIA__PORT_MAX", "44999")
            .env("GATEWAY__HTTP__BIND", if key == "GATEWAY__HTTP__BIND" { value } else { "127.0.0.1:0" })
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{key}={value}: {err}");
        assert!(err.contains(named), "{key}={value}: the error names {named}: {err}");
        assert!(t0.elapsed() < Duration::from_secs(5), "fails fast");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_every_connection_and_exits() {
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut child = gateway()
        .env("GATEWAY__HTTP__BIND", http.to_string())
        .env("GATEWAY__MEDIA__PORT_MIN", "44400")
        .env("GATEWAY__MEDIA__PORT_MAX", "44409")
        .env("GATEWAY__AUTH__API_KEY", API_KEY)
        .env("GATEWAY__SHUTDOWN__DRAIN_TIMEOUT_MS", "3000")
        .env("GATEWAY__LOG__FORMAT", "json")
        .env("GATEWAY__LOG__LEVEL", "info,str0m=warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain the log pipe so the gateway never blocks on it.
    let mut stdout = child.stdout.take().unwrap();
    let logs = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).unwrap();
        s
    });
    let api = Api::new(format!("http://{http}"));
    let health = format!("{}/healthz", api.base);
    let health = &health;
    poll_until("the gateway to start", 10, || async move {
        reqwest::get(health).await.map(|_| ()).map_err(|e| e.to_string())
    })
    .await;
    let room = api.create_room("lifecycle").await;
    let (publisher, subs) = call(&api, &room, &["viewer"]).await;

    let t0 = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    for p in [&publisher, &subs[0]] {
        p.wait("FINISHED shutdown and close 1001", 5, |l| {
            l.events("FINISHED").iter().any(|e| e["reason"] == "shutdown") && l.ws_closed == Some(1001)
        })
        .await;
    }
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "exits within the drain time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "clean exit: {status:?}");
    println!("SIGTERM to exit: {:?}", t0.elapsed());

    // One connection's life, by grepping its id in the JSON log.
    let logs = logs.join().unwrap();
    let id = publisher.connection_id("publish").unwrap();
    let life: Vec<serde_json::Value> =
        logs.lines().filter(|l| l.contains(&id)).map(|l| serde_json::from_str(l).expect("JSON lines")).collect();
    let said = |msg: &str, field: &str, value: &str| {
        life.iter().any(|l| l["fields"]["message"] == msg && (field.is_empty() || l["fields"][field] == value))
    };
    for state in ["INITIAL", "GATHERED", "READY", "FINISHED"] {
        assert!(said("connection state", "state", state), "{state} logged for {id}:\n{life:#?}");
    }
    assert!(said("connection state", "reason", "shutdown"), "close reason logged");
    assert!(said("ICE and DTLS done", "", ""), "DTLS completion logged");
    assert!(life.iter().all(|l| l["span"]["room"] == room.as_str() && l["span"]["role"] == "publish"));
    assert!(!logs.contains(&publisher.local.to_string()), "client addresses stay out of info logs");
}
