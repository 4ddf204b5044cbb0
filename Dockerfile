# syntax=docker/dockerfile:1
# Multi-stage build of Tessera's two images. No image can be built on the CI machines (no Docker engine);
# `make lint` checks this file with hadolint.
#   docker build --target worker   -t tessera-worker .
#   docker build --target operator -t tessera-operator .

FROM rust:1.85-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends pkg-config clang libclang-dev meson ninja-build nasm xxd curl \
      libavcodec-dev libavformat-dev libavutil-dev libavfilter-dev libavdevice-dev libswscale-dev libswresample-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# libvmaf 2.3.1, linked statically into the worker (BSD-2-Clause-Patent).
ENV LIBVMAF_DIR=/opt/libvmaf
RUN ./scripts/libvmaf.sh /opt/libvmaf \
 && cargo build --release --locked --workspace \
 && install -D -m 0755 target/release/tessera /out/tessera \
 && install -D -m 0755 target/release/tessera-cp /out/tessera-cp \
 && install -D -m 0755 target/release/tessera-operator /out/tessera-operator

FROM debian:bookworm-slim AS worker
# FFmpeg runtime libraries only (the codec libraries come as their dependencies).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
      libavcodec59 libavformat59 libavutil57 libavfilter8 libavdevice59 libswscale6 libswresample4 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 65532 --no-create-home tessera
COPY --from=build /out/tessera /out/tessera-cp /usr/local/bin/
# NVENC needs the driver's video libraries mounted by the NVIDIA container runtime.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,video,utility
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tessera"]

FROM debian:bookworm-slim AS operator
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 65532 --no-create-home tessera
COPY --from=build /out/tessera-operator /usr/local/bin/tessera-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tessera-operator"]
