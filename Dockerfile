# fileserver worker image: build a wheel, install it with runtime dependencies only.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY fileserver ./fileserver
COPY migrations ./migrations
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && pip wheel --wheel-dir /wheels "$(ls /wheels/fileserver-*.whl)"

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 fileserver
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels fileserver && rm -rf /wheels
USER fileserver
WORKDIR /home/fileserver
ENV PYTHONUNBUFFERED=1 FILESERVER_WEB_ENABLED=true FILESERVER_WEB_PORT=6066
EXPOSE 6066
ENTRYPOINT ["fileserver"]
CMD ["worker"]
