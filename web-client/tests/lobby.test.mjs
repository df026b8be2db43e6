// Getting in, as a new user would: names and rooms in any script with spaces, a name that is too
// long, two people with the same name, and what the page says (in plain words, with what to do)
// when the room is full, the server is down or the browser blocks the camera. Also: a second
// session's details do not carry the first one's connections and activity.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { chromium } from "playwright-core";
import { api, launchChromium, startGateway, waitFor } from "./harness.mjs";

let gateway;
let browser;

before(async () => {
  gateway = await startGateway({ portMin: 43950, portMax: 43989 });
  browser = await launchChromium();
});

after(async () => {
  if (browser) await browser.close();
  if (gateway) await gateway.stop();
});

/** A fresh page at the lobby (nothing remembered), with the form filled in as typed. */
async function lobby(base, room, name, { viewport = { width: 1280, height: 800 } } = {}) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.on("pageerror", (e) => console.error(`[${name}] page error: ${e.message}`));
  await page.goto(base);
  await page.fill("#room-input", room);
  await page.fill("#name-input", name);
  return page;
}

async function joinError(page) {
  return waitFor("the join error", () => page.evaluate(() => {
    const box = document.getElementById("join-error");
    return box.hidden ? null : { text: document.getElementById("join-error-text").textContent, code: box.dataset.code, action: document.getElementById("join-error-action").hidden ? null : document.getElementById("join-error-action").textContent, status: window.gw.status };
  }), 15000, 50);
}

const inCall = (page) => waitFor("the page in the call", () => page.evaluate(() => window.gw.status === "in-call"), 20000);
const tileNames = (page) => page.$$eval("#grid .tile .name", (els) => els.map((e) => e.textContent));

async function close(...pages) {
  for (const p of pages) {
    await p.evaluate(() => window.gw.leave()).catch(() => {});
    await p.context().close().catch(() => {});
  }
}

test("names and rooms in any script, with spaces, are accepted and shown; two people may share a name", { timeout: 60000 }, async () => {
  const a = await lobby(gateway.base, "山田 standup", "Mary Ann");
  const b = await lobby(gateway.base, "山田 standup", "Mary Ann");
  const c = await lobby(gateway.base, "山田 standup", "Zoë 山田");
  try {
    for (const p of [a, b, c]) {
      await p.click("#join-button");
      await inCall(p);
    }
    const ids = await Promise.all([a, b, c].map((p) => p.evaluate(() => window.gw.me)));
    for (const id of ids) assert.match(id, /^[A-Za-z0-9._+-]{1,64}$/, `participant id ${id} is a safe identifier`);
    assert.equal(new Set(ids).size, 3, "same name, different people");
    assert.match(ids[0], /^mary-ann-/, "the id is readable where it can be");
    const names = await waitFor("everyone seeing three tiles", async () => {
      const n = await tileNames(c);
      return n.length === 3 ? n : null;
    }, 15000);
    assert.deepEqual(names.sort(), ["Mary Ann", "Mary Ann", "Zoë 山田"].sort());
    assert.equal(await c.textContent("#room-title"), "山田 standup");
    // Nobody was thrown out by the other Mary Ann.
    for (const p of [a, b]) assert.equal(await p.evaluate(() => window.gw.status), "in-call");
    const initials = await a.$$eval("#grid .tile .avatar span", (els) => els.map((e) => e.textContent));
    assert.ok(initials.includes("Z山") && initials.includes("MA"), `initials: ${initials}`);
  } finally {
    await close(a, b, c);
  }
});

test("a name that is too long is refused in words, not cut", { timeout: 30000 }, async () => {
  const long = "N".repeat(70) + " " + "é".repeat(69); // 140 characters
  const p = await lobby(gateway.base, "long-names", long);
  try {
    assert.equal((await p.inputValue("#name-input")).length, 140, "the field keeps what was typed");
    await p.click("#join-button");
    const e = await joinError(p);
    assert.equal(e.text, "Your name can be at most 128 characters; this one has 140.");
    assert.equal(e.status, "lobby");
    // 128 is fine; the whole name reaches the others.
    const ok = long.slice(0, 128);
    await p.fill("#name-input", ok);
    await p.click("#join-button");
    await inCall(p);
    const shown = await p.$eval(".tile.local .name", (e) => e.textContent);
    assert.equal(shown, ok);
  } finally {
    await close(p);
  }
});

test("a full room says so and what to do", { timeout: 30000 }, async () => {
  const room = await api(gateway.base, "POST", "/v1/rooms", { name: "tiny", max_participants: 1 });
  assert.equal(room.status, 201);
  const first = await lobby(gateway.base, "tiny", "First");
  const p = await lobby(gateway.base, "tiny", "Second");
  try {
    await first.click("#join-button");
    await inCall(first);
    await p.click("#join-button");
    const e = await joinError(p);
    console.log(`full room: ${JSON.stringify(e)}`);
    assert.equal(e.code, "room_full");
    assert.match(e.text, /^This room is full\. Try again later, or pick another room name\.$/);
    assert.doesNotMatch(e.text, /WebSocket/);
    assert.equal(await p.isVisible("#join-button"), true);
    assert.equal(await p.isDisabled("#join-button"), false, "Join can be pressed again");
  } finally {
    await close(first, p);
  }
});

test("the server being down says so in words", { timeout: 30000 }, async () => {
  const other = await startGateway({ portMin: 43990, portMax: 43999 });
  const p = await lobby(other.base, "down", "Ann");
  await other.stop();
  try {
    await p.click("#join-button");
    const e = await joinError(p);
    console.log(`server down: ${JSON.stringify(e)}`);
    assert.equal(e.code, "unreachable");
    assert.match(e.text, /^Cannot reach the meeting server\./);
    assert.doesNotMatch(e.text, /fetch/i);
  } finally {
    await p.context().close();
  }
});

test("a blocked camera says where to allow it, and one can join without", { timeout: 40000 }, async () => {
  const host = await lobby(gateway.base, "blocked", "Host");
  // Kim's browser really asks, and the person answered "Block" (Chromium's own permission
  // setting; without the fake-UI flag that would say yes to every question).
  const blocking = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--use-fake-device-for-media-stream", "--allow-loopback-in-peer-connection", "--autoplay-policy=no-user-gesture-required"],
  });
  const p = await (await blocking.newContext()).newPage();
  await p.goto(gateway.base);
  await p.fill("#room-input", "blocked");
  await p.fill("#name-input", "Kim");
  try {
    await host.click("#join-button");
    await inCall(host);
    const cdp = await p.context().newCDPSession(p);
    for (const name of ["camera", "microphone"]) {
      await cdp.send("Browser.setPermission", { permission: { name }, setting: "denied", origin: gateway.base });
    }
    await p.click("#join-button");
    const e = await joinError(p);
    console.log(`camera blocked: ${JSON.stringify(e)}`);
    assert.equal(e.code, "NotAllowedError");
    assert.match(e.text, /blocked the camera and microphone/);
    assert.match(e.text, /site settings/);
    assert.doesNotMatch(e.text, /^Permission denied/);
    assert.equal(e.action, "Join without camera and microphone");
    await p.click("#join-error-action");
    await inCall(p);
    const me = await p.evaluate(() => window.gw.me);
    assert.equal(await p.evaluate(() => window.gw.pub.pc), null, "nothing published");
    // The host sees Kim as a tile with an avatar and a muted mark, and still gets Kim's name.
    await waitFor("the host seeing Kim", () => host.evaluate((me) => {
      const t = document.querySelector(`.tile[data-participant="${me}"]`);
      return t && !t.classList.contains("has-video") && t.classList.contains("mic-muted") && t.querySelector(".name").textContent === "Kim";
    }, me), 10000);
    // Kim receives the host.
    await waitFor("Kim decoding the host's video", () => p.evaluate(async () => {
      let f = 0;
      if (window.gw.sub.pc) (await window.gw.sub.pc.getStats()).forEach((s) => { if (s.type === "inbound-rtp" && s.kind === "video") f = s.framesDecoded; });
      return f > 5;
    }), 20000);
  } finally {
    await close(host, p);
    await blocking.close();
  }
});

test("a second session shows its own connections and activity only", { timeout: 40000 }, async () => {
  const p = await lobby(gateway.base, "again", "Lee");
  try {
    await p.click("#join-button");
    await inCall(p);
    await waitFor("both connections READY", async () => (await p.$$eval(".conn", (els) => els.filter((e) => e.dataset.state === "READY").length)) === 2, 20000);
    const firstIds = await p.evaluate(() => [...window.gw.connections.keys()]);
    await p.evaluate(() => window.gw.leave());
    await p.click("#join-button");
    await inCall(p);
    await waitFor("both new connections READY", async () => (await p.$$eval(".conn", (els) => els.filter((e) => e.dataset.state === "READY").length)) === 2, 20000);
    const shown = await p.evaluate(() => ({
      ids: [...document.querySelectorAll(".conn .id")].map((e) => e.textContent),
      activity: [...document.querySelectorAll("#activity li")].map((li) => [...li.childNodes].filter((n) => n.nodeName !== "TIME").map((n) => n.textContent).join("")),
    }));
    assert.equal(shown.ids.length, 2);
    for (const id of firstIds) assert.ok(!shown.ids.some((x) => x.includes(id)), `the first session's ${id} is not listed`);
    assert.deepEqual(shown.activity, ["joined again"], "the activity starts over");
  } finally {
    await close(p);
  }
});
