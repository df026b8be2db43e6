//! A short load test against a real gateway started in-process: 1 room, 1 publisher (VP8 +
//! Opus from the committed clips), 3 subscribers, ~5 s. What CI checks of the load tester:
//! everyone gets READY, media arrives intact (every payload matches one a publisher sent, the
//! keyframes are there), loss is small, and every output (table, JSON, PNG and SVG plots) is made;
//! and a subscription the gateway refuses is reported with its reason.

use std::time::Duration;

use gateway::config::GatewayConfig;
use loadtest::{run, Config};

const API_KEY: &str = "smoke-api-key";

/// A gateway in this process with one media worker on UDP ports `port_min..=port_max`.
async fn start_gateway(port_min: u16, port_max: u16) -> gateway::server::Running {
    let mut gw_cfg = GatewayConfig::default();
    gw_cfg.http.bind = "127.0.0.1:0".parse().unwrap();
    gw_cfg.media.port_min = port_min;
    gw_cfg.media.port_max = port_max;
    gw_cfg.media.workers = 1;
    gw_cfg.auth.api_key = API_KEY.into();
    gw_cfg.auth.token_secret = "loadtest-smoke-secret-0123456789".into();
    gw_cfg.validate().unwrap();
    gateway::server::start(gw_cfg).await.expect("gateway starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_publisher_three_subscribers() {
    let gw = start_gateway(45000, 45049).await;

    let cfg = Config {
        url: gw.base_url(),
        api_key: API_KEY.into(),
        rooms: 1,
        publishers: 1,
        subscribers: 3,
        duration: Duration::from_secs(5),
        video_bitrate: 500_000,
        join_rate: 20.0,
        progress: false,
        ..Config::default()
    };
    let report = run(cfg).await.expect("the run completes");
    println!("{}", report.table());

    let p = &report.participants;
    assert_eq!((p.publish_ready, p.subscribe_ready), (1, 3), "every connection READY: {:?}", p.failures);
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    assert!(p.dropped_after_ready.is_empty(), "no connection lost after READY: {:?}", p.dropped_after_ready);
    assert_eq!(report.join_ms.subscribe.count, 3);
    assert!(report.join_ms.subscribe.p50 > 0.0);

    let m = &report.media;
    assert_eq!(m.received_streams, 6, "3 subscribers x (audio + video)");
    assert!(m.received_packets > 500, "media flowed: {m:?}");
    assert_eq!(m.unmatched_payloads, 0, "every payload arrived byte-exact");
    assert!(m.loss_pct < 5.0, "loss {:.2}%", m.loss_pct);
    assert!(m.keyframes_received >= 3, "each subscriber saw a keyframe start");
    assert_eq!(report.first_keyframe_ms.count, 3);
    assert!(report.latency_ms.count as u64 == m.received_packets, "every packet has a latency sample");
    assert!(report.latency_ms.p50 < 100.0, "{:?}", report.latency_ms);
    for s in &report.streams {
        assert_eq!(s.subscribers, 3, "{} {}", s.publisher, s.kind);
        assert!(s.sent_packets > 0 && s.received_packets > 0);
    }
    assert!(report.series.len() >= 4, "one sample per second");
    assert!(report.gateway.forwarded_packets.unwrap_or(0) > 0, "gateway counters scraped from /metrics");

    let dir = std::env::temp_dir().join(format!("loadtest-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    report.write_json(&dir.join("r.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("r.json")).unwrap()).unwrap();
    assert_eq!(v["media"]["unmatched_payloads"], 0);
    assert!(v["config"].get("api_key").is_none(), "the API key stays out of the JSON");
    report.plot(&dir.join("r.svg")).unwrap();
    report.plot(&dir.join("r.png")).unwrap();
    assert!(std::fs::metadata(dir.join("r.png")).unwrap().len() > 1000);
    assert!(std::fs::read_to_string(dir.join("r.svg")).unwrap().contains("<svg"));
    let _ = std::fs::remove_dir_all(&dir);

    gw.shutdown(Duration::from_secs(2)).await;
}

/// Publishers paced as a browser paces (`--pacing 2.5`): every payload still arrives
/// byte-exact, keyframes start every subscriber, and loss stays as small as in the burst run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_publisher() {
    let gw = start_gateway(45050, 45099).await;

    let cfg = Config {
        url: gw.base_url(),
        api_key: API_KEY.into(),
        rooms: 1,
        publishers: 1,
        subscribers: 2,
        duration: Duration::from_secs(4),
        video_bitrate: 1_500_000,
        pacing: 2.5,
        join_rate: 20.0,
        progress: false,
        ..Config::default()
    };
    let report = run(cfg).await.expect("the run completes");
    println!("{}", report.table());
    let p = &report.participants;
    assert_eq!((p.publish_ready, p.subscribe_ready), (1, 2), "every connection READY: {:?}", p.failures);
    let m = &report.media;
    assert!(m.received_packets > 500, "media flowed: {m:?}");
    assert_eq!(m.unmatched_payloads, 0, "every payload arrived byte-exact");
    assert!(m.loss_pct < 5.0, "loss {:.2}%", m.loss_pct);
    assert!(m.keyframes_received >= 2, "each subscriber saw a keyframe start");
    for s in &report.streams {
        assert_eq!(s.subscribers, 2, "{} {}", s.publisher, s.kind);
        assert!(s.sent_packets > 0 && s.received_packets > 0);
    }
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscription_is_reported_with_the_servers_reason() {
    // Three media ports: the publisher takes one, two subscribers the others, and the last
    // two subscribers are refused (`no_ports`): the report must say so, not "not READY".
    let gw = start_gateway(45910, 45912).await;
    let cfg = Config {
        url: gw.base_url(),
        api_key: API_KEY.into(),
        rooms: 1,
        publishers: 1,
        subscribers: 4,
        duration: Duration::from_secs(2),
        video_bitrate: 300_000,
        // The publisher joins first and must get its port before the subscribers take the
        // other two: 250 ms apart leaves it time even on a loaded machine.
        join_rate: 4.0,
        progress: false,
        ..Config::default()
    };
    let report = run(cfg).await.expect("the run completes");
    let p = &report.participants;
    assert_eq!((p.publish_ready, p.subscribe_ready), (1, 2), "{:?}", p.failures);
    let refused: u64 = p
        .failures
        .iter()
        .filter(|(reason, _)| reason.starts_with("refused: no_ports: no free UDP port"))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(refused, 2, "the two refusals, with the server's code and message: {:?}", p.failures);
    assert_eq!(p.failures.values().sum::<u64>(), 2, "nothing else failed: {:?}", p.failures);
    assert!(report.table().contains("refused: no_ports"), "{}", report.table());
    gw.shutdown(Duration::from_secs(2)).await;
}
