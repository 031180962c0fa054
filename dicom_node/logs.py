"""Logging set-up for every command: readable lines that carry no patient data.

Libraries quote element values in their warnings (highdicom prints a one-component
person name, pydicom an invalid value of any element). Python warnings are captured
into the ``py.warnings`` logger (as Celery's worker also does), whose records keep
only the warning's category and origin; pydicom's own logger, which repeats those
values, is held at ERROR.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Per-association and per-module INFO lines.
CHATTY = ("pynetdicom", "highdicom")
#: Loggers of a peer's bad input, handled by the library: one line each, no traceback.
ONE_LINE = ("pynetdicom.dul", "pynetdicom.acse", "pynetdicom.association", "pynetdicom.dimse", "pynetdicom.utils")
#: Loggers whose warnings quote data-set values.
QUOTING = ("pydicom",)
WITHHELD = "text withheld: library warnings may quote patient data"
_FORMATTED_WARNING = re.compile(r"(?P<file>[^\n]+?):(?P<line>\d+): (?P<category>\w+):")


class WithholdWarningText(logging.Filter):
    """Rewrite a captured warning's record to ``Category raised in file.py:line (text withheld ...)``."""

    def filter(self, record: logging.LogRecord) -> bool:
        match = _FORMATTED_WARNING.match(record.getMessage())
        if match:
            record.msg, record.args = "%s raised in %s:%s (%s)", (
                match["category"], Path(match["file"]).name, match["line"], WITHHELD)
        else:
            record.msg, record.args = "a warning was raised (%s)", (WITHHELD,)
        return True


class OneLine(logging.Filter):
    """Drop the traceback of a record: for libraries' handled errors (pynetdicom logs a peer's
    undecodable PDU with a full traceback), whose message already says what happened."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def configure_logging(level: int = logging.INFO) -> None:
    """Configure the root logger, capture warnings into ``py.warnings`` and withhold their text there."""
    logging.basicConfig(level=level, format=FORMAT)
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ONE_LINE:
        handled = logging.getLogger(name)
        if not any(isinstance(f, OneLine) for f in handled.filters):
            handled.addFilter(OneLine())
    for name in QUOTING:
        logging.getLogger(name).setLevel(logging.ERROR)
    captured = logging.getLogger("py.warnings")
    if not any(isinstance(f, WithholdWarningText) for f in captured.filters):
        captured.addFilter(WithholdWarningText())
    logging.captureWarnings(True)
