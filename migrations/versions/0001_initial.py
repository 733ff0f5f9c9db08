"""Initial schema: models, blobs, loads, peers, requests.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00

Column types are spelled out here rather than imported from hippod.store.tables, so this
revision keeps describing the schema it created even after the ORM moves on.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def _when(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("name", sa.String(), primary_key=True),
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("digest", sa.String(), nullable=False),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("format", sa.String(), nullable=False),
        sa.Column("family", sa.String(), nullable=True),
        sa.Column("parameters", sa.BigInteger(), nullable=True),
        sa.Column("parameter_size", sa.String(), nullable=True),
        sa.Column("quantization", sa.String(), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("context_length", sa.Integer(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("missing", sa.Boolean(), nullable=False),
        _when("created_at"),
        _when("modified_at"),
    )
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(), primary_key=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("path", sa.String(), nullable=False),
        _when("created_at"),
    )
    op.create_table(
        "loads",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("node", sa.String(), nullable=False),
        _when("started_at"),
        _when("ended_at", nullable=True),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("end_reason", sa.String(), nullable=True),
        sa.Column("load_seconds", sa.Float(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("layers", sa.String(), nullable=True),
    )
    op.create_table(
        "peers",
        sa.Column("node_id", sa.String(), primary_key=True),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("addresses", sa.JSON(), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("memory_total", sa.BigInteger(), nullable=False),
        sa.Column("memory_free", sa.BigInteger(), nullable=False),
        sa.Column("version", sa.String(), nullable=False),
        sa.Column("chip", sa.String(), nullable=True),
        sa.Column("trusted", sa.Boolean(), nullable=False),
        sa.Column("models", sa.JSON(), nullable=False),
        _when("last_seen"),
    )
    op.create_table(
        "requests",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        _when("time"),
        sa.Column("client", sa.String(), nullable=False),
        sa.Column("endpoint", sa.String(), nullable=False),
        sa.Column("model", sa.String(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("total_seconds", sa.Float(), nullable=False),
        sa.Column("ttft_seconds", sa.Float(), nullable=True),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("prompt", sa.Text(), nullable=True),
    )
    op.create_index("ix_requests_time", "requests", ["time"])


def downgrade() -> None:
    op.drop_index("ix_requests_time", table_name="requests")
    for table in ("requests", "peers", "loads", "blobs", "models"):
        op.drop_table(table)
