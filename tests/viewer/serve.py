"""OHIF's built viewer and Orthanc's DICOMweb at one origin, for the viewer test.

``/dicom-web/…`` is proxied to Orthanc, ``/app-config.js`` is the test's configuration, any
other path is a file of the viewer's ``dist/`` or, when there is no such file, ``index.html``
(the viewer's own routes, such as ``/viewer``).

    python3 serve.py PORT DIST APP_CONFIG ORTHANC_URL
"""

from __future__ import annotations

import shutil
import sys
import urllib.error
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class ViewerHandler(SimpleHTTPRequestHandler):
    """Serves one GET: proxied, the configuration, a file or ``index.html``."""

    app_config: Path
    orthanc: str

    def do_GET(self) -> None:
        if self.path.startswith("/dicom-web/"):
            self._proxy()
        elif self.path.split("?")[0] == "/app-config.js":
            self._send(200, "application/javascript", self.app_config.read_bytes())
        else:
            if not Path(self.translate_path(self.path)).is_file():
                self.path = "/index.html"
            super().do_GET()

    def _proxy(self) -> None:
        """Send the request on to Orthanc with its Accept header; copy back status, type and body."""
        request = urllib.request.Request(self.orthanc + self.path, headers={"Accept": self.headers.get("Accept", "*/*")})
        try:
            response = urllib.request.urlopen(request, timeout=120)
        except urllib.error.HTTPError as error:
            response = error
        with response:
            self.send_response(response.status)
            self.send_header("Content-Type", response.headers.get("Content-Type", "application/octet-stream"))
            self.end_headers()
            shutil.copyfileobj(response, self.wfile)

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main(port: str, dist: str, app_config: str, orthanc: str) -> None:
    ViewerHandler.app_config, ViewerHandler.orthanc = Path(app_config), orthanc.rstrip("/")
    ViewerHandler.extensions_map = {**ViewerHandler.extensions_map, ".wasm": "application/wasm",
                                    ".js": "application/javascript"}
    server = ThreadingHTTPServer(("127.0.0.1", int(port)),
                                 lambda *args: ViewerHandler(*args, directory=dist))
    print(f"serving {dist} on 127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(*sys.argv[1:])
