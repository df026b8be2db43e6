// Real packet loss on the media path. Chromium runs in its own network namespace; a second
// namespace routes between it and the gateway (in the test's namespace, on its own veth):
//
//   Chromium [ns C] 10.247.X.2 ──veth── .1 [ns R, router] .5 ──veth── .6 gateway (test's ns)
//
// iptables' statistic match in R's FORWARD chain drops a random 5% of UDP datagrams in each
// direction (TCP signaling is untouched). Dropping in transit, not in an endpoint's OUTPUT
// chain, matters: a datagram dropped in OUTPUT fails the sender's sendmsg with EPERM, so the
// sender knows, which real loss never tells it. After 15 s of the same call without loss (the
// baseline), 15 s with loss: the subscriber's decoded frame count must rise every second and
// loss may add only a few short freezes; NACK/RTX figures from getStats and the gateway are
// printed.
// LOSS_SIMULCAST=1 publishes simulcast, LOSS_DIRECTIONS=toChromium|fromChromium drops one way
// only, LOSS_TRACE=1 prints a line per second (for investigating; CI uses the defaults).
//
// Needs root, `ip netns` and iptables. Without them the test is skipped with the reason, unless
// REQUIRE_LOSS_TEST=1 (scripts/test.sh sets it when it runs as root), which makes it fail instead.

import assert from "node:assert/strict";
import os from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";
import { api, ensureOutputDir, launchChromium, metric, rtpStats, startGateway, waitFor, joinPage as joinPageOf } from "./harness.mjs";
import { RoutedClient } from "./netlab.mjs";

const PROBABILITY = Number(process.env.LOSS_PROBABILITY || "0.05");
const SECONDS = Number(process.env.LOSS_SECONDS || "15");
// The freezes loss may add. Chromium counts a freeze when one frame interval exceeds max(3 x the
// average interval, average + 150 ms): at the fake camera's 20 frames/s, a frame 200 ms late.
// Measured over 15 s at 5% each way (2-core machine, load average 3-5 from other jobs): 0, 0, 1, 1,
// 3 and 4 freezes, 0.23-0.27 s each, at most 0.93 s in all; the 15 s before, without loss, had none
// except where the gateway paused the video (the no-loss subtest below checks it never does). With loss one way only:
// toward Chromium (the gateway answering NACKs) 0-3 freezes in 7 runs (8 once, on a CPU-starved
// machine decoding 3-7 frames/s), from Chromium (str0m NACKing the publisher) none in 4. So the
// bound: loss may add at most 5 freezes and 1.5 s of frozen video in 15 s (video smooth 90% of the
// time), over the freezes of the 15 s just before without loss (not counting those when the gateway
// paused the video). A stall of a second or more (a gateway bug these tests found caused 3 s) fails
// the every-second check whatever the baseline.
const MAX_ADDED_FREEZES = 5;
const MAX_ADDED_FREEZE_SECONDS = 1.5;

const lab = new RoutedClient("gwsim-loss-", "gsl", 247);
const { nsClient, nsRouter, clientIp, gatewayIp } = lab;

let gateway;
let browser;
let skipReason = null;

const DIRECTIONS = { fromChromium: () => lab.veth("r"), toChromium: () => lab.veth("s") };

/** In the router: count the UDP datagrams entering from each side and drop `p` of them at random. */
function startLoss(p) {
  // LOSS_DIRECTIONS=toChromium (or fromChromium) limits the loss to one direction, to tell them apart.
  const dirs = (process.env.LOSS_DIRECTIONS || Object.keys(DIRECTIONS).join(",")).split(",");
  for (const dev of dirs.map((d) => DIRECTIONS[d]())) {
    lab.inRouter("iptables", "-A", "FORWARD", "-i", dev, "-p", "udp"); // counts only
    lab.inRouter("iptables", "-A", "FORWARD", "-i", dev, "-p", "udp", "-m", "statistic", "--mode", "random", "--probability", String(p), "-j", "DROP");
  }
}

/** { fromChromium: { datagrams, dropped }, toChromium: ... } from the rules' counters. */
function lossCounters() {
  const rows = lab.inRouter("iptables", "-L", "FORWARD", "-v", "-n", "-x")
    .split("\n")
    .map((l) => l.trim().split(/\s+/))
    .filter((c) => /^\d+$/.test(c[0]));
  const out = {};
  for (const [dir, dev] of Object.entries(DIRECTIONS)) {
    const mine = rows.filter((c) => c.includes(dev()));
    out[dir] = { datagrams: Number(mine[0]?.[0] ?? NaN), dropped: Number(mine[1]?.[0] ?? NaN) };
  }
  return out;
}

before(async () => {
  try {
    lab.setUp();
    // Fail here, not halfway through the call, if iptables or its statistic match is missing.
    lab.inRouter("iptables", "-A", "FORWARD", "-p", "udp", "-m", "statistic", "--mode", "random", "--probability", "0", "-j", "DROP");
    lab.inRouter("iptables", "-F", "FORWARD");
  } catch (e) {
    lab.cleanup();
    skipReason = `network namespaces with iptables are not available here (${String(e.message || e).split("\n")[0]})`;
    if (process.env.REQUIRE_LOSS_TEST === "1") throw new Error(`REQUIRE_LOSS_TEST=1 but ${skipReason}`);
    return;
  }
  // The gateway stays in this namespace on the host end of its veth; Chromium runs in ns C.
  gateway = await startGateway({ host: gatewayIp, portMin: 43200, portMax: 43299, env: { GATEWAY__DEV__TOKEN_ROUTE: "on" } });
  process.env.CHROMIUM = lab.chromium();
  // The page is served from the veth address, which is not a secure origin by default.
  browser = await launchChromium({ extraArgs: [`--unsafely-treat-insecure-origin-as-secure=${gateway.base}`] });
});

after(async () => {
  if (browser) await browser.close().catch(() => {});
  if (gateway) await gateway.stop();
  lab.cleanup();
});

const joinPage = (room, name, query) => joinPageOf(browser, gateway.base, room, name, query);

test(`video keeps decoding in Chromium with ${PROBABILITY * 100}% random UDP loss both ways`, { timeout: 120000 }, async (t) => {
  if (skipReason) {
    t.skip(skipReason);
    return;
  }
  const query = process.env.LOSS_SIMULCAST === "1" ? "simulcast=1" : "";
  const a = await joinPage("loss-room", "alice", query);
  const b = await joinPage("loss-room", "bob");
  try {
    await waitFor("bob decoding alice's video before the loss starts", async () => {
      const s = (await rtpStats(b)).inbound.video;
      return s && s.framesDecoded > 30 ? s : null;
    }, 40000);
  } catch (e) {
    for (const [name, page] of [["alice", a], ["bob", b]]) {
      const ev = await page.evaluate(() => window.gw.events.map((m) => `${m.type}${m.event ? ":" + m.event : ""}${m.reason ? ":" + m.reason : ""}${m.candidate ? ":" + m.candidate : ""}`)).catch((x) => String(x));
      console.log(`${name} saw: ${JSON.stringify(ev)}`);
    }
    console.log(`gateway log:\n${gateway.log().split("\n").slice(-40).join("\n")}`);
    throw e;
  }
  const pair = await b.evaluate(async () => {
    let sel = null;
    (await window.gw.sub.pc.getStats()).forEach((s) => {
      if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded") sel = s;
    });
    return sel && { local: sel.localCandidateId, remote: sel.remoteCandidateId };
  });
  console.log(`chromium in ${nsClient} (${clientIp}) <-> router ${nsRouter} <-> gateway on ${gatewayIp}; bob's pair ${JSON.stringify(pair)}`);

  const subId = await b.evaluate(() => window.gw.sub.id);
  const pubId = await a.evaluate(() => window.gw.pub.id);

  /** Sample bob's video every second for SECONDS: decoded frames, freezes, widths. */
  const sample = async (phase) => {
    const out = { series: [], freezes: [], widths: [], freezeSeconds: [] };
    const pauses0 = await metric(gateway.base, "gateway_video_pauses_total");
    const t0 = Date.now();
    for (let i = 0; i <= SECONDS; i++) {
      await new Promise((r) => setTimeout(r, Math.max(0, t0 + i * 1000 - Date.now())));
      const v = (await rtpStats(b)).inbound.video;
      out.series.push(v.framesDecoded);
      out.freezes.push(v.freezeCount);
      out.widths.push(v.frameWidth);
      out.freezeSeconds.push(v.totalFreezesDuration || 0);
      if (process.env.LOSS_TRACE === "1") {
        const st = (await api(gateway.base, "GET", `/v1/connections/${subId}`)).body.stats;
        const l = st.layers[0] || {};
        const eg = st.egress.filter((x) => x.mid === l.mid).map((x) => `nacks ${x.nacks} plis ${x.plis}`).join(" ");
        console.log(`${phase} t=${i}s decoded ${v.framesDecoded} received ${v.framesReceived} width ${v.frameWidth} keyframes ${v.keyFramesDecoded} freezes ${v.freezeCount} (${v.totalFreezesDuration}s) plis ${v.pliCount} nacks ${v.nackCount} lost ${v.packetsLost} rtx ${v.retransmittedPacketsReceived}; gateway rid ${l.rid} target ${l.target_rid} estimate ${st.bwe_estimate_bps} switches ${st.layer_switches} paused ${l.paused} resent ${st.retransmitted_packets} egress ${eg}`);
      }
    }
    const last = out.series.length - 1;
    return {
      ...out,
      freezeCount: out.freezes[last] - out.freezes[0],
      freezeDuration: Number((out.freezeSeconds[last] - out.freezeSeconds[0]).toFixed(3)),
      // Subscriber videos the gateway paused because the bandwidth estimate fell below them.
      videoPauses: (await metric(gateway.base, "gateway_video_pauses_total")) - pauses0,
    };
  };
  // The same call without loss first: what this machine's load alone costs in freezes.
  const baseline = await sample("no loss");
  // On this clean path the gateway must never pause a video without simulcast layers: one layer
  // pauses only after its subscriber's estimate stayed below half its rate for 5 s (before that
  // rule, a dip of the estimate just below the stream's rate paused it in 2 of 5 calls).
  await t.test(
    "without loss, the gateway does not pause the video and it decodes every second",
    () => {
      assert.equal(baseline.videoPauses, 0, `gateway_video_pauses_total rose by ${baseline.videoPauses}`);
      for (let i = 1; i < baseline.series.length; i++) {
        assert.ok(baseline.series[i] > baseline.series[i - 1], `decoded frames: ${baseline.series.join(", ")}`);
      }
    },
  );
  const m0 = {
    retransmitted: await metric(gateway.base, "gateway_retransmitted_packets_total"),
    unrecoverable: await metric(gateway.base, "gateway_unrecoverable_losses_total"),
    keyframesOut: await metric(gateway.base, "gateway_keyframe_requests_total"),
    pauses: await metric(gateway.base, "gateway_video_pauses_total"),
  };
  const b0 = await rtpStats(b);
  const a0 = await rtpStats(a);
  const load0 = os.loadavg()[0];
  startLoss(PROBABILITY);
  const lossy = await sample("loss");
  const { series, widths } = lossy;
  const drops = lossCounters();
  const b1 = await rtpStats(b);
  const a1 = await rtpStats(a);
  const vB0 = b0.inbound.video;
  const vB1 = b1.inbound.video;
  const aOut = (st) => st.outbound.filter((o) => o.kind === "video");
  const sum = (list, k) => list.reduce((n, o) => n + (o[k] || 0), 0);
  const sub = (await api(gateway.base, "GET", `/v1/connections/${subId}`)).body.stats;
  const pub = (await api(gateway.base, "GET", `/v1/connections/${pubId}`)).body.stats;
  const m1 = {
    retransmitted: await metric(gateway.base, "gateway_retransmitted_packets_total"),
    unrecoverable: await metric(gateway.base, "gateway_unrecoverable_losses_total"),
    keyframesOut: await metric(gateway.base, "gateway_keyframe_requests_total"),
    pauses: await metric(gateway.base, "gateway_video_pauses_total"),
  };

  const d = (k) => (vB1[k] || 0) - (vB0[k] || 0);
  const report = {
    probability: PROBABILITY,
    // The machine's 1-minute load average at the start and end (2 cores here): freezes under
    // a heavy load are not all the network's.
    loadavg: [Number(load0.toFixed(1)), Number(os.loadavg()[0].toFixed(1))],
    iptables: drops,
    framesDecoded: series,
    frameWidth: widths,
    freezeCount: lossy.freezeCount,
    totalFreezesDuration_s: lossy.freezeDuration,
    without_loss: {
      framesDecoded: baseline.series,
      freezeCount: baseline.freezeCount,
      totalFreezesDuration_s: baseline.freezeDuration,
      gateway_video_pauses_total: baseline.videoPauses,
    },
    gateway_video_pauses_with_loss: lossy.videoPauses,
    bob_inbound_video: {
      packetsReceived: d("packetsReceived"),
      packetsLost: d("packetsLost"),
      nackCount: d("nackCount"),
      retransmittedPacketsReceived: d("retransmittedPacketsReceived"),
      pliCount: d("pliCount"),
      keyFramesDecoded: d("keyFramesDecoded"),
      framesDropped: d("framesDropped"),
    },
    alice_outbound_video: {
      packetsSent: sum(aOut(a1), "packetsSent") - sum(aOut(a0), "packetsSent"),
      nackCount: sum(aOut(a1), "nackCount") - sum(aOut(a0), "nackCount"),
      retransmittedPacketsSent: sum(aOut(a1), "retransmittedPacketsSent") - sum(aOut(a0), "retransmittedPacketsSent"),
      pliCount: sum(aOut(a1), "pliCount") - sum(aOut(a0), "pliCount"),
    },
    gateway: {
      gateway_retransmitted_packets_total: m1.retransmitted - m0.retransmitted,
      gateway_unrecoverable_losses_total: m1.unrecoverable - m0.unrecoverable,
      gateway_keyframe_requests_total: m1.keyframesOut - m0.keyframesOut,
      gateway_video_pauses_total: m1.pauses - m0.pauses,
      subscriber_bwe_estimate_bps: sub.bwe_estimate_bps,
      subscriber_layers: sub.layers,
      subscriber_egress_loss_fraction: sub.egress_loss_fraction,
      publisher_ingress_loss_fraction: pub.ingress_loss_fraction,
      publisher_ingress_nacks: pub.ingress.map((x) => ({ mid: x.mid, rid: x.rid, nacks: x.nacks, loss: x.loss })),
    },
  };
  console.log(`loss run: ${JSON.stringify(report, null, 2)}`);
  await b.screenshot({ path: path.join(ensureOutputDir(), "loss-subscriber.png") });

  const ratio = (x) => x.dropped / Math.max(1, x.datagrams);
  for (const [dir, c] of Object.entries(drops).filter(([, c]) => !Number.isNaN(c.dropped))) {
    assert.ok(c.datagrams > 500 && ratio(c) > PROBABILITY / 3, `loss really applied ${dir}: ${JSON.stringify(c)}`);
  }
  for (let i = 1; i < series.length; i++) {
    assert.ok(series[i] > series[i - 1], `framesDecoded rises every second: ${series.join(", ")}`);
  }
  // Freezes the gateway caused by pausing the baseline's video do not widen the bound.
  const clean = baseline.videoPauses === 0;
  const why = `${lossy.freezeCount} freezes (${lossy.freezeDuration} s) with loss, ${baseline.freezeCount} (${baseline.freezeDuration} s) without; gateway pauses ${baseline.videoPauses} then, ${lossy.videoPauses} with loss`;
  assert.ok(lossy.freezeCount <= (clean ? baseline.freezeCount : 0) + MAX_ADDED_FREEZES, `loss adds at most ${MAX_ADDED_FREEZES} freezes: ${why}`);
  assert.ok(
    lossy.freezeDuration <= (clean ? baseline.freezeDuration : 0) + MAX_ADDED_FREEZE_SECONDS,
    `loss adds at most ${MAX_ADDED_FREEZE_SECONDS} s of frozen video: ${why}`,
  );
  if (!Number.isNaN(drops.toChromium.dropped)) {
    assert.ok(report.bob_inbound_video.nackCount > 0, "bob NACKed the losses on the gateway leg");
    assert.ok(report.gateway.gateway_retransmitted_packets_total > 0, "the gateway resent what bob NACKed");
  }
  if (!Number.isNaN(drops.fromChromium.dropped)) {
    assert.ok(report.alice_outbound_video.retransmittedPacketsSent > 0, "alice resent what the gateway NACKed");
  }

  await a.evaluate(() => window.gw.leave());
  await b.evaluate(() => window.gw.leave());
});
