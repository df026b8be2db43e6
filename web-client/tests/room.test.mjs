// Two browser pages join one room through the web client and see and hear each other through
// the gateway; states, room events and leaving are checked from the page's own view.

import assert from "node:assert/strict";
import path from "node:path";
import { after, before, test } from "node:test";
import { api, ensureOutputDir, launchChromium, startGateway, waitFor, joinPage as joinPageOf } from "./harness.mjs";

let gateway;
let browser;

before(async () => {
  gateway = await startGateway({ portMin: 43000, portMax: 43099 });
  browser = await launchChromium();
});

after(async () => {
  if (browser) await browser.close();
  if (gateway) await gateway.stop();
});

const joinPage = (room, name, codec) => joinPageOf(browser, gateway.base, room, name, codec ? `codec=${codec}` : "");

/** Inbound RTP stats of the page's subscribe connection. */
async function inbound(page) {
  return page.evaluate(async () => {
    const pc = window.gw.sub.pc;
    if (!pc) return null;
    const out = { video: null, audio: null };
    const stats = await pc.getStats();
    stats.forEach((s) => {
      if (s.type === "inbound-rtp") {
        const codec = s.codecId && stats.get(s.codecId) ? stats.get(s.codecId).mimeType : null;
        out[s.kind] = { framesDecoded: s.framesDecoded, frameWidth: s.frameWidth, packetsReceived: s.packetsReceived, freezeCount: s.freezeCount, codec };
      }
    });
    const v = document.querySelector(".tile:not(.local) video");
    out.videoWidth = v ? v.videoWidth : 0;
    return out;
  });
}

function stateSteps(page) {
  return page.evaluate(() =>
    window.gw.events
      .filter((m) => m.type === "connection_event")
      .map((m) => ({ role: m.role, event: m.event, code: m.code, id: m.connection_id })),
  );
}

test("two browsers see and hear each other through the gateway", { timeout: 90000 }, async () => {
  const alice = await joinPage("e2e-room", "alice");
  const bob = await joinPage("e2e-room", "bob");

  for (const [name, page] of [["alice", alice], ["bob", bob]]) {
    const s = await waitFor(`${name} decoding the other's video and receiving audio`, async () => {
      const st = await inbound(page);
      return st && st.video && st.video.framesDecoded > 10 && st.videoWidth > 0 && st.audio && st.audio.packetsReceived > 20 ? st : null;
    }, 30000);
    console.log(`${name} receives: video ${s.video.frameWidth}px, ${s.video.framesDecoded} frames decoded; audio ${s.audio.packetsReceived} packets`);
    assert.ok(s.video.frameWidth >= 320, "decoded video has a real width");

    const steps = await stateSteps(page);
    for (const role of ["publish", "subscribe"]) {
      const seq = steps.filter((x) => x.role === role && ["INITIAL", "GATHERED", "READY"].includes(x.event)).map((x) => `${x.event}:${x.code}`);
      assert.deepEqual(seq, ["INITIAL:101", "GATHERED:103", "READY:104"], `${name} ${role} connection states`);
    }
    const ui = await page.$$eval(".conn", (els) => els.map((e) => `${e.dataset.role}:${e.dataset.state}`));
    assert.deepEqual(ui.sort(), ["publish:READY", "subscribe:READY"], `${name}'s page shows both connections READY`);
  }

  const shot = path.join(ensureOutputDir(), "room-two-browsers.png");
  await alice.screenshot({ path: shot });
  console.log(`screenshot of the room: ${shot}`);

  // Admin insight: the connection explains itself without a packet capture.
  const alicePub = (await stateSteps(alice)).find((x) => x.role === "publish").id;
  const insight = await waitFor("stats of alice's publish connection", async () => {
    const d = (await api(gateway.base, "GET", `/v1/connections/${alicePub}`)).body;
    return d.stats.srtp_profile && d.stats.selected_pair && d.stats.codecs.length >= 2 ? d.stats : null;
  }, 10000);
  assert.equal(insight.srtp_profile, "AEAD_AES_256_GCM");
  assert.equal(insight.selected_pair.protocol, "udp");
  assert.ok(insight.codecs.some((c) => c.codec.startsWith("vp8/90000")), JSON.stringify(insight.codecs));
  assert.ok(insight.rtp_packets_in > 0);

  // The REST view agrees with the pages.
  const rooms = await api(gateway.base, "GET", "/v1/rooms");
  const room = rooms.body.rooms.find((r) => r.name === "e2e-room");
  assert.equal(room.participants, 2);
  assert.equal(room.streams, 4);

  const bobConns = (await stateSteps(bob)).filter((x) => x.event === "READY").map((x) => x.id);
  await bob.evaluate(() => window.gw.leave());
  await waitFor("alice to see bob leave", async () => {
    const ev = await alice.evaluate(() => window.gw.events.map((m) => `${m.type}:${m.participant_id || ""}`));
    return ev.includes("participant_left:bob") && ev.includes("stream_removed:bob") ? ev : null;
  });
  const bobSteps = await stateSteps(bob);
  for (const id of bobConns) {
    assert.ok(bobSteps.some((x) => x.id === id && x.event === "FINISHED" && x.code === 105), "bob got FINISHED for each connection");
    const detail = await api(gateway.base, "GET", `/v1/connections/${id}`);
    assert.equal(detail.body.state, "FINISHED");
    assert.deepEqual(
      detail.body.events.map((e) => e.event).filter((e) => e !== "SDP_PROCESSED" && e !== "CANDIDATE"),
      ["INITIAL", "GATHERED", "READY", "FINISHED"],
    );
  }
  // Alice keeps her call: her tile grid no longer shows bob, and her own connections stay READY.
  await waitFor("bob's tile to go", async () => (await alice.$$(".tile[data-participant=bob]")).length === 0);
  const aliceUi = await alice.$$eval(".conn", (els) => els.map((e) => e.dataset.state));
  assert.deepEqual(aliceUi, ["READY", "READY"]);
});

test("H.264 and VP8 publishers in one room are both forwarded and decoded", { timeout: 90000 }, async () => {
  const carol = await joinPage("codec-room", "carol", "h264");
  const dave = await joinPage("codec-room", "dave", "vp8");
  const decoded = async (page) => {
    const st = await inbound(page);
    return st && st.video && st.video.framesDecoded > 10 && st.videoWidth > 0 ? st : null;
  };
  const atDave = await waitFor("dave decoding carol's H.264", () => decoded(dave), 30000);
  const atCarol = await waitFor("carol decoding dave's VP8", () => decoded(carol), 30000);
  console.log(`dave receives ${atDave.video.codec} ${atDave.video.frameWidth}px; carol receives ${atCarol.video.codec} ${atCarol.video.frameWidth}px`);
  assert.equal(atDave.video.codec, "video/H264");
  assert.equal(atCarol.video.codec, "video/VP8");
  await carol.evaluate(() => window.gw.leave());
  await dave.evaluate(() => window.gw.leave());
});

/** What alice sends (her audio sender's track) and what her mic button says. */
async function micState(page) {
  return page.evaluate(() => {
    const s = window.gw.pub.pc && window.gw.pub.pc.getSenders().find((x) => x.track && x.track.kind === "audio");
    const b = document.getElementById("mic-button");
    return { sending: s ? s.track.enabled && s.track.readyState === "live" : null, pressed: b.getAttribute("aria-pressed"), text: b.textContent, title: b.title };
  });
}

/** The energy of the audio bob receives (Chromium's fake microphone beeps; a muted track is silence). */
async function receivedEnergy(page) {
  return page.evaluate(async () => {
    let e = 0;
    (await window.gw.sub.pc.getStats()).forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "audio") e = s.totalAudioEnergy || 0;
    });
    return e;
  });
}

// Chromium's fake microphone beeps: ~0.23 of energy a second at the receiver (measured); a
// disabled track sends silence, ~1e-9 (comfort noise).
const AUDIBLE = 1e-4;
const SILENT = 1e-6;

/** How much bob's received audio energy grows over `ms`. */
async function energyGrowth(page, ms = 1500) {
  const a = await receivedEnergy(page);
  await new Promise((r) => setTimeout(r, ms));
  return (await receivedEnergy(page)) - a;
}

test("the mic button tells the truth across leave and join", { timeout: 90000 }, async () => {
  const alice = await joinPage("mute-room", "alice");
  const bob = await joinPage("mute-room", "bob");
  try {
    await waitFor("bob hearing alice", async () => (await energyGrowth(bob, 500)) > AUDIBLE, 30000);
    await alice.click("#mic-button");
    let s = await micState(alice);
    assert.deepEqual([s.sending, s.pressed, s.text, s.title], [false, "true", "Muted", "Unmute microphone"]);
    await waitFor("silence at bob", async () => (await energyGrowth(bob, 1000)) < SILENT, 10000);

    // Leave and join again: still muted, and really so (the new track is not sent live).
    await alice.evaluate(() => window.gw.leave());
    s = await micState(alice);
    assert.equal(s.pressed, "true", "the button keeps the choice while out of the room");
    await alice.click("#join-button");
    await waitFor("alice publishing again", () => alice.evaluate(() => window.gw.pub.pc && window.gw.pub.pc.connectionState === "connected"), 20000);
    s = await micState(alice);
    console.log(`after rejoin: ${JSON.stringify(s)}`);
    assert.deepEqual([s.sending, s.pressed, s.text], [false, "true", "Muted"], "muted before: muted now, button and track alike");
    await waitFor("bob subscribed to alice again", async () => (await receivedEnergy(bob)) >= 0 && bob.evaluate(() => [...window.gw.streams.values()].some((x) => x.participant_id === "alice" && x.kind === "audio")), 20000);
    const muted = await energyGrowth(bob, 2000);
    console.log(`bob's received audio energy over 2 s from the muted alice: ${muted}`);
    assert.ok(muted < SILENT, `bob hears nothing from the muted alice: energy ${muted}`);

    // Unmute: the button and the sound come back.
    await alice.click("#mic-button");
    s = await micState(alice);
    assert.deepEqual([s.sending, s.pressed, s.text, s.title], [true, "false", "Mic", "Mute microphone"]);
    const back = await waitFor("bob hearing alice again", async () => { const e = await energyGrowth(bob, 500); return e > AUDIBLE ? e : null; }, 20000);
    console.log(`after unmuting, energy over 0.5 s: ${back}`);
  } finally {
    for (const p of [alice, bob]) {
      await p.evaluate(() => window.gw.leave()).catch(() => {});
      await p.context().close().catch(() => {});
    }
  }
});
