// The load tester's synthetic publishers send real video: a browser in the same room decodes
// it. Two `loadtest` processes publish into one room (VP8 640x360 and H.264 1280x720 from the
// committed clips); a Chromium page joins through the web client and must decode both, at the
// clips' sizes, with frames still coming.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import path from "node:path";
import { after, before, test } from "node:test";
import { API_KEY, api, launchChromium, repoRoot, startGateway, waitFor, joinPage as joinPageOf } from "./harness.mjs";

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

function startPublisher(room, codec, bitrate) {
  const bin = process.env.LOADTEST_BIN || path.join(repoRoot, "target", "debug", "loadtest");
  const args = [
    "--url", gateway.base, "--api-key", API_KEY, "--room", room,
    "--publishers", "1", "--subscribers", "0", "--codec", codec, "--video-bitrate", bitrate,
    "--duration", "120s", "--quiet",
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
