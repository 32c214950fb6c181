#!/usr/bin/env bash
# Installs SoftHSM2 (the software PKCS#11 token used by the demo and the tests) if absent.
set -euo pipefail
if command -v softhsm2-util >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "SoftHSM2 is missing: run 'sudo apt-get install -y softhsm2' (or your distribution's package)" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >/dev/null
