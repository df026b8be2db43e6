#!/usr/bin/python3
"""A stock GStreamer webrtcbin client of the gateway's WebSocket API (API.md §3).

`--role publish`: videotestsrc → vp8enc → rtpvp8pay and audiotestsrc → opusenc → rtpopuspay into
webrtcbin, which makes the offer (`publish`); the gateway's `answer` and trickled candidates are
applied. `--role subscribe`: sends `subscribe`, answers each gateway `offer`, decodes the incoming
video with decodebin and counts the decoded frames (size from their caps).

Stock settings are the point: webrtcbin keeps its default certificate (RSA-2048) and default ICE
settings (libnice 0.1.21 on Debian 12: no consent freshness, only a Binding indication every 25 s
once a pair is nominated). The only non-default is bundle-policy=max-bundle, which every webrtcbin
application talking to an SFU sets (browsers bundle by default).

Run it only inside a network namespace: libnice gathers on every interface but loopback and pins its
sockets to them. `--local-ip` adds an address to the libnice agent by hand (for a namespace whose
only address libnice would not find by itself).

It runs for `--seconds N` after its connection became READY (or until the connection FAILED/
FINISHED, or READY did not come within `--ready-timeout`), prints one JSON line with its results on
stdout and, with `--linger`, keeps the call up until a line or EOF arrives on stdin (so a test can
look at the gateway's REST view of a live connection first), then sends `leave`. Exit status 0 only
if the connection stayed READY the whole time and (subscriber) decoded frames kept advancing in the
last 10 s. Progress goes to stderr.

`--check` only checks that everything it needs is installed (exit 0) or names what is missing (1).
"""

import argparse
import json
import os
import signal
import sys
import threading
import time

NEEDED_ELEMENTS = [
    "webrtcbin", "nicesrc", "nicesink", "dtlssrtpenc", "dtlssrtpdec", "srtpenc", "srtpdec", "sctpenc",
    "sctpdec", "videotestsrc", "videoconvert", "vp8enc", "vp8dec", "rtpvp8pay", "rtpvp8depay",
    "audiotestsrc", "audioconvert", "audioresample", "opusenc", "opusdec", "rtpopuspay", "rtpopusdepay",
    "decodebin", "fakesink", "queue",
]


def check():
    missing = []
    try:
        import gi

        for ns in ("Gst", "GstWebRTC", "GstSdp"):
            try:
                gi.require_version(ns, "1.0")
            except ValueError:
                missing.append(f"typelib {ns}-1.0")
        if missing:
            return missing
        from gi.repository import Gst

        Gst.init(None)
        missing += [f"element {e}" for e in NEEDED_ELEMENTS if Gst.ElementFactory.find(e) is None]
    except ImportError as e:
        missing.append(f"python module gi ({e})")
    try:
        import websocket  # noqa: F401  (Debian's python3-websocket, websocket-client)

        if not hasattr(websocket, "WebSocketApp"):
            missing.append("python module websocket is not websocket-client")
    except ImportError as e:
        missing.append(f"python module websocket ({e})")
    return missing


def log(*a):
    print(f"[gst {time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


class Client:
    def __init__(self, args):
        import gi

        gi.require_version("Gst", "1.0")
        gi.require_version("GstWebRTC", "1.0")
        gi.require_version("GstSdp", "1.0")
        from gi.repository import GLib, Gst, GstSdp, GstWebRTC

        self.GLib, self.Gst, self.GstSdp, self.GstWebRTC = GLib, Gst, GstSdp, GstWebRTC
        Gst.init(None)
        self.args = args
        self.role = args.role
        self.loop = GLib.MainLoop()
        self.t0 = time.monotonic()
        self.ws = None
        self.ws_open = False
        self.ws_closed_reason = None
        self.connection_id = None
        self.participant_id = None
        self.pending_local_candidates = []
        self.events = []  # connection_event messages of our connection(s): {event, code, reason, t}
        self.states = []
        self.failed = None  # reason of a FAILED event
        self.finished = None  # reason of a FINISHED event
        self.ready_at = None
        self.end_reason = None
        self.done = False
        self.result = None
        self.errors = []
        self.ice_states = []
        self.conn_states = []
        self.keep = []  # promises, replies, the ice agent: GI frees them unless Python holds them
        self.offers_answered = 0
        self.remote_candidates = 0
        self.local_candidates = 0
        # Media figures.
        self.frames = 0  # decoded video frames (subscriber) or encoded frames (publisher)
        self.width = None
        self.height = None
        self.audio_buffers = 0
        self.series = []  # frames at each whole second after READY
        self.build_pipeline()

    # ------------------------------------------------------------------------------------------
    # Pipeline
    # ------------------------------------------------------------------------------------------

    def build_pipeline(self):
        Gst, a = self.Gst, self.args
        wb = "webrtcbin name=wb bundle-policy=max-bundle"
        if self.role == "publish":
            desc = (
                f"{wb} "
                f"videotestsrc is-live=true pattern=ball ! video/x-raw,width={a.width},height={a.height},framerate={a.fps}/1 "
                "! videoconvert ! queue max-size-buffers=2 leaky=downstream "
                f"! vp8enc name=enc deadline=1 keyframe-max-dist={a.keyframe_dist} target-bitrate={a.bitrate} "
                "! rtpvp8pay pt=96 ! application/x-rtp,media=video,encoding-name=VP8,payload=96,clock-rate=90000 ! wb. "
                "audiotestsrc is-live=true wave=sine volume=0.2 ! audioconvert ! audioresample ! queue "
                "! opusenc name=aenc ! rtpopuspay pt=111 ! application/x-rtp,media=audio,encoding-name=OPUS,payload=111,clock-rate=48000 ! wb. "
            )
            self.pipe = Gst.parse_launch(desc)
        else:
            # parse_launch would return a lone webrtcbin bare, not in a pipeline.
            self.pipe = Gst.Pipeline.new("subscriber")
            self.pipe.add(Gst.parse_launch(wb))
        self.wb = self.pipe.get_by_name("wb")
        self.wb.connect("on-ice-candidate", self.on_ice_candidate)
        self.wb.connect("notify::ice-connection-state", self.on_notify_state, "ice")
        self.wb.connect("notify::connection-state", self.on_notify_state, "pc")
        if self.role == "publish":
            self.wb.connect("on-negotiation-needed", self.on_negotiation_needed)
            # The sending side only: nothing comes back on a publish connection.
            i = 0
            while True:
                tr = self.wb.emit("get-transceiver", i)
                if tr is None:
                    break
                tr.set_property("direction", self.GstWebRTC.WebRTCRTPTransceiverDirection.SENDONLY)
                i += 1
            enc = self.pipe.get_by_name("enc")
            enc.get_static_pad("src").add_probe(Gst.PadProbeType.BUFFER, self.on_encoded)
            self.pipe.get_by_name("aenc").get_static_pad("src").add_probe(Gst.PadProbeType.BUFFER, self.on_decoded_audio)
            self.width, self.height = self.args.width, self.args.height
        else:
            self.wb.connect("pad-added", self.on_incoming_pad)
        bus = self.pipe.get_bus()
        bus.add_signal_watch()
        bus.connect("message::error", self.on_bus_error)
        bus.connect("message::warning", self.on_bus_warning)
        agent = self.wb.get_property("ice-agent")
        self.keep.append(agent)
        if self.args.local_ip:
            # libnice ignores loopback; in a namespace it finds the veth address itself, but an
            # address can be added by hand.
            ok = agent.emit("add-local-ip-address", self.args.local_ip)
            log(f"added {self.args.local_ip} to the ICE agent: {ok}")

    def on_bus_error(self, _bus, msg):
        err, dbg = msg.parse_error()
        text = f"{msg.src.get_name() if msg.src else '?'}: {err.message}"
        log(f"pipeline error: {text} ({dbg})")
        self.errors.append(text)
        self.GLib.idle_add(self.finish, f"pipeline error: {text}")

    def on_bus_warning(self, _bus, msg):
        err, _dbg = msg.parse_warning()
        log(f"pipeline warning: {err.message}")

    def on_notify_state(self, wb, _pspec, which):
        prop = "ice-connection-state" if which == "ice" else "connection-state"
        value = wb.get_property(prop)
        name = value.value_nick if hasattr(value, "value_nick") else str(value)
        (self.ice_states if which == "ice" else self.conn_states).append([round(self.elapsed(), 2), name])
        log(f"webrtcbin {prop}: {name}")

    def on_encoded(self, _pad, info):
        self.frames += 1
        return self.Gst.PadProbeReturn.OK

    def on_incoming_pad(self, _wb, pad):
        Gst = self.Gst
        if pad.get_direction() != Gst.PadDirection.SRC:
            return
        caps = pad.get_current_caps() or pad.query_caps(None)
        media = caps.get_structure(0).get_string("media") if caps and caps.get_size() else None
        log(f"incoming {media} pad {pad.get_name()}: {caps.to_string() if caps else None}")
        dec = Gst.ElementFactory.make("decodebin")
        dec.connect("pad-added", self.on_decoded_pad)
        self.pipe.add(dec)
        dec.sync_state_with_parent()
        if pad.link(dec.get_static_pad("sink")) != Gst.PadLinkReturn.OK:
            log(f"could not link {pad.get_name()} to decodebin")

    def on_decoded_pad(self, _dec, pad):
        Gst = self.Gst
        caps = pad.get_current_caps() or pad.query_caps(None)
        name = caps.get_structure(0).get_name() if caps and caps.get_size() else ""
        queue = Gst.ElementFactory.make("queue")
        sink = Gst.ElementFactory.make("fakesink")
        sink.set_property("sync", False)
        sink.set_property("async", False)
        for e in (queue, sink):
            self.pipe.add(e)
        queue.link(sink)
        for e in (sink, queue):
            e.sync_state_with_parent()
        pad.link(queue.get_static_pad("sink"))
        if name.startswith("video/"):
            log(f"decoding video: {caps.to_string()}")
            pad.add_probe(Gst.PadProbeType.BUFFER, self.on_decoded_video)
        else:
            log(f"decoding {name}")
            pad.add_probe(Gst.PadProbeType.BUFFER, self.on_decoded_audio)

    def on_decoded_video(self, pad, _info):
        self.frames += 1
        caps = pad.get_current_caps()
        if caps and caps.get_size():
            s = caps.get_structure(0)
            ok_w, w = s.get_int("width")
            ok_h, h = s.get_int("height")
            if ok_w and ok_h:
                self.width, self.height = w, h
        return self.Gst.PadProbeReturn.OK

    def on_decoded_audio(self, _pad, _info):
        self.audio_buffers += 1
        return self.Gst.PadProbeReturn.OK

    # ------------------------------------------------------------------------------------------
    # Negotiation
    # ------------------------------------------------------------------------------------------

    def on_negotiation_needed(self, wb):
        if self.offers_answered or getattr(self, "offer_sent", False):
            return
        self.offer_sent = True
        promise = self.Gst.Promise.new_with_change_func(self.on_offer_created, wb, None)
        self.keep.append(promise)
        wb.emit("create-offer", None, promise)

    def on_offer_created(self, promise, wb, _data):
        reply = promise.get_reply()
        self.keep.append(reply)
        offer = reply.get_value("offer")
        self.keep.append(offer)
        p = self.Gst.Promise.new()
        self.keep.append(p)
        wb.emit("set-local-description", offer, p)
        sdp = offer.sdp.as_text()
        self.mids = mids_of(sdp)
        log(f"publish offer ready ({len(sdp)} bytes, mids {self.mids})")
        self.GLib.idle_add(self.send, {"type": "publish", "sdp": sdp})

    def sdp_description(self, kind, text):
        res, msg = self.GstSdp.SDPMessage.new_from_text(text)
        if res != self.GstSdp.SDPResult.OK:
            raise RuntimeError(f"bad SDP from the gateway: {res}")
        return self.GstWebRTC.WebRTCSessionDescription.new(kind, msg)

    def on_answer(self, m):
        self.connection_id = m["connection_id"]
        desc = self.sdp_description(self.GstWebRTC.WebRTCSDPType.ANSWER, m["sdp"])
        self.keep.append(desc)
        p = self.Gst.Promise.new()
        self.keep.append(p)
        self.wb.emit("set-remote-description", desc, p)
        self.offers_answered += 1
        log(f"applied the gateway's answer for {self.connection_id}")
        for c in self.pending_local_candidates:
            self.send_candidate(*c)
        self.pending_local_candidates = []

    def on_offer(self, m):
        self.connection_id = m["connection_id"]
        self.mids = mids_of(m["sdp"])
        desc = self.sdp_description(self.GstWebRTC.WebRTCSDPType.OFFER, m["sdp"])
        self.keep.append(desc)
        log(f"gateway offer for {self.connection_id}: mids {self.mids}")
        promise = self.Gst.Promise.new_with_change_func(self.on_remote_offer_set, self.wb, m["connection_id"])
        self.keep.append(promise)
        self.wb.emit("set-remote-description", desc, promise)

    def on_remote_offer_set(self, promise, wb, connection_id):
        promise2 = self.Gst.Promise.new_with_change_func(self.on_answer_created, wb, connection_id)
        self.keep.append(promise2)
        wb.emit("create-answer", None, promise2)

    def on_answer_created(self, promise, wb, connection_id):
        reply = promise.get_reply()
        self.keep.append(reply)
        answer = reply.get_value("answer")
        if answer is None:
            log(f"create-answer failed: {reply.to_string() if reply else None}")
            self.GLib.idle_add(self.finish, "webrtcbin could not answer the gateway's offer")
            return
        self.keep.append(answer)
        p = self.Gst.Promise.new()
        self.keep.append(p)
        wb.emit("set-local-description", answer, p)
        sdp = answer.sdp.as_text()
        self.offers_answered += 1
        log(f"answer ready ({len(sdp)} bytes)")
        self.GLib.idle_add(self.send, {"type": "answer", "connection_id": connection_id, "sdp": sdp})
        for c in self.pending_local_candidates:
            self.GLib.idle_add(self.send_candidate, *c)
        self.pending_local_candidates = []

    def on_ice_candidate(self, _wb, mline, candidate):
        self.local_candidates += 1
        self.GLib.idle_add(self.local_candidate, mline, candidate)

    def local_candidate(self, mline, candidate):
        if self.connection_id is None or (self.role == "subscribe" and not self.offers_answered):
            self.pending_local_candidates.append((mline, candidate))
        else:
            self.send_candidate(mline, candidate)
        return False

    def send_candidate(self, mline, candidate):
        if candidate.startswith("a="):
            candidate = candidate[2:]
        mids = getattr(self, "mids", [])
        mid = mids[mline] if mline < len(mids) else str(mline)
        self.send({"type": "candidate", "connection_id": self.connection_id, "candidate": candidate, "sdpMid": mid, "sdpMLineIndex": mline})
        return False

    def on_remote_candidate(self, m):
        if m.get("connection_id") != self.connection_id:
            return
        cand = m.get("candidate") or ""
        if not cand:
            return
        self.remote_candidates += 1
        log(f"gateway candidate: {cand}")
        self.wb.emit("add-ice-candidate", int(m.get("sdpMLineIndex") or 0), cand)

    # ------------------------------------------------------------------------------------------
    # Signaling
    # ------------------------------------------------------------------------------------------

    def start_ws(self):
        import websocket

        def on_open(_ws):
            self.GLib.idle_add(self.on_ws_open)

        def on_message(_ws, text):
            self.GLib.idle_add(self.on_message, text)

        def on_close(_ws, code, reason):
            self.GLib.idle_add(self.on_ws_close, f"{code} {reason}")

        def on_error(_ws, err):
            log(f"websocket error: {err}")

        self.ws = websocket.WebSocketApp(self.args.url, on_open=on_open, on_message=on_message, on_close=on_close, on_error=on_error)
        t = threading.Thread(target=self.ws.run_forever, daemon=True)
        t.start()

    def send(self, msg):
        if self.ws is not None and self.ws_open:
            try:
                self.ws.send(json.dumps(msg))
            except Exception as e:  # noqa: BLE001
                log(f"send failed: {e}")
        return False

    def on_ws_open(self):
        self.ws_open = True
        log("websocket open")
        return False

    def on_ws_close(self, why):
        self.ws_open = False
        if self.ws_closed_reason is None:
            self.ws_closed_reason = why
        log(f"websocket closed: {why}")
        if not self.done:
            self.finish(f"websocket closed: {why}")
        return False

    def on_message(self, text):
        try:
            m = json.loads(text)
        except ValueError:
            log(f"not JSON: {text[:200]}")
            return False
        t = m.get("type")
        try:
            if t == "joined":
                self.participant_id = m.get("participant_id")
                log(f"joined room {m.get('room_id')} as {self.participant_id}; streams {[s.get('kind') for s in m.get('streams', [])]}")
                self.pipe.set_state(self.Gst.State.PLAYING)
                if self.role == "subscribe":
                    self.send({"type": "subscribe"})
            elif t == "answer" and self.role == "publish":
                self.on_answer(m)
            elif t == "offer" and self.role == "subscribe":
                self.on_offer(m)
            elif t == "candidate":
                self.on_remote_candidate(m)
            elif t == "connection_event":
                self.on_connection_event(m)
            elif t == "error":
                log(f"gateway error: {m}")
                self.errors.append(f"{m.get('code')}: {m.get('message')}")
            elif t in ("stream_added", "stream_removed", "participant_joined", "participant_left"):
                log(f"{t}: {m.get('participant_id')} {m.get('kind', '')}")
        except Exception as e:  # noqa: BLE001
            log(f"handling {t} failed: {e!r}")
            self.errors.append(f"handling {t}: {e!r}")
        return False

    def on_connection_event(self, m):
        if m.get("role") != self.role:
            return
        ev = m.get("event")
        item = {"event": ev, "code": m.get("code"), "t": round(self.elapsed(), 2)}
        if m.get("reason"):
            item["reason"] = m["reason"]
        self.events.append(item)
        log(f"connection_event {m.get('connection_id')} {ev} {m.get('code')} {m.get('reason') or ''}")
        if ev in ("INITIAL", "GATHERED", "READY", "FINISHED", "FAILED"):
            self.states.append(ev)
        if ev == "READY" and self.ready_at is None:
            self.ready_at = time.monotonic()
            self.GLib.timeout_add(1000, self.tick)
            self.GLib.timeout_add(int(self.args.seconds * 1000), self.finish, None)
        elif ev == "FAILED":
            self.failed = m.get("reason") or "unknown"
            self.finish(f"connection FAILED: {self.failed}")
        elif ev == "FINISHED":
            self.finished = m.get("reason") or "unknown"
            self.finish(f"connection FINISHED: {self.finished}")

    def tick(self):
        if self.done:
            return False
        self.series.append(self.frames)
        n = len(self.series)
        if n % 5 == 0:
            log(f"{n} s READY: {'decoded' if self.role == 'subscribe' else 'encoded'} {self.frames} frames {self.width}x{self.height}, audio buffers {self.audio_buffers}")
        return True

    def elapsed(self):
        return time.monotonic() - self.t0

    def ready_timeout(self):
        if self.ready_at is None and not self.done:
            self.finish(f"not READY within {self.args.ready_timeout} s")
        return False

    # ------------------------------------------------------------------------------------------
    # The end
    # ------------------------------------------------------------------------------------------

    def finish(self, why):
        if self.done:
            return False
        self.done = True
        self.end_reason = why
        self.result = self.compute_result()
        print(json.dumps(self.result), flush=True)
        if self.args.linger > 0 and why is None:
            # The test looks at the gateway first; a line or EOF on stdin (or the linger time) ends it.
            def wait_stdin():
                try:
                    sys.stdin.readline()
                except Exception:  # noqa: BLE001
                    pass
                self.GLib.idle_add(self.leave)

            threading.Thread(target=wait_stdin, daemon=True).start()
            self.GLib.timeout_add(int(self.args.linger * 1000), self.leave)
        else:
            self.leave()
        return False

    def leave(self):
        if getattr(self, "leaving", False):
            return False
        self.leaving = True
        # Still READY after the linger (a FAILED while lingering spoils the result).
        if self.failed or self.finished:
            self.result["ok"] = False
            self.result.setdefault("problems", []).append(f"after the run: failed={self.failed} finished={self.finished}")
            print(json.dumps({"after_linger": {"failed": self.failed, "finished": self.finished}}), flush=True)
        self.send({"type": "leave"})
        self.GLib.timeout_add(1500, self.quit)
        return False

    def quit(self):
        self.pipe.set_state(self.Gst.State.NULL)
        if self.ws is not None:
            try:
                self.ws.close()
            except Exception:  # noqa: BLE001
                pass
        self.loop.quit()
        return False

    def compute_result(self):
        now = time.monotonic()
        seconds_ready = (now - self.ready_at) if self.ready_at else 0.0
        r = {
            "role": self.role,
            "participant_id": self.participant_id,
            "connection_id": self.connection_id,
            "states": self.states,
            "events": self.events,
            "failed": self.failed,
            "finished": self.finished,
            "end": self.end_reason or f"ran {self.args.seconds} s READY",
            "time_to_ready_s": round(self.ready_at - self.t0, 3) if self.ready_at else None,
            "seconds_ready": round(seconds_ready, 2),
            "frames": self.frames,
            "frames_kind": "decoded" if self.role == "subscribe" else "encoded",
            "width": self.width,
            "height": self.height,
            "fps": round(self.frames / seconds_ready, 2) if seconds_ready > 0 else 0,
            "frames_series": self.series,
            "audio_buffers": self.audio_buffers,
            "local_candidates": self.local_candidates,
            "remote_candidates": self.remote_candidates,
            "ice_states": self.ice_states,
            "pc_states": self.conn_states,
            "errors": self.errors,
            "websocket_closed": self.ws_closed_reason,
        }
        problems = []
        if self.ready_at is None:
            problems.append("never READY")
        if self.failed:
            problems.append(f"FAILED: {self.failed}")
        if self.finished:
            problems.append(f"FINISHED: {self.finished}")
        if self.end_reason:
            problems.append(self.end_reason)
        if self.ready_at is not None and seconds_ready < self.args.seconds - 0.5:
            problems.append(f"READY only {seconds_ready:.1f} s of {self.args.seconds}")
        if self.role == "subscribe":
            s = self.series
            last10 = s[-1] - s[-11] if len(s) >= 11 else (s[-1] if s else 0)
            r["frames_last10"] = last10
            if last10 <= 0:
                problems.append("no frames decoded in the last 10 s")
        r["problems"] = problems
        r["ok"] = not problems
        return r

    def run(self):
        self.GLib.timeout_add(int(self.args.ready_timeout * 1000), self.ready_timeout)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.GLib.unix_signal_add(self.GLib.PRIORITY_DEFAULT, sig, self.on_signal, sig)
        self.start_ws()
        self.loop.run()
        return 0 if self.result and self.result["ok"] else 1

    def on_signal(self, sig):
        log(f"signal {sig}")
        if not self.done:
            self.finish(f"interrupted by signal {sig}")
        self.quit()
        return False


def mids_of(sdp):
    mids = []
    for line in sdp.splitlines():
        if line.startswith("a=mid:"):
            mids.append(line[6:].strip())
    return mids


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="ws://HOST:PORT/v1/ws?token=<join token>")
    p.add_argument("--role", choices=["publish", "subscribe"])
    p.add_argument("--seconds", type=float, default=60, help="how long to stay READY")
    p.add_argument("--ready-timeout", type=float, default=20, help="seconds from start to READY at most")
    p.add_argument("--linger", type=float, default=0, help="after the run, keep the call up until stdin has a line or EOF, at most this many seconds")
    p.add_argument("--local-ip", help="add this address to the libnice agent")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--bitrate", type=int, default=500000)
    p.add_argument("--keyframe-dist", type=int, default=60)
    p.add_argument("--check", action="store_true", help="only check that the packages it needs are installed")
    args = p.parse_args()
    if args.check:
        missing = check()
        if missing:
            print("missing: " + ", ".join(missing))
            return 1
        print("ok")
        return 0
    if not args.url or not args.role:
        p.error("--url and --role are required")
    return Client(args).run()


if __name__ == "__main__":
    sys.exit(main())
