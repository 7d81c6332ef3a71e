# syntax=docker/dockerfile:1
# AI gateway sidecar image. Build: docker build -t ai-gateway-sidecar:0.1.0 .
# The builder turns the project and its dependencies into wheels; the final
# image only installs those wheels, so it has no compiler, no build tools and
# no source tree.

FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . .
# The project's own wheel plus a wheel for every dependency, at the versions
# constraints.txt pins (the ones `make test` ran against).
RUN pip wheel --wheel-dir /wheels -c constraints.txt .

FROM python:3.11-slim
LABEL org.opencontainers.image.title="ai-gateway-sidecar" \
      org.opencontainers.image.description="Access keys in, provider keys out: an AI gateway sidecar" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Offline install from the builder's wheels; the bind mount keeps them out of
# every layer. Bytecode is compiled here, at build time, because the root
# filesystem is read-only at run time.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels /wheels/*.whl \
 && groupadd --system --gid 10001 sidecar \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/sidecar \
      --no-create-home --shell /usr/sbin/nologin sidecar \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/sidecar
# Numeric, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/sidecar
# 8080: proxy (listen); 9090: admin (admin_listen: /healthz, /readyz, /metrics).
EXPOSE 8080 9090
# No HEALTHCHECK: Kubernetes ignores it and probes /healthz and /readyz on the
# admin port instead; `docker run` users can add --health-cmd.
ENTRYPOINT ["sidecar"]
CMD ["serve", "--config", "/etc/sidecar/config/sidecar.yaml"]
