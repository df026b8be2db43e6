// A tiny remote-controlled network host for the NAT tests: run inside a network namespace
// (`ip netns exec NS node udp-agent.mjs`), it takes JSON commands on stdin and reports JSON
// events on stdout, one per line. It lets the test send UDP from a chosen socket, see what
// arrives and from where, and make HTTP requests from inside the namespace.
//
//   {"op":"bind","tag":"a","port":0,"echo":true}  → {"ev":"bound","tag":"a","port":40123}
//       echo: answer every datagram with {"seen":"ip:port"} (the sender's address as seen here)
//   {"op":"send","tag":"a","to":"10.211.0.2:9000","data":"hello"}   (or "hex":"0001…" for bytes)
//       → {"ev":"sent","tag":"a"} (or {"ev":"send_error",…})
//   every datagram received → {"ev":"recv","tag":"a","from":"ip:port","data":"…"}
//   {"op":"fetch","id":1,"url":"http://…"} → {"ev":"fetched","id":1,"status":200} or {…,"error":"…"}
//   stdin closing ends the agent.

import dgram from "node:dgram";
import readline from "node:readline";

const sockets = new Map();
const emit = (o) => process.stdout.write(JSON.stringify(o) + "\n");

function bind({ tag, port = 0, echo = false }) {
  const s = dgram.createSocket("udp4");
  s.on("message", (msg, rinfo) => {
    const from = `${rinfo.address}:${rinfo.port}`;
    emit({ ev: "recv", tag, from, data: msg.toString() });
    if (echo) s.send(JSON.stringify({ seen: from }), rinfo.port, rinfo.address);
  });
  s.on("error", (e) => emit({ ev: "socket_error", tag, error: e.message }));
  s.bind(port, "0.0.0.0", () => {
    sockets.set(tag, s);
    emit({ ev: "bound", tag, port: s.address().port });
  });
}

function send({ tag, to, data, hex }) {
  const s = sockets.get(tag);
  if (!s) return emit({ ev: "send_error", tag, error: "no such socket" });
  const i = to.lastIndexOf(":");
  const bytes = hex === undefined ? Buffer.from(String(data)) : Buffer.from(hex, "hex");
  s.send(bytes, Number(to.slice(i + 1)), to.slice(0, i), (e) =>
    emit(e ? { ev: "send_error", tag, error: e.message } : { ev: "sent", tag }),
  );
}

async function doFetch({ id, url }) {
  try {
    const r = await fetch(url, { signal: AbortSignal.timeout(2000) });
    emit({ ev: "fetched", id, status: r.status });
  } catch (e) {
    emit({ ev: "fetched", id, error: e.message });
  }
}

const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch {
    return emit({ ev: "bad_command", line });
  }
  if (cmd.op === "bind") bind(cmd);
  else if (cmd.op === "send") send(cmd);
  else if (cmd.op === "fetch") doFetch(cmd);
  else emit({ ev: "bad_command", line });
});
rl.on("close", () => process.exit(0));
emit({ ev: "ready" });
