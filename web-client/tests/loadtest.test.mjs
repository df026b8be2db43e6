// The load tester's synthetic publishers send real video: a browser in the same room decodes
// it. Two `loadtest` processes publish into one room (VP8 640x360 and H.264 1280x720 from the
// committed clips); a Chromium page joins through the web client and must decode both, at the
// clips' sizes, with frames still coming. Then two synthetic publishers, one hearing a tone and
// one silence (`--audio-source tone,silence`: each audio packet carries the clip's measured
// RFC 6464 level): only the first is ever an active speaker, and only its tile is ringed.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import path from "node:path";
import { after, before, test } from "node:test";
import { API_KEY, api, launchChromium, repoRoot, startGateway, waitFor, joinPage as joinPageOf, tileState } from "./harness.mjs";

let gateway;
let browser;
const publishers = [];

before(async () => {
  gateway = await startGateway({ portMin: 45200, portMax: 45299 });
  browser = await launchChromium();
});

after(async () => {
  for (const p of publishers) if (p.exitCode === null) p.kill("SIGKILL");
  if (browser) await browser.close();
  if (gateway) await gateway.stop();
});

function startPublisher(room, codec, bitrate, extra = ["--publishers", "1"]) {
  const bin = process.env.LOADTEST_BIN || path.join(repoRoot, "target", "debug", "loadtest");
  const args = [
    "--url", gateway.base, "--api-key", API_KEY, "--room", room,
    "--subscribers", "0", "--codec", codec, "--video-bitrate", bitrate,
    "--duration", "120s", "--quiet", ...extra,
  ];
  const child = spawn(bin, args, { stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  child.stdout.on("data", (d) => (out += d));
  child.stderr.on("data", (d) => (out += d));
  const exited = new Promise((resolve) => child.on("exit", (code) => resolve(code)));
  publishers.push(child);
  return { child, output: () => out, exited };
}

/** Every inbound video stream of the page's subscribe connection. */
async function inboundVideo(page) {
  return page.evaluate(async () => {
    const pc = window.gw.sub.pc;
    if (!pc) return [];
    const stats = await pc.getStats();
    const out = [];
    stats.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") {
        const codec = s.codecId && stats.get(s.codecId) ? stats.get(s.codecId).mimeType : null;
        out.push({ codec, framesDecoded: s.framesDecoded || 0, frameWidth: s.frameWidth, frameHeight: s.frameHeight, keyFramesDecoded: s.keyFramesDecoded });
      }
    });
    return out;
  });
}

test("a browser decodes the load tester's synthetic VP8 and H.264", { timeout: 120000 }, async () => {
  const room = "synthetic-media";
  const vp8 = startPublisher(room, "vp8", "500k");
  const h264 = startPublisher(room, "h264", "1.5M");
  await waitFor("both synthetic publishers' streams in the room", async () => {
    const r = await api(gateway.base, "GET", "/v1/rooms");
    const found = (r.body.rooms || []).find((x) => x.name === room);
    return found && found.streams >= 4 ? found : null;
  }, 30000);

  const page = await joinPageOf(browser, gateway.base, room, "viewer");

  const want = { "video/VP8": [640, 360], "video/H264": [1280, 720] };
  const first = await waitFor("the viewer decoding both synthetic streams", async () => {
    const v = await inboundVideo(page);
    const ok = Object.entries(want).every(([codec, [w, h]]) =>
      v.some((s) => s.codec === codec && s.framesDecoded > 20 && s.frameWidth === w && s.frameHeight === h),
    );
    return ok ? v : null;
  }, 45000);
  await new Promise((r) => setTimeout(r, 2000));
  const later = await inboundVideo(page);
  for (const [codec, [w, h]] of Object.entries(want)) {
    const a = first.find((s) => s.codec === codec);
    const b = later.find((s) => s.codec === codec);
    console.log(`viewer decodes ${codec} ${b.frameWidth}x${b.frameHeight}: ${a.framesDecoded} → ${b.framesDecoded} frames, ${b.keyFramesDecoded} keyframes`);
    assert.equal(b.frameWidth, w);
    assert.equal(b.frameHeight, h);
    assert.ok(b.framesDecoded >= a.framesDecoded + 30, `${codec}: frames keep coming at ~30 fps`);
  }
  await page.evaluate(() => window.gw.leave());

  // SIGINT ends a load test early with its report.
  for (const p of [vp8, h264]) {
    p.child.kill("SIGINT");
    const code = await p.exited;
    assert.equal(code, 0, p.output());
    assert.match(p.output(), /connections READY\s+1 of 1 \(publish 1/);
  }
});

/** Whether `viewer` rings `pid`'s tile (the web client's speaking highlight, as drawn). */
const ringed = (viewer, pid) => tileState(viewer, pid).then((s) => s && s.speaking);

test("of two synthetic publishers, the one with a tone is the active speaker and the silent one never", { timeout: 90000 }, async () => {
  const room = "speakers";
  const both = startPublisher(room, "vp8", "150k", ["--publishers", "2", "--audio-source", "tone,silence"]);
  const found = await waitFor("both publishers' streams in the room", async () => {
    const r = await api(gateway.base, "GET", "/v1/rooms");
    const f = (r.body.rooms || []).find((x) => x.name === room);
    return f && f.streams >= 4 ? f : null;
  }, 30000);
  const view = await api(gateway.base, "GET", `/v1/rooms/${found.room_id}`);
  const ids = view.body.participants.map((p) => p.participant_id);
  const tone = ids.find((id) => /^pub-0-0-/.test(id));
  const silent = ids.find((id) => /^pub-0-1-/.test(id));
  assert.ok(tone && silent, `the two publishers: ${JSON.stringify(ids)}`);

  const page = await joinPageOf(browser, gateway.base, room, "listener");
  await waitFor("the tone publisher ringed at the listener", () => ringed(page, tone).then((r) => r || null), 20000);
  // Watch for 4 s more (20 speaker ticks): the silent one is never listed nor ringed.
  for (let i = 0; i < 20; i++) {
    assert.equal(await ringed(page, silent), false, "the silent publisher's tile is not ringed");
    await new Promise((r) => setTimeout(r, 200));
  }
  const reports = await page.evaluate(() => window.gw.events.filter((m) => m.type === "active_speakers"));
  assert.ok(reports.length >= 1, "active_speakers reached the page");
  for (const m of reports) {
    const who = m.speakers.map((s) => s.participant_id);
    assert.ok(!who.includes(silent), `silence is never a speaker: ${JSON.stringify(m)}`);
  }
  // (The listener's own fake microphone beeps too: it may be listed beside the tone.)
  assert.ok(reports.some((m) => m.speakers.some((s) => s.participant_id === tone)), JSON.stringify(reports));
  assert.equal(await ringed(page, tone), true, "the tone publisher is still ringed");
  console.log(`active_speakers at the listener: ${JSON.stringify(reports.map((m) => m.speakers.map((s) => `${s.participant_id} ${s.level.toFixed(2)}`)))}`);
  await page.evaluate(() => window.gw.leave());
  both.child.kill("SIGINT");
  assert.equal(await both.exited, 0, both.output());
});
