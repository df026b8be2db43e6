// WHIP ingest and WHEP playback with independent browser clients: the npm libraries
// @eyevinn/whip-web-client (publishing Chromium's fake camera) and @eyevinn/webrtc-player (playing
// over WHEP), bundled with esbuild and served from this test's own HTTP server — another origin
// than the gateway's, so the CORS headers and preflights are exercised as on a real site. What
// they send is decoded by the project's web client (WHIP), or by the player itself (WHEP): frames
// decoded keep increasing at the publisher's size. Media ports 48600-48699.

import assert from "node:assert/strict";
import http from "node:http";
import path from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";
import { api, freePort, joinPage, launchChromium, startGateway, waitFor } from "./harness.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));

let gateway;
let browser;
let site; // { server, base }

/** The two libraries as one script that puts them on `window`. */
async function bundle() {
  const out = await esbuild.build({
    stdin: {
      contents: `import { WHIPClient } from "@eyevinn/whip-web-client";
                 import { WebRTCPlayer } from "@eyevinn/webrtc-player";
                 window.WHIPClient = WHIPClient;
                 window.WebRTCPlayer = WebRTCPlayer;`,
      resolveDir: here,
      loader: "js",
    },
    bundle: true,
    format: "iife",
    write: false,
    logLevel: "error",
  });
  return out.outputFiles[0].text;
}

// Every peer connection the page makes is kept, so the test can read its statistics.
const PAGE = `<!doctype html><html><head><meta charset="utf-8"><title>WHIP/WHEP test page</title>
<script>
  window.pcs = [];
  const Native = window.RTCPeerConnection;
  window.RTCPeerConnection = function (...args) { const pc = new Native(...args); window.pcs.push(pc); return pc; };
  window.RTCPeerConnection.prototype = Native.prototype;
</script>
<script src="/libs.js"></script></head>
<body><video id="v" autoplay muted playsinline></video></body></html>`;

before(async () => {
  const libs = await bundle();
  gateway = await startGateway({ portMin: 48600, portMax: 48699 });
  const port = await freePort();
  const server = http.createServer((req, res) => {
    if (req.url === "/libs.js") {
      res.writeHead(200, { "content-type": "text/javascript" });
      res.end(libs);
    } else {
      res.writeHead(200, { "content-type": "text/html" });
      res.end(PAGE);
    }
  });
  await new Promise((r) => server.listen(port, "127.0.0.1", r));
  site = { server, base: `http://127.0.0.1:${port}` };
  // Three simulcast layers at 640x480 (Chromium allows two there by default).
  browser = await launchChromium({ extraArgs: ["--force-fieldtrials=WebRTC-LegacySimulcastLayerLimit/Disabled/"] });
});

after(async () => {
  if (browser) await browser.close();
  if (site) await new Promise((r) => site.server.close(r));
  if (gateway) await gateway.stop();
});

async function roomWithToken(name, participant) {
  const room = await api(gateway.base, "POST", "/v1/rooms", { name, max_participants: 8 });
  assert.equal(room.status, 201, JSON.stringify(room.body));
  const tok = await api(gateway.base, "POST", `/v1/rooms/${room.body.room_id}/tokens`, { participant });
  assert.equal(tok.status, 201, JSON.stringify(tok.body));
  return { roomId: room.body.room_id, token: tok.body.token };
}

async function libraryPage() {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.on("pageerror", (e) => console.error(`[library page] ${e.message}`));
  page.on("console", (m) => m.type() === "error" && console.error(`[library page] ${m.text()}`));
  await page.goto(`${site.base}/`);
  return page;
}

/** Inbound video and audio of every peer connection of a library page. */
const inboundOf = (page) =>
  page.evaluate(async () => {
    const out = { video: null, audio: null };
    for (const pc of window.pcs) {
      (await pc.getStats()).forEach((s) => {
        if (s.type === "inbound-rtp") out[s.kind] = { framesDecoded: s.framesDecoded, frameWidth: s.frameWidth, frameHeight: s.frameHeight, packetsReceived: s.packetsReceived };
      });
    }
    return out;
  });

/** The web client page's inbound video from one participant (its tile) and its decoder stats. */
const webClientInbound = (page, participant) =>
  page.evaluate(async (who) => {
    const pc = window.gw.sub.pc;
    if (!pc) return null;
    let video = null;
    (await pc.getStats()).forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") video = { framesDecoded: s.framesDecoded, frameWidth: s.frameWidth, frameHeight: s.frameHeight };
    });
    const el = document.querySelector(`.tile[data-participant="${who}"] video`);
    return { video, tileWidth: el ? el.videoWidth : 0 };
  }, participant);

const history = async (id) => (await api(gateway.base, "GET", `/v1/connections/${id}`)).body;
const states = (d) => d.events.map((e) => e.event).filter((e) => !["SDP_PROCESSED", "CANDIDATE"].includes(e));

test("@eyevinn/whip-web-client publishes Chromium's camera over WHIP; the web client decodes it", { timeout: 90000 }, async () => {
  const { roomId, token } = await roomWithToken("whip-browser", "whip-cam");
  const cam = await libraryPage();
  const endpoint = `${gateway.base}/v1/whip/whip-browser`;
  const resource = await cam.evaluate(async ({ endpoint, token }) => {
    const stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: true });
    document.getElementById("v").srcObject = stream;
    window.client = new window.WHIPClient({ endpoint, opts: { authkey: token, iceServers: [] } });
    await window.client.ingest(stream);
    return window.client.getResourceUrl();
  }, { endpoint, token });
  assert.match(resource, new RegExp(`/v1/whip/${roomId}/c_[0-9a-f]+$`), "Location of the session resource");
  const connectionId = resource.split("/").pop();

  const watcher = await joinPage(browser, gateway.base, "whip-browser", "watcher");
  const first = await waitFor("the web client decoding the WHIP publisher", async () => {
    const s = await webClientInbound(watcher, "whip-cam");
    return s && s.video && s.video.framesDecoded > 20 && s.tileWidth > 0 ? s : null;
  }, 30000);
  await new Promise((r) => setTimeout(r, 2000));
  const later = await webClientInbound(watcher, "whip-cam");
  console.log(`web client decodes the WHIP publisher: ${later.video.frameWidth}x${later.video.frameHeight}, frames ${first.video.framesDecoded} -> ${later.video.framesDecoded}`);
  assert.equal(`${later.video.frameWidth}x${later.video.frameHeight}`, "640x480", "the camera's size");
  assert.ok(later.video.framesDecoded >= first.video.framesDecoded + 20, "frames keep being decoded");

  // The room sees a publisher like any other; its connection walks the erizo states.
  const d = await history(connectionId);
  assert.equal(d.role, "publish");
  assert.equal(d.participant_id, "whip-cam");
  assert.deepEqual(states(d), ["INITIAL", "GATHERED", "READY"]);
  // The watcher joined after it: its streams came in \`joined\`, as any publisher's do.
  const listed = await watcher.evaluate(() => window.gw.events.find((m) => m.type === "joined").streams);
  assert.deepEqual(listed.filter((s) => s.participant_id === "whip-cam").map((s) => s.kind).sort(), ["audio", "video"]);

  // The library ends its session with DELETE: FINISHED (leave), and the room hears it leave.
  await cam.evaluate(() => window.client.destroy());
  await waitFor("whip-cam to leave the room", async () => {
    const ev = await watcher.evaluate(() => window.gw.events.map((m) => `${m.type}:${m.participant_id || ""}`));
    return ev.includes("participant_left:whip-cam");
  }, 10000);
  const end = await history(connectionId);
  assert.equal(end.state, "FINISHED");
  assert.equal(end.events.at(-1).reason, "leave");
  await watcher.context().close();
  await cam.context().close();
});

test("@eyevinn/webrtc-player plays a Chromium publisher over WHEP", { timeout: 90000 }, async () => {
  const { roomId, token } = await roomWithToken("whep-browser", "player");
  const alice = await joinPage(browser, gateway.base, "whep-browser", "alice");
  await waitFor("alice publishing", async () => {
    const r = await api(gateway.base, "GET", `/v1/rooms/${roomId}`);
    return (r.body.streams || []).filter((s) => s.participant_id === "alice").length === 2;
  }, 20000);

  const player = await libraryPage();
  const url = `${gateway.base}/v1/whep/${roomId}/alice`;
  await player.evaluate(async ({ url, token }) => {
    const video = document.getElementById("v");
    window.player = new window.WebRTCPlayer({ video, type: "whep", iceServers: [] });
    await window.player.load(new URL(url), `Bearer ${token}`);
  }, { url, token });
  const first = await waitFor("the player decoding alice", async () => {
    const s = await inboundOf(player);
    const size = await player.evaluate(() => [document.getElementById("v").videoWidth, document.getElementById("v").videoHeight]);
    return s.video && s.video.framesDecoded > 20 && s.audio && s.audio.packetsReceived > 20 && size[0] > 0 ? { ...s, size } : null;
  }, 30000);
  await new Promise((r) => setTimeout(r, 2000));
  const later = await inboundOf(player);
  console.log(`webrtc-player plays alice: ${first.size.join("x")} on the element, frames ${first.video.framesDecoded} -> ${later.video.framesDecoded}, audio packets ${later.audio.packetsReceived}`);
  assert.deepEqual(first.size, [640, 480], "the element shows the publisher's size");
  assert.ok(later.video.framesDecoded >= first.video.framesDecoded + 20, "frames keep being decoded");

  // The player's connection is the viewer's subscribe connection, chosen for by the allocator.
  const viewer = (await api(gateway.base, "GET", `/v1/rooms/${roomId}`)).body.participants.find((p) => p.participant_id === "player");
  assert.ok(viewer, "the WHEP viewer is a participant of the room");
  const connectionId = viewer.connections[0].connection_id;
  const d = await history(connectionId);
  assert.equal(d.role, "subscribe");
  assert.deepEqual(states(d), ["INITIAL", "GATHERED", "READY"]);
  assert.equal(d.stats.layers.length, 1, JSON.stringify(d.stats.layers));

  // The publisher leaves: the WHEP session ends FINISHED with the reason, the viewer leaves.
  await alice.evaluate(() => window.gw.leave());
  const end = await waitFor("the WHEP connection to end", async () => {
    const h = await history(connectionId);
    return h.state === "FINISHED" ? h : null;
  }, 10000);
  assert.equal(end.events.at(-1).reason, "publisher_left");
  const room = (await api(gateway.base, "GET", `/v1/rooms/${roomId}`)).body;
  assert.deepEqual(room.participants, [], "nobody left in the room");
  await player.context().close();
  await alice.context().close();
});

test("a WHEP viewer of a simulcast publisher gets the layer its bandwidth estimate allows", { timeout: 90000 }, async () => {
  const { roomId, token } = await roomWithToken("whep-simulcast", "player");
  const alice = await joinPage(browser, gateway.base, "whep-simulcast", "alice", "simulcast=1");
  await waitFor("alice's three layers", async () => {
    const r = await api(gateway.base, "GET", `/v1/rooms/${roomId}`);
    const video = (r.body.streams || []).find((s) => s.participant_id === "alice" && s.kind === "video");
    return video && (video.layers || []).filter((l) => l.active).length === 3;
  }, 20000);
  const player = await libraryPage();
  await player.evaluate(async ({ url, token }) => {
    window.player = new window.WebRTCPlayer({ video: document.getElementById("v"), type: "whep", iceServers: [] });
    await window.player.load(new URL(url), `Bearer ${token}`);
  }, { url: `${gateway.base}/v1/whep/${roomId}/alice`, token });
  const WIDTH = { q: 160, h: 320, f: 640 };
  const seen = await waitFor("a layer chosen and decoded at its size", async () => {
    const s = await inboundOf(player);
    const viewer = (await api(gateway.base, "GET", `/v1/rooms/${roomId}`)).body.participants.find((p) => p.participant_id === "player");
    if (!viewer || !s.video || !(s.video.framesDecoded > 20)) return null;
    const d = await history(viewer.connections[0].connection_id);
    const layer = d.stats.layers?.[0];
    return layer?.rid && layer.rid === layer.target_rid && s.video.frameWidth === WIDTH[layer.rid] ? { layer, video: s.video, bwe: d.stats.bwe_estimate_bps } : null;
  }, 30000);
  console.log(`WHEP viewer of a simulcast publisher: layer ${seen.layer.rid} (${seen.video.frameWidth}x${seen.video.frameHeight}), estimate ${seen.bwe} bps`);
  assert.ok(seen.bwe > 0, "the viewer's bandwidth is estimated");
  await player.context().close();
  await alice.context().close();
});
