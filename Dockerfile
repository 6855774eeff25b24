# One Dockerfile for every service of the reference DAG:
#
#   docker build --build-arg SERVICE=temperature-delta -t kappa/temperature-delta:dev .
#
# SERVICE is one of: thermometer, sensor-registry, temperature-delta, view-builder,
# query-api. The builder stage compiles all of them at once (PACKAGES), so the five
# images that docker-compose.yml builds share one compilation through the layer
# cache; only the last stage depends on SERVICE. Works with the classic builder
# and with BuildKit (no BuildKit-only syntax).

ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# --- planner: a copy of the workspace reduced to manifests + stub crate roots --------
FROM ${RUST_IMAGE} AS planner
WORKDIR /src
COPY . .
RUN sh docker/skeleton.sh /src /skeleton

# --- builder ---------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder
ARG PACKAGES="thermometer sensor-registry temperature-delta view-builder query-api"
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0
WORKDIR /app
# 1) Dependencies only: rebuilt when a Cargo.toml or Cargo.lock changes.
COPY --from=planner /skeleton/ ./
RUN set -eu; args=""; for p in $PACKAGES; do args="$args -p $p"; done; \
    cargo build --release --locked $args
# 2) The real sources of the crates the services are made of (crates/, services/);
#    other members (integration-tests, ...) keep their stubs, so editing them does not
#    invalidate this layer. Touch the sources so cargo sees them newer than the stubs.
COPY crates/ crates/
COPY services/ services/
RUN set -eu; \
    find . -path ./target -prune -o \( -name '*.rs' -o -name Cargo.toml \) -type f -exec touch {} +; \
    args=""; for p in $PACKAGES; do args="$args -p $p"; done; \
    cargo build --release --locked $args; \
    mkdir -p /out; \
    for p in $PACKAGES; do \
      test -x "target/release/$p" || { echo "package $p built no binary named $p" >&2; exit 1; }; \
      cp "target/release/$p" /out/; \
    done; \
    ls -la /out
# Keep the line tables (readable backtraces) but compress them: ~70 MB -> ~28 MB each.
RUN for f in /out/*; do objcopy --compress-debug-sections=zlib "$f"; done; ls -la /out

# --- runtime: one binary on Debian slim, non-root ------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 kappa \
 && useradd --system --uid 10001 --gid kappa --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin kappa
ARG SERVICE
RUN test -n "${SERVICE}" || { echo "build with --build-arg SERVICE=<thermometer|sensor-registry|temperature-delta|view-builder|query-api>" >&2; exit 1; }
COPY --from=builder /out/${SERVICE} /usr/local/bin/service
RUN ln -s service "/usr/local/bin/${SERVICE}" && /usr/local/bin/service --help >/dev/null
ENV KAPPA_SERVICE=${SERVICE}
LABEL org.opencontainers.image.title="kappa ${SERVICE}" \
      org.opencontainers.image.description="Kappa Services reference DAG: ${SERVICE}" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 10001:10001
WORKDIR /tmp
# Each binary's `healthcheck` subcommand GETs /healthz on the port of its HTTP_ADDR.
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=6 \
  CMD ["/usr/local/bin/service", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/service"]
