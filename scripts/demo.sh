#!/usr/bin/env bash
# The no-cluster demo on SoftHSM: `hsm-secrets demo` starts three simulated nodes (a
# SoftHSM token and one `hsm-secrets node` process serving its CSI plugin and device
# agent each), the admission webhook and the
# failover controller on file-backed state, then walks through storing secrets, pod
# injection, a tmpfs mount on a mirror, SIGKILL of the primary, failover and read-only
# enforcement, and cleans everything up. Extra arguments go to `hsm-secrets demo`
# (--keep, --work-dir DIR, --softhsm-module PATH).
#
# Run as root (sudo) for what a node does: volumes on tmpfs, in memory only. Without
# the privilege to mount, the demo still runs: the CSI plugins then write the volumes
# into plain directories on disk (--unsafe-plain-directory), and every mount step says so.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "==> Checking for SoftHSM2 (installed with apt-get when missing)" >&2
./scripts/ensure-softhsm.sh
# The build shows cargo's own progress; only the run below is quiet.
echo "==> Building hsm-secrets: the first build compiles every dependency and takes about" \
  "10 minutes on 2 cores; later runs start in seconds" >&2
cargo build --locked -p hsm-secrets --bin hsm-secrets
echo "==> Running the demo" >&2
# cargo replaces itself with the program (exec), so ctrl-c reaches the demo directly.
exec cargo run --locked --quiet -p hsm-secrets --bin hsm-secrets -- demo "$@"
