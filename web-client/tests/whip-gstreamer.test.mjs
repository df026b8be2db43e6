// A stock GStreamer webrtcbin publisher speaking WHIP itself (gst_whip.py: the offer POSTed with
// a Bearer join token, the 201 answer applied, DELETE at the end) sends VP8 + Opus; the project's
// web client in Chromium decodes it at the publisher's size, and the session resource's lifecycle
// shows in the gateway's REST view.
//
//   gst_whip.py [ns N] 10.248.X.2 ──veth── 10.248.X.1 gateway ── Chromium (test's namespace)
//
// libnice ignores loopback, so the publisher runs in a namespace of its own (as in
// gstreamer.test.mjs). Needs root, `ip netns` and Debian's GStreamer packages (see
// gstreamer.test.mjs); without them the test is skipped with the reason, unless
// REQUIRE_GSTREAMER_TEST=1. Media ports 48700-48799.

import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { after, before, test } from "node:test";
import { api, joinPage, launchChromium, removeStaleNamespaces, startGateway, waitFor } from "./harness.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const CLIENT = path.join(here, "gst_whip.py");
const PYTHON = process.env.GST_PYTHON || "/usr/bin/python3";
const SECONDS = 12;
const PREFIX = "gwsim-whip-";

const id = process.pid;
const ns = `${PREFIX}${id}`;
const veth = (s) => `gwh${id}${s}`.slice(-15);
const octet = 16 + (id % 230);
const net = (n) => `10.248.${octet}.${n}`;
const gatewayIp = net(1);
const clientIp = net(2);

let gateway;
let browser;
let nsCreated = false;
let skipReason = null;
let child;

function sh(cmd, args) {
  return execFileSync(cmd, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
}
const inNs = (cmd, ...args) => sh("ip", ["netns", "exec", ns, cmd, ...args]);

function cleanup() {
  if (child && child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  if (gateway && gateway.child.exitCode === null) gateway.child.kill("SIGKILL");
  if (nsCreated) {
    try {
      sh("ip", ["netns", "del", ns]);
    } catch {}
    nsCreated = false;
  }
}

process.on("exit", cleanup);
for (const sig of ["SIGINT", "SIGTERM"]) {
  process.on(sig, () => {
    cleanup();
    process.exit(130);
  });
}

before(async () => {
  try {
    if (typeof process.getuid === "function" && process.getuid() !== 0) throw new Error("not root");
    removeStaleNamespaces(new RegExp(`^(${PREFIX}(\\d+))\\b`));
    sh("ip", ["netns", "add", ns]);
    nsCreated = true;
    sh("ip", ["link", "add", veth("h"), "type", "veth", "peer", "name", veth("c"), "netns", ns]);
    inNs("ip", "link", "set", "lo", "up");
    inNs("ip", "addr", "add", `${clientIp}/30`, "dev", veth("c"));
    inNs("ip", "link", "set", veth("c"), "up");
    sh("ip", ["addr", "add", `${gatewayIp}/30`, "dev", veth("h")]);
    sh("ip", ["link", "set", veth("h"), "up"]);
  } catch (e) {
    cleanup();
    skipReason = `network namespaces are not available here (${String(e.message || e).split("\n")[0]})`;
  }
  if (!skipReason) {
    try {
      sh(PYTHON, [CLIENT, "--check"]);
    } catch (e) {
      cleanup();
      skipReason = `GStreamer webrtcbin from Python is not installed (${`${e.stdout || ""}${e.stderr || ""}`.trim().split("\n")[0]})`;
    }
  }
  if (skipReason) {
    if (process.env.REQUIRE_GSTREAMER_TEST === "1") throw new Error(`REQUIRE_GSTREAMER_TEST=1 but ${skipReason}`);
    return;
  }
  // The web client gets its token from the development route, which is off by default on an
  // address other than loopback.
  gateway = await startGateway({ host: gatewayIp, portMin: 48700, portMax: 48799, env: { GATEWAY__DEV__TOKEN_ROUTE: "on" } });
  // getUserMedia (the web client publishes its camera too) needs a secure context.
  browser = await launchChromium({ extraArgs: [`--unsafely-treat-insecure-origin-as-secure=${gateway.base}`] });
});

after(async () => {
  if (browser) await browser.close();
  if (gateway) await gateway.stop();
  cleanup();
});

test("GStreamer webrtcbin publishes VP8 + Opus over WHIP; Chromium decodes it", { timeout: 90000 }, async (t) => {
  if (skipReason) {
    t.skip(skipReason);
    return;
  }
  const room = await api(gateway.base, "POST", "/v1/rooms", { name: "gst-whip", max_participants: 4 });
  assert.equal(room.status, 201, JSON.stringify(room.body));
  const roomId = room.body.room_id;
  const tok = await api(gateway.base, "POST", `/v1/rooms/${roomId}/tokens`, { participant: "gst-whip-pub" });
  const endpoint = `${gateway.base}/v1/whip/gst-whip`;

  let stdout = "";
  let stderr = "";
  child = spawn("ip", ["netns", "exec", ns, PYTHON, CLIENT, "--url", endpoint, "--token", tok.body.token, "--seconds", String(SECONDS)], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  child.stdout.on("data", (d) => (stdout += d));
  child.stderr.on("data", (d) => (stderr += d));
  const exited = new Promise((r) => child.on("exit", (code, sig) => r(code ?? sig)));
  try {
    const watcher = await joinPage(browser, gateway.base, "gst-whip", "watcher");
    const decoded = async () =>
      watcher.evaluate(async () => {
        const pc = window.gw.sub.pc;
        if (!pc) return null;
        const out = {};
        (await pc.getStats()).forEach((s) => {
          if (s.type === "inbound-rtp") out[s.kind] = { framesDecoded: s.framesDecoded, frameWidth: s.frameWidth, frameHeight: s.frameHeight, packetsReceived: s.packetsReceived };
        });
        const el = document.querySelector('.tile[data-participant="gst-whip-pub"] video');
        out.tileWidth = el ? el.videoWidth : 0;
        return out;
      });
    const first = await waitFor("Chromium decoding the GStreamer WHIP publisher", async () => {
      const s = await decoded();
      return s?.video?.framesDecoded > 30 && s.audio?.packetsReceived > 30 && s.tileWidth > 0 ? s : null;
    }, 30000);
    await new Promise((r) => setTimeout(r, 3000));
    const later = await decoded();
    console.log(`Chromium decodes GStreamer over WHIP: ${later.video.frameWidth}x${later.video.frameHeight}, frames ${first.video.framesDecoded} -> ${later.video.framesDecoded}, audio packets ${later.audio.packetsReceived}`);
    assert.equal(`${later.video.frameWidth}x${later.video.frameHeight}`, "640x480");
    assert.ok(later.video.framesDecoded >= first.video.framesDecoded + 30, "frames keep being decoded");

    // The gateway's view of the live session: READY, VP8 and Opus.
    const participant = (await api(gateway.base, "GET", `/v1/rooms/${roomId}`)).body.participants.find((p) => p.participant_id === "gst-whip-pub");
    const connectionId = participant.connections[0].connection_id;
    const live = (await api(gateway.base, "GET", `/v1/connections/${connectionId}`)).body;
    assert.equal(live.state, "READY");
    const codecs = live.stats.codecs.map((c) => c.codec.split("/")[0]).sort();
    assert.deepEqual(codecs, ["opus", "vp8"], JSON.stringify(live.stats.codecs));

    // The client DELETEs its resource at the end: FINISHED (leave), and it leaves the room.
    const code = await Promise.race([exited, new Promise((r) => setTimeout(r, (SECONDS + 30) * 1000, "timeout"))]);
    const result = JSON.parse(stdout.trim().split("\n").pop() || "null");
    console.log(`gst_whip.py: ${JSON.stringify(result)}`);
    assert.equal(code, 0, `client exit code; its log:\n${stderr.split("\n").slice(-30).join("\n")}`);
    assert.equal(result.post_status, 201);
    assert.equal(result.delete_status, 200);
    assert.ok(result.resource.endsWith(`/v1/whip/${roomId}/${connectionId}`), result.resource);
    const end = (await api(gateway.base, "GET", `/v1/connections/${connectionId}`)).body;
    assert.equal(end.state, "FINISHED");
    assert.equal(end.events.at(-1).reason, "leave");
    assert.deepEqual(
      end.events.map((e) => e.event).filter((e) => !["SDP_PROCESSED", "CANDIDATE"].includes(e)),
      ["INITIAL", "GATHERED", "READY", "FINISHED"],
    );
    await waitFor("the publisher to leave the room", async () => {
      const ev = await watcher.evaluate(() => window.gw.events.map((m) => `${m.type}:${m.participant_id || ""}`));
      return ev.includes("participant_left:gst-whip-pub");
    }, 10000);
  } catch (e) {
    console.log(`gst_whip.py log (tail):\n${stderr.split("\n").slice(-30).join("\n")}`);
    console.log(`gateway log (tail):\n${gateway.log().split("\n").slice(-30).join("\n")}`);
    throw e;
  }
});
