"""storable_text against a real Postgres TEXT column (psycopg 3, the worker's driver):
what the raw text makes fail forever, the storable text inserts and reads back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.exc import DataError, StatementError

from fileserver.text import is_storable, storable_text

NASTY = [
    "a\x00b",  # Postgres: invalid byte sequence for encoding "UTF8": 0x00
    "\ud800",  # psycopg: a lone surrogate cannot be encoded to UTF-8
    "x\udfff\ud800y",
    "\ud83d\ude00 a split pair",
    "\x01\x1b[31m\x7f\x85\x9f",  # other controls are storable
    "対讲 \U0001f600 \ufffd \u200b",
]
any_text = st.lists(
    st.one_of(st.characters(), st.characters(categories=["Cs"]), st.just("\x00")), max_size=40
).map("".join)


@pytest.fixture
def conn(database_url: str) -> Iterator[Connection]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            connection.execute(text("CREATE TABLE t (id serial PRIMARY KEY, body text NOT NULL)"))
            connection.commit()
            yield connection
    finally:
        engine.dispose()


def insert(conn: Connection, value: str) -> str:
    row_id = conn.execute(
        text("INSERT INTO t (body) VALUES (:body) RETURNING id"), {"body": value}
    ).scalar_one()
    conn.commit()
    return str(conn.execute(text("SELECT body FROM t WHERE id = :id"), {"id": row_id}).scalar())


@pytest.mark.parametrize("value", NASTY, ids=ascii)
def test_storable_text_is_stored_and_read_back_unchanged(conn: Connection, value: str) -> None:
    if not is_storable(value):
        with pytest.raises((DataError, StatementError, UnicodeEncodeError)):
            insert(conn, value)
        conn.rollback()
    clean = storable_text(value)
    assert insert(conn, clean) == clean


def test_hypothesis_text_made_storable_always_inserts(conn: Connection) -> None:
    @settings(deadline=None, database=None, max_examples=300)
    @given(any_text, st.one_of(st.none(), st.integers(0, 30)))
    def check(value: str, limit: int | None) -> None:
        clean = storable_text(value, limit)
        assert insert(conn, clean) == clean

    check()
