//! The gateway's signaling: a join token from the REST API, then the WebSocket protocol
//! (`docs/protocol.md`), translated to and from [`crate::signaling`]'s vocabulary. The gateway
//! names connections by id; the driver maps them to the participant's two roles.

use std::collections::HashMap;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::api::Api;
use crate::peer::Plan;
use crate::signaling::{Command, ConnState, Event, Published, Role, Signaling};

/// Bytes tungstenite reads (and zero-fills) per poll of the signaling socket. It zero-fills its
/// whole read buffer (128 KiB by default) on each poll, which was 38% of the load tester's CPU
/// when the session loop polled it on every wake-up; signaling messages are small, and a longer
/// frame still gets room.
const WS_READ_BUFFER: usize = 4096;

/// Get a token, open the WebSocket and start its driver.
pub async fn connect(api: &Api, plan: &Plan) -> anyhow::Result<Signaling> {
    let token = api.token(&plan.room_id, &plan.name, plan.publish, plan.subscribe).await?;
    let ws_config = WebSocketConfig::default().read_buffer_size(WS_READ_BUFFER);
    // TCP_NODELAY, as browsers open their WebSockets: with Nagle's algorithm a second small
    // message (a candidate after an answer) waited for the server's delayed ACK of the first.
    let (ws, _) = tokio_tungstenite::connect_async_with_config(api.ws_url(&token), Some(ws_config), true).await?;
    let (sig, commands, events) = Signaling::channels();
    tokio::spawn(drive(ws, commands, events));
    Ok(sig)
}

async fn drive<S>(
    ws: tokio_tungstenite::WebSocketStream<S>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<Event>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut tx, mut rx) = ws.split();
    let mut ids = Ids::default();
    let error = loop {
        tokio::select! {
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { break None };
                let msg = match cmd {
                    Command::Publish { sdp } => json!({ "type": "publish", "sdp": sdp }),
                    Command::Subscribe => json!({ "type": "subscribe" }),
                    Command::Answer { sdp } => json!({
                        "type": "answer",
                        "connection_id": ids.subscribe.clone(),
                        "sdp": sdp,
                    }),
                    Command::Leave => json!({ "type": "leave" }),
                };
                if let Err(e) = tx.send(Message::Text(msg.to_string().into())).await {
                    break Some(format!("WebSocket: {e}"));
                }
            }
            m = rx.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                    for ev in translate(&v, &mut ids) {
                        if events.send(ev).is_err() {
                            return;
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None => break None,
                Some(Err(e)) => break Some(format!("WebSocket: {e}")),
                Some(Ok(_)) => {}
            },
        }
    };
    let _ = events.send(Event::Closed(error));
}

/// The gateway's connection ids of our two connections.
#[derive(Default)]
struct Ids {
    publish: Option<String>,
    subscribe: Option<String>,
    /// From `connection_event`s, which name the role.
    roles: HashMap<String, Role>,
}

impl Ids {
    fn role_of(&self, id: &str) -> Option<Role> {
        if self.publish.as_deref() == Some(id) {
            return Some(Role::Publish);
        }
        if self.subscribe.as_deref() == Some(id) {
            return Some(Role::Subscribe);
        }
        self.roles.get(id).copied()
    }
}

/// One gateway message → the events it means.
fn translate(v: &Value, ids: &mut Ids) -> Vec<Event> {
    let id = v["connection_id"].as_str().map(str::to_owned);
    match v["type"].as_str().unwrap_or("") {
        "joined" => vec![Event::Joined {
            streams: v["streams"].as_array().into_iter().flatten().filter_map(published).collect(),
        }],
        "stream_added" => published(v).map(Event::StreamAdded).into_iter().collect(),
        "answer" => {
            ids.publish = id;
            vec![Event::Answer { sdp: v["sdp"].as_str().unwrap_or("").to_owned() }]
        }
        "offer" => {
            ids.subscribe = id;
            vec![Event::Offer { sdp: v["sdp"].as_str().unwrap_or("").to_owned(), streams: Vec::new() }]
        }
        "candidate" => {
            let role = id.as_deref().and_then(|i| ids.role_of(i));
            match (role, v["candidate"].as_str()) {
                (Some(role), Some(c)) => vec![Event::Candidate { role, candidate: c.to_owned() }],
                _ => Vec::new(),
            }
        }
        "connection_event" => {
            let role = match v["role"].as_str() {
                Some("publish") => Role::Publish,
                Some("subscribe") => Role::Subscribe,
                _ => return Vec::new(),
            };
            if let Some(i) = &id {
                ids.roles.insert(i.clone(), role);
            }
            let state = match v["event"].as_str().unwrap_or("") {
                "INITIAL" => ConnState::Initial,
                "GATHERED" => ConnState::Gathered,
                "READY" => ConnState::Ready,
                "FINISHED" => ConnState::Finished,
                "FAILED" => ConnState::Failed(v["reason"].as_str().unwrap_or("unknown").to_owned()),
                _ => return Vec::new(),
            };
            let at = v["at"].as_str().and_then(|a| chrono::DateTime::parse_from_rfc3339(a).ok());
            vec![Event::Connection { role, state, at, connection_id: id }]
        }
        "error" => vec![Event::Refused {
            code: v["code"].as_str().unwrap_or("unknown").to_owned(),
            message: v["message"].as_str().unwrap_or("").to_owned(),
            connection_id: id,
        }],
        _ => Vec::new(),
    }
}

fn published(s: &Value) -> Option<Published> {
    Some(Published {
        stream_id: s["stream_id"].as_str()?.to_owned(),
        participant: s["participant_id"].as_str()?.to_owned(),
        mid: s["mid"].as_str()?.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_messages_become_events() {
        let mut ids = Ids::default();
        let joined = json!({"type": "joined", "streams": [{"stream_id": "s1", "participant_id": "alice", "mid": "0"}]});
        assert_eq!(
            translate(&joined, &mut ids),
            vec![Event::Joined {
                streams: vec![Published { stream_id: "s1".into(), participant: "alice".into(), mid: "0".into() }]
            }]
        );
        let refused = json!({"type": "error", "code": "no_ports", "message": "no free UDP port in the media range"});
        assert_eq!(
            translate(&refused, &mut ids),
            vec![Event::Refused {
                code: "no_ports".into(),
                message: "no free UDP port in the media range".into(),
                connection_id: None
            }]
        );
        let about =
            json!({"type": "error", "code": "not_found", "message": "no such connection", "connection_id": "c9"});
        assert!(
            matches!(&translate(&about, &mut ids)[..], [Event::Refused { connection_id: Some(c), .. }] if c == "c9")
        );
        let offer = json!({"type": "offer", "connection_id": "c2", "sdp": "v=0"});
        assert!(matches!(&translate(&offer, &mut ids)[..], [Event::Offer { .. }]));
        let cand =
            json!({"type": "candidate", "connection_id": "c2", "candidate": "candidate:1 1 udp 1 10.0.0.1 9 typ host"});
        assert!(matches!(&translate(&cand, &mut ids)[..], [Event::Candidate { role: Role::Subscribe, .. }]));
        let ev = json!({"type": "connection_event", "connection_id": "c1", "role": "publish", "event": "FAILED",
                        "reason": "ice_timeout", "at": "2026-12-05T03:00:00.000Z"});
        match &translate(&ev, &mut ids)[..] {
            [Event::Connection { role: Role::Publish, state: ConnState::Failed(r), at: Some(_), .. }] => {
                assert_eq!(r, "ice_timeout")
            }
            other => panic!("{other:?}"),
        }
        // Learned from the event: candidates of c1 are the publisher's.
        let cand = json!({"type": "candidate", "connection_id": "c1", "candidate": "x"});
        assert!(matches!(&translate(&cand, &mut ids)[..], [Event::Candidate { role: Role::Publish, .. }]));
    }
}
