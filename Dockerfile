# syntax=docker/dockerfile:1
# emlisten container image: `docker build -t emlisten .`
# Both stages use the same base so the venv's interpreter symlinks stay valid in the final stage.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- builder: installs emlisten and its dependencies into /opt/venv (all of them ship wheels) ---
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
# .dockerignore lets only the package sources and pyproject.toml through.
COPY . .
RUN /opt/venv/bin/pip install --no-cache-dir .

# --- runtime: the venv only; no compiler, no pip cache, no sources ---
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="emlisten" \
      org.opencontainers.image.description="Mailbox listener service (IMAP IDLE to Creatio callbacks)" \
      org.opencontainers.image.licenses="Apache-2.0"
# All interfaces (a bare `emlisten serve` keeps to loopback): the container then needs
# EMLISTEN_API_TOKEN for emlisten's own routes, or refuses to start (EMLISTEN_ALLOW_UNAUTHENTICATED=true
# opts out). Creatio's routes need no token; guard them by who can reach the port (docs/security.md).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    EMLISTEN_ROLE=all \
    EMLISTEN_DATA_DIR=/data \
    EMLISTEN_HOST=0.0.0.0 \
    EMLISTEN_PORT=8080
RUN groupadd --system --gid 10001 emlisten \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin emlisten \
    && mkdir /data && chown 10001:10001 /data && chmod 0700 /data
COPY --from=builder /opt/venv /opt/venv
# Mailboxes, checkpoints and statuses of the single-process mode (docs/deployment.md): mount a
# named volume here; EMLISTEN_SECRET_KEY is required with it (credentials are encrypted at rest).
VOLUME ["/data"]
# Numeric user so Kubernetes can check runAsNonRoot.
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
# `emlisten status` exits 0 healthy, 1 degraded (some mailboxes failing), 2 unreachable.
# Only an unreachable API makes the container unhealthy: failing mailboxes are not fixed by a restart.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["/bin/sh", "-c", "emlisten status --url http://127.0.0.1:${EMLISTEN_PORT} >/dev/null 2>&1; test $? -ne 2"]
# The role comes from EMLISTEN_ROLE (default all); `--role=...` after the image name overrides it.
ENTRYPOINT ["emlisten", "serve"]
