#!/usr/bin/env bash
# Build, once, a real Kubernetes control plane (kube-apiserver, kube-scheduler, kube-controller-manager) from
# Debian's kubernetes source package (upstream 1.20.2, vendored, builds offline) with Go 1.15 from Debian
# bullseye (bookworm's Go 1.19 builds binaries that crash: vendored reflect2 is broken on Go >= 1.18).
# The binaries are cached outside the clone, keyed by version: $CACHE/kubernetes-1.20.2/bin.
# The system's apt sources are left alone: a private source list and state folder are used.
set -euo pipefail
CACHE="${TESSERA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tessera}"
K8S_DEB_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
OUT="$CACHE/kubernetes-1.20.2"
if [ -x "$OUT/bin/kube-apiserver" ] && [ -x "$OUT/bin/kube-scheduler" ] && [ -x "$OUT/bin/kube-controller-manager" ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
need=()
for p in rsync dpkg-dev etcd-server openssl make gcc; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

WORK="$CACHE/k8s-build"
mkdir -p "$WORK/lists/partial" "$WORK/src" "$WORK/debs"
MIRROR=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
cat > "$WORK/sources.list" <<EOF
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR bookworm main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR bookworm-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR bullseye main
EOF
APT=(apt-get -q -o APT::Sandbox::User=root -o "Dir::Etc::sourcelist=$WORK/sources.list" -o "Dir::Etc::sourceparts=-"
     -o "Dir::State::Lists=$WORK/lists" -o "Dir::Cache::archives=$WORK/debs")
echo "k8s-build: fetching Debian's kubernetes $K8S_DEB_VERSION source and Go 1.15"
"${APT[@]}" update >/dev/null
(cd "$WORK/src" && [ -n "$(ls ./*.dsc 2>/dev/null)" ] || "${APT[@]}" source --download-only "kubernetes=$K8S_DEB_VERSION" >/dev/null)
(cd "$WORK/debs" && [ -n "$(ls golang-1.15-go_*.deb 2>/dev/null)" ] || "${APT[@]}" download golang-1.15-go golang-1.15-src >/dev/null)

GO="$CACHE/go-1.15"
if [ ! -x "$GO/usr/lib/go-1.15/bin/go" ]; then
  rm -rf "$GO.partial" && mkdir -p "$GO.partial"
  for d in "$WORK"/debs/golang-1.15-*.deb; do dpkg -x "$d" "$GO.partial"; done
  rm -rf "$GO" && mv "$GO.partial" "$GO"
fi

SRC="$WORK/kubernetes"
if [ ! -d "$SRC/cmd/kube-apiserver" ]; then
  rm -rf "$SRC"
  (cd "$WORK/src" && dpkg-source --no-check -x ./*.dsc "$SRC" >/dev/null)
fi
echo "k8s-build: building kube-apiserver, kube-scheduler, kube-controller-manager (a few minutes, once)"
(
  cd "$SRC"
  mkdir -p .go/src/k8s.io
  [ -e .go/src/k8s.io/kubernetes ] || ln -s ../../.. .go/src/k8s.io/kubernetes
  export GOROOT="$GO/usr/lib/go-1.15" GOPATH="$SRC/.go" CGO_ENABLED=0 GOFLAGS=-mod=vendor GO111MODULE=on
  export PATH="$GOROOT/bin:$PATH" GOCACHE="$WORK/gocache"
  make WHAT="cmd/kube-apiserver cmd/kube-scheduler cmd/kube-controller-manager" >/dev/null
)
rm -rf "$OUT.partial" && mkdir -p "$OUT.partial/bin"
for b in kube-apiserver kube-scheduler kube-controller-manager; do
  install -m 0755 "$SRC/_output/local/bin/linux/amd64/$b" "$OUT.partial/bin/$b"
done
rm -rf "$OUT" && mv "$OUT.partial" "$OUT"
echo "k8s-build: ok ($OUT/bin)"
