"""The ``stow`` sender: a job's objects in one DICOMweb STOW-RS request (PS3.18 10.5).

One POST of ``multipart/related; type="application/dicom"`` to the destination's ``/studies``
URL carries each object as a part, its Part 10 file as stored. What became of each object is
read from the Store Instances Response of an HTTP 200, 202 or 409 (DICOM JSON, or the XML of
PS3.19 where the server answers that):

- in ReferencedSOPSequence: delivered, with its WarningReason as the status when it has one
  (the server stored it);
- in FailedSOPSequence, by its FailureReason: out of resources (0xA7xx) or resource limitation
  (0x0213) retried; SOP class (0x0122) or transfer syntax (0xC122) not supported: not accepted;
  any other (0xA9xx, 0xCxxx, 0x0110 ...) given up;
- named in neither: delivered after a 200 (all stored), given up after a 202, 409 or another
  2xx.

Any other answer decides for every object, as :func:`dicom_node.http_client.status_outcome`
says: 401 and 403 given up (the credentials are wrong or lack the right), 415 not accepted,
408, 429 and 5xx retried, as are refused connections and timeouts; redirects (not followed:
credentials never go elsewhere) and every other status given up. Outcome details are fixed
texts, never a response body or a library's message.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from xml.etree import ElementTree

from dicom_node.config import Settings, StowDestination
from dicom_node.http_client import Answer, HttpClient
from dicom_node.scu import classify
from dicom_node.senders.base import Disposition, SendObject, SendOutcome

logger = logging.getLogger(__name__)

MEDIA_TYPE = "application/dicom"
ACCEPT = "application/dicom+json, application/dicom+xml;q=0.9"
#: The HTTP statuses whose body is a Store Instances Response.
ITEMISED = (200, 202, 409)

REFERENCED_SOP_SEQUENCE, FAILED_SOP_SEQUENCE = "00081199", "00081198"
REFERENCED_SOP_INSTANCE_UID, WARNING_REASON, FAILURE_REASON = "00081155", "00081196", "00081197"
#: Failure reasons that no retry changes: SOP class, transfer syntax not supported.
NOT_SUPPORTED = (0x0122, 0xC122)

FAILURE_DETAILS = {
    Disposition.RETRY: "refused for now: out of resources",
    Disposition.NOT_ACCEPTED: "the destination does not take this SOP class or transfer syntax",
    Disposition.GIVE_UP: "failed",
}


class StowSender:
    """Sends to a DICOMweb archive's ``/studies`` URL, with the node's delivery timeout.

    Raises :class:`~dicom_node.errors.ConfigError` as :class:`~dicom_node.http_client.HttpClient`
    (a secret file unreadable, the CA bundle missing), so that the node refuses to start."""

    def __init__(self, destination: StowDestination, settings: Settings) -> None:
        self.client = HttpClient(destination, destination.url, timeout_s=settings.delivery.timeout_s,
                                 name=f"destination {destination.name}")
        self.remote = self.client.remote

    def send(self, objects: Sequence[SendObject]) -> list[SendOutcome]:
        """POST ``objects`` in one multipart request; return one outcome per object, classified
        from the response as this module's docstring says."""
        files = {o.sop_instance_uid: data for o in objects if (data := _read(o.path)) is not None}
        named, other = self._post(list(files.values())) if files else ({}, None)
        return [named.get(o.sop_instance_uid, other) if o.sop_instance_uid in files
                else SendOutcome(Disposition.GIVE_UP, None, "result file unreadable") for o in objects]

    def _post(self, files: list[bytes]) -> tuple[dict[str, SendOutcome], SendOutcome]:
        """Send ``files``; return the outcomes the response names, by SOP Instance UID, and the
        outcome of every object it does not name."""
        boundary = uuid.uuid4().hex
        answer = self.client.post(
            _multipart(files, boundary),
            {"Content-Type": f'multipart/related; type="{MEDIA_TYPE}"; boundary={boundary}', "Accept": ACCEPT},
            read_body=ITEMISED)
        if answer.status is None:
            return {}, SendOutcome(answer.disposition, None, answer.detail)
        named = _named_outcomes(_response_items(answer.content_type, answer.body)) if answer.body else {}
        logger.info("STOW-RS to %s: HTTP %d, %d of %d objects named in the response",
                    self.remote, answer.status, len(named), len(files))
        return named, _unnamed_outcome(answer)


def _read(path: Path) -> bytes | None:
    """Return the file's bytes, or None when it cannot be read."""
    try:
        return path.read_bytes()
    except OSError:
        return None


def _multipart(files: list[bytes], boundary: str) -> bytes:
    """Return ``files`` as the body of a ``multipart/related`` request, one part each."""
    head = f"--{boundary}\r\nContent-Type: {MEDIA_TYPE}\r\n\r\n".encode()
    return b"".join(head + data + b"\r\n" for data in files) + f"--{boundary}--\r\n".encode()


def _response_items(content_type: str, body: bytes) -> list[tuple[str, str | None, int | None]]:
    """Return (sequence tag, SOP Instance UID, warning or failure reason) for each item of the
    Referenced and Failed SOP Sequences of a Store Instances Response; none when it cannot be
    parsed."""
    try:
        if "xml" in content_type.lower():
            return list(_xml_items(body))
        return list(_json_items(body))
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, RecursionError,
            ElementTree.ParseError):
        return []


def _json_items(body: bytes) -> Iterator[tuple[str, str | None, int | None]]:
    data = json.loads(body)
    if isinstance(data, list):  # some servers answer the data set inside an array
        data = data[0] if data else {}
    data = {key.upper(): value for key, value in data.items()}
    for sequence, reason in ((REFERENCED_SOP_SEQUENCE, WARNING_REASON),
                             (FAILED_SOP_SEQUENCE, FAILURE_REASON)):
        for item in (data.get(sequence) or {}).get("Value") or []:
            item = {key.upper(): value for key, value in item.items()}
            uid, code = (((item.get(tag) or {}).get("Value") or [None])[0]
                         for tag in (REFERENCED_SOP_INSTANCE_UID, reason))
            yield sequence, uid if isinstance(uid, str) else None, _code(code)


def _xml_items(body: bytes) -> Iterator[tuple[str, str | None, int | None]]:
    if b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body.upper():
        raise ValueError("document type declarations are refused")
    root = ElementTree.fromstring(body)
    for element in root.iter():  # PS3.19's namespace, where the server writes it, dropped
        element.tag = element.tag.rpartition("}")[2]

    def value(item: ElementTree.Element, tag: str) -> str | None:
        return next((a.findtext("Value") for a in item.findall("DicomAttribute")
                     if a.get("tag", "").upper() == tag), None)

    for sequence, reason in ((REFERENCED_SOP_SEQUENCE, WARNING_REASON),
                             (FAILED_SOP_SEQUENCE, FAILURE_REASON)):
        for attribute in root.findall("DicomAttribute"):
            if attribute.get("tag", "").upper() == sequence:
                for item in attribute.findall("Item"):
                    yield sequence, value(item, REFERENCED_SOP_INSTANCE_UID), _code(value(item, reason))


def _code(value: object) -> int | None:
    """Return a reason code given as a number or its decimal text; None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(value) if isinstance(value, str) and value.strip().isdigit() else None


def _named_outcomes(items: list[tuple[str, str | None, int | None]]) -> dict[str, SendOutcome]:
    """Return the outcome of each instance the response names, by SOP Instance UID (a failure
    wins over a listing as stored)."""
    outcomes: dict[str, SendOutcome] = {}
    for sequence, uid, code in items:
        if uid is None:
            continue
        if sequence == REFERENCED_SOP_SEQUENCE:
            outcomes[uid] = SendOutcome(Disposition.DELIVERED, code or 0x0000,
                                        "stored with a warning" if code else "")
        else:
            disposition = classify_failure(code)
            outcomes[uid] = SendOutcome(disposition, code, FAILURE_DETAILS[disposition])
    return outcomes


def classify_failure(reason: int | None) -> Disposition:
    """Return what to do after a FailureReason of ``reason`` (None: none given): retry when out
    of resources, not accepted when the SOP class or transfer syntax is not supported, else
    give up (never delivered: the server listed the instance as failed)."""
    if reason in NOT_SUPPORTED:
        return Disposition.NOT_ACCEPTED
    disposition = classify(reason) if reason is not None else Disposition.GIVE_UP
    return Disposition.GIVE_UP if disposition is Disposition.DELIVERED else disposition


def _unnamed_outcome(answer: Answer) -> SendOutcome:
    """Return the outcome of an object that an HTTP ``answer`` does not name: delivered after a
    200, given up after another 2xx (202, 409 included), else the answer's."""
    if answer.status == 200:
        return SendOutcome(Disposition.DELIVERED, None, "HTTP 200: all stored")
    if answer.status in ITEMISED or answer.disposition is Disposition.DELIVERED:
        return SendOutcome(Disposition.GIVE_UP, None, f"HTTP {answer.status}: not named in the response")
    return SendOutcome(answer.disposition, None, answer.detail)
