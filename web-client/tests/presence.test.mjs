// What everyone sees of everyone: a muted microphone is marked on the tile, a camera that is off
// shows the person's initials instead of a black picture, and the one who speaks is ringed. The
// state travels through the gateway (mute -> track_muted / track_unmuted, StreamInfo.muted for
// late joiners and after a republish; active_speakers from the audio levels), so each check
// is made at the other pages.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { joinPage, launchChromium, startGateway, waitFor, tileState } from "./harness.mjs";

let gateway;
let browser;

before(async () => {
  gateway = await startGateway({ portMin: 43870, portMax: 43899 });
  browser = await launchChromium();
});

after(async () => {
  if (browser) await browser.close();
  if (gateway) await gateway.stop();
});

const waitTile = (what, viewer, pid, want, ms = 10000) =>
  waitFor(what, async () => {
    const s = await tileState(viewer, pid);
    return s && Object.entries(want).every(([k, v]) => s[k] === v) ? s : null;
  }, ms, 100);

async function decodedFrames(page) {
  return page.evaluate(async () => {
    let f = 0;
    if (window.gw.sub.pc) (await window.gw.sub.pc.getStats()).forEach((s) => { if (s.type === "inbound-rtp" && s.kind === "video") f += s.framesDecoded || 0; });
    return f;
  });
}

const events = (page, type) => page.evaluate((type) => window.gw.events.filter((m) => m.type === type), type);

test("mute, camera off and the active speaker are shown to everyone", { timeout: 90000 }, async () => {
  const alice = await joinPage(browser, gateway.base, "presence-room", "alice");
  const bob = await joinPage(browser, gateway.base, "presence-room", "bob");
  let carol;
  try {
    await waitFor("bob decoding alice", async () => (await decodedFrames(bob)) > 10, 30000);
    await waitTile("alice's video at bob", bob, "alice", { video: true, micMuted: false });

    // Both fake microphones beep: both are reported speaking at some point; each page rings them.
    await waitTile("bob ringed at alice", alice, "bob", { speaking: true }, 15000);
    await waitTile("alice ringed at bob", bob, "alice", { speaking: true }, 15000);

    // Alice turns her camera off: bob sees her initials, not a black picture.
    await alice.click("#cam-button");
    const off = await waitTile("alice's avatar at bob", bob, "alice", { video: false, avatar: "A" });
    console.log(`alice's tile at bob with her camera off: ${JSON.stringify(off)}`);
    const vm = (await events(bob, "track_muted")).find((m) => m.participant_id === "alice" && m.kind === "video");
    assert.ok(vm, "bob learned it from track_muted");
    assert.equal((await tileState(alice, "alice")).avatar, "A", "alice's own tile shows it too");

    // Alice mutes: bob sees the mark; and only bob is ever ringed at alice's page from now on.
    await alice.click("#mic-button");
    await waitTile("alice's muted mark at bob", bob, "alice", { micMuted: true });
    assert.ok((await events(bob, "track_muted")).some((m) => m.participant_id === "alice" && m.kind === "audio"));
    await waitTile("alice no longer ringed at bob", bob, "alice", { speaking: false }, 10000);
    const since = await bob.evaluate(() => window.gw.events.length);
    await waitTile("bob ringed at alice while she is muted", alice, "bob", { speaking: true }, 15000);
    const later = await bob.evaluate((since) => window.gw.events.slice(since).filter((m) => m.type === "active_speakers"), since);
    for (const m of later) assert.ok(!m.speakers.some((s) => s.participant_id === "alice"), `muted alice is not a speaker: ${JSON.stringify(m)}`);

    // A late joiner sees the state at once (joined.streams[].muted).
    carol = await joinPage(browser, gateway.base, "presence-room", "carol");
    const atCarol = await waitTile("alice muted with her camera off at carol", carol, "alice", { micMuted: true, video: false, avatar: "A" }, 20000);
    console.log(`alice at carol, who joined later: ${JSON.stringify(atCarol)}`);
    await waitTile("bob's video at carol", carol, "bob", { video: true, micMuted: false }, 20000);

    // A republish (the WebSocket drops and the page rejoins) sends the state again.
    const oldAudio = await bob.evaluate(() => [...window.gw.streams.values()].find((s) => s.participant_id === "alice" && s.kind === "audio").stream_id);
    await alice.evaluate(() => window.gw.ws.close(4000, "test drop"));
    await waitFor("alice's new audio stream at bob", () => bob.evaluate((old) => {
      const s = [...window.gw.streams.values()].find((x) => x.participant_id === "alice" && x.kind === "audio");
      return s && s.stream_id !== old && s.muted === true;
    }, oldAudio), 20000);
    await waitTile("alice still muted at bob after her rejoin", bob, "alice", { micMuted: true, video: false });

    // Camera and mic back on: video again at bob, no mark, and alice can be the speaker again.
    await alice.click("#cam-button");
    await alice.click("#mic-button");
    await waitTile("alice's video back at bob", bob, "alice", { video: true, micMuted: false }, 20000);
    const f0 = await decodedFrames(bob);
    await waitFor("bob decoding alice's camera again", async () => (await decodedFrames(bob)) > f0 + 10, 20000);
    await waitTile("alice ringed at bob again", bob, "alice", { speaking: true }, 15000);
  } finally {
    for (const p of [alice, bob, carol]) {
      if (!p) continue;
      await p.evaluate(() => window.gw.leave()).catch(() => {});
      await p.context().close().catch(() => {});
    }
  }
});
