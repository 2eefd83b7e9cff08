#!/usr/bin/env bash
# Resolve the Apache Kafka jars used by the test broker (tests/servers/kafka.py) with Maven
# into ~/.cache/fileserver/kafka-<version>/libs, or $FILESERVER_KAFKA_LIBS. Reused when present.
# Needs `mvn` and a JDK (17+): apt-get install -y maven openjdk-17-jre-headless
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" -m tests.servers.kafka --fetch
