"""Notifications: a webhook POST, for the site's pager or chat, when a finding is flagged or a
delivery is dead-lettered.

Where it happens, the event only adds an outbox message (:data:`~dicom_node.db.Task`
``notify-flagged`` naming the instance, ``notify-dead-lettered`` naming the delivery) in a
transaction of the node database, so it survives a restart and never waits on the webhook.
A delivery-lane worker builds the JSON from the rows when it sends (:class:`Notifier`)::

    {"event": "finding-flagged", "job_id": 7, "study_instance_uid": "1.2...",
     "sop_instance_uid": "1.2...", "findings": [{"name": "covid19", "display_name": "COVID-19",
     "probability": 0.93, "threshold": 0.5}], "destination": null, "time": "2025-...Z"}

    {"event": "delivery-dead-lettered", "job_id": 7, "study_instance_uid": "1.2...",
     "sop_instance_uid": "1.2...", "kind": "sr", "destination": "ris-fhir",
     "reason": "HTTP 400: request refused", "findings": [], "time": "2025-...Z"}

UIDs, ids, scores and fixed texts only: never a patient's name or id. ``time`` is when the
event happened. A failed POST that may succeed later (no answer, HTTP 408, 429, 5xx) is
queued again with delivery's back-off (``delivery.first_retry_s`` doubling up to
``delivery.max_retry_interval_s``, with jitter) until ``max_age_s`` after the event; any other
outcome (a refusal, a redirect, a failed TLS handshake: see :mod:`dicom_node.http_client`) is
logged and dropped. Delivery is at least once: a broker that hands a message
out twice makes a second POST.

Which events are wanted is set once per worker process by :func:`configure` (called at
worker start); until then nothing is queued.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_node.config import DeliverySettings, NotificationSettings, Settings, WebhookSettings
from dicom_node.db import Delivery, Instance, Job, NodeDatabase, OutboxMessage, Task, queue_message, utcnow
from dicom_node.http_client import HttpClient
from dicom_node.results import result_dir
from dicom_node.senders.base import Disposition

if TYPE_CHECKING:
    from pipelines.base import ImageResult

logger = logging.getLogger(__name__)

EVENTS = {Task.NOTIFY_FLAGGED: "finding-flagged", Task.NOTIFY_DEAD_LETTERED: "delivery-dead-lettered"}
"""Outbox task → the event it notifies."""

_wanted: frozenset[str] = frozenset()


def configure(settings: NotificationSettings) -> None:
    """Set the events this process queues notifications for: the webhook's, none without one."""
    global _wanted
    _wanted = frozenset(settings.webhook.events) if settings.webhook else frozenset()


def notify_flagged(db: NodeDatabase, instance: Instance, result: ImageResult) -> None:
    """Queue a ``finding-flagged`` notification for ``instance`` when ``result`` flags a finding."""
    if EVENTS[Task.NOTIFY_FLAGGED] in _wanted and any(f.flagged for f in result.findings):
        with db.session() as session:
            queue_message(session, Task.NOTIFY_FLAGGED, instance.id)


def notify_dead_lettered(session: Session, delivery_id: int) -> None:
    """Queue a ``delivery-dead-lettered`` notification for the delivery, in ``session``'s transaction."""
    if EVENTS[Task.NOTIFY_DEAD_LETTERED] in _wanted:
        queue_message(session, Task.NOTIFY_DEAD_LETTERED, delivery_id)


class Notifier:
    """Posts notifications to the webhook and queues the retries of those that failed.

    Raises :class:`~dicom_node.errors.ConfigError` as :class:`~dicom_node.http_client.HttpClient`
    (a secret file unreadable, the CA bundle missing), so that the worker refuses to start."""

    def __init__(self, webhook: WebhookSettings, db: NodeDatabase, settings: Settings, *,
                 jitter: Callable[[], float] = random.random) -> None:
        self.webhook = webhook
        self.client = HttpClient(webhook, webhook.url, timeout_s=webhook.timeout_s,
                                 name="notifications.webhook")
        self.db = db
        self.results_root = settings.results_dir
        self.policy: DeliverySettings = settings.delivery
        self.jitter = jitter

    @classmethod
    def from_settings(cls, settings: Settings, db: NodeDatabase) -> Notifier | None:
        """Return the notifier of the configured webhook, or None without one; raises
        :class:`~dicom_node.errors.ConfigError` as the constructor."""
        webhook = settings.notifications.webhook
        return cls(webhook, db, settings) if webhook else None

    def run(self, task: Task, target_id: int) -> Disposition | None:
        """Post the notification of ``task`` about ``target_id``; return how it went (RETRY: a
        retry is queued, or it was too old for one), or None when its rows are gone."""
        with self.db.session() as session:
            attempts, first = session.execute(
                select(func.count(OutboxMessage.id), func.min(OutboxMessage.created_at)).where(
                    OutboxMessage.task == task, OutboxMessage.target_id == target_id)).one()
            payload = self._payload(session, task, target_id)
        if payload is None:
            logger.info("Notification %s %d: its rows are gone, nothing to send", task.value, target_id)
            return None
        first = first or utcnow()
        payload["time"] = first.isoformat().replace("+00:00", "Z")
        result = self.client.post(json.dumps(payload).encode(), {"Content-Type": "application/json"},
                                  read_body=())
        where = self.client.remote
        if result.disposition is Disposition.DELIVERED:
            logger.info("Notification %s %d sent to %s", task.value, target_id, where)
        elif result.disposition is Disposition.RETRY and (retry_at := self._retry_at(first, attempts)):
            with self.db.session() as session:
                queue_message(session, task, target_id, not_before=retry_at)
            logger.warning("Notification %s %d to %s: %s; retry at %s", task.value, target_id, where,
                           result.detail, f"{retry_at:%H:%M:%S}")
        else:
            logger.error("Notification %s %d to %s dropped: %s", task.value, target_id, where,
                         result.detail)
        return result.disposition

    def _retry_at(self, first: datetime, attempts: int) -> datetime | None:
        """Return when the next try is due after ``attempts`` tries, None when past ``max_age_s``."""
        wait = min(self.policy.first_retry_s * 2 ** (max(attempts, 1) - 1), self.policy.max_retry_interval_s)
        retry_at = utcnow() + timedelta(seconds=wait * (1 + self.policy.jitter * self.jitter()))
        return retry_at if retry_at - first <= timedelta(seconds=self.webhook.max_age_s) else None

    def _payload(self, session: Session, task: Task, target_id: int) -> dict[str, Any] | None:
        """Return the JSON of the notification (without its time), or None when its rows are gone."""
        if task is Task.NOTIFY_FLAGGED:
            instance = session.get(Instance, target_id)
            if instance is None:
                return None
            return {"event": EVENTS[task], "job_id": instance.job_id,
                    "study_instance_uid": instance.study_instance_uid,
                    "sop_instance_uid": instance.sop_instance_uid,
                    "findings": self._flagged_findings(instance), "destination": None}
        delivery = session.get(Delivery, target_id)
        if delivery is None:
            return None
        job = session.get(Job, delivery.job_id)
        return {"event": EVENTS[task], "job_id": delivery.job_id,
                "study_instance_uid": job.study_instance_uid if job else None,
                "sop_instance_uid": delivery.sop_instance_uid, "kind": delivery.kind,
                "destination": delivery.destination, "reason": delivery.last_error,
                "findings": []}

    def _flagged_findings(self, instance: Instance) -> list[dict[str, Any]]:
        """Return the instance's flagged findings (name, display name, probability, threshold) from
        its ``findings.json``; none when the results were purged."""
        path = result_dir(self.results_root, instance.study_instance_uid,
                          instance.sop_instance_uid) / "findings.json"
        try:
            findings = json.loads(path.read_text())["findings"]
        except (OSError, ValueError, KeyError):
            return []
        return [{key: f[key] for key in ("name", "display_name", "probability", "threshold")}
                for f in findings if f.get("flagged")]
