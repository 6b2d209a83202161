#!/usr/bin/env bash
# Installs the Debian packages tqkv builds with (skipped when they are all present already).
# Usage: tools/install-deps.sh [--fuzz]   (--fuzz adds clang for the libFuzzer targets)
set -euo pipefail
packages=(build-essential cmake ninja-build libboost-dev libxxhash-dev nlohmann-json3-dev
          libcli11-dev libgtest-dev libbenchmark-dev pkg-config libcairo2-dev)
if [[ "${1:-}" == "--fuzz" ]]; then packages+=(clang libclang-rt-dev); fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
  echo "installing: ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
