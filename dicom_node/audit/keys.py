"""The audit secret, and the keys derived from it: for pseudonyms, chain rows and the chain head."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicom_node.errors import AuditError

logger = logging.getLogger(__name__)

KEY_FILE = "audit.key"

# The fields of an event row that the chain covers, in order.
CHAINED_FIELDS = ("id", "time", "event", "event_id", "outcome", "actor", "remote", "pseudonym",
                  "study_uid", "series_uid", "sop_uid", "job_id", "detail")


def load_or_create_secret(path: Path, *, create: bool) -> bytes:
    """Return the secret in the key file ``path``; with ``create``, generate it (mode 0600)
    when it does not exist.

    Safe when several processes start at once: the file appears atomically, complete.
    Logs a warning when the file is readable by others (or, being the node user's own,
    by its group). Raises :class:`AuditError` when the file is missing (and not to be
    created), empty, or cannot be read or written.
    """
    try:
        if create and not path.exists():
            _create_key_file(path)
        secret = path.read_text().strip()
        mode = path.stat()
    except FileNotFoundError as exc:
        raise AuditError(
            f"the audit key file {path} (audit.key_file) does not exist: move the node's "
            f"existing key there, or for a new node create one "
            f"(umask 077; openssl rand -hex 32 > {path})") from exc
    except OSError as exc:
        raise AuditError(f"cannot read or create the audit key {path}: {exc.strerror}") from exc
    if not secret:
        raise AuditError(f"the audit key {path} is empty")
    if mode.st_mode & stat.S_IROTH or (mode.st_mode & stat.S_IRGRP and mode.st_uid == os.getuid()):
        logger.warning("the audit key %s is readable by %s (mode %04o): chmod 600 it", path,
                       "others" if mode.st_mode & stat.S_IROTH else "its group",
                       stat.S_IMODE(mode.st_mode))
    return secret.encode()


def _create_key_file(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    draft = path.with_name(f".{path.name}.{os.getpid()}")
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


class AuditKeys:
    """Keyed hashes of the audit trail, each under its own key derived from one secret."""

    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise ValueError("The audit secret must not be empty.")
        self._pseudonym_key = hmac.digest(secret, b"dicom-node pseudonym", "sha256")
        self._chain_key = hmac.digest(secret, b"dicom-node chain", "sha256")
        self._head_key = hmac.digest(secret, b"dicom-node chain head", "sha256")

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


    def head_mac(self, head_id: int, head_hash: str, anchor_id: int, anchor_hash: str) -> str:
        """Return the hex keyed hash that vouches for the chain's head and anchor together."""
        message = f"{head_id}\n{head_hash}\n{anchor_id}\n{anchor_hash}".encode()
        return hmac.new(self._head_key, message, hashlib.sha256).hexdigest()

    def head_signed(self, head_id: int, head_hash: str, anchor_id: int, anchor_hash: str,
                    head_mac: str | None) -> bool:
        """Return whether ``head_mac`` is the key's hash of this head and anchor."""
        return head_mac is not None and hmac.compare_digest(
            head_mac, self.head_mac(head_id, head_hash, anchor_id, anchor_hash))

    def genesis_hash(self) -> str:
        """Return the hash a new chain starts from: keyed, unlike the zeros of stores made
        before heads were keyed, so such a store cannot be passed off as an older one."""
        return hmac.new(self._head_key, b"genesis", hashlib.sha256).hexdigest()


def _canonical(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    return value
