#!/usr/bin/python3
"""Audio levels of the Opus clips, for the RFC 6464 header extension the load tester's publishers
send (as a browser derives it from its microphone before encoding).

    /usr/bin/python3 loadtest/media/levels.py            # writes opus.levels and silence.levels
    /usr/bin/python3 loadtest/media/levels.py --silence  # also (re)encodes silence.ogg first

Each clip is decoded with GStreamer (opusdec) and measured by its `level` element over every
20 ms frame: one byte per Opus packet, −dBov rounded, 0 (full scale) to 127 (digital silence).
Needs Debian's python3-gi, gir1.2-gstreamer-1.0, gstreamer1.0-plugins-base and -good (what the
GStreamer interop tests install). The outputs are committed; nothing runs this in CI.
"""
import math
import os
import sys

import gi

gi.require_version("Gst", "1.0")
from gi.repository import Gst  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def run(description):
    pipeline = Gst.parse_launch(description)
    bus = pipeline.get_bus()
    pipeline.set_state(Gst.State.PLAYING)
    levels = []
    while True:
        msg = bus.timed_pop_filtered(10 * Gst.SECOND, Gst.MessageType.ELEMENT | Gst.MessageType.EOS | Gst.MessageType.ERROR)
        if msg is None:
            raise SystemExit(f"timed out: {description}")
        if msg.type == Gst.MessageType.ERROR:
            err, dbg = msg.parse_error()
            raise SystemExit(f"{err}: {dbg}")
        if msg.type == Gst.MessageType.EOS:
            break
        s = msg.get_structure()
        if s is not None and s.get_name() == "level":
            rms = s.get_value("rms")[0]
            silent = math.isnan(rms) or math.isinf(rms) or rms < -127
            levels.append(127 if silent else max(0, min(127, round(-rms))))
    pipeline.set_state(Gst.State.NULL)
    return levels


def main():
    Gst.init(None)
    if "--silence" in sys.argv:
        # 4 s of digital silence, encoded as the tone clip is (48 kHz mono, 32 kbit/s, 20 ms).
        run(
            "audiotestsrc wave=silence samplesperbuffer=960 num-buffers=200 "
            "! audio/x-raw,rate=48000,channels=1 ! opusenc bitrate=32000 frame-size=20 "
            f"! oggmux ! filesink location={HERE}/silence.ogg"
        )
    for name in ["opus", "silence"]:
        levels = run(
            f"filesrc location={HERE}/{name}.ogg ! oggdemux ! opusdec ! audioconvert "
            "! audio/x-raw,channels=1 ! level interval=20000000 post-messages=true ! fakesink"
        )
        with open(f"{HERE}/{name}.levels", "wb") as f:
            f.write(bytes(levels))
        print(f"{name}.levels: {len(levels)} frames, -dBov min {min(levels)} median {sorted(levels)[len(levels) // 2]} max {max(levels)}")


main()
