#!/usr/bin/env bash
# Builds the Jaeger the tests run (jaeger/go.mod: github.com/jaegertracing/jaeger v1.75.0,
# binary cmd/jaeger, from the Go module proxy) into JAEGER_BIN, once: a binary built from
# this go.mod and go.sum is used as it is, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${JAEGER_BIN:?JAEGER_BIN is not set (the Makefile sets it)}"
dir=$(dirname "$bin")
stamp="$dir/.go-mod-sha256"
want=$(cat jaeger/go.mod jaeger/go.sum | sha256sum | cut -d' ' -f1)
if [ -x "$bin" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "jaeger: Jaeger built in $bin"
  exit 0
fi
gover=$(awk '/^go / { print $2 }' jaeger/go.mod)
command -v go >/dev/null || { echo "jaeger: no go: install Go $gover or newer (https://go.dev/dl/)"; exit 2; }
module=$(awk '/^tool / { print $2 }' jaeger/go.mod)
version=$(awk -v m="github.com/jaegertracing/jaeger" '$1 == m { print $2 }' jaeger/go.mod)
mkdir -p "$dir"
tmp="$bin.tmp.$$"
trap 'rm -f "$tmp" "$tmp.log"' EXIT
echo "jaeger: building $module@$version into $bin; the first build takes minutes"
# The local Go only: jaeger/go.mod's go line is the oldest it builds with, and no other
# toolchain is fetched.
if ! (cd jaeger && GOTOOLCHAIN=local GOFLAGS=-mod=readonly go build -trimpath \
    -ldflags "-s -w" \
    -o "$tmp" "$module") >"$tmp.log" 2>&1; then
  cat "$tmp.log"
  echo "jaeger: building $module@$version failed (is the Go module proxy reachable, is go $gover or newer?)"
  exit 1
fi
mv "$tmp" "$bin"
echo "$want" > "$stamp"
trap - EXIT
rm -f "$tmp.log"
echo "jaeger: $module@$version built into $bin"
