#!/usr/bin/env bash
# make image: writes the OCI image layout of the filter and prints its manifest digest.
#
#   wasmplugin/scripts/image.sh [WASM]
#
# Environment (all optional):
#   WASM     module to package, also the first argument
#            (default: target/wasm32-wasip1/release/oidc_filter.wasm)
#   LAYOUT   OCI layout dir      (default: wasmplugin/out/oci)
#   TAG      tag in the layout   (default: v1)
#   VARIANT  compat | wasm-artifact (default: compat, the format Istio documents)
#   OCI_IMAGE_BIN  a built oci-image binary to use instead of `cargo run -p oci-image`
# Writes the digest to $LAYOUT.digest as well. No container engine is used.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
abs() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s' "$PWD/$1" ;; esac; }
wasm="$(abs "${1:-${WASM:-$root/target/wasm32-wasip1/release/oidc_filter.wasm}}")"
layout="$(abs "${LAYOUT:-$root/wasmplugin/out/oci}")"
tag="${TAG:-v1}"
variant="${VARIANT:-compat}"

if [ ! -f "$wasm" ]; then
  echo "image.sh: $wasm not found; build it first:" >&2
  echo "  make build   (cargo build -p oidc-filter --target wasm32-wasip1 --release, then wasm-opt)" >&2
  exit 1
fi
oci_image() {
  if [ -n "${OCI_IMAGE_BIN:-}" ]; then "$OCI_IMAGE_BIN" "$@"
  else (cd "$root" && cargo run --quiet -p oci-image -- "$@"); fi
}
digest="$(oci_image --wasm "$wasm" --out "$layout" --variant "$variant" --tag "$tag")"
printf '%s\n' "$digest" > "$layout.digest"
echo "image.sh: oci:$layout:$tag ($variant) from $wasm" >&2
printf '%s\n' "$digest"
