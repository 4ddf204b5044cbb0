#!/usr/bin/env bash
# The main job: a real clip (Big Buck Bunny twice, 10.6 s, keyframes every 2 s: made by setup.sh) cut into
# chunks encoded in parallel to two renditions on this machine, then summarised with ffprobe.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${TESSERA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tessera}"
SRC="$CACHE/demo-input-1/bigbuckbunny-2x.mp4"
OUT="$PWD/target/demo/out"
JOB="$PWD/target/demo/job.yaml"
mkdir -p "$(dirname "$JOB")"
rm -rf "$OUT"
sed -e "s#__INPUT__#file://$SRC#" -e "s#__OUTPUT__#file://$OUT/#" examples/local-demo.yaml > "$JOB"
echo "== tessera run $JOB"
./target/release/tessera run "$JOB"
echo
echo "== outputs in $OUT"
for f in "$OUT"/*.mp4; do
  echo "-- $f"
  ffprobe -v error -count_frames \
    -show_entries stream=codec_name,width,height,r_frame_rate,nb_read_frames,duration:format=size,bit_rate \
    -of compact=p=0:nk=0 "$f"
done
