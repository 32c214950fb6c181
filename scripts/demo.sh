#!/usr/bin/env bash
# The no-cluster demo on SoftHSM: `hsm-secrets demo` starts three simulated nodes (a
# SoftHSM token, an agent and a CSI node plugin each), the admission webhook and the
# failover controller on file-backed state, then walks through storing secrets, pod
# injection, a tmpfs mount on a mirror, SIGKILL of the primary, failover and read-only
# enforcement, and cleans everything up. Extra arguments go to `hsm-secrets demo`
# (--keep, --work-dir DIR, --softhsm-module PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/ensure-softhsm.sh
if [ "$(id -u)" -ne 0 ]; then
  echo "the demo mounts tmpfs volumes as the CSI plugin does on a node: run it as root (sudo $0)" >&2
  exit 1
fi
# cargo replaces itself with the program (exec), so ctrl-c reaches the demo directly.
exec cargo run --locked --quiet -p hsm-secrets --bin hsm-secrets -- demo "$@"
