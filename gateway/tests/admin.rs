//! `gateway admin …` (the binary) against a live in-process gateway: rooms, tokens,
//! participants (list, mute, kick), connection inspection, drain; tables and `--json`;
//! refusals exit 1 with the contract's error code.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

struct Ctl {
    url: String,
}

impl Ctl {
    /// Run `gateway admin <args>` in a blocking thread; (exit code, stdout, stderr).
    async fn run(&self, args: &[&str]) -> (i32, String, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
        cmd.arg("admin").arg("--url").arg(&self.url).args(args).env("GATEWAY_API_KEY", API_KEY);
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    async fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.run(args).await;
        assert_eq!(code, 0, "gateway admin {args:?}: {err}");
        out
    }

    async fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a).await).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_commands_drive_a_live_gateway() {
    let gw = start_gateway(48300, 48309).await;
    let api = Api::new(gw.base_url());
    let ctl = Ctl { url: gw.base_url() };

    // Rooms.
    let room = ctl.json(&["rooms", "create", "--name", "ops-room", "--max-participants", "4"]).await;
    let room_id = room["room_id"].as_str().unwrap().to_owned();
    let list = ctl.ok(&["rooms", "list"]).await;
    let mut lines = list.lines();
    assert_eq!(
        lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
        ["ROOM", "NAME", "PARTICIPANTS", "STREAMS"]
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(row, [room_id.as_str(), "ops-room", "0", "0"], "{list}");

    // A token the CLI made lets a client in.
    let token = ctl.json(&["token", "create", &room_id, "alice", "--name", "Alice"]).await;
    assert!(token["token"].as_str().unwrap().contains('.'), "{token}");
    let alice = Peer::join(&api, &room_id, "alice").await;
    alice.publish();
    alice.wait("READY", 10, |l| l.connected).await;

    let table = ctl.ok(&["participants", "list", &room_id]).await;
    assert!(table.starts_with("PARTICIPANT"), "{table}");
    let alice_row = table.lines().find(|l| l.starts_with("alice")).unwrap_or_else(|| panic!("{table}"));
    assert!(alice_row.contains("publish READY c_"), "{alice_row}");
    assert!(alice_row.contains("audio") && alice_row.contains("video"), "{alice_row}");

    // Mute her video: the table says so, and so does the room.
    let out = ctl.ok(&["participants", "mute", &room_id, "alice", "--kind", "video"]).await;
    assert!(out.lines().nth(1).is_some_and(|l| l.contains("video") && l.contains("true")), "{out}");
    let (_, r) = api.call("GET", &format!("/v1/rooms/{room_id}"), None).await;
    let video = r["streams"].as_array().unwrap().iter().find(|s| s["kind"] == "video").unwrap().clone();
    assert_eq!(video["moderated"], true);
    let table = ctl.ok(&["participants", "list", &room_id]).await;
    assert!(table.contains("video (muted by backend)"), "{table}");
    ctl.ok(&["participants", "unmute", &room_id, "alice"]).await;

    // Connection inspection: the state history as a table.
    let conn = alice.connection_id("publish").unwrap();
    let out = ctl.ok(&["connection", "inspect", &conn]).await;
    assert!(out.starts_with(&format!("connection {conn} (publish) of alice in {room_id}: READY (104)")), "{out}");
    let events: Vec<&str> = out.lines().skip(2).map(|l| l.split_whitespace().nth(1).unwrap()).collect();
    assert_eq!(events.first(), Some(&"INITIAL"), "{out}");
    assert!(events.contains(&"GATHERED") && events.contains(&"READY"), "{out}");

    // Kick, then refusals: exit 1 and the contract's code.
    ctl.ok(&["participants", "kick", &room_id, "alice"]).await;
    alice.wait("kicked", 5, |l| l.ws_closed.is_some()).await;
    let (code, _, err) = ctl.run(&["participants", "kick", &room_id, "alice"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("not_found (HTTP 404)"), "{err}");
    let (code, _, err) = ctl.run(&["--api-key", "wrong", "rooms", "list"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("unauthorized"), "{err}");

    // Drain: readiness 503 and new rooms refused; undrain.
    assert_eq!(ctl.ok(&["drain"]).await.trim(), "draining");
    let (s, _) = api.call("GET", "/healthz", None).await;
    assert_eq!(s, 503);
    let (code, _, err) = ctl.run(&["rooms", "create"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("conflict"), "{err}");
    assert_eq!(ctl.ok(&["drain", "--off"]).await.trim(), "ok");
    let (s, _) = api.call("GET", "/healthz", None).await;
    assert_eq!(s, 200);

    let out = ctl.ok(&["rooms", "delete", &room_id]).await;
    assert_eq!(out.trim(), format!("room {room_id} deleted"));
    assert_eq!(ctl.json(&["rooms", "list"]).await["rooms"], serde_json::json!([]));
    gw.shutdown(Duration::from_secs(1)).await;
}
