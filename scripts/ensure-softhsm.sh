#!/usr/bin/env bash
# Installs SoftHSM2 (the software PKCS#11 token used by the demo and the tests) if absent:
# with apt-get as root, through sudo otherwise. Says on stderr what it finds and what it
# installs, so a first run never sits silent.
set -euo pipefail
if command -v softhsm2-util >/dev/null 2>&1; then
  echo "SoftHSM2 $(softhsm2-util --version 2>/dev/null || echo '(unknown version)') is installed" >&2
  exit 0
fi
as_root=()
how="as root"
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "SoftHSM2 is missing and sudo is not available: as root, run 'apt-get install -y softhsm2' (or your distribution's package)" >&2
    exit 1
  fi
  as_root=(sudo)
  how="through sudo"
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "SoftHSM2 is missing and this is not an apt system: install your distribution's softhsm2 package" >&2
  exit 1
fi
echo "SoftHSM2 (the software PKCS#11 token the demo and the tests run on) is missing:" \
  "installing the softhsm2 package with apt-get $how (apt-get update, then apt-get install softhsm2; about a minute)" >&2
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >/dev/null
if ! command -v softhsm2-util >/dev/null 2>&1; then
  echo "apt-get installed softhsm2 but softhsm2-util is not on the PATH: check the package (dpkg -L softhsm2)" >&2
  exit 1
fi
echo "SoftHSM2 $(softhsm2-util --version 2>/dev/null || echo '(unknown version)') installed" >&2
