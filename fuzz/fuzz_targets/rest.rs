//! REST bodies through the real router (auth, routing, JSON rejections, validation) against a
//! media plane that accepts everything: never a panic, never a 500, always the error shape.
#![no_main]

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use signaling_api::media::{ConnectionSpec, MediaError, MediaPlane};
use signaling_api::registry::Registry;
use signaling_api::{router, ApiConfig, AppState};
use tower::ServiceExt;

struct Accepting;

#[async_trait::async_trait]
impl MediaPlane for Accepting {
    async fn create_room(&self, _: &str) -> Result<(), MediaError> {
        Ok(())
    }
    async fn close_room(&self, _: &str) {}
    async fn publish(&self, _: ConnectionSpec, _: String) -> Result<(), MediaError> {
        Ok(())
    }
    async fn republish(&self, _: &str, _: String) -> Result<(), MediaError> {
        Ok(())
    }
    async fn subscribe(&self, _: ConnectionSpec) -> Result<(), MediaError> {
        Ok(())
    }
    async fn play(&self, _: ConnectionSpec, _: &str, _: String) -> Result<(), MediaError> {
        Ok(())
    }
    async fn resubscribe(&self, _: &str) -> Result<(), MediaError> {
        Ok(())
    }
    async fn restart_ice(&self, _: &str) -> Result<(), MediaError> {
        Ok(())
    }
    async fn answer(&self, _: &str, _: String) -> Result<(), MediaError> {
        Ok(())
    }
    async fn add_candidate(&self, _: &str, _: String) -> Result<(), MediaError> {
        Ok(())
    }
    async fn set_layer(&self, _: &str, _: &str, _: Option<String>) -> Result<(), MediaError> {
        Ok(())
    }
    async fn close_connection(&self, _: &str, _: &str) {}
    async fn connection_stats(&self, _: &str) -> Option<serde_json::Value> {
        None
    }
}

struct World {
    rt: tokio::runtime::Runtime,
    app: axum::Router,
    room: String,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let registry = Arc::new(Registry::new(signaling_api::metrics::Metrics::new(prometheus::Registry::new())));
        let cfg = ApiConfig { api_key: "k".into(), max_rooms: 100_000, ..ApiConfig::default() };
        let state = AppState::new(cfg, registry, Arc::new(Accepting));
        let app = router(state);
        let room = rt.block_on(async {
            let req = Request::post("/v1/rooms").header("authorization", "Bearer k").body(Body::empty()).unwrap();
            let resp = app.clone().oneshot(req).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            v["room_id"].as_str().unwrap().to_owned()
        });
        World { rt, app, room }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else { return };
    let w = world();
    let (method, path) = match selector % 8 {
        0 => ("POST", "/v1/rooms".to_owned()),
        1 => ("POST", format!("/v1/rooms/{}/tokens", w.room)),
        2 => ("POST", "/v1/dev/token".to_owned()),
        3 => ("POST", "/v1/rooms/r_missing/tokens".to_owned()),
        4 => ("GET", format!("/v1/rooms/{}", w.room)),
        5 => ("DELETE", "/v1/rooms/r_missing".to_owned()),
        6 => ("GET", format!("/v1/connections/{}", String::from_utf8_lossy(&body[..body.len().min(40)]).replace(['/', '?', '#', ' ', '%'], ""))),
        _ => ("PUT", "/v1/rooms".to_owned()),
    };
    let Ok(req) = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", if selector & 0x80 == 0 { "Bearer k" } else { "Bearer nope" })
        .header("content-type", "application/json")
        .body(Body::from(body.to_vec()))
    else {
        return;
    };
    w.rt.block_on(async {
        let resp = w.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(status.as_u16() < 500, "a bad request is never a server error: {status}");
        if status.is_client_error() {
            let v: serde_json::Value = serde_json::from_slice(&bytes).expect("errors are JSON");
            assert!(v["error"]["code"].is_string() && v["error"]["message"].is_string(), "error shape: {v}");
        }
    });
});
