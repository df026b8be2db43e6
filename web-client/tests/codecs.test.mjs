// A subscriber that cannot decode a publication's codec, in real Chromium: the gateway offers each
// subscriber only the codec the publication carries (it does not transcode), so a page restricted
// with setCodecPreferences (`?recvCodecs=…`) declines the video section — and is told why with a
// `stream_unavailable` message (reason `codec_unsupported`), shown on the page, counted on
// /metrics and visible in the connection's inspection. Audio keeps flowing to it, and a page that
// can decode the codec gets the video, offered in that codec alone.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { api, launchChromium, metric, rtpStats, startGateway, waitFor, joinPage as joinPageOf } from "./harness.mjs";

let gateway;
let browser;

before(async () => {
  gateway = await startGateway({ portMin: 43700, portMax: 43799 });
  browser = await launchChromium();
});

after(async () => {
  if (browser) await browser.close();
  if (gateway) await gateway.stop();
});

const joinPage = (room, name, query) => joinPageOf(browser, gateway.base, room, name, query);

/** The codecs (rtpmap names, sorted) of `owner`'s video section in the last offer a page received
 * that carries it. (A section the page rejected comes back in later offers as a port-0 line
 * without its msid: a later publication in the room can renegotiate after the rejection.) */
async function offeredVideoCodecs(page, owner) {
  return page.evaluate((owner) => {
    const offers = window.gw.events.filter((m) => m.type === "offer");
    for (const offer of offers.reverse()) {
      const names = new Set();
      for (const section of offer.sdp.split("\r\nm=").slice(1)) {
        const lines = section.split("\r\n");
        if (!lines[0].startsWith("video") || !lines.some((l) => l.startsWith(`a=msid:${owner} `))) continue;
        for (const line of lines) {
          const m = line.match(/^a=rtpmap:\d+ ([^/]+)\//);
          if (m) names.add(m[1].toUpperCase());
        }
      }
      if (names.size) return [...names].sort();
    }
    return [];
  }, owner);
}

/** Carol's decoded video in codec `mime` (every page publishes; only alice's is in that codec). */
async function decodedIn(page, mime) {
  return page.evaluate(async (mime) => {
    const pc = window.gw.sub.pc;
    if (!pc) return null;
    const stats = await pc.getStats();
    let out = null;
    stats.forEach((s) => {
      const codec = s.codecId && stats.get(s.codecId)?.mimeType;
      if (s.type === "inbound-rtp" && s.kind === "video" && s.framesDecoded > 0 && codec === mime) out = { framesDecoded: s.framesDecoded, codec };
    });
    return out;
  }, mime);
}

for (const [publishCodec, onlyOther] of [
  ["VP8", "H264"],
  ["H264", "VP8"],
]) {
  test(`a ${onlyOther}-only subscriber of a ${publishCodec} publication is told codec_unsupported; others get ${publishCodec} alone`, { timeout: 90000 }, async () => {
    const room = `codecs-${publishCodec.toLowerCase()}`;
    const before = await metric(gateway.base, "gateway_streams_unavailable_total");
    const alice = await joinPage(room, "alice", `codec=${publishCodec.toLowerCase()}`);
    const bob = await joinPage(room, "bob", `recvCodecs=${onlyOther.toLowerCase()}`);
    const carol = await joinPage(room, "carol", "");
    try {
      // Bob is told, with the reason and the codec, and the page says so.
      const told = await waitFor("bob's stream_unavailable", () => bob.evaluate(() => (window.gw.unavailable || [])[0] || null), 30000);
      console.log(`[${publishCodec}] bob (${onlyOther} only) told: ${JSON.stringify(told)}`);
      assert.equal(told.reason, "codec_unsupported");
      assert.ok(told.codec && told.codec.toLowerCase().startsWith(publishCodec.toLowerCase()), `the codec is named: ${told.codec}`);
      const shown = await bob.evaluate(() => document.body.innerText);
      assert.ok(shown.includes("cannot play"), "the page tells the person why there is no video");
      assert.deepEqual(await offeredVideoCodecs(bob, "alice"), [publishCodec, "RTX"].sort(), "bob was offered the publication's codec alone");
      // Audio still reaches bob.
      await waitFor("audio at bob", async () => ((await rtpStats(bob)).inbound.audio?.packetsReceived ?? 0) > 20, 20000);
      // The gateway counts it and shows it in bob's subscribe connection.
      await waitFor("the metric", async () => (await metric(gateway.base, "gateway_streams_unavailable_total")) > before, 5000);
      const subId = await bob.evaluate(() => window.gw.sub.id);
      const conn = await api(gateway.base, "GET", `/v1/connections/${subId}`);
      const layer = conn.body.stats.layers.find((l) => l.stream_id === told.stream_id);
      assert.equal(layer?.unavailable, "codec_unsupported", JSON.stringify(conn.body.stats.layers));
      // Carol decodes alice's video in that codec (bob's and carol's own are VP8), offered alone too.
      const got = await waitFor("carol decoding alice", () => decodedIn(carol, `video/${publishCodec}`), 30000);
      console.log(`[${publishCodec}] carol decodes ${got.codec}, ${got.framesDecoded} frames; offered ${JSON.stringify(await offeredVideoCodecs(carol, "alice"))}`);
      assert.equal(got.codec, `video/${publishCodec}`);
      assert.deepEqual(await offeredVideoCodecs(carol, "alice"), [publishCodec, "RTX"].sort());
      assert.equal(await carol.evaluate(() => (window.gw.unavailable || []).length), 0, "carol is told nothing");
    } finally {
      for (const p of [alice, bob, carol]) {
        await p.evaluate(() => window.gw.leave()).catch(() => {});
        await p.context().close().catch(() => {});
      }
    }
  });
}
