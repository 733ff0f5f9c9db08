"""ORM tables: the one description of hippo's SQLite schema.

Migrations create these tables; the ORM classes are used only inside `Store`, never handed out.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC without an offset, returns aware UTC datetimes.

    SQLite has no time zone type: SQLAlchemy writes naive ISO text and reads back naive values.
    Normalising to UTC on the way in keeps the text sortable; tagging UTC on the way out means
    callers only ever see aware datetimes. Naive input is refused because its zone is a guess.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: hippo stores time zone aware UTC only")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {
        datetime: UTCDateTime(),
        int: Integer(),
        str: String(),
        float: Float(),
        bool: Boolean(),
    }


class Model(Base):
    """A named model: its manifest (files by sha256) and what we know about it."""

    __tablename__ = "models"

    name: Mapped[str] = mapped_column(primary_key=True)  # "name:tag"
    source: Mapped[str]  # "hf:repo@rev", "gguf:/path", "dir:/path", "peer:node", "copy:name"
    digest: Mapped[str]  # sha256 hex of the manifest
    files: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    format: Mapped[str]  # "mlx" | "gguf" | "safetensors"
    family: Mapped[str | None]
    parameters: Mapped[int | None] = mapped_column(BigInteger)
    parameter_size: Mapped[str | None]  # "135M"
    quantization: Mapped[str | None]
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    context_length: Mapped[int | None]
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    missing: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime]
    modified_at: Mapped[datetime]


class Blob(Base):
    """A content-addressed file under <home>/blobs."""

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str]
    created_at: Mapped[datetime]


class Load(Base):
    """One time a model was loaded into a runner; open while ended_at is NULL."""

    __tablename__ = "loads"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    model: Mapped[str]
    node: Mapped[str]
    started_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]
    reason: Mapped[str]
    end_reason: Mapped[str | None]  # "evicted" | "expired" | "stopped" | "crashed" | "node lost" | "shutdown"
    load_seconds: Mapped[float]
    bytes: Mapped[int] = mapped_column(BigInteger)
    pid: Mapped[int | None]
    layers: Mapped[str | None]  # "0-14" when this node holds part of a split model


class Peer(Base):
    """Another hippod seen on the LAN."""

    __tablename__ = "peers"

    node_id: Mapped[str] = mapped_column(primary_key=True)
    name: Mapped[str]
    addresses: Mapped[list[str]] = mapped_column(JSON, default=list)
    port: Mapped[int]
    memory_total: Mapped[int] = mapped_column(BigInteger)
    memory_free: Mapped[int] = mapped_column(BigInteger)
    version: Mapped[str]
    chip: Mapped[str | None]
    trusted: Mapped[bool] = mapped_column(default=False)
    models: Mapped[list[str]] = mapped_column(JSON, default=list)
    last_seen: Mapped[datetime]


class Request(Base):
    """Audit log: one row per API request."""

    __tablename__ = "requests"
    __table_args__ = (Index("ix_requests_time", "time"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    time: Mapped[datetime]
    client: Mapped[str]
    endpoint: Mapped[str]
    model: Mapped[str | None]
    prompt_tokens: Mapped[int] = mapped_column(default=0)
    completion_tokens: Mapped[int] = mapped_column(default=0)
    total_seconds: Mapped[float] = mapped_column(default=0.0)
    ttft_seconds: Mapped[float | None]
    status: Mapped[int]
    error: Mapped[str | None] = mapped_column(Text)
    prompt: Mapped[str | None] = mapped_column(Text)
    model_source: Mapped[str | None]  # "local", "copied from peer NAME", "forwarded to NAME"
