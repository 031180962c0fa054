"""Private state: the state folder 0700 and the files in it 0600, whichever command made them.

Every command runs under a 077 umask (see :mod:`dicom_node.cli`), so what it creates is
private; :func:`tighten` mends what an earlier version, or another tool, left open.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path

from dicom_node.config import Settings

logger = logging.getLogger(__name__)

UMASK = 0o077
"""No permission for group or others on anything a command creates."""
SQLITE_URL_PREFIXES = ("sqlite:///", "sqla+sqlite:///")
SQLITE_COMPANIONS = ("", "-wal", "-shm", "-journal")


def tighten(settings: Settings) -> list[Path]:
    """Take group and other permissions off an existing state folder, the folders and files
    directly in it, and the SQLite files the settings name (with their -wal, -shm and
    -journal files); create nothing. Return the paths changed, each logged with its modes."""
    paths: list[Path] = []
    if settings.state_dir.is_dir():
        paths = [settings.state_dir, *sorted(settings.state_dir.iterdir())]
    for url in (settings.node_database_url, settings.audit_database_url, settings.broker_url):
        database = sqlite_path(url)
        if database is not None:
            paths += [database.with_name(database.name + suffix) for suffix in SQLITE_COMPANIONS]
    return [path for path in dict.fromkeys(paths) if _make_private(path)]


def sqlite_path(url: str) -> Path | None:
    """Return the file of an SQLite database URL (SQLAlchemy's or kombu's); None for other URLs."""
    for prefix in SQLITE_URL_PREFIXES:
        if url.startswith(prefix):
            return Path(url.removeprefix(prefix).split("?", 1)[0])
    return None


def _make_private(path: Path) -> bool:
    try:
        status = path.lstat()
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(status.st_mode):
        return False  # chmod would follow it out of the state folder
    mode = stat.S_IMODE(status.st_mode)
    if not mode & UMASK:
        return False
    path.chmod(mode & ~UMASK)
    logger.warning("%s was readable by others (mode %04o): now %04o", path, mode, mode & ~UMASK)
    return True
