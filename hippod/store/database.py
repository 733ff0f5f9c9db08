"""`Store`: hippo's SQLite state behind short, synchronous, typed calls.

Each method opens its own Session and returns plain records (records.py), so the asyncio daemon
can call it directly or from a worker thread. Two processes may share one file: WAL lets reads
run beside a writer, every write transaction starts with BEGIN IMMEDIATE so it takes the write
lock up front (where busy_timeout applies) instead of failing when a read upgrades to a write.
"""

from __future__ import annotations

import errno
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from importlib.resources import files
from pathlib import Path
from typing import Any

from sqlalchemy import (
    URL,
    Engine,
    create_engine,
    delete,
    event,
    exists,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from hippod.store.records import BlobRecord, LoadRecord, ModelRecord, PeerRecord, RequestRecord
from hippod.store.tables import Blob, Load, Model, Peer, Request

_BUSY_TIMEOUT_S = 5.0
_PRAGMAS = (
    f"PRAGMA busy_timeout={int(_BUSY_TIMEOUT_S * 1000)}",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA foreign_keys=ON",
)
_WRITE = "hippo_write"
# How long a model record read is served from memory. Every write through this Store clears it at
# once; the limit bounds how long a write by another process sharing the file goes unseen.
MODEL_CACHE_SECONDS = 2.0


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Driver autocommit: SQLAlchemy's begin hook below issues BEGIN itself, as the SQLAlchemy
    # docs advise for pysqlite, so we choose DEFERRED or IMMEDIATE per transaction.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        for pragma in _PRAGMAS:
            cursor.execute(pragma)
        _switch_to_wal(cursor)
    finally:
        cursor.close()


def _switch_to_wal(cursor: sqlite3.Cursor) -> None:
    """Set WAL mode, retrying while another process holds the lock it needs.

    On a fresh file two processes may switch at the same moment; SQLite then answers one of
    them SQLITE_BUSY at once (a deadlock, so busy_timeout does not wait) or leaves the old mode.
    Once the file is in WAL mode (it stays so) this is a cheap no-op.
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT_S
    while True:
        try:
            mode = cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        else:
            if mode.lower() == "wal":
                return
            if time.monotonic() > deadline:
                raise sqlite3.OperationalError(f"could not switch to WAL, journal_mode is {mode}")
        time.sleep(0.02)


def _on_begin(connection: Any) -> None:
    writes = connection.get_execution_options().get(_WRITE, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")


def _migrations_dir():
    """Installed: the package hippod.migrations; run from a checkout: <repo>/migrations."""
    try:
        return files("hippod.migrations")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "migrations"


def migrations_config(connection: Any | None = None):
    """An Alembic Config for hippo's migrations, found inside the installed package."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_migrations_dir()))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def migration_head() -> str | None:
    """The head revision id, read from the version files' text (no Alembic import)."""
    revisions, parents = set(), set()
    for f in (_migrations_dir() / "versions").iterdir():
        if not f.name.endswith(".py") or f.name.startswith("__"):
            continue
        body = f.read_text()
        for line in body.splitlines():
            key, _, value = line.partition("=")
            key = key.strip().split(":")[0].strip()
            value = value.strip().strip("\"'")
            if key == "revision" and value:
                revisions.add(value)
            elif key == "down_revision" and value and value != "None":
                parents.add(value)
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


class StoreDiskFull(OSError):
    """SQLite could not write because the disk is full: an OSError with errno ENOSPC, so callers
    that already treat a full disk as the user's problem (507, a clear message) treat this too."""


class Store:
    """hippo's database: one SQLite file, migrated to head when opened."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = Path(db_path)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._engine: Engine = create_engine(URL.create("sqlite", database=str(self.db_path)))
        event.listen(self._engine, "connect", _on_connect)
        event.listen(self._engine, "begin", _on_begin)
        self._writer = self._engine.execution_options(**{_WRITE: True})
        # Every request looks up its model (twice); a burst must not queue on SQLite for it.
        self._models: dict[str, tuple[float, ModelRecord | None]] = {}
        self._models_version = 0
        self._models_lock = threading.Lock()
        try:
            self._migrate()
        except BaseException:
            self._engine.dispose()
            raise

    def _migrate(self) -> None:
        # Alembic costs ~0.3 s to import: skip it when the file is already at head (every start
        # but the first after an upgrade), so hippod starts fast.
        head = migration_head()
        with self._engine.connect() as connection:
            try:
                current = connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
            except Exception:
                current = None
        if current is not None and current == head:
            return
        from alembic import command

        # One write transaction: a second process opening the same file waits, then finds head.
        with self._writer.begin() as connection:
            command.upgrade(migrations_config(connection), "head")

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self._engine) as session, session.begin():
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        try:
            with Session(self._writer) as session, session.begin():
                yield session
        except OperationalError as e:
            if getattr(e.orig, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                raise StoreDiskFull(errno.ENOSPC, f"cannot write to {self.db_path}: the disk is full") from None
            raise

    # models

    @contextmanager
    def _model_write(self) -> Iterator[Session]:
        """A write to the models table: the cached reads go once it is committed (or not)."""
        try:
            with self._write() as s:
                yield s
        finally:
            with self._models_lock:
                self._models_version += 1
                self._models.clear()

    def put_model(self, rec: ModelRecord) -> None:
        """Insert or replace; modified_at becomes now, created_at survives unless rec sets it."""
        now = _now()
        values = asdict(rec)
        values["modified_at"] = now
        with self._model_write() as s:
            row = s.get(Model, rec.name)
            if row is None:
                values["created_at"] = rec.created_at or now
                s.add(Model(**values))
                return
            if rec.created_at is None:
                values["created_at"] = row.created_at
            for key, value in values.items():
                setattr(row, key, value)

    def get_model(self, name: str) -> ModelRecord | None:
        """The model's record (records are frozen: the cached one is shared)."""
        now = time.monotonic()
        with self._models_lock:
            hit = self._models.get(name)
            version = self._models_version
        if hit is not None and now - hit[0] < MODEL_CACHE_SECONDS:
            return hit[1]
        with self._read() as s:
            row = s.get(Model, name)
            rec = _model_record(row) if row else None
        with self._models_lock:
            if version == self._models_version:  # no write came between: the read is current
                if len(self._models) > 1024:
                    self._models.clear()
                self._models[name] = (now, rec)
        return rec

    def list_models(self) -> list[ModelRecord]:
        """Newest change first, as `ollama list` shows them."""
        with self._read() as s:
            rows = s.scalars(select(Model).order_by(Model.modified_at.desc(), Model.name))
            return [_model_record(r) for r in rows]

    def delete_model(self, name: str) -> bool:
        with self._model_write() as s:
            return s.execute(delete(Model).where(Model.name == name)).rowcount > 0

    def set_missing(self, name: str, missing: bool) -> bool:
        """Mark a model whose files are gone (or back); False if no such model."""
        with self._model_write() as s:
            result = s.execute(update(Model).where(Model.name == name).values(missing=missing))
            return result.rowcount > 0

    def models_using_blob(self, sha256: str) -> list[str]:
        """Names of models that list the blob as a file, or whose manifest digest it is."""
        entries = func.json_each(Model.files).table_valued("value")
        listed = exists(
            select(1).select_from(entries).where(func.json_extract(entries.c.value, "$.sha256") == sha256)
        )
        with self._read() as s:
            stmt = select(Model.name).where(or_(Model.digest == sha256, listed)).order_by(Model.name)
            return list(s.scalars(stmt))

    # blobs

    def put_blob(self, sha256: str, size: int, path: str | Path) -> None:
        """Record a blob; an existing row keeps its created_at."""
        with self._write() as s:
            row = s.get(Blob, sha256)
            if row is None:
                s.add(Blob(sha256=sha256, size=size, path=str(path), created_at=_now()))
            else:
                row.size, row.path = size, str(path)

    def get_blob(self, sha256: str) -> BlobRecord | None:
        with self._read() as s:
            row = s.get(Blob, sha256)
            return _blob_record(row) if row else None

    def list_blobs(self) -> list[BlobRecord]:
        with self._read() as s:
            return [_blob_record(r) for r in s.scalars(select(Blob).order_by(Blob.sha256))]

    def delete_blob(self, sha256: str) -> bool:
        with self._write() as s:
            return s.execute(delete(Blob).where(Blob.sha256 == sha256)).rowcount > 0

    # loads

    def start_load(
        self,
        model: str,
        node: str,
        reason: str,
        bytes: int,
        load_seconds: float,
        pid: int | None = None,
        layers: str | None = None,
    ) -> int:
        row = Load(
            model=model, node=node, started_at=_now(), reason=reason, bytes=bytes,
            load_seconds=load_seconds, pid=pid, layers=layers,
        )
        with self._write() as s:
            s.add(row)
            s.flush()
            return row.id

    def end_load(self, load_id: int, end_reason: str) -> bool:
        """Close a load; False (and no change) if it is unknown or already ended."""
        stmt = (
            update(Load)
            .where(Load.id == load_id, Load.ended_at.is_(None))
            .values(ended_at=_now(), end_reason=end_reason)
        )
        with self._write() as s:
            return s.execute(stmt).rowcount > 0

    def open_loads(self) -> list[LoadRecord]:
        with self._read() as s:
            rows = s.scalars(select(Load).where(Load.ended_at.is_(None)).order_by(Load.id))
            return [_load_record(r) for r in rows]

    def close_open_loads(self, end_reason: str) -> int:
        """Close rows a crashed daemon left open; returns how many."""
        stmt = update(Load).where(Load.ended_at.is_(None)).values(ended_at=_now(), end_reason=end_reason)
        with self._write() as s:
            return s.execute(stmt).rowcount

    def recent_loads(self, limit: int = 20) -> list[LoadRecord]:
        with self._read() as s:
            rows = s.scalars(select(Load).order_by(Load.started_at.desc(), Load.id.desc()).limit(limit))
            return [_load_record(r) for r in rows]

    # peers

    def put_peer(self, rec: PeerRecord) -> None:
        """Insert or replace; last_seen defaults to now."""
        values = asdict(rec)
        values["last_seen"] = rec.last_seen or _now()
        with self._write() as s:
            s.merge(Peer(**values))

    def get_peer(self, node_id: str) -> PeerRecord | None:
        with self._read() as s:
            row = s.get(Peer, node_id)
            return _peer_record(row) if row else None

    def list_peers(self) -> list[PeerRecord]:
        with self._read() as s:
            return [_peer_record(r) for r in s.scalars(select(Peer).order_by(Peer.name, Peer.node_id))]

    def delete_peer(self, node_id: str) -> bool:
        with self._write() as s:
            return s.execute(delete(Peer).where(Peer.node_id == node_id)).rowcount > 0

    def touch_peer(self, node_id: str, when: datetime | None = None) -> bool:
        """Note that a peer was just heard from; False if it is unknown."""
        stmt = update(Peer).where(Peer.node_id == node_id).values(last_seen=when or _now())
        with self._write() as s:
            return s.execute(stmt).rowcount > 0

    # requests

    def add_request(self, rec: RequestRecord) -> int:
        """Append to the audit log; rec.id is ignored, the new id is returned."""
        row = _request_row(rec)
        with self._write() as s:
            s.add(row)
            s.flush()
            return row.id

    def add_requests(self, recs: list[RequestRecord]) -> None:
        """Append several rows to the audit log in one transaction."""
        with self._write() as s:
            s.add_all([_request_row(rec) for rec in recs])

    def recent_requests(self, limit: int = 50, since: datetime | None = None) -> list[RequestRecord]:
        """Newest first; only those at or after `since` when given."""
        stmt = select(Request).order_by(Request.time.desc(), Request.id.desc()).limit(limit)
        if since is not None:
            stmt = stmt.where(Request.time >= since)
        with self._read() as s:
            return [_request_record(r) for r in s.scalars(stmt)]

    def prune_requests(self, older_than: datetime) -> int:
        """Drop audit rows before `older_than`; returns how many."""
        with self._write() as s:
            return s.execute(delete(Request).where(Request.time < older_than)).rowcount

    # health

    def integrity_ok(self) -> bool:
        with self._engine.connect() as connection:
            rows = connection.execute(text("PRAGMA integrity_check")).scalars().all()
        return rows == ["ok"]


def _request_row(rec: RequestRecord) -> Request:
    values = asdict(rec)
    values.pop("id")
    values["time"] = rec.time or _now()
    return Request(**values)


def _model_record(row: Model) -> ModelRecord:
    return ModelRecord(
        name=row.name, source=row.source, digest=row.digest, files=list(row.files), format=row.format,
        family=row.family, parameters=row.parameters, parameter_size=row.parameter_size,
        quantization=row.quantization, size=row.size, context_length=row.context_length,
        details=dict(row.details), missing=row.missing, created_at=row.created_at,
        modified_at=row.modified_at,
    )


def _blob_record(row: Blob) -> BlobRecord:
    return BlobRecord(sha256=row.sha256, size=row.size, path=row.path, created_at=row.created_at)


def _load_record(row: Load) -> LoadRecord:
    return LoadRecord(
        id=row.id, model=row.model, node=row.node, started_at=row.started_at, ended_at=row.ended_at,
        reason=row.reason, end_reason=row.end_reason, load_seconds=row.load_seconds, bytes=row.bytes,
        pid=row.pid, layers=row.layers,
    )


def _peer_record(row: Peer) -> PeerRecord:
    return PeerRecord(
        node_id=row.node_id, name=row.name, addresses=list(row.addresses), port=row.port,
        memory_total=row.memory_total, memory_free=row.memory_free, version=row.version,
        chip=row.chip, trusted=row.trusted, models=list(row.models), last_seen=row.last_seen,
    )


def _request_record(row: Request) -> RequestRecord:
    return RequestRecord(
        id=row.id, time=row.time, client=row.client, endpoint=row.endpoint, model=row.model,
        prompt_tokens=row.prompt_tokens, completion_tokens=row.completion_tokens,
        total_seconds=row.total_seconds, ttft_seconds=row.ttft_seconds, status=row.status,
        error=row.error, prompt=row.prompt, model_source=row.model_source,
    )
