"""The on-disk spool: ``spool/<study>/<series>/<sop>.dcm``, written atomically.

A received data set streams into ``spool/.incoming/`` while it arrives; once it
is checked it is fsynced and renamed into place, so a file under its final name
is always complete. UIDs are validated before they become path parts.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.filereader import data_element_generator
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from dicom_node.errors import (
    DatasetTooLargeError,
    DiskFullError,
    InvalidUIDError,
    UnreadableDatasetError,
)

logger = logging.getLogger(__name__)

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
UNDEFINED_LENGTH = 0xFFFFFFFF
HEADER_TAGS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "PatientID", "IssuerOfPatientID",
)


def check_uid(value: object, name: str) -> str:
    """Return ``value`` as a UID string, or raise :class:`InvalidUIDError`.

    A valid UID is 1–64 characters of dot-separated numbers without leading
    zeros, so it is safe as a file or folder name.
    """
    text = str(value or "").strip("\x00 ")
    if not text:
        raise InvalidUIDError(f"{name} is missing")
    if len(text) > 64 or not UID_PATTERN.match(text):
        raise InvalidUIDError(f"{name} is not a valid UID")
    return text


@dataclass(frozen=True)
class InstanceHeader:
    """What the node needs of a received data set, read without its pixel data."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str | None
    issuer_of_patient_id: str | None
    size_bytes: int


def read_header(path: Path) -> InstanceHeader:
    """Read and check the header of the DICOM file at ``path``.

    Raises :class:`UnreadableDatasetError` when the file cannot be parsed or is
    truncated (an element runs past the end of the file), and
    :class:`InvalidUIDError` when a UID that becomes a path part is missing or bad.
    """
    size = path.stat().st_size
    try:
        dataset = dcmread(path, stop_before_pixels=True)
        values = {tag: dataset.get(tag) for tag in HEADER_TAGS}
        transfer_syntax = UID(dataset.file_meta.TransferSyntaxUID)
        if transfer_syntax != DeflatedExplicitVRLittleEndian:  # inflating checks its own end
            _check_complete(path, transfer_syntax, size)
    except UnreadableDatasetError:
        raise
    except RecursionError as exc:
        raise UnreadableDatasetError("data set cannot be decoded: sequences nested too deeply") from exc
    except struct.error as exc:
        raise UnreadableDatasetError("data set truncated inside an element header") from exc
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, AttributeError,
            OSError, NotImplementedError) as exc:
        raise UnreadableDatasetError(f"data set cannot be decoded: {type(exc).__name__}") from exc
    return InstanceHeader(
        sop_class_uid=check_uid(values["SOPClassUID"], "SOP Class UID"),
        sop_instance_uid=check_uid(values["SOPInstanceUID"], "SOP Instance UID"),
        study_instance_uid=check_uid(values["StudyInstanceUID"], "Study Instance UID"),
        series_instance_uid=check_uid(values["SeriesInstanceUID"], "Series Instance UID"),
        transfer_syntax_uid=str(transfer_syntax),
        patient_id=str(values["PatientID"]) if values["PatientID"] else None,
        issuer_of_patient_id=str(values["IssuerOfPatientID"]) if values["IssuerOfPatientID"] else None,
        size_bytes=size,
    )


def _check_complete(path: Path, transfer_syntax: UID, size: int) -> None:
    """Raise :class:`UnreadableDatasetError` when a top-level element runs past the file's end,
    or the file ends inside an element's header (after the last complete element)."""
    with path.open("rb") as fp:
        fp.seek(128 + 4 + 8)  # preamble, "DICM", then (0002,0000) UL group length
        group_length = int.from_bytes(fp.read(4), "little")
        fp.seek(group_length, 1)
        end = fp.tell()
        elements = data_element_generator(fp, transfer_syntax.is_implicit_VR,
                                          transfer_syntax.is_little_endian, defer_size=256)
        try:
            for element in elements:
                if (isinstance(element, RawDataElement) and element.length != UNDEFINED_LENGTH
                        and (element.value_tell or 0) + element.length > size):
                    raise UnreadableDatasetError(
                        f"data set truncated: element {element.tag} runs past the end")
                end = fp.tell()
        except struct.error as exc:  # an element header cut short
            raise UnreadableDatasetError("data set truncated inside an element header") from exc
    if end != size:
        raise UnreadableDatasetError(
            f"data set truncated: the file ends {size - end} byte(s) into an element header")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """The spool folder: where incoming data sets land and where kept ones live."""

    def __init__(self, root: Path, *, min_free_bytes: int, max_dataset_bytes: int) -> None:
        self.root = root
        self.incoming = root / ".incoming"
        self.min_free_bytes = min_free_bytes
        self.max_dataset_bytes = max_dataset_bytes
        self.incoming.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_free_space(self) -> None:
        """Raise :class:`DiskFullError` when free disk is below the configured minimum."""
        if self.free_bytes() < self.min_free_bytes:
            raise DiskFullError("free disk space is below the configured minimum")

    def check_size(self, size: int) -> None:
        """Raise :class:`DatasetTooLargeError` when ``size`` exceeds the configured maximum."""
        if size > self.max_dataset_bytes:
            raise DatasetTooLargeError(
                f"data set of {size} bytes exceeds the limit of {self.max_dataset_bytes}"
            )

    def path_for(self, header: InstanceHeader) -> Path:
        return (self.root / header.study_instance_uid / header.series_instance_uid
                / f"{header.sop_instance_uid}.dcm")

    def commit(self, received: Path, header: InstanceHeader) -> Path:
        """Make ``received`` durable under its final name and return that path.

        The file is fsynced, renamed into place (replacing an earlier copy of the
        same instance), and its folder fsynced, so it survives a crash.
        """
        final = self.path_for(header)
        final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _fsync_path(received)
        os.chmod(received, 0o600)
        os.replace(received, final)
        _fsync_path(final.parent)
        return final

    def discard_incoming(self) -> int:
        """Delete partial files left in ``.incoming`` by a crash; return how many."""
        count = 0
        for leftover in self.incoming.iterdir():
            leftover.unlink(missing_ok=True)
            count += 1
        return count
