"""An HTTP server on loopback standing for a FHIR server or a webhook: it records every POST
and answers with the statuses a test scripts."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


#: Makes the body of a 2xx answer from the request's JSON (None: no body).
AnswerBody = Callable[[Any], Any]


def transaction_response(bundle: Any) -> Any:
    """Return the transaction-response Bundle a FHIR server answers to ``bundle``: 201 per entry."""
    return {"resourceType": "Bundle", "type": "transaction-response",
            "entry": [{"response": {"status": "201 Created"}} for _ in bundle.get("entry", [])]}


class HttpReceiver:
    """Records POSTs; answers each with the next of ``statuses`` (then ``status`` for ever);
    over HTTPS with ``tls`` (certificate, private key)."""

    def __init__(self, *, status: int = 200, answer: AnswerBody | None = None,
                 tls: tuple[Path, Path] | None = None) -> None:
        self.status = status
        self.statuses: list[int] = []
        self.answer = answer
        self.received: list[Received] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.received.append(Received(self.path, dict(self.headers), body))
                status = receiver.statuses.pop(0) if receiver.statuses else receiver.status
                reply = b""
                if 200 <= status < 300 and receiver.answer is not None:
                    reply = json.dumps(receiver.answer(json.loads(body))).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> HttpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
