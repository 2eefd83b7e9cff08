# fileserver image.   docker build -t fileserver .   (compose.yaml wires it up; see
# docs/deployment.md)
#
# Reproducible: the base is pinned to a Python patch release on one Debian suite, and
# every runtime dependency is installed from requirements.lock with its hashes
# (regenerate it with `make lock`). Stage 1 builds a virtualenv in /opt/fileserver;
# stage 2 copies that venv whole, so no wheel or pip cache layer remains in the image.
# The image runs the code's defaults: no FILESERVER_* tuning variables are set here.

FROM python:3.11.15-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/fileserver
ENV PATH=/opt/fileserver/bin:$PATH
WORKDIR /src
# The dependencies first (their own layer in the builder's cache), hash-checked.
COPY requirements.lock ./
RUN pip install --require-hashes --no-deps -r requirements.lock
# Then the project itself, without dependencies, built with the locked setuptools.
COPY pyproject.toml README.md LICENSE alembic.ini ./
COPY fileserver ./fileserver
COPY migrations ./migrations
RUN pip install --no-deps --no-build-isolation . \
    && python -m pip check

FROM python:3.11.15-slim-bookworm AS runtime
ARG REVISION=unknown
LABEL org.opencontainers.image.title="fileserver" \
      org.opencontainers.image.description="Ingests push-to-talk recordings announced on Kafka into S3 object storage and Postgres." \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.15-slim-bookworm"
ENV PATH=/opt/fileserver/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FILESERVER_METRICS_HOST=0.0.0.0
RUN useradd --create-home --uid 10001 --user-group fileserver
COPY --from=build /opt/fileserver /opt/fileserver
USER 10001:10001
WORKDIR /home/fileserver
# /metrics, /healthz and /readyz (fileserver.web) on FILESERVER_METRICS_PORT (9108).
EXPOSE 9108
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FILESERVER_METRICS_PORT', '9108'), timeout=4)"]
ENTRYPOINT ["fileserver"]
CMD ["worker"]
