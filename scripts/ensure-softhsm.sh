#!/usr/bin/env bash
# Installs SoftHSM2 (the software PKCS#11 token used by the demo and the tests) if absent:
# with apt-get as root, through sudo otherwise.
set -euo pipefail
if command -v softhsm2-util >/dev/null 2>&1; then
  exit 0
fi
as_root=()
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "SoftHSM2 is missing and sudo is not available: as root, run 'apt-get install -y softhsm2' (or your distribution's package)" >&2
    exit 1
  fi
  echo "SoftHSM2 is missing: installing it with sudo apt-get" >&2
  as_root=(sudo)
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "SoftHSM2 is missing and this is not an apt system: install your distribution's softhsm2 package" >&2
  exit 1
fi
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >/dev/null
