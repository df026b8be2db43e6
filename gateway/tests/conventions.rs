//! Operating conventions of the binary: `RUST_LOG` overrides `log.level`; join tokens carry the
//! `kid` of the key that signed them, and a key rotation keeps tokens of the old key working
//! until that key is removed; `/livez` answers while `/healthz` is the readiness check.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

struct Gateway {
    child: Child,
    base: String,
}

impl Gateway {
    async fn start(port: u16, media: u16, env: &[(&str, &str)]) -> Gateway {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gateway"));
        c.env_remove("RUST_LOG")
            .env("GATEWAY__HTTP__BIND", format!("127.0.0.1:{port}"))
            .env("GATEWAY__MEDIA__PORT_MIN", media.to_string())
            .env("GATEWAY__MEDIA__PORT_MAX", (media + 4).to_string())
            .env("GATEWAY__MEDIA__WORKERS", "1")
            .env("GATEWAY__AUTH__API_KEY", API_KEY)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in env {
            c.env(k, v);
        }
        let g = Gateway { child: c.spawn().unwrap(), base: format!("http://127.0.0.1:{port}") };
        let live = format!("{}/livez", g.base);
        let live = &live;
        poll_until("the gateway to start", 10, || async move {
            match reqwest::get(live).await {
                Ok(r) if r.status() == 200 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        g
    }

    /// Stop it and return what it logged.
    fn stop(mut self) -> String {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let out = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap()).wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_overrides_the_configured_level() {
    let quiet = Gateway::start(48210, 48220, &[("GATEWAY__LOG__LEVEL", "error")]).await;
    let logs = quiet.stop();
    assert!(!logs.contains("gateway started"), "log.level = error hides info: {logs}");
    let loud = Gateway::start(48211, 48225, &[("GATEWAY__LOG__LEVEL", "error"), ("RUST_LOG", "info")]).await;
    let logs = loud.stop();
    assert!(logs.contains("gateway started"), "RUST_LOG=info wins over log.level: {logs}");
}

/// Join a room with a token over the WebSocket: the first message (`joined`, or the refusal).
async fn try_join(base: &str, token: &str) -> Result<serde_json::Value, u16> {
    use futures_util::StreamExt;
    let url = format!("{}/v1/ws?token={token}", base.replacen("http", "ws", 1));
    match tokio_tungstenite::connect_async(url).await {
        Ok((mut ws, _)) => match ws.next().await {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => Ok(serde_json::from_str(&t).unwrap()),
            other => panic!("{other:?}"),
        },
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_keys_rotate_without_refusing_issued_tokens() {
    use signaling_api::auth::Auth;
    let old = "old-secret-0123456789abcdef";
    let new = "new-secret-0123456789abcdef";
    // During the rotation: the new key (k2) signs, the old one (`default`) is still accepted.
    let env = [
        ("GATEWAY__AUTH__TOKEN_SECRET", old),
        ("GATEWAY__AUTH__TOKEN_SECRETS__K2", new),
        ("GATEWAY__AUTH__TOKEN_KID", "k2"),
    ];
    let gw = Gateway::start(48213, 48235, &env).await;
    let api = Api::new(gw.base.clone());
    let room = api.create_room("rotation").await;
    // A token the old configuration issued (kid `default`, the old secret).
    let (token_old, _) = Auth::new("x", old).issue(&room, "alice", "alice", true, true, 60).unwrap();
    let j = try_join(&gw.base, &token_old).await.expect("the old key's token is accepted");
    assert_eq!(j["type"], "joined", "{j}");
    // New tokens carry kid k2: a verifier that knows only k2 accepts them.
    let token_new = api.token(&room, "bob").await;
    let only_k2 = Auth::with_keys("x", &[("k2".to_owned(), new.to_owned())], "k2");
    assert_eq!(only_k2.verify(&token_new).unwrap().sub, "bob");
    assert_eq!(try_join(&gw.base, &token_new).await.unwrap()["type"], "joined");
    drop(gw.stop());

    // After: the old key removed. Its tokens are refused, the new key's still work.
    let env = [("GATEWAY__AUTH__TOKEN_SECRETS__K2", new), ("GATEWAY__AUTH__TOKEN_KID", "k2")];
    let gw = Gateway::start(48214, 48240, &env).await;
    let api = Api::new(gw.base.clone());
    let room = api.create_room("rotation").await;
    let (token_old, _) = Auth::new("x", old).issue(&room, "alice", "alice", true, true, 60).unwrap();
    assert_eq!(try_join(&gw.base, &token_old).await.unwrap_err(), 401);
    let v: serde_json::Value =
        reqwest::get(format!("{}/v1/ws?token={token_old}", gw.base)).await.unwrap().json().await.unwrap();
    assert_eq!(v["error"]["message"], "token is signed with an unknown key (kid)");
    let (token_k2, _) = only_k2.issue(&room, "carol", "carol", true, true, 60).unwrap();
    assert_eq!(try_join(&gw.base, &token_k2).await.unwrap()["type"], "joined");
    // The development secret is no key once token_secrets is set.
    let (dev, _) =
        Auth::new("x", gateway::config::DEV_TOKEN_SECRET).issue(&room, "eve", "eve", true, true, 60).unwrap();
    assert_eq!(try_join(&gw.base, &dev).await.unwrap_err(), 401);
    tokio::time::sleep(Duration::from_millis(10)).await;
}
