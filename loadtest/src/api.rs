//! The gateway's REST API as an app backend uses it (API key): rooms, join tokens, metrics.

use anyhow::{bail, Context};
use serde_json::{json, Value};
use signaling_api::protocol::{RoomCreated, RoomList, TokenResponse};

#[derive(Clone)]
pub struct Api {
    base: String,
    key: String,
    client: reqwest::Client,
}

impl Api {
    pub fn new(base: &str, key: &str) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(20))
            .build()
            .context("building the HTTP client")?;
        Ok(Self { base: base.trim_end_matches('/').to_owned(), key: key.to_owned(), client })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!("POST {path}: HTTP {status}: {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("POST {path}: not JSON: {text}"))
    }

    /// `POST /v1/rooms`.
    pub async fn create_room(&self, name: &str, max_participants: u32) -> anyhow::Result<String> {
        let v = self.post("/v1/rooms", json!({ "name": name, "max_participants": max_participants })).await?;
        let room: RoomCreated = serde_json::from_value(v)?;
        Ok(room.room_id)
    }

    /// `POST /v1/rooms/{id}/tokens`.
    pub async fn token(&self, room: &str, participant: &str, publish: bool, subscribe: bool) -> anyhow::Result<String> {
        let body = json!({ "participant": participant, "can_publish": publish, "can_subscribe": subscribe });
        let v = self.post(&format!("/v1/rooms/{room}/tokens"), body).await?;
        let t: TokenResponse = serde_json::from_value(v)?;
        Ok(t.token)
    }

    /// The id of the room with this name (`GET /v1/rooms`), if there is one.
    pub async fn room_by_name(&self, name: &str) -> anyhow::Result<Option<String>> {
        let resp = self.client.get(format!("{}/v1/rooms", self.base)).bearer_auth(&self.key).send().await?;
        let list: RoomList = resp.error_for_status()?.json().await?;
        Ok(list.rooms.into_iter().find(|r| r.name.as_deref() == Some(name)).map(|r| r.room_id))
    }

    /// Create the room, or use the one that already has this name.
    pub async fn create_or_find_room(&self, name: &str, max_participants: u32) -> anyhow::Result<String> {
        match self.create_room(name, max_participants).await {
            Ok(id) => Ok(id),
            Err(e) => match self.room_by_name(name).await {
                Ok(Some(id)) => Ok(id),
                _ => Err(e),
            },
        }
    }

    /// `DELETE /v1/rooms/{id}` (best effort, at the end of a run).
    pub async fn delete_room(&self, room: &str) {
        let _ = self.client.delete(format!("{}/v1/rooms/{room}", self.base)).bearer_auth(&self.key).send().await;
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let resp = self.client.get(format!("{}/metrics", self.base)).send().await?;
        Ok(resp.text().await?)
    }

    pub fn ws_url(&self, token: &str) -> String {
        let ws = if let Some(rest) = self.base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else {
            format!("ws://{}", self.base.trim_start_matches("http://"))
        };
        format!("{ws}/v1/ws?token={}", urlencode(token))
    }
}

/// Percent-encode everything outside the URL-safe set (a JWT only has `.`, `-`, `_`).
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The sum of a Prometheus series' samples whose labels contain every `label="value"` given.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else { continue };
        let (series_labels, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once('}') {
                Some((l, v)) => (l, v),
                None => continue,
            },
            None if rest.starts_with(' ') => ("", rest),
            None => continue,
        };
        if !labels.iter().all(|l| series_labels.split(',').any(|x| x == *l)) {
            continue;
        }
        if let Ok(v) = value.trim().parse::<f64>() {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_lines_are_summed_by_label() {
        let text = "# HELP x\ngateway_rtp_packets_total{direction=\"out\",kind=\"audio\"} 5\n\
                    gateway_rtp_packets_total{direction=\"out\",kind=\"video\"} 7\n\
                    gateway_rtp_packets_total{direction=\"in\",kind=\"video\"} 100\n\
                    process_cpu_seconds_total 1.5\n";
        assert_eq!(metric_sum(text, "gateway_rtp_packets_total", &["direction=\"out\""]), Some(12.0));
        assert_eq!(metric_sum(text, "process_cpu_seconds_total", &[]), Some(1.5));
        assert_eq!(metric_sum(text, "process_cpu", &[]), None);
    }

    #[test]
    fn ws_url_from_http_base() {
        let api = Api::new("http://127.0.0.1:8080/", "k").unwrap();
        assert_eq!(api.ws_url("a.b-c"), "ws://127.0.0.1:8080/v1/ws?token=a.b-c");
    }
}
