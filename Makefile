# The README's test command is `make test`: format check, clippy with warnings denied,
# and the whole test suite (unit, property and end-to-end tests).

SHELL := /bin/bash
CARGO ?= cargo
# End-to-end tests each start their own stack; two at a time suit a 2-core machine.
TEST_THREADS ?= 2

.PHONY: test fmt-check clippy unit docker-check fuzz-short chaos soak build fmt local-stack bench fuzz kafka jaeger

# Apache Kafka's jars (kafka/pom.xml), fetched once by `make kafka`; the test kit starts
# its brokers from them.
KAFKA_LIBS ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/payment-gateway/kafka-4.4.0
export KAFKA_LIBS

# Jaeger (jaeger/go.mod: github.com/jaegertracing/jaeger v1.75.0, the Jaeger 2.12.0
# release), built once by `make jaeger` from the Go module proxy; the observability test
# starts it and reads every payment's trace back from it.
JAEGER_BIN ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/payment-gateway/jaeger-1.75.0/jaeger
export JAEGER_BIN

# A Python with PyYAML (Debian's, which docker-compose brings, when the first has none).
PYTHON ?= $(shell for p in python3 /usr/bin/python3; do $$p -c 'import yaml' 2>/dev/null && echo $$p && break; done)

test: fmt-check clippy kafka jaeger unit docker-check fuzz-short

# The Kafka broker the tests, chaos, soak, bench and local-stack run (Maven Central, once).
kafka:
	@bash scripts/kafka-jars.sh

# The Jaeger the observability test runs (the Go module proxy, once; needs Go 1.26+).
jaeger:
	@bash scripts/jaeger.sh

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

# Ends with one summary line over every test binary: "N passed, M failed".
unit: kafka jaeger
	@mkdir -p target
	# The compose check asks every binary for the variables it reads: build them all.
	$(CARGO) build --workspace --bins --locked
	set -o pipefail; $(CARGO) test --workspace --all-targets --locked -- --test-threads=$(TEST_THREADS) --nocapture 2>&1 | tee target/test-output.log
	@awk '/^test result:/ { p += $$4; f += $$6 } END { printf "%d passed, %d failed\n", p, f }' target/test-output.log

# Replays the Dockerfile's build stage without a Docker engine (its COPY and RUN steps in a
# scratch directory, `cargo build` checked offline) and checks its runtime stage: every
# program compose runs is in the image, every shared library comes from its packages.
docker-check:
	@test -n "$(PYTHON)" || { echo "docker-check: no python3 with PyYAML: apt-get install docker-compose"; exit 2; }
	$(PYTHON) scripts/check_dockerfile.py --target-dir target

# Separate processes, killed and broken while payments flow (see testkit/src/bin/chaos.rs).
# ARGS: --payments N (10000) --rate R --seed S --guarantee at_least_once --min-kills K
# Release builds, as deployed: debug builds of five processes, three brokers and the
# load on two cores fall behind a 200/s load once faults start.
chaos: kafka
	$(CARGO) build --release --locked -p gateway -p simulator -p testkit --bins
	target/release/chaos $(ARGS)

# Memory, disk and restore time over a long steady run with the payments' retention in
# minutes (see testkit/src/bin/soak.rs). ARGS, e.g.: --minutes 90 --rate 300 --retention 5m
soak: kafka
	$(CARGO) build --release --locked -p gateway -p simulator -p testkit --bins
	target/release/soak $(ARGS)

# A short contract fuzz of the API (the full one is `make fuzz`).
fuzz-short: kafka
	FUZZ_EXAMPLES=$${FUZZ_SHORT_EXAMPLES:-25} bash scripts/fuzz.sh

build:
	$(CARGO) build --workspace --release --locked

fmt:
	$(CARGO) fmt --all

# The whole gateway locally: an Apache Kafka broker, throwaway PostgreSQL, provider
# simulator, API (127.0.0.1:8080), worker, sink and the web test client
# (127.0.0.1:8090). Ctrl-C stops it.
local-stack: kafka
	$(CARGO) build --locked -p testkit -p payment-client --bins
	target/debug/local-stack $(ARGS)

# Pipeline throughput, latency and CPU per payment beside the machine's raw Kafka and
# PostgreSQL limits, every role a process, the load generator pinned apart (--no-pin: not).
# ARGS="--payments 20000 --rate 0" (max throughput) or ARGS="--rate 2000" (open loop);
# a memory run: ARGS="--rate 500 --payments 300000 --memory-every-s 60".
bench: kafka
	$(CARGO) build --release --locked -p gateway -p simulator --bins
	$(CARGO) run --release --locked -p testkit --bin bench -- $(ARGS)

# Fuzzes the API against /openapi.json with schemathesis (PyPI, into target/fuzz-venv) on
# a local stack; prints "fuzz: cases=N server_errors=E schema_violations=S".
fuzz: kafka
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-600} FUZZ_SEEDS=$${FUZZ_SEEDS:-1 2} bash scripts/fuzz.sh
