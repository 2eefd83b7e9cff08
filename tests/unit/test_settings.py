"""Settings.from_env and redact_url."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import pytest

from fileserver.errors import ConfigError
from fileserver.settings import Settings, redact_url

SECRET = "s3cr3t-pa55"
DSN = f"postgresql+psycopg://fileserver:{SECRET}@db.internal:5432/fileserver"


def test_defaults_match_the_contract() -> None:
    s = Settings.from_env({})
    assert s.kafka_bootstrap == "localhost:9092"
    assert s.topic == "janus-events"
    assert s.group_id == "fileserver"
    assert s.dlq_topic == "fileserver-dlq"
    assert s.s3_bucket == "ptt-recordings"
    assert s.database_url.startswith("postgresql+psycopg://")
    assert s.allowed_sources == ()
    assert s.s3_endpoint_url is None
    assert s.s3_region is None
    assert s.tmp_dir is None
    assert s.web_enabled is False
    assert s.log_level == "INFO"
    assert s.max_pending >= s.concurrency
    assert s == Settings()


def test_the_transport_defaults_are_the_fast_paths_and_the_others_stay_settings() -> None:
    """http11 downloads and http11 S3 PUTs by default (issue 16): what `pip install` and
    the image run alike; aiohttp and httpx downloads, boto3 (and the aiohttp S3 sender)
    stay available."""
    s = Settings.from_env({})
    assert (s.http_transport, s.s3_transport) == ("http11", "http11")
    assert Settings.from_env({"FILESERVER_HTTP_TRANSPORT": "aiohttp"}).http_transport == "aiohttp"
    other = Settings.from_env(
        {"FILESERVER_HTTP_TRANSPORT": "HTTPX", "FILESERVER_S3_TRANSPORT": "Boto3"}
    )
    assert (other.http_transport, other.s3_transport) == ("httpx", "boto3")
    assert Settings.from_env({"FILESERVER_S3_TRANSPORT": "aiohttp"}).s3_transport == "aiohttp"
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"FILESERVER_HTTP_TRANSPORT": "curl", "FILESERVER_S3_TRANSPORT": "h2"})
    assert "FILESERVER_HTTP_TRANSPORT must be http11 (the default), aiohttp or httpx" in str(
        info.value
    )
    assert "FILESERVER_S3_TRANSPORT must be http11 (the default), aiohttp or boto3" in str(
        info.value
    )


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FILESERVER_TOPIC", "from-os")
    assert Settings.from_env().topic == "from-os"


def test_unrelated_variables_are_ignored() -> None:
    assert Settings.from_env({"TOPIC": "x", "fileserver_topic": "y"}).topic == "janus-events"


@pytest.mark.parametrize(
    ("name", "raw", "attr", "expected"),
    [
        ("KAFKA_BOOTSTRAP", "k1:9092,k2:9092", "kafka_bootstrap", "k1:9092,k2:9092"),
        ("TOPIC", "  other-topic  ", "topic", "other-topic"),
        ("TOPIC", "", "topic", "janus-events"),
        ("TOPIC", "   ", "topic", "janus-events"),
        ("GROUP_ID", "g2", "group_id", "g2"),
        ("DLQ_TOPIC", "dlq2", "dlq_topic", "dlq2"),
        ("S3_BUCKET", "b2", "s3_bucket", "b2"),
        ("S3_ENDPOINT_URL", "http://127.0.0.1:8333", "s3_endpoint_url", "http://127.0.0.1:8333"),
        ("S3_ENDPOINT_URL", " ", "s3_endpoint_url", None),
        ("S3_REGION", "us-east-1", "s3_region", "us-east-1"),
        ("TMP_DIR", "/var/tmp/fs", "tmp_dir", "/var/tmp/fs"),
        ("DATABASE_URL", DSN, "database_url", DSN),
        # ints
        ("MAX_FILE_BYTES", "1048576", "max_file_bytes", 1048576),
        ("MAX_FILE_BYTES", " 1_048_576 ", "max_file_bytes", 1048576),
        ("MAX_DURATION_S", "1", "max_duration_s", 1),
        ("CONCURRENCY", "8", "concurrency", 8),
        ("MAX_PENDING", "100000", "max_pending", 100000),
        ("DOWNLOAD_MEMORY_BYTES", "0", "download_memory_bytes", 0),
        ("DOWNLOAD_MEMORY_BYTES", str(16 << 20), "download_memory_bytes", 16 << 20),
        ("MAX_DOWNLOADS_PER_SOURCE", "8", "max_downloads_per_source", 8),
        ("WEB_PORT", "0", "web_port", 0),
        ("MULTIPART_THRESHOLD_BYTES", str(32 << 20), "multipart_threshold_bytes", 32 << 20),
        ("MAX_FILE_BYTES", "", "max_file_bytes", 64 * 1024 * 1024),
        # floats
        ("SOURCE_RETRY_S", "0", "source_retry_s", 0.0),
        ("SOURCE_RETRY_S", "2.5", "source_retry_s", 2.5),
        ("SOURCE_RETRY_S", " 60 ", "source_retry_s", 60.0),
        ("SOURCE_RETRY_S", "1e3", "source_retry_s", 1000.0),
        ("CONNECT_TIMEOUT_S", "0.1", "connect_timeout_s", 0.1),
        ("COMMIT_INTERVAL_S", "0.05", "commit_interval_s", 0.05),
        ("DB_BATCH_LINGER_MS", "0", "db_batch_linger_ms", 0.0),
        ("KAFKA_FETCH_MIN_BYTES", "1", "kafka_fetch_min_bytes", 1),
        ("KAFKA_FETCH_MAX_WAIT_MS", "1500", "kafka_fetch_max_wait_ms", 1500),
        ("DB_BATCH_LINGER_MS", "2.5", "db_batch_linger_ms", 2.5),
        ("SESSION_TIMEOUT_S", "45", "session_timeout_s", 45.0),
        ("READ_TIMEOUT_S", "", "read_timeout_s", 30.0),
        # lists
        ("ALLOWED_SOURCES", "a.example", "allowed_sources", ("a.example",)),
        (
            "ALLOWED_SOURCES",
            " a.example , 10.0.0.0/8,,[::1]:8080, ",
            "allowed_sources",
            ("a.example", "10.0.0.0/8", "[::1]:8080"),
        ),
        ("ALLOWED_SOURCES", " , ,", "allowed_sources", ()),
        # booleans and log level
        ("WEB_ENABLED", "1", "web_enabled", True),
        ("WEB_ENABLED", "TRUE", "web_enabled", True),
        ("WEB_ENABLED", "yes", "web_enabled", True),
        ("WEB_ENABLED", " on ", "web_enabled", True),
        ("WEB_ENABLED", "0", "web_enabled", False),
        ("WEB_ENABLED", "false", "web_enabled", False),
        ("LOG_LEVEL", "debug", "log_level", "DEBUG"),
    ],
)
def test_parsing(name: str, raw: str, attr: str, expected: Any) -> None:
    settings = Settings.from_env({f"FILESERVER_{name}": raw})
    value = getattr(settings, attr)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"MAX_FILE_BYTES": "lots"}, "FILESERVER_MAX_FILE_BYTES"),
        ({"MAX_FILE_BYTES": "1.5"}, "FILESERVER_MAX_FILE_BYTES"),
        ({"MAX_FILE_BYTES": "0"}, "FILESERVER_MAX_FILE_BYTES"),
        ({"MAX_FILE_BYTES": "-1"}, "FILESERVER_MAX_FILE_BYTES"),
        ({"MAX_DURATION_S": "0"}, "FILESERVER_MAX_DURATION_S"),
        ({"MAX_DURATION_S": "10m"}, "FILESERVER_MAX_DURATION_S"),
        ({"CONCURRENCY": "0"}, "FILESERVER_CONCURRENCY"),
        ({"CONCURRENCY": "many"}, "FILESERVER_CONCURRENCY"),
        ({"MAX_PENDING": "0"}, "FILESERVER_MAX_PENDING"),
        ({"DOWNLOAD_MEMORY_BYTES": "-1"}, "FILESERVER_DOWNLOAD_MEMORY_BYTES"),
        ({"MAX_DOWNLOADS_PER_SOURCE": "0"}, "FILESERVER_MAX_DOWNLOADS_PER_SOURCE"),
        ({"WEB_PORT": "-1"}, "FILESERVER_WEB_PORT"),
        ({"WEB_PORT": "http"}, "FILESERVER_WEB_PORT"),
        ({"MULTIPART_THRESHOLD_BYTES": "1024"}, "FILESERVER_MULTIPART_THRESHOLD_BYTES"),
        ({"MULTIPART_CHUNK_BYTES": "1024"}, "FILESERVER_MULTIPART_CHUNK_BYTES"),
        ({"SOURCE_RETRY_S": "-1"}, "FILESERVER_SOURCE_RETRY_S"),
        ({"SOURCE_RETRY_S": "5 min"}, "FILESERVER_SOURCE_RETRY_S"),
        ({"SOURCE_RETRY_S": "nan"}, "FILESERVER_SOURCE_RETRY_S"),
        ({"CONNECT_TIMEOUT_S": "0"}, "FILESERVER_CONNECT_TIMEOUT_S"),
        ({"CONNECT_TIMEOUT_S": "NaN"}, "FILESERVER_CONNECT_TIMEOUT_S"),
        ({"READ_TIMEOUT_S": "0.01"}, "FILESERVER_READ_TIMEOUT_S"),
        ({"FETCH_TIMEOUT_S": "abc"}, "FILESERVER_FETCH_TIMEOUT_S"),
        ({"COMMIT_INTERVAL_S": "0.01"}, "FILESERVER_COMMIT_INTERVAL_S"),
        ({"DB_BATCH_LINGER_MS": "-1"}, "FILESERVER_DB_BATCH_LINGER_MS"),
        ({"KAFKA_FETCH_MIN_BYTES": "0"}, "FILESERVER_KAFKA_FETCH_MIN_BYTES"),
        ({"KAFKA_FETCH_MAX_WAIT_MS": "-1"}, "FILESERVER_KAFKA_FETCH_MAX_WAIT_MS"),
        ({"KAFKA_FETCH_MAX_WAIT_MS": "60000"}, "FILESERVER_KAFKA_FETCH_MAX_WAIT_MS"),
        ({"SESSION_TIMEOUT_S": "0.5"}, "FILESERVER_SESSION_TIMEOUT_S"),
        ({"REBALANCE_TIMEOUT_S": "x"}, "FILESERVER_REBALANCE_TIMEOUT_S"),
        ({"DATABASE_URL": "mysql://u@h/db"}, "FILESERVER_DATABASE_URL"),
        ({"DATABASE_URL": "sqlite:///x.db"}, "FILESERVER_DATABASE_URL"),
        ({"CONCURRENCY": "100", "MAX_PENDING": "99"}, "FILESERVER_MAX_PENDING"),
        (
            {"MULTIPART_THRESHOLD_BYTES": str(6 << 20), "MULTIPART_CHUNK_BYTES": str(7 << 20)},
            "FILESERVER_MULTIPART_CHUNK_BYTES",
        ),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({f"FILESERVER_{k}": v for k, v in env.items()})
    assert variable in str(info.value)


def test_bad_database_url_error_hides_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"FILESERVER_DATABASE_URL": f"mysql://root:{SECRET}@db/x"})
    assert SECRET not in str(info.value)
    assert "FILESERVER_DATABASE_URL" in str(info.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (DSN, "postgresql+psycopg://fileserver:***@db.internal:5432/fileserver"),
        ("postgresql://u:p@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:p%40ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:p@ss@h:5/db?sslmode=require", "postgresql://u:***@h:5/db?sslmode=require"),
        ("postgresql://:p@h/db", "postgresql://:***@h/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql://h/db", "postgresql://h/db"),
        ("not a url", "not a url"),
        ("http://[::1", "<unparseable url>"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redacted_hides_the_db_password() -> None:
    s = Settings.from_env({"FILESERVER_DATABASE_URL": DSN})
    assert s.database_url == DSN  # the real value is still there for the engine
    out = s.redacted()
    assert set(out) == {f.name for f in fields(Settings)}
    assert out["database_url"] == "postgresql+psycopg://fileserver:***@db.internal:5432/fileserver"
    assert SECRET not in repr(out)
    assert out["topic"] == "janus-events"


@pytest.mark.parametrize("render", [repr, str])
def test_repr_does_not_contain_the_password(render: Any) -> None:
    s = Settings.from_env({"FILESERVER_DATABASE_URL": DSN})
    text = render(s)
    assert SECRET not in text
    assert "janus-events" in text  # it is a real repr, not an empty one


def test_settings_are_immutable() -> None:
    s = Settings.from_env({})
    with pytest.raises(AttributeError):
        s.topic = "x"  # type: ignore[misc]


def test_every_problem_is_reported_at_once() -> None:
    from fileserver.settings import SettingsError

    env = {
        "FILESERVER_CONCURRENCY": "many",
        "FILESERVER_MAX_PENDING": "-1",
        "FILESERVER_LOG_LEVEL": "loud",
        "FILESERVER_ANALYSIS_VAD_MODE": "7",
    }
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(env)
    problems = raised.value.problems
    assert len(problems) == 4, problems
    for name in env:
        assert any(name in p for p in problems), name
    assert str(raised.value).startswith("4 settings are wrong: ")
    settings, listed = Settings.read(env)
    assert listed == problems
    assert settings.concurrency == Settings().concurrency  # the default stands in


def test_unknown_variables_name_the_closest_setting() -> None:
    from fileserver.settings import unknown_variables

    env = {
        "FILESERVER_CONCURENCY": "500",
        "FILESERVER_XYZZY": "1",
        "FILESERVER_TEST_DATABASE_URL": "x",  # the test suite's own
        "FILESERVER_WEED_BIN": "/bin/weed",  # the dev stack's
        "FILESERVER_TOPIC": "t",
        "OTHER": "1",
    }
    assert unknown_variables(env) == [
        ("FILESERVER_CONCURENCY", "FILESERVER_CONCURRENCY"),
        ("FILESERVER_XYZZY", None),
    ]


def test_every_setting_is_documented_once() -> None:
    from fileserver.settings_docs import DOCS

    assert set(DOCS) == {f.name for f in fields(Settings)}
    assert all(doc.meaning.strip() for doc in DOCS.values())
