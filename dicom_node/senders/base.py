"""What delivery asks of a kind of destination, and the registry that finds each kind.

A sender sends one job's result objects to one destination and says what became of
each (:class:`SendOutcome`); delivery applies those outcomes with its retry, back-off
and dead-letter rules, so a sender neither retries nor records anything itself.

Senders are found by the destination's ``type`` among the entry points of the group
:data:`GROUP`. dicom-node declares its own (``dimse``) in its ``pyproject.toml``;
another kind is one settings model in :mod:`dicom_node.config`, one class, and one
entry point::

    [project.entry-points."dicom_node.senders"]
    dimse = "dicom_node.senders.dimse:DimseSender"
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dicom_node.entry_point import installed_names, load_entry_point

if TYPE_CHECKING:
    from dicom_node.config import Destination, Settings

logger = logging.getLogger(__name__)

GROUP = "dicom_node.senders"


class Disposition(enum.StrEnum):
    """What became of one object sent, and so what delivery does with it next."""

    #: The destination stored it.
    DELIVERED = "delivered"
    #: A transient failure (unreachable, busy, timed out, aborted): tried again later.
    RETRY = "retry"
    #: A permanent failure: another try would get the same answer.
    GIVE_UP = "give-up"
    #: The destination takes the object in no form offered: no retry changes that.
    NOT_ACCEPTED = "not-accepted"


@dataclass(frozen=True)
class SendObject:
    """One result object of a job: its file, SOP Instance UID and kind (sc, seg, sr, not-analysed)."""

    path: Path
    sop_instance_uid: str
    kind: str


@dataclass(frozen=True)
class SendOutcome:
    """What became of one object: its disposition, the status the destination answered (None:
    no answer), and a detail in a fixed text of the sender's own, never a library's message."""

    disposition: Disposition
    status: int | None = None
    detail: str = ""


class Sender(Protocol):
    """Sends result objects to one destination; made by its class from the destination's
    settings and the node's (:data:`SenderType`)."""

    #: Where it sends (an address, a URL without credentials), as logged and audited.
    remote: str

    def send(self, objects: Sequence[SendObject]) -> list[SendOutcome]:
        """Send ``objects``, one job's for this destination; return one outcome per object, in
        their order. Failures are outcomes, not exceptions."""
        ...


#: A sender class: called with its destination's settings and the node's settings.
SenderType = Callable[[Any, "Settings"], Sender]


def installed_kinds() -> set[str]:
    """Return the destination types for which a sender is installed."""
    return installed_names(GROUP)


def sender_type(kind: str) -> SenderType:
    """Return the sender class installed for destination type ``kind``.

    Raises :class:`ConfigError` naming the type and the installed ones when no sender is
    installed for it, or naming its entry point when that cannot be loaded.
    """
    return load_entry_point(GROUP, kind, f"sender for destination type '{kind}'")


def build_sender(destination: Destination, settings: Settings) -> Sender:
    """Return the sender of ``destination``; raises :class:`ConfigError` as :func:`sender_type`."""
    sender = sender_type(destination.type)(destination, settings)
    logger.info("Destination %s: %s sender to %s", destination.name, destination.type, sender.remote)
    return sender
