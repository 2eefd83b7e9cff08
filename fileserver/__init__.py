"""fileserver: ingests push-to-talk recordings announced on Kafka into S3 and Postgres."""

from __future__ import annotations

__version__ = "0.1.0"
