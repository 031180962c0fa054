"""Node state: instances received, jobs analysing them, and the outbox of task messages.

SQLite (WAL) by default, any SQLAlchemy URL otherwise. Sessions come from
:class:`NodeDatabase`; every write is one short transaction.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import (
    DateTime,
    Enum,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from dicom_node import migrations

logger = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps, also on SQLite (which stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in {JobStatus.DONE, JobStatus.SKIPPED, JobStatus.FAILED}


class InstanceVerdict(enum.StrEnum):
    """What became of one instance inside its job (not a pipeline's gate verdict, which says
    whether an image may be analysed)."""

    ANALYSED = "analysed"
    SKIPPED = "skipped"
    FAILED = "failed"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    RETRYING = "retrying"
    DELIVERED = "delivered"
    #: Stored by a destination that commits storage; its commitment not yet confirmed.
    STORED = "stored"
    #: Stored, and its storage committed by the destination.
    COMMITTED = "committed"
    DEAD = "dead"
    #: Kept, not sent: its route is in shadow mode; ``jobs release`` makes it pending.
    HELD = "held"

    @property
    def finished(self) -> bool:
        """Whether the node does nothing more with it on its own (only an administrator's
        resend or release does): delivered, committed, dead-lettered or held."""
        return self in {DeliveryStatus.DELIVERED, DeliveryStatus.COMMITTED, DeliveryStatus.DEAD,
                        DeliveryStatus.HELD}


def _enum(cls: type[enum.StrEnum]) -> Enum:
    return Enum(cls, values_callable=lambda members: [m.value for m in members],
                native_enum=False, length=16)


class Instance(Base):
    """One stored instance in the spool; ``job_id`` is set once a job takes it."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer)
    calling_ae: Mapped[str] = mapped_column(String(16))
    patient_pseudonym: Mapped[str | None] = mapped_column(String(40), index=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    verdict: Mapped[InstanceVerdict | None] = mapped_column(_enum(InstanceVerdict))
    verdict_reason: Mapped[str | None] = mapped_column(Text)


class Job(Base):
    """The analysis of the instances of one study that arrived together."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus), default=JobStatus.QUEUED,
                                              index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    worker: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    reason: Mapped[str | None] = mapped_column(Text)


class Delivery(Base):
    """One result object to send to one destination."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("destination", "sop_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    source_sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    destination: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(16))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    status: Mapped[DeliveryStatus] = mapped_column(_enum(DeliveryStatus),
                                                   default=DeliveryStatus.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    #: The storage commitment request (N-ACTION) that asked for this object last, when it was
    #: made, and how many requests asked for it since it was queued.
    commit_transaction_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    commit_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    commit_requests: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class FeedbackVerdict(enum.StrEnum):
    """A radiologist's verdict on one finding (see :mod:`dicom_node.feedback`)."""

    AGREE = "agree"
    DISAGREE = "disagree"


class Feedback(Base):
    """One user's verdict on one finding of one analysed instance; kept when retention deletes its
    job (``job_id`` then null), deleted with the instance's subject (GDPR erasure)."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    finding: Mapped[str] = mapped_column(String(64))
    verdict: Mapped[FeedbackVerdict] = mapped_column(_enum(FeedbackVerdict))
    reason: Mapped[str | None] = mapped_column(Text)
    user: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class Task(enum.StrEnum):
    """What an outbox message asks a worker to do with its target: the one vocabulary of
    ``outbox.task`` (the target is a job, a delivery or, to notify, an instance id)."""

    ANALYZE = "analyze"
    DELIVER = "deliver"
    NOTIFY_FLAGGED = "notify-flagged"
    NOTIFY_DEAD_LETTERED = "notify-dead-lettered"


class OutboxMessage(Base):
    """A task message committed with the row it is about, published afterwards."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task: Mapped[str] = mapped_column(String(64))
    target_id: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime())
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)


def queue_message(session: Session, task: Task, target_id: int, *,
                  not_before: datetime | None = None) -> None:
    """Add an outbox message in the caller's transaction; it is published after commit (at once
    where the database publishes at commit, see :meth:`NodeDatabase.publish_at_commit`)."""
    message = OutboxMessage(task=task, target_id=target_id, not_before=not_before)
    session.add(message)
    session.info.setdefault(QUEUED_MESSAGES, []).append(message)


#: Where a session keeps the outbox messages queued in its transaction.
QUEUED_MESSAGES = "dicom_node.queued_messages"


SCHEMA_LOCK_KEY = 0x6E6F6465  # "node"


def make_engine(url: str, busy_timeout_s: float = 60.0) -> Engine:
    """Return an engine for ``url``; SQLite files get WAL, full sync, secure delete and a busy
    timeout, and a missing folder of theirs is made private (0700)."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        engine = create_engine(url, connect_args={"timeout": busy_timeout_s, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA secure_delete=ON")  # deleted rows leave no UIDs in free space
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


@contextmanager
def schema_transaction(engine: Engine) -> Iterator[Connection]:
    """Yield a connection in a transaction holding the node database's schema lock (``BEGIN
    IMMEDIATE`` on SQLite, an advisory lock on PostgreSQL), committed when the block ends."""
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        elif engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        yield connection
        connection.commit()


def upgrade_schema(engine: Engine) -> migrations.SchemaState:
    """Bring the node database to the newest schema revision; return where it stood
    before. Raises :class:`SchemaVersionError` for a newer one."""
    with schema_transaction(engine) as connection:
        return migrations.upgrade(connection, migrations.NODE)


class NodeDatabase:
    """The node state database: its schema checked once, and transactional sessions."""

    def __init__(self, url: str, *, busy_timeout_s: float = 60.0) -> None:
        """``busy_timeout_s``: how long a statement waits for an SQLite file another process locked.

        An empty database is created at the newest schema revision. Raises
        :class:`SchemaVersionError` for one at another revision (``dicom-node db upgrade``).
        """
        self.url = url
        self.engine = make_engine(url, busy_timeout_s)
        try:
            with schema_transaction(self.engine) as connection:
                migrations.prepare(connection, migrations.NODE)
        except BaseException:
            self.engine.dispose()
            raise
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._publish: Callable[[OutboxMessage], None] | None = None

    def publish_at_commit(self, publish: Callable[[OutboxMessage], None]) -> None:
        """Publish each outbox message due now as soon as the transaction that queued it commits
        (a worker's fast path: its next task need not wait for the scheduler's tick). A message the
        broker does not take stays in the outbox for the scheduler; one published twice is harmless."""
        self._publish = publish

    @contextmanager
    def session(self) -> Iterator[Session]:
        """Yield a session committed on success and rolled back on error."""
        with self._sessions() as session:
            with session.begin():
                yield session
            queued = session.info.pop(QUEUED_MESSAGES, [])
        if self._publish is not None and queued:
            self._publish_now([m for m in queued if m.not_before is None or m.not_before <= utcnow()])

    def _publish_now(self, messages: list[OutboxMessage]) -> None:
        assert self._publish is not None
        for message in messages:
            try:
                self._publish(message)
            except Exception as exc:  # the scheduler publishes it later
                logger.info("Outbox message %d left to the scheduler: %s", message.id, type(exc).__name__)
                continue
            with self._sessions() as session, session.begin():
                session.execute(update(OutboxMessage).where(OutboxMessage.id == message.id,
                                                            OutboxMessage.published_at.is_(None))
                                .values(published_at=utcnow()))

    def truncate_log(self) -> None:
        """Copy an SQLite write-ahead log into the database and empty it (waiting for readers
        up to the busy timeout); nothing for other databases."""
        if self.engine.dialect.name == "sqlite":
            with self.engine.connect() as connection:
                connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")

    def dispose(self) -> None:
        self.engine.dispose()
