// A call survives what happens to calls: the gateway restarting (SIGTERM, drain, a new process
// on the same address), the WebSocket dropping, a reload of the page, and the same participant
// joining from another tab. Each page comes back by itself (no reload), shows that it is
// reconnecting meanwhile, and decodes the others' video again.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { freePort, joinPage, launchChromium, startGateway, waitFor } from "./harness.mjs";

const PORTS = { portMin: 43900, portMax: 43949 };
let httpPort;
let gateway;
let browser;

before(async () => {
  httpPort = await freePort();
  gateway = await startGateway({ ...PORTS, port: httpPort });
  browser = await launchChromium();
});

after(async () => {
  if (browser) await browser.close();
  if (gateway) await gateway.stop();
});

/** A test that stopped the gateway and failed before starting it again leaves one running for the next. */
async function ensureGateway() {
  if (gateway.child.exitCode !== null || gateway.child.signalCode !== null) gateway = await startGateway({ ...PORTS, port: httpPort });
}

/** The page's subscribe connection id and the video frames it decoded on it. */
async function decoding(page) {
  return page.evaluate(async () => {
    const pc = window.gw.sub.pc;
    if (!pc) return null;
    let frames = 0;
    (await pc.getStats()).forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") frames += s.framesDecoded || 0;
    });
    return { sub: window.gw.sub.id, frames, status: window.gw.status };
  });
}

/** Waits until `page` decodes video (more than 10 frames) on a subscribe connection other than `notOn`. */
async function waitDecoding(what, page, notOn = null, ms = 30000) {
  return waitFor(what, async () => {
    const d = await decoding(page);
    return d && d.sub && d.sub !== notOn && d.frames > 10 && d.status === "in-call" ? d : null;
  }, ms);
}

function uiState(page) {
  return page.evaluate(() => ({
    status: window.gw.status,
    banner: document.getElementById("banner").hidden ? null : document.getElementById("banner-text").textContent,
    lobby: !document.getElementById("lobby").hidden,
    tiles: [...document.querySelectorAll("#grid .tile")].map((t) => t.dataset.participant),
    loadedOnce: window.loadedOnce === true,
  }));
}

test("after a gateway restart both pages rejoin by themselves and decode each other again", { timeout: 90000 }, async () => {
  const alice = await joinPage(browser, gateway.base, "restart-room", "alice");
  const bob = await joinPage(browser, gateway.base, "restart-room", "bob");
  try {
    const before = {
      alice: await waitDecoding("alice decoding bob", alice),
      bob: await waitDecoding("bob decoding alice", bob),
    };
    // A mark that a reload would wipe.
    for (const p of [alice, bob]) await p.evaluate(() => (window.loadedOnce = true));

    const t0 = Date.now();
    await gateway.stop(); // SIGTERM: drain, close every session with 1001 "shutdown", exit
    const stopped = Date.now() - t0;
    // While it is down: the call view stays, with the tiles, and says it is reconnecting.
    for (const [name, page] of [["alice", alice], ["bob", bob]]) {
      const s = await waitFor(`${name} showing that it reconnects`, async () => {
        const u = await uiState(page);
        return u.status === "reconnecting" && u.banner ? u : null;
      }, 5000, 50);
      console.log(`${name} while the gateway is down: ${JSON.stringify(s)}`);
      assert.match(s.banner, /^Reconnecting/);
      assert.equal(s.lobby, false, `${name} stays in the call view`);
      assert.ok(s.tiles.includes(name), `${name}'s own tile stays`);
    }
    const downFor = 1500;
    await new Promise((r) => setTimeout(r, downFor)); // a restart takes a moment; the pages keep retrying meanwhile
    gateway = await startGateway({ ...PORTS, port: httpPort });
    const up = Date.now();

    const after = {
      alice: await waitDecoding("alice decoding bob again", alice, before.alice.sub, 30000),
      bob: await waitDecoding("bob decoding alice again", bob, before.bob.sub, 30000),
    };
    const back = Date.now() - up;
    console.log(`gateway stopped in ${stopped} ms, restarted after ${downFor} ms more; both pages decoding again ${back} ms after it was up: alice ${after.alice.frames} frames on ${after.alice.sub} (was ${before.alice.sub}), bob ${after.bob.frames} on ${after.bob.sub}`);
    for (const [name, page] of [["alice", alice], ["bob", bob]]) {
      const u = await uiState(page);
      assert.equal(u.loadedOnce, true, `${name}'s page was not reloaded`);
      assert.equal(u.banner, null, `${name}'s reconnecting notice is gone`);
      assert.deepEqual(u.tiles.sort(), ["alice", "bob"], `${name} sees both tiles`);
      // The details show this session's connections only, both READY.
      const conns = await page.$$eval(".conn", (els) => els.map((e) => `${e.dataset.role}:${e.dataset.state}`));
      assert.deepEqual(conns.sort(), ["publish:READY", "subscribe:READY"], `${name}'s details show the current connections`);
    }
    // The new gateway has the room with both in it.
    const rooms = await (await fetch(`${gateway.base}/v1/rooms`, { headers: { authorization: "Bearer browser-test-key" } })).json();
    assert.equal(rooms.rooms.find((r) => r.name === "restart-room").participants, 2);
  } finally {
    for (const p of [alice, bob]) {
      await p.evaluate(() => window.gw.leave()).catch(() => {});
      await p.context().close().catch(() => {});
    }
    await ensureGateway();
  }
});

test("a dropped WebSocket: the page reconnects with backoff and the call resumes", { timeout: 60000 }, async () => {
  const alice = await joinPage(browser, gateway.base, "drop-room", "alice");
  const bob = await joinPage(browser, gateway.base, "drop-room", "bob");
  try {
    const first = await waitDecoding("alice decoding bob", alice);
    await waitDecoding("bob decoding alice", bob);
    await alice.evaluate(() => (window.loadedOnce = true));
    // The socket goes away under the page (as when the network drops it); not a leave.
    await alice.evaluate(() => window.gw.ws.close(4000, "test drop"));
    const again = await waitDecoding("alice decoding bob after the drop", alice, first.sub, 20000);
    await waitFor("bob still decoding alice", async () => (await decoding(bob)).frames > 10, 20000);
    const u = await uiState(alice);
    assert.equal(u.loadedOnce, true);
    assert.deepEqual(u.tiles.sort(), ["alice", "bob"]);
    console.log(`after the drop alice decodes ${again.frames} frames on ${again.sub}`);
  } finally {
    for (const p of [alice, bob]) {
      await p.evaluate(() => window.gw.leave()).catch(() => {});
      await p.context().close().catch(() => {});
    }
  }
});

test("when the gateway stays away the page gives up in words and can try again", { timeout: 60000 }, async () => {
  const alice = await joinPage(browser, gateway.base, "away-room", "alice");
  try {
    await waitFor("alice in the call", () => alice.evaluate(() => window.gw.status === "in-call"), 20000);
    // Give up after 3 s instead of 60 s, so the test is short.
    await alice.evaluate(() => (window.gw.options.giveUpMs = 3000));
    await gateway.stop();
    const t0 = Date.now();
    const s = await waitFor("alice giving up", async () => {
      const u = await uiState(alice);
      return u.status === "gave-up" ? u : null;
    }, 20000, 100);
    const attempts = await alice.evaluate(() => window.gw.reconnect.attempts);
    console.log(`gave up after ${Date.now() - t0} ms and ${attempts} attempts: ${JSON.stringify(s)}`);
    assert.ok(attempts >= 2 && attempts <= 6, `retried with backoff, not in a tight loop: ${attempts} attempts in ~3 s`);
    assert.match(s.banner, /^Could not get back into the call\. Cannot reach the meeting server\./);
    assert.equal(await alice.textContent("#banner-action"), "Try again");
    assert.equal(s.lobby, false);
    gateway = await startGateway({ ...PORTS, port: httpPort });
    await alice.click("#banner-action");
    await waitFor("alice back in after Try again", () => alice.evaluate(() => window.gw.status === "in-call" && window.gw.pub.pc && window.gw.pub.pc.connectionState === "connected"), 20000);
  } finally {
    await alice.evaluate(() => window.gw.leave()).catch(() => {});
    await alice.context().close().catch(() => {});
    await ensureGateway();
  }
});

test("a reload comes back to the same room with the same name and identity", { timeout: 60000 }, async () => {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  const bob = await joinPage(browser, gateway.base, "café", "bob");
  try {
    // Typed in, as a person would (no id in the address: the page makes its own).
    await page.goto(gateway.base);
    await page.fill("#room-input", "café");
    await page.fill("#name-input", "Zoë 山田");
    await page.click("#join-button");
    await waitFor("Zoë in the call", () => page.evaluate(() => window.gw.status === "in-call"), 20000);
    const me = await page.evaluate(() => window.gw.me);
    assert.match(me, /^[A-Za-z0-9._+-]{1,64}$/, "the participant id is a safe identifier");
    assert.match(page.url(), /room=caf%C3%A9/, "the room is in the address");
    await waitFor("bob seeing Zoë's name", () => bob.evaluate((me) => document.querySelector(`.tile[data-participant="${me}"] .name`)?.textContent === "Zoë 山田", me), 10000);

    await page.reload();
    await waitFor("Zoë back in the call after the reload", () => page.evaluate(() => window.gw.status === "in-call"), 20000);
    const after = await page.evaluate(() => ({ me: window.gw.me, name: window.gw.name, room: window.gw.room, title: document.getElementById("room-title").textContent }));
    assert.deepEqual(after, { me, name: "Zoë 山田", room: "café", title: "café" });
    // Bob sees one Zoë, not a ghost of the page before the reload.
    const tiles = await waitFor("bob with two tiles", async () => {
      const t = await bob.$$eval("#grid .tile", (els) => els.map((e) => e.dataset.participant));
      return t.length === 2 ? t : null;
    }, 10000);
    assert.deepEqual(tiles.sort(), ["bob", me].sort());

    // After leaving, a reload stays in the lobby, with the form filled in.
    await page.evaluate(() => window.gw.leave());
    await page.reload();
    await page.waitForSelector("#join-button");
    const form = await page.evaluate(() => ({ room: document.getElementById("room-input").value, name: document.getElementById("name-input").value, lobby: !document.getElementById("lobby").hidden, status: window.gw.status }));
    assert.deepEqual(form, { room: "café", name: "Zoë 山田", lobby: true, status: "lobby" });
  } finally {
    await bob.evaluate(() => window.gw.leave()).catch(() => {});
    await bob.context().close().catch(() => {});
    await context.close().catch(() => {});
  }
});

test("joining as the same participant elsewhere: the first tab says so in plain words and can rejoin", { timeout: 60000 }, async () => {
  const first = await joinPage(browser, gateway.base, "replace-room", "sam");
  await waitFor("the first tab in the call", () => first.evaluate(() => window.gw.status === "in-call"), 20000);
  const second = await joinPage(browser, gateway.base, "replace-room", "sam");
  try {
    await waitFor("the second tab in the call", () => second.evaluate(() => window.gw.status === "in-call"), 20000);
    const s = await waitFor("the first tab telling what happened", async () => {
      const u = await uiState(first);
      return u.status === "replaced" ? u : null;
    }, 10000);
    console.log(`the first tab: ${JSON.stringify(s)}`);
    assert.match(s.banner, /another tab or window/);
    assert.doesNotMatch(s.banner, /replaced|Disconnected/);
    assert.equal(s.lobby, false);
    assert.equal(await first.isVisible("#banner-action"), true);
    assert.equal(await first.textContent("#banner-action"), "Rejoin here");
    // It does not fight back by itself: the second tab keeps the call.
    assert.equal(await second.evaluate(() => window.gw.status), "in-call");
    await first.click("#banner-action");
    await waitFor("the first tab back in", () => first.evaluate(() => window.gw.status === "in-call"), 20000);
    await waitFor("the second tab told in turn", () => second.evaluate(() => window.gw.status === "replaced"), 10000);
  } finally {
    for (const p of [first, second]) {
      await p.evaluate(() => window.gw.leave()).catch(() => {});
      await p.context().close().catch(() => {});
    }
  }
});
