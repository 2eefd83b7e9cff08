"""recordings: speech analysis columns; indexes for newest-first reads

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

The analysis columns (``fileserver.analysis``) are nullable without a default: adding
them rewrites nothing and is instant at any table size; rows ingested before, or not
analysed, keep NULL.

The three indexes serve the read API's newest-first keyset pagination (``ORDER BY
event_time DESC, id DESC`` after a cursor ``(event_time, id)``): by talk group, by radio
(uid) and over all rows. Each is built ``CONCURRENTLY``, outside the migration's
transaction, so the workers keep inserting meanwhile (as in 0002). Should a concurrent
build fail, Postgres leaves an invalid index behind: drop it (``DROP INDEX CONCURRENTLY
<name>``) and run ``fileserver migrate`` again.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

COLUMNS = (
    ("peak_dbfs", sa.Double()),
    ("rms_dbfs", sa.Double()),
    ("speech_ratio", sa.Double()),
    ("leading_silence_ms", sa.Integer()),
    ("trailing_silence_ms", sa.Integer()),
    ("clipped_ratio", sa.Double()),
    ("empty", sa.Boolean()),
)
NEWEST_FIRST = [sa.text("event_time DESC"), sa.text("id DESC")]
INDEXES = {
    "ix_recordings_grp_time": [sa.text("grp_id"), *NEWEST_FIRST],
    "ix_recordings_uid_time": [sa.text("uid"), *NEWEST_FIRST],
    "ix_recordings_time": NEWEST_FIRST,
}


def upgrade() -> None:
    for name, type_ in COLUMNS:
        op.add_column("recordings", sa.Column(name, type_, nullable=True))
    with op.get_context().autocommit_block():
        for name, columns in INDEXES.items():
            op.create_index(name, "recordings", columns, postgresql_concurrently=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name in reversed(INDEXES):
            op.drop_index(name, table_name="recordings", postgresql_concurrently=True)
    for name, _ in reversed(COLUMNS):
        op.drop_column("recordings", name)
