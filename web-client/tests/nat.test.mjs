// Clients behind the four classic NAT behaviours, and one that can reach nothing over UDP but a
// TURN server, join a room through the web client in real Chromium and exchange media with a
// browser on the public side. Everything runs in this run's own network namespaces
// (netlab.mjs): the gateway binary on a "public" address with media.announced_ips set to it,
// coturn beside it (use-auth-secret: the relay-only site's browser uses the credentials a second
// gateway, configured with turn.urls and turn.secret, minted with its token), one NAT router and
// client host per behaviour. Each NAT is first checked to
// behave as named (UDP probes from two public hosts), then a browser behind it must reach READY
// on both connections and decode the far side's video while the far side decodes its video.
//
// Needs root and `ip netns` (skipped with the reason otherwise), iptables and coturn
// (`scripts/test.sh` installs them). `node --test tests/nat.test.mjs` prints the figures.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { API_KEY, launchChromium, startGateway, waitFor } from "./harness.mjs";
import { Lab, NATS, PUBLIC, TURN_ONLY, TURN_PORT, netnsUnsupported, sleep, wanIp } from "./netlab.mjs";

const unsupported = netnsUnsupported();
const BASE = `http://${PUBLIC.gw}:8080`;
// A second gateway on the same host, configured with the TURN server (turn.urls, turn.secret), for
// the relay-only site: the NAT sites' gateway hands out no STUN/TURN server, so their browsers
// learn their mappings from the gateway's answers (prflx). Media ports 48800-48899.
const RELAY_BASE = `http://${PUBLIC.gw}:8081`;
// coturn checks the credentials the gateway mints (use-auth-secret) with the secret they share.
const TURN_URL = `turn:${PUBLIC.turn}:${TURN_PORT}?transport=udp`;
const TURN_SECRET = "relay-shared-secret";
// getUserMedia needs a secure context; the gateway is served over plain HTTP on a LAN address.
const CHROMIUM_ARGS = [`--unsafely-treat-insecure-origin-as-secure=${BASE},${RELAY_BASE}`];

/** Decoding stats of the page's subscribe connection and its selected candidate pair. */
function mediaStats(page, role) {
  return page.evaluate(async (role) => {
    const pc = role === "publish" ? window.gw.pub.pc : window.gw.sub.pc;
    if (!pc) return null;
    const stats = await pc.getStats();
    const out = { video: null, audio: null, pair: null };
    stats.forEach((s) => {
      if (s.type === "inbound-rtp") out[s.kind] = { framesDecoded: s.framesDecoded || 0, frameWidth: s.frameWidth || 0, packetsReceived: s.packetsReceived };
      if (s.type === "transport" && s.selectedCandidatePairId) {
        const pair = stats.get(s.selectedCandidatePairId);
        const local = pair && stats.get(pair.localCandidateId);
        const remote = pair && stats.get(pair.remoteCandidateId);
        if (local && remote) {
          out.pair = { localType: local.candidateType, local: `${local.address}:${local.port}`, remote: `${remote.address}:${remote.port}`, relayProtocol: local.relayProtocol || null };
        }
      }
    });
    return out;
  }, role);
}

/** Milliseconds from INITIAL to READY of each of the page's connections (gateway clock). */
function readyTimes(page) {
  return page.evaluate(() => {
    const out = {};
    for (const role of ["publish", "subscribe"]) {
      const ev = window.gw.events.filter((m) => m.type === "connection_event" && m.role === role);
      const initial = ev.find((m) => m.event === "INITIAL");
      const ready = ev.find((m) => m.event === "READY");
      if (!initial || !ready) return null;
      out[role] = { ms: Date.parse(ready.at) - Date.parse(initial.at), id: ready.connection_id };
    }
    return out;
  });
}

describe("clients behind NATs and a TURN relay (network namespaces)", { skip: unsupported ? `needs network namespaces: ${unsupported}` : false }, () => {
  let lab;
  let gateway;
  let relayGateway;
  let turn;
  let farBrowser;
  const agents = {};
  const figures = [];

  before(async () => {
    lab = new Lab();
    lab.up([...NATS, TURN_ONLY]);
    for (const host of ["gw", "far"]) {
      agents[host] = await lab.agent(host);
      await agents[host].bind("echo", { echo: true });
      await agents[host].bind("other");
    }
    gateway = await startGateway({
      host: PUBLIC.gw,
      port: 8080,
      portMin: 40000,
      portMax: 40199,
      wrap: (bin) => ["ip", ["netns", "exec", lab.ns("gw"), bin]],
      healthy: async (url) => (await agents.far.fetchStatus(url)) === 200,
      env: {
        GATEWAY__MEDIA__BIND_IP: "0.0.0.0",
        GATEWAY__MEDIA__ANNOUNCED_IPS: PUBLIC.gw,
        GATEWAY__DEV__TOKEN_ROUTE: "on",
      },
    });
    relayGateway = await startGateway({
      host: PUBLIC.gw,
      port: 8081,
      portMin: 48800,
      portMax: 48899,
      wrap: (bin) => ["ip", ["netns", "exec", lab.ns("gw"), bin]],
      healthy: async (url) => (await agents.far.fetchStatus(url)) === 200,
      env: {
        GATEWAY__MEDIA__BIND_IP: "0.0.0.0",
        GATEWAY__MEDIA__ANNOUNCED_IPS: PUBLIC.gw,
        GATEWAY__DEV__TOKEN_ROUTE: "on",
        GATEWAY__TURN__URLS: TURN_URL,
        GATEWAY__TURN__SECRET: TURN_SECRET,
      },
    });
    turn = lab.spawn("turn", "turnserver", [
      "-n",
      `--listening-ip=${PUBLIC.turn}`,
      `--relay-ip=${PUBLIC.turn}`,
      `--listening-port=${TURN_PORT}`,
      "--min-port=49152",
      "--max-port=49407",
      "--use-auth-secret",
      `--static-auth-secret=${TURN_SECRET}`,
      "--realm=gateway.test",
      "--fingerprint",
      "--no-tls",
      "--no-dtls",
      "--no-cli",
      "--no-tcp-relay",
      `--allowed-peer-ip=${PUBLIC.gw}`,
      `--pidfile=${lab.tmp}/turnserver.pid`,
      `--userdb=${lab.tmp}/turndb`,
      "--log-file=stdout",
      "--simple-log",
    ]);
    // coturn is up when it answers a STUN binding request.
    const stunRequest = "000100002112a442" + "6e61742d746573742d747572"; // type, length, cookie, transaction id
    await waitFor("coturn answering STUN", async () => {
      if (turn.exitCode !== null) throw new Error(`turnserver exited:\n${turn.output}`);
      const m = agents.far.mark();
      agents.far.send({ op: "send", tag: "other", to: `${PUBLIC.turn}:${TURN_PORT}`, hex: stunRequest });
      await sleep(200);
      return agents.far.since(m).some((e) => e.ev === "recv" && e.from === `${PUBLIC.turn}:${TURN_PORT}`);
    }, 10000, 100);
    farBrowser = await launchChromium({ executablePath: lab.chromium("far"), extraArgs: CHROMIUM_ARGS });
  });

  after(async () => {
    if (figures.length) {
      console.log("\nsite                      | Chromium selected pair (local → remote)       | gateway sees       | INITIAL→READY publish / subscribe | click→both READY | decoded at far / at client");
      for (const f of figures) {
        console.log(
          `${f.kind.padEnd(25)} | ${`${f.pairType} ${f.pair}`.padEnd(45)} | ${f.gatewaySees.padEnd(18)} | ${`${f.ready.publish.ms} ms / ${f.ready.subscribe.ms} ms`.padEnd(33)} | ${`${f.clickToReady} ms`.padEnd(16)} | ${f.decodedAtFar} / ${f.decodedAtClient}`,
        );
      }
    }
    if (farBrowser) await farBrowser.close().catch(() => {});
    if (gateway) await gateway.stop().catch(() => {});
    if (relayGateway) await relayGateway.stop().catch(() => {});
    if (lab) lab.down();
  });

  /** Gateway-side view of a connection (asked from the public browser, the only one that reaches REST). */
  async function connectionStats(farPage, id) {
    return farPage.evaluate(
      async ([id, key]) => (await (await fetch(`/v1/connections/${id}`, { headers: { authorization: `Bearer ${key}` } })).json()).stats,
      [id, API_KEY],
    );
  }

  /** A room with a public browser and a browser at `site`; both must decode each other's video. */
  async function call(kind, site, query = "", base = BASE) {
    const room = `room-${kind}`;
    const farContext = await farBrowser.newContext();
    const browser = await launchChromium({ executablePath: lab.chromium(`c${site}`), extraArgs: CHROMIUM_ARGS });
    try {
      const farPage = await farContext.newPage();
      await farPage.goto(`${base}/?room=${room}&name=far`);
      await farPage.click("#join-button");
      const page = await browser.newPage();
      page.on("pageerror", (e) => console.error(`[${kind}] page error: ${e.message}`));
      await page.goto(`${base}/?room=${room}&name=client${query}`);
      const t0 = Date.now();
      await page.click("#join-button");
      const ready = await waitFor(`${kind}: the client's publish and subscribe connections READY`, async () => {
        const failed = await page.evaluate(() => window.gw.events.filter((m) => m.event === "FAILED"));
        if (failed.length) throw new Error(`FAILED: ${JSON.stringify(failed)}`);
        return readyTimes(page);
      }, 20000, 50);
      const clickToReady = Date.now() - t0;

      const decoded = async (p) => {
        const s = await mediaStats(p, "subscribe");
        return s && s.video && s.video.framesDecoded > 10 && s.video.frameWidth >= 320 && s.audio && s.audio.packetsReceived > 20 ? s : null;
      };
      const atClient = await waitFor(`${kind}: the client decoding the far side's video`, () => decoded(page), 20000);
      const atFar = await waitFor(`${kind}: the far side decoding the client's video`, () => decoded(farPage), 20000);
      const pub = await waitFor(`${kind}: the client's selected pair`, async () => (await mediaStats(page, "publish")).pair, 5000);
      const gw = await waitFor(`${kind}: the gateway's selected pair`, async () => (await connectionStats(farPage, ready.publish.id)).selected_pair, 5000);
      const result = {
        kind,
        ready,
        clickToReady,
        pairType: pub.localType,
        pair: `${pub.local} → ${pub.remote}`,
        local: pub.local,
        remote: pub.remote,
        gatewaySees: gw.remote,
        decodedAtFar: `${atFar.video.framesDecoded} frames ${atFar.video.frameWidth}px`,
        decodedAtClient: `${atClient.video.framesDecoded} frames ${atClient.video.frameWidth}px`,
        subPair: (await mediaStats(page, "subscribe")).pair,
        iceServers: await page.evaluate(() => window.gw.options.iceServers),
      };
      figures.push(result);
      await page.evaluate(() => window.gw.leave());
      await farPage.evaluate(() => window.gw.leave());
      return result;
    } finally {
      await browser.close().catch(() => {});
      await farContext.close().catch(() => {});
    }
  }

  for (const nat of NATS) {
    test(`${nat.kind} (${nat.about}): behaves as named; a browser behind it reaches READY and media is decoded both ways`, { timeout: 90000 }, async () => {
      const client = await lab.agent(`c${nat.site}`);
      const seen = await lab.probeNat(nat.site, { client, gw: agents.gw, far: agents.far });
      console.log(`${nat.kind}: local port ${seen.localPort}; gw sees ${seen.mappingSeenByGw}, far sees ${seen.mappingSeenByFar}; unsolicited from gw's other port ${seen.sameHostOtherPort ? "passes" : "dropped"}, from far ${seen.otherHost ? "passes" : "dropped"}`);
      for (const [k, v] of Object.entries(nat.expect)) assert.equal(seen[k], v, `${nat.kind}: ${k} (probe: ${JSON.stringify(seen)})`);
      assert.equal(seen.mappingSeenByGw.split(":")[0], wanIp(nat.site), "the client's datagrams leave from the router's public address");

      const r = await call(nat.kind, nat.site);
      // No STUN server is configured: the browser learns its NAT mapping from the gateway's
      // answers to its checks (a peer-reflexive local candidate), and both ends agree on it.
      assert.equal(r.pairType, "prflx", `the browser's side of the pair is its NAT mapping: ${r.pair}`);
      assert.equal(r.local.split(":")[0], wanIp(nat.site), "the mapping is on the NAT's public address");
      assert.equal(r.gatewaySees, r.local, "the gateway talks to that mapping");
      assert.equal(r.remote.split(":")[0], PUBLIC.gw, "the browser talks to the announced address");
    });
  }

  test("UDP blocked except to a TURN server: a relay-only browser reaches READY through coturn and media is decoded both ways", { timeout: 90000 }, async () => {
    const client = await lab.agent(`c${TURN_ONLY.site}`);
    // The firewall is real: UDP straight to the gateway's host never arrives.
    await client.bind("probe");
    const m = agents.gw.mark();
    for (let i = 0; i < 3; i++) client.send({ op: "send", tag: "probe", to: `${PUBLIC.gw}:${agents.gw.ports.echo}`, data: "blocked?" });
    await sleep(500);
    assert.ok(!agents.gw.since(m).some((e) => e.ev === "recv" && e.data === "blocked?"), "direct UDP from the firewalled site is dropped");

    // No TURN server in the address: the page uses the one its token came with (from the
    // gateway configured with it), with credentials the gateway minted for it.
    const r = await call(TURN_ONLY.kind, TURN_ONLY.site, "&iceTransportPolicy=relay", RELAY_BASE);
    assert.equal(r.pairType, "relay", `publish goes through a relay candidate: ${r.pair}`);
    assert.equal(r.subPair.localType, "relay", `subscribe goes through a relay candidate: ${JSON.stringify(r.subPair)}`);
    assert.equal(r.local.split(":")[0], PUBLIC.turn, "the relayed address is coturn's");
    assert.equal(r.gatewaySees.split(":")[0], PUBLIC.turn, "the gateway talks to the TURN relay");
    // The credentials were minted for this participant, valid until its token expires.
    const [server] = r.iceServers;
    assert.deepEqual(server.urls, [TURN_URL]);
    const [expiry, identity] = server.username.split(":");
    assert.ok(Number(expiry) > Date.now() / 1000 + 600 && identity.length > 0, `username ${server.username}`);
  });
});
