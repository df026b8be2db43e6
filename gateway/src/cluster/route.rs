//! Every REST route on every node (docs/cluster.md "Routing"): an axum middleware in front of
//! the whole API. A request that carries [`HOP_HEADER`] came from another node and is served
//! here. Otherwise:
//! - `POST /v1/rooms`: the placement rule picks the node; another node gets the request
//!   proxied (the registry's directory claim then records the room there).
//! - `/v1/rooms/{id}/…`, WHIP/WHEP (`{room}` is an id or a name): served by the room's owner,
//!   proxied when that is another node; a room lost with its node is `not_found`.
//! - `GET /v1/rooms` merges every node's list; `GET /v1/connections/{id}` asks the other nodes
//!   when this one does not know the connection.
//! - `POST /v1/dev/token`: the node owning the name, or the one placement picks.
//! - `GET /v1/ws`: relayed to the owner (`relay`).
//!
//! Proxied requests keep their method, path, query, headers (the API key, the join token) and
//! body; the owner's answer comes back as it is. Redis unreachable: `cluster_unavailable` (503)
//! where a placement or a lookup was needed, local service otherwise.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use signaling_api::error::ApiError;
use signaling_api::protocol::{ErrorCode, RoomList};

use super::{Cluster, HOP_HEADER};

pub async fn route(State(c): State<Arc<Cluster>>, req: Request, next: Next) -> Response {
    if req.headers().contains_key(HOP_HEADER) {
        return next.run(req).await;
    }
    let path = req.uri().path().to_owned();
    let segs: Vec<String> = path.trim_start_matches('/').split('/').map(percent_decode).collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let method = req.method().clone();
    match (method, segs.as_slice()) {
        (Method::GET, ["v1", "ws"]) => super::relay::websocket(c, req, next).await,
        (Method::POST, ["v1", "rooms"]) if api_key_ok(&c, &req) => create_room(c, req, next).await,
        (Method::GET, ["v1", "rooms"]) => list_rooms(c, req, next).await,
        (_, ["v1", "rooms", room, ..]) if api_key_ok(&c, &req) => {
            let room = room.to_string();
            by_room(c, &room, false, req, next).await
        }
        (_, ["v1", "whip" | "whep", room, ..]) if req.method() != Method::OPTIONS => {
            let room = room.to_string();
            by_room(c, &room, true, req, next).await
        }
        (Method::GET, ["v1", "connections", _]) => connection(c, req, next).await,
        (Method::POST, ["v1", "dev", "token"]) => dev_token(c, req, next).await,
        (_, ["v1", "admin", "drain"]) => {
            let resp = next.run(req).await;
            c.beat_now();
            resp
        }
        _ => next.run(req).await,
    }
}

/// Only requests with the right API key cause Redis lookups; the rest get the local 401.
fn api_key_ok(c: &Cluster, req: &Request) -> bool {
    let h = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    c.state().auth.check_bearer(h).is_ok()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn create_room(c: Arc<Cluster>, req: Request, next: Next) -> Response {
    let nodes = match c.members().await {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    let Some(target) = c.placement.choose(&nodes) else {
        return ApiError::new(ErrorCode::ClusterUnavailable, "no node of the cluster takes new rooms now")
            .into_response();
    };
    if target.id == c.node_id {
        return next.run(req).await;
    }
    let (node, url) = (target.id.clone(), target.url.clone());
    proxy(&c, &node, &url, req).await
}

/// A request addressed to one room: served where the room lives.
async fn by_room(c: Arc<Cluster>, room: &str, by_name_too: bool, req: Request, next: Next) -> Response {
    let reg = &c.state().registry;
    if reg.has_room(room) || (by_name_too && reg.room_id_by_name(room).is_some()) {
        return next.run(req).await;
    }
    let owner = if by_name_too { c.store.owner_by_id_or_name(room).await } else { c.store.owner(room).await };
    match owner {
        Err(e) => {
            c.redis_error("lookup", &e);
            ApiError::from(e).into_response()
        }
        Ok(None) => next.run(req).await,
        Ok(Some(o)) if o.node == c.node_id => next.run(req).await,
        Ok(Some(o)) if o.lost || o.url.is_none() => lost(&o.node).into_response(),
        Ok(Some(o)) => {
            let url = o.url.clone().unwrap_or_default();
            proxy(&c, &o.node, &url, req).await
        }
    }
}

/// A room whose node died.
pub fn lost(node: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("room not found: it was lost with node {node}"))
}

/// `GET /v1/rooms`: this node's rooms and every other live node's, sorted by id.
async fn list_rooms(c: Arc<Cluster>, req: Request, next: Next) -> Response {
    let headers = req.headers().clone();
    let resp = next.run(req).await;
    if resp.status() != StatusCode::OK {
        return resp;
    }
    let Ok(body) = axum::body::to_bytes(resp.into_body(), usize::MAX).await else {
        return ApiError::new(ErrorCode::Internal, "reading the room list").into_response();
    };
    let mut list: RoomList = match serde_json::from_slice(&body) {
        Ok(l) => l,
        Err(_) => return ApiError::new(ErrorCode::Internal, "reading the room list").into_response(),
    };
    let nodes = match c.members().await {
        Ok(n) => n,
        // Redis down: this node's rooms are all it can see.
        Err(_) => return axum::Json(list).into_response(),
    };
    let asks = nodes.iter().filter(|n| n.id != c.node_id).map(|n| {
        let c = Arc::clone(&c);
        let headers = headers.clone();
        let url = format!("{}/v1/rooms", n.url);
        async move {
            let r = c.http.get(url).headers(forwarded_headers(&headers, &c.node_id)).send().await.ok()?;
            r.json::<RoomList>().await.ok()
        }
    });
    for other in futures_util::future::join_all(asks).await.into_iter().flatten() {
        list.rooms.extend(other.rooms);
    }
    list.rooms.sort_by(|a, b| a.room_id.cmp(&b.room_id));
    list.rooms.dedup_by(|a, b| a.room_id == b.room_id);
    axum::Json(list).into_response()
}

/// `GET /v1/connections/{id}`: here, or on whichever node knows it.
async fn connection(c: Arc<Cluster>, req: Request, next: Next) -> Response {
    let headers = req.headers().clone();
    let path = req.uri().path().to_owned();
    let resp = next.run(req).await;
    if resp.status() != StatusCode::NOT_FOUND {
        return resp;
    }
    let Ok(nodes) = c.members().await else { return resp };
    for n in nodes.iter().filter(|n| n.id != c.node_id) {
        let url = format!("{}{path}", n.url);
        let Ok(r) = c.http.get(url).headers(forwarded_headers(&headers, &c.node_id)).send().await else {
            continue;
        };
        if r.status() == StatusCode::OK {
            c.metrics.proxied.with_label_values(&[n.id.as_str()]).inc();
            return into_response(r).await;
        }
    }
    resp
}

/// `POST /v1/dev/token`: to the node owning the room name, or the one placement picks.
async fn dev_token(c: Arc<Cluster>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let limit = c.state().config.max_body_bytes;
    let Ok(bytes) = axum::body::to_bytes(body, limit).await else {
        return ApiError::new(ErrorCode::PayloadTooLarge, "request body is too large").into_response();
    };
    let name = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("room").and_then(|r| r.as_str()).map(str::to_owned));
    let req = Request::from_parts(parts, Body::from(bytes));
    let Some(name) = name else { return next.run(req).await };
    if c.state().registry.room_id_by_name(&name).is_some() {
        return next.run(req).await;
    }
    let owner = match c.store.room_by_name(&name).await {
        Ok(Some(id)) => c.store.owner(&id).await,
        Ok(None) => Ok(None),
        Err(e) => Err(e),
    };
    match owner {
        Err(e) => {
            c.redis_error("lookup", &e);
            return ApiError::from(e).into_response();
        }
        Ok(Some(o)) if !o.lost && o.node != c.node_id => {
            if let Some(url) = o.url.clone() {
                return proxy(&c, &o.node, &url, req).await;
            }
        }
        _ => {}
    }
    create_room(c, req, next).await
}

/// The request's headers for another node: hop-by-hop ones left out, [`HOP_HEADER`] added.
pub fn forwarded_headers(h: &HeaderMap, node: &str) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (k, v) in h {
        if matches!(
            k.as_str(),
            "host" | "connection" | "content-length" | "transfer-encoding" | "upgrade" | "keep-alive" | "te"
        ) || k.as_str().starts_with("sec-websocket")
        {
            continue;
        }
        out.append(k.clone(), v.clone());
    }
    if let Ok(v) = HeaderValue::from_str(node) {
        out.insert(HOP_HEADER, v);
    }
    out
}

/// Send the request to `node` at `url` and answer with its response as it is.
pub async fn proxy(c: &Cluster, node: &str, url: &str, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let limit = c.state().config.max_body_bytes;
    let Ok(bytes) = axum::body::to_bytes(body, limit).await else {
        return ApiError::new(ErrorCode::PayloadTooLarge, "request body is too large").into_response();
    };
    let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let target = format!("{url}{pq}");
    let sent = c
        .http
        .request(parts.method.clone(), target)
        .headers(forwarded_headers(&parts.headers, &c.node_id))
        .body(bytes)
        .send()
        .await;
    c.metrics.proxied.with_label_values(&[node]).inc();
    match sent {
        Ok(r) => into_response(r).await,
        Err(e) => {
            tracing::warn!(node, error = %e, "cluster: the owner node cannot be reached");
            ApiError::new(ErrorCode::ClusterUnavailable, format!("node {node} that owns the room cannot be reached"))
                .into_response()
        }
    }
}

async fn into_response(r: reqwest::Response) -> Response {
    let status = r.status();
    let mut headers = HeaderMap::new();
    for (k, v) in r.headers() {
        if !matches!(k.as_str(), "connection" | "content-length" | "transfer-encoding" | "keep-alive") {
            headers.append(k.clone(), v.clone());
        }
    }
    let body: Bytes = r.bytes().await.unwrap_or_default();
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// A query-string value decoded (`+` is a space).
pub fn percent_decode_query(s: &str) -> String {
    percent_decode(&s.replace('+', " "))
}
