#!/usr/bin/python3
"""A stock GStreamer webrtcbin WHIP publisher (RFC 9725) that does the HTTP exchange itself.

videotestsrc → vp8enc → rtpvp8pay and audiotestsrc → opusenc → rtpopuspay into webrtcbin
(bundle-policy=max-bundle, everything else default: RSA-2048 certificate, libnice without
consent freshness). Its offer, once ICE gathering is complete (or after 3 s), is POSTed to the
WHIP endpoint as `application/sdp` with `Authorization: Bearer <token>`; the `201 Created`
answer, which carries the gateway's candidate, is applied. No trickle, no WebSocket.

It publishes for `--seconds N` after webrtcbin's connection state became `connected`, then
DELETEs the session resource and prints one JSON line on stdout: the resource, the statuses of
the POST and the DELETE, the time to connected, frames encoded, the states seen. Exit 0 only if
the POST answered 201, the connection reached `connected` and stayed so, and the DELETE answered
200. Progress goes to stderr.

Run it inside a network namespace (libnice ignores loopback). `--check` checks that everything it
needs is installed.
"""

import argparse
import json
import sys
import time
import urllib.error
import urllib.request

from gst_client import NEEDED_ELEMENTS


def log(*a):
    print(f"[gst-whip {time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def check():
    try:
        import gi

        for ns in ("Gst", "GstWebRTC", "GstSdp"):
            gi.require_version(ns, "1.0")
        from gi.repository import Gst

        Gst.init(None)
        return [f"element {e}" for e in NEEDED_ELEMENTS if Gst.ElementFactory.find(e) is None]
    except (ImportError, ValueError) as e:
        return [str(e)]


def http(method, url, token, body=None, content_type=None):
    """(status, headers, body text) of one request; HTTP errors are answers too."""
    req = urllib.request.Request(url, data=body.encode() if body is not None else None, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


class Publisher:
    def __init__(self, args):
        import gi

        gi.require_version("Gst", "1.0")
        gi.require_version("GstWebRTC", "1.0")
        gi.require_version("GstSdp", "1.0")
        from gi.repository import GLib, Gst, GstSdp, GstWebRTC

        self.GLib, self.Gst, self.GstSdp, self.GstWebRTC = GLib, Gst, GstSdp, GstWebRTC
        Gst.init(None)
        self.args = args
        self.loop = GLib.MainLoop()
        self.t0 = time.monotonic()
        self.keep = []
        self.posted = False
        self.post_status = None
        self.delete_status = None
        self.resource = None
        self.connected_at = None
        self.states = []
        self.frames = 0
        self.problems = []
        a = args
        self.pipe = Gst.parse_launch(
            "webrtcbin name=wb bundle-policy=max-bundle "
            f"videotestsrc is-live=true pattern=ball ! video/x-raw,width={a.width},height={a.height},framerate={a.fps}/1 "
            "! videoconvert ! queue max-size-buffers=2 leaky=downstream "
            "! vp8enc name=enc deadline=1 keyframe-max-dist=60 target-bitrate=800000 "
            "! rtpvp8pay pt=96 ! application/x-rtp,media=video,encoding-name=VP8,payload=96,clock-rate=90000 ! wb. "
            "audiotestsrc is-live=true wave=sine volume=0.2 ! audioconvert ! audioresample ! queue "
            "! opusenc ! rtpopuspay pt=111 ! application/x-rtp,media=audio,encoding-name=OPUS,payload=111,clock-rate=48000 ! wb. "
        )
        self.wb = self.pipe.get_by_name("wb")
        self.wb.connect("on-negotiation-needed", self.on_negotiation_needed)
        self.wb.connect("notify::ice-gathering-state", self.on_gathering)
        self.wb.connect("notify::connection-state", self.on_state)
        i = 0
        while (tr := self.wb.emit("get-transceiver", i)) is not None:
            tr.set_property("direction", GstWebRTC.WebRTCRTPTransceiverDirection.SENDONLY)
            i += 1
        self.pipe.get_by_name("enc").get_static_pad("src").add_probe(Gst.PadProbeType.BUFFER, self.on_encoded)
        bus = self.pipe.get_bus()
        bus.add_signal_watch()
        bus.connect("message::error", self.on_error)

    def elapsed(self):
        return round(time.monotonic() - self.t0, 2)

    def on_encoded(self, _pad, _info):
        self.frames += 1
        return self.Gst.PadProbeReturn.OK

    def on_error(self, _bus, msg):
        err, _dbg = msg.parse_error()
        self.problems.append(f"pipeline error: {err.message}")
        self.GLib.idle_add(self.finish)

    def on_negotiation_needed(self, wb):
        promise = self.Gst.Promise.new_with_change_func(self.on_offer, wb, None)
        self.keep.append(promise)
        wb.emit("create-offer", None, promise)

    def on_offer(self, promise, wb, _data):
        reply = promise.get_reply()
        offer = reply.get_value("offer")
        self.keep += [reply, offer]
        p = self.Gst.Promise.new()
        self.keep.append(p)
        wb.emit("set-local-description", offer, p)
        log("offer set; gathering candidates")
        # POST once gathering completes, or after 3 s whatever it has.
        self.GLib.timeout_add(3000, self.post)

    def on_gathering(self, wb, _pspec):
        if wb.get_property("ice-gathering-state") == self.GstWebRTC.WebRTCICEGatheringState.COMPLETE:
            self.GLib.idle_add(self.post)

    def post(self):
        if self.posted:
            return False
        self.posted = True
        sdp = self.wb.get_property("local-description").sdp.as_text()
        status, headers, body = http("POST", self.args.url, self.args.token, sdp, "application/sdp")
        self.post_status = status
        log(f"POST {self.args.url}: {status}")
        if status != 201:
            self.problems.append(f"POST answered {status}: {body[:200]}")
            self.finish()
            return False
        headers = {k.lower(): v for k, v in headers.items()}
        if headers.get("content-type", "").split(";")[0] != "application/sdp":
            self.problems.append(f"answer content type {headers.get('content-type')}")
        if "a=candidate:" not in body:
            self.problems.append("the answer has no candidate")
        location = headers.get("location", "")
        self.resource = urllib.request.urljoin(self.args.url, location)
        res, msg = self.GstSdp.SDPMessage.new_from_text(body)
        if res != self.GstSdp.SDPResult.OK:
            self.problems.append(f"answer does not parse: {res}")
            self.finish()
            return False
        desc = self.GstWebRTC.WebRTCSessionDescription.new(self.GstWebRTC.WebRTCSDPType.ANSWER, msg)
        p = self.Gst.Promise.new()
        self.keep += [desc, p]
        self.wb.emit("set-remote-description", desc, p)
        log(f"answer applied; resource {self.resource}")
        return False

    def on_state(self, wb, _pspec):
        state = wb.get_property("connection-state").value_nick
        self.states.append([self.elapsed(), state])
        log(f"connection state {state}")
        if state == "connected" and self.connected_at is None:
            self.connected_at = time.monotonic()
            self.GLib.timeout_add(int(self.args.seconds * 1000), self.finish)
        elif state in ("failed", "closed", "disconnected") and self.connected_at is not None:
            self.problems.append(f"connection {state} after {self.elapsed()} s")

    def finish(self):
        if self.resource and self.delete_status is None:
            self.delete_status, _, _ = http("DELETE", self.resource, self.args.token)
            log(f"DELETE {self.resource}: {self.delete_status}")
        self.loop.quit()
        return False

    def run(self):
        self.pipe.set_state(self.Gst.State.PLAYING)
        self.GLib.timeout_add(int((self.args.seconds + self.args.connect_timeout) * 1000), self.finish)
        self.loop.run()
        self.pipe.set_state(self.Gst.State.NULL)
        ok = (
            self.post_status == 201
            and self.connected_at is not None
            and self.delete_status == 200
            and not self.problems
        )
        print(
            json.dumps(
                {
                    "resource": self.resource,
                    "post_status": self.post_status,
                    "delete_status": self.delete_status,
                    "time_to_connected_s": round(self.connected_at - self.t0, 2) if self.connected_at else None,
                    "frames_encoded": self.frames,
                    "states": self.states,
                    "problems": self.problems,
                }
            ),
            flush=True,
        )
        return 0 if ok else 1


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true")
    p.add_argument("--url", help="the WHIP endpoint, http://host:port/v1/whip/{room}")
    p.add_argument("--token", help="a join token for that room")
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--connect-timeout", type=float, default=15)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--fps", type=int, default=30)
    args = p.parse_args()
    if args.check:
        missing = check()
        if missing:
            print("missing: " + ", ".join(missing))
            return 1
        return 0
    return Publisher(args).run()


if __name__ == "__main__":
    sys.exit(main())
