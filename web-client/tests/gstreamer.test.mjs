// Stock GStreamer 1.22 webrtcbin clients (Debian 12, libnice 0.1.21) through the gateway: one
// publishes VP8 + Opus, the other subscribes and decodes, for 60 s with stock settings — webrtcbin's
// default RSA-2048 DTLS certificate, and libnice without consent freshness, which after nomination
// sends no Binding requests at all, only a Binding indication every 25 s. Both must stay READY the
// whole time and the subscriber must keep decoding the publisher's frames.
//
//   gst_client.py (publish) ┐
//   gst_client.py (subscribe)┴ [ns N] 10.249.X.2 ──veth── 10.249.X.1 gateway (test's namespace)
//
// libnice ignores loopback and pins its sockets to real interfaces, so the clients run only inside
// a namespace of their own whose one route is the /30 to the gateway's veth; the gateway binds its
// HTTP and media to the host end of that veth.
//
// GST_SECONDS (default 60) sets how long each client stays READY; GST_TRACE=1 prints the clients'
// progress live. Needs root, `ip netns`, and Debian's python3-gi, python3-gst-1.0,
// gir1.2-gst-plugins-{base,bad}-1.0, gstreamer1.0-plugins-{base,good,bad}, gstreamer1.0-nice and
// python3-websocket (for /usr/bin/python3). Without them the test is skipped with the reason, unless
// REQUIRE_GSTREAMER_TEST=1, which makes it fail instead.

import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { after, before, test } from "node:test";
import { api, removeStaleNamespaces, startGateway, waitFor } from "./harness.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const CLIENT = path.join(here, "gst_client.py");
const PYTHON = process.env.GST_PYTHON || "/usr/bin/python3"; // Debian's, where python3-gi is
const SECONDS = Number(process.env.GST_SECONDS || "60");
const TRACE = process.env.GST_TRACE === "1";
// The publisher's video: the subscriber must decode at least this share of its frames.
const VIDEO = { width: 640, height: 480, fps: 30 };
const MIN_DECODED_SHARE = 0.6;
const PREFIX = "gwsim-gst-";

const id = process.pid;
const ns = `${PREFIX}${id}`;
const veth = (s) => `gsg${id}${s}`.slice(-15);
const octet = 16 + (id % 230);
const net = (n) => `10.249.${octet}.${n}`;
const gatewayIp = net(1);
const clientIp = net(2);

let gateway;
let nsCreated = false;
let skipReason = null;
const children = new Set();

function sh(cmd, args) {
  return execFileSync(cmd, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
}
const inNs = (cmd, ...args) => sh("ip", ["netns", "exec", ns, cmd, ...args]);

function cleanup() {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill("SIGKILL");
  children.clear();
  // On an interrupted run the gateway would outlive the test; after() has stopped it otherwise.
  if (gateway && gateway.child.exitCode === null) gateway.child.kill("SIGKILL");
  if (nsCreated) {
    try {
      sh("ip", ["netns", "del", ns]); // the veth pair goes with it
    } catch {}
    nsCreated = false;
  }
}

function setUpNamespace() {
  if (typeof process.getuid === "function" && process.getuid() !== 0) throw new Error("not root");
  removeStaleNamespaces(new RegExp(`^(${PREFIX}(\\d+))\\b`));
  sh("ip", ["netns", "add", ns]);
  nsCreated = true;
  sh("ip", ["link", "add", veth("h"), "type", "veth", "peer", "name", veth("c"), "netns", ns]);
  inNs("ip", "link", "set", "lo", "up");
  // A /30: the connected route to the gateway's veth is the namespace's only route.
  inNs("ip", "addr", "add", `${clientIp}/30`, "dev", veth("c"));
  inNs("ip", "link", "set", veth("c"), "up");
  sh("ip", ["addr", "add", `${gatewayIp}/30`, "dev", veth("h")]);
  sh("ip", ["link", "set", veth("h"), "up"]);
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
    setUpNamespace();
  } catch (e) {
    cleanup();
    skipReason = `network namespaces are not available here (${String(e.message || e).split("\n")[0]})`;
  }
  if (!skipReason) {
    try {
      sh(PYTHON, [CLIENT, "--check"]);
    } catch (e) {
      cleanup();
      const out = `${e.stdout || ""}${e.stderr || ""}`.trim() || String(e.message || e);
      skipReason = `GStreamer webrtcbin from Python is not installed (${out.split("\n")[0]}; Debian: python3-gi python3-gst-1.0 gir1.2-gst-plugins-base-1.0 gir1.2-gst-plugins-bad-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-nice python3-websocket)`;
    }
  }
  if (skipReason) {
    if (process.env.REQUIRE_GSTREAMER_TEST === "1") throw new Error(`REQUIRE_GSTREAMER_TEST=1 but ${skipReason}`);
    return;
  }
  gateway = await startGateway({ host: gatewayIp, portMin: 43400, portMax: 43499 });
});

after(async () => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill("SIGKILL");
  if (gateway) await gateway.stop();
  cleanup();
});

/**
 * Run gst_client.py inside the namespace. `result` resolves with its JSON result line (or null if
 * it exited without one); `leave()` ends its linger (it then sends `leave`) and resolves with its
 * exit code.
 */
function runClient(role, token) {
  const url = `ws://${gatewayIp}:${new URL(gateway.base).port}/v1/ws?token=${encodeURIComponent(token)}`;
  const args = [
    "netns", "exec", ns, PYTHON, CLIENT,
    "--role", role, "--url", url, "--seconds", String(SECONDS), "--linger", "20", "--ready-timeout", "20",
    "--width", String(VIDEO.width), "--height", String(VIDEO.height), "--fps", String(VIDEO.fps),
  ];
  const child = spawn("ip", args, { stdio: ["pipe", "pipe", "pipe"] });
  children.add(child);
  let stderr = "";
  let stdout = "";
  let resolveResult;
  const result = new Promise((r) => (resolveResult = r));
  const exited = new Promise((r) => child.on("exit", (code, sig) => r(code ?? sig)));
  child.stdout.on("data", (d) => {
    stdout += d;
    for (;;) {
      const nl = stdout.indexOf("\n");
      if (nl < 0) break;
      const line = stdout.slice(0, nl).trim();
      stdout = stdout.slice(nl + 1);
      if (!line.startsWith("{")) continue;
      try {
        const v = JSON.parse(line);
        if (v.role) resolveResult(v);
        else if (v.after_linger) console.log(`${role}: after lingering ${JSON.stringify(v.after_linger)}`);
      } catch {}
    }
  });
  let partial = "";
  child.stderr.on("data", (d) => {
    stderr += d;
    if (!TRACE) return;
    const lines = (partial + d).split("\n");
    partial = lines.pop();
    for (const l of lines) process.stderr.write(`[${role}] ${l}\n`);
  });
  exited.then(() => resolveResult(null));
  return {
    child,
    result,
    log: () => stderr,
    async leave() {
      if (child.exitCode === null && child.signalCode === null) child.stdin.end();
      const t = setTimeout(() => child.kill("SIGKILL"), 10000);
      const code = await exited;
      clearTimeout(t);
      children.delete(child);
      return code;
    },
  };
}

const stateEvents = (detail) =>
  (detail?.events || []).filter((e) => ["INITIAL", "GATHERED", "READY", "FINISHED", "FAILED"].includes(e.event));

test(`stock GStreamer webrtcbin publishes and subscribes through the gateway for ${SECONDS} s`, { timeout: (SECONDS + 75) * 1000 }, async (t) => {
  if (skipReason) {
    t.skip(skipReason);
    return;
  }
  const room = await api(gateway.base, "POST", "/v1/rooms", { name: "gst-room", max_participants: 4 });
  assert.equal(room.status, 201, JSON.stringify(room.body));
  const roomId = room.body.room_id;
  const token = async (participant) => {
    const r = await api(gateway.base, "POST", `/v1/rooms/${roomId}/tokens`, { participant, ttl_s: 600 });
    assert.ok(r.status === 200 || r.status === 201, JSON.stringify(r.body));
    return r.body.token;
  };
  const pubToken = await token("gst-pub");
  const subToken = await token("gst-sub");

  const t0 = Date.now();
  const pub = runClient("publish", pubToken);
  let sub;
  try {
    // The subscriber starts once the publisher's connection is READY (or over), so its first offer
    // already carries the publisher's streams.
    const pubState = await waitFor("the publisher's connection to be READY or over", async () => {
      if (pub.child.exitCode !== null) return "exited";
      const r = await api(gateway.base, "GET", `/v1/rooms/${roomId}`);
      const c = (r.body?.participants || []).find((p) => p.participant_id === "gst-pub")?.connections?.find((x) => x.role === "publish");
      return c && ["READY", "FAILED", "FINISHED"].includes(c.state) ? c.state : null;
    }, 25000, 100);
    console.log(`publisher's connection ${pubState} ${((Date.now() - t0) / 1000).toFixed(1)} s after it started`);
    sub = runClient("subscribe", subToken);

    const results = {};
    let timer;
    const deadline = new Promise((r) => (timer = setTimeout(r, (SECONDS + 40) * 1000, "timeout")));
    for (const [role, c] of [["publish", pub], ["subscribe", sub]]) {
      const v = await Promise.race([c.result, deadline]);
      results[role] = v === "timeout" ? null : v;
    }
    clearTimeout(timer);

    // The gateway's view while both clients still hold their calls (they linger until told).
    const rest = {};
    for (const [role, r] of Object.entries(results)) {
      if (r?.connection_id) rest[role] = (await api(gateway.base, "GET", `/v1/connections/${r.connection_id}`)).body;
    }
    const codes = { publish: await pub.leave(), subscribe: await sub.leave() };

    const summary = {};
    for (const role of ["publish", "subscribe"]) {
      const r = results[role];
      const d = rest[role];
      const hist = stateEvents(d);
      const at = (ev) => hist.find((e) => e.event === ev)?.at;
      summary[role] = r && {
        connection_id: r.connection_id,
        client_exit_code: codes[role],
        client_time_to_ready_s: r.time_to_ready_s,
        gateway_initial_to_ready_s: at("INITIAL") && at("READY") ? (Date.parse(at("READY")) - Date.parse(at("INITIAL"))) / 1000 : null,
        seconds_ready: r.seconds_ready,
        states_seen_by_client: r.states,
        failed: r.failed,
        finished: r.finished,
        gateway_state_at_end: d?.state,
        gateway_history: hist.map((e) => `${e.event}${e.reason ? `(${e.reason})` : ""}`),
        frames: r.frames,
        frames_kind: r.frames_kind,
        fps: r.fps,
        size: r.width && `${r.width}x${r.height}`,
        frames_last10: r.frames_last10,
        audio_buffers: r.audio_buffers,
        ice_states: r.ice_states,
        selected_pair: d?.stats?.selected_pair,
        srtp_profile: d?.stats?.srtp_profile,
        problems: r.problems,
      };
    }
    console.log(`gstreamer run (${SECONDS} s): ${JSON.stringify(summary, null, 2)}`);
    if (results.subscribe) console.log(`subscriber decoded frames per second READY: ${JSON.stringify(results.subscribe.frames_series)}`);

    // The reasons first: a FAILED connection says why in the gateway's history.
    for (const role of ["publish", "subscribe"]) {
      const r = results[role];
      assert.ok(r, `the ${role} client gave no result; its log:\n${(role === "publish" ? pub : sub).log().split("\n").slice(-40).join("\n")}`);
      const failed = stateEvents(rest[role]).filter((e) => e.event === "FAILED" || e.event === "FINISHED");
      const fromClient = r.failed ? `FAILED: ${r.failed}` : r.finished ? `FINISHED: ${r.finished}` : null;
      if (failed.length) {
        assert.fail(
          `${role} connection ${r.connection_id} ended ${r.time_to_ready_s == null ? "before READY" : `${r.seconds_ready} s after READY`}: ` +
            failed.map((e) => `${e.event} ${e.code} reason ${JSON.stringify(e.reason)}`).join("; "),
        );
      }
      assert.equal(fromClient, null, `${role} client saw its connection end: ${fromClient}`);
      assert.ok(r.time_to_ready_s != null, `${role} connection never READY: ${r.end}; states ${JSON.stringify(r.states)}`);
      assert.equal(rest[role]?.state, "READY", `${role} connection state at the end per GET /v1/connections: ${rest[role]?.state}`);
      assert.ok(r.seconds_ready >= SECONDS - 0.5, `${role} READY for ${r.seconds_ready} s of ${SECONDS}: ${r.end}`);
      assert.deepEqual(r.problems, [], `${role} client problems`);
      assert.equal(codes[role], 0, `${role} client exit code`);
    }
    const s = results.subscribe;
    const expected = VIDEO.fps * SECONDS;
    assert.equal(`${s.width}x${s.height}`, `${VIDEO.width}x${VIDEO.height}`, "decoded frame size is the publisher's");
    assert.ok(s.frames >= MIN_DECODED_SHARE * expected, `subscriber decoded ${s.frames} frames of ~${expected} (${VIDEO.fps} fps for ${SECONDS} s); need ${MIN_DECODED_SHARE * 100}%`);
    assert.ok(s.frames_last10 > 0, `frames still advance in the last 10 s: ${JSON.stringify(s.frames_series)}`);
  } catch (e) {
    for (const [role, c] of [["publish", pub], ["subscribe", sub]]) {
      if (c) console.log(`${role} client log (tail):\n${c.log().split("\n").slice(-25).join("\n")}`);
    }
    console.log(`gateway log (tail):\n${gateway.log().split("\n").slice(-30).join("\n")}`);
    throw e;
  } finally {
    for (const c of [pub, sub]) if (c) await c.leave();
  }
});
