# syntax=docker/dockerfile:1
#
# The production image: the service binary built without the simulator, on a distroless
# runtime (glibc, CA certificates, tzdata; no shell, no package manager), as a non-root numeric
# user, with nothing written to the root filesystem (it runs with readOnlyRootFilesystem).
#
#   docker build -t ccgw-callcontrol .
#
# Open files: each polled agent holds one connection to the gateway (docs/performance.md, "Sizing a pod").
# The binary raises its soft RLIMIT_NOFILE to the hard limit at startup; the container's hard
# limit is the runtime's (containerd and Docker default to 1048576; `docker run --ulimit
# nofile=65536:65536` or the node's runtime configuration sets it). A warning at startup says
# when it is below --max-polled-agents + 1024.

ARG RUST_VERSION=1.95

# cargo-chef builds the dependencies from the manifests alone, so that this layer is reused
# until Cargo.toml or Cargo.lock change: a code change rebuilds only the workspace's own crates.
FROM rust:${RUST_VERSION}-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --no-default-features \
        -p ccgw-callcontrol --bin ccgw-callcontrol --recipe-path recipe.json
COPY . .
# Without the `simulator` feature: the image cannot run `--simulate` and holds no simulator code.
RUN cargo build --release --locked --no-default-features \
        -p ccgw-callcontrol --bin ccgw-callcontrol

# distroless/cc: glibc and libgcc for the Rust binary, /etc/ssl/certs for the gateway's TLS
# (the platform verifier reads the system roots), user 65532 "nonroot".
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/ccgw-callcontrol /usr/local/bin/ccgw-callcontrol
USER 65532:65532
# gRPC (with health and reflection), and /metrics with --metrics-listen 0.0.0.0:9090.
EXPOSE 50051 9090
# Kubernetes probes the gRPC health service (deploy/kubernetes/base/deployment.yaml); the runtime
# image has no shell or client to run a Docker HEALTHCHECK with.
# checkov:skip=CKV_DOCKER_2: health is checked by the orchestrator's native gRPC probes (no shell or client in a distroless image)
ENTRYPOINT ["/usr/local/bin/ccgw-callcontrol"]
