"""Secrets: Kafka SASL/TLS and S3 TLS settings reach the clients; nothing logs a secret."""

from __future__ import annotations

import io
import json
import logging
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faust
import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from fileserver import logs
from fileserver.errors import ConfigError
from fileserver.runtime import faust_broker_credentials, kafka_client_kwargs, make_s3_client
from fileserver.settings import Settings
from tests.integration.test_hostile_sources import CA_PEM, GW_TEST_CERT_PEM, GW_TEST_KEY_PEM

SASL_PASSWORD = "kafka-sasl-Pa55word!"
KEY_PASSWORD = "tls-key-passphrase"
DB_PASSWORD = "db-Pa55word"
S3_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SECRETS = (SASL_PASSWORD, KEY_PASSWORD, DB_PASSWORD, S3_SECRET)


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, str]:
    files = {"ca": CA_PEM, "cert": GW_TEST_CERT_PEM, "key": GW_TEST_KEY_PEM}
    for name, text in files.items():
        (tmp_path / f"{name}.pem").write_text(text)
    return {name: str(tmp_path / f"{name}.pem") for name in files}


def env(**values: str) -> dict[str, str]:
    return {f"FILESERVER_{k.upper()}": v for k, v in values.items()}


def secure_env(tls_files: dict[str, str]) -> dict[str, str]:
    return env(
        kafka_bootstrap="b1.internal:9093, b2.internal:9093",
        kafka_security_protocol="sasl_ssl",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="fileserver",
        kafka_sasl_password=SASL_PASSWORD,
        kafka_ssl_cafile=tls_files["ca"],
        kafka_ssl_certfile=tls_files["cert"],
        kafka_ssl_keyfile=tls_files["key"],
        kafka_ssl_key_password=KEY_PASSWORD,
        database_url=f"postgresql+psycopg://fileserver:{DB_PASSWORD}@db.internal/fileserver",
        s3_endpoint_url="https://s3.internal:9000",
        s3_verify=tls_files["ca"],
    )


# --- Kafka -------------------------------------------------------------------------------


def test_plaintext_is_the_default() -> None:
    settings = Settings.from_env({})
    assert kafka_client_kwargs(settings) == {
        "bootstrap_servers": ["localhost:9092"],
        "security_protocol": "PLAINTEXT",
    }
    assert faust_broker_credentials(settings) is None


def test_sasl_ssl_reaches_aiokafka_and_faust_identically(tls_files: dict[str, str]) -> None:
    settings = Settings.from_env(secure_env(tls_files))
    kwargs = kafka_client_kwargs(settings)
    assert kwargs["bootstrap_servers"] == ["b1.internal:9093", "b2.internal:9093"]
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_username"] == "fileserver"
    assert kwargs["sasl_plain_password"] == SASL_PASSWORD
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname and context.verify_mode is ssl.CERT_REQUIRED
    assert [c["subject"] for c in context.get_ca_certs()] == [
        ((("commonName", "fileserver test CA"),),)
    ]

    credentials = faust_broker_credentials(settings)
    assert isinstance(credentials, faust.SASLCredentials)
    auth = credentials_to_aiokafka_auth(credentials)  # what faust hands to aiokafka
    assert auth["security_protocol"] == "SASL_SSL"
    assert auth["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (auth["sasl_plain_username"], auth["sasl_plain_password"]) == (
        "fileserver",
        SASL_PASSWORD,
    )
    assert auth["ssl_context"].check_hostname
    assert SASL_PASSWORD not in repr(credentials)


def test_faust_app_uses_the_credentials(
    tls_files: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fileserver import worker

    class Built(Exception):
        pass

    received: dict[str, Any] = {}

    def capture(self: faust.App, *args: Any, **kwargs: Any) -> None:
        received.update(kwargs)
        raise Built  # stop build_app here: only what faust receives matters

    settings = Settings.from_env(secure_env(tls_files))
    monkeypatch.setattr(faust.App, "__init__", capture)
    with pytest.raises(Built):
        worker.build_app(settings)
    monkeypatch.undo()
    credentials = received["broker_credentials"]
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.username == "fileserver" and credentials.ssl_context is not None
    app = faust.App("t", broker="kafka://b1.internal:9093", broker_credentials=credentials)
    assert app.conf.broker_credentials is credentials


@pytest.mark.parametrize(
    ("protocol", "mechanism", "faust_type"),
    [
        ("SASL_PLAINTEXT", "PLAIN", faust.SASLCredentials),
        ("SASL_PLAINTEXT", "SCRAM-SHA-256", faust.SASLCredentials),
        ("SSL", None, faust.SSLCredentials),
    ],
)
def test_other_protocols(
    tls_files: dict[str, str], protocol: str, mechanism: str | None, faust_type: type
) -> None:
    values = {"kafka_security_protocol": protocol}
    if protocol.startswith("SASL"):
        values |= {
            "kafka_sasl_mechanism": str(mechanism),
            "kafka_sasl_username": "u",
            "kafka_sasl_password": SASL_PASSWORD,
        }
    else:
        values |= {"kafka_ssl_cafile": tls_files["ca"]}
    settings = Settings.from_env(env(**values))
    kwargs = kafka_client_kwargs(settings)
    credentials = faust_broker_credentials(settings)
    assert isinstance(credentials, faust_type)
    auth = dict(credentials_to_aiokafka_auth(credentials))
    assert auth["security_protocol"] == kwargs["security_protocol"] == protocol
    assert ("ssl_context" in kwargs) is protocol.endswith("SSL")
    if mechanism:
        assert auth["sasl_mechanism"] == kwargs["sasl_mechanism"] == mechanism
        assert auth["ssl_context"] is None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "KAFKA_SASL_USERNAME and"),
        (
            {"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_username": "u"},
            "KAFKA_SASL_PASSWORD",
        ),
        ({"kafka_sasl_password": "x"}, "does not use SASL"),
        ({"kafka_ssl_cafile": "/etc/hosts"}, "does not use TLS"),
        ({"kafka_security_protocol": "TLS"}, "KAFKA_SECURITY_PROTOCOL='TLS' must be one of"),
        ({"kafka_sasl_mechanism": "GSSAPI"}, "KAFKA_SASL_MECHANISM='GSSAPI' must be one of"),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_cafile": "/nonexistent/ca.pem"},
            "KAFKA_SSL_CAFILE='/nonexistent/ca.pem': no such file",
        ),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_keyfile": "/etc/hosts"},
            "KAFKA_SSL_KEYFILE needs",
        ),
        ({"s3_verify": "/nonexistent/bundle.pem"}, "S3_VERIFY='/nonexistent/bundle.pem'"),
    ],
)
def test_incomplete_or_inconsistent_security_settings_are_refused(
    values: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match="FILESERVER_") as info:
        Settings.from_env(env(**values))
    assert message in str(info.value)
    for secret in SECRETS:
        assert secret not in str(info.value)


# --- S3 TLS ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("", True), ("true", True), ("1", True), ("false", False), ("off", False), ("CA", "CA")],
)
def test_s3_verify_reaches_botocore(
    tls_files: dict[str, str], raw: str, expected: bool | str
) -> None:
    raw = tls_files["ca"] if raw == "CA" else raw
    expected = tls_files["ca"] if expected == "CA" else expected
    settings = Settings.from_env(env(s3_verify=raw, s3_region="us-east-1"))
    assert settings.s3_verify == expected
    client = make_s3_client(settings)
    assert client._endpoint.http_session._verify == expected


# --- redaction ---------------------------------------------------------------------------


def test_redacted_settings_and_repr_hide_every_secret(tls_files: dict[str, str]) -> None:
    settings = Settings.from_env(secure_env(tls_files))
    out = settings.redacted()
    assert out["kafka_sasl_password"] == out["kafka_ssl_key_password"] == "***"
    assert out["kafka_sasl_username"] == "fileserver"  # not a secret, useful when debugging
    assert out["database_url"] == "postgresql+psycopg://fileserver:***@db.internal/fileserver"
    for text in (repr(out), str(out), repr(settings), str(settings)):
        for secret in SECRETS:
            assert secret not in text
    unset = Settings.from_env({}).redacted()
    assert unset["kafka_sasl_password"] is None  # "***" only when there is something to hide


@pytest.fixture
def logging_state() -> Iterator[None]:
    """Restore the root logger and the record factory after a test configures logging."""
    root = logging.getLogger()
    handlers, level, factory = root.handlers[:], root.level, logging.getLogRecordFactory()
    secrets = set(logs._secrets)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.setLogRecordFactory(factory)
    logs._secrets.clear()
    logs.register_secrets(secrets)  # also resets the longest-first order


@pytest.mark.parametrize("json_lines", [True, False])
def test_start_up_log_line_has_no_secret(
    tls_files: dict[str, str],
    logging_state: None,
    monkeypatch: pytest.MonkeyPatch,
    json_lines: bool,
) -> None:
    """As ``fileserver worker`` starts: settings from the environment, then logging."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    for name, value in secure_env(tls_files).items():
        monkeypatch.setenv(name, value)
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    settings = Settings.from_env()
    logs.configure("INFO", json_lines=json_lines)
    log = logging.getLogger("fileserver")
    log.info("settings: %s", settings.redacted())  # what `fileserver worker` logs first
    log.info("raw settings (a careless line): %r", settings)
    log.info("environment leaked by a bug: %s", dict(secure_env(tls_files)))
    log.warning("boto3 would never, but: key=%s", S3_SECRET)
    text = stream.getvalue()
    assert "settings:" in text and "b1.internal:9093" in text
    for secret in SECRETS:
        assert secret not in text
    if json_lines:
        assert all(json.loads(line)["msg"] for line in text.splitlines())


# --- the log filter ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "postgresql+psycopg://fileserver:pw@db:5432/fs",
            "postgresql+psycopg://fileserver:***@db:5432/fs",
        ),
        ("https://u:p@ss@gw.example/a.mp3", "https://u:***@gw.example/a.mp3"),
        ("redis://:hunter2@cache:6379/0", "redis://:***@cache:6379/0"),
        ("sasl_ssl://admin:x@broker:9093", "sasl_ssl://admin:***@broker:9093"),
        (
            "from http://a:1@x/ to https://b:2@y/",
            "from http://a:***@x/ to https://b:***@y/",
        ),
        ("('http://a:b@c/d', 5)", "('http://a:***@c/d', 5)"),
        # nothing to hide
        ("http://gw.example:8080/a@b.mp3", "http://gw.example:8080/a@b.mp3"),
        ("https://user@gw.example/a", "https://user@gw.example/a"),
        ("user:pass@host without a scheme", "user:pass@host without a scheme"),
        ("ratio 3:4 @ noon", "ratio 3:4 @ noon"),
    ],
)
def test_scrub(text: str, expected: str) -> None:
    assert logs.scrub(text) == expected


def _emit(logger: logging.Logger, handler: logging.Handler) -> None:
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise ConnectionError("cannot connect to postgresql://fs:dbpass123@db:5432/fs")
        except ConnectionError:
            logger.exception("fetch of %s failed", "https://gw:srcpass456@gw.example/a.mp3")
        logger.warning("plain %s", "https://gw:srcpass456@gw.example/b.mp3", stack_info=True)
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("formatter", [logs.JsonFormatter(), logging.Formatter()])
def test_secret_filter_scrubs_messages_and_tracebacks(formatter: logging.Formatter) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(logs.SecretFilter())
    _emit(logging.getLogger("test.secret_filter"), handler)
    text = stream.getvalue()
    assert "dbpass123" not in text and "srcpass456" not in text
    assert "postgresql://fs:***@db:5432/fs" in text  # the traceback is kept, scrubbed
    assert "ConnectionError" in text and "https://gw:***@gw.example/a.mp3" in text
    assert "Stack (most recent call last)" in text


def test_record_factory_scrubs_even_behind_a_foreign_handler(logging_state: None) -> None:
    """faust's worker replaces the root handlers; records are scrubbed at creation anyway."""
    logs.install_scrubbing()
    logs.install_scrubbing()  # idempotent
    logs.register_secrets(["registered-Secret-42", None, "ab"])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)  # no filter
    logger = logging.getLogger("test.factory")
    _emit(logger, handler)
    logger.addHandler(handler)
    logger.error("token registered-Secret-42 in %s", "a message")
    logger.removeHandler(handler)
    text = stream.getvalue()
    assert "dbpass123" not in text and "srcpass456" not in text
    assert "registered-Secret-42" not in text and "token *** in a message" in text
    assert "ab" in logs.scrub("ab cd")  # too short to be registered


def test_filter_keeps_records_and_tolerates_odd_ones() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%d items", ("nan",), None)
    assert logs.SecretFilter().filter(record)  # a broken %-format is left to the handler
    ok = logging.LogRecord("x", logging.INFO, __file__, 1, {"url": "http://a:b@c/"}, (), None)
    assert logs.SecretFilter().filter(ok)
    assert ok.getMessage() == "{'url': 'http://a:***@c/'}"
    plain = logging.LogRecord("x", logging.INFO, __file__, 1, "%s items", (3,), None)
    assert logs.SecretFilter().filter(plain)
    assert (plain.msg, plain.args) == ("%s items", (3,))  # untouched when nothing to hide
