//! Janus's VideoRoom plugin over Janus's HTTP transport, as a second target for the same
//! synthetic participants (`loadtest --target janus --janus-url URL`).
//!
//! Per participant: a Janus session (`{"janus":"create"}`) with a long-poll
//! (`GET /janus/<session>?maxev=N`) that brings every event and keeps the session alive (Janus
//! ends sessions after 60 s without a request), and one VideoRoom handle that joins as a
//! publisher — Janus tells only publisher handles about other publishers, so even a
//! subscribe-only participant joins that way (the VideoRoom demo does the same) and simply never
//! sends an offer. Publishing is `configure` with our offer (Janus's answer arrives as an event).
//! Subscribing is a second handle that joins with `ptype: "subscriber"` and
//! `streams: [{"feed": id}, …]` for every publisher known, answers Janus's offer with `start`,
//! and asks for later publishers with `subscribe` (Janus renegotiates with a new offer, answered
//! with `start` again). Candidates go in the SDPs (`trickle: false`); trickled ones from Janus
//! are taken as well.
//!
//! Every SDP and candidate from Janus is checked: one that names an address outside the
//! expected set (the address of `--janus-url` and any `--janus-media-ip`) is refused — the
//! connection fails with the address in its reason and its handle is hung up — so our peers
//! never send a packet anywhere Janus was not meant to be. (Janus's libnice gathers on every
//! interface when it is not confined; see loadtest/compare.sh for how it is run.)

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::peer::Plan;
use crate::signaling::{self, Command, ConnState, Event, Published, Role, Signaling};

const PLUGIN: &str = "janus.plugin.videoroom";
/// Events per long-poll answer at most.
const MAX_EVENTS: u32 = 16;
/// Janus answers a long-poll with a keepalive after 30 s without events.
const LONG_POLL_TIMEOUT: Duration = Duration::from_secs(45);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// A Janus server's HTTP API and the addresses its media may use.
#[derive(Clone)]
pub struct Janus {
    /// e.g. `http://10.213.0.1:8088/janus`.
    base: String,
    client: reqwest::Client,
    /// Addresses Janus's candidates may name; anything else is refused.
    expected: Vec<IpAddr>,
    /// Video codec for rooms we create (`None`: Janus's default, VP8).
    videocodec: Option<String>,
}

/// A Janus error answer (`{"janus":"error"}`) or a plugin error (`error_code`).
#[derive(Debug, thiserror::Error)]
#[error("Janus error {code}: {reason}")]
pub struct JanusError {
    pub code: i64,
    pub reason: String,
}

/// VideoRoom: the room exists already.
const ROOM_EXISTS: i64 = 427;

impl Janus {
    /// `url` is the HTTP transport's base (`…/janus`). Its host, if an IP address, is expected in
    /// candidates, and so is every address of `media_ips`; with neither there is nothing to accept.
    pub fn new(url: &str, media_ips: &[IpAddr], videocodec: Option<&str>) -> anyhow::Result<Self> {
        let base = url.trim_end_matches('/').to_owned();
        let mut expected: Vec<IpAddr> = media_ips.to_vec();
        if let Some(ip) = host_ip(&base) {
            expected.push(ip);
        }
        if expected.is_empty() {
            bail!("--janus-url {url} has no IP address as its host: name the addresses Janus's media may use with --janus-media-ip");
        }
        let client = reqwest::Client::builder().build().context("building the HTTP client")?;
        Ok(Self { base, client, expected, videocodec: videocodec.map(str::to_owned) })
    }

    pub fn expected(&self) -> &[IpAddr] {
        &self.expected
    }

    /// POST a Janus API request to `path` (below the base); a fresh transaction id is added.
    async fn post(&self, path: &str, mut body: Value) -> anyhow::Result<Value> {
        body["transaction"] = json!(transaction());
        let url = format!("{}{path}", self.base);
        let resp = self
            .client
            .post(&url)
            .timeout(REQUEST_TIMEOUT)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!("POST {url}: HTTP {status}: {text}");
        }
        let v: Value = serde_json::from_str(&text).with_context(|| format!("POST {url}: not JSON: {text}"))?;
        if v["janus"] == "error" {
            return Err(error_of(&v["error"]).into());
        }
        Ok(v)
    }

    async fn create_session(&self) -> anyhow::Result<u64> {
        let v = self.post("", json!({ "janus": "create" })).await?;
        v["data"]["id"].as_u64().ok_or_else(|| anyhow!("create: no session id in {v}"))
    }

    async fn attach(&self, session: u64) -> anyhow::Result<u64> {
        let v = self.post(&format!("/{session}"), json!({ "janus": "attach", "plugin": PLUGIN })).await?;
        v["data"]["id"].as_u64().ok_or_else(|| anyhow!("attach: no handle id in {v}"))
    }

    /// A plugin message; returns Janus's immediate answer (`ack`, or `success` with the plugin's
    /// data for synchronous requests).
    async fn message(&self, session: u64, handle: u64, body: Value, jsep: Option<Value>) -> anyhow::Result<Value> {
        let mut msg = json!({ "janus": "message", "body": body });
        if let Some(j) = jsep {
            msg["jsep"] = j;
        }
        let v = self.post(&format!("/{session}/{handle}"), msg).await?;
        if let Some(code) = v["plugindata"]["data"]["error_code"].as_i64() {
            let reason = v["plugindata"]["data"]["error"].as_str().unwrap_or("").to_owned();
            return Err(JanusError { code, reason }.into());
        }
        Ok(v)
    }

    async fn destroy_session(&self, session: u64) {
        let _ = self.post(&format!("/{session}"), json!({ "janus": "destroy" })).await;
    }

    /// A synchronous VideoRoom request on a short-lived session of its own.
    async fn control(&self, body: Value) -> anyhow::Result<Value> {
        let session = self.create_session().await?;
        let result = async {
            let handle = self.attach(session).await?;
            self.message(session, handle, body, None).await
        }
        .await;
        self.destroy_session(session).await;
        result
    }

    /// Create a VideoRoom room: `{"request":"create","room":R,"publishers":100,"bitrate":0}`
    /// (the default room allows 6 publishers at 128 kbit/s). `name` is the room number with
    /// `exact` (an existing room is joined), otherwise only a label: a random number is used.
    pub async fn create_room(&self, name: &str, exact: bool) -> anyhow::Result<u64> {
        let room: u64 = if exact {
            name.parse().map_err(|_| anyhow!("Janus rooms are numbers: --room {name}"))?
        } else {
            // Janus ids are JSON numbers: stay within what a double holds exactly.
            rand::random_range(1..(1u64 << 52))
        };
        let mut body = json!({ "request": "create", "room": room, "publishers": 100, "bitrate": 0 });
        if let Some(codec) = &self.videocodec {
            body["videocodec"] = json!(codec);
        }
        match self.control(body).await {
            Ok(_) => Ok(room),
            Err(e) if exact && e.downcast_ref::<JanusError>().is_some_and(|j| j.code == ROOM_EXISTS) => Ok(room),
            Err(e) => Err(e.context(format!("creating Janus room {room}"))),
        }
    }

    /// Destroy a room (best effort).
    pub async fn destroy_room(&self, room: u64) {
        let _ = self.control(json!({ "request": "destroy", "room": room })).await;
    }

    /// A participant's session: created and attached here, then its driver and long-poll run
    /// as tasks until the participant drops its end of the channels (or sends `Leave`).
    pub async fn connect(&self, plan: &Plan) -> anyhow::Result<Signaling> {
        let room: u64 = plan.room_id.parse().map_err(|_| anyhow!("not a Janus room: {}", plan.room_id))?;
        let session = self.create_session().await?;
        let handle = match self.attach(session).await {
            Ok(h) => h,
            Err(e) => {
                self.destroy_session(session).await;
                return Err(e);
            }
        };
        let (sig, commands, events) = Signaling::channels();
        let (poll_tx, poll_rx) = mpsc::unbounded_channel();
        let poller = tokio::spawn(long_poll(self.clone(), session, poll_tx));
        let driver = Driver {
            janus: self.clone(),
            session,
            room,
            name: plan.name.clone(),
            pub_handle: handle,
            sub_handle: None,
            feeds: Vec::new(),
            subscribed: HashSet::new(),
            sub: SubState::Off,
            pending: Vec::new(),
            publishing: false,
            events,
        };
        tokio::spawn(async move {
            driver.run(commands, poll_rx).await;
            poller.abort();
        });
        Ok(sig)
    }
}

/// Events of a session, as Janus's long-poll hands them out, until it fails.
async fn long_poll(janus: Janus, session: u64, out: mpsc::UnboundedSender<Result<Value, String>>) {
    let url = format!("{}/{session}", janus.base);
    loop {
        let resp = janus
            .client
            .get(&url)
            .query(&[("maxev", MAX_EVENTS.to_string()), ("rid", transaction())])
            .timeout(LONG_POLL_TIMEOUT)
            .send()
            .await;
        let v: Value = match resp {
            Ok(r) => match r.json().await {
                Ok(v) => v,
                Err(e) => {
                    let _ = out.send(Err(format!("long-poll: {e}")));
                    return;
                }
            },
            Err(e) => {
                let _ = out.send(Err(format!("long-poll: {e}")));
                return;
            }
        };
        let list = match v {
            Value::Array(a) => a,
            other => vec![other],
        };
        for ev in list {
            if ev["janus"] == "error" {
                let _ = out.send(Err(format!("long-poll: {}", error_of(&ev["error"]))));
                return;
            }
            if out.send(Ok(ev)).is_err() {
                return;
            }
        }
    }
}

/// Where our subscription is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SubState {
    /// Not asked for.
    Off,
    /// Asked for; no publisher to join with yet.
    Wanted,
    /// `join` sent, Janus's first offer not yet here.
    Joining,
    /// Joined: later publishers are added with `subscribe`.
    Joined,
}

/// One participant's Janus signaling.
struct Driver {
    janus: Janus,
    session: u64,
    room: u64,
    name: String,
    /// The handle that joins as a publisher (and publishes, if the participant does).
    pub_handle: u64,
    sub_handle: Option<u64>,
    /// Publishers (feed ids) seen in the room, in order.
    feeds: Vec<u64>,
    /// Feeds our subscription has asked for.
    subscribed: HashSet<u64>,
    sub: SubState,
    /// Feeds to add once the subscription's `join` has been answered.
    pending: Vec<u64>,
    publishing: bool,
    events: mpsc::UnboundedSender<Event>,
}

impl Driver {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut polled: mpsc::UnboundedReceiver<Result<Value, String>>,
    ) {
        let join = json!({ "request": "join", "ptype": "publisher", "room": self.room, "display": self.name });
        if let Err(e) = self.janus.message(self.session, self.pub_handle, join, None).await {
            self.emit(Event::Closed(Some(format!("join: {e:#}"))));
            self.janus.destroy_session(self.session).await;
            return;
        }
        let error = loop {
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    None | Some(Command::Leave) => break None,
                    Some(cmd) => if let Err(e) = self.on_command(cmd).await {
                        break Some(format!("{e:#}"));
                    },
                },
                ev = polled.recv() => match ev {
                    Some(Ok(v)) => if let Err(e) = self.on_janus(&v).await {
                        break Some(format!("{e:#}"));
                    },
                    Some(Err(e)) => break Some(e),
                    None => break Some("long-poll ended".into()),
                },
            }
        };
        // Destroying the session hangs up and detaches every handle (and leaves the room).
        self.janus.destroy_session(self.session).await;
        self.emit(Event::Closed(error));
    }

    fn emit(&self, ev: Event) {
        let _ = self.events.send(ev);
    }

    fn state(&self, role: Role, state: ConnState) {
        self.emit(Event::Connection { role, state, at: signaling::now_stamp(), connection_id: None });
    }

    fn role_of(&self, handle: Option<u64>) -> Option<Role> {
        match handle {
            Some(h) if h == self.pub_handle => Some(Role::Publish),
            Some(h) if Some(h) == self.sub_handle => Some(Role::Subscribe),
            _ => None,
        }
    }

    fn handle_of(&self, role: Role) -> Option<u64> {
        match role {
            Role::Publish => Some(self.pub_handle),
            Role::Subscribe => self.sub_handle,
        }
    }

    async fn on_command(&mut self, cmd: Command) -> anyhow::Result<()> {
        match cmd {
            Command::Publish { sdp } => {
                self.publishing = true;
                self.state(Role::Publish, ConnState::Initial);
                let jsep = json!({ "type": "offer", "sdp": sdp, "trickle": false });
                let body = json!({ "request": "configure", "audio": true, "video": true });
                if let Err(e) = self.janus.message(self.session, self.pub_handle, body, Some(jsep)).await {
                    self.state(Role::Publish, ConnState::Failed(format!("configure: {e:#}")));
                }
            }
            Command::Subscribe => {
                self.sub_handle = Some(self.janus.attach(self.session).await?);
                self.sub = SubState::Wanted;
                let feeds = self.feeds.clone();
                self.subscribe_to(feeds).await;
            }
            Command::Answer { sdp } => {
                let Some(handle) = self.sub_handle else { return Ok(()) };
                let jsep = json!({ "type": "answer", "sdp": sdp, "trickle": false });
                if let Err(e) =
                    self.janus.message(self.session, handle, json!({ "request": "start" }), Some(jsep)).await
                {
                    self.state(Role::Subscribe, ConnState::Failed(format!("start: {e:#}")));
                }
                // Feeds that came while Janus's offer was on its way.
                let pending = std::mem::take(&mut self.pending);
                self.subscribe_to(pending).await;
            }
            Command::Leave => {}
        }
        Ok(())
    }

    /// Receive these publishers' streams (the ones not asked for yet).
    async fn subscribe_to(&mut self, feeds: Vec<u64>) {
        let new: Vec<u64> = feeds.into_iter().filter(|f| !self.subscribed.contains(f)).collect();
        if new.is_empty() {
            return;
        }
        let Some(handle) = self.sub_handle else { return };
        let streams: Vec<Value> = new.iter().map(|f| json!({ "feed": f })).collect();
        let result = match self.sub {
            SubState::Off => return,
            SubState::Joining => {
                for f in new {
                    if !self.pending.contains(&f) {
                        self.pending.push(f);
                    }
                }
                return;
            }
            SubState::Wanted => {
                self.sub = SubState::Joining;
                self.emit(Event::Requested { role: Role::Subscribe });
                self.state(Role::Subscribe, ConnState::Initial);
                let body = json!({ "request": "join", "ptype": "subscriber", "room": self.room, "streams": streams });
                self.janus.message(self.session, handle, body, None).await
            }
            SubState::Joined => {
                self.janus
                    .message(self.session, handle, json!({ "request": "subscribe", "streams": streams }), None)
                    .await
            }
        };
        self.subscribed.extend(&new);
        if let Err(e) = result {
            self.state(Role::Subscribe, ConnState::Failed(format!("subscribe: {e:#}")));
        }
    }

    /// One event from the long-poll.
    async fn on_janus(&mut self, v: &Value) -> anyhow::Result<()> {
        let sender = v["sender"].as_u64();
        let role = self.role_of(sender);
        match v["janus"].as_str().unwrap_or("") {
            "event" => {
                let data = &v["plugindata"]["data"];
                match role {
                    Some(Role::Publish) => self.on_publisher_event(data, &v["jsep"]).await?,
                    Some(Role::Subscribe) => self.on_subscriber_event(data, &v["jsep"]).await,
                    None => {}
                }
            }
            "webrtcup" => {
                if let Some(role) = role {
                    self.state(role, ConnState::Ready);
                }
            }
            "hangup" => {
                if let Some(role) = role {
                    let reason = v["reason"].as_str().unwrap_or("hangup");
                    self.state(role, ConnState::Failed(format!("hangup: {reason}")));
                }
            }
            "trickle" => {
                let Some(role) = role else { return Ok(()) };
                let c = &v["candidate"];
                if c["completed"] == true {
                    return Ok(());
                }
                let Some(text) = c["candidate"].as_str() else { return Ok(()) };
                match signaling::candidate_address(text) {
                    Some(a) if a.parse::<IpAddr>().is_ok_and(|ip| self.janus.expected.contains(&ip)) => {
                        self.emit(Event::Candidate { role, candidate: text.to_owned() });
                    }
                    other => self.refuse(role, &[other.unwrap_or(text).to_owned()]).await,
                }
            }
            // media, slowlink, detached, keepalive: nothing to do.
            _ => {}
        }
        Ok(())
    }

    async fn on_publisher_event(&mut self, data: &Value, jsep: &Value) -> anyhow::Result<()> {
        if let Some(code) = data["error_code"].as_i64() {
            let e = JanusError { code, reason: data["error"].as_str().unwrap_or("").to_owned() };
            if self.publishing {
                self.state(Role::Publish, ConnState::Failed(e.to_string()));
                return Ok(());
            }
            return Err(e.into());
        }
        let mut added = Vec::new();
        let mut new_feeds = Vec::new();
        for p in data["publishers"].as_array().into_iter().flatten() {
            let Some(feed) = p["id"].as_u64() else { continue };
            if !self.feeds.contains(&feed) {
                self.feeds.push(feed);
                new_feeds.push(feed);
            }
            let display = p["display"].as_str().unwrap_or("").to_owned();
            for s in p["streams"].as_array().into_iter().flatten() {
                if let Some(mid) = s["mid"].as_str() {
                    added.push(published(feed, mid, &display));
                }
            }
        }
        if data["videoroom"] == "joined" {
            self.emit(Event::Joined { streams: added });
        } else {
            for p in added {
                self.emit(Event::StreamAdded(p));
            }
        }
        if jsep["type"] == "answer" {
            let sdp = jsep["sdp"].as_str().unwrap_or("");
            let bad = signaling::unexpected_candidates(sdp, &self.janus.expected);
            if bad.is_empty() {
                self.emit(Event::Answer { sdp: sdp.to_owned() });
            } else {
                self.refuse(Role::Publish, &bad).await;
            }
        }
        self.subscribe_to(new_feeds).await;
        Ok(())
    }

    async fn on_subscriber_event(&mut self, data: &Value, jsep: &Value) {
        if let Some(code) = data["error_code"].as_i64() {
            let e = JanusError { code, reason: data["error"].as_str().unwrap_or("").to_owned() };
            self.state(Role::Subscribe, ConnState::Failed(e.to_string()));
            return;
        }
        if jsep["type"] != "offer" {
            return;
        }
        if self.sub == SubState::Joining {
            self.sub = SubState::Joined;
        }
        let sdp = jsep["sdp"].as_str().unwrap_or("");
        let bad = signaling::unexpected_candidates(sdp, &self.janus.expected);
        if !bad.is_empty() {
            self.refuse(Role::Subscribe, &bad).await;
            return;
        }
        let streams = data["streams"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| {
                let mid = s["mid"].as_str()?;
                let feed = s["feed_id"].as_u64()?;
                let p = published(feed, s["feed_mid"].as_str()?, s["feed_display"].as_str().unwrap_or(""));
                Some((mid.to_owned(), p))
            })
            .collect();
        self.emit(Event::Offer { sdp: sdp.to_owned(), streams });
    }

    /// Janus named an address we did not expect: fail the connection and hang its handle up, so
    /// our peer never learns the address.
    async fn refuse(&mut self, role: Role, addresses: &[String]) {
        self.state(
            role,
            ConnState::Failed(format!(
                "refused: Janus named candidate address(es) {} outside the expected {:?}",
                addresses.join(", "),
                self.janus.expected
            )),
        );
        if let Some(handle) = self.handle_of(role) {
            let _ = self.janus.post(&format!("/{}/{handle}", self.session), json!({ "janus": "hangup" })).await;
        }
        if role == Role::Subscribe {
            self.sub = SubState::Off;
        }
    }
}

fn published(feed: u64, mid: &str, display: &str) -> Published {
    Published { stream_id: format!("{feed}:{mid}"), participant: display.to_owned(), mid: mid.to_owned() }
}

fn error_of(e: &Value) -> JanusError {
    JanusError { code: e["code"].as_i64().unwrap_or(0), reason: e["reason"].as_str().unwrap_or("").to_owned() }
}

fn transaction() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// The host of an `http://host:port/…` URL, if it is an IP address.
fn host_ip(url: &str) -> Option<IpAddr> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next()?.parse().ok();
    }
    authority.split(':').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_host_is_expected() {
        let j = Janus::new("http://10.213.0.1:8088/janus/", &[], None).unwrap();
        assert_eq!(j.expected(), &["10.213.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(j.base, "http://10.213.0.1:8088/janus");
        assert!(Janus::new("http://janus.example:8088/janus", &[], None).is_err());
        let extra: IpAddr = "10.213.0.9".parse().unwrap();
        assert_eq!(Janus::new("http://janus.example/janus", &[extra], None).unwrap().expected(), &[extra]);
        assert_eq!(host_ip("http://[::1]:8088/janus"), Some("::1".parse().unwrap()));
    }
}
