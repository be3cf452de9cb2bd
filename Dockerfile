# One image for every gateway role (`gateway api|worker|sink|all`), the provider
# simulator and the test client (`payctl`). Multi-stage: dependencies are built in their
# own cached layer, the runtime image is small and runs as a non-root user.
#
# `make test` replays the build stage without Docker (scripts/check_dockerfile.py): every
# workspace member must be copied into the dependency layer below.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependency layer: manifests and empty targets only, so source edits keep this cached.
COPY Cargo.toml Cargo.lock ./
COPY payments/Cargo.toml payments/
COPY stores/Cargo.toml stores/
COPY topology/Cargo.toml topology/
COPY sinks/Cargo.toml sinks/
COPY http/Cargo.toml http/
COPY gateway/Cargo.toml gateway/
COPY simulator/Cargo.toml simulator/
COPY testkit/Cargo.toml testkit/
COPY client/Cargo.toml client/
COPY telemetry/Cargo.toml telemetry/
RUN for c in payments stores topology sinks http gateway simulator testkit client telemetry; do \
      mkdir -p $c/src && echo "" > $c/src/lib.rs; done \
 && echo "fn main() {}" > gateway/src/main.rs \
 && echo "fn main() {}" > simulator/src/main.rs \
 && echo "fn main() {}" > client/src/main.rs && echo "" > client/src/ui.html \
 && mkdir -p testkit/src/bin && echo "fn main() {}" > testkit/src/bin/local-stack.rs \
 && echo "fn main() {}" > testkit/src/bin/bench.rs \
 && mkdir -p sinks/migrations && touch sinks/migrations/0001_projection.sql \
 && cargo build --release --locked -p gateway -p simulator -p payment-client
COPY . .
RUN touch */src/lib.rs gateway/src/main.rs simulator/src/main.rs client/src/main.rs \
 && cargo build --release --locked -p gateway -p simulator -p payment-client

FROM debian:bookworm-20241016-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --create-home --home-dir /app gateway \
 && mkdir -p /var/lib/gateway && chown gateway /var/lib/gateway
WORKDIR /app
COPY --from=build /src/target/release/gateway /src/target/release/provider-sim /src/target/release/payctl /usr/local/bin/
COPY config /app/config
USER gateway
ENV RUST_LOG=info STATE_DIR=/var/lib/gateway
ENTRYPOINT ["gateway"]
CMD ["all"]
