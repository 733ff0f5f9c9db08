"""Store tests against real SQLite files: migrations, round trips, and two writers at once."""

from __future__ import annotations

import dataclasses
import sqlite3
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

from hippod.store.database import Store, migrations_config
from hippod.store.records import ModelRecord, PeerRecord, RequestRecord
from hippod.store.tables import Base

TABLES = {"models", "blobs", "loads", "peers", "requests"}


def _sql(db: Path, query: str) -> list[tuple]:
    """Look at the file with plain sqlite3, independent of the code under test."""
    with sqlite3.connect(db) as conn:
        return conn.execute(query).fetchall()


def _model(name: str = "smollm2:135m", **changes) -> ModelRecord:
    rec = ModelRecord(
        name=name,
        source="gguf:/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf",
        digest="ab" * 32,
        files=[
            {"name": "config.json", "sha256": "c1" * 32, "size": 700},
            {"name": "model.safetensors", "sha256": "d2" * 32, "size": 93_000_000},
        ],
        format="gguf",
        family="llama",
        parameters=134_515_008,
        parameter_size="135M",
        quantization="Q4_1",
        size=93_000_700,
        context_length=8192,
        details={"template": "chatml", "stop": ["<|im_end|>"], "nested": {"a": 1}},
    )
    return dataclasses.replace(rec, **changes)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "home" / "hippo.db"


@pytest.fixture
def store(db: Path):
    s = Store(db)
    yield s
    s.close()


def test_migrations_create_schema_at_head(store: Store, db: Path):
    assert db.exists()
    tables = {name for (name,) in _sql(db, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert TABLES | {"alembic_version"} <= tables
    head = ScriptDirectory.from_config(migrations_config()).get_current_head()
    assert head is not None
    assert _sql(db, "SELECT version_num FROM alembic_version") == [(head,)]
    assert ("ix_requests_time",) in _sql(db, "SELECT name FROM sqlite_master WHERE type='index'")
    assert store.integrity_ok()


def test_migrations_match_orm_tables(store: Store, db: Path):
    """A column added to tables.py without a migration shows up here as a difference."""
    engine = create_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_wal_mode_is_on(store: Store, db: Path):
    assert _sql(db, "PRAGMA journal_mode") == [("wal",)]


def test_reopen_keeps_data(db: Path):
    first = Store(db)
    first.put_model(_model())
    saved = first.get_model("smollm2:135m")
    load_id = first.start_load("smollm2:135m", "node-a", "request", bytes=1234, load_seconds=0.5)
    first.close()

    second = Store(db)  # a daemon restart: migrations run again and must change nothing
    try:
        assert second.list_models() == [saved]
        assert [l.id for l in second.open_loads()] == [load_id]
        assert _sql(db, "SELECT count(*) FROM alembic_version") == [(1,)]
    finally:
        second.close()


def test_model_round_trip(store: Store):
    assert store.get_model("smollm2:135m") is None
    before = datetime.now(timezone.utc)
    store.put_model(_model())
    got = store.get_model("smollm2:135m")
    assert got is not None
    expected = dataclasses.replace(_model(), created_at=got.created_at, modified_at=got.modified_at)
    assert got == expected  # every column, JSON lists and dicts included
    assert got.created_at.tzinfo is not None and got.created_at.utcoffset() == timedelta(0)
    assert before <= got.created_at <= datetime.now(timezone.utc)
    assert got.missing is False


def test_put_model_replaces_keeps_created_at_and_bumps_modified_at(store: Store):
    store.put_model(_model())
    first = store.get_model("smollm2:135m")
    store.put_model(_model(quantization="Q8_0", details={"x": [1, 2]}))
    second = store.get_model("smollm2:135m")
    assert second.quantization == "Q8_0" and second.details == {"x": [1, 2]}
    assert second.created_at == first.created_at
    assert second.modified_at > first.modified_at

    given = datetime(2024, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    store.put_model(_model(created_at=given))
    third = store.get_model("smollm2:135m")
    assert third.created_at == given  # same instant, returned as UTC
    assert third.created_at.utcoffset() == timedelta(0) and third.created_at.hour == 10


def test_naive_datetimes_are_refused(store: Store):
    with pytest.raises(Exception, match="naive datetime"):
        store.put_model(_model(created_at=datetime(2024, 1, 1)))
    assert store.get_model("smollm2:135m") is None


def test_list_delete_missing_and_blob_users(store: Store):
    store.put_model(_model("a:latest"))
    store.put_model(_model("b:latest", files=[{"name": "x.gguf", "sha256": "ee" * 32, "size": 1}]))
    store.put_model(_model("c:latest", digest="ff" * 32, files=[]))
    assert [m.name for m in store.list_models()] == ["c:latest", "b:latest", "a:latest"]

    assert store.models_using_blob("c1" * 32) == ["a:latest"]
    assert store.models_using_blob("ee" * 32) == ["b:latest"]
    assert store.models_using_blob("ab" * 32) == ["a:latest", "b:latest"]  # their manifest digest
    assert store.models_using_blob("00" * 32) == []

    assert store.set_missing("a:latest", True) is True
    assert store.get_model("a:latest").missing is True
    assert store.set_missing("a:latest", False) is True
    assert store.get_model("a:latest").missing is False
    assert store.set_missing("nope:latest", True) is False

    assert store.delete_model("b:latest") is True
    assert store.delete_model("b:latest") is False
    assert [m.name for m in store.list_models()] == ["c:latest", "a:latest"]


def test_blobs(store: Store, tmp_path: Path):
    sha = "12" * 32
    store.put_blob(sha, 42, tmp_path / f"sha256-{sha}")
    blob = store.get_blob(sha)
    assert (blob.sha256, blob.size, blob.path) == (sha, 42, str(tmp_path / f"sha256-{sha}"))
    store.put_blob(sha, 43, "/elsewhere")
    again = store.get_blob(sha)
    assert (again.size, again.path, again.created_at) == (43, "/elsewhere", blob.created_at)
    assert [b.sha256 for b in store.list_blobs()] == [sha]
    assert store.delete_blob(sha) is True
    assert store.delete_blob(sha) is False
    assert store.get_blob(sha) is None


def test_loads_and_close_open_loads(store: Store):
    done = store.start_load("a:latest", "node-a", "request", bytes=100, load_seconds=1.0)
    assert store.end_load(done, "evicted") is True
    ended = store.recent_loads()[0]
    assert ended.end_reason == "evicted" and ended.ended_at is not None
    assert store.end_load(done, "stopped") is False  # already ended: unchanged
    assert store.recent_loads()[0] == ended

    open_a = store.start_load("b:latest", "node-a", "request", bytes=200, load_seconds=2.0, pid=4242)
    open_b = store.start_load("big:70b", "node-a", "request", bytes=300, load_seconds=3.0, layers="0-14")
    assert [l.id for l in store.open_loads()] == [open_a, open_b]
    assert store.open_loads()[1].layers == "0-14" and store.open_loads()[0].pid == 4242

    assert store.close_open_loads("crashed") == 2
    assert store.open_loads() == []
    by_id = {l.id: l for l in store.recent_loads()}
    assert by_id[open_a].end_reason == by_id[open_b].end_reason == "crashed"
    assert by_id[done].end_reason == "evicted"  # a closed row is left alone
    assert store.close_open_loads("crashed") == 0

    assert [l.id for l in store.recent_loads(limit=2)] == [open_b, open_a]


def test_peers(store: Store):
    peer = PeerRecord(
        node_id="n1", name="studio", addresses=["192.168.1.5", "fe80::1"], port=11434,
        memory_total=64 << 30, memory_free=40 << 30, version="0.1.0", chip="Apple M2 Max",
        trusted=True, models=["smollm2:135m"],
    )
    store.put_peer(peer)
    got = store.get_peer("n1")
    assert dataclasses.replace(got, last_seen=None) == peer
    assert got.last_seen.tzinfo is not None

    later = datetime.now(timezone.utc) + timedelta(minutes=5)
    assert store.touch_peer("n1", later) is True
    assert store.get_peer("n1").last_seen == later
    assert store.touch_peer("ghost") is False

    store.put_peer(dataclasses.replace(peer, memory_free=1, trusted=False))
    assert [(p.node_id, p.memory_free, p.trusted) for p in store.list_peers()] == [("n1", 1, False)]
    assert store.delete_peer("n1") is True
    assert store.delete_peer("n1") is False
    assert store.list_peers() == []


def test_requests_recent_and_prune(store: Store):
    now = datetime.now(timezone.utc)
    ids = []
    for days in (10, 5, 1, 0):
        rec = RequestRecord(
            client="127.0.0.1", endpoint="/api/generate", status=200, model="smollm2:135m",
            prompt_tokens=5, completion_tokens=8, total_seconds=2.5, ttft_seconds=0.3,
            prompt="hi", model_source="copied from peer beta", time=now - timedelta(days=days),
        )
        ids.append(store.add_request(rec))
    error_id = store.add_request(RequestRecord(client="c", endpoint="/api/tags", status=500, error="boom"))

    recent = store.recent_requests()
    assert [r.id for r in recent] == [error_id, ids[3], ids[2], ids[1], ids[0]]
    assert recent[0].error == "boom" and recent[0].model is None and recent[0].time.tzinfo is not None
    assert recent[1].prompt == "hi" and recent[1].ttft_seconds == 0.3 and recent[1].completion_tokens == 8
    assert recent[0].model_source is None and recent[1].model_source == "copied from peer beta"
    assert [r.id for r in store.recent_requests(limit=2)] == [error_id, ids[3]]
    assert [r.id for r in store.recent_requests(since=now - timedelta(days=2))] == [error_id, ids[3], ids[2]]

    assert store.prune_requests(now - timedelta(days=3)) == 2
    assert {r.id for r in store.recent_requests()} == {error_id, ids[3], ids[2]}
    assert store.prune_requests(now - timedelta(days=3)) == 0


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from hippod.store.database import Store
    from hippod.store.records import ModelRecord, RequestRecord

    db, tag, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    print("ready", flush=True)
    sys.stdin.readline()  # start together, so the writers overlap
    store = Store(db)     # both may migrate a fresh file at the same moment
    for i in range(rounds):
        store.add_request(RequestRecord(client=tag, endpoint="/api/generate", status=200))
        load = store.start_load(f"{tag}:{i}", tag, "request", bytes=i, load_seconds=0.0)
        store.end_load(load, "stopped")
        model = ModelRecord(name=f"{tag}:latest", source="dir:/x", digest=str(i), files=[], format="mlx")
        store.put_model(model)  # reads the row, then writes it
        store.set_missing(f"{tag}:latest", i % 2 == 0)
    store.close()
    print("done", flush=True)
    """
)


@pytest.mark.timeout(120)
def test_two_processes_write_the_same_file(db: Path):
    """A daemon and a second process (e.g. a CLI) must not hit "database is locked"."""
    rounds = 60
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db), tag, str(rounds)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for tag in ("w1", "w2")
    ]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [p.communicate(timeout=100) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert out.strip() == "done"

    store = Store(db)
    try:
        clients = [r.client for r in store.recent_requests(limit=1000)]
        assert sorted(clients) == ["w1"] * rounds + ["w2"] * rounds
        assert len(store.recent_loads(limit=1000)) == 2 * rounds and store.open_loads() == []
        assert sorted(m.name for m in store.list_models()) == ["w1:latest", "w2:latest"]
        assert _sql(db, "SELECT count(*) FROM alembic_version") == [(1,)]
        assert store.integrity_ok()
    finally:
        store.close()


def test_upgrade_from_the_first_schema_keeps_rows_and_adds_model_source(db: Path):
    """A file a daemon of the previous release wrote (schema 0001, one audit row) is upgraded in
    place when opened: the old row stays, with no source recorded; new rows carry theirs."""
    from alembic import command

    db.parent.mkdir(parents=True)
    engine = create_engine(f"sqlite:///{db}")
    try:
        with engine.begin() as conn:
            command.upgrade(migrations_config(conn), "0001")
    finally:
        engine.dispose()
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO requests (time, client, endpoint, model, prompt_tokens, completion_tokens,"
                     " total_seconds, status) VALUES ('2026-01-02 03:04:05', 'old', '/api/chat', 'smol', 3, 4,"
                     " 1.5, 200)")
    assert "model_source" not in {c[1] for c in _sql(db, "PRAGMA table_info(requests)")}

    store = Store(db)
    try:
        head = ScriptDirectory.from_config(migrations_config()).get_current_head()
        assert _sql(db, "SELECT version_num FROM alembic_version") == [(head,)]
        assert "model_source" in {c[1] for c in _sql(db, "PRAGMA table_info(requests)")}
        [old] = store.recent_requests()
        assert (old.client, old.model, old.completion_tokens, old.model_source) == ("old", "smol", 4, None)
        store.add_request(RequestRecord(client="new", endpoint="/api/chat", status=200,
                                        model_source="copied from peer beta"))
        assert [r.model_source for r in store.recent_requests()] == ["copied from peer beta", None]
        assert ("ix_requests_time",) in _sql(db, "SELECT name FROM sqlite_master WHERE type='index'")
    finally:
        store.close()


def test_model_reads_come_from_memory_yet_every_write_is_seen(db: Path, monkeypatch):
    """Requests look their model up on every call: reads are served from memory, a write through
    the same Store is seen at once, and one by another process sharing the file once the short
    cache time has passed."""
    from hippod.store import database

    first = Store(db)
    try:
        first.put_model(_model(size=1))
        assert first.get_model("smollm2:135m").size == 1
        assert first.get_model("smollm2:135m") is first.get_model("smollm2:135m")  # no new read
        first.put_model(_model(size=2))
        assert first.get_model("smollm2:135m").size == 2
        first.set_missing("smollm2:135m", True)
        assert first.get_model("smollm2:135m").missing
        assert first.get_model("nosuch:latest") is None
        first.put_model(_model("nosuch:latest"))
        assert first.get_model("nosuch:latest") is not None
        first.delete_model("nosuch:latest")
        assert first.get_model("nosuch:latest") is None

        with Store(db) as other:  # another process on the same file
            other.put_model(_model(size=3))
        monkeypatch.setattr(database, "MODEL_CACHE_SECONDS", 0.0)
        assert first.get_model("smollm2:135m").size == 3
    finally:
        first.close()
