// A small internet in network namespaces for the NAT tests: a "public" segment (a bridge) with
// the gateway's host, a second public host and a TURN host, and one site per NAT behaviour — a
// router namespace doing NAT with iptables between the public segment and a private LAN with one
// client host. Every address is private (10.211.0.0/16) and exists only inside this run's
// namespaces; nothing is sent anywhere else. Names carry the test process's id, so concurrent
// runs do not collide, and `down()` (also called on exit and on SIGINT/SIGTERM) removes every
// namespace and ends every process started in them. Namespaces left by a crashed earlier run
// (whose process is gone) are removed at the next start.
//
//   public 10.211.0.0/24:  gw 10.211.0.2 (gateway), far 10.211.0.3 (browser, probe host),
//                          turn 10.211.0.4 (coturn), router k: 10.211.0.(10+k)
//   site k LAN 10.211.k.0/24: router 10.211.k.1, client 10.211.k.2

import { execFileSync, spawn } from "node:child_process";
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";
import { fileURLToPath } from "node:url";
import { removeStaleNamespaces } from "./harness.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));

export const PUBLIC = { gw: "10.211.0.2", far: "10.211.0.3", turn: "10.211.0.4" };
export const wanIp = (site) => `10.211.0.${10 + site}`;
export const clientIp = (site) => `10.211.${site}.2`;

/**
 * The four classic NAT behaviours (RFC 3489 names; RFC 4787 mapping/filtering in brackets) and
 * what a probe must see through each: a datagram to the client's mapping from the host it
 * contacted but another port, from a host it never contacted, and whether a second destination
 * sees a different mapping.
 */
export const NATS = [
  {
    kind: "full-cone",
    site: 1,
    about: "endpoint-independent mapping and filtering: SNAT keeps the port, DNAT sends anything back",
    expect: { sameHostOtherPort: true, otherHost: true, mappingPerDestination: false },
  },
  {
    kind: "restricted-cone",
    site: 2,
    about: "endpoint-independent mapping, address-dependent filtering: DNAT back only from addresses the client sent to (iptables recent)",
    expect: { sameHostOtherPort: true, otherHost: false, mappingPerDestination: false },
  },
  {
    kind: "port-restricted-cone",
    site: 3,
    about: "endpoint-independent mapping, address-and-port-dependent filtering: MASQUERADE and conntrack",
    expect: { sameHostOtherPort: false, otherHost: false, mappingPerDestination: false },
  },
  {
    kind: "symmetric",
    site: 4,
    about: "address-and-port-dependent mapping: MASQUERADE --random-fully gives each destination its own port",
    expect: { sameHostOtherPort: false, otherHost: false, mappingPerDestination: true },
  },
];

/** A site whose firewall drops every UDP datagram except those to the TURN server (port-restricted NAT too). */
export const TURN_ONLY = { kind: "udp-blocked-except-turn", site: 5 };
export const TURN_PORT = 3478;

/** iptables commands for a site's router (LAN interface `lan`, WAN interface `wan`). */
function routerRules(kind, site) {
  const wan = wanIp(site);
  const client = clientIp(site);
  const established = ["-A", "FORWARD", "-i", "wan", "-o", "lan", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"];
  const out = ["-A", "FORWARD", "-i", "lan", "-o", "wan", "-j", "ACCEPT"];
  const rules = [["-P", "FORWARD", "DROP"], established];
  switch (kind) {
    case "full-cone":
      rules.push(
        ["-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "SNAT", "--to-source", wan],
        ["-t", "nat", "-A", "PREROUTING", "-i", "wan", "-p", "udp", "-j", "DNAT", "--to-destination", client],
        out,
        ["-A", "FORWARD", "-i", "wan", "-o", "lan", "-p", "udp", "-d", client, "-j", "ACCEPT"],
      );
      break;
    case "restricted-cone":
      rules.push(
        ["-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "SNAT", "--to-source", wan],
        ["-t", "nat", "-A", "PREROUTING", "-i", "wan", "-p", "udp", "-j", "DNAT", "--to-destination", client],
        // Remember every address the client sends UDP to; let new inbound flows in only from those.
        ["-A", "FORWARD", "-i", "lan", "-o", "wan", "-p", "udp", "-m", "recent", "--name", "contacted", "--rdest", "--set"],
        out,
        ["-A", "FORWARD", "-i", "wan", "-o", "lan", "-p", "udp", "-m", "recent", "--name", "contacted", "--rcheck", "--rsource", "-j", "ACCEPT"],
      );
      break;
    case "port-restricted-cone":
      rules.push(["-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"], out);
      break;
    case "symmetric":
      rules.push(
        ["-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-p", "udp", "-j", "MASQUERADE", "--random-fully"],
        ["-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"],
        out,
      );
      break;
    case TURN_ONLY.kind:
      rules.push(
        ["-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"],
        ["-A", "FORWARD", "-i", "lan", "-o", "wan", "-p", "udp", "-d", PUBLIC.turn, "--dport", String(TURN_PORT), "-j", "ACCEPT"],
        ["-A", "FORWARD", "-i", "lan", "-o", "wan", "-p", "udp", "-j", "DROP"],
        out,
      );
      break;
    default:
      throw new Error(`unknown NAT kind ${kind}`);
  }
  return rules;
}

function run(cmd, args) {
  try {
    return execFileSync(cmd, args, { stdio: ["ignore", "pipe", "pipe"] }).toString();
  } catch (e) {
    throw new Error(`${cmd} ${args.join(" ")}: ${e.stderr ? e.stderr.toString().trim() : e.message}`);
  }
}

const PREFIX_RE = /^gwnat(\d+)-/;

function namespaces() {
  return run("ip", ["netns", "list"])
    .split("\n")
    .map((l) => l.split(" ")[0])
    .filter(Boolean);
}

function removeNamespace(ns) {
  // Only processes inside this run's (or a dead run's) own namespaces: ours.
  let pids = [];
  try {
    pids = run("ip", ["netns", "pids", ns]).split(/\s+/).filter(Boolean).map(Number);
  } catch {}
  for (const pid of pids) {
    try {
      process.kill(pid, "SIGKILL");
    } catch {}
  }
  try {
    run("ip", ["netns", "del", ns]);
  } catch {}
}

function alive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return e.code === "EPERM";
  }
}

/** Why network namespaces cannot be used here, or null when they can. */
export function netnsUnsupported() {
  if (typeof process.getuid === "function" && process.getuid() !== 0) return "not running as root (network namespaces need root)";
  const probe = `gwnat${process.pid}-probe`;
  try {
    run("ip", ["netns", "add", probe]);
  } catch (e) {
    return `cannot create a network namespace: ${e.message}`;
  }
  removeNamespace(probe);
  return null;
}

export class Lab {
  constructor() {
    this.prefix = `gwnat${process.pid}`;
    this.created = [];
    this.children = [];
    this.tmp = mkdtempSync(path.join(os.tmpdir(), "gwnat-"));
    this.onExit = () => this.downSync();
    this.onSignal = (sig) => {
      this.downSync();
      process.exit(sig === "SIGINT" ? 130 : 143);
    };
    process.on("exit", this.onExit);
    process.on("SIGINT", this.onSignal);
    process.on("SIGTERM", this.onSignal);
  }

  ns(host) {
    return `${this.prefix}-${host}`;
  }

  /** `ip netns exec` inside a host. */
  exec(host, cmd, args) {
    return run("ip", ["netns", "exec", this.ns(host), cmd, ...args]);
  }

  addHost(host) {
    const ns = this.ns(host);
    run("ip", ["netns", "add", ns]);
    this.created.push(ns);
    run("ip", ["-n", ns, "link", "set", "lo", "up"]);
  }

  /** A veth between two hosts, with interface names of their own and addresses (CIDR). */
  link(a, ifA, addrA, b, ifB, addrB) {
    run("ip", ["link", "add", ifA, "netns", this.ns(a), "type", "veth", "peer", "name", ifB, "netns", this.ns(b)]);
    for (const [host, ifname, addr] of [[a, ifA, addrA], [b, ifB, addrB]]) {
      if (addr) run("ip", ["-n", this.ns(host), "addr", "add", addr, "dev", ifname]);
      run("ip", ["-n", this.ns(host), "link", "set", ifname, "up"]);
    }
  }

  /** Build the public segment and one site per NAT kind given. */
  up(kinds) {
    // Namespaces of earlier runs that died without cleaning up.
    for (const ns of namespaces()) {
      const m = PREFIX_RE.exec(ns);
      if (m && Number(m[1]) !== process.pid && !alive(Number(m[1]))) removeNamespace(ns);
    }
    this.addHost("sw");
    run("ip", ["-n", this.ns("sw"), "link", "add", "br0", "type", "bridge"]);
    run("ip", ["-n", this.ns("sw"), "link", "set", "br0", "up"]);
    const attach = (host, addr, port) => {
      this.link(host, "eth0", addr, "sw", port, null);
      run("ip", ["-n", this.ns("sw"), "link", "set", port, "master", "br0"]);
    };
    for (const [host, ip] of Object.entries(PUBLIC)) {
      this.addHost(host);
      attach(host, `${ip}/24`, `p-${host}`);
    }
    for (const { kind, site } of kinds) {
      const router = `r${site}`;
      const client = `c${site}`;
      this.addHost(router);
      this.addHost(client);
      this.link(router, "wan", `${wanIp(site)}/24`, "sw", `p-${router}`, null);
      run("ip", ["-n", this.ns("sw"), "link", "set", `p-${router}`, "master", "br0"]);
      this.link(router, "lan", `10.211.${site}.1/24`, client, "eth0", `${clientIp(site)}/24`);
      run("ip", ["-n", this.ns(client), "route", "add", "default", "via", `10.211.${site}.1`]);
      this.exec(router, "sh", ["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]);
      for (const rule of routerRules(kind, site)) this.exec(router, "iptables", rule);
    }
  }

  /** Start a long-running process inside a host; its output is kept (last 200 kB). */
  spawn(host, cmd, args, { env } = {}) {
    const child = spawn("ip", ["netns", "exec", this.ns(host), cmd, ...args], {
      env: { ...process.env, ...env },
      stdio: ["pipe", "pipe", "pipe"],
    });
    child.output = "";
    const keep = (d) => {
      child.output = (child.output + d).slice(-200_000);
    };
    child.stdout.on("data", keep);
    child.stderr.on("data", keep);
    child.exited = new Promise((resolve) => child.on("exit", resolve));
    this.children.push(child);
    return child;
  }

  /** A UDP/HTTP agent (udp-agent.mjs) inside a host. */
  async agent(host) {
    const child = spawn("ip", ["netns", "exec", this.ns(host), process.execPath, path.join(here, "udp-agent.mjs")], {
      stdio: ["pipe", "pipe", "inherit"],
    });
    this.children.push(child);
    const agent = new Agent(host, child);
    await agent.waitFor("agent start", (e) => e.ev === "ready");
    return agent;
  }

  /** A script that runs Chromium inside a host, for playwright's `executablePath`. */
  chromium(host) {
    const file = path.join(this.tmp, `chromium-${host}.sh`);
    const bin = process.env.CHROMIUM || "/usr/bin/chromium";
    writeFileSync(file, `#!/bin/sh\nexec ip netns exec ${this.ns(host)} ${bin} "$@"\n`);
    chmodSync(file, 0o755);
    return file;
  }

  downSync() {
    for (const c of this.children) {
      if (c.exitCode === null && c.signalCode === null) {
        try {
          c.kill("SIGKILL");
        } catch {}
      }
    }
    for (const ns of this.created.reverse()) removeNamespace(ns);
    this.created = [];
    rmSync(this.tmp, { recursive: true, force: true });
  }

  down() {
    this.downSync();
    process.off("exit", this.onExit);
    process.off("SIGINT", this.onSignal);
    process.off("SIGTERM", this.onSignal);
  }

  /**
   * Classify a site's NAT from the outside, the way RFC 3489 does: the client sends from one
   * socket to gw (echo port); gw answers from another port and far (never contacted) sends to
   * the mapping; then the client sends to far and far reports the mapping it sees. `gw` and
   * `far` are agents with sockets `echo` (echo: true) and `other` bound.
   */
  async probeNat(site, { client, gw, far }) {
    const tag = `probe${site}`;
    const port = (await client.request({ op: "bind", tag }, (e) => e.ev === "bound" && e.tag === tag)).port;
    const g = client.mark();
    client.send({ op: "send", tag, to: `${PUBLIC.gw}:${gw.ports.echo}`, data: `hello-gw-${site}` });
    const atGw = await gw.waitFor(`site ${site}: the client's datagram at gw`, (e) => e.ev === "recv" && e.data === `hello-gw-${site}`, 2000);
    const mapping = atGw.from;
    gw.send({ op: "send", tag: "other", to: mapping, data: `from-gw-other-port-${site}` });
    // From far's other socket: a stray flow from far:echo to the mapping would occupy the
    // conntrack tuple the client's own flow to far:echo needs, and conntrack would then pick
    // another port for it — a false "symmetric".
    far.send({ op: "send", tag: "other", to: mapping, data: `from-far-${site}` });
    await sleep(400);
    const got = client.since(g).filter((e) => e.ev === "recv" && e.tag === tag).map((e) => e.data);
    client.send({ op: "send", tag, to: `${PUBLIC.far}:${far.ports.echo}`, data: `hello-far-${site}` });
    const atFar = await far.waitFor(`site ${site}: the client's datagram at far`, (e) => e.ev === "recv" && e.data === `hello-far-${site}`, 2000);
    return {
      localPort: port,
      mappingSeenByGw: mapping,
      mappingSeenByFar: atFar.from,
      sameHostOtherPort: got.includes(`from-gw-other-port-${site}`),
      otherHost: got.includes(`from-far-${site}`),
      mappingPerDestination: mapping !== atFar.from,
    };
  }
}

/** Controls a udp-agent.mjs process. */
export class Agent {
  constructor(host, child) {
    this.host = host;
    this.child = child;
    this.events = [];
    this.ports = {};
    this.nextId = 1;
    readline.createInterface({ input: child.stdout }).on("line", (line) => {
      try {
        this.events.push(JSON.parse(line));
      } catch {}
    });
  }

  send(cmd) {
    this.child.stdin.write(JSON.stringify(cmd) + "\n");
  }

  mark() {
    return this.events.length;
  }

  since(mark) {
    return this.events.slice(mark);
  }

  async waitFor(what, pred, timeoutMs = 5000, from = 0) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const hit = this.events.slice(from).find(pred);
      if (hit) return hit;
      if (Date.now() > deadline) throw new Error(`${this.host}: timed out waiting for ${what}`);
      await sleep(20);
    }
  }

  /** Send a command and wait for the first later event that matches. */
  async request(cmd, pred, timeoutMs = 5000) {
    const m = this.mark();
    this.send(cmd);
    return this.waitFor(JSON.stringify(cmd), pred, timeoutMs, m);
  }

  async bind(tag, { echo = false, port = 0 } = {}) {
    const e = await this.request({ op: "bind", tag, echo, port }, (x) => x.ev === "bound" && x.tag === tag);
    this.ports[tag] = e.port;
    return e.port;
  }

  async fetchStatus(url) {
    const id = this.nextId++;
    const e = await this.request({ op: "fetch", id, url }, (x) => x.ev === "fetched" && x.id === id, 5000);
    return e.status ?? null;
  }
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * One client namespace behind a router namespace, the host (where the gateway runs) on the
 * router's far side, for the tests that drop, count or move a browser's traffic:
 *
 *   ns C (client, `clientIp` = .2) --veth c/r-- ns R (router .1 | .5) --veth s/h-- host (`gatewayIp` = .6)
 *
 * Addresses are `10.<second>.<octet>.n` with the octet from the process id, so concurrent runs do
 * not collide; the host routes the whole /28 through R (room for a second client link, see
 * `link`). Namespaces, their veths and the host's route go in `cleanup()`, which also runs on exit
 * and on SIGINT/SIGTERM; ones left by a crashed earlier run are removed by the next `setUp()`.
 */
export class RoutedClient {
  /** `prefix`: namespace names (`<prefix><pid>-c`, `-r`); `tag`: veth names; `second`: the 10.x. */
  constructor(prefix, tag, second) {
    const id = process.pid;
    this.prefix = prefix;
    this.nsClient = `${prefix}${id}-c`;
    this.nsRouter = `${prefix}${id}-r`;
    this.tag = `${tag}${id}`;
    this.base = `10.${second}.${16 + (id % 230)}`;
    this.clientIp = this.net(2);
    this.gatewayIp = this.net(6);
    this.created = false;
    this.tmp = null;
    this.onExit = () => this.cleanup();
    this.onSignal = () => {
      this.cleanup();
      process.exit(130);
    };
  }

  net(n) {
    return `${this.base}.${n}`;
  }
  veth(s) {
    return `${this.tag}${s}`.slice(-15);
  }
  inClient(...args) {
    return run("ip", ["netns", "exec", this.nsClient, ...args]);
  }
  inRouter(...args) {
    return run("ip", ["netns", "exec", this.nsRouter, ...args]);
  }

  /** Build it: C's first link (veth `c`/`r`) at `clientIp`, a route to the host's link via R. */
  setUp() {
    if (typeof process.getuid === "function" && process.getuid() !== 0) throw new Error("not root");
    removeStaleNamespaces(new RegExp(`^(${this.prefix}(\\d+)-[cr])\\b`));
    process.on("exit", this.onExit);
    for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, this.onSignal);
    run("ip", ["netns", "add", this.nsClient]);
    this.created = true;
    run("ip", ["netns", "add", this.nsRouter]);
    this.inClient("ip", "link", "set", "lo", "up");
    this.link("c", this.clientIp, "r", this.net(1));
    this.inClient("ip", "route", "add", `${this.net(4)}/30`, "via", this.net(1));
    // The gateway's side: the host end stays in this namespace.
    run("ip", ["link", "add", this.veth("h"), "type", "veth", "peer", "name", this.veth("s"), "netns", this.nsRouter]);
    this.inRouter("ip", "addr", "add", `${this.net(5)}/30`, "dev", this.veth("s"));
    this.inRouter("ip", "link", "set", this.veth("s"), "up");
    this.inRouter("sysctl", "-q", "-w", "net.ipv4.ip_forward=1");
    run("ip", ["addr", "add", `${this.gatewayIp}/30`, "dev", this.veth("h")]);
    run("ip", ["link", "set", this.veth("h"), "up"]);
    run("ip", ["route", "add", `${this.net(0)}/28`, "via", this.net(5), "dev", this.veth("h")]);
  }

  /** A veth between C and R: C's end `c` at `cIp`, R's end `r` at `rIp` (both /30). */
  link(c, cIp, r, rIp) {
    run("ip", ["link", "add", this.veth(c), "netns", this.nsClient, "type", "veth", "peer", "name", this.veth(r), "netns", this.nsRouter]);
    this.inClient("ip", "addr", "add", `${cIp}/30`, "dev", this.veth(c));
    this.inClient("ip", "link", "set", this.veth(c), "up");
    this.inRouter("ip", "addr", "add", `${rIp}/30`, "dev", this.veth(r));
    this.inRouter("ip", "link", "set", this.veth(r), "up");
  }

  /** A script that runs Chromium in C, for `launchChromium({ executablePath })`. */
  chromium() {
    this.tmp ??= mkdtempSync(path.join(os.tmpdir(), `${this.prefix}chromium-`));
    const wrapper = path.join(this.tmp, "chromium-in-netns");
    writeFileSync(wrapper, `#!/bin/sh\nexec ip netns exec ${this.nsClient} ${process.env.CHROMIUM || "/usr/bin/chromium"} "$@"\n`);
    chmodSync(wrapper, 0o755);
    return wrapper;
  }

  cleanup() {
    if (this.created) {
      for (const ns of [this.nsClient, this.nsRouter]) removeNamespace(ns); // veths and the host route go with them
      this.created = false;
    }
    if (this.tmp) {
      rmSync(this.tmp, { recursive: true, force: true });
      this.tmp = null;
    }
    process.off("exit", this.onExit);
    for (const sig of ["SIGINT", "SIGTERM"]) process.off(sig, this.onSignal);
  }
}
