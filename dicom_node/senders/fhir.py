"""The ``fhir`` sender: a job's SRs as one FHIR R4 transaction, POSTed to the server's base URL.

The Bundle is :func:`~dicom_node.senders.fhir_report.report_bundle`'s. The server must answer
a ``transaction-response`` Bundle with a 2xx status for every entry; then each SR is
delivered. Every other answer is classified as :mod:`dicom_node.http_client` says (no answer,
a timeout, HTTP 408, 429 or 5xx retried; 415 not accepted; any other given up). A transaction
is all or nothing, so every SR of the send gets the same outcome.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicom_node.config import FhirDestination, Settings
from dicom_node.http_client import HttpClient
from dicom_node.senders.base import Disposition, SendObject, SendOutcome
from dicom_node.senders.fhir_report import report_bundle

logger = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"


def transaction_succeeded(answer: Any, entries: int) -> bool:
    """Return whether ``answer`` is a transaction-response Bundle of ``entries`` entries, each
    with a 2xx ``response.status``."""
    if not isinstance(answer, dict) or answer.get("resourceType") != "Bundle" \
            or answer.get("type") != "transaction-response":
        return False
    statuses = [str((entry.get("response") or {}).get("status", "")) for entry in answer.get("entry") or []]
    return len(statuses) == entries and all(status[:1] == "2" for status in statuses)


class FhirSender:
    """Sends SRs to a FHIR R4 server, with the node's delivery timeout.

    Raises :class:`~dicom_node.errors.ConfigError` as :class:`~dicom_node.http_client.HttpClient`
    (a secret file unreadable, the CA bundle missing), so that the node refuses to start."""

    def __init__(self, destination: FhirDestination, settings: Settings) -> None:
        self.client = HttpClient(destination, destination.base_url.rstrip("/"),
                                 timeout_s=settings.delivery.timeout_s, name=f"destination {destination.name}")
        self.remote = self.client.remote

    def send(self, objects: Sequence[SendObject]) -> list[SendOutcome]:
        """POST the SRs among ``objects`` as one transaction; return one outcome per object:
        given up for an object that is no readable SR, the transaction's for the others."""
        outcomes: list[SendOutcome | None] = [None] * len(objects)
        srs = []
        for index, sent in enumerate(objects):
            try:
                dataset = dcmread(sent.path)
            except (InvalidDicomError, OSError):
                outcomes[index] = SendOutcome(Disposition.GIVE_UP, None, "not a readable DICOM file")
                continue
            if sent.kind != "sr" or dataset.get("Modality") != "SR":
                outcomes[index] = SendOutcome(Disposition.GIVE_UP, None, "FHIR takes structured reports only")
                continue
            srs.append((index, dataset))
        if srs:
            outcome = self._post([dataset for _, dataset in srs])
            for index, _ in srs:
                outcomes[index] = outcome
        return [o for o in outcomes if o is not None]

    def _post(self, srs: list[Any]) -> SendOutcome:
        try:
            bundle = report_bundle(srs)
        except (ValueError, AttributeError, KeyError, IndexError, StopIteration):
            return SendOutcome(Disposition.GIVE_UP, None, "the SRs cannot be read as a report of ours")
        answer = self.client.post(json.dumps(bundle).encode(), {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON})
        if answer.disposition is Disposition.DELIVERED and not transaction_succeeded(
                _json(answer.body), len(bundle["entry"])):
            return SendOutcome(Disposition.GIVE_UP, answer.status,
                               "the answer is no transaction-response with every entry 2xx")
        logger.info("FHIR transaction of %d resource(s) to %s: %s", len(bundle["entry"]), self.remote,
                    answer.disposition.value)
        return SendOutcome(answer.disposition, answer.status, answer.detail)


def _json(body: bytes | None) -> Any:
    """Return the JSON ``body``, or None when there is none or it is no JSON."""
    try:
        return json.loads(body) if body else None
    except (ValueError, RecursionError):
        return None
