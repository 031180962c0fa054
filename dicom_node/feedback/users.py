"""The feedback page's users file: one ``name:scrypt$N$r$p$salt$hash`` line per user.

Passwords are hashed with scrypt (:func:`hashlib.scrypt`, a random salt each) and compared in
constant time; an unknown name costs as much as a wrong password. The file is written whole
(a temporary file renamed over it), readable by its owner only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import tempfile
from pathlib import Path

from dicom_node.config import Settings
from dicom_node.errors import NodeError

USER_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
MIN_PASSWORD = 10
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
SCRYPT_MAXMEM = 2**26


class UsersFileError(NodeError):
    """A users file that cannot be read or written, or a user name or password refused."""


def users_file(settings: Settings) -> Path:
    """Return ``feedback.users_file``, by default ``state_dir/feedback-users``."""
    return settings.feedback.users_file or settings.state_dir / "feedback-users"


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=SCRYPT_MAXMEM, dklen=32)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hash_password(password: str) -> str:
    """Return the scrypt hash of ``password`` as stored in the users file."""
    salt = secrets.token_bytes(16)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(_scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P))}"


def verify_password(stored: str, password: str) -> bool:
    """Return whether ``password`` matches ``stored`` (a :func:`hash_password` result); False for
    a malformed hash."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        computed = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p))
        return hmac.compare_digest(computed, base64.b64decode(digest))
    except ValueError:
        return False


#: Checked against when the user is unknown, so that a wrong name takes as long as a wrong password.
_UNKNOWN_USER = hash_password(secrets.token_urlsafe(16))


def load_users(path: Path) -> dict[str, str]:
    """Return user name → hash from ``path``; none when it does not exist.

    Raises :class:`UsersFileError` naming the line of a malformed entry, or when it cannot be read.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UsersFileError(f"cannot read the users file {path}: {exc.strerror}") from exc
    users = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        name, colon, stored = line.partition(":")
        if not colon or not USER_NAME.match(name) or not stored.startswith("scrypt$"):
            raise UsersFileError(f"the users file {path} line {number} is not 'name:scrypt$...'")
        users[name] = stored
    return users


def authenticate(path: Path, name: str, password: str) -> bool:
    """Return whether ``name`` is a user of ``path`` whose password is ``password``."""
    stored = load_users(path).get(name)
    matches = verify_password(stored or _UNKNOWN_USER, password)
    return matches and stored is not None


def set_user(path: Path, name: str, password: str) -> bool:
    """Add user ``name`` to ``path`` with ``password``, or change their password; return whether the
    user is new.

    Raises :class:`UsersFileError` for a bad name, a password shorter than :data:`MIN_PASSWORD`, or a
    file that cannot be read or written.
    """
    if not USER_NAME.match(name):
        raise UsersFileError("a user name is 1 to 64 letters, digits or . _ @ -")
    if len(password) < MIN_PASSWORD:
        raise UsersFileError(f"a password is at least {MIN_PASSWORD} characters")
    users = load_users(path)
    new = name not in users
    users[name] = hash_password(password)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    content = "".join(f"{user}:{stored}\n" for user, stored in sorted(users.items()))
    try:
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(descriptor, "w") as out:  # mkstemp makes it 0600
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        raise UsersFileError(f"cannot write the users file {path}: {exc.strerror}") from exc
    return new
