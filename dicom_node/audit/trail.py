"""The audit trail: pseudonyms for patients and chained, serialized appends of events."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, delete, insert, select, update
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

from dicom_node import migrations
from dicom_node.audit import store
from dicom_node.audit.events import AuditEvent, Outcome
from dicom_node.audit.keys import KEY_FILE, AuditKeys, load_or_create_secret
from dicom_node.config import redact_url
from dicom_node.errors import AuditError
from dicom_node.metrics import STAGE_SECONDS

if TYPE_CHECKING:
    from dicom_node.config import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")

WRITE_ATTEMPTS = 6
FIRST_BACKOFF_S = 0.05
KEYED_HEAD_DETAIL = "chain head keyed from now on: rows deleted at the end are detected"
UNSIGNED_HEAD_DETAIL = ("the chain head before this row was not signed by the key: "
                        "rows may have been deleted at the end of the chain")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One event as a caller describes it, before it gets its id, time and hash."""

    event: AuditEvent
    outcome: Outcome = Outcome.SUCCESS
    actor: str | None = None
    remote: str | None = None
    pseudonym: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    job_id: int | None = None
    detail: str = ""


@dataclasses.dataclass
class _Waiting:
    """An entry waiting for the group commit that appends it."""

    entry: Entry
    committed: bool = False
    error: BaseException | None = None


class AuditTrail:
    """The node's audit store; one per process, shared by its threads.

    Concurrent :meth:`record` calls are group-committed: while one thread's
    transaction runs, the entries of the others gather and the next transaction
    appends them all. Every caller still returns only once its own entry is committed.
    Writes go through one connection that the process holds open between them.
    """

    def __init__(self, url: str, secret: bytes) -> None:
        """Open (creating when needed) the store at ``url``, keyed by ``secret``.

        Raises :class:`AuditError` when the store cannot be opened or created,
        :class:`SchemaVersionError` when its schema is of another revision.
        """
        self._keys = AuditKeys(secret)
        self._thread_lock = threading.Lock()
        self._waiting: list[_Waiting] = []
        self._waiting_lock = threading.Lock()
        self._pid = os.getpid()
        self._writer: Connection | None = None
        try:
            self.engine = store.make_audit_engine(url)
            self._statements = store.ChainStatements(self.engine.dialect)
            with store.writer_connection(self.engine) as connection:
                store.run_locked(connection, self._open_chain)
        except (SQLAlchemyError, OSError) as exc:
            reason = exc.orig if isinstance(exc, DBAPIError) else exc  # no SQL, no parameters
            raise AuditError(f"cannot open the audit store: {reason}") from exc

    @classmethod
    def from_settings(cls, settings: Settings) -> AuditTrail:
        """Return the trail the settings describe; a no-op trail when auditing is disabled.

        The secret is :func:`audit_secret`'s. Raises :class:`AuditError` when the key or the
        store cannot be opened.
        """
        if not settings.audit.enabled:
            return DisabledAuditTrail()
        return cls(settings.audit_database_url, audit_secret(settings))

    @property
    def _store_name(self) -> str:
        """The store's URL for a log line, its password and secret query values hidden."""
        return redact_url(self.engine.url.render_as_string(hide_password=False))

    @property
    def keys(self) -> AuditKeys:
        """The keyed hashes of this trail: patient keys and chain hashes."""
        return self._keys

    def pseudonym(self, patient_id: str | None, issuer: str | None = None) -> str | None:
        """Return the patient's pseudonym, creating it on first sight; None without an ID.

        Raises :class:`AuditError` when the store stays unwritable.
        """
        if not patient_id or not patient_id.strip():
            return None
        key = self._keys.patient_key(patient_id, issuer)
        with STAGE_SECONDS.labels("audit").time():
            found = self._lookup(key)
            return found or self.write(lambda connection: _get_or_create(connection, key))

    def lookup_pseudonym(self, patient_id: str, issuer: str | None = None) -> str | None:
        """Return the patient's pseudonym without creating one; None when unknown or erased."""
        if not patient_id.strip():
            return None
        return self._lookup(self._keys.patient_key(patient_id, issuer))

    def forget_pseudonym(self, pseudonym: str) -> bool:
        """Delete the mapping to ``pseudonym``, unlinking every event from the person.

        Returns whether a mapping was deleted.
        """
        statement = delete(store.pseudonyms).where(store.pseudonyms.c.pseudonym == pseudonym)
        return self.write(lambda connection: connection.execute(statement).rowcount > 0)

    def record(self, event: AuditEvent | str, *, outcome: Outcome | str = Outcome.SUCCESS,
               actor: str | None = None, remote: str | None = None,
               pseudonym: str | None = None, study_uid: str | None = None,
               series_uid: str | None = None, sop_uid: str | None = None,
               job_id: int | None = None, detail: str = "") -> None:
        """Append one event to the chain.

        ``detail`` must be free of patient data; pass a pseudonym, never a patient ID.
        Raises ``ValueError`` for an unknown event or outcome, :class:`AuditError` when
        the store stays unwritable after retries.
        """
        entry = Entry(AuditEvent(event), Outcome(outcome), actor=actor, remote=remote,
                      pseudonym=pseudonym, study_uid=study_uid, series_uid=series_uid,
                      sop_uid=sop_uid, job_id=job_id, detail=detail)
        self._after_fork()
        waiting = _Waiting(entry)
        with STAGE_SECONDS.labels("audit").time():
            with self._waiting_lock:
                self._waiting.append(waiting)
            with self._thread_lock:
                if not waiting.committed and waiting.error is None:
                    self._commit_waiting()
        if waiting.error is not None:
            raise waiting.error

    def has_event(self, event: AuditEvent | str, *, job_id: int, sop_uid: str) -> bool:
        """Return whether ``event`` was recorded for this job and instance.

        The node's own recovery check after a crash, not an administrator's query:
        it is not itself audited.
        """
        query = (select(store.events.c.id)
                 .where(store.events.c.event == AuditEvent(event).value,
                        store.events.c.job_id == job_id, store.events.c.sop_uid == sop_uid)
                 .limit(1))
        with self.connect() as connection:
            return connection.execute(query).first() is not None

    def append(self, connection: Connection, *entries: Entry) -> int:
        """Append ``entries`` in order inside a transaction begun by :meth:`write`, and key
        the new head; return the row id of the last.

        A head the key does not vouch for (rows deleted at the end and the head rewound,
        or the head edited) is not silently extended: CHAIN_HEAD_UNSIGNED goes first.
        """
        head = self._statements.head(connection)
        if not self._keys.head_signed(*head):
            logger.error("the audit chain head (row %d) is not signed by the audit key: rows "
                         "may have been deleted at the end of the chain; recorded as %s",
                         head.head_id, AuditEvent.CHAIN_HEAD_UNSIGNED.value)
            entries = (Entry(AuditEvent.CHAIN_HEAD_UNSIGNED, Outcome.MAJOR_FAILURE,
                             detail=UNSIGNED_HEAD_DETAIL), *entries)
        last_id, last_hash = head.head_id, head.head_hash
        rows = []
        for entry in entries:
            row = {**vars(entry), "id": last_id + 1, "time": datetime.now(UTC),
                   "event": entry.event.value, "outcome": entry.outcome.value,
                   "event_id": entry.event.dicom_event_id.value}
            row["hash"] = self._keys.chain_hash(last_hash, row)
            last_id, last_hash = row["id"], row["hash"]
            rows.append(row)
        self._statements.add(connection, rows, self._keys.head_mac(
            last_id, last_hash, head.anchor_id, head.anchor_hash))
        return last_id

    def move_anchor(self, connection: Connection, anchor_id: int, anchor_hash: str) -> None:
        """Make row ``anchor_id`` (hash ``anchor_hash``) the chain's anchor inside a
        transaction begun by :meth:`write`; the head stays keyed only if it was."""
        head = self._statements.head(connection)
        head_mac = head.head_mac
        if self._keys.head_signed(*head):
            head_mac = self._keys.head_mac(head.head_id, head.head_hash, anchor_id, anchor_hash)
        connection.execute(update(store.chain).values(
            anchor_id=anchor_id, anchor_hash=anchor_hash, head_mac=head_mac))

    def _open_chain(self, connection: Connection) -> None:
        """Check the schema (an empty store is created at the newest revision) and create the
        chain's first state; key a head that the upgrade adding ``head_mac`` left unkeyed
        (recording CHAIN_HEAD_KEYED), but not one whose ``head_mac`` was removed: that head
        stays unsigned, and verification fails."""
        migrations.prepare(connection, migrations.AUDIT)
        head = store.read_head(connection)
        if head is None:
            genesis = self._keys.genesis_hash()
            connection.execute(insert(store.chain).values(
                id=1, head_id=0, head_hash=genesis, anchor_id=0, anchor_hash=genesis,
                head_mac=self._keys.head_mac(0, genesis, 0, genesis)))
        elif head.head_mac is not None:
            return
        elif store.head_was_keyed(connection, head):
            logger.error("the audit chain head's keyed hash (audit_chain.head_mac) was removed "
                         "from %s; the head stays unsigned and audit verify fails",
                         self._store_name)
        else:
            connection.execute(update(store.chain).values(head_mac=self._keys.head_mac(
                head.head_id, head.head_hash, head.anchor_id, head.anchor_hash)))
            self.append(connection, Entry(AuditEvent.CHAIN_HEAD_KEYED, detail=KEYED_HEAD_DETAIL))
            logger.warning("audit chain head (row %d) keyed from now on: rows deleted at the "
                           "end of the chain are detected by audit verify", head.head_id)

    def write(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in a transaction that holds the write lock; return its result.

        Retries while the store is locked or unreachable; raises :class:`AuditError`
        when that persists.
        """
        self._after_fork()
        with self._thread_lock:
            return self._write_with_retries(work)

    def _commit_waiting(self) -> None:
        """Append every waiting entry in one transaction (the caller holds the thread lock)."""
        with self._waiting_lock:
            batch, self._waiting = self._waiting, []
        try:
            self._write_with_retries(lambda connection: self.append(connection, *(w.entry for w in batch)))
        except BaseException as exc:  # every caller in the batch gets the failure
            for waiting in batch:
                waiting.error = exc
        else:
            for waiting in batch:
                waiting.committed = True

    def _write_with_retries(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` through the held writer connection (the caller holds the thread lock)."""
        attempt = 1
        while True:
            try:
                if self._writer is None:
                    self._writer = store.writer_connection(self.engine)
                return store.run_locked(self._writer, work)
            except OperationalError as exc:
                self._drop_writer()  # the next attempt starts on a fresh connection
                if attempt == WRITE_ATTEMPTS:
                    logger.error("audit store %s unwritable after %d attempts: %s",
                                 self._store_name, attempt, exc.orig)
                    raise AuditError("the audit store cannot be written") from exc
                logger.warning("audit store busy (attempt %d): %s", attempt, exc.orig)
                time.sleep(FIRST_BACKOFF_S * 2 ** (attempt - 1))
                attempt += 1

    def connect(self) -> Connection:
        """Return a connection for reading; the caller closes it."""
        self._after_fork()
        return self.engine.connect()

    def close(self) -> None:
        """Release the store's connections."""
        with self._thread_lock:
            self._drop_writer()
        self.engine.dispose()

    def _drop_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _lookup(self, key: str) -> str | None:
        with self.connect() as connection:
            return _pseudonym_of(connection, key)

    def _after_fork(self) -> None:
        if os.getpid() != self._pid:
            self.engine.dispose(close=False)  # the parent's connections stay the parent's
            self._writer = None
            self._pid = os.getpid()
            self._thread_lock = threading.Lock()
            self._waiting, self._waiting_lock = [], threading.Lock()


class DisabledAuditTrail(AuditTrail):
    """A trail that records nothing; only to measure what auditing costs."""

    def __init__(self) -> None:  # no store, no key
        pass

    def pseudonym(self, patient_id: str | None, issuer: str | None = None) -> str | None:
        return None

    def record(self, event: AuditEvent | str, **fields: Any) -> None:
        pass

    def has_event(self, event: AuditEvent | str, *, job_id: int, sop_uid: str) -> bool:
        return True

    def close(self) -> None:
        pass


def audit_secret(settings: Settings) -> bytes:
    """Return ``audit.secret``, else the key in ``audit.key_file``, else the key in the state
    folder (generated there on first use; a configured key file is never generated).

    Raises :class:`AuditError` when the key file is missing, empty or unreadable.
    """
    if settings.audit.secret is not None:
        return settings.audit.secret.get_secret_value().encode()
    if settings.audit.key_file is not None:
        return load_or_create_secret(settings.audit.key_file, create=False)
    return load_or_create_secret(settings.state_dir / KEY_FILE, create=True)


def _pseudonym_of(connection: Connection, key: str) -> str | None:
    return connection.execute(
        select(store.pseudonyms.c.pseudonym).where(store.pseudonyms.c.key == key)
    ).scalar()


def _get_or_create(connection: Connection, key: str) -> str:
    found = _pseudonym_of(connection, key)
    if found:
        return found
    pseudonym = uuid.uuid4().hex
    connection.execute(insert(store.pseudonyms).values(key=key, pseudonym=pseudonym,
                                                       created_at=datetime.now(UTC)))
    return pseudonym
