// The layer picker offers only the simulcast layers the publisher is really sending. Chromium
// (without the field trial the other simulcast tests use) sends only two of the page's three
// encodings from its 640x480 fake camera; the picker on the other page must then offer Auto and
// those two — not a "High" that would silently stay on medium — and it follows the gateway's
// `stream_layers` messages.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { launchChromium, startGateway, waitFor, joinPage as joinPageOf } from "./harness.mjs";

let gateway;
let browser;

before(async () => {
  gateway = await startGateway({ portMin: 43800, portMax: 43849 });
  browser = await launchChromium();
});

after(async () => {
  if (browser) await browser.close();
  if (gateway) await gateway.stop();
});

/** The rids alice's encodings are sending now (framesSent rising over half a second). */
async function sendingRids(page) {
  const sample = () =>
    page.evaluate(async () => {
      const out = {};
      (await window.gw.pub.pc.getStats()).forEach((s) => {
        if (s.type === "outbound-rtp" && s.kind === "video" && s.rid) out[s.rid] = s.framesSent || 0;
      });
      return out;
    });
  const a = await sample();
  await new Promise((r) => setTimeout(r, 500));
  const b = await sample();
  return Object.keys(b).filter((rid) => b[rid] > (a[rid] ?? 0)).sort();
}

test("the layer picker offers only the layers the publisher sends", { timeout: 60000 }, async () => {
  const alice = await joinPageOf(browser, gateway.base, "picker", "alice", "simulcast=1");
  const bob = await joinPageOf(browser, gateway.base, "picker", "bob", "layers=1");
  try {
    // Chromium starts its upper layers as its estimate ramps up: wait until two are sent.
    const sending = await waitFor("alice sending two layers", async () => {
      const r = await sendingRids(alice);
      return r.length >= 2 ? r : null;
    }, 30000);
    console.log(`alice sends ${sending.join(", ")} of q, h, f`);
    const options = () => bob.evaluate(() => [...document.querySelectorAll(".tile:not(.local) .layer-picker option")].map((o) => o.value));
    const offered = await waitFor("bob's picker to list alice's layers", async () => {
      const o = await options();
      return JSON.stringify(o.filter(Boolean).sort()) === JSON.stringify(sending) ? o : null;
    }, 15000);
    console.log(`bob's picker offers ${JSON.stringify(offered)}`);
    assert.equal(offered[0], "", "Auto first");
    if (!sending.includes("f")) assert.ok(!offered.includes("f"), "no High while alice does not send it");
    // The picker's data comes from the gateway: the stream carries which layers are active.
    const layers = await bob.evaluate(() => [...window.gw.streams.values()].find((s) => s.participant_id === "alice" && s.kind === "video").layers);
    assert.deepEqual(layers.filter((l) => l.active).map((l) => l.rid).sort(), sending);
    // (They reach bob in `joined` when alice's layers were known before he joined, or later in a
    // `stream_layers` message; either way the stream carries them.)
  } finally {
    for (const p of [alice, bob]) {
      await p.evaluate(() => window.gw.leave()).catch(() => {});
      await p.context().close().catch(() => {});
    }
  }
});
