"""Which studies the open associations are bringing, and when an association that brought
a study was released: what tells the scheduler a study is complete before its quiet period.

The SCP reports each stored instance's study and each association's end; the scheduler
asks which released studies are due (released at least ``grace`` ago and not being sent
by another open association). An aborted association completes nothing: its studies wait
for the quiet period. Kept in memory: after a restart the quiet period completes what
was received before it.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from datetime import datetime, timedelta

from dicom_node.db import utcnow


class Arrivals:
    """Studies by open association, and release times by study; safe to use from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[Hashable, set[str]] = {}
        self._released: dict[str, datetime] = {}
        #: Set when an association that brought studies is released (wakes the scheduler).
        self.changed = threading.Event()

    def stored(self, association: Hashable, study_uid: str) -> None:
        """Note that ``association`` stored an instance of ``study_uid``."""
        with self._lock:
            self._open.setdefault(association, set()).add(study_uid)

    def released(self, association: Hashable) -> None:
        """Note that ``association`` was released: each study it brought is released now."""
        with self._lock:
            studies = self._open.pop(association, set())
            now = utcnow()
            for study in studies:
                self._released[study] = now
        if studies:
            self.changed.set()

    def ended(self, association: Hashable) -> None:
        """Forget an association that ended without a release (aborted, reset, timed out)."""
        with self._lock:
            self._open.pop(association, None)

    def due(self, grace: timedelta) -> dict[str, datetime]:
        """Return the studies released at least ``grace`` ago and brought by no open association,
        with their release times."""
        cutoff = utcnow() - grace
        with self._lock:
            in_flight = set().union(*self._open.values())
            return {study: at for study, at in self._released.items() if at <= cutoff and study not in in_flight}

    def next_due_in(self, grace: timedelta) -> float | None:
        """Return the seconds until the next released study is due (0 when one is), or None."""
        with self._lock:
            if not self._released:
                return None
            earliest = min(self._released.values())
        return max(0.0, (earliest + grace - utcnow()).total_seconds())

    def forget(self, study_uid: str) -> None:
        """Drop a released study (queued, or nothing of it left to queue)."""
        with self._lock:
            self._released.pop(study_uid, None)
