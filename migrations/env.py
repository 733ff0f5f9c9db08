"""Alembic environment for hippo.

`hippod.store.database.Store` drives Alembic in-process and passes its open connection in
`config.attributes["connection"]`, so no alembic.ini is needed and the migration runs inside the
store's own (write-locked) transaction. With `sqlalchemy.url` set instead, the `alembic` command
line works too (e.g. `alembic revision --autogenerate` against a scratch database).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from hippod.store.tables import Base

config = context.config
target_metadata = Base.metadata


def _configure(**kwargs) -> None:
    # SQLite cannot ALTER most things in place; batch mode rebuilds the table instead.
    context.configure(target_metadata=target_metadata, render_as_batch=True, **kwargs)


def run_migrations_offline() -> None:
    _configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def _run_on(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    try:
        with engine.begin() as connection:
            _run_on(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
