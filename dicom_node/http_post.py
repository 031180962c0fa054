"""One JSON POST to an HTTP endpoint, and what its outcome means for a retry.

Used by the FHIR sender and the notification webhook. The server's certificate is always
verified; a bearer token goes in the Authorization header. Redirects are not followed (a
POST redirected elsewhere would send results where nobody configured them). Outcomes are
:class:`~dicom_node.senders.base.Disposition` s with fixed texts of our own: no library or
server message, which may quote what was sent, reaches a log or the audit trail.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import requests

from dicom_node.config import HttpEndpoint, redact_url
from dicom_node.senders.base import Disposition

logger = logging.getLogger(__name__)

#: HTTP statuses worth another try: the server is busy, overloaded or timed out.
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class PostResult:
    """What one POST came to: its disposition, the HTTP status (None: no answer), a fixed
    detail, and the answer's JSON body when it had one."""

    disposition: Disposition
    status: int | None
    detail: str
    body: Any = None


def post_json(url: str, document: Any, endpoint: HttpEndpoint, *, timeout_s: float,
              content_type: str = "application/json") -> PostResult:
    """POST ``document`` as JSON to ``url`` and classify the outcome: a 2xx answer delivered;
    no answer (unreachable, timed out) or a transient status (:data:`TRANSIENT_STATUSES`) retried;
    an unreadable token file, a failed TLS verification, a redirect or another status given up.
    Never raises for a network failure."""
    headers = {"Content-Type": content_type, "Accept": content_type}
    try:
        token = endpoint.bearer_token()
    except OSError:
        return PostResult(Disposition.GIVE_UP, None, "the token file cannot be read")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        response = requests.post(url, data=json.dumps(document).encode(), headers=headers,
                                 timeout=timeout_s, allow_redirects=False,
                                 verify=str(endpoint.ca_certificates) if endpoint.ca_certificates else True)
    except requests.exceptions.SSLError:
        logger.warning("POST to %s: TLS verification failed", redact_url(url))
        return PostResult(Disposition.GIVE_UP, None, "TLS verification of the server failed")
    except requests.exceptions.Timeout:
        return PostResult(Disposition.RETRY, None, "the server did not answer in time")
    except requests.exceptions.RequestException:
        return PostResult(Disposition.RETRY, None, "the server could not be reached")
    status = response.status_code
    if 200 <= status < 300:
        try:
            body = response.json() if response.content else None
        except ValueError:
            body = None
        return PostResult(Disposition.DELIVERED, status, "", body)
    if status in TRANSIENT_STATUSES:
        return PostResult(Disposition.RETRY, status, f"the server answered HTTP {status} (busy or failing)")
    if 300 <= status < 400:
        return PostResult(Disposition.GIVE_UP, status, f"the server answered HTTP {status} (redirect not followed)")
    return PostResult(Disposition.GIVE_UP, status, f"the server refused it: HTTP {status}")
