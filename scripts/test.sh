#!/usr/bin/env bash
# Runs the whole test suite: real SoftHSM2 tokens, tmpfs mounts (as root), TLS and gRPC on
# loopback, several node processes, an S3 server (moto) for the archive, network namespaces
# with veth links for the partition tests. Installs SoftHSM2, kubernetes-validate, moto and
# iproute2 first when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/ensure-softhsm.sh
# Built-in objects of manifests/ and examples/ against the API schemas of Kubernetes 1.36.
if ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate
fi
python3 scripts/validate-manifests.py 1.36
# A real S3 API for the archive tests: each test starts its own moto_server on loopback.
if ! command -v moto_server >/dev/null 2>&1; then
  echo "installing moto[server] (an S3-compatible server for the archive tests) with pip"
  python3 -m pip install --quiet --disable-pip-version-check 'moto[server]'
fi
# Real network namespaces and links for the partition tests: iproute2 (ip, tc) and
# nsenter (util-linux), as root.
if ! command -v ip >/dev/null 2>&1 || ! command -v tc >/dev/null 2>&1 || ! command -v nsenter >/dev/null 2>&1; then
  echo "installing iproute2 and util-linux (network namespaces for the partition tests) with apt-get"
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 util-linux >/dev/null
fi
# nextest runs every test in its own process; `cargo test --workspace` passes as well,
# since every test creates its own SoftHSM tokens under labels no other test uses.
if ! command -v cargo-nextest >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi
exec cargo nextest run --workspace --locked --no-fail-fast "$@"

