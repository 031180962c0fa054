"""One ``serve`` per state folder: an exclusive lock held for the life of the process."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import TextIO

from dicom_node.errors import StateInUseError

LOCK_FILE = "serve.lock"


class StateLock:
    """An exclusive ``flock`` on ``state_dir/serve.lock``, which names its holder (pid and host)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self._file: TextIO | None = None

    def acquire(self) -> None:
        """Take the lock; raises :class:`StateInUseError` naming the holder when another process has it."""
        stream = self.path.open("a+")
        try:
            fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            stream.seek(0)
            holder = stream.read().strip() or "another process"
            stream.close()
            raise StateInUseError(f"state folder {self.path.parent} is in use by {holder}; "
                                  "stop that node first or give this one another state_dir") from None
        stream.seek(0)
        stream.truncate()
        stream.write(f"dicom-node serve pid {os.getpid()} on {socket.gethostname()}\n")
        stream.flush()
        self._file = stream

    def release(self) -> None:
        """Release the lock (also released by the kernel when the process dies)."""
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
