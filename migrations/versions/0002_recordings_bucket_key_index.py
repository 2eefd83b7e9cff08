"""recordings: s3_key in collation "C", index on (s3_bucket, s3_key, id) for reconcile

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

``reconcile`` reads a bucket's rows in the order S3 lists keys (byte order, then id),
a batch at a time. An S3 key is a byte string: collation "C" compares it as S3 does,
and the index makes each batch a short range scan instead of a sort of all the
bucket's rows, which would also have to fit in the statement timeout.

Changing the collation of a TEXT column rewrites nothing (the bytes are the same); the
index is built ``CONCURRENTLY``, outside the migration's transaction, so the workers
keep inserting meanwhile. Should a concurrent build fail, Postgres leaves an invalid
index behind: drop it (``DROP INDEX CONCURRENTLY ix_recordings_bucket_key``) and run
``fileserver migrate`` again.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

INDEX = "ix_recordings_bucket_key"


def upgrade() -> None:
    op.alter_column(
        "recordings",
        "s3_key",
        type_=sa.Text(collation="C"),
        existing_type=sa.Text(),
        existing_nullable=False,
    )
    with op.get_context().autocommit_block():
        op.create_index(
            INDEX, "recordings", ["s3_bucket", "s3_key", "id"], postgresql_concurrently=True
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(INDEX, table_name="recordings", postgresql_concurrently=True)
    op.alter_column(
        "recordings",
        "s3_key",
        type_=sa.Text(),
        existing_type=sa.Text(collation="C"),
        existing_nullable=False,
    )
