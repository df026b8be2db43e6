#!/usr/bin/env bash
# Regenerates the synthetic media clips the load tester replays. Run once by hand; the clips are
# committed, so neither the tests nor CI need ffmpeg. Debian 12's ffmpeg 5.1 (`apt-get install
# ffmpeg`) with libvpx, libx264 and libopus.
#
# Every video clip: 4 s of ffmpeg's `testsrc2` pattern (moving, with a frame counter) plus light
# temporal noise so the encoder really spends the target bitrate, 30 fps, a keyframe exactly every
# 60 frames (2 s; the loop restarts on a keyframe, so the cadence stays 2 s), no B-frames, no
# alt-ref/invisible frames (one IVF frame = one displayed frame = one RTP timestamp), CBR.
# Three layers per codec, the shape of a browser's simulcast:
#   q  320x180   150 kbit/s
#   h  640x360   500 kbit/s
#   f  1280x720 1500 kbit/s
# VP8 goes into IVF (32-byte file header, 12-byte frame headers), H.264 (constrained baseline,
# profile-level-id 42e01f, what every browser decodes) into Annex-B with an access unit delimiter
# before every frame and SPS/PPS repeated before every keyframe. Audio: 4 s of a 440 Hz tone
# under a little pink noise (so no two 20 ms frames are byte-identical), Opus 48 kHz mono
# 32 kbit/s, 20 ms frames, in Ogg.
set -euo pipefail
cd "$(dirname "$0")"

SECONDS_LONG=4
FPS=30
GOP=60

layer() { # name size kbps
  local name=$1 size=$2 kbps=$3
  local src="testsrc2=size=${size}:rate=${FPS},noise=alls=12:allf=t"
  ffmpeg -hide_banner -loglevel error -y -f lavfi -i "$src" -t "$SECONDS_LONG" \
    -c:v libvpx -deadline realtime -cpu-used 4 -b:v "${kbps}k" -minrate "${kbps}k" -maxrate "${kbps}k" \
    -bufsize "$((kbps / 2))k" -g "$GOP" -keyint_min "$GOP" -auto-alt-ref 0 -lag-in-frames 0 \
    -error-resilient 1 -pix_fmt yuv420p "vp8-${name}.ivf"
  ffmpeg -hide_banner -loglevel error -y -f lavfi -i "$src" -t "$SECONDS_LONG" \
    -c:v libx264 -preset veryfast -tune zerolatency -profile:v baseline -level 3.1 -pix_fmt yuv420p \
    -b:v "${kbps}k" -minrate "${kbps}k" -maxrate "${kbps}k" -bufsize "$((kbps / 2))k" \
    -g "$GOP" -keyint_min "$GOP" -sc_threshold 0 -bf 0 \
    -x264-params "aud=1:repeat-headers=1:nal-hrd=cbr" -bsf:v h264_metadata=aud=insert \
    -f h264 "h264-${name}.h264"
}

layer q 320x180 150
layer h 640x360 500
layer f 1280x720 1500

ffmpeg -hide_banner -loglevel error -y \
  -f lavfi -i "sine=frequency=440:sample_rate=48000:duration=${SECONDS_LONG}" \
  -f lavfi -i "anoisesrc=color=pink:amplitude=0.02:sample_rate=48000:duration=${SECONDS_LONG}:seed=7" \
  -filter_complex "[0:a]volume=0.3[s];[s][1:a]amix=inputs=2:normalize=0" -ac 1 \
  -c:a libopus -b:a 32k -frame_duration 20 -application audio opus.ogg

ls -l vp8-*.ivf h264-*.h264 opus.ogg
