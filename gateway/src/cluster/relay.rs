//! A client WebSocket that lands on a node not owning its room is relayed to the owner's
//! `/v1/ws` (docs/cluster.md "Relayed WebSockets"): the join token is checked here, the
//! upstream socket is opened before the client's upgrade is answered (so a refusal by the owner
//! reaches the client as the owner's HTTP error), then every message is passed through
//! unchanged both ways. The client sees the owner's messages, the owner's SDP and candidates:
//! media goes straight between the client and the owner, never through this node.
//!
//! The owner closing the socket closes the client's with the same code and reason. The owner
//! vanishing (its process or host died) closes the client's with 1011 and `room_lost`.

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use signaling_api::error::ApiError;
use signaling_api::protocol::ErrorCode;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};

use super::{Cluster, HOP_HEADER};

/// Close code and reason when the owner of the room went away under a relayed session.
pub const LOST_CODE: u16 = 1011;
pub const LOST_REASON: &str = "room_lost";

pub async fn websocket(c: Arc<Cluster>, req: Request, next: Next) -> Response {
    let query = req.uri().query().unwrap_or("").to_owned();
    let token = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "token")
        .map(|(_, v)| super::route::percent_decode_query(v));
    let Some(token) = token else { return next.run(req).await };
    // Anything wrong with the token: the local handler says what.
    let Ok(claims) = c.state().auth.verify(&token) else { return next.run(req).await };
    if c.state().registry.has_room(&claims.room) {
        return next.run(req).await;
    }
    let owner = match c.store.owner(&claims.room).await {
        Ok(o) => o,
        Err(e) => {
            c.redis_error("lookup", &e);
            return ApiError::from(e).into_response();
        }
    };
    let (node, url) = match owner {
        None => return next.run(req).await,
        Some(o) if o.node == c.node_id => return next.run(req).await,
        Some(o) if o.lost || o.url.is_none() => return super::route::lost(&o.node).into_response(),
        Some(o) => (o.node.clone(), o.url.clone().unwrap_or_default()),
    };
    let (mut parts, _body) = req.into_parts();
    let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(ws) => ws,
        Err(r) => {
            return ApiError::bad_request(format!("WebSocket upgrade required: {}", r.body_text())).into_response()
        }
    };
    let ws_url = format!("{}/v1/ws?{query}", url.replacen("http://", "ws://", 1));
    let mut up_req = match ws_url.as_str().into_client_request() {
        Ok(r) => r,
        Err(e) => return ApiError::new(ErrorCode::Internal, format!("relay URL: {e}")).into_response(),
    };
    if let Ok(v) = axum::http::HeaderValue::from_str(&c.node_id) {
        up_req.headers_mut().insert(HOP_HEADER, v);
    }
    let max = c.state().config.ws_max_message_bytes;
    // Without Nagle's algorithm, as the client's own socket: relayed messages often come in
    // pairs, and the second would wait for the owner's delayed ACK of the first.
    let connect = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio_tungstenite::connect_async_with_config(up_req, None, true),
    );
    let upstream = match connect.await {
        Ok(Ok((s, _))) => s,
        Ok(Err(tungstenite::Error::Http(resp))) => {
            // The owner refused (401, 404, 409 …): its answer, as it is.
            let status = resp.status();
            let body = resp.into_body().unwrap_or_default();
            let mut r = Response::new(axum::body::Body::from(body));
            *r.status_mut() = status;
            r.headers_mut().insert(axum::http::header::CONTENT_TYPE, "application/json".parse().expect("valid"));
            return r;
        }
        _ => {
            return ApiError::new(
                ErrorCode::ClusterUnavailable,
                format!("node {node} that owns the room cannot be reached"),
            )
            .into_response()
        }
    };
    c.metrics.relayed.with_label_values(&[node.as_str()]).inc();
    tracing::info!(room_id = %claims.room, participant_id = %claims.sub, node, "cluster: relaying a WebSocket to the owner");
    ws.max_message_size(max).max_frame_size(max).on_upgrade(move |socket| async move {
        let open = c.metrics.relayed_open.with_label_values(&[node.as_str()]);
        open.inc();
        pump(socket, upstream, &node).await;
        open.dec();
    })
}

type Upstream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn pump(client: WebSocket, upstream: Upstream, node: &str) {
    let (mut c_tx, mut c_rx) = client.split();
    let (mut u_tx, mut u_rx) = upstream.split();
    loop {
        tokio::select! {
            m = c_rx.next() => match m {
                Some(Ok(m)) => {
                    let closing = matches!(m, Message::Close(_));
                    if u_tx.send(to_upstream(m)).await.is_err() || closing {
                        break;
                    }
                }
                // The client went away: the owner treats it as a dropped socket (reconnect grace).
                _ => {
                    let _ = u_tx.close().await;
                    break;
                }
            },
            m = u_rx.next() => match m {
                Some(Ok(tungstenite::Message::Close(f))) => {
                    let frame = f.map(|f| CloseFrame { code: f.code.into(), reason: f.reason.as_str().into() });
                    let _ = c_tx.send(Message::Close(frame)).await;
                    break;
                }
                Some(Ok(m)) => {
                    if let Some(m) = to_client(m) {
                        if c_tx.send(m).await.is_err() {
                            let _ = u_tx.close().await;
                            break;
                        }
                    }
                }
                // The owner vanished without closing: its node died.
                _ => {
                    tracing::warn!(node, "cluster: the owner node dropped a relayed WebSocket");
                    let frame = CloseFrame { code: LOST_CODE, reason: LOST_REASON.into() };
                    let _ = c_tx.send(Message::Close(Some(frame))).await;
                    break;
                }
            },
        }
    }
    let _ = c_tx.close().await;
}

fn to_upstream(m: Message) -> tungstenite::Message {
    match m {
        Message::Text(t) => tungstenite::Message::Text(t.as_str().into()),
        Message::Binary(b) => tungstenite::Message::Binary(b),
        Message::Ping(b) => tungstenite::Message::Ping(b),
        Message::Pong(b) => tungstenite::Message::Pong(b),
        Message::Close(f) => tungstenite::Message::Close(
            f.map(|f| tungstenite::protocol::CloseFrame { code: f.code.into(), reason: f.reason.as_str().into() }),
        ),
    }
}

fn to_client(m: tungstenite::Message) -> Option<Message> {
    Some(match m {
        tungstenite::Message::Text(t) => Message::Text(t.as_str().into()),
        tungstenite::Message::Binary(b) => Message::Binary(b),
        tungstenite::Message::Ping(b) => Message::Ping(b),
        tungstenite::Message::Pong(b) => Message::Pong(b),
        tungstenite::Message::Close(_) | tungstenite::Message::Frame(_) => return None,
    })
}
