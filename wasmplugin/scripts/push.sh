#!/usr/bin/env bash
# make push: copies the image layout to a registry with skopeo and prints the manifest digest,
# the value WasmPlugin.spec.sha256 must hold.
#
#   wasmplugin/scripts/push.sh registry.example.com/oidc-gate/filter:v1
#   IMAGE=registry.example.com/oidc-gate/filter:v1 wasmplugin/scripts/push.sh
#
# Environment:
#   IMAGE       destination registry/repository[:tag], also the first argument
#               (required; tag defaults to $TAG)
#   LAYOUT      OCI layout dir written by image.sh (default: wasmplugin/out/oci)
#   TAG         tag in the layout (default: v1)
#   TLS_VERIFY  true | false (default: false for localhost/127.0.0.1/[::1] registries, else true)
#   CREDS       user:password for the registry (optional; else skopeo's usual auth files)
#   PUSH_ENV    where to record IMAGE=… and DIGEST=… for render.sh (default: wasmplugin/out/push.env)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
layout="${LAYOUT:-$root/wasmplugin/out/oci}"
tag="${TAG:-v1}"
image="${1:-${IMAGE:-}}"
image="${image#docker://}"
image="${image#oci://}"

if [ -z "$image" ]; then
  echo "push.sh: set IMAGE=registry/repository[:tag]" >&2
  exit 2
fi
command -v skopeo >/dev/null || { echo "push.sh: skopeo not found (apt-get install skopeo)" >&2; exit 1; }
if [ ! -f "$layout/index.json" ]; then
  echo "push.sh: no image layout at $layout; run wasmplugin/scripts/image.sh (make image) first" >&2
  exit 1
fi
# A tag is a ':' after the last '/' (a ':' before it is the registry port).
last="${image##*/}"
case "$last" in *:*) ;; *) image="$image:$tag" ;; esac
registry="${image%%/*}"
case "$registry" in
  localhost|localhost:*|127.0.0.1|127.0.0.1:*|\[::1\]|\[::1\]:*) tls_default=false ;;
  *) tls_default=true ;;
esac
tls="${TLS_VERIFY:-$tls_default}"
creds=()
[ -n "${CREDS:-}" ] && creds=(--dest-creds "$CREDS")

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# --preserve-digests: fail instead of converting the manifest, which would change the digest.
skopeo copy --quiet --preserve-digests --dest-tls-verify="$tls" "${creds[@]}" \
  --digestfile "$tmp/digest" "oci:$layout:$tag" "docker://$image"
pushed="$(cat "$tmp/digest")"
# What istio-agent will compare: the sha256 of the manifest as the registry serves it.
src_creds=()
[ -n "${CREDS:-}" ] && src_creds=(--creds "$CREDS")
served="sha256:$(skopeo inspect --raw --tls-verify="$tls" "${src_creds[@]}" "docker://$image" | sha256sum | cut -d' ' -f1)"
if [ "$served" != "$pushed" ]; then
  echo "push.sh: registry serves manifest $served, skopeo pushed $pushed" >&2
  exit 1
fi
record="${PUSH_ENV:-$root/wasmplugin/out/push.env}"
mkdir -p "$(dirname "$record")"
printf 'IMAGE=%s\nDIGEST=%s\n' "$image" "$pushed" > "$record"
echo "push.sh: pushed docker://$image" >&2
printf '%s\n' "$pushed"
