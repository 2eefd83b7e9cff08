"""The batched statements of :class:`fileserver.repository.Repository`, built once: one
array parameter per column (or per looked-up value) whatever the batch size."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from operator import attrgetter
from typing import Any

import psycopg
from psycopg.types.array import ListBinaryDumper
from sqlalchemy import (
    BigInteger,
    String,
    Text,
    bindparam,
    cast,
    func,
    literal,
    literal_column,
    select,
    text,
    true,
    tuple_,
)
from sqlalchemy.dialects.postgresql import ARRAY, insert

from fileserver.db.rows import NewRecording
from fileserver.models import Recording


class BinaryArray(list[Any]):
    """A list that psycopg sends as a binary array.

    psycopg's default (text) list dumper quotes every element in Python (a regex search
    each); its binary one only length-prefixes them. Registered for this class
    alone, so no other list anywhere changes how it is sent.
    """


psycopg.adapters.register_dumper(BinaryArray, ListBinaryDumper)

RECORDING_COLUMNS = tuple(f.name for f in fields(NewRecording))
recording_values: Callable[[NewRecording], tuple[Any, ...]] = attrgetter(*RECORDING_COLUMNS)


def array_param(name: str, column: Any) -> Any:
    """``CAST(:name AS type[])``: a bind parameter holding an array of ``column``'s values.

    Strings are cast to ``TEXT[]`` (not ``CHAR(32)[]``, which would silently truncate),
    so storing them applies the column's own checks, as a plain ``INSERT`` does. The
    parameter itself is untyped: SQLAlchemy passes the :class:`BinaryArray` through.
    """
    element = Text() if isinstance(column.type, String) else column.type
    return cast(bindparam(name), ARRAY(element, dimensions=1))


def _insert_many_statement() -> Any:
    """``INSERT … SELECT … FROM unnest(:uid, :grp_id, …) ON CONFLICT (source_url) DO
    NOTHING RETURNING source_url``: any number of rows, one array parameter per column.

    Built once: SQLAlchemy compiles it once (a compiled-cache hit per batch after that)
    and psycopg sends the same 17 parameters whatever the batch size (prepared once
    executed ``prepare_threshold`` times), where a multi-row ``VALUES`` has a bind
    parameter per value, coerced and compiled anew for every batch.
    """
    table = Recording.__table__
    source = (
        func.unnest(*(array_param(name, table.c[name]) for name in RECORDING_COLUMNS))
        .table_valued(*RECORDING_COLUMNS)
        .render_derived()
    )
    return (
        insert(Recording)
        .from_select(list(RECORDING_COLUMNS), select(*(source.c[n] for n in RECORDING_COLUMNS)))
        .on_conflict_do_nothing(index_elements=["source_url"])
        .returning(Recording.source_url)
    )


INSERT_MANY = _insert_many_statement()


def _md5_by_urls_statement() -> Any:
    """``SELECT url, md5 FROM unnest(:urls) AS wanted(url) JOIN LATERAL (SELECT md5 FROM
    recordings WHERE source_url = url LIMIT 1) ON true``: one array parameter for any
    number of URLs, where an expanding ``IN`` binds (and SQLAlchemy renders) one per URL.

    The lateral ``LIMIT 1`` subquery makes the plan a unique-index probe per URL, also
    when planned on a new, empty table. The plainer ``source_url = ANY(:urls)`` is not
    safe once psycopg prepares it (after ``prepare_threshold`` runs): Postgres then
    plans it generically, for "10 URLs", which on a new, still small table is a
    sequential scan, and keeps that plan while the table grows, until the next ANALYZE
    of it (measured: 45 ms instead of 0.3 ms per look-up of 100 URLs at 50,000 rows).
    """
    wanted = (
        func.unnest(array_param("urls", Recording.__table__.c.source_url))
        .table_valued("url")
        .render_derived(name="wanted")
    )
    found = (
        select(Recording.md5)
        .where(Recording.source_url == wanted.c.url)
        .limit(literal_column("1"))
        .lateral("found")
    )
    return select(wanted.c.url, found.c.md5).join_from(wanted, found, true())


MD5_BY_URLS = _md5_by_urls_statement()

PRIOR_OUTCOMES = text(
    """
    SELECT w.i, r.md5, f.id IS NOT NULL
    FROM unnest(CAST(:urls AS TEXT[]), CAST(:topics AS TEXT[]),
                CAST(:partitions AS INTEGER[]), CAST(:offsets AS BIGINT[]))
         WITH ORDINALITY AS w(url, topic, part, off, i)
    LEFT JOIN LATERAL (SELECT md5 FROM recordings WHERE source_url = w.url LIMIT 1) AS r
         ON true
    LEFT JOIN LATERAL (SELECT id FROM ingest_failures WHERE kafka_topic = w.topic
                       AND kafka_partition = w.part AND kafka_offset = w.off LIMIT 1) AS f
         ON true
    """
)
"""One probe of each unique index per event (``recordings.source_url`` and the failure
row's position), for any number of events, in one statement; lateral ``LIMIT 1``
subqueries for the same reason as :data:`MD5_BY_URLS`."""


def recordings_by_key_statement(bucket: str, batch_rows: int, after: tuple[str, int] | None) -> Any:
    """One batch of a keyset scan of ``bucket``'s rows in the order S3 lists keys:
    ``s3_key`` in byte order (``COLLATE "C"``, also right on a database without
    migration 0002, only slower), then ``id``, starting after ``after`` (the last
    ``(s3_key, id)`` of the previous batch). Read in order from the index
    ``ix_recordings_bucket_key``, never sorted."""
    key = Recording.s3_key.collate("C")
    stmt = (
        select(
            Recording.id,
            Recording.source_url,
            Recording.md5,
            Recording.size_bytes,
            Recording.uid,
            Recording.grp_id,
            Recording.event_time,
            Recording.s3_key,
        )
        .where(Recording.s3_bucket == bucket)
        .order_by(key, Recording.id)
        .limit(batch_rows)
    )
    if after is not None:
        last = tuple_(literal(after[0], Text), literal(after[1], BigInteger))
        stmt = stmt.where(tuple_(key, Recording.id) > last)
    return stmt
