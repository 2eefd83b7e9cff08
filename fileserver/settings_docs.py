"""What each setting means, as ``fileserver config`` and docs/operations.md show it. No I/O.

Kept out of :mod:`fileserver.settings` only for size: the table is most of its lines.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Doc:
    """A setting's documentation: its meaning, and its default as the docs write it
    when the field's own default does not say it well (``None``: the field's default)."""

    meaning: str
    default: str | None = None


_FAST = "see [bench/README.md](../bench/README.md#options-behind-the-same-interfaces)"
_FETCH = (
    "the broker holds a fetch until `FILESERVER_KAFKA_FETCH_MIN_BYTES` bytes or "
    "`FILESERVER_KAFKA_FETCH_MAX_WAIT_MS` ms: under steady load one fetch per 20 ms instead of "
    "one every few events (at ~400 events/s: 3.4 instead of 4.1\u20134.4 ms of machine CPU per "
    "event; two workers' p99 206\u2013213 instead of 402\u2013558 ms); at most 20 ms more "
    "latency when "
    "traffic is light, and an idle worker polls 50 times a second (~3\u20136 % of a core; 0.5 % "
    "with faust's own `1` / `1500`); logged at start"
)

#: Every setting's meaning, in the order of the settings table in docs/operations.md
#: (which ``python -m fileserver.config --markdown`` writes from it; a test compares them).
DOCS: dict[str, Doc] = {
    "kafka_bootstrap": Doc("broker list, `host:port,…`"),
    "kafka_security_protocol": Doc(
        "`PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL` (worker, dead-letter producer and "
        "every other Kafka client)"
    ),
    "kafka_sasl_mechanism": Doc("`PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` (with `SASL_*`)"),
    "kafka_sasl_username": Doc("SASL user name, required with `SASL_*`"),
    "kafka_sasl_password": Doc("SASL password, required with `SASL_*`; never logged"),
    "kafka_ssl_cafile": Doc(
        "CA bundle the brokers' certificates are verified against (with `SSL`/`SASL_SSL`; "
        "host names are always checked)",
        "system CAs",
    ),
    "kafka_ssl_certfile": Doc("client certificate for mutual TLS"),
    "kafka_ssl_keyfile": Doc("the client certificate's private key"),
    "kafka_ssl_key_password": Doc("password of the client key (never logged)"),
    "topic": Doc("topic the Janus events are read from"),
    "group_id": Doc("consumer group of the worker"),
    "group_instance_id": Doc(
        "static group membership (KIP-345): a stable name per worker (a StatefulSet pod's "
        "name); a restarted worker with the same id takes its partitions back at once "
        "instead of waiting out its dead predecessor's session; unset: dynamic membership"
    ),
    "dlq_topic": Doc("dead-letter topic"),
    "database_url": Doc("SQLAlchemy URL (psycopg 3)"),
    "s3_endpoint_url": Doc("S3 endpoint (MinIO, SeaweedFS, …)", "unset = AWS"),
    "s3_bucket": Doc("bucket (must exist)"),
    "s3_region": Doc("region", "boto3's default"),
    "s3_verify": Doc(
        "TLS verification of an `https://` S3 endpoint: `true`, `false` (never in "
        "production) or the path of a CA bundle"
    ),
    "allowed_sources": Doc(
        "comma list of `host`, `host:port`, IP, `IP:port`, CIDR or `CIDR:port` (`[v6]:port` "
        "for IPv6) the worker may download from; see the [security model](security.md)",
        "*(empty: the worker refuses to start)*",
    ),
    "max_file_bytes": Doc("largest recording accepted"),
    "max_duration_s": Doc("longest recording accepted"),
    "source_retry_s": Doc(
        "how long one event's source may keep failing before `source_unavailable`"
    ),
    "dlq_max_consecutive": Doc(
        "dead-letter breaker: consecutive same-reason permanent failures before events are "
        "held (`0` = off)"
    ),
    "dlq_breaker_cooldown_s": Doc("how often a held event is retried while the breaker is open"),
    "dlq_breaker_max_hold_s": Doc(
        "how long the breaker may hold one event: still failing after that, it is "
        "dead-lettered all the same (its detail says it was held), so a cause nobody fixes "
        "delays events instead of stalling the partition behind a window full of held ones; "
        "long enough to be paged and fix a gateway, short enough that a range purged at the "
        "gateway drains by itself"
    ),
    "internal_error_attempts": Doc(
        "attempts (with backoff: about 6 s in all) an event gets when it meets a bug (an "
        "exception fileserver does not classify) before it becomes dead letter "
        "`internal_error`; enough to ride out a race, few enough that a poison record never "
        "holds its partition for long"
    ),
    "not_found_grace_s": Doc(
        "a 404/410 within this many seconds of the event's own time is retried like a 503 "
        "(gateways publish before they serve the file); after it, `source_not_found` at once; "
        "keep it under `FILESERVER_SOURCE_RETRY_S`; `0`: off"
    ),
    "analysis_enabled": Doc(
        "speech analysis of each burst (peak/RMS dBFS, speech share, leading/trailing "
        "silence, clipping, `empty`); off: its columns stay NULL"
    ),
    "analysis_max_bytes": Doc("larger files are not analysed (logged, columns NULL)"),
    "analysis_processes": Doc(
        "child processes running the analysis, out of the worker's GIL, up to 64 bursts "
        "queued to each (CPU ~0.2 ms per second of audio: `python -m bench.analysis_speed`; "
        "~40 MB each); `0`: one at a time in a thread of the worker (it shares the GIL with "
        "the event loop); replaces `FILESERVER_ANALYSIS_THREADS`, which is now refused"
    ),
    "analysis_vad_mode": Doc("WebRTC VAD aggressiveness 0\u20133"),
    "analysis_speech_min_dbfs": Doc("quieter 30 ms frames are never speech"),
    "analysis_speech_snr_db": Doc(
        "a speech frame is at least this far above the burst's noise floor (rejects steady "
        "hiss, hum, tones)"
    ),
    "analysis_min_speech_ms": Doc("less speech than this: `empty`"),
    "analysis_clip_dbfs": Doc("samples at or above this level count as clipped"),
    "serve_host": Doc("where `fileserver serve` listens (the API and the review page)"),
    "serve_port": Doc("the port `fileserver serve` listens on"),
    "serve_tokens": Doc(
        "comma list of `sha256hex[:read+listen]` bearer-token hashes (`fileserver serve "
        "--new-token` makes one); `read` lists and reads metadata, `listen` gets audio",
        "*(empty: serve refuses to start)*",
    ),
    "serve_presign_ttl_s": Doc("lifetime of a presigned audio URL (at most 7 days)"),
    "db_statement_timeout_s": Doc(
        "Postgres `statement_timeout` of fileserver's connections (a `statement_timeout` in "
        "`FILESERVER_DATABASE_URL`'s `options` wins), and, with a margin, the client-side "
        "deadline of every statement, so a silent link ends as an outage instead of a stall"
    ),
    "shutdown_grace_s": Doc(
        "on SIGTERM or partition revocation, how long in-flight events may finish before "
        "they are left for redelivery"
    ),
    "concurrency": Doc(
        "events processed at once (mostly waiting on the source, S3 and Postgres: 192 "
        "instead of 64 gave 897 instead of 762 events/s in the benchmark, with the 10 ms "
        "batch linger); one gateway sees at most `FILESERVER_MAX_DOWNLOADS_PER_SOURCE` of them"
    ),
    "max_downloads_per_source": Doc(
        "downloads at a time from one source (host and port) per worker; the others wait for "
        "a slot within `FILESERVER_FETCH_TIMEOUT_S` (the `fetch` stage time includes that "
        "wait). A gateway's HTTP server must accept that many connections at once: a backlog "
        "of 5 (Python's `http.server` default) left accepted-but-unserved connections that "
        "ended as `source_unavailable` read timeouts in a test; lower it for such gateways"
    ),
    "download_memory_bytes": Doc(
        "recordings all downloads in flight may hold in memory together; a download that "
        "finds it spent goes to `FILESERVER_TMP_DIR` instead, so memory does not grow with "
        "`FILESERVER_CONCURRENCY` (`0` = always a file)"
    ),
    "max_pending": Doc("events read but not yet committable (bounds memory behind a slow event)"),
    "connect_timeout_s": Doc("download timeout: connecting"),
    "read_timeout_s": Doc("download timeout: between bytes"),
    "fetch_timeout_s": Doc("download timeout: the whole download"),
    "multipart_threshold_bytes": Doc("multipart upload above this size"),
    "multipart_chunk_bytes": Doc("the size of a multipart upload's parts"),
    "tmp_dir": Doc(
        "where downloads over 1 MiB (or over the memory budget) are staged, in a directory "
        "`fileserver-spool-<host>-<pid>` per process, removed on exit; the next process on "
        "the host removes those of killed processes (SIGKILL, OOM) and logs how many files "
        "it found",
        "system temp",
    ),
    "commit_interval_s": Doc("how often acked offsets are committed"),
    "session_timeout_s": Doc("consumer-group session timeout"),
    "rebalance_timeout_s": Doc("consumer-group rebalance timeout"),
    "kafka_fetch_min_bytes": Doc(_FETCH),
    "kafka_fetch_max_wait_ms": Doc(_FETCH),
    "metrics_host": Doc(
        "address of the `/metrics`, `/healthz`, `/readyz` server (the image binds `0.0.0.0`)"
    ),
    "metrics_port": Doc("its port; `0` picks a free one (logged at start-up)"),
    "http_transport": Doc(
        "the wire downloads go out on: `http11` (the default: fileserver's HTTP/1.1 client, "
        "the S3 PUTs' one, on llhttp; bodies streamed; about 0.6 of aiohttp's CPU per "
        "download), `aiohttp` or `httpx` (same checks on all three; aiohttp takes about a "
        "twelfth of httpx's CPU per download) — " + _FAST
    ),
    "s3_transport": Doc(
        "`http11` (the default): objects up to 1 MiB are PUT on the event loop with "
        "fileserver's SigV4 signer on its keep-alive HTTP/1.1 client (responses parsed by "
        "httptools/llhttp; credentials and endpoint from boto3; multipart, HEAD and the bucket "
        "check stay on boto3); `aiohttp`: the same on aiohttp; `boto3`. The fast paths PUT and "
        "DELETE `fileserver-preflight-probe` at start (needs `s3:PutObject`) and refuse to start "
        "when `HTTPS_PROXY`/`HTTP_PROXY` applies to the endpoint (use `boto3` behind a proxy) — "
        + _FAST
    ),
    "s3_threads": Doc("boto3 worker threads (uploads that go through boto3)"),
    "db_batch_rows": Doc("most rows per batched insert / look-up (`1` = one statement per event)"),
    "db_batch_linger_ms": Doc(
        "how long a batched insert / look-up that is not full waits for more rows (`0` = "
        "send at once); each statement costs ~0.3 ms of worker CPU whatever its size, so "
        "under load a few ms of latency buy batches several times larger; when traffic is "
        "light an event waits at most twice this (look-up, insert)"
    ),
    "web_enabled": Doc("faust's own web server (not needed: fileserver serves its own endpoints)"),
    "web_port": Doc("faust's own web server's port"),
    "log_level": Doc("log level (`-l/--log-level` wins): `DEBUG`, `INFO`, `WARNING`, `ERROR`"),
    "log_format": Doc(
        "`json` (one object per line), `text`, or `auto`: JSON lines unless stderr is a "
        "terminal (`--log-format` wins)"
    ),
}

#: Variables named FILESERVER_* that are not settings: tools of the dev stack and tests.
