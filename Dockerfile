# Multi-stage build: compile with the Rust toolchain, run on a slim Debian as a
# non-root user. The config is mounted at /etc/tollgate/tollgate.toml.
#
#   docker build -t tollgate .
#   docker run -p 8080:8080 -p 9090:9090 -v $PWD/config:/etc/tollgate -e TOLLGATE_ADMIN_TOKEN=... tollgate
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin tollgate

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/tollgate --create-home tollgate
COPY --from=build /src/target/release/tollgate /usr/local/bin/tollgate
USER tollgate
WORKDIR /var/lib/tollgate
# The SQLite ledger lives in the working directory unless ledger.path says otherwise:
# mount a volume here to keep it.
VOLUME ["/var/lib/tollgate"]
EXPOSE 8080 9090
ENV TOLLGATE_CONFIG=/etc/tollgate/tollgate.toml
STOPSIGNAL SIGTERM
ENTRYPOINT ["tollgate"]
CMD ["run"]
