// Shared pieces of the browser tests: start a real gateway binary on free ports, launch Debian's
// Chromium with the flags this machine needs, and small polling helpers.

import { execFileSync, spawn } from "node:child_process";
import { mkdirSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
export const repoRoot = path.resolve(here, "..", "..");
export const outputDir = path.join(repoRoot, "test-output");

export const API_KEY = "browser-test-key";

export async function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
    srv.on("error", reject);
  });
}

/**
 * Start the gateway binary; resolves once /healthz answers. By default on 127.0.0.1 and a free
 * port; `host`/`port` choose the HTTP address, `wrap(bin)` returns the `[command, args]` that
 * runs it (e.g. `ip netns exec …`), and `healthy(url)` checks /healthz where this process
 * cannot reach it itself. Media binds to `host` too unless `env` says otherwise.
 */
export async function startGateway({ portMin, portMax, env = {}, host = "127.0.0.1", port, wrap, healthy } = {}) {
  const bin = process.env.GATEWAY_BIN || path.join(repoRoot, "target", "debug", "gateway");
  const httpPort = port ?? (await freePort());
  const base = `http://${host}:${httpPort}`;
  const [command, args] = wrap ? wrap(bin) : [bin, []];
  const isUp = healthy ?? (async (url) => (await fetch(url)).ok);
  const child = spawn(command, args, {
    env: {
      ...process.env,
      GATEWAY__HTTP__BIND: `${host}:${httpPort}`,
      GATEWAY__MEDIA__BIND_IP: host,
      GATEWAY__MEDIA__PORT_MIN: String(portMin ?? 43000),
      GATEWAY__MEDIA__PORT_MAX: String(portMax ?? 43099),
      GATEWAY__AUTH__API_KEY: API_KEY,
      GATEWAY__LOG__LEVEL: "info,str0m=warn",
      ...env,
    },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let log = "";
  child.stdout.on("data", (d) => (log += d));
  child.stderr.on("data", (d) => (log += d));
  const exited = new Promise((resolve) => child.on("exit", resolve));
  // An interrupted test run (an uncaught error, or process.exit from a signal handler) must not
  // leave the gateway behind holding its ports: kill it as this process exits.
  const killOnExit = () => {
    if (child.exitCode === null) child.kill("SIGKILL");
  };
  process.on("exit", killOnExit);
  child.on("exit", () => process.off("exit", killOnExit));
  const deadline = Date.now() + 15000;
  for (;;) {
    try {
      if (await isUp(`${base}/healthz`)) break;
    } catch {}
    if (Date.now() > deadline || child.exitCode !== null) {
      child.kill("SIGKILL");
      throw new Error(`gateway did not start:\n${log}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  return {
    base,
    child,
    log: () => log,
    async stop() {
      child.kill("SIGTERM");
      const t = setTimeout(() => child.kill("SIGKILL"), 8000);
      const code = await exited;
      clearTimeout(t);
      return code;
    },
  };
}

/** `executablePath` may be a wrapper script (e.g. one that enters a network namespace). */
export async function launchChromium({ executablePath, extraArgs = [] } = {}) {
  // playwright gives every launch a fresh temporary profile (its own --user-data-dir).
  return chromium.launch({
    executablePath: executablePath || process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--use-fake-device-for-media-stream",
      "--use-fake-ui-for-media-stream",
      "--allow-loopback-in-peer-connection",
      "--autoplay-policy=no-user-gesture-required",
      ...extraArgs,
    ],
  });
}

/**
 * Open the web client in a fresh browser context of `browser` and press Join: `room` as `name`,
 * with extra URL parameters in `query` (e.g. "simulcast=1"). The participant id is `name` too
 * (`id=`), so tests can find each other's streams by it; the page otherwise makes its own id.
 */
export async function joinPage(browser, base, room, name, query = "", { viewport = { width: 1280, height: 800 } } = {}) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.on("pageerror", (e) => console.error(`[${name}] page error: ${e.message}`));
  await page.goto(`${base}/?room=${encodeURIComponent(room)}&name=${encodeURIComponent(name)}&id=${encodeURIComponent(name)}${query ? `&${query}` : ""}`);
  await page.click("#join-button");
  return page;
}

export async function waitFor(what, fn, timeoutMs = 20000, everyMs = 200) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; last: ${JSON.stringify(last, null, 0)}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

export function ensureOutputDir() {
  mkdirSync(outputDir, { recursive: true });
  return outputDir;
}

export async function api(base, method, route, body) {
  const r = await fetch(`${base}${route}`, {
    method,
    headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  return { status: r.status, body: text ? JSON.parse(text) : null };
}

/** Sum of a Prometheus metric's samples over all label sets (0 when absent). */
export async function metric(base, name) {
  const text = await (await fetch(`${base}/metrics`)).text();
  let sum = 0;
  for (const line of text.split("\n")) {
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/);
    if (m && m[1] === name) sum += Number(m[3]);
  }
  return sum;
}

/** Inbound and outbound RTP stats of a page's connections, for the figures the tests report. */
export async function rtpStats(page) {
  return page.evaluate(async () => {
    const pick = (s, keys) => Object.fromEntries(keys.filter((k) => s[k] !== undefined).map((k) => [k, s[k]]));
    const out = { inbound: {}, outbound: [] };
    if (window.gw.sub.pc) {
      const stats = await window.gw.sub.pc.getStats();
      stats.forEach((s) => {
        if (s.type !== "inbound-rtp") return;
        out.inbound[s.kind] = pick(s, [
          "framesDecoded", "framesReceived", "framesDropped", "frameWidth", "frameHeight", "keyFramesDecoded",
          "freezeCount", "totalFreezesDuration", "pauseCount", "packetsReceived", "packetsLost", "nackCount",
          "pliCount", "firCount", "retransmittedPacketsReceived", "jitter", "bytesReceived",
        ]);
      });
    }
    if (window.gw.pub.pc) {
      const stats = await window.gw.pub.pc.getStats();
      stats.forEach((s) => {
        if (s.type !== "outbound-rtp") return;
        out.outbound.push(pick(s, [
          "kind", "rid", "active", "frameWidth", "frameHeight", "framesEncoded", "framesSent", "keyFramesEncoded",
          "packetsSent", "retransmittedPacketsSent", "nackCount", "pliCount", "targetBitrate", "bytesSent",
          "qualityLimitationReason", "scalabilityMode", "encoderImplementation",
        ]));
      });
    }
    return out;
  });
}

/**
 * Remove the network namespaces that earlier runs of a test left behind when they died: those
 * `pattern` matches (group 1: the namespace's name, group 2: the id of the process that made
 * it) whose process is gone.
 */
export function removeStaleNamespaces(pattern) {
  let list = "";
  try {
    list = execFileSync("ip", ["netns", "list"], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
  } catch {
    return;
  }
  for (const line of list.split("\n")) {
    const m = line.match(pattern);
    if (!m) continue;
    let alive = true;
    try {
      process.kill(Number(m[2]), 0);
    } catch (e) {
      alive = e.code !== "ESRCH";
    }
    if (!alive) {
      try {
        execFileSync("ip", ["netns", "del", m[1]], { stdio: "ignore" });
        console.log(`removed stale namespace ${m[1]}`);
      } catch {}
    }
  }
}

/** How `viewer` shows `pid`'s tile, as drawn: video or avatar, muted mark, speaking ring (the
 * `speaking` class with its ring visible). `null` while the tile is not there. */
export function tileState(viewer, pid) {
  return viewer.evaluate((pid) => {
    const t = document.querySelector(`.tile[data-participant="${pid}"]`);
    if (!t) return null;
    const shown = (el) => {
      const r = el.getBoundingClientRect();
      return r.width > 0 && r.height > 0 && getComputedStyle(el).visibility !== "hidden";
    };
    const tr = t.getBoundingClientRect();
    const mark = t.querySelector(".mic-off");
    const mr = mark.getBoundingClientRect();
    return {
      video: shown(t.querySelector("video")) && !shown(t.querySelector(".avatar")),
      avatar: shown(t.querySelector(".avatar")) ? t.querySelector(".avatar span").textContent : null,
      micMuted: shown(mark) && mr.left >= tr.left && mr.right <= tr.right && mr.bottom <= tr.bottom,
      speaking: t.classList.contains("speaking") && getComputedStyle(t, "::after").borderTopColor !== "rgba(0, 0, 0, 0)",
    };
  }, pid);
}
