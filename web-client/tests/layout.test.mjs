// The call as a person sees it, at a phone's, a laptop's and a desktop's window size with one to
// nine people: tiles never overlap, fit between the top bar and the control bar, use the space
// (centred, not in a corner), and every name is readable inside its tile (a 47-character one is
// cut with an ellipsis, in its tile and in the activity list). Also: the details panel is closed
// by default and covers at most part of a phone's screen, videos and the layer picker have
// accessible names, and the page asks for nothing that is not there (favicon). Screenshots of
// the room at the three sizes go to test-output/room-<w>x<h>.png.
//
// Two real Chromium participants (with camera and microphone) and up to seven more that join
// with a WebSocket only (no media: they show as avatars), so nine people stay cheap on 2 cores.

import assert from "node:assert/strict";
import path from "node:path";
import { after, before, test } from "node:test";
import { ensureOutputDir, joinPage, launchChromium, startGateway, waitFor } from "./harness.mjs";

const SIZES = [
  [390, 844],
  [1280, 800],
  [1920, 1080],
];
const LONG_NAME = "Bartholomew Maximilian Featherstonehaugh-Smythe"; // 47 characters
const GHOSTS = [
  ["jose", "José Núñez"],
  ["long", LONG_NAME],
  ["ana", "Ana"],
  ["liwei", "Li Wei"],
  ["emilie", "Émilie Dubois"],
  ["kwame", "Kwame"],
  ["priya", "Priya"],
];

let gateway;
let browser;

before(async () => {
  gateway = await startGateway({ portMin: 43850, portMax: 43869 });
  browser = await launchChromium();
});

after(async () => {
  if (browser) await browser.close();
  if (gateway) await gateway.stop();
});

/** A participant with only a WebSocket (no media), joined from `helper` with a dev token. */
async function ghostJoin(helper, room, participant, name) {
  const r = await fetch(`${gateway.base}/v1/dev/token`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ room, participant, name }),
  });
  assert.equal(r.status, 200, `dev token for ${name}`);
  const { token } = await r.json();
  await helper.evaluate(async (token) => {
    const ws = new WebSocket(`ws://${location.host}/v1/ws?token=${encodeURIComponent(token)}`);
    await new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onerror = () => reject(new Error("ghost WebSocket refused"));
    });
    (window.ghosts ||= []).push(ws);
  }, token);
}

/** Rectangles of the tiles, their name labels, the bars and the stage, after the layout settled. */
async function measure(page) {
  return page.evaluate(async () => {
    await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
    const rect = (el) => {
      const r = el.getBoundingClientRect();
      return { left: r.left, top: r.top, right: r.right, bottom: r.bottom, width: r.width, height: r.height };
    };
    const tiles = [...document.querySelectorAll("#grid .tile")].map((t) => {
      const label = t.querySelector(".label");
      const name = t.querySelector(".name");
      const lr = rect(label);
      // Is the name really visible there (not under another tile, the banner or a bar)?
      const hit = document.elementFromPoint(lr.left + Math.min(24, lr.width / 2), (lr.top + lr.bottom) / 2);
      return {
        pid: t.dataset.participant,
        rect: rect(t),
        label: lr,
        name: name.textContent,
        nameClipped: name.scrollWidth > name.clientWidth,
        labelVisible: !!hit && label.contains(hit),
      };
    });
    return {
      vw: innerWidth,
      vh: innerHeight,
      topbar: rect(document.querySelector(".topbar")),
      controls: rect(document.getElementById("controls")),
      stage: rect(document.getElementById("grid")),
      detailsVisible: !document.getElementById("details").hidden,
      tiles,
    };
  });
}

async function settledLayout(page) {
  let last = null;
  for (let i = 0; i < 30; i++) {
    const m = await measure(page);
    if (last && JSON.stringify(m) === JSON.stringify(last)) return m;
    last = m;
  }
  return last;
}

const EPS = 0.5;

function checkLayout(m, n, where) {
  assert.equal(m.tiles.length, n, `${where}: one tile per person`);
  for (const t of m.tiles) {
    const r = t.rect;
    const what = `${where}: tile of ${t.pid} ${JSON.stringify(r)}`;
    assert.ok(r.left >= -EPS && r.right <= m.vw + EPS, `${what} inside the window's width ${m.vw}`);
    assert.ok(r.top >= m.topbar.bottom - EPS, `${what} below the top bar (${m.topbar.bottom})`);
    assert.ok(r.bottom <= m.controls.top + EPS, `${what} above the control bar (${m.controls.top})`);
    assert.ok(r.width >= 90 && r.height >= 67, `${what} big enough to see someone`);
    const l = t.label;
    assert.ok(
      l.left >= r.left - EPS && l.right <= r.right + EPS && l.top >= r.top - EPS && l.bottom <= r.bottom + EPS,
      `${where}: the name label of ${t.pid} ${JSON.stringify(l)} stays inside its tile ${JSON.stringify(r)}`,
    );
    assert.ok(t.labelVisible, `${where}: the name of ${t.pid} is not covered`);
  }
  for (let i = 0; i < m.tiles.length; i++) {
    for (let j = i + 1; j < m.tiles.length; j++) {
      const a = m.tiles[i].rect;
      const b = m.tiles[j].rect;
      const ox = Math.min(a.right, b.right) - Math.max(a.left, b.left);
      const oy = Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top);
      assert.ok(!(ox > EPS && oy > EPS), `${where}: tiles of ${m.tiles[i].pid} ${JSON.stringify(a)} and ${m.tiles[j].pid} ${JSON.stringify(b)} overlap`);
    }
  }
  // The tiles use the stage: most of it covered, and the group centred in it.
  const s = m.stage;
  const used = m.tiles.reduce((sum, t) => sum + t.rect.width * t.rect.height, 0) / (s.width * s.height);
  assert.ok(used >= 0.35, `${where}: tiles cover ${(used * 100).toFixed(0)}% of the stage ${s.width}x${s.height}, not at least 35%`);
  const box = {
    left: Math.min(...m.tiles.map((t) => t.rect.left)),
    right: Math.max(...m.tiles.map((t) => t.rect.right)),
    top: Math.min(...m.tiles.map((t) => t.rect.top)),
    bottom: Math.max(...m.tiles.map((t) => t.rect.bottom)),
  };
  const dx = (box.left + box.right) / 2 - (s.left + s.right) / 2;
  const dy = (box.top + box.bottom) / 2 - (s.top + s.bottom) / 2;
  assert.ok(Math.abs(dx) <= 4 && Math.abs(dy) <= 4, `${where}: the tiles are centred on the stage (off by ${dx.toFixed(1)}, ${dy.toFixed(1)} px)`);
  return used;
}

/** Accessible names (Chromium's own accessibility tree) by role. */
async function accessibleNames(page) {
  const cdp = await page.context().newCDPSession(page);
  try {
    const { nodes } = await cdp.send("Accessibility.getFullAXTree");
    const out = {};
    for (const n of nodes) {
      if (n.ignored || !n.role) continue;
      (out[n.role.value] ||= []).push(n.name ? n.name.value : "");
    }
    return out;
  } finally {
    await cdp.detach().catch(() => {});
  }
}

test("tiles fit and never overlap at 390x844, 1280x800 and 1920x1080 with 1 to 9 people", { timeout: 90000 }, async () => {
  const room = "layout-room";
  const missing = [];
  const viewer = await joinPage(browser, gateway.base, room, "Zoë", "layers=1", { viewport: { width: 1280, height: 800 } });
  viewer.on("response", (r) => {
    if (r.status() === 404) missing.push(r.url());
  });
  const helper = await (await browser.newContext()).newPage();
  await helper.goto(`${gateway.base}/favicon.svg`);
  let bob;
  try {
    await waitFor("the viewer in the call", () => viewer.evaluate(() => window.gw.status === "in-call"), 20000);
    // The default view is the call: no details panel until asked for.
    let m = await settledLayout(viewer);
    assert.equal(m.detailsVisible, false, "the connection details are closed by default");
    assert.ok(Math.abs(m.stage.width - m.vw) <= 1, `the call has the whole width (${m.stage.width} of ${m.vw})`);

    const coverage = [];
    for (let n = 1; n <= 9; n++) {
      if (n === 2) bob = await joinPage(browser, gateway.base, room, "bob");
      if (n > 2) await ghostJoin(helper, room, ...GHOSTS[n - 3]);
      await waitFor(`${n} tiles at the viewer`, async () => (await viewer.$$("#grid .tile")).length === n, 20000);
      if (n === 2) {
        await waitFor("the viewer showing bob's video", () => viewer.evaluate(() => document.querySelector('.tile[data-participant="bob"]').classList.contains("has-video")), 20000);
      }
      if (n === 4) {
        // For the pictures: bob mutes his microphone (the mark shows on his tile).
        await bob.click("#mic-button");
        await waitFor("bob's muted mark at the viewer", () => viewer.evaluate(() => document.querySelector('.tile[data-participant="bob"]').classList.contains("mic-muted")), 10000);
      }
      for (const [w, h] of SIZES) {
        await viewer.setViewportSize({ width: w, height: h });
        m = await settledLayout(viewer);
        const used = checkLayout(m, n, `${w}x${h}, ${n} ${n === 1 ? "person" : "people"}`);
        coverage.push(`${w}x${h}/${n}: ${(used * 100).toFixed(0)}% ${Math.round(m.tiles[0].rect.width)}x${Math.round(m.tiles[0].rect.height)}`);
        if (n >= 4) {
          const long = m.tiles.find((t) => t.pid === "long");
          assert.equal(long.name, LONG_NAME, "the long name is kept whole in the page");
          if (w === 390) assert.ok(long.nameClipped, "on a phone the 47-character name is cut with an ellipsis inside its tile");
        }
        if (n === 4) await viewer.screenshot({ path: path.join(ensureOutputDir(), `room-${w}x${h}.png`) });
      }
    }
    console.log(`tile coverage of the stage and first tile size: ${coverage.join("; ")}`);

    // Details on a phone: over the bottom of the call, not more than 60% of the screen, and the
    // long name wraps inside the activity list.
    await viewer.setViewportSize({ width: 390, height: 844 });
    await viewer.click("#details-button");
    const panel = await viewer.evaluate(() => {
      const p = document.getElementById("details").getBoundingClientRect();
      const items = [...document.querySelectorAll("#activity li")].map((li) => ({ text: li.textContent, spill: li.scrollWidth - li.clientWidth, right: li.getBoundingClientRect().right }));
      return { left: p.left, right: p.right, height: p.height, vh: innerHeight, vw: innerWidth, panelRight: p.right, items, conns: document.querySelectorAll("#connections .conn").length };
    });
    assert.ok(panel.height <= panel.vh * 0.6 + 1, `the details take ${panel.height}px of ${panel.vh}`);
    assert.ok(panel.left >= 0 && panel.right <= panel.vw + EPS, "the details fit the width");
    const longItem = panel.items.find((i) => i.text.includes(LONG_NAME));
    assert.ok(longItem, `the activity tells that ${LONG_NAME} joined: ${JSON.stringify(panel.items)}`);
    for (const i of panel.items) assert.ok(i.spill <= 1 && i.right <= panel.panelRight + EPS, `activity item inside the panel: ${JSON.stringify(i)}`);
    assert.equal(panel.conns, 2, "the details list this session's two connections");
    await viewer.click("#details-close");
    assert.equal(await viewer.isVisible("#details"), false);

    // Accessible names: every video names its person, the picker says what it picks.
    const names = await accessibleNames(viewer);
    console.log(`accessible names: ${JSON.stringify(Object.fromEntries(Object.entries(names).filter(([r]) => !["StaticText", "InlineTextBox", "generic", "none"].includes(r))))}`);
    assert.deepEqual((names.Video || []).sort(), ["Video of bob", "Your camera (Zoë)"], "the two cameras");
    for (const [, name] of GHOSTS) assert.ok((names.image || []).includes(`${name}, camera off`), `${name}'s avatar is named: ${JSON.stringify(names.image)}`);
    assert.deepEqual(names.combobox, ["Video quality of bob"], "one layer picker, for the one remote video, named by whose it is");

    const icon = await fetch(`${gateway.base}/favicon.ico`);
    assert.equal(icon.status, 200);
    assert.match(icon.headers.get("content-type"), /^image\//);
    assert.deepEqual(missing, [], "the page asked for nothing that is missing");
  } finally {
    await viewer.evaluate(() => window.gw.leave()).catch(() => {});
    if (bob) await bob.evaluate(() => window.gw.leave()).catch(() => {});
    await helper.context().close().catch(() => {});
  }
});
