# syntax=docker/dockerfile:1
# One image for every subcommand of hsm-secrets (controller, webhook, node, agent, ...)
# and the kubectl-hsm plugin:
#   docker build -t hsm-secrets:0.1.0 .
# glibc, not static musl: PKCS#11 modules are loaded with dlopen.

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
# --locked: exactly the dependency versions of Cargo.lock. The target directory is a
# cache mount, so the binaries are copied out of it in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p hsm-secrets --bin hsm-secrets --bin kubectl-hsm \
 && install -D -m 0755 -t /out target/release/hsm-secrets target/release/kubectl-hsm

FROM debian:bookworm-slim
LABEL org.opencontainers.image.title="hsm-secrets" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="Kubernetes secrets served from PKCS#11 HSMs"
# PKCS#11 modules the manifests point at: SoftHSM2 (development tokens) and OpenSC
# (Pico HSM, SmartCard-HSM, Nitrokey HSM through pcscd). The build fails if a module is
# not where the manifests expect it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends softhsm2 opensc ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && test -f /usr/lib/softhsm/libsofthsm2.so \
 && test -f /usr/lib/x86_64-linux-gnu/opensc-pkcs11.so
# Controller and webhook run as this user (runAsNonRoot in their manifests); the node
# plugin overrides it with root because it mounts tmpfs volumes into pods.
RUN groupadd --gid 65532 nonroot \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin nonroot
COPY --from=builder /out/hsm-secrets /out/kubectl-hsm /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/hsm-secrets"]
