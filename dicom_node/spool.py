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
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomFileLike
from pydicom.filereader import data_element_generator, read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from dicom_node.errors import (
    DatasetTooLargeError,
    DiskFullError,
    ImageTooLargeError,
    InvalidUIDError,
    UnreadableDatasetError,
)

logger = logging.getLogger(__name__)

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
UNDEFINED_LENGTH = 0xFFFFFFFF
HEADER_TAGS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "PatientID", "IssuerOfPatientID", "Rows", "Columns", "NumberOfFrames",
)
INFLATE_STEP = 1 << 20
"""Bytes of deflated input read, and at most bytes of inflated output made, per inflation step."""


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
    rows: int = 0
    columns: int = 0
    frames: int = 1

    @property
    def megapixels(self) -> float:
        """Rows x Columns x frames, in millions: what decoding the image costs."""
        return self.rows * self.columns * self.frames / 1e6


def check_image_size(header: InstanceHeader, max_megapixels: float) -> None:
    """Raise :class:`ImageTooLargeError` when the image of ``header`` is over ``max_megapixels``
    (the setting ``scp.max_image_megapixels``)."""
    if header.megapixels > max_megapixels:
        raise ImageTooLargeError(
            f"image of {header.megapixels:.1f} megapixels ({header.rows} x {header.columns} x "
            f"{header.frames} frame(s)) exceeds scp.max_image_megapixels ({max_megapixels:g})")


def read_header(path: Path) -> InstanceHeader:
    """Read and check the header of the DICOM file at ``path``, without its pixel data.

    Raises :class:`UnreadableDatasetError` when the file cannot be parsed, is
    truncated (an element runs past the end of the file) or is still deflated (see
    :meth:`Spool.inflate`: reading it would inflate it whole in memory), and
    :class:`InvalidUIDError` when a UID that becomes a path part is missing or bad.
    """
    size = path.stat().st_size
    try:
        transfer_syntax = UID(read_file_meta_info(path).TransferSyntaxUID)
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            raise UnreadableDatasetError("deflated data set not inflated before reading")
        dataset = dcmread(path, stop_before_pixels=True)
        values = {tag: dataset.get(tag) for tag in HEADER_TAGS}
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
        rows=_count(values["Rows"], "Rows"),
        columns=_count(values["Columns"], "Columns"),
        frames=max(_count(values["NumberOfFrames"], "Number of Frames"), 1),
    )


def _count(value: object, name: str) -> int:
    """Return an image dimension (``None``: 0), or raise :class:`UnreadableDatasetError`."""
    try:
        return int(value or 0)  # type: ignore[call-overload]
    except (TypeError, ValueError) as exc:
        raise UnreadableDatasetError(f"{name} is not a number") from exc


def _data_set_offset(fp: BinaryIO) -> int:
    """Return where the data set starts in a received file: after the preamble, "DICM" and the
    file meta group, whose (0002,0000) group length pynetdicom always writes first."""
    fp.seek(128 + 4 + 8)  # preamble, "DICM", then the tag, VR and length of (0002,0000)
    return 128 + 4 + 12 + int.from_bytes(fp.read(4), "little")


def _check_complete(path: Path, transfer_syntax: UID, size: int) -> None:
    """Raise :class:`UnreadableDatasetError` when a top-level element runs past the file's end,
    or the file ends inside an element's header (after the last complete element)."""
    with path.open("rb") as fp:
        fp.seek(_data_set_offset(fp))
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


def _inflated_steps(source: BinaryIO) -> Iterator[bytes]:
    """Yield the inflated bytes of the raw deflate stream read from ``source``, at most
    :data:`INFLATE_STEP` at a time, so that no step holds more than that in memory.

    Raises :class:`UnreadableDatasetError` when the stream is corrupt or ends early.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    tail = b""
    try:
        while not inflater.eof:
            data = tail or source.read(INFLATE_STEP)
            out = inflater.decompress(data, INFLATE_STEP)
            tail = inflater.unconsumed_tail
            if not data and not out:
                raise UnreadableDatasetError("deflated data set ends before its deflate stream does")
            yield out
    except zlib.error as exc:
        raise UnreadableDatasetError("deflated data set cannot be inflated") from exc


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

    def inflate(self, received: Path) -> None:
        """Rewrite ``received`` in place as Explicit VR Little Endian when its data set is deflated,
        so that nothing ever inflates it again; leave any other file as it is.

        It is inflated in steps into ``.incoming`` and stopped as soon as it passes the
        maximum data set size: :class:`DatasetTooLargeError`, and nothing of it is kept.
        Raises :class:`UnreadableDatasetError` when its file meta or deflate stream is unreadable.
        """
        try:
            meta = read_file_meta_info(received)
        except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, AttributeError,
                struct.error) as exc:
            raise UnreadableDatasetError(f"file meta cannot be decoded: {type(exc).__name__}") from exc
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        inflated = self.incoming / f"{received.name}.inflated"
        try:
            with received.open("rb") as source, inflated.open("wb") as target:
                target.write(source.read(128) + b"DICM")
                write_file_meta_info(DicomFileLike(target), meta, enforce_standard=True)
                source.seek(_data_set_offset(source))
                size = 0
                for step in _inflated_steps(source):
                    size += len(step)
                    if size > self.max_dataset_bytes:
                        raise DatasetTooLargeError(
                            f"deflated data set inflates to more than the limit of {self.max_dataset_bytes} "
                            "bytes (scp.max_dataset_mb)")
                    target.write(step)
            os.replace(inflated, received)
        finally:
            inflated.unlink(missing_ok=True)
        logger.debug("Inflated a deflated data set to %d bytes", size)

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
