#!/usr/bin/env bash
# Runs the whole system on this machine with no cluster: SoftHSM tokens for three
# simulated nodes, their agents, a CSI plugin, the webhook and the failover controller.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/ensure-softhsm.sh
exec cargo run --release --locked --bin hsm-secrets -- demo "$@"
