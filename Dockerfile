# Minimal image; a later issue hardens it (non-root user, distroless, pinned digests).
# Built with the default features, so the image also carries the `--simulate` demo and the
# `ccgw-sim` binary (see below). For an image without any simulator code:
#   cargo build --release --locked -p ccgw-callcontrol --no-default-features --bin ccgw-callcontrol
# and copy only that binary.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin ccgw-callcontrol --bin ccgw-sim

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/ccgw-callcontrol /src/target/release/ccgw-sim /usr/local/bin/
# The service listens on 0.0.0.0:50051. The --simulate demo listens on loopback (it has no
# authentication): in a container, add --listen 0.0.0.0:50051 --sim-listen 0.0.0.0:8043 to reach it.
EXPOSE 50051
ENTRYPOINT ["ccgw-callcontrol"]
