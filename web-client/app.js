// Browser client of the gateway: join a room, publish camera + microphone on a publish
// connection, receive everyone else on a subscribe connection the gateway (re)offers, and show
// each connection's erizo-like state live. Speaks the WebSocket API of docs/api.md §3.

const $ = (id) => document.getElementById(id);

// Everything the page knows; also what the browser tests inspect (window.gw).
const gw = {
  ws: null,
  roomId: null,
  me: null,
  localStream: null,
  pub: { pc: null, id: null, pendingCandidates: [] },
  sub: { pc: null, id: null, queue: Promise.resolve() },
  participants: new Map(), // participant_id -> { name, tile, stream }
  streams: new Map(), // stream_id -> stream info
  connections: new Map(), // connection_id -> { role, state, code, steps: [] }
  events: [], // every message received, in order
  left: false,
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
// or from an embedding page, by setting window.gw.options before joining.
gw.options.iceServers = [];
gw.options.iceTransportPolicy = "all";
if (params.get("iceServers")) {
  try {
    const servers = JSON.parse(params.get("iceServers"));
    gw.options.iceServers = Array.isArray(servers) ? servers : [servers];
  } catch (e) {
    gw.options.problem = `iceServers is not JSON (${e.message}); using none`;
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

// ---------------------------------------------------------------------------------------------
// UI helpers
// ---------------------------------------------------------------------------------------------

function toast(text, ms = 3500) {
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

function initials(name) {
  return (name || "?").slice(0, 2).toUpperCase();
}

function tileFor(pid, name, local = false) {
  let p = gw.participants.get(pid);
  if (p && p.tile) return p;
  const tile = document.createElement("div");
  tile.className = "tile" + (local ? " local" : "");
  tile.dataset.participant = pid;
  const video = document.createElement("video");
  video.autoplay = true;
  video.playsInline = true;
  video.muted = local;
  const avatar = document.createElement("div");
  avatar.className = "avatar";
  avatar.textContent = initials(name);
  const label = document.createElement("div");
  label.className = "label";
  const dot = document.createElement("span");
  dot.className = "dot";
  const text = document.createElement("span");
  text.textContent = local ? `${name} (you)` : name;
  label.append(dot, text);
  tile.append(video, avatar, label);
  p = { name, tile, video, dot, stream: new MediaStream() };
  if (!local && gw.options.layers) addLayerPicker(pid, p);
  $("grid").append(tile);
  gw.participants.set(pid, p);
  updateCount();
  return p;
}

// A remote tile's simulcast layer picker (set_layer) and the size of the video it decodes.
function addLayerPicker(pid, p) {
  const select = document.createElement("select");
  select.className = "layer-picker";
  select.title = "Simulcast layer to receive";
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
}

function updateCount() {
  const n = gw.participants.size;
  $("participant-count").textContent = `${n} participant${n === 1 ? "" : "s"}`;
}

function renderConnections() {
  const ul = $("connections");
  ul.replaceChildren();
  for (const [id, c] of gw.connections) {
    const li = document.createElement("li");
    li.className = "conn";
    li.dataset.role = c.role;
    li.dataset.state = c.state;
    const role = document.createElement("div");
    role.className = "role";
    const state = document.createElement("span");
    state.className = `state ${c.state}`;
    state.textContent = `${c.state} ${c.code}`;
    role.append(c.role, state);
    const idEl = document.createElement("div");
    idEl.className = "id";
    idEl.textContent = id;
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
  const me = gw.participants.get(gw.me);
  if (me) {
    const states = [...gw.connections.values()].filter((c) => c.state !== "FINISHED").map((c) => c.state);
    me.dot.className = "dot " + (states.includes("FAILED") ? "bad" : states.length && states.every((s) => s === "READY") ? "ok" : "warn");
  }
}

// ---------------------------------------------------------------------------------------------
// Signaling
// ---------------------------------------------------------------------------------------------

function send(msg) {
  if (gw.ws && gw.ws.readyState === WebSocket.OPEN) gw.ws.send(JSON.stringify(msg));
}

async function join(room, name) {
  const res = await fetch("/v1/dev/token", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ room, participant: name }),
  });
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(body.error ? body.error.message : `token request failed (${res.status})`);
  gw.me = body.participant_id;
  gw.roomId = body.room_id;

  gw.localStream = await navigator.mediaDevices.getUserMedia({
    audio: true,
    video: { width: { ideal: 640 }, height: { ideal: 480 } },
  });
  // New tracks start live; a choice made before (mute, camera off) carries over to them, and
  // the buttons show what is really sent.
  for (const t of gw.localStream.getTracks()) t.enabled = !gw.off[t.kind];
  renderToggles();

  const proto = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${proto}://${location.host}/v1/ws?token=${encodeURIComponent(body.token)}`);
  gw.ws = ws;
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = () => reject(new Error("could not open the WebSocket"));
  });
  ws.onmessage = (ev) => onMessage(JSON.parse(ev.data));
  ws.onclose = (ev) => {
    if (!gw.left) {
      toast(ev.reason ? `Disconnected: ${ev.reason}` : "Disconnected from the gateway");
      teardown();
    }
  };
  $("room-title").textContent = room;
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
      gw.streams.set(msg.stream_id, msg);
      if (msg.participant_id !== gw.me) activity(`${msg.participant_id} published ${msg.kind}`);
      refreshPickers();
      break;
    case "stream_removed":
      onStreamRemoved(msg);
      break;
    case "stream_unavailable": {
      // A stream this page was offered but cannot receive (the gateway does not transcode).
      const s = gw.streams.get(msg.stream_id);
      const who = s ? (gw.participants.get(s.participant_id)?.name ?? s.participant_id) : "someone";
      const text = msg.reason === "codec_unsupported"
        ? `${who}'s video is ${(msg.codec || "in a codec").split("/")[0].toUpperCase()}, which this browser cannot play`
        : `${who}'s video was declined by this browser`;
      gw.unavailable = [...(gw.unavailable || []), msg];
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
    case "error":
      toast(`Gateway: ${msg.message}`);
      activity(`error ${msg.code}: ${msg.message}`);
      break;
  }
}

async function onJoined(msg) {
  $("lobby").hidden = true;
  $("room").hidden = false;
  $("controls").hidden = false;
  $("room-info").hidden = false;
  const me = tileFor(gw.me, gw.me, true);
  me.video.srcObject = gw.localStream;
  me.tile.classList.add("has-video");
  for (const p of msg.participants) tileFor(p.participant_id, p.name);
  for (const s of msg.streams) gw.streams.set(s.stream_id, s);
  refreshPickers();
  activity(`joined ${$("room-title").textContent}`);
  await publish();
  send({ type: "subscribe" });
}

async function publish() {
  const pc = new RTCPeerConnection(rtcConfiguration());
  gw.pub.pc = pc;
  for (const track of gw.localStream.getTracks()) {
    const init = { direction: "sendonly", streams: [gw.localStream] };
    if (track.kind === "video" && gw.options.simulcast) init.sendEncodings = SIMULCAST_ENCODINGS.map((e) => ({ ...e }));
    const tr = pc.addTransceiver(track, init);
    if (track.kind === "video") preferCodec(tr, gw.options.codec);
  }
  pc.onicecandidate = (ev) => {
    if (!ev.candidate) return;
    const c = { candidate: ev.candidate.candidate, sdpMid: ev.candidate.sdpMid, sdpMLineIndex: ev.candidate.sdpMLineIndex };
    if (gw.pub.id) send({ type: "candidate", connection_id: gw.pub.id, ...c });
    else gw.pub.pendingCandidates.push(c);
  };
  const offer = await pc.createOffer();
  await pc.setLocalDescription(offer);
  send({ type: "publish", sdp: offer.sdp });
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
  gw.pub.id = msg.connection_id;
  await gw.pub.pc.setRemoteDescription({ type: "answer", sdp: msg.sdp });
  for (const c of gw.pub.pendingCandidates.splice(0)) send({ type: "candidate", connection_id: gw.pub.id, ...c });
}

function ensureSubscriber() {
  if (gw.sub.pc) return gw.sub.pc;
  const pc = new RTCPeerConnection(rtcConfiguration());
  gw.sub.pc = pc;
  pc.ontrack = (ev) => {
    const pid = ev.streams[0] ? ev.streams[0].id : "unknown";
    const info = gw.participants.get(pid);
    const p = tileFor(pid, info ? info.name : pid);
    p.stream.addTrack(ev.track);
    if (p.video.srcObject !== p.stream) p.video.srcObject = p.stream;
    if (ev.track.kind === "video") p.tile.classList.add("has-video");
    p.dot.className = "dot ok";
    ev.track.onended = () => p.stream.removeTrack(ev.track);
  };
  pc.onicecandidate = (ev) => {
    if (ev.candidate && gw.sub.id) {
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
    send({ type: "answer", connection_id: msg.connection_id, sdp: answer.sdp });
  }).catch((e) => toast(`Could not apply the gateway's offer: ${e.message}`));
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
    if (msg.event === "FAILED") toast(`${msg.role} connection failed: ${msg.reason || "unknown reason"}`);
  }
  renderConnections();
}

function onStreamRemoved(msg) {
  gw.streams.delete(msg.stream_id);
  gw.layerChoices.delete(msg.stream_id);
  refreshPickers();
  const p = gw.participants.get(msg.participant_id);
  if (p && msg.participant_id !== gw.me) {
    const left = [...gw.streams.values()].some((s) => s.participant_id === msg.participant_id && s.kind === "video");
    if (!left && msg.kind === "video") p.tile.classList.remove("has-video");
  }
  if (msg.participant_id !== gw.me) activity(`${msg.participant_id} stopped ${msg.kind}`);
}

function teardown() {
  for (const side of [gw.pub, gw.sub]) {
    if (side.pc) side.pc.close();
    side.pc = null;
    side.id = null;
  }
  if (gw.localStream) for (const t of gw.localStream.getTracks()) t.stop();
  for (const pid of [...gw.participants.keys()]) removeTile(pid);
  gw.layerChoices.clear();
  $("room").hidden = true;
  $("controls").hidden = true;
  $("room-info").hidden = true;
  $("lobby").hidden = false;
  $("join-button").disabled = false;
  renderToggles();
}

async function leave() {
  gw.left = true;
  const ws = gw.ws;
  if (ws && ws.readyState === WebSocket.OPEN) {
    const closed = new Promise((resolve) => ws.addEventListener("close", resolve, { once: true }));
    send({ type: "leave" });
    await Promise.race([closed, new Promise((r) => setTimeout(r, 3000))]);
  }
  teardown();
}
gw.leave = leave;

// ---------------------------------------------------------------------------------------------
// Wiring
// ---------------------------------------------------------------------------------------------

$("join-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("join-error").hidden = true;
  $("join-button").disabled = true;
  gw.left = false;
  try {
    await join($("room-input").value.trim(), $("name-input").value.trim());
  } catch (e) {
    $("join-error").textContent = e.message;
    $("join-error").hidden = false;
    $("join-button").disabled = false;
  }
});

$("leave-button").addEventListener("click", () => leave());

// The mic and camera buttons always show the state of the tracks being sent (after a leave and
// a new join too): pressed = off. The choice is kept across joins in `gw.off`.
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
}
for (const kind of Object.keys(TOGGLES)) {
  $(TOGGLES[kind].button).addEventListener("click", () => {
    gw.off[kind] = !gw.off[kind];
    if (gw.localStream) for (const t of gw.localStream.getTracks()) if (t.kind === kind) t.enabled = !gw.off[kind];
    renderToggles();
  });
}
renderToggles();

if (gw.options.problem) toast(gw.options.problem, 8000);
if (params.get("room")) $("room-input").value = params.get("room");
if (params.get("name")) $("name-input").value = params.get("name");
window.addEventListener("beforeunload", () => send({ type: "leave" }));
