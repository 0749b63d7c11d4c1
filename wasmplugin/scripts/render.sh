#!/usr/bin/env bash
# make render: renders an overlay into wasmplugin/out/<overlay>.yaml with image, digest, hosts
# and issuer filled in. Needs neither kubectl nor kustomize (oci-image render builds the
# kustomization itself).
#
#   wasmplugin/scripts/render.sh
#   IMAGE=reg/oidc-gate/filter:v1 DIGEST=sha256:… HOSTS=app.example.com ISSUER=https://… \
#     OVERLAY=external-idp wasmplugin/scripts/render.sh
#
# Environment:
#   OVERLAY  overlay under wasmplugin/overlays (default: dex) or a path to a kustomization dir
#   IMAGE, DIGEST  default to what push.sh recorded in $PUSH_ENV (default: wasmplugin/out/push.env)
#   HOSTS    comma-separated hosts to protect (default: the overlay's)
#   ISSUER   OpenID issuer URL (default: the overlay's)
#   OUT      output directory (default: wasmplugin/out)
#   CRD      WasmPlugin CRD to validate against (default: Istio's, kept in
#            wasmplugin/oci-image/tests/data/wasmplugin-crd.yaml)
#   OCI_IMAGE_BIN  a built oci-image binary to use instead of `cargo run -p oci-image`
# Then: kubectl apply -f wasmplugin/out/<overlay>.yaml
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
abs() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s' "$PWD/$1" ;; esac; }
record="${PUSH_ENV:-$root/wasmplugin/out/push.env}"
if [ -f "$record" ]; then
  pushed_image="$(sed -n 's/^IMAGE=//p' "$record")"
  pushed_digest="$(sed -n 's/^DIGEST=//p' "$record")"
fi
image="${IMAGE:-${pushed_image:-}}"
digest="${DIGEST:-${pushed_digest:-}}"
overlay="${OVERLAY:-dex}"
if [ -d "$root/wasmplugin/overlays/$overlay" ]; then
  overlay="$root/wasmplugin/overlays/$overlay"
else
  overlay="$(abs "$overlay")"
fi
out="$(abs "${OUT:-$root/wasmplugin/out}")"
crd="$(abs "${CRD:-$root/wasmplugin/oci-image/tests/data/wasmplugin-crd.yaml}")"

if [ -z "$image" ] || [ -z "$digest" ]; then
  echo "render.sh: set IMAGE and DIGEST, or run wasmplugin/scripts/push.sh (make push) first" >&2
  exit 2
fi
args=(render --overlay "$overlay" --image "$image" --digest "$digest" --out "$out")
[ -n "${HOSTS:-}" ] && args+=(--hosts "$HOSTS")
[ -n "${ISSUER:-}" ] && args+=(--issuer "$ISSUER")
if [ -f "$crd" ]; then
  args+=(--crd "$crd")
elif [ -n "${CRD:-}" ]; then
  echo "render.sh: CRD=$CRD is not a file" >&2
  exit 2
fi
if [ -n "${OCI_IMAGE_BIN:-}" ]; then
  "$OCI_IMAGE_BIN" "${args[@]}"
else
  cd "$root" && cargo run --quiet -p oci-image -- "${args[@]}"
fi
