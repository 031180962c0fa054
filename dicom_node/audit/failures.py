"""What an audit row, a verdict reason or a log line may say about an exception.

Library messages quote the data they choke on (highdicom: ``Unable to convert
'01.02.1970' to 'DA'``), so they never reach the audit trail, the node database or the
logs. The node's own errors (:class:`NodeError`, :class:`PipelineError`) carry fixed
messages with ids and counts only, and are shown as they are.
"""

from __future__ import annotations

import traceback

from dicom_node.errors import NodeError
from pipelines.errors import PipelineError

OWN_ERRORS = (NodeError, PipelineError)
MAX_LENGTH = 500


def failure_text(error: BaseException, fixed: str) -> str:
    """Return ``Type: message`` for the node's own errors, else ``Type: <fixed>``: text
    written by us either way, at most :data:`MAX_LENGTH` characters."""
    message = str(error) if isinstance(error, OWN_ERRORS) else fixed
    return f"{type(error).__name__}: {message}"[:MAX_LENGTH]


def traceback_text(error: BaseException) -> str:
    """Return the traceback of ``error`` and of the errors it was raised from, their frames
    and types, with the messages of all but the node's own errors withheld."""
    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or (None if link.__suppress_context__ else link.__context__)
    parts = []
    for link in reversed(chain):
        parts.append("Traceback (most recent call last):\n")
        parts.extend(traceback.format_tb(link.__traceback__))
        parts.append(failure_text(link, "(message withheld: it may quote patient data)") + "\n")
        if link is not chain[0]:
            parts.append("\nwhich led to:\n\n")
    return "".join(parts).rstrip("\n")
