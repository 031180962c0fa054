"""Work whose broker message was lost, queued again.

A broker that restarts without persistence (Redis without an append-only file, a
queue that was not durable) loses the messages it held, and a worker host that dies
takes the messages it had reserved with it (Redis gives them back only after its
visibility timeout, an hour), while the rows they were about still wait. When the
broker holds no message of a task, each queued job and each delivery due for longer
than the grace period whose message was published before it, with none waiting in
the outbox, gets a new message: one per job and destination for deliveries. A message that was not lost after all makes a
duplicate, which the task ignores.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from dicom_node.db import (
    Delivery, DeliveryStatus, Job, JobStatus, NodeDatabase, OutboxMessage, Task, queue_message,
    utcnow,
)

logger = logging.getLogger(__name__)

WaitingMessages = Callable[[Task], "int | None"]
"""How many messages of an outbox task wait in the broker; None when it cannot tell."""


def requeue_lost(db: NodeDatabase, waiting: WaitingMessages, grace: timedelta) -> dict[Task, list[int]]:
    """Queue again the work the broker lost; return the ids queued, by task."""
    cutoff = utcnow() - grace
    requeued: dict[Task, list[int]] = {}
    with db.session() as session:
        carried = {(Task(task), target) for task, target in session.execute(
            select(OutboxMessage.task, OutboxMessage.target_id).where(
                or_(OutboxMessage.published_at.is_(None), OutboxMessage.published_at > cutoff)))}
        candidates: dict[Task, list[tuple[int, list[int]]]] = {}
        if waiting(Task.ANALYZE) == 0:
            candidates[Task.ANALYZE] = [(job_id, [job_id]) for job_id in session.scalars(
                select(Job.id).where(Job.status == JobStatus.QUEUED))]
        if waiting(Task.DELIVER) == 0:
            candidates[Task.DELIVER] = _due_delivery_groups(session, cutoff)
        for task, groups in candidates.items():
            lost = [lead for lead, members in groups
                    if not any((task, member) in carried for member in members)]
            for target in lost:
                queue_message(session, task, target)
            if lost:
                requeued[task] = lost
    for task, ids in requeued.items():
        logger.warning("The broker lost %d %s message(s); queued again: %s", len(ids), task,
                       ", ".join(map(str, ids)))
    return requeued


def _due_delivery_groups(session: Session, cutoff: datetime) -> list[tuple[int, list[int]]]:
    """Deliveries to send, or whose commitment answer is overdue, due since before ``cutoff``, as (lead,
    members) per job and destination."""
    groups: dict[tuple[int, str], list[int]] = {}
    for delivery_id, job_id, destination in session.execute(
            select(Delivery.id, Delivery.job_id, Delivery.destination).where(
                Delivery.status.in_((DeliveryStatus.PENDING, DeliveryStatus.RETRYING, DeliveryStatus.STORED)),
                or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= cutoff))
            .order_by(Delivery.id)):
        groups.setdefault((job_id, destination), []).append(delivery_id)
    return [(members[0], members) for members in groups.values()]
