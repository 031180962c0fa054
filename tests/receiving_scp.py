"""A pynetdicom storage SCP for tests: records every C-STORE and answers a chosen status."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from tests.conftest import free_port


class ReceivingSCP:
    """Listens on loopback; ``status`` is what every C-STORE is answered (0x0000 by default)."""

    def __init__(self, ae_title: str = "PACS", port: int | None = None,
                 folder: Path | None = None) -> None:
        self.ae_title = ae_title
        self.port = port or free_port()
        self.folder = folder
        self.status = 0x0000
        self.received: Counter[str] = Counter()
        self.stored: dict[str, str] = {}  # SOP Instance UID -> SOP Class UID, when answered success or warning
        self.associations = 0  # accepted so far
        self._lock = threading.Lock()
        self._server = None

    def start(self) -> ReceivingSCP:
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(Verification)
        syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless]
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store),
                                                     (evt.EVT_ACCEPTED, self._on_accepted)])
        return self

    def _on_accepted(self, event: Event) -> None:
        with self._lock:
            self.associations += 1

    def _on_store(self, event: Event) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        uid = str(dataset.SOPInstanceUID)
        with self._lock:
            self.received[uid] += 1
            if code_to_category(self.status) in (STATUS_SUCCESS, STATUS_WARNING):  # the peer stored it
                self.stored[uid] = str(dataset.SOPClassUID)
                if self.folder is not None:
                    self.folder.mkdir(parents=True, exist_ok=True)
                    dataset.save_as(self.folder / f"{uid}.dcm", enforce_file_format=True)
        return self.status

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
