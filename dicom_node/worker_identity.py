"""Worker names that tell processes apart (host and pid), and whether a named worker still runs."""

from __future__ import annotations

import os
import re
import socket

_NAME = re.compile(r"dicom-node-(?P<pid>\d+)@(?P<host>.+)")


def worker_name() -> str:
    """Return this process's worker name, ``dicom-node-<pid>@<host>``, unique on the host."""
    return f"dicom-node-{os.getpid()}@{socket.gethostname()}"


def worker_is_gone(name: str | None) -> bool:
    """Return whether ``name`` names a worker process of this host that no longer runs.

    Workers of other hosts, and names of another form, are never taken to be gone:
    their jobs are reclaimed when their lease runs out.
    """
    match = _NAME.fullmatch(name or "")
    if match is None or match["host"] != socket.gethostname():
        return False
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False
