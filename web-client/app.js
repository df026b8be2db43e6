// Browser client of the gateway: join a room, publish camera + microphone on a publish
// connection, receive everyone else on a subscribe connection the gateway (re)offers, show who
// is muted, who has the camera off and who is speaking, and come back by itself when the
// WebSocket drops or the gateway restarts. Speaks the WebSocket API of docs/api.md §3 and its
// extensions (§6; docs/protocol.md).

const $ = (id) => document.getElementById(id);

// Everything the page knows; also what the browser tests inspect (window.gw).
const gw = {
  ws: null,
  roomId: null,
  room: null, // the room's name, as typed
  me: null, // this page's participant id (an ASCII identifier, never shown)
  name: null, // this page's display name (any script)
  localStream: null,
  pub: { pc: null, id: null, pendingCandidates: [] },
  sub: { pc: null, id: null, queue: Promise.resolve() },
  participants: new Map(), // participant_id -> { name, tile, video, stream, ... }
  streams: new Map(), // stream_id -> stream info (stream_added, with `muted`)
  connections: new Map(), // connection_id -> { role, state, code, steps: [] } (this session only)
  events: [], // every message received, in order
  speakers: [], // participant ids the gateway last reported speaking, loudest first
  left: false,
  // "lobby" | "joining" | "in-call" | "reconnecting" | "replaced"
  status: "lobby",
  reconnect: { since: 0, attempts: 0, run: 0 },
  // Options of the page; tests may change them before joining. `?simulcast=1` publishes the
  // camera as three simulcast layers and shows a layer picker on every remote tile; `?layers=1`
  // shows only the pickers.
  options: {},
  layerChoices: new Map(), // stream_id -> rid asked for with set_layer (null: automatic)
};
window.gw = gw;
const params = new URLSearchParams(location.search);
gw.options.simulcast = params.get("simulcast") === "1";
gw.options.layers = gw.options.simulcast || params.get("layers") === "1";
gw.options.codec = params.get("codec");
// `?recvCodecs=h264` (comma-separated): the video codecs this page accepts to receive, as a
// browser that cannot decode the others would (setCodecPreferences on every receiving video
// transceiver). A stream in another codec is then declined and the gateway says why.
gw.options.recvCodecs = params.get("recvCodecs") ? params.get("recvCodecs").split(",") : null;
// `?data=1`: data messages. The publish connection opens two data channels, `data` (reliable,
// ordered) and `data-unreliable` (unordered, no retransmissions); `gw.sendData(text, { reliable })`
// sends on one of them. The gateway relays each message to every other participant on its own
// channels of the subscribe connection (`gateway`, `gateway-unreliable`), wrapped as
// `{ participant_id, label, binary, data }` (docs/protocol.md, "Data channels"); they land in
// `gw.dataReceived` (the last 1000, each with `reliable`) and are passed to `gw.onData` if set.
gw.options.data = params.get("data") === "1";
gw.dataReceived = [];
gw.sendData = (text, { reliable = true } = {}) => {
  const ch = reliable ? gw.pub.data : gw.pub.dataUnreliable;
  if (!ch || ch.readyState !== "open") return false;
  ch.send(text);
  return true;
};
// Reconnect: first retry after `retryMs`, doubling up to `retryMaxMs` (each ±25%), giving up
// after `giveUpMs` without getting back in.
gw.options.retryMs = 500;
gw.options.retryMaxMs = 5000;
gw.options.giveUpMs = 60000;
// ICE restart (docs/protocol.md "ICE restart"): when a connection's ICE goes `failed`, or stays
// `disconnected` for `iceRestartAfterMs` (`?iceRestartAfterMs=`), the page restarts ICE on it
// and stays in the call: the publish connection offers new credentials (`pc.restartIce()`, a
// new `publish` offer on the same connection), the subscribe connection asks the gateway
// (`restart_ice`), which offers new ones. Again every `iceRestartRetryMs` while it has not
// recovered. Each restart is noted in `gw.iceRestarts` ({ role, at, state }), each ICE state
// change in `gw.iceStates`.
gw.options.iceRestartAfterMs = Number(params.get("iceRestartAfterMs") || 1000);
gw.options.iceRestartRetryMs = 2500;
// Chromium calls ICE disconnected only ~6 s after the path died (five unanswered checks), so
// the page also watches what its publish connection receives: while it sends media the gateway
// answers with RTCP feedback many times a second, whatever the others do. Steady feedback, then
// nothing for `mediaStallMs`: the path is gone, and both connections restart at once
// (`?mediaStallMs=`; 0 turns this off).
gw.options.mediaStallMs = Number(params.get("mediaStallMs") ?? 1000);
gw.iceRestarts = [];
gw.iceStates = []; // { role, state, at }: the last 100 ICE state changes

// The simulcast encodings of the camera, lowest first. With Chromium's fake 640x480 camera they
// are 160x120, 320x240 and 640x480.
const SIMULCAST_ENCODINGS = [
  { rid: "q", scaleResolutionDownBy: 4 },
  { rid: "h", scaleResolutionDownBy: 2 },
  { rid: "f", scaleResolutionDownBy: 1 },
];
const LAYER_LABELS = { q: "Low", h: "Medium", f: "High" };
gw.simulcastRids = SIMULCAST_ENCODINGS.map((e) => e.rid);

// ICE servers and transport policy of both peer connections. None by default: the gateway is
// ICE-lite on an address clients can reach, so a browser needs neither STUN nor TURN. A client
// whose network lets UDP out only to a TURN server gets them from the page URL (URL-encoded JSON
// array of RTCIceServer; the policy is "all" or "relay"):
//   /?iceServers=[{"urls":"turn:turn.example.org:3478","username":"u","credential":"p"}]&iceTransportPolicy=relay
// or from an embedding page, by setting window.gw.options before joining. Otherwise, when the
// gateway hands out TURN servers with credentials minted for this participant (`ice_servers` of
// the token, with `turn.urls` and `turn.secret` set), the page uses those.
gw.options.iceServers = [];
gw.options.iceTransportPolicy = "all";
if (params.get("iceServers")) {
  try {
    const servers = JSON.parse(params.get("iceServers"));
    gw.options.iceServers = Array.isArray(servers) ? servers : [servers];
  } catch (e) {
    gw.options.problem = `The iceServers setting in the address is not valid JSON (${e.message}); the page uses none.`;
  }
}
if (["all", "relay"].includes(params.get("iceTransportPolicy"))) gw.options.iceTransportPolicy = params.get("iceTransportPolicy");

function rtcConfiguration() {
  return {
    bundlePolicy: "max-bundle",
    rtcpMuxPolicy: "require",
    iceServers: gw.options.iceServers || [],
    iceTransportPolicy: gw.options.iceTransportPolicy || "all",
  };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------------------------------------
// Names, identity and what survives a reload
// ---------------------------------------------------------------------------------------------

// The display name is what people see (any script, spaces, up to 128 characters); the
// participant id is what the gateway keys on (ASCII, safe in URLs and SDP). The id is made once
// per browser tab and kept in sessionStorage, so a reload comes back as the same participant
// (replacing its old session instead of leaving a ghost) while a second tab, even with the same
// name, is someone else. `?id=` sets it (an embedding app or a test that wants a known id).
const NAME_MAX = 128;
const ROOM_MAX = 64;
const ID_RE = /^[A-Za-z0-9._+-]{1,64}$/;
const CONTROL_RE = /\p{Cc}/u;
const chars = (s) => [...s].length;

function store(kind) {
  try {
    return kind === "session" ? window.sessionStorage : window.localStorage;
  } catch {
    return null;
  }
}
function remember(kind, key, value) {
  try {
    const s = store(kind);
    if (s) value === null ? s.removeItem(key) : s.setItem(key, value);
  } catch {}
}
function recall(kind, key) {
  try {
    const s = store(kind);
    return s ? s.getItem(key) : null;
  } catch {
    return null;
  }
}

/** A readable ASCII slug of a display name ("Zoë Ann" -> "zoe-ann"), possibly empty. */
function slug(name) {
  return name
    .normalize("NFKD")
    .replace(/[\u0300-\u036f]/g, "")
    .toLowerCase()
    .replace(/[^a-z0-9]+/g, "-")
    .replace(/^-+|-+$/g, "")
    .slice(0, 24);
}

function participantIdFor(name) {
  const fromUrl = params.get("id");
  if (fromUrl && ID_RE.test(fromUrl)) return fromUrl;
  let id = recall("session", "gw.participantId");
  if (!id || !ID_RE.test(id)) {
    const rand = Array.from(crypto.getRandomValues(new Uint8Array(5)), (b) => b.toString(36).padStart(2, "0")).join("").slice(0, 8);
    id = `${slug(name) || "guest"}-${rand}`;
    remember("session", "gw.participantId", id);
  }
  return id;
}

/** What is wrong with a typed name or room name, in words, or null. */
function checkName(value, what, max) {
  if (!value) return `Type ${what}.`;
  if (CONTROL_RE.test(value)) return `${what[0].toUpperCase()}${what.slice(1)} cannot contain control characters.`;
  const n = chars(value);
  if (n > max) return `${what[0].toUpperCase()}${what.slice(1)} can be at most ${max} characters; this one has ${n}.`;
  return null;
}

/** The room in the address bar, so a reload or a shared link lands in the same room. */
function putRoomInUrl(room) {
  const u = new URL(location.href);
  u.searchParams.set("room", room);
  u.searchParams.delete("name");
  history.replaceState(null, "", u);
}

// ---------------------------------------------------------------------------------------------
// Plain-language errors
// ---------------------------------------------------------------------------------------------

/** An error the page can explain: `text` for people, `code` for experts, `transient` to retry. */
class JoinError extends Error {
  constructor(text, { code = null, transient = false, action = null } = {}) {
    super(text);
    this.code = code;
    this.transient = transient;
    this.action = action;
  }
}

// What a refusal of the gateway means for the person in front of the page, and what to do.
// Codes are the contract's (docs/api.md); `transient` ones are retried while reconnecting.
const EXPLAIN = {
  room_full: ["This room is full. Try again later, or pick another room name.", false],
  conflict: ["The meeting server is restarting. The page will try again in a moment.", true],
  unauthorized: ["The invitation to this room was not accepted (it may have expired). Join again.", true],
  forbidden: ["You are not allowed to do that in this room.", false],
  not_found: ["This room no longer exists. Join again to start it anew.", true],
  bad_request: ["The server did not accept that request.", false],
  bad_sdp: ["The server could not use this browser's media settings. Try a current Chrome or Firefox.", false],
  rate_limited: ["Too many attempts in a short time. Wait a few seconds and try again.", true],
  no_ports: ["The meeting server is out of capacity right now. Try again in a minute.", true],
  payload_too_large: ["The request was too large for the server.", false],
  internal: ["Something went wrong on the meeting server. Try again.", true],
};

// What a refusal during the call (an `error` message) means for the person.
const IN_CALL_ERRORS = {
  forbidden: "You can watch and listen in this room, but not send your camera or microphone.",
  bad_sdp: "The server could not use this browser's media settings; the others may not see or hear you. Try a current Chrome or Firefox.",
  no_ports: "The meeting server is out of capacity; the others may not see or hear you. Leave and join again in a minute.",
  rate_limited: "Too many requests in a short time; wait a few seconds.",
  internal: "Something went wrong on the meeting server. If the call does not work, leave and join again.",
};

function explain(code, fallback) {
  const e = EXPLAIN[code];
  return new JoinError(e ? e[0] : fallback || "The meeting server refused to let this page in. Try again.", { code, transient: e ? e[1] : true });
}

const UNREACHABLE = "Cannot reach the meeting server. Check your network connection and that the server is running, then try again.";

/** What a failed getUserMedia means, in words, with what to do about it. */
function explainMedia(e) {
  const action = { label: "Join without camera and microphone", run: () => submitJoin({ media: false }) };
  switch (e && e.name) {
    case "NotAllowedError":
    case "SecurityError":
      return new JoinError(
        "The browser blocked the camera and microphone for this page. Allow them in the site settings (the camera icon at the left of the address bar), then press Join again.",
        { code: e.name, action },
      );
    case "NotFoundError":
    case "OverconstrainedError":
      return new JoinError("No camera or microphone was found. Plug one in and press Join again, or join without.", { code: e.name, action });
    case "NotReadableError":
    case "AbortError":
      return new JoinError("The camera or microphone is in use by another program. Close it and press Join again, or join without.", { code: e.name, action });
    default:
      return new JoinError(`The camera and microphone could not be started (${e && e.message}).`, { code: e && e.name, action });
  }
}

// ---------------------------------------------------------------------------------------------
// UI helpers
// ---------------------------------------------------------------------------------------------

function toast(text, ms = 5000) {
  const t = $("toast");
  t.textContent = text;
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (t.hidden = true), ms);
}

function activity(text) {
  const li = document.createElement("li");
  const time = document.createElement("time");
  time.textContent = new Date().toLocaleTimeString([], { hour12: false });
  li.append(time, text);
  $("activity").append(li);
  while ($("activity").children.length > 60) $("activity").firstChild.remove();
}

/** Banner over the call: "Reconnecting…", "You joined from another tab", … */
function banner(text, { action = null, leave = false, bad = false } = {}) {
  const b = $("banner");
  if (!text) {
    b.hidden = true;
    return;
  }
  $("banner-text").textContent = text;
  b.classList.toggle("bad", bad);
  const a = $("banner-action");
  a.hidden = !action;
  if (action) {
    a.textContent = action.label;
    a.onclick = action.run;
  }
  $("banner-leave").hidden = !leave;
  b.hidden = false;
}

function lobbyError(err) {
  const box = $("join-error");
  if (!err) {
    box.hidden = true;
    return;
  }
  $("join-error-text").textContent = err.message;
  box.dataset.code = err.code || "";
  const a = $("join-error-action");
  a.hidden = !err.action;
  if (err.action) {
    a.textContent = err.action.label;
    a.onclick = err.action.run;
  }
  box.hidden = false;
}

const graphemes = (s) => (Intl.Segmenter ? [...new Intl.Segmenter().segment(s)].map((x) => x.segment) : [...s]);

/** "Zoë 山田" -> "Z山", "alice" -> "A". */
function initials(name) {
  const words = (name || "?").trim().split(/\s+/).filter(Boolean);
  if (!words.length) return "?";
  const first = graphemes(words[0])[0];
  const last = words.length > 1 ? graphemes(words[words.length - 1])[0] : "";
  return (first + last).toLocaleUpperCase();
}

function colorOf(id) {
  let h = 0;
  for (const c of id) h = (h * 31 + c.codePointAt(0)) >>> 0;
  return `hsl(${h % 360} 45% 38%)`;
}

function displayName(pid) {
  if (pid === gw.me) return gw.name;
  const p = gw.participants.get(pid);
  return (p && p.name) || "Someone";
}

function tileFor(pid, name, local = false) {
  let p = gw.participants.get(pid);
  if (p && p.tile) {
    if (name && name !== p.name) setTileName(p, name);
    return p;
  }
  const tile = document.createElement("div");
  tile.className = "tile" + (local ? " local" : "");
  tile.dataset.participant = pid;
  tile.setAttribute("role", "listitem");
  const video = document.createElement("video");
  video.autoplay = true;
  video.playsInline = true;
  video.muted = local;
  const avatar = document.createElement("div");
  avatar.className = "avatar";
  avatar.setAttribute("role", "img");
  const circle = document.createElement("span");
  circle.setAttribute("aria-hidden", "true");
  circle.style.setProperty("--avatar", colorOf(pid));
  avatar.append(circle);
  const label = document.createElement("div");
  label.className = "label";
  const nameEl = document.createElement("span");
  nameEl.className = "name";
  const micOff = document.createElement("span");
  micOff.className = "mic-off";
  micOff.setAttribute("role", "img");
  label.append(micOff, nameEl);
  if (local) {
    const you = document.createElement("span");
    you.className = "you";
    you.textContent = "(you)";
    label.append(you);
  }
  const note = document.createElement("div");
  note.className = "note";
  note.hidden = true;
  tile.append(video, avatar, note, label);
  p = { name, tile, video, avatar: circle, nameEl, micOff, note, local, stream: new MediaStream() };
  setTileName(p, name);
  if (!local && gw.options.layers) addLayerPicker(pid, p);
  $("grid").append(tile);
  gw.participants.set(pid, p);
  updateCount();
  renderTile(pid);
  layoutGrid();
  return p;
}

function setTileName(p, name) {
  p.name = name;
  const shown = name || "Someone";
  p.nameEl.textContent = shown;
  p.nameEl.title = shown;
  p.avatar.textContent = initials(shown);
  p.avatar.parentElement.setAttribute("aria-label", p.local ? "Your camera is off" : `${shown}, camera off`);
  p.video.setAttribute("aria-label", p.local ? `Your camera (${shown})` : `Video of ${shown}`);
  p.micOff.setAttribute("aria-label", p.local ? "Your microphone is muted" : `${shown}'s microphone is muted`);
  p.tile.setAttribute("aria-label", p.local ? `${shown} (you)` : shown);
  if (p.picker) p.picker.setAttribute("aria-label", `Video quality of ${shown}`);
}

/** The streams `pid` publishes now, by kind. */
function streamsOf(pid) {
  const out = {};
  for (const s of gw.streams.values()) if (s.participant_id === pid) out[s.kind] = s;
  return out;
}

/**
 * Show what a participant really sends: video (or the avatar when the camera is off or there is
 * none), the muted-mic mark, and the speaking ring.
 */
function renderTile(pid) {
  const p = gw.participants.get(pid);
  if (!p) return;
  let videoOn;
  let micMuted;
  if (p.local) {
    const v = gw.localStream && gw.localStream.getVideoTracks()[0];
    const a = gw.localStream && gw.localStream.getAudioTracks()[0];
    videoOn = !!v && v.readyState === "live" && v.enabled;
    micMuted = !a || a.readyState !== "live" || !a.enabled;
  } else {
    const s = streamsOf(pid);
    const track = p.stream.getVideoTracks().find((t) => t.readyState === "live");
    videoOn = !!s.video && !s.video.muted && !s.video.unavailable && !!track;
    micMuted = !s.audio || !!s.audio.muted;
  }
  p.tile.classList.toggle("has-video", videoOn);
  // Without a picture the avatar stands for the person (to assistive technology too).
  if (videoOn) p.video.removeAttribute("aria-hidden");
  else p.video.setAttribute("aria-hidden", "true");
  p.avatar.parentElement.setAttribute("aria-hidden", String(videoOn));
  p.tile.classList.toggle("camera-off", !videoOn);
  p.tile.classList.toggle("mic-muted", micMuted);
  // The gateway's list trails a mute by its loudness window: a muted mic is never ringed.
  const speaking = gw.speakers.includes(pid) && !micMuted;
  p.tile.classList.toggle("speaking", speaking);
  p.tile.dataset.speaking = String(speaking);
}

function renderAllTiles() {
  for (const pid of gw.participants.keys()) renderTile(pid);
}

// ---------------------------------------------------------------------------------------------
// Layout: the largest tiles that fit the stage, in rows, centred.
// ---------------------------------------------------------------------------------------------

const TILE_MIN_W = 96;
function layoutGrid() {
  const grid = $("grid");
  const tiles = grid.querySelectorAll(".tile");
  const n = tiles.length;
  if (!n || grid.clientWidth === 0) return;
  const cs = getComputedStyle(grid);
  const gap = parseFloat(cs.columnGap) || 0;
  const W = grid.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
  const H = grid.clientHeight - parseFloat(cs.paddingTop) - parseFloat(cs.paddingBottom);
  // Tiles may be anything from portrait 3:4 (phones) to 16:9; landscape screens keep them at
  // least square. The video fills its tile (object-fit: cover).
  const minAspect = W >= H ? 1 : 3 / 4;
  const maxAspect = 16 / 9;
  let best = null;
  for (let cols = 1; cols <= n; cols++) {
    const rows = Math.ceil(n / cols);
    let w = (W - (cols - 1) * gap) / cols;
    let h = (H - (rows - 1) * gap) / rows;
    if (w <= 0 || h <= 0) continue;
    if (w / h > maxAspect) w = h * maxAspect;
    if (w / h < minAspect) h = w / minAspect;
    // Prefer the biggest tiles; among near-equals, the one closer to 4:3.
    const score = w * h * (1 - 0.1 * Math.abs(Math.log((w / h) / (4 / 3))));
    if (!best || score > best.score) best = { w, h, score };
  }
  if (!best) best = { w: TILE_MIN_W, h: (TILE_MIN_W * 3) / 4 };
  const w = Math.max(TILE_MIN_W, Math.floor(best.w));
  const h = Math.max(Math.floor((TILE_MIN_W * 3) / 4), Math.floor(best.h));
  grid.style.setProperty("--tile-w", `${w}px`);
  grid.style.setProperty("--tile-h", `${h}px`);
}
new ResizeObserver(() => layoutGrid()).observe($("grid"));

// A remote tile's simulcast layer picker (set_layer) and the size of the video it decodes.
function addLayerPicker(pid, p) {
  const select = document.createElement("select");
  select.className = "layer-picker";
  select.title = "Video quality to receive";
  select.setAttribute("aria-label", `Video quality of ${p.name || "this participant"}`);
  select.disabled = true;
  const auto = document.createElement("option");
  auto.value = "";
  auto.textContent = "Auto";
  select.append(auto);
  select.addEventListener("change", () => {
    const stream = videoStreamOf(pid);
    if (stream) gw.setLayer(stream.stream_id, select.value || null);
  });
  const size = document.createElement("span");
  size.className = "size";
  const box = document.createElement("div");
  box.className = "layer";
  box.hidden = true; // until the participant publishes video
  box.append(size, select);
  p.tile.append(box);
  p.picker = select;
  p.size = size;
}

function videoStreamOf(pid) {
  return [...gw.streams.values()].find((s) => s.participant_id === pid && s.kind === "video") || null;
}

// A picker offers Auto plus the layers the publisher is sending now (the gateway's `layers` on
// the stream, updated by `stream_layers`): a layer the camera does not produce (Chromium sends
// no high layer from a small camera) is never offered. A chosen layer that stopped stays listed,
// marked as not sent, until the choice changes.
function refreshPickers() {
  for (const [pid, p] of gw.participants) {
    if (!p.picker) continue;
    const stream = videoStreamOf(pid);
    const chosen = stream ? gw.layerChoices.get(stream.stream_id) || "" : "";
    const layers = (stream && stream.layers) || [];
    const wanted = layers.filter((l) => l.active || l.rid === chosen);
    const key = wanted.map((l) => `${l.rid}:${l.active}`).join(",");
    if (p.picker.dataset.layers !== key) {
      p.picker.dataset.layers = key;
      while (p.picker.options.length > 1) p.picker.remove(1);
      for (const l of wanted) {
        const o = document.createElement("option");
        o.value = l.rid;
        o.textContent = `${LAYER_LABELS[l.rid] || l.rid} (${l.rid})${l.active ? "" : " – not sent"}`;
        p.picker.append(o);
      }
    }
    p.picker.disabled = !stream || !gw.sub.id || layers.length === 0;
    p.picker.parentElement.hidden = !stream;
    p.picker.value = chosen;
  }
}

/** Ask the gateway for a simulcast layer of a stream this page receives (`null`: automatic). */
gw.setLayer = (streamId, rid) => {
  if (!gw.sub.id) throw new Error("no subscribe connection yet");
  const msg = { type: "set_layer", connection_id: gw.sub.id, stream_id: streamId, rid: rid || null };
  send(msg);
  gw.layerChoices.set(streamId, msg.rid);
  refreshPickers();
  return msg;
};

function showSizes() {
  for (const p of gw.participants.values()) {
    if (p.size) p.size.textContent = p.video.videoWidth ? `${p.video.videoWidth}\u00d7${p.video.videoHeight}` : "";
  }
}
setInterval(showSizes, 500);

function removeTile(pid) {
  const p = gw.participants.get(pid);
  if (!p) return;
  p.tile.remove();
  gw.participants.delete(pid);
  updateCount();
  layoutGrid();
}

function updateCount() {
  const n = gw.participants.size;
  $("participant-count").textContent = `${n} ${n === 1 ? "person" : "people"}`;
}

// The connection details, for experts: this session's connections as they are now.
const ROLE_WORDS = { publish: "Sending", subscribe: "Receiving" };
const STATE_WORDS = { INITIAL: "starting", GATHERED: "connecting", READY: "connected", FINISHED: "ended", FAILED: "failed" };
function renderConnections() {
  const ul = $("connections");
  ul.replaceChildren();
  for (const [id, c] of gw.connections) {
    if (c.state === "FINISHED") continue;
    const li = document.createElement("li");
    li.className = "conn";
    li.dataset.role = c.role;
    li.dataset.state = c.state;
    const role = document.createElement("div");
    role.className = "role";
    const state = document.createElement("span");
    state.className = `state ${c.state}`;
    state.textContent = `${STATE_WORDS[c.state] || c.state} · ${c.state} ${c.code}`;
    role.append(`${ROLE_WORDS[c.role] || c.role} (${c.role})`, state);
    const idEl = document.createElement("div");
    idEl.className = "id";
    idEl.textContent = c.reason ? `${id} · ${c.reason}` : id;
    const steps = document.createElement("div");
    steps.className = "steps";
    for (const s of c.steps) {
      const span = document.createElement("span");
      span.textContent = `${s.event} ${s.code}`;
      steps.append(span);
    }
    li.append(role, idEl, steps);
    ul.append(li);
  }
}

function showDetails(open) {
  $("details").hidden = !open;
  $("details-button").setAttribute("aria-expanded", String(open));
  layoutGrid();
}

// ---------------------------------------------------------------------------------------------
// Signaling
// ---------------------------------------------------------------------------------------------

function send(msg) {
  if (gw.ws && gw.ws.readyState === WebSocket.OPEN) gw.ws.send(JSON.stringify(msg));
}

/** A join token from the development route, or a JoinError that says why not. */
async function fetchToken() {
  let res;
  try {
    res = await fetch("/v1/dev/token", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ room: gw.room, participant: gw.me, name: gw.name }),
    });
  } catch {
    throw new JoinError(UNREACHABLE, { code: "unreachable", transient: true });
  }
  const body = await res.json().catch(() => ({}));
  if (!res.ok) {
    const code = body.error ? body.error.code : null;
    if (code === "bad_request") {
      throw new JoinError(`The server did not accept this room or name: ${body.error.message}.`, { code });
    }
    if (!code && res.status >= 500) throw new JoinError(UNREACHABLE, { code: `http_${res.status}`, transient: true });
    throw explain(code, body.error && body.error.message);
  }
  return body;
}

/**
 * Open the WebSocket. A browser does not tell a page why an upgrade was refused, so on failure
 * the page asks the same URL over plain HTTP: the gateway judges the token and the room before
 * the upgrade and answers with the contract's error (409 room_full, 401, 404, 409 conflict).
 */
async function openSocket(token, { resume = false } = {}) {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const path = `/v1/ws?token=${encodeURIComponent(token)}${resume ? "&resume=1" : ""}`;
  const ws = new WebSocket(`${proto}://${location.host}${path}`);
  const opened = await new Promise((resolve) => {
    ws.onopen = () => resolve(true);
    ws.onerror = () => resolve(false);
    ws.onclose = () => resolve(false);
  });
  if (opened) return ws;
  let code = null;
  let message = null;
  try {
    const r = await fetch(path);
    const body = await r.json().catch(() => ({}));
    if (body.error && r.status !== 400) ({ code, message } = body.error);
  } catch {
    throw new JoinError(UNREACHABLE, { code: "unreachable", transient: true });
  }
  throw explain(code, message ? null : "The connection to the meeting server could not be opened. Try again.");
}

/**
 * Put the signaling on a fresh WebSocket that resumes this session (`resume=1`): the network
 * may have changed under the old one, whose TCP connection then hangs without closing. The
 * gateway hands the participant and its connections to the new socket (`joined` with
 * `resumed`) and closes the old one; if the session is gone, `joined` comes without `resumed`
 * and the page publishes and subscribes anew. One at a time; resolves once `joined` arrived.
 */
function resumeSignaling() {
  if (gw.resuming) return gw.resuming;
  gw.resuming = (async () => {
    try {
      const token = await fetchToken();
      const ws = await openSocket(token.token, { resume: true });
      if (gw.left || gw.status !== "in-call") {
        ws.close(1000, "leave");
        return false;
      }
      const old = gw.ws;
      const joined = new Promise((resolve) => (gw.onJoinedOnce = resolve));
      gw.ws = ws;
      ws.onmessage = (ev) => {
        if (ws === gw.ws) onMessage(JSON.parse(ev.data));
      };
      ws.onclose = (ev) => onSocketClosed(ws, ev);
      if (old) {
        old.onmessage = null;
        old.close(1000, "resumed");
      }
      await Promise.race([joined, sleep(5000)]);
      return true;
    } catch (e) {
      // Not reachable right now: the ICE retry comes back here.
      activity(`could not resume the session (${e.message})`);
      return false;
    } finally {
      gw.resuming = null;
      gw.onJoinedOnce = null;
    }
  })();
  return gw.resuming;
}

/** Get in (or back in): a fresh token, then the WebSocket; `joined` does the rest. */
async function connect() {
  const token = await fetchToken();
  gw.roomId = token.room_id;
  gw.me = token.participant_id;
  // Minted credentials expire with the token: each fresh token brings fresh ones.
  if (Array.isArray(token.ice_servers) && (gw.options.iceServersFromToken || !gw.options.iceServers.length)) {
    gw.options.iceServers = token.ice_servers;
    gw.options.iceServersFromToken = true;
  }
  if (gw.left) throw new JoinError("left", { code: "left" });
  const ws = await openSocket(token.token);
  if (gw.left) {
    ws.close(1000, "leave");
    throw new JoinError("left", { code: "left" });
  }
  gw.ws = ws;
  ws.onmessage = (ev) => {
    if (ws === gw.ws) onMessage(JSON.parse(ev.data));
  };
  ws.onerror = null;
  ws.onclose = (ev) => onSocketClosed(ws, ev);
}

/** Start local media (or none), keeping the mute / camera-off choice already made. */
async function startMedia(media) {
  if (!media) return null;
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      audio: true,
      video: { width: { ideal: 640 }, height: { ideal: 480 } },
    });
  } catch (e) {
    throw explainMedia(e);
  }
  // New tracks start live; a choice made before (mute, camera off) carries over to them, and
  // the buttons show what is really sent.
  for (const t of stream.getTracks()) t.enabled = !gw.off[t.kind];
  return stream;
}

/** Join from the lobby (the Join button, or by itself after a reload during a call). */
async function submitJoin({ media = true } = {}) {
  const room = $("room-input").value.trim();
  const name = $("name-input").value.trim().replace(/\s+/g, " ");
  const roomProblem = checkName(room, "a room name", ROOM_MAX);
  const nameProblem = checkName(name, "your name", NAME_MAX);
  $("room-input").setAttribute("aria-invalid", String(!!roomProblem));
  $("name-input").setAttribute("aria-invalid", String(!!nameProblem));
  if (roomProblem || nameProblem) {
    lobbyError(new JoinError(nameProblem || roomProblem, { code: "invalid_input" }));
    (nameProblem ? $("name-input") : $("room-input")).focus();
    return;
  }
  lobbyError(null);
  $("join-button").disabled = true;
  gw.left = false;
  gw.status = "joining";
  gw.room = room;
  gw.name = name;
  gw.me = participantIdFor(name);
  remember("local", "gw.name", name);
  remember("local", "gw.room", room);
  // A fresh session: no connections or activity of an earlier one.
  gw.connections.clear();
  $("activity").replaceChildren();
  renderConnections();
  try {
    if (!gw.localStream || gw.localStream.getTracks().every((t) => t.readyState !== "live")) {
      gw.localStream = await startMedia(media);
    }
    renderToggles();
    await connect();
    putRoomInUrl(room);
    remember("session", "gw.inCall", room);
  } catch (e) {
    gw.status = "lobby";
    if (gw.localStream) for (const t of gw.localStream.getTracks()) t.stop();
    gw.localStream = null;
    renderToggles();
    if (e.code !== "left") lobbyError(e instanceof JoinError ? e : new JoinError(String(e.message || e)));
    $("join-button").disabled = false;
  }
}

function onSocketClosed(ws, ev) {
  if (ws !== gw.ws) return; // an old socket of this page, already replaced
  gw.ws = null;
  if (gw.left) return;
  closePeerConnections();
  gw.speakers = [];
  renderAllTiles();
  const reason = ev.reason;
  if (reason === "replaced") {
    // The same participant joined elsewhere (another tab with this tab's identity).
    gw.status = "replaced";
    if (gw.localStream) for (const t of gw.localStream.getTracks()) t.stop();
    for (const pid of [...gw.participants.keys()]) if (pid !== gw.me) removeTile(pid);
    renderAllTiles();
    activity("joined from another tab or window");
    banner("You joined this room from another tab or window, so this one left the call.", {
      action: { label: "Rejoin here", run: () => rejoinHere() },
      leave: true,
    });
    return;
  }
  if (reason === "kicked" || reason === "room_closed") {
    endCall(reason === "kicked" ? "You were removed from the room." : "The meeting was ended for everyone.");
    return;
  }
  // Dropped, or the gateway is restarting ("shutdown"): get back in by ourselves.
  reconnect();
}

async function rejoinHere() {
  banner("Rejoining…");
  gw.status = "reconnecting";
  try {
    gw.localStream = await startMedia(true);
  } catch (e) {
    gw.localStream = null;
    toast(e.message, 8000);
  }
  const me = gw.participants.get(gw.me);
  if (me) me.video.srcObject = gw.localStream;
  renderToggles();
  reconnect({ immediate: true });
}

/** Retry with backoff until back in, the user leaves, or `giveUpMs` passed. */
async function reconnect({ immediate = false } = {}) {
  const run = ++gw.reconnect.run;
  gw.status = "reconnecting";
  if (!gw.reconnect.since) gw.reconnect.since = Date.now();
  gw.reconnect.attempts = 0;
  $("room").classList.add("reconnecting");
  const retryBanner = (detail) => banner(`Reconnecting…${detail ? ` ${detail}` : ""}`);
  retryBanner("");
  activity("connection lost; reconnecting");
  for (;;) {
    const step = Math.min(gw.options.retryMaxMs, gw.options.retryMs * 2 ** gw.reconnect.attempts);
    const wait = immediate && gw.reconnect.attempts === 0 ? 0 : step * (0.75 + Math.random() * 0.5);
    await sleep(wait);
    if (gw.left || run !== gw.reconnect.run) return;
    gw.reconnect.attempts++;
    try {
      await connect();
      return; // `joined` finishes the job
    } catch (e) {
      if (gw.left || run !== gw.reconnect.run) return;
      if (!e.transient) {
        endCall(e.message);
        return;
      }
      if (Date.now() - gw.reconnect.since > gw.options.giveUpMs) {
        gw.status = "gave-up";
        banner(`Could not get back into the call. ${e.message}`, {
          action: { label: "Try again", run: () => { gw.reconnect.since = Date.now(); reconnect({ immediate: true }); } },
          leave: true,
          bad: true,
        });
        return;
      }
      retryBanner(e.code === "unreachable" || e.code === "conflict" ? "(the server is not answering yet)" : "");
    }
  }
}

/** Back to the lobby with a message. */
function endCall(text) {
  gw.left = true;
  const ws = gw.ws;
  gw.ws = null;
  if (ws) ws.close();
  teardown();
  remember("session", "gw.inCall", null);
  if (text) lobbyError(new JoinError(text));
}

function onMessage(msg) {
  gw.events.push(msg);
  switch (msg.type) {
    case "joined":
      onJoined(msg);
      break;
    case "answer":
      onAnswer(msg);
      break;
    case "offer":
      onOffer(msg);
      break;
    case "candidate":
      onCandidate(msg);
      break;
    case "connection_event":
      onConnectionEvent(msg);
      break;
    case "participant_joined":
      tileFor(msg.participant_id, msg.name);
      activity(`${msg.name} joined`);
      break;
    case "participant_left":
      removeTile(msg.participant_id);
      activity(`${msg.name} left`);
      break;
    case "stream_added":
      onStreamAdded(msg);
      break;
    case "stream_removed":
      onStreamRemoved(msg);
      break;
    case "track_muted":
    case "track_unmuted":
      onTrackMute(msg, msg.type === "track_muted");
      break;
    case "active_speakers":
      gw.speakers = [...new Set((msg.speakers || []).map((s) => s.participant_id))];
      renderAllTiles();
      break;
    case "stream_unavailable": {
      // A stream this page was offered but cannot receive (the gateway does not transcode).
      const s = gw.streams.get(msg.stream_id);
      const who = s ? displayName(s.participant_id) : "Someone";
      const text = msg.reason === "codec_unsupported"
        ? `${who}'s video is ${(msg.codec || "in a codec").split("/")[0].toUpperCase()}, which this browser cannot play`
        : `${who}'s video was declined by this browser`;
      gw.unavailable = [...(gw.unavailable || []), msg];
      // Said on the tile for as long as it holds, not only in a passing toast.
      const p = s && gw.participants.get(s.participant_id);
      if (s) s.unavailable = msg.reason;
      if (p) {
        p.note.textContent = `${text}.`;
        p.note.hidden = false;
        renderTile(s.participant_id);
      }
      toast(text);
      activity(text);
      break;
    }
    case "stream_layers": {
      const s = gw.streams.get(msg.stream_id);
      if (s) s.layers = msg.layers;
      refreshPickers();
      break;
    }
    case "error": {
      activity(`error ${msg.code}: ${msg.message}`);
      // A refused request during the call (the socket stays open). A stream or connection that
      // is already gone (not_found) is a race with the room changing: nothing to tell.
      const moderated = msg.code === "forbidden" && (msg.message || "").startsWith("muted by the app backend");
      const said = moderated ? "The host muted you; only the host can unmute you." : IN_CALL_ERRORS[msg.code];
      if (msg.code !== "not_found") toast(said || `The meeting server refused a request (${msg.message}).`, 8000);
      break;
    }
    case "message": {
      // From the app backend (docs/api.md "Moderation and room state"): text if it has some.
      const text = typeof msg.data === "string" ? msg.data : msg.data && typeof msg.data.text === "string" ? msg.data.text : JSON.stringify(msg.data);
      activity(`message: ${text}`);
      toast(text, 8000);
      break;
    }
    case "participant_metadata":
    case "room_metadata":
      activity(`${msg.type === "room_metadata" ? "room" : displayName(msg.participant_id)} metadata: ${JSON.stringify(msg.metadata ?? null)}`);
      break;
  }
}

async function onJoined(msg) {
  if (gw.onJoinedOnce) gw.onJoinedOnce(msg);
  const alive = new Set((msg.connections || []).map((c) => c.connection_id));
  const survived = [gw.pub, gw.sub].every((side) => !side.pc || (side.id && alive.has(side.id)));
  if (msg.resumed && (gw.pub.pc || gw.sub.pc) && !survived) {
    // A connection ended while the page was away (past media.disconnect_grace_ms): the session
    // is back, its media is not. Join afresh, which replaces this session and its connections.
    activity("the media connections did not survive; joining again");
    const ws = gw.ws;
    gw.ws = null;
    if (ws) {
      ws.onclose = null;
      ws.onmessage = null;
      ws.close(1000, "rejoin");
    }
    reconnect({ immediate: true });
    return;
  }
  if (msg.resumed && (gw.pub.pc || gw.sub.pc)) {
    // The same session on a new socket: the connections go on; the room is as it says.
    gw.streams.clear();
    for (const s of msg.streams) if (s.participant_id !== gw.me) gw.streams.set(s.stream_id, s);
    refreshPickers();
    renderAllTiles();
    activity("signaling resumed on a new connection");
    return;
  }
  // A fresh session: peer connections of an earlier one (a resume that found nothing to
  // resume) are over.
  if (gw.pub.pc || gw.sub.pc) closePeerConnections();
  const wasReconnecting = gw.status === "reconnecting";
  gw.status = "in-call";
  gw.reconnect.since = 0;
  gw.reconnect.attempts = 0;
  banner(null);
  $("room").classList.remove("reconnecting");
  $("lobby").hidden = true;
  $("room").hidden = false;
  $("controls").hidden = false;
  $("room-info").hidden = false;
  $("room-title").textContent = gw.room;
  $("room-title").title = gw.room;
  document.title = `${gw.room} · Rooms`;
  // The room as it is now: participants that went while this page was away go too.
  const present = new Set([gw.me, ...msg.participants.map((p) => p.participant_id)]);
  for (const pid of [...gw.participants.keys()]) if (!present.has(pid)) removeTile(pid);
  gw.streams.clear();
  gw.layerChoices.clear();
  gw.speakers = [];
  gw.connections.clear();
  renderConnections();
  const me = tileFor(gw.me, gw.name, true);
  if (me.video.srcObject !== gw.localStream) me.video.srcObject = gw.localStream;
  for (const p of msg.participants) tileFor(p.participant_id, p.name);
  for (const s of msg.streams) if (s.participant_id !== gw.me) gw.streams.set(s.stream_id, s);
  refreshPickers();
  renderAllTiles();
  activity(wasReconnecting ? "back in the call" : `joined ${gw.room}`);
  if (gw.localStream) await publish();
  send({ type: "subscribe" });
}

/**
 * Restart ICE on a connection whose ICE failed, or stayed disconnected for
 * `iceRestartAfterMs` (the network changed: a new address, Wi-Fi to LTE). The connection, its
 * id and its media stay; only the ICE credentials and candidates are new.
 */
function watchIce(pc, role) {
  let timer = null;
  const side = () => (role === "publish" ? gw.pub : gw.sub);
  const later = (ms) => {
    clearTimeout(timer);
    timer = setTimeout(check, ms);
  };
  const check = () => {
    timer = null;
    if (side().pc !== pc || pc.connectionState === "closed") return;
    const state = pc.iceConnectionState;
    if (state === "connected" || state === "completed") return;
    if (state === "failed" || state === "disconnected" || side().restartedAt) {
      recoverMedia(state);
      // Not back by then: again.
      later(gw.options.iceRestartRetryMs);
    }
  };
  if (role === "publish") {
    watchInflow(pc, role, () => {
      recoverMedia("stalled", true);
      later(gw.options.iceRestartRetryMs);
    });
  }
  const note = (state) => {
    gw.iceStates.push({ role, state, at: Date.now() });
    if (gw.iceStates.length > 100) gw.iceStates.shift();
  };
  pc.addEventListener("icecandidate", (ev) => {
    const c = ev.candidate;
    note(c ? `candidate ${c.address}:${c.port} ${c.type}` : "gathered");
  });
  pc.addEventListener("iceconnectionstatechange", () => {
    const state = pc.iceConnectionState;
    note(state);
    if (state === "connected" || state === "completed") {
      clearTimeout(timer);
      timer = null;
      if (side().pc === pc && side().restartedAt) {
        activity(`${role === "publish" ? "sending" : "receiving"} again after an ICE restart (${Date.now() - side().restartedAt} ms)`);
        side().restartedAt = 0;
      }
    } else if (state === "failed") {
      if (!side().restartedAt || Date.now() - side().restartedAt >= gw.options.iceRestartAfterMs) later(0);
    } else if (state === "disconnected" && !timer) {
      later(gw.options.iceRestartAfterMs);
    }
  });
}

/**
 * Call `stalled` when a connection that was receiving steadily (something in at least 6 of the
 * 8 quarter-seconds before) gets nothing for `mediaStallMs`. Used on the publish connection,
 * whose inflow (the gateway's RTCP feedback) does not depend on anyone else: a subscribe
 * connection goes quiet whenever the others stop sending.
 */
function watchInflow(pc, role, stalled) {
  if (!gw.options.mediaStallMs) return;
  let last = -1;
  let arrivals = []; // when the received byte count last rose, the last 3 s
  let fired = false;
  const poll = setInterval(async () => {
    const side = role === "publish" ? gw.pub : gw.sub;
    if (side.pc !== pc || pc.connectionState === "closed") {
      clearInterval(poll);
      return;
    }
    let bytes = 0;
    try {
      (await pc.getStats()).forEach((r) => {
        if (r.type === "transport") bytes += r.bytesReceived || 0;
      });
    } catch {
      return;
    }
    const now = Date.now();
    if (bytes !== last) {
      last = bytes;
      arrivals.push(now);
      arrivals = arrivals.filter((t) => now - t <= 3000);
      fired = false;
      return;
    }
    const lastAt = arrivals[arrivals.length - 1] || 0;
    const steady = arrivals.filter((t) => lastAt - t <= 2000).length >= 6;
    if (!fired && steady && gw.status === "in-call" && now - lastAt >= gw.options.mediaStallMs) {
      fired = true;
      activity(`${role === "publish" ? "sending" : "receiving"}: nothing arrived for ${now - lastAt} ms`);
      stalled();
    }
  }, 250);
}

/**
 * The network under this page changed (or broke): resume the signaling on a fresh socket, then
 * restart ICE on every connection that is not connected (on both, when `all`: one of them
 * stopped receiving while ICE still said connected). Both connections usually notice within a
 * second or two of each other; the first to notice does it for both.
 */
async function recoverMedia(state, all = false) {
  if (gw.status !== "in-call") return;
  if (!gw.recovering) {
    gw.recovering = (async () => {
      const before = [gw.pub.pc, gw.sub.pc];
      if (Date.now() - (gw.resumedAt || 0) > gw.options.iceRestartAfterMs) {
        if (await resumeSignaling()) gw.resumedAt = Date.now();
      }
      for (const [i, role, side] of [[0, "publish", gw.pub], [1, "subscribe", gw.sub]]) {
        // Nothing was left to resume: the page publishes and subscribes afresh instead.
        if (side.pc !== before[i]) continue;
        const s = side.pc && side.pc.iceConnectionState;
        if (s && s !== "closed" && (all || (s !== "connected" && s !== "completed"))) {
          if (!side.restartedAt || Date.now() - side.restartedAt >= gw.options.iceRestartAfterMs) {
            await restartIce(side.pc, role, all ? state : s);
          }
        }
      }
    })().finally(() => (gw.recovering = null));
  }
  return gw.recovering;
}

async function restartIce(pc, role, state) {
  const side = role === "publish" ? gw.pub : gw.sub;
  if (side.pc !== pc || !side.id || gw.status !== "in-call") return;
  // No signaling (the resume failed): the retry comes back to this.
  if (!gw.ws || gw.ws.readyState !== WebSocket.OPEN) return;
  side.restartedAt = Date.now();
  gw.iceRestarts.push({ role, at: side.restartedAt, state });
  activity(`${role === "publish" ? "sending" : "receiving"}: network lost (ICE ${state}), restarting ICE`);
  if (role === "subscribe") {
    // The gateway offers again with new credentials; the answer goes as for any offer.
    send({ type: "restart_ice", connection_id: side.id });
    return;
  }
  // An answer still outstanding: the retry comes back to this.
  if (pc.signalingState !== "stable") return;
  pc.restartIce();
  const offer = await pc.createOffer();
  await pc.setLocalDescription(offer);
  if (gw.pub.pc === pc) send({ type: "publish", sdp: offer.sdp });
}

async function publish() {
  const pc = new RTCPeerConnection(rtcConfiguration());
  watchIce(pc, "publish");
  gw.pub.pc = pc;
  gw.pub.restartedAt = 0;
  gw.pub.id = null;
  gw.pub.pendingCandidates = [];
  for (const track of gw.localStream.getTracks()) {
    const init = { direction: "sendonly", streams: [gw.localStream] };
    if (track.kind === "video" && gw.options.simulcast) init.sendEncodings = SIMULCAST_ENCODINGS.map((e) => ({ ...e }));
    const tr = pc.addTransceiver(track, init);
    if (track.kind === "video") preferCodec(tr, gw.options.codec);
  }
  pc.onicecandidate = (ev) => {
    if (!ev.candidate || gw.pub.pc !== pc) return;
    const c = { candidate: ev.candidate.candidate, sdpMid: ev.candidate.sdpMid, sdpMLineIndex: ev.candidate.sdpMLineIndex };
    if (gw.pub.id) send({ type: "candidate", connection_id: gw.pub.id, ...c });
    else gw.pub.pendingCandidates.push(c);
  };
  if (gw.options.data) {
    gw.pub.data = pc.createDataChannel("data");
    gw.pub.dataUnreliable = pc.createDataChannel("data-unreliable", { ordered: false, maxRetransmits: 0 });
  }
  const offer = await pc.createOffer();
  await pc.setLocalDescription(offer);
  if (gw.pub.pc === pc) send({ type: "publish", sdp: offer.sdp });
}

// `?codec=h264` (or vp8, vp9, av1) puts that codec first in the publish offer.
function preferCodec(transceiver, name) {
  if (!name || !RTCRtpSender.getCapabilities || !transceiver.setCodecPreferences) return;
  const want = `video/${name}`.toLowerCase();
  const codecs = RTCRtpSender.getCapabilities("video").codecs;
  const first = codecs.filter((c) => c.mimeType.toLowerCase() === want);
  if (first.length === 0) return;
  transceiver.setCodecPreferences([...first, ...codecs.filter((c) => c.mimeType.toLowerCase() !== want)]);
}

async function onAnswer(msg) {
  const pc = gw.pub.pc;
  if (!pc) return;
  gw.pub.id = msg.connection_id;
  await pc.setRemoteDescription({ type: "answer", sdp: msg.sdp });
  for (const c of gw.pub.pendingCandidates.splice(0)) send({ type: "candidate", connection_id: gw.pub.id, ...c });
}

function ensureSubscriber() {
  if (gw.sub.pc) return gw.sub.pc;
  const pc = new RTCPeerConnection(rtcConfiguration());
  watchIce(pc, "subscribe");
  gw.sub.pc = pc;
  gw.sub.restartedAt = 0;
  pc.ontrack = (ev) => {
    const pid = ev.streams[0] ? ev.streams[0].id : "unknown";
    const info = gw.participants.get(pid);
    const p = tileFor(pid, info ? info.name : null);
    // A track of the same kind from before a reconnect is over: the new one takes its place.
    for (const old of p.stream.getTracks()) if (old.kind === ev.track.kind && old !== ev.track) p.stream.removeTrack(old);
    p.stream.addTrack(ev.track);
    if (p.video.srcObject !== p.stream) p.video.srcObject = p.stream;
    ev.track.onended = () => {
      p.stream.removeTrack(ev.track);
      renderTile(pid);
    };
    renderTile(pid);
  };
  pc.ondatachannel = (ev) => {
    const ch = ev.channel;
    ch.onmessage = (m) => {
      let msg;
      try {
        msg = JSON.parse(m.data);
      } catch {
        return;
      }
      msg.reliable = ch.label === "gateway";
      gw.dataReceived.push(msg);
      if (gw.dataReceived.length > 1000) gw.dataReceived.shift();
      if (typeof gw.onData === "function") gw.onData(msg);
    };
  };
  pc.onicecandidate = (ev) => {
    if (ev.candidate && gw.sub.id && gw.sub.pc === pc) {
      send({ type: "candidate", connection_id: gw.sub.id, candidate: ev.candidate.candidate, sdpMid: ev.candidate.sdpMid, sdpMLineIndex: ev.candidate.sdpMLineIndex });
    }
  };
  return pc;
}

// Offers and candidates for the subscribe connection are applied strictly in order.
function onOffer(msg) {
  gw.sub.queue = gw.sub.queue.then(async () => {
    gw.sub.id = msg.connection_id;
    refreshPickers();
    const pc = ensureSubscriber();
    await pc.setRemoteDescription({ type: "offer", sdp: msg.sdp });
    if (gw.options.recvCodecs) restrictReceiveCodecs(pc, gw.options.recvCodecs);
    const answer = await pc.createAnswer();
    await pc.setLocalDescription(answer);
    if (gw.sub.pc === pc) send({ type: "answer", connection_id: msg.connection_id, sdp: answer.sdp });
  }).catch((e) => {
    if (gw.status === "in-call") toast(`Could not receive the others' media (${e.message}).`);
  });
}

/** Accept only these video codecs (and their retransmission/FEC helpers) on every receiver. */
function restrictReceiveCodecs(pc, names) {
  if (!RTCRtpReceiver.getCapabilities) return;
  const want = names.map((n) => `video/${n}`.toLowerCase());
  const helpers = ["video/rtx", "video/red", "video/ulpfec", "video/flexfec-03"];
  const codecs = RTCRtpReceiver.getCapabilities("video").codecs.filter((c) => want.includes(c.mimeType.toLowerCase()) || helpers.includes(c.mimeType.toLowerCase()));
  for (const t of pc.getTransceivers()) {
    if (t.receiver.track && t.receiver.track.kind === "video" && t.setCodecPreferences) t.setCodecPreferences(codecs);
  }
}

function onCandidate(msg) {
  const init = { candidate: msg.candidate, sdpMid: msg.sdpMid, sdpMLineIndex: msg.sdpMLineIndex };
  if (msg.connection_id === gw.pub.id && gw.pub.pc) {
    gw.pub.pc.addIceCandidate(init).catch(() => {});
  } else {
    gw.sub.queue = gw.sub.queue.then(() => gw.sub.pc && gw.sub.pc.addIceCandidate(init)).catch(() => {});
  }
}

function onConnectionEvent(msg) {
  let c = gw.connections.get(msg.connection_id);
  if (!c) {
    c = { role: msg.role, state: "INITIAL", code: 101, steps: [] };
    gw.connections.set(msg.connection_id, c);
  }
  c.steps.push({ event: msg.event, code: msg.code });
  if (["INITIAL", "GATHERED", "READY", "FINISHED", "FAILED"].includes(msg.event)) {
    c.state = msg.event;
    c.code = msg.code;
    c.reason = msg.reason || null;
    if (msg.event === "FAILED") {
      const what = msg.role === "publish" ? "Your camera and microphone could not reach" : "The others' video and sound could not come from";
      toast(`${what} the meeting server (the network may block it).`, 8000);
      activity(`${msg.role} connection failed: ${msg.reason || "unknown reason"}`);
    }
  }
  renderConnections();
}

function onStreamAdded(msg) {
  if (msg.participant_id === gw.me) {
    // Our own publication: the room learns its mute state from us (a new one starts unmuted).
    gw.ownStreams = { ...(gw.ownStreams || {}), [msg.kind]: msg.stream_id };
    if (gw.off[msg.kind] && !msg.muted) send({ type: "mute", stream_id: msg.stream_id, muted: true });
    return;
  }
  gw.streams.set(msg.stream_id, msg);
  tileFor(msg.participant_id, displayName(msg.participant_id));
  refreshPickers();
  renderTile(msg.participant_id);
}

function onStreamRemoved(msg) {
  if (msg.participant_id === gw.me) {
    if (gw.ownStreams && gw.ownStreams[msg.kind] === msg.stream_id) delete gw.ownStreams[msg.kind];
    return;
  }
  gw.streams.delete(msg.stream_id);
  gw.layerChoices.delete(msg.stream_id);
  const p = gw.participants.get(msg.participant_id);
  if (p && msg.kind === "video") p.note.hidden = true;
  refreshPickers();
  renderTile(msg.participant_id);
}

function onTrackMute(msg, muted) {
  const s = gw.streams.get(msg.stream_id);
  if (s) s.muted = muted;
  if (msg.moderated && msg.participant_id === gw.me) {
    // The host muted this page's stream: the gateway no longer forwards it.
    toast(msg.kind === "audio" ? "The host muted your microphone." : "The host turned your camera off for the others.", 8000);
    activity(`the host muted your ${msg.kind}`);
  } else if (msg.participant_id !== gw.me) {
    const what = msg.kind === "audio" ? (muted ? "muted their microphone" : "unmuted their microphone") : muted ? "turned their camera off" : "turned their camera on";
    activity(`${displayName(msg.participant_id)} ${what}${msg.moderated ? " (by the host)" : ""}`);
  }
  renderTile(msg.participant_id);
}

function closePeerConnections() {
  for (const side of [gw.pub, gw.sub]) {
    if (side.pc) side.pc.close();
    side.pc = null;
    side.id = null;
  }
  gw.pub.pendingCandidates = [];
  gw.sub.queue = Promise.resolve();
  gw.ownStreams = {};
}

function teardown() {
  gw.reconnect.run++;
  gw.reconnect.since = 0;
  closePeerConnections();
  if (gw.localStream) for (const t of gw.localStream.getTracks()) t.stop();
  gw.localStream = null;
  for (const pid of [...gw.participants.keys()]) removeTile(pid);
  gw.layerChoices.clear();
  gw.streams.clear();
  gw.speakers = [];
  gw.status = "lobby";
  banner(null);
  showDetails(false);
  $("room").classList.remove("reconnecting");
  $("room").hidden = true;
  $("controls").hidden = true;
  $("room-info").hidden = true;
  $("lobby").hidden = false;
  $("join-button").disabled = false;
  document.title = "Rooms · SFU Gateway";
  renderToggles();
}

async function leave() {
  gw.left = true;
  remember("session", "gw.inCall", null);
  const ws = gw.ws;
  if (ws && ws.readyState === WebSocket.OPEN) {
    const closed = new Promise((resolve) => ws.addEventListener("close", resolve, { once: true }));
    send({ type: "leave" });
    await Promise.race([closed, sleep(3000)]);
  }
  gw.ws = null;
  teardown();
}
gw.leave = leave;

// ---------------------------------------------------------------------------------------------
// Wiring
// ---------------------------------------------------------------------------------------------

$("join-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  submitJoin();
});

$("leave-button").addEventListener("click", () => leave());
$("banner-leave").addEventListener("click", () => leave());
$("details-button").addEventListener("click", () => showDetails($("details").hidden));
$("details-close").addEventListener("click", () => showDetails(false));

// The mic and camera buttons always show the state of the tracks being sent (after a leave and
// a new join too): pressed = off. The choice is kept across joins in `gw.off`, and the room
// hears it through the gateway (`mute` -> `track_muted` / `track_unmuted`).
gw.off = { audio: false, video: false };
const TOGGLES = {
  audio: { button: "mic-button", on: ["Mic", "Mute microphone"], off: ["Muted", "Unmute microphone"] },
  video: { button: "cam-button", on: ["Cam", "Turn camera off"], off: ["Cam off", "Turn camera on"] },
};
function renderToggles() {
  for (const [kind, t] of Object.entries(TOGGLES)) {
    const track = gw.localStream && gw.localStream.getTracks().find((x) => x.kind === kind && x.readyState === "live");
    const off = track ? !track.enabled : gw.off[kind];
    const [text, title] = off ? t.off : t.on;
    const b = $(t.button);
    b.setAttribute("aria-pressed", String(off));
    b.textContent = text;
    b.title = title;
    b.setAttribute("aria-label", title);
  }
  if (gw.me) renderTile(gw.me);
}
for (const kind of Object.keys(TOGGLES)) {
  $(TOGGLES[kind].button).addEventListener("click", () => {
    gw.off[kind] = !gw.off[kind];
    if (gw.localStream) for (const t of gw.localStream.getTracks()) if (t.kind === kind) t.enabled = !gw.off[kind];
    const stream = gw.ownStreams && gw.ownStreams[kind];
    if (stream) send({ type: "mute", stream_id: stream, muted: gw.off[kind] });
    renderToggles();
  });
}
renderToggles();

if (gw.options.problem) toast(gw.options.problem, 8000);
// The form remembers the room (address bar, then this browser) and the name (this browser).
$("room-input").value = params.get("room") || recall("local", "gw.room") || "";
$("name-input").value = params.get("name") || recall("local", "gw.name") || "";
window.addEventListener("beforeunload", () => {
  gw.left = true;
  send({ type: "leave" });
});
// A reload during a call goes straight back in (same room, name and participant).
if (recall("session", "gw.inCall") && recall("session", "gw.inCall") === $("room-input").value.trim() && $("name-input").value.trim()) {
  submitJoin();
}
