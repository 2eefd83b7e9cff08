# fileserver worker image.  docker build -t fileserver .   (compose.yaml wires it up)
#
# Stage 1 builds wheels of fileserver and of its runtime dependencies only (no [dev] or
# [test] extras); stage 2 installs them on a slim base and runs as a non-root user.

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY fileserver ./fileserver
COPY migrations ./migrations
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim AS runtime
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FILESERVER_METRICS_HOST=0.0.0.0 \
    FILESERVER_METRICS_PORT=9108 \
    FILESERVER_HTTP_TRANSPORT=aiohttp \
    FILESERVER_S3_TRANSPORT=http11
RUN useradd --create-home --uid 10001 --user-group fileserver
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels fileserver && rm -rf /wheels
USER 10001:10001
WORKDIR /home/fileserver
# /metrics, /healthz and /readyz (fileserver.web); faust's own web server stays off.
EXPOSE 9108
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FILESERVER_METRICS_PORT', '9108'), timeout=4)"]
ENTRYPOINT ["fileserver"]
CMD ["worker"]
