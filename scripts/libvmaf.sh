#!/usr/bin/env bash
# Build libvmaf 2.3.1 into the prefix $1 (once; under a minute on 2 cores), with meson, ninja and nasm.
set -euo pipefail
# libvmaf 2.3.1 (not in Debian 12): its BSD-2-Clause-Patent source as vendored in the libvmaf-sys 0.4.4
# crate, built with meson into the cache as a static library with its built-in models, plus the reference
# `vmaf` tool the tests compare against. Only the C library is used; the crate's (GPL) bindings are not.
# The engine's build script links it from here (or from LIBVMAF_DIR).
VMAF="$1"
if [ ! -f "$VMAF/lib/libvmaf.a" ] || [ ! -x "$VMAF/bin/vmaf" ]; then
  echo "setup: building libvmaf 2.3.1 (once; under a minute)"
  tmp=$(mktemp -d)
  curl -sSfL -o "$tmp/libvmaf-sys.crate" https://static.crates.io/crates/libvmaf-sys/libvmaf-sys-0.4.4.crate
  echo "8b053ec5f32c6ba5ae9a51d2bbef0abd35e34033ad83c7b331bfec3e04df79a6  $tmp/libvmaf-sys.crate" | sha256sum -c --quiet
  tar xzf "$tmp/libvmaf-sys.crate" -C "$tmp"
  rm -rf "$VMAF.partial"
  (cd "$tmp/libvmaf-sys-0.4.4/vmaf/libvmaf" \
    && meson setup "$tmp/build" --buildtype=release --prefix="$VMAF.partial" --libdir=lib \
         -Ddefault_library=static -Denable_tests=false -Denable_docs=false -Dbuilt_in_models=true >"$tmp/meson.log" \
    && ninja -C "$tmp/build" install >"$tmp/ninja.log") || { tail -30 "$tmp"/*.log; exit 1; }
  rm -rf "$VMAF" && mv "$VMAF.partial" "$VMAF" && rm -rf "$tmp"
fi
