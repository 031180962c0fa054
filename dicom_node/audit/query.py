"""Reading the trail: filtered lists, single events, summaries. Every read is itself audited.

A patient is looked up by the pseudonym of the given ID (never created, never stored in
clear); an unknown or erased patient matches nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import Select, case, false, func, select

from dicom_node.audit import store
from dicom_node.audit.events import AuditEvent, Outcome
from dicom_node.audit.trail import AuditTrail

SummaryKey = Literal["day", "event", "ae"]
Row = dict[str, Any]


@dataclass(frozen=True)
class EventFilter:
    """Which events a query returns; every criterion given must hold."""

    since: datetime | None = None
    until: datetime | None = None
    events: tuple[AuditEvent, ...] = ()
    ae: str | None = None
    study_uid: str | None = None
    patient_id: str | None = None
    issuer: str | None = None
    outcomes: tuple[Outcome, ...] = ()
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError("The limit must be at least 1.")
        for moment in (self.since, self.until):
            if moment is not None and moment.tzinfo is None:
                raise ValueError("Query times must be timezone-aware.")

    def describe(self) -> str:
        """Return the criteria as PHI-free text: a patient ID shows as ``patient-id=given``."""
        parts = [f"since={self.since.isoformat()}" if self.since else "",
                 f"until={self.until.isoformat()}" if self.until else "",
                 f"event={','.join(self.events)}" if self.events else "",
                 f"ae={self.ae}" if self.ae else "",
                 f"study={self.study_uid}" if self.study_uid else "",
                 "patient-id=given" if self.patient_id else "",
                 f"outcome={','.join(self.outcomes)}" if self.outcomes else "",
                 f"limit={self.limit}" if self.limit else ""]
        return " ".join(part for part in parts if part)


def read_events(trail: AuditTrail, criteria: EventFilter) -> tuple[str | None, list[Row]]:
    """Return the patient's pseudonym (None without one) and the matching events, unaudited.

    Events come oldest first; with a ``limit``, the newest ``limit`` of them.
    """
    pseudonym = _pseudonym(trail, criteria)
    statement = _where(select(store.events), criteria, pseudonym)
    statement = statement.order_by(store.events.c.id.desc()).limit(criteria.limit)
    with trail.connect() as connection:
        return pseudonym, [dict(row) for row in connection.execute(statement).mappings()][::-1]


def list_events(trail: AuditTrail, criteria: EventFilter, *, actor: str) -> list[Row]:
    """Return :func:`read_events`'s events and record AUDIT_QUERIED by ``actor``.

    Raises :class:`AuditError` when recording fails.
    """
    pseudonym, rows = read_events(trail, criteria)
    trail.record(AuditEvent.AUDIT_QUERIED, actor=actor, pseudonym=pseudonym,
                 detail=f"{_joined('list', criteria.describe())}; {len(rows)} events")
    return rows


def get_event(trail: AuditTrail, event_id: int, *, actor: str) -> Row | None:
    """Return the event with row id ``event_id``, or None; records AUDIT_QUERIED by ``actor``."""
    with trail.connect() as connection:
        row = connection.execute(
            select(store.events).where(store.events.c.id == event_id)).mappings().first()
    trail.record(AuditEvent.AUDIT_QUERIED, actor=actor,
                 detail=f"show {event_id}; {'found' if row else 'not found'}")
    return dict(row) if row else None


def summarize(trail: AuditTrail, by: SummaryKey, criteria: EventFilter, *,
              actor: str) -> list[Row]:
    """Return ``{"key", "events", "failures"}`` per day, event type or calling AE, sorted by key.

    Records AUDIT_QUERIED by ``actor``. Raises ``ValueError`` for an unknown ``by``.
    """
    columns = {"day": func.date(store.events.c.time), "event": store.events.c.event,
               "ae": store.events.c.actor}
    if by not in columns:
        raise ValueError(f"A summary is by day, event or ae, not {by!r}.")
    key = columns[by].label("key")
    failures = func.sum(case((store.events.c.outcome != Outcome.SUCCESS.value, 1), else_=0))
    pseudonym = _pseudonym(trail, criteria)
    statement = _where(select(key, func.count().label("events"), failures.label("failures")),
                       criteria, pseudonym).group_by(key).order_by(key)
    with trail.connect() as connection:
        rows: list[Row] = [{"key": None if row.key is None else str(row.key),
                            "events": row.events, "failures": int(row.failures or 0)}
                           for row in connection.execute(statement)]
    trail.record(AuditEvent.AUDIT_QUERIED, actor=actor, pseudonym=pseudonym,
                 detail=_joined(f"summary by {by}", criteria.describe()))
    return rows


def plain(row: Row) -> dict[str, str | int | None]:
    """Return ``row`` with its time as ISO 8601 text, ready for JSON or CSV."""
    return {key: value.isoformat() if isinstance(value, datetime) else value
            for key, value in row.items()}


def _pseudonym(trail: AuditTrail, criteria: EventFilter) -> str | None:
    if not criteria.patient_id:
        return None
    return trail.lookup_pseudonym(criteria.patient_id, criteria.issuer)


def _where(statement: Select[Any], criteria: EventFilter, pseudonym: str | None) -> Select[Any]:
    column = store.events.c
    conditions = [
        column.time >= criteria.since.astimezone(UTC) if criteria.since else None,
        column.time < criteria.until.astimezone(UTC) if criteria.until else None,
        column.event.in_([event.value for event in criteria.events]) if criteria.events else None,
        column.actor == criteria.ae if criteria.ae else None,
        column.study_uid == criteria.study_uid if criteria.study_uid else None,
        column.pseudonym == pseudonym if pseudonym else None,
        false() if criteria.patient_id and not pseudonym else None,  # unknown or erased
        column.outcome.in_([o.value for o in criteria.outcomes]) if criteria.outcomes else None,
    ]
    return statement.where(*(condition for condition in conditions if condition is not None))


def _joined(*parts: str) -> str:
    return " ".join(part for part in parts if part)
