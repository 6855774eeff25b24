#!/bin/sh
# Writes a "skeleton" of the Cargo workspace at SRC into DST: every Cargo.toml,
# Cargo.lock, and a stub for every crate root (lib.rs, main.rs, src/bin/*,
# build.rs, and tests/benches/examples when the manifest declares
# [[test]]/[[bench]]/[[example]] targets). The Dockerfile builds the skeleton
# first, so the expensive dependency layer is rebuilt only when a manifest or
# Cargo.lock changes, not when a source file does (or a test file is added).
# Works for whatever members the root Cargo.toml lists; needs only POSIX sh and find.
set -eu
SRC="${1:?usage: skeleton.sh SRC DST}"
DST="${2:?usage: skeleton.sh SRC DST}"
cd "$SRC"
mkdir -p "$DST"

stub() { # stub REL_PATH
    mkdir -p "$DST/$(dirname "$1")"
    printf '#![allow(unused)]\nfn main() {}\n' >"$DST/$1"
}

[ -f Cargo.lock ] && cp Cargo.lock "$DST/Cargo.lock"
find . \( -path ./target -o -path ./.git -o -path ./vendor -o -path '*/node_modules' \) -prune \
    -o -name Cargo.toml -type f -print | sort | while read -r manifest; do
    dir="$(dirname "$manifest")"
    mkdir -p "$DST/$dir"
    cp "$manifest" "$DST/$manifest"
    # crate roots that cargo discovers (or that a manifest names by default path)
    for f in "$dir/build.rs" "$dir/src/lib.rs" "$dir/src/main.rs"; do
        [ -f "$f" ] && stub "$f"
    done
    for sub in src/bin tests benches examples; do
        [ -d "$dir/$sub" ] || continue
        # Auto-discovered tests/benches/examples are not needed to build the binaries;
        # stub them only when the manifest declares such targets (which must exist).
        case "$sub" in
            tests) grep -q '^[[:space:]]*\[\[test\]\]' "$manifest" || continue ;;
            benches) grep -q '^[[:space:]]*\[\[bench\]\]' "$manifest" || continue ;;
            examples) grep -q '^[[:space:]]*\[\[example\]\]' "$manifest" || continue ;;
        esac
        find "$dir/$sub" -maxdepth 1 -type f -name '*.rs' | while read -r f; do stub "$f"; done
        find "$dir/$sub" -mindepth 2 -maxdepth 2 -type f -name main.rs | while read -r f; do stub "$f"; done
    done
    # explicit `path = "....rs"` entries ([lib], [[bin]], [[test]], [[bench]], ...)
    sed -n 's/^[[:space:]]*path[[:space:]]*=[[:space:]]*"\([^"]*\.rs\)".*/\1/p' "$manifest" | while read -r p; do
        [ -f "$dir/$p" ] && stub "$dir/$p"
    done
done
# Deterministic metadata, so that COPY --from=planner hits the cache.
find "$DST" -exec touch -h -d '2000-01-01 00:00:00' {} +
