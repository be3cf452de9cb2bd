# The README's test command is `make test`: format check, clippy with warnings denied,
# and the whole test suite (unit, property and end-to-end tests).

CARGO ?= cargo
# End-to-end tests each start their own stack; two at a time suit a 2-core machine.
TEST_THREADS ?= 2

.PHONY: test fmt-check clippy unit build fmt

test: fmt-check clippy unit

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

unit:
	$(CARGO) test --workspace --locked -- --test-threads=$(TEST_THREADS)

build:
	$(CARGO) build --workspace --release --locked

fmt:
	$(CARGO) fmt --all
