"""The audit secret, and the two keys derived from it: one for pseudonyms, one for the chain."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicom_node.errors import AuditError

KEY_FILE = "audit.key"

# The fields of an event row that the chain covers, in order.
CHAINED_FIELDS = ("id", "time", "event", "event_id", "outcome", "actor", "remote", "pseudonym",
                  "study_uid", "series_uid", "sop_uid", "job_id", "detail")


def load_or_create_secret(state_dir: Path) -> bytes:
    """Return the secret in ``state_dir/audit.key``, generating it (mode 0600) on first use.

    Safe when several processes start at once: the file appears atomically, complete.
    Raises :class:`AuditError` when the file cannot be read or written.
    """
    path = state_dir / KEY_FILE
    try:
        if not path.exists():
            state_dir.mkdir(parents=True, exist_ok=True)
            draft = state_dir / f".{KEY_FILE}.{os.getpid()}"
            descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_hex(32))
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(draft, path)
            except FileExistsError:
                pass  # another process won the race; use its key
            finally:
                draft.unlink()
        secret = path.read_text().strip()
    except OSError as exc:
        raise AuditError(f"cannot read or create the audit key {path}: {exc.strerror}") from exc
    if not secret:
        raise AuditError(f"the audit key {path} is empty")
    return secret.encode()


class AuditKeys:
    """Keyed hashes of the audit trail, each under its own key derived from one secret."""

    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise ValueError("The audit secret must not be empty.")
        self._pseudonym_key = hmac.digest(secret, b"dicom-node pseudonym", "sha256")
        self._chain_key = hmac.digest(secret, b"dicom-node chain", "sha256")

    def patient_key(self, patient_id: str, issuer: str | None) -> str:
        """Return the hex keyed hash that identifies a patient in the pseudonym table."""
        message = f"{(issuer or '').strip()}\x1f{patient_id.strip()}".encode()
        return hmac.new(self._pseudonym_key, message, hashlib.sha256).hexdigest()

    def chain_hash(self, previous_hash: str, row: Mapping[str, Any]) -> str:
        """Return the hex keyed hash of ``row`` chained to ``previous_hash``."""
        values = [_canonical(row[name]) for name in CHAINED_FIELDS]
        message = previous_hash.encode() + b"\n" + json.dumps(values, separators=(",", ":"),
                                                              ensure_ascii=True).encode()
        return hmac.new(self._chain_key, message, hashlib.sha256).hexdigest()


def _canonical(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    return value
