//! `gateway admin …`: the REST API for people at a terminal. Every command is one or two REST
//! calls with the API key; output is a table by default and the API's JSON with `--json`.
//! Refusals print the contract's error code and message and exit with status 1.

use std::fmt::Write as _;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

#[derive(Args, Debug, Clone)]
pub struct AdminArgs {
    /// Base URL of the gateway's HTTP API (else $GATEWAY_URL, else http://127.0.0.1:8080).
    #[arg(long, global = true)]
    pub url: Option<String>,
    /// The REST API key (else $GATEWAY_API_KEY, else $GATEWAY__AUTH__API_KEY).
    #[arg(long, global = true)]
    pub api_key: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Subcommand, Debug, Clone)]
pub enum AdminCommand {
    /// Rooms: list, create, show, delete.
    #[command(subcommand)]
    Rooms(RoomsCommand),
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Participants of a room: list, kick, mute, unmute.
    #[command(subcommand)]
    Participants(ParticipantsCommand),
    /// Connections: inspect one (its state history as a table).
    #[command(subcommand)]
    Connection(ConnectionCommand),
    /// Stop taking new rooms and sessions (readiness turns 503); `--off` takes them again.
    Drain {
        #[arg(long)]
        off: bool,
    },
}

#[derive(Subcommand, Debug, Clone)]
pub enum RoomsCommand {
    List,
    Create {
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        max_participants: Option<u32>,
    },
    Show {
        room_id: String,
    },
    Delete {
        room_id: String,
    },
}

#[derive(Subcommand, Debug, Clone)]
pub enum TokenCommand {
    Create {
        room_id: String,
        participant: String,
        /// Display name (defaults to the participant id).
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        ttl_s: Option<u64>,
        #[arg(long)]
        no_publish: bool,
        #[arg(long)]
        no_subscribe: bool,
    },
}

#[derive(Subcommand, Debug, Clone)]
pub enum ParticipantsCommand {
    List {
        room_id: String,
    },
    Kick {
        room_id: String,
        participant_id: String,
    },
    /// Mute the participant's streams (all, one kind, or one stream): the gateway stops
    /// forwarding them.
    Mute {
        room_id: String,
        participant_id: String,
        #[arg(long, value_parser = ["audio", "video"])]
        kind: Option<String>,
        #[arg(long)]
        stream: Option<String>,
    },
    /// Lift the backend's mute.
    Unmute {
        room_id: String,
        participant_id: String,
        #[arg(long, value_parser = ["audio", "video"])]
        kind: Option<String>,
        #[arg(long)]
        stream: Option<String>,
    },
}

#[derive(Subcommand, Debug, Clone)]
pub enum ConnectionCommand {
    Inspect { connection_id: String },
}

/// A refusal or a failure to reach the gateway.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{code} (HTTP {status}): {message}")]
    Api { status: u16, code: String, message: String },
    #[error("cannot reach the gateway: {0}")]
    Transport(String),
    #[error("no API key: pass --api-key or set GATEWAY_API_KEY")]
    NoKey,
}

struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Client {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value, AdminError> {
        let mut req =
            self.http.request(method, format!("{}{path}", self.base.trim_end_matches('/'))).bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| AdminError::Transport(e.to_string()))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| AdminError::Transport(e.to_string()))?;
        let v: Value =
            if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        if (200..300).contains(&status) {
            return Ok(v);
        }
        Err(AdminError::Api {
            status,
            code: v["error"]["code"].as_str().unwrap_or("unknown").to_owned(),
            message: v["error"]["message"].as_str().unwrap_or("").to_owned(),
        })
    }
}

/// Run one command; returns what to print.
pub async fn run(args: &AdminArgs) -> Result<String, AdminError> {
    let key = args
        .api_key
        .clone()
        .or_else(|| std::env::var("GATEWAY_API_KEY").ok())
        .or_else(|| std::env::var("GATEWAY__AUTH__API_KEY").ok())
        .filter(|k| !k.is_empty())
        .ok_or(AdminError::NoKey)?;
    let http = reqwest::Client::builder().build().map_err(|e| AdminError::Transport(e.to_string()))?;
    let base = args
        .url
        .clone()
        .or_else(|| std::env::var("GATEWAY_URL").ok())
        .unwrap_or_else(|| "http://127.0.0.1:8080".to_owned());
    let c = Client { http, base, key };
    use reqwest::Method as M;
    let (v, table) = match &args.command {
        AdminCommand::Rooms(RoomsCommand::List) => {
            let v = c.call(M::GET, "/v1/rooms", None).await?;
            let rows = rows(&v["rooms"], &["room_id", "name", "participants", "streams"]);
            let t = table(&["ROOM", "NAME", "PARTICIPANTS", "STREAMS"], rows);
            (v, t)
        }
        AdminCommand::Rooms(RoomsCommand::Create { name, max_participants }) => {
            let mut body = json!({});
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            if let Some(m) = max_participants {
                body["max_participants"] = json!(m);
            }
            let v = c.call(M::POST, "/v1/rooms", Some(body)).await?;
            let t = table(
                &["ROOM", "NAME", "MAX", "CREATED"],
                rows(&json!([v]), &["room_id", "name", "max_participants", "created_at"]),
            );
            (v, t)
        }
        AdminCommand::Rooms(RoomsCommand::Show { room_id }) => {
            let v = c.call(M::GET, &format!("/v1/rooms/{room_id}"), None).await?;
            let mut t =
                format!("room {} ({}), max {}\n", text(&v["room_id"]), text(&v["name"]), text(&v["max_participants"]));
            t.push_str(&participants_table(&v));
            (v, t)
        }
        AdminCommand::Rooms(RoomsCommand::Delete { room_id }) => {
            c.call(M::DELETE, &format!("/v1/rooms/{room_id}"), None).await?;
            (json!({ "deleted": room_id }), format!("room {room_id} deleted\n"))
        }
        AdminCommand::Token(TokenCommand::Create { room_id, participant, name, ttl_s, no_publish, no_subscribe }) => {
            let mut body =
                json!({ "participant": participant, "can_publish": !no_publish, "can_subscribe": !no_subscribe });
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            if let Some(t) = ttl_s {
                body["ttl_s"] = json!(t);
            }
            let v = c.call(M::POST, &format!("/v1/rooms/{room_id}/tokens"), Some(body)).await?;
            let t = format!("{}\nexpires {}\n", text(&v["token"]), text(&v["expires_at"]));
            (v, t)
        }
        AdminCommand::Participants(ParticipantsCommand::List { room_id }) => {
            let v = c.call(M::GET, &format!("/v1/rooms/{room_id}"), None).await?;
            let t = participants_table(&v);
            (v["participants"].clone(), t)
        }
        AdminCommand::Participants(ParticipantsCommand::Kick { room_id, participant_id }) => {
            c.call(M::DELETE, &format!("/v1/rooms/{room_id}/participants/{participant_id}"), None).await?;
            (json!({ "kicked": participant_id }), format!("{participant_id} kicked from {room_id}\n"))
        }
        AdminCommand::Participants(
            ParticipantsCommand::Mute { room_id, participant_id, kind, stream }
            | ParticipantsCommand::Unmute { room_id, participant_id, kind, stream },
        ) => {
            let muted = matches!(args.command, AdminCommand::Participants(ParticipantsCommand::Mute { .. }));
            let body = json!({ "muted": muted, "kind": kind, "stream_id": stream });
            let v =
                c.call(M::POST, &format!("/v1/rooms/{room_id}/participants/{participant_id}/mute"), Some(body)).await?;
            let t = table(
                &["STREAM", "KIND", "MUTED", "MODERATED"],
                rows(&v["streams"], &["stream_id", "kind", "muted", "moderated"]),
            );
            (v, t)
        }
        AdminCommand::Connection(ConnectionCommand::Inspect { connection_id }) => {
            let v = c.call(M::GET, &format!("/v1/connections/{connection_id}"), None).await?;
            let mut t = format!(
                "connection {} ({}) of {} in {}: {} ({})\n",
                text(&v["connection_id"]),
                text(&v["role"]),
                text(&v["participant_id"]),
                text(&v["room_id"]),
                text(&v["state"]),
                text(&v["code"])
            );
            t.push_str(&table(
                &["AT", "EVENT", "CODE", "REASON"],
                rows(&v["events"], &["at", "event", "code", "reason"]),
            ));
            (v, t)
        }
        AdminCommand::Drain { off } => {
            let m = if *off { M::DELETE } else { M::POST };
            let v = c.call(m, "/v1/admin/drain", None).await?;
            let t = format!("{}\n", text(&v["status"]));
            (v, t)
        }
    };
    Ok(if args.json { format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default()) } else { table })
}

fn participants_table(room: &Value) -> String {
    let mut out = Vec::new();
    for p in room["participants"].as_array().into_iter().flatten() {
        let conns: Vec<String> = p["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| format!("{} {} {}", text(&c["role"]), text(&c["state"]), text(&c["connection_id"])))
            .collect();
        let streams: Vec<String> = p["streams"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                let flag = if s["moderated"] == true {
                    " (muted by backend)"
                } else if s["muted"] == true {
                    " (muted)"
                } else {
                    ""
                };
                format!("{}{flag}", text(&s["kind"]))
            })
            .collect();
        out.push(vec![text(&p["participant_id"]), text(&p["name"]), conns.join(", "), streams.join(", ")]);
    }
    table(&["PARTICIPANT", "NAME", "CONNECTIONS", "STREAMS"], out)
}

/// A JSON value as a table cell: strings bare, null as `-`.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn rows(list: &Value, fields: &[&str]) -> Vec<Vec<String>> {
    list.as_array().into_iter().flatten().map(|item| fields.iter().map(|f| text(&item[*f])).collect()).collect()
}

/// Left-aligned columns, two spaces apart, a header line.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (i, cell) in r.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut out, header.to_vec());
    for r in &rows {
        line(&mut out, r.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn tables_align_columns() {
        let t = super::table(&["A", "LONGER"], vec![vec!["xyz".into(), "1".into()], vec!["q".into(), "-".into()]]);
        assert_eq!(t, "A    LONGER\nxyz  1\nq    -\n");
    }
}
