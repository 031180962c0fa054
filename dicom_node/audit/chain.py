"""Checking the hash chain, and cutting its old end off while keeping it verifiable.

After a purge the chain starts at an anchor: the id and hash of the last deleted row.
The purge's own DATA_PURGED event names that anchor (``chain-anchor=<id>``), so an anchor
moved by hand is detected like any other change. The head (last row) and the anchor are
vouched for by a keyed hash updated with every append, so deleting the newest rows and
rewinding the head is detected too; a head found unsigned when rows are appended is
recorded (CHAIN_HEAD_UNSIGNED) rather than silently extended.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import Connection, delete, select

from dicom_node.audit import store
from dicom_node.audit.events import AuditEvent
from dicom_node.audit.trail import AuditTrail, Entry

VERIFY_BATCH = 5000


@dataclass(frozen=True)
class ChainProblem:
    """One place where the chain is broken."""

    row_id: int
    reason: str

    def __str__(self) -> str:
        return f"row {self.row_id}: {self.reason}"


@dataclass
class ChainReport:
    """What :func:`verify_chain` found."""

    rows_checked: int = 0
    first_id: int | None = None
    last_id: int | None = None
    problems: list[ChainProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_chain(trail: AuditTrail) -> ChainReport:
    """Recompute every row's keyed hash from the anchor to the head; return what broke.

    Detects altered rows (hash mismatch), deleted rows (a gap in the ids, rows missing
    after the last one, or a head the key does not vouch for), a moved anchor, and rows
    appended to such a head. Raises nothing for a broken chain: the report lists the
    problems, first row first.
    """
    report = ChainReport()
    with trail.connect() as connection:
        state = store.read_head(connection)
        assert state is not None  # the trail made it when it opened the store
        previous_hash, expected_id = state.anchor_hash, state.anchor_id + 1
        if state.anchor_id and not store.anchor_vouched(connection, state.anchor_id):
            report.problems.append(ChainProblem(
                state.anchor_id, "the chain anchor is not the one a purge recorded"))
        rows = connection.execution_options(yield_per=VERIFY_BATCH).execute(
            select(store.events).order_by(store.events.c.id))
        for row in rows.mappings():
            report.rows_checked += 1
            report.first_id = report.first_id or row["id"]
            report.last_id = row["id"]
            if row["id"] < expected_id:
                report.problems.append(ChainProblem(
                    row["id"], f"row lies before the chain anchor {state.anchor_id}"))
            elif row["id"] > expected_id:
                missing = _span(expected_id, row["id"] - 1)
                report.problems.append(ChainProblem(
                    expected_id, f"{missing} deleted (the next row is {row['id']})"))
            elif trail.keys.chain_hash(previous_hash, row) != row["hash"]:
                report.problems.append(ChainProblem(row["id"], "row was altered (hash mismatch)"))
            elif row["event"] == AuditEvent.CHAIN_HEAD_UNSIGNED.value:
                report.problems.append(ChainProblem(
                    row["id"], f"appended to a chain head not signed by the key: rows after "
                               f"row {row['id'] - 1} may have been deleted at the end of the chain"))
            previous_hash, expected_id = row["hash"], row["id"] + 1
    if not trail.keys.head_signed(*state):
        report.problems.append(ChainProblem(
            state.head_id, "chain head not signed by the key: rows after it may have been "
                           "deleted at the end of the chain"))
    if state.head_id >= expected_id:
        report.problems.append(ChainProblem(
            expected_id, f"{_span(expected_id, state.head_id)} deleted at the end of the chain"))
    elif state.head_id < expected_id - 1 or state.head_hash != previous_hash:
        report.problems.append(ChainProblem(
            state.head_id, "the chain head does not match the last row"))
    return report


def purge_before(trail: AuditTrail, cutoff: datetime, *, actor: str | None) -> int:
    """Delete the events recorded before ``cutoff``; return how many.

    Moves the chain's anchor to the last deleted row and records DATA_PURGED naming
    it, in the same transaction (also when nothing was old enough). Raises ``ValueError``
    for a naive ``cutoff``, :class:`AuditError` when the store stays locked.
    """
    if cutoff.tzinfo is None:
        raise ValueError("The cutoff must be timezone-aware.")
    cutoff = cutoff.astimezone(UTC)  # SQLite compares the stored UTC text
    when = f"{cutoff:%Y-%m-%d %H:%M:%S} UTC"

    def work(connection: Connection) -> int:
        last = connection.execute(
            select(store.events.c.id, store.events.c.hash)
            .where(store.events.c.time < cutoff)
            .order_by(store.events.c.id.desc()).limit(1)
        ).first()
        deleted, detail = 0, f"no audit rows recorded before {when}"
        if last is not None:
            deleted = connection.execute(
                delete(store.events).where(store.events.c.id <= last.id)).rowcount
            trail.move_anchor(connection, last.id, last.hash)
            detail = f"deleted {deleted} audit rows recorded before {when}; " \
                     f"{store.HEAD_KEYED}; {store.anchor_token(last.id)}"
        trail.append(connection, Entry(AuditEvent.DATA_PURGED, actor=actor, detail=detail))
        return deleted

    return trail.write(work)


def _span(first: int, last: int) -> str:
    return f"row {first}" if first == last else f"rows {first}-{last}"
