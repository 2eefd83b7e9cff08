"""engine_options: the deadlines every database connection gets (no database here; the
integration tests check them on real connections)."""

from __future__ import annotations

from typing import Any

import pytest

from fileserver.db.deadlines import STATEMENT_TIMEOUT_OPTION, engine_options

URL = "postgresql+psycopg://u@h/db"


def _options(url: str = URL, **kwargs: float) -> dict[str, Any]:
    return engine_options(
        url,
        connect_timeout_s=kwargs.get("connect_timeout_s", 5.0),
        statement_timeout_s=kwargs.get("statement_timeout_s", 30.0),
    )


def test_defaults_bound_connect_silence_statements_and_pool_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PGOPTIONS", raising=False)
    options = _options()
    assert options["connect_args"] == {
        "connect_timeout": 5,
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "tcp_user_timeout": 11_000,
        "options": "-c statement_timeout=30000",
    }
    assert options["pool_timeout"] == 30.0
    assert options["execution_options"] == {STATEMENT_TIMEOUT_OPTION: 30.0}


def test_a_short_connect_timeout_stays_within_libpq_limits() -> None:
    args = _options(connect_timeout_s=0.5, statement_timeout_s=0.1)["connect_args"]
    assert args["connect_timeout"] == 2  # libpq's minimum
    assert args["keepalives_idle"] == 1 and args["keepalives_interval"] == 1
    assert args["options"] == "-c statement_timeout=100"


def test_parameters_the_url_sets_are_left_to_it() -> None:
    url = f"{URL}?keepalives_idle=60&connect_timeout=9&tcp_user_timeout=0"
    args = _options(url)["connect_args"]
    assert not {"keepalives_idle", "connect_timeout", "tcp_user_timeout"} & set(args)
    assert args["keepalives"] == 1


@pytest.mark.parametrize(
    ("options", "client_timeout_s"),
    [
        ("-c statement_timeout=5s", 5.0),
        ("-cstatement_timeout=250", 0.25),
        ("--statement_timeout=2min -c lock_timeout=1s", 120.0),
        ("-c search_path=x --statement-timeout=1h", 3600.0),
        ("-c statement_timeout=0", 30.0),  # off on the server: the client keeps ours
        ("-c statement_timeout=soon", 30.0),  # the server will judge it
    ],
)
def test_a_statement_timeout_in_the_url_options_wins(options: str, client_timeout_s: float) -> None:
    result = _options(f"{URL}?options={options.replace(' ', '%20')}")
    assert "options" not in result["connect_args"]  # the URL's own, untouched
    assert result["execution_options"][STATEMENT_TIMEOUT_OPTION] == client_timeout_s
    assert result["pool_timeout"] == client_timeout_s


def test_other_url_options_are_kept_beside_ours() -> None:
    args = _options(f"{URL}?options=-c%20lock_timeout%3D2s")["connect_args"]
    assert args["options"] == "-c lock_timeout=2s -c statement_timeout=30000"


def test_pgoptions_is_kept_when_the_url_has_no_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """libpq reads PGOPTIONS only when no ``options`` is given, which we now give."""
    monkeypatch.setenv("PGOPTIONS", "-c search_path=ops")
    assert _options()["connect_args"]["options"] == "-c search_path=ops -c statement_timeout=30000"
    monkeypatch.setenv("PGOPTIONS", "-c statement_timeout=3s")
    assert "options" not in _options()["connect_args"]
    assert _options()["execution_options"][STATEMENT_TIMEOUT_OPTION] == 3.0
