"""The audit database: its tables, its engine, and the write lock that serializes appends.

Three tables: ``audit_events`` (the chained rows), ``audit_pseudonyms`` (keyed hash of a
patient's identifiers → random pseudonym) and ``audit_chain`` (one row: the chain's head,
the anchor left by the last purge, and the keyed hash vouching for both). Writers take an exclusive lock for the whole
transaction: ``BEGIN IMMEDIATE`` on SQLite, ``pg_advisory_xact_lock`` on PostgreSQL.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import (
    Column,
    Connection,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.sql import Executable

from dicom_node import migrations
from dicom_node.audit.events import AuditEvent
from dicom_node.db import UTCDateTime, make_engine

T = TypeVar("T")

ADVISORY_LOCK_KEY = 0x6175646974  # "audit"

metadata = MetaData()

events = Table(
    "audit_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("time", UTCDateTime(), nullable=False, index=True),
    Column("event", String(32), nullable=False, index=True),
    Column("event_id", String(16), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("actor", String(128), index=True),
    Column("remote", String(128)),
    Column("pseudonym", String(40), index=True),
    Column("study_uid", String(64), index=True),
    Column("series_uid", String(64)),
    Column("sop_uid", String(64)),
    Column("job_id", Integer),
    Column("detail", Text, nullable=False, default=""),
    Column("hash", String(64), nullable=False),
)

pseudonyms = Table(
    "audit_pseudonyms", metadata,
    Column("key", String(64), primary_key=True),
    Column("pseudonym", String(40), nullable=False, unique=True),
    Column("created_at", UTCDateTime(), nullable=False),
)

chain = Table(
    "audit_chain", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("head_id", Integer, nullable=False),
    Column("head_hash", String(64), nullable=False),
    Column("anchor_id", Integer, nullable=False),
    Column("anchor_hash", String(64), nullable=False),
    # NULL from the upgrade that adds it until the trail keys the head, and in a store whose
    # head_mac was removed
    Column("head_mac", String(64)),
)

export_cursors = Table(
    "audit_export_cursors", metadata,
    # How far each exporter (the ATNA syslog export) has sent the events: the last id taken.
    Column("exporter", String(32), primary_key=True),
    Column("last_id", Integer, nullable=False),
)

GENESIS_HASH = "0" * 64
"""Where chains made before the head was keyed start; new chains start from a keyed hash."""
HEAD_KEYED = "head keyed"
"""What a DATA_PURGED detail carries, before its anchor token, when the purged store's head
was keyed."""


class ChainHead(NamedTuple):
    """The ``audit_chain`` row: the last row, the purge anchor, and the head's keyed hash."""

    head_id: int
    head_hash: str
    anchor_id: int
    anchor_hash: str
    head_mac: str | None


def make_audit_engine(url: str) -> Engine:
    """Return an engine for the audit store at ``url`` (its schema: :mod:`dicom_node.migrations`).

    SQLite files get WAL with ``synchronous=NORMAL``: a commit writes the WAL but does
    not fsync it, so a committed event survives a crash or kill of the node's process
    but not necessarily an OS crash or a power cut, which can roll back the most recent
    commits (head and rows together: the chain still verifies, without those events).
    Transactions of a :func:`writer_connection` start with ``BEGIN IMMEDIATE``. A new
    SQLite file is readable by its owner only (its -wal and -shm files inherit that).
    """
    engine = make_engine(url)
    if engine.dialect.name == "sqlite":
        _create_private_file(engine.url.database)

        @event.listens_for(engine, "connect")
        def _audit_pragmas(dbapi_connection: sqlite3.Connection, _record: object) -> None:
            dbapi_connection.execute("PRAGMA synchronous=NORMAL")
            dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself

        @event.listens_for(engine, "begin")
        def _begin(connection: Connection) -> None:
            immediate = connection.get_execution_options().get("audit_write", False)
            connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    elif engine.dialect.name == "postgresql":
        @event.listens_for(engine, "connect", insert=True)
        def _utc_session(dbapi_connection: Any, _record: object) -> None:
            autocommit = dbapi_connection.autocommit
            dbapi_connection.autocommit = True
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SET TIME ZONE 'UTC'")  # summaries by day are UTC days
            dbapi_connection.autocommit = autocommit

    return engine


def upgrade_schema(engine: Engine) -> migrations.SchemaState:
    """Bring the audit store to the newest schema revision under its write lock; return where
    it stood before. A head the upgrade leaves unkeyed is keyed by the trail when it next
    opens the store. Raises :class:`SchemaVersionError` for a store newer than this code."""
    with writer_connection(engine) as connection:
        return run_locked(connection, lambda locked: migrations.upgrade(locked, migrations.AUDIT))


def read_head(connection: Connection) -> ChainHead | None:
    """Return the ``audit_chain`` row, or None in a store not yet initialised."""
    row = connection.execute(select(*(chain.c[name] for name in ChainHead._fields))).first()
    return ChainHead(*row) if row else None


def anchor_token(anchor_id: int) -> str:
    """Return the text a DATA_PURGED detail ends with to vouch for a chain anchor."""
    return f"chain-anchor={anchor_id}"


def anchor_vouched(connection: Connection, anchor_id: int, *, keyed: bool = False) -> bool:
    """Return whether a DATA_PURGED row after the anchor names it (with ``keyed``: as the
    anchor of a store whose head was keyed)."""
    token = f"{HEAD_KEYED}; {anchor_token(anchor_id)}" if keyed else anchor_token(anchor_id)
    return connection.execute(
        select(func.count()).select_from(events).where(
            events.c.event == AuditEvent.DATA_PURGED.value, events.c.id > anchor_id,
            events.c.detail.endswith(token))
    ).scalar_one() > 0


def head_was_keyed(connection: Connection, head: ChainHead) -> bool:
    """Return whether the chain itself shows that its head was keyed once: it starts from a
    keyed genesis, its anchor was left by a purge of a keyed store, or it holds the event of
    its keying. Such a store lacking ``head_mac`` had the column removed."""
    if head.anchor_id == 0 and head.anchor_hash != GENESIS_HASH:
        return True
    if head.anchor_id and anchor_vouched(connection, head.anchor_id, keyed=True):
        return True
    return connection.execute(select(events.c.id).where(
        events.c.event == AuditEvent.CHAIN_HEAD_KEYED.value).limit(1)).first() is not None


def writer_connection(engine: Engine) -> Connection:
    """Return a new connection for :func:`run_locked`; the caller closes it."""
    return engine.connect().execution_options(audit_write=True)


def run_locked(connection: Connection, work: Callable[[Connection], T]) -> T:
    """Run ``work`` in one transaction of a :func:`writer_connection` holding the store's
    write lock; return its result."""
    with connection.begin():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                               {"key": ADVISORY_LOCK_KEY})
        return work(connection)


class ChainStatements:
    """The statements of an append, compiled once for a dialect, run on the driver's cursor.

    An append is on the SCP's path once per received instance; passing SQLAlchemy's
    statement execution by (its events, execution contexts and result objects) makes it
    several times cheaper. The transaction stays the SQLAlchemy connection's.
    """

    def __init__(self, dialect: Dialect) -> None:
        self._head = _DriverStatement(
            select(*(chain.c[name] for name in ChainHead._fields)), dialect)
        self._insert = _DriverStatement(insert(events), dialect)
        self._move = _DriverStatement(update(chain).values(
            head_id=bindparam("new_id"), head_hash=bindparam("new_hash"),
            head_mac=bindparam("new_mac")), dialect)

    def head(self, connection: Connection) -> ChainHead:
        """Return the chain's head (the genesis when empty), anchor and head hash."""
        cursor = connection.connection.cursor()
        try:
            cursor.execute(self._head.sql)
            head = ChainHead(*cursor.fetchone())
        finally:
            cursor.close()
        return head

    def add(self, connection: Connection, rows: Sequence[Mapping[str, Any]], head_mac: str) -> None:
        """Insert ``rows`` (complete event rows, in chain order); make the last the head,
        vouched for by ``head_mac``."""
        last = rows[-1]
        cursor = connection.connection.cursor()
        try:
            cursor.executemany(self._insert.sql, [self._insert.parameters(row) for row in rows])
            cursor.execute(self._move.sql, self._move.parameters(
                {"new_id": last["id"], "new_hash": last["hash"], "new_mac": head_mac}))
        finally:
            cursor.close()


class _DriverStatement:
    """A statement compiled for a dialect: its SQL, and how to bind values as the driver wants."""

    def __init__(self, statement: Executable, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql = compiled.string
        self._names = compiled.positiontup  # None where the driver takes named parameters
        self._processors = {
            name: processor for name, bind in compiled.binds.items()
            if (processor := bind.type.dialect_impl(dialect).bind_processor(dialect))}

    def parameters(self, values: Mapping[str, Any]) -> Sequence[Any] | Mapping[str, Any]:
        """Return ``values`` converted for the driver (e.g. datetimes to text on SQLite)."""
        bound = {**values, **{name: process(values[name])
                              for name, process in self._processors.items()}}
        return bound if self._names is None else [bound[name] for name in self._names]


def _create_private_file(database: str | None) -> None:
    if not database or database == ":memory:":
        return
    try:
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
