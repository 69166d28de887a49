"""A stand-in for the Hugging Face Hub, serving one model folder over HTTP (``HF_ENDPOINT``).

Model hubs are unreachable from the test machines; this answers the requests
``huggingface_hub.snapshot_download`` makes (the repo's commit and file tree, then each file's
metadata and bytes), slowly enough on request that a download's progress can be watched.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repo: str, folder: Path, chunk_delay_s: float = 0.0) -> None:
        self.repo, self.folder, self.chunk_delay_s = repo, folder, chunk_delay_s
        self.files = sorted(p.name for p in folder.iterdir() if p.is_file())
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.sending = threading.Event()  # set once a file's bytes start to go out

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                path = self.path.split("?")[0]
                if path.startswith(f"/api/models/{hub.repo}/tree/"):
                    tree = [{"type": "file", "path": name, "size": (hub.folder / name).stat().st_size,
                             "oid": hashlib.sha1((hub.folder / name).read_bytes()).hexdigest()}
                            for name in hub.files]  # fmt: skip
                    return self._send(200, json.dumps(tree).encode(), "application/json", body)
                if path.startswith(f"/api/models/{hub.repo}"):
                    info = {"id": hub.repo, "modelId": hub.repo, "sha": COMMIT, "private": False,
                            "siblings": [{"rfilename": name} for name in hub.files]}  # fmt: skip
                    return self._send(200, json.dumps(info).encode(), "application/json", body)
                prefix = f"/{hub.repo}/resolve/"
                if path.startswith(prefix):
                    name = path[len(prefix) :].split("/", 1)[1]
                    if name in hub.files:
                        data = (hub.folder / name).read_bytes()
                        return self._send(200, data, "application/octet-stream", body,
                                          {"ETag": f'"{hashlib.sha256(data).hexdigest()}"'})  # fmt: skip
                self._send(404, b'{"error": "not found"}', "application/json", body, {"X-Error-Code": "EntryNotFound"})

            def _send(self, status: int, data: bytes, kind: str, body: bool, extra: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("X-Repo-Commit", COMMIT)
                for key, value in (extra or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if not body:
                    return
                if kind == "application/octet-stream":
                    hub.sending.set()
                for start in range(0, len(data), 65536):
                    self.wfile.write(data[start : start + 65536])
                    if hub.chunk_delay_s:
                        time.sleep(hub.chunk_delay_s)

        return Handler
