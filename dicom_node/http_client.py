"""One POST to an HTTP endpoint, and what its answer means for a retry.

Used by every HTTP peer: the STOW-RS and FHIR senders and the notification webhook, each
configured by an :class:`~dicom_node.config.HttpEndpoint`. The Authorization header is made
from its ``auth`` at each request (a secret file renewed by another process is used at once);
the server's certificate is checked (against ``ca_certificates`` when given) unless
``insecure_skip_tls_verify``. Settings come from the configuration only: no proxy, ``.netrc``
or CA bundle from the environment. Redirects are not followed, so credentials and results
never go where nobody configured them.

Outcomes are :class:`~dicom_node.senders.base.Disposition` s with fixed texts of this module
(:func:`status_outcome`): no library or server message, which may quote what was sent,
reaches a log or the audit trail.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Container, Mapping
from dataclasses import dataclass
from pathlib import Path

import requests
from pydantic import SecretStr

from dicom_node.config import BasicAuth, BearerAuth, HttpEndpoint, redact_url
from dicom_node.errors import ConfigError
from dicom_node.senders.base import Disposition

logger = logging.getLogger(__name__)

#: The longest response body read; a longer one is not kept.
MAX_RESPONSE_BYTES = 16 * 2**20
SUCCESS = range(200, 300)


@dataclass(frozen=True)
class Answer:
    """What one POST came to: its disposition and fixed detail, the HTTP status (None: no
    answer), and the response's content type and body (None: not read, or longer than
    :data:`MAX_RESPONSE_BYTES`)."""

    disposition: Disposition
    status: int | None
    detail: str
    content_type: str = ""
    body: bytes | None = None


class HttpClient:
    """Posts to ``url`` of ``endpoint``, each request under ``timeout_s`` (connect, and each read).

    Raises :class:`ConfigError`, starting with ``name`` (where the endpoint is configured), when
    a secret file cannot be read or is empty, or the CA bundle is missing, so that the node
    refuses to start rather than fail at the first request."""

    def __init__(self, endpoint: HttpEndpoint, url: str, *, timeout_s: float, name: str) -> None:
        self.url = url
        self.remote = redact_url(url)
        self.auth = endpoint.auth
        self.timeout_s = timeout_s
        self.name = name
        self.verify: bool | str = not endpoint.insecure_skip_tls_verify
        if endpoint.ca_certificates and self.verify:
            if not endpoint.ca_certificates.is_file():
                raise ConfigError(f"{name}: ca_certificates {endpoint.ca_certificates} is not a file")
            self.verify = str(endpoint.ca_certificates)
        self.authorization()
        if endpoint.insecure_skip_tls_verify:
            logger.warning("%s: the server's TLS certificate is NOT checked (insecure_skip_tls_verify)", name)
        if self.auth and url.lower().startswith("http://"):
            logger.warning("%s: credentials travel unencrypted over http://", name)

    def authorization(self) -> dict[str, str]:
        """Return the Authorization header of the endpoint's auth (none without), its secret read
        now; raises :class:`ConfigError` naming the file when it cannot be read or is empty."""
        if isinstance(self.auth, BearerAuth):
            return {"Authorization": f"Bearer {self._secret(self.auth.token, self.auth.token_file)}"}
        if isinstance(self.auth, BasicAuth):
            pair = f"{self.auth.username}:{self._secret(self.auth.password, self.auth.password_file)}"
            return {"Authorization": f"Basic {base64.b64encode(pair.encode()).decode()}"}
        return {}

    def _secret(self, value: SecretStr | None, file: Path | None) -> str:
        """Return the secret given, or the content of its file without surrounding white space."""
        if value is not None:
            return value.get_secret_value()
        assert file is not None  # the settings give one or the other
        try:
            secret = file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{self.name}: cannot read the secret file {file}") from exc
        if not secret:
            raise ConfigError(f"{self.name}: the secret file {file} is empty")
        return secret

    def post(self, body: bytes, headers: Mapping[str, str], *,
             read_body: Container[int] = SUCCESS) -> Answer:
        """POST ``body`` with ``headers`` (and the Authorization header); return the answer, its
        body read when its status is in ``read_body``. No answer (unreachable, refused, timed out)
        is retried; an unreadable secret file, a failed TLS handshake or another request failure
        given up; an HTTP status classified by :func:`status_outcome`. Never raises for a
        network failure."""
        try:
            headers = {**headers, **self.authorization()}
        except ConfigError:
            return Answer(Disposition.GIVE_UP, None, "credentials file unreadable")
        try:
            with requests.Session() as session:
                session.trust_env = False  # no proxy, .netrc or CA bundle from the environment
                with session.post(self.url, data=body, headers=headers, timeout=self.timeout_s,
                                  verify=self.verify, allow_redirects=False, stream=True) as response:
                    status = response.status_code
                    content = _limited(response) if status in read_body else None
                    content_type = response.headers.get("Content-Type", "")
        except requests.exceptions.SSLError:
            return Answer(Disposition.GIVE_UP, None, "TLS failed: certificate not trusted or no common protocol")
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError):
            return Answer(Disposition.RETRY, None, "no answer: unreachable, refused or timed out")
        except requests.RequestException:
            return Answer(Disposition.GIVE_UP, None, "request failed")
        disposition, detail = status_outcome(status)
        return Answer(disposition, status, detail, content_type, content)


def status_outcome(status: int) -> tuple[Disposition, str]:
    """Return what an answer of HTTP ``status`` means, and its fixed detail: 2xx delivered; 408,
    429 and 5xx retried (busy or unavailable); 415 not accepted (the media type sent); 401 and
    403 (credentials wrong or lacking the right), 3xx (redirect not followed) and any other
    status given up."""
    if status in SUCCESS:
        return Disposition.DELIVERED, ""
    if status in (408, 429) or status >= 500:
        return Disposition.RETRY, f"HTTP {status}: destination busy or unavailable"
    if status in (401, 403):
        return Disposition.GIVE_UP, f"HTTP {status}: not authorised, check the auth settings"
    if status == 415:
        return Disposition.NOT_ACCEPTED, "HTTP 415: the destination does not take the media type sent"
    if 300 <= status < 400:
        return Disposition.GIVE_UP, f"HTTP {status}: redirected, configure the final URL"
    return Disposition.GIVE_UP, f"HTTP {status}: request refused"


def _limited(response: requests.Response) -> bytes | None:
    """Return the response body, or None when it is longer than :data:`MAX_RESPONSE_BYTES`."""
    body = bytearray()
    for chunk in response.iter_content(65536):
        body += chunk
        if len(body) > MAX_RESPONSE_BYTES:
            return None
    return bytes(body)
