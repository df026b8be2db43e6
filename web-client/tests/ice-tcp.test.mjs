// ICE-TCP: a Chromium whose UDP is blocked, with no TURN server, reaches the gateway over TCP
// (the gateway's passive TCP candidate on media.tcp_port, RFC 6544) and has a call. Chromium runs
// in its own network namespace behind a router namespace whose firewall drops every UDP
// datagram in both directions (TCP — the page, the WebSocket and ICE-TCP — passes):
//
//   Chromium [ns C] 10.248.X.2 ──veth── .1 [ns R, router: UDP dropped] .5 ──veth── .6 gateway (test's ns)
//
// Two pages in that Chromium join a room (each publishes and subscribes): all four connections
// must reach READY over TCP, each page must decode the other's video (one of them every second
// for 5 s, without a freeze), Chromium's selected pairs and the gateway's connection stats must
// show TCP, and the router must have dropped the UDP Chromium tried. A second, unfirewalled
// Chromium on the same gateway must still pick UDP (the TCP candidate is a fallback, below the
// UDP one). Ports 50200 (ICE-TCP), 50201 (HTTP) and 50210-50249 (UDP media, unreachable from the
// firewalled namespace).
//
// Needs root, `ip netns` and iptables. Without them the test is skipped with the reason, unless
// REQUIRE_ICE_TCP_TEST=1 (scripts/test.sh sets it when it runs as root), which makes it fail.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { api, joinPage, launchChromium, metric, startGateway, waitFor } from "./harness.mjs";
import { RoutedClient } from "./netlab.mjs";

const TCP_PORT = 50200;
const HTTP_PORT = 50201;

const lab = new RoutedClient("icetcp-", "itc", 248);
const { clientIp, gatewayIp } = lab;

let gateway;
let browser;
let skipReason = null;

/** UDP datagrams the router dropped: { fromChromium, toChromium }. */
function udpDropped() {
  const rows = lab.inRouter("iptables", "-L", "FORWARD", "-v", "-n", "-x")
    .split("\n")
    .map((l) => l.trim().split(/\s+/))
    .filter((c) => /^\d+$/.test(c[0]) && c.includes("DROP"));
  const count = (dev) => Number(rows.find((c) => c.includes(dev))?.[0] ?? NaN);
  return { fromChromium: count(lab.veth("r")), toChromium: count(lab.veth("s")) };
}

before(async () => {
  try {
    lab.setUp();
    // The firewall: in transit (a drop in the client's own OUTPUT chain would fail its sendmsg,
    // which a real firewall never tells it), every UDP datagram either way, counted per direction.
    lab.inRouter("iptables", "-A", "FORWARD", "-i", lab.veth("r"), "-p", "udp", "-j", "DROP");
    lab.inRouter("iptables", "-A", "FORWARD", "-i", lab.veth("s"), "-p", "udp", "-j", "DROP");
  } catch (e) {
    lab.cleanup();
    skipReason = `network namespaces with iptables are not available here (${String(e.message || e).split("\n")[0]})`;
    if (process.env.REQUIRE_ICE_TCP_TEST === "1") throw new Error(`REQUIRE_ICE_TCP_TEST=1 but ${skipReason}`);
    return;
  }
  gateway = await startGateway({
    host: gatewayIp,
    port: HTTP_PORT,
    portMin: 50210,
    portMax: 50249,
    env: { GATEWAY__DEV__TOKEN_ROUTE: "on", GATEWAY__MEDIA__TCP_PORT: String(TCP_PORT) },
  });
  browser = await launchChromium({ executablePath: lab.chromium(), extraArgs: [`--unsafely-treat-insecure-origin-as-secure=${gateway.base}`] });
});

after(async () => {
  if (browser) await browser.close().catch(() => {});
  if (gateway) await gateway.stop();
  lab.cleanup();
});

/** Chromium's view of a connection: decoding, and the selected pair's candidates. */
function pcStats(page, role) {
  return page.evaluate(async (role) => {
    const pc = role === "publish" ? window.gw.pub.pc : window.gw.sub.pc;
    if (!pc) return null;
    const stats = await pc.getStats();
    const out = { video: null, pair: null };
    stats.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") {
        out.video = { framesDecoded: s.framesDecoded || 0, frameWidth: s.frameWidth || 0, freezeCount: s.freezeCount || 0 };
      }
      if (s.type === "transport" && s.selectedCandidatePairId) {
        const pair = stats.get(s.selectedCandidatePairId);
        const local = pair && stats.get(pair.localCandidateId);
        const remote = pair && stats.get(pair.remoteCandidateId);
        if (local && remote) {
          out.pair = {
            local: { protocol: local.protocol, type: local.candidateType, tcpType: local.tcpType || null },
            remote: { protocol: remote.protocol, type: remote.candidateType, tcpType: remote.tcpType || null, address: `${remote.address}:${remote.port}` },
          };
        }
      }
    });
    return out;
  }, role);
}

/** The page's connection ids once both are READY (null before; throws on FAILED). */
function readyIds(page) {
  return page.evaluate(() => {
    const failed = window.gw.events.filter((m) => m.type === "connection_event" && m.event === "FAILED");
    if (failed.length) throw new Error(`FAILED: ${JSON.stringify(failed)}`);
    const out = {};
    for (const role of ["publish", "subscribe"]) {
      const ev = window.gw.events.filter((m) => m.type === "connection_event" && m.role === role);
      const initial = ev.find((m) => m.event === "INITIAL");
      const ready = ev.find((m) => m.event === "READY");
      if (!initial || !ready) return null;
      out[role] = { id: ready.connection_id, ms: Date.parse(ready.at) - Date.parse(initial.at) };
    }
    return out;
  });
}

test("with all UDP blocked and no TURN server, Chromium connects over ICE-TCP and decodes video both ways", { timeout: 90000 }, async (t) => {
  if (skipReason) {
    t.skip(skipReason);
    return;
  }
  const t0 = Date.now();
  const alice = await joinPage(browser, gateway.base, "ice-tcp", "alice");
  const bob = await joinPage(browser, gateway.base, "ice-tcp", "bob");
  const ready = {};
  for (const [name, page] of [["alice", alice], ["bob", bob]]) {
    ready[name] = await waitFor(`${name}: publish and subscribe READY`, () => readyIds(page), 30000, 100);
  }
  const joinToReady = Date.now() - t0;

  const decodes = async (page) => {
    const s = await pcStats(page, "subscribe");
    return s && s.video && s.video.framesDecoded > 30 && s.video.frameWidth >= 320 ? s : null;
  };
  const atBob = await waitFor("bob decoding alice's video", () => decodes(bob), 30000);
  const atAlice = await waitFor("alice decoding bob's video", () => decodes(alice), 30000);
  // Sustained over TCP: bob's decoded frame count rises every second for 5 s, without freezes.
  const series = [];
  for (let i = 0; i <= 5; i++) {
    if (i) await new Promise((r) => setTimeout(r, 1000));
    series.push((await pcStats(bob, "subscribe")).video);
  }
  for (let i = 1; i < series.length; i++) {
    assert.ok(series[i].framesDecoded > series[i - 1].framesDecoded, `decoded frames rise every second: ${series.map((v) => v.framesDecoded).join(", ")}`);
  }
  assert.equal(series.at(-1).freezeCount, series[0].freezeCount, `no freeze over TCP: ${JSON.stringify(series)}`);
  const fps = (series.at(-1).framesDecoded - series[0].framesDecoded) / 5;

  // Chromium's selected pairs: its active TCP candidate to the gateway's passive one.
  const pairs = {};
  for (const [name, page] of [["alice", alice], ["bob", bob]]) {
    for (const role of ["publish", "subscribe"]) {
      const { pair } = await waitFor(`${name} ${role}: selected pair`, async () => {
        const s = await pcStats(page, role);
        return s && s.pair ? s : null;
      }, 5000);
      pairs[`${name}/${role}`] = pair;
      assert.equal(pair.local.protocol, "tcp", `${name} ${role}: ${JSON.stringify(pair)}`);
      assert.equal(pair.remote.protocol, "tcp", `${name} ${role}: ${JSON.stringify(pair)}`);
      assert.equal(pair.remote.tcpType, "passive", `${name} ${role}: ${JSON.stringify(pair)}`);
      assert.equal(pair.remote.address, `${gatewayIp}:${TCP_PORT}`, `${name} ${role}: ${JSON.stringify(pair)}`);
    }
  }

  // The gateway's view: each connection's nominated pair is TCP, on our passive candidate.
  for (const [name, ids] of Object.entries(ready)) {
    for (const role of ["publish", "subscribe"]) {
      const pair = await waitFor(`${name} ${role}: the gateway's selected pair`, async () => {
        const r = await api(gateway.base, "GET", `/v1/connections/${ids[role].id}`);
        return r.status === 200 && r.body.stats && r.body.stats.selected_pair;
      }, 5000);
      assert.equal(pair.protocol, "tcp", `${name} ${role}: ${JSON.stringify(pair)}`);
      assert.equal(pair.tcptype, "passive", `${name} ${role}: ${JSON.stringify(pair)}`);
      assert.equal(pair.local_type, "host", `${name} ${role}: ${JSON.stringify(pair)}`);
      assert.equal(pair.local, `${gatewayIp}:${TCP_PORT}`, `${name} ${role}: ${JSON.stringify(pair)}`);
      assert.equal(pair.remote.split(":")[0], clientIp, `${name} ${role}: ${JSON.stringify(pair)}`);
    }
  }

  // The firewall was real: Chromium tried UDP (its host candidate against ours) and lost it all.
  const dropped = udpDropped();
  assert.ok(dropped.fromChromium > 0, `UDP from Chromium was dropped: ${JSON.stringify(dropped)}`);
  const open = await metric(gateway.base, "gateway_ice_tcp_streams_open");
  assert.ok(open >= 4, `four connections, a TCP stream each at least: ${open}`);
  assert.equal(await metric(gateway.base, "gateway_ice_tcp_streams_dropped_total"), 0, "the gateway dropped none of Chromium's streams");
  // The gateway's ICE-TCP counters (non-zero samples), for the record.
  const tcpMetrics = (await (await fetch(`${gateway.base}/metrics`)).text())
    .split("\n")
    .filter((l) => l.startsWith("gateway_ice_tcp_") && !l.endsWith(" 0"))
    .join(", ");

  console.log(
    `ICE-TCP: join → all four connections READY ${joinToReady} ms (INITIAL→READY alice ${ready.alice.publish.ms}/${ready.alice.subscribe.ms} ms, bob ${ready.bob.publish.ms}/${ready.bob.subscribe.ms} ms); ` +
      `decoded at bob ${atBob.video.framesDecoded} frames ${atBob.video.frameWidth}px (then ${fps} frames/s for 5 s), at alice ${atAlice.video.framesDecoded} frames ${atAlice.video.frameWidth}px; ` +
      `UDP dropped by the firewall ${JSON.stringify(dropped)}; ${tcpMetrics}; pair ${JSON.stringify(pairs["bob/subscribe"])}`,
  );
  for (const page of [alice, bob]) await page.evaluate(() => window.gw.leave());
  await waitFor("the TCP streams closed with their connections", async () => (await metric(gateway.base, "gateway_ice_tcp_streams_open")) === 0, 10000);
});

test("with UDP open, the TCP candidate stays a fallback: an unfirewalled Chromium's pairs are UDP", { timeout: 60000 }, async (t) => {
  if (skipReason) {
    t.skip(skipReason);
    return;
  }
  // A Chromium in the test's own namespace, where nothing blocks UDP to the gateway.
  const open = await launchChromium({ extraArgs: [`--unsafely-treat-insecure-origin-as-secure=${gateway.base}`] });
  try {
    const carol = await joinPage(open, gateway.base, "ice-tcp-udp", "carol");
    const ids = await waitFor("carol: publish and subscribe READY", () => readyIds(carol), 30000, 100);
    for (const role of ["publish", "subscribe"]) {
      const { pair } = await waitFor(`carol ${role}: selected pair`, async () => {
        const s = await pcStats(carol, role);
        return s && s.pair ? s : null;
      }, 5000);
      assert.equal(pair.local.protocol, "udp", `carol ${role}: ${JSON.stringify(pair)}`);
      assert.equal(pair.remote.protocol, "udp", `carol ${role}: ${JSON.stringify(pair)}`);
      const gw = await waitFor(`carol ${role}: the gateway's selected pair`, async () => {
        const r = await api(gateway.base, "GET", `/v1/connections/${ids[role].id}`);
        return r.status === 200 && r.body.stats && r.body.stats.selected_pair;
      }, 5000);
      assert.equal(gw.protocol, "udp", `carol ${role}: ${JSON.stringify(gw)}`);
      assert.equal(gw.tcptype, undefined, `carol ${role}: ${JSON.stringify(gw)}`);
    }
    await carol.evaluate(() => window.gw.leave());
    await waitFor("no ICE-TCP stream left open", async () => (await metric(gateway.base, "gateway_ice_tcp_streams_open")) === 0, 10000);
  } finally {
    await open.close().catch(() => {});
  }
});
