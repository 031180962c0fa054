"""Checking the hash chain, and cutting its old end off while keeping it verifiable.

After a purge the chain starts at an anchor: the id and hash of the last deleted row.
The purge's own DATA_PURGED event names that anchor (``chain-anchor=<id>``), so an anchor
moved by hand is detected like any other change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import Connection, delete, func, select, update

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


def anchor_token(anchor_id: int) -> str:
    """Return the text a DATA_PURGED detail carries to vouch for a chain anchor."""
    return f"chain-anchor={anchor_id}"


def verify_chain(trail: AuditTrail) -> ChainReport:
    """Recompute every row's keyed hash from the anchor to the head; return what broke.

    Detects altered rows (hash mismatch), deleted rows (a gap in the ids, or rows missing
    after the last one), a moved anchor and an altered head. Raises nothing for a broken
    chain: the report lists the problems, first row first.
    """
    report = ChainReport()
    with trail.connect() as connection:
        state = connection.execute(select(store.chain)).one()
        previous_hash, expected_id = state.anchor_hash, state.anchor_id + 1
        if state.anchor_id and not _anchor_vouched(connection, state.anchor_id):
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
            previous_hash, expected_id = row["hash"], row["id"] + 1
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
            connection.execute(update(store.chain).values(anchor_id=last.id,
                                                          anchor_hash=last.hash))
            detail = f"deleted {deleted} audit rows recorded before {when}; " \
                     f"{anchor_token(last.id)}"
        trail.append(connection, Entry(AuditEvent.DATA_PURGED, actor=actor, detail=detail))
        return deleted

    return trail.write(work)


def _anchor_vouched(connection: Connection, anchor_id: int) -> bool:
    return connection.execute(
        select(func.count()).select_from(store.events).where(
            store.events.c.event == AuditEvent.DATA_PURGED.value,
            store.events.c.id > anchor_id,
            store.events.c.detail.endswith(anchor_token(anchor_id)),
        )
    ).scalar_one() > 0


def _span(first: int, last: int) -> str:
    return f"row {first}" if first == last else f"rows {first}-{last}"
