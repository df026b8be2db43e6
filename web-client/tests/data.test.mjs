// Data channels through the gateway, in Chromium: what a participant sends on its publish
// connection's channels (`?data=1`: `data` reliable, `data-unreliable` unordered without
// retransmissions) reaches every other participant on the subscribe connection, with the sender's
// id, reliable or unreliable as sent; an oversized message and a flood beyond the sender's rate are
// dropped and counted while video keeps being decoded. Media ports 48900-48999.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { joinPage, launchChromium, startGateway, waitFor } from "./harness.mjs";

let gateway;
let browser;

before(async () => {
  gateway = await startGateway({ portMin: 48900, portMax: 48999 });
  browser = await launchChromium();
});

after(async () => {
  if (browser) await browser.close();
  if (gateway) await gateway.stop();
});

/** `gateway_data_messages_total{result="…"}`. */
async function dataMetric(result) {
  const text = await (await fetch(`${gateway.base}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(`gateway_data_messages_total{result="${result}"}`));
  return line ? Number(line.split(/\s+/).pop()) : 0;
}

const received = (page) => page.evaluate(() => window.gw.dataReceived.slice());
const videoDecoded = (page) =>
  page.evaluate(async () => {
    let n = 0;
    (await window.gw.sub.pc.getStats()).forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") n += s.framesDecoded || 0;
    });
    return n;
  });

test("data messages reach every other participant with the sender's id, reliable or not as sent, bounded", { timeout: 90000 }, async () => {
  const pages = {};
  for (const name of ["alice", "bob", "carol"]) pages[name] = await joinPage(browser, gateway.base, "data-room", name, "data=1");
  const { alice, bob, carol } = pages;
  for (const [name, page] of Object.entries(pages)) {
    await waitFor(`${name}: channels open both ways and video decoded`, async () =>
      page.evaluate(async () => {
        const g = window.gw;
        if (g.pub.data?.readyState !== "open" || g.pub.dataUnreliable?.readyState !== "open" || !g.sub.pc) return false;
        let frames = 0;
        (await g.sub.pc.getStats()).forEach((s) => {
          if (s.type === "inbound-rtp" && s.kind === "video") frames += s.framesDecoded || 0;
        });
        return frames > 10;
      }),
    30000);
  }
  // The gateway's channels on the subscribe connections open after its READY: wait until a probe
  // gets through to both others.
  await waitFor("the subscribe side's data channels", async () => {
    await alice.evaluate(() => window.gw.sendData("probe"));
    const got = await Promise.all([bob, carol].map(async (p) => (await received(p)).some((m) => m.data === "probe")));
    return got.every(Boolean);
  }, 15000, 300);

  await alice.evaluate(() => {
    for (let i = 0; i < 20; i++) window.gw.sendData(`r-${i}`, { reliable: true });
    for (let i = 0; i < 20; i++) window.gw.sendData(`u-${i}`, { reliable: false });
    window.gw.pub.data.send(new Uint8Array([1, 2, 3]));
  });
  await bob.evaluate(() => window.gw.sendData("from bob"));
  for (const [name, page] of [["bob", bob], ["carol", carol]]) {
    const msgs = await waitFor(`${name} receiving alice's messages`, async () => {
      const m = (await received(page)).filter((x) => x.participant_id === "alice" && x.data !== "probe");
      return m.length >= 41 ? m : null;
    }, 10000);
    const reliable = msgs.filter((m) => m.label === "data" && !m.binary);
    assert.deepEqual(reliable.map((m) => m.data), Array.from({ length: 20 }, (_, i) => `r-${i}`), `${name}: every reliable message, in order`);
    assert.ok(reliable.every((m) => m.reliable), `${name}: reliable ones on the gateway's reliable channel`);
    const unreliable = msgs.filter((m) => m.label === "data-unreliable");
    assert.equal(unreliable.length, 20, `${name}: no loss on loopback`);
    assert.ok(unreliable.every((m) => !m.reliable), `${name}: unreliable ones on the gateway's unreliable channel`);
    const binary = msgs.find((m) => m.binary);
    assert.equal(binary?.data, "AQID", `${name}: binary data, base64`);
  }
  await waitFor("alice receiving bob's message", async () => (await received(alice)).some((m) => m.participant_id === "bob" && m.data === "from bob"), 5000);
  assert.ok(!(await received(alice)).some((m) => m.participant_id === "alice"), "nobody receives their own messages");

  // Bounds: a message over 16 KiB is dropped; a flood beyond 50 messages/s (bursts of 100) is cut,
  // counted, and video keeps being decoded meanwhile.
  const before = { size: await dataMetric("dropped_size"), rate: await dataMetric("dropped_rate") };
  const framesBefore = await videoDecoded(bob);
  await alice.evaluate(() => window.gw.sendData("x".repeat(20000)));
  await alice.evaluate(() => {
    for (let i = 0; i < 400; i++) window.gw.sendData(`flood-${i}`);
  });
  await new Promise((r) => setTimeout(r, 2500));
  const flood = (await received(bob)).filter((m) => m.data.startsWith("flood-")).length;
  assert.ok(!(await received(bob)).some((m) => m.data.length >= 20000), "the oversized message is not relayed");
  const after = { size: await dataMetric("dropped_size"), rate: await dataMetric("dropped_rate"), forwarded: await dataMetric("forwarded") };
  console.log(`flood: bob got ${flood} of 400; dropped_size +${after.size - before.size}, dropped_rate +${after.rate - before.rate}, forwarded ${after.forwarded}`);
  assert.equal(after.size - before.size, 1);
  assert.ok(flood >= 50 && flood <= 250, `the flood is cut to the allowance: ${flood}`);
  assert.equal(after.rate - before.rate, 400 - flood, "every message beyond the allowance is counted");
  assert.ok((await videoDecoded(bob)) > framesBefore + 20, "video keeps being decoded during the flood");
});
