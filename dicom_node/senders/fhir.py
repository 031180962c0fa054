"""The ``fhir`` sender: a job's SRs as one FHIR R4 transaction, POSTed to the server's base URL.

The Bundle is :func:`~dicom_node.senders.fhir_report.report_bundle`'s. The server must answer
a ``transaction-response`` Bundle with a 2xx status for every entry; then each SR is
delivered. No answer, a timeout or HTTP 408, 429 or 5xx is retried; any other answer is
given up (see :mod:`dicom_node.http_post`). A transaction is all or nothing, so every SR of
the send gets the same outcome.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicom_node.config import FhirDestination, Settings, redact_url
from dicom_node.http_post import post_json
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
    """Sends SRs to a FHIR R4 server, with the node's delivery timeout."""

    def __init__(self, destination: FhirDestination, settings: Settings) -> None:
        self.destination = destination
        self.url = destination.base_url.rstrip("/")
        self.timeout_s = settings.delivery.timeout_s
        self.remote = redact_url(self.url)

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
        result = post_json(self.url, bundle, self.destination, timeout_s=self.timeout_s,
                           content_type=FHIR_JSON)
        if result.disposition is Disposition.DELIVERED and not transaction_succeeded(
                result.body, len(bundle["entry"])):
            return SendOutcome(Disposition.GIVE_UP, result.status,
                               "the answer is no transaction-response with every entry 2xx")
        logger.info("FHIR transaction of %d resource(s) to %s: %s", len(bundle["entry"]), self.remote,
                    result.disposition.value)
        return SendOutcome(result.disposition, result.status, result.detail)
