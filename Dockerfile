# aitier: multi-stage build. The builder compiles the release binary and fetches the models, so the
# container starts warm with no network access to model hubs.
FROM rust:1-bookworm AS builder
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
RUN cargo build --release --locked
# Fetch the model weights and train the default sentiment classifier with the binary just built.
COPY models/fetch models/fetch
# (pip only downloads wheels here; Debian's guard against installing into the system Python is moot.)
ENV PIP_BREAK_SYSTEM_PACKAGES=1
RUN AITIER_BIN=target/release/aitier models/fetch && rm -rf models/.wheels && strip target/release/aitier

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --uid 10001 aitier
WORKDIR /app
COPY --from=builder /src/target/release/aitier /usr/local/bin/aitier
COPY --from=builder --chown=aitier /src/models /app/models
# The embedded RAG store (DATABASE_URL's default, sqlite://data/aitier.db) is created here on first run;
# mount a volume on /app/data to keep it, or set DATABASE_URL to a PostgreSQL.
RUN mkdir /app/data && chown aitier /app/data
USER aitier
# Listen on all interfaces inside the container; PORT (set by Render) chooses the port. Listening
# beyond loopback, the server refuses to start without AITIER_API_KEYS (or --allow-anonymous) and
# with an upstream for every model name (set AITIER_UPSTREAM_MODELS). Public-safe defaults: no Hub
# downloads chosen by clients, at most 1024 generated tokens, 600 work units per key per minute.
ENV AITIER_HOST=0.0.0.0 \
    PORT=8000 \
    AITIER_LOG_FORMAT=json \
    AITIER_HUB_MODEL_IDS=false \
    AITIER_MAX_TOKENS_LIMIT=1024 \
    AITIER_RATE_LIMIT=600 \
    RUST_LOG=info
EXPOSE 8000
CMD ["aitier", "serve"]
