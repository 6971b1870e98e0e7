"""Opening the database and keeping its schema current.

SQLite in the working directory by default, as JupyterHub does; any SQLAlchemy
URL works. The schema carries a version number so that later releases can
migrate it in place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import typing as t

from sqlalchemy import create_engine, event, make_url, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from .models import Base, SchemaVersion

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

# version -> function upgrading a database from that version to the next
MIGRATIONS: dict[int, t.Callable[[Session], None]] = {}


class SchemaError(RuntimeError):
    """The database was written by a newer release, or a migration is missing."""


class Store:
    """Owns the engine and hands out sessions.

    The service runs as one process, and SQLite writes take well under a
    millisecond with WAL, so sessions are used directly on the event loop, as
    JupyterHub does with its own database.

    TODO: an ACL-mode submission runs about eleven statements on the loop
    (several ms under load, per the benchmark); moving ledger steps to one
    dedicated thread would keep the loop free for other requests.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict[str, t.Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False}
            _private_sqlite_file(url)
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def upgrade(self) -> None:
        """Create the schema on first start, migrate an older one, refuse newer."""
        Base.metadata.create_all(self.engine)
        with self.session() as db:
            row = db.scalars(select(SchemaVersion)).first()
            if row is None:
                db.add(SchemaVersion(version=SCHEMA_VERSION))
                db.commit()
                return
            if row.version > SCHEMA_VERSION:
                raise SchemaError(
                    f"database {self._safe_url()} has schema {row.version}, newer "
                    f"than this release understands ({SCHEMA_VERSION})"
                )
            while row.version < SCHEMA_VERSION:
                step = MIGRATIONS.get(row.version)
                if step is None:
                    raise SchemaError(f"no migration from schema {row.version}")
                log.info(
                    "Migrating database schema %s -> %s", row.version, row.version + 1
                )
                step(db)
                row.version += 1
                db.commit()

    @contextlib.contextmanager
    def session(self) -> t.Iterator[Session]:
        db = self._sessions()
        try:
            yield db
        except BaseException:
            db.rollback()
            raise
        finally:
            db.close()

    def _safe_url(self) -> str:
        """The URL without its password, for messages."""
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(connection: t.Any, _record: t.Any) -> None:
    # WAL keeps readers off writers' backs; foreign keys make holds cascade
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _private_sqlite_file(url: str) -> None:
    """Create the SQLite file readable by its owner only.

    It lists users' identities, paths and tasks; SQLite's journal files take
    the same permissions as the database.
    """
    path = make_url(url).database
    if not path or path == ":memory:":
        return
    if not os.path.exists(path):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    os.chmod(path, 0o600)
