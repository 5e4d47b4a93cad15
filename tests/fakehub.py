"""A stand-in for the Hugging Face Hub on loopback, for machines that cannot reach
huggingface.co. It stands in for the hub only: the node runs the real `hf
download` of the installed huggingface_hub, pointed here with HF_ENDPOINT.

It serves one model repo from a local folder, with the calls `hf download REPO
--include ...` makes (huggingface_hub 1.x, `snapshot_download`): the repo info
(`/api/models/{repo}/revision/{rev}`: sha and file list), the file tree
(`/api/models/{repo}/tree/{rev}`, which newer 1.x releases list instead) and
each file (`/{repo}/resolve/{rev}/{file}`, HEAD and GET, with the ETag, commit
and size headers `hf_hub_download` reads), and `HfApi.auth_check`'s
`/api/models/{repo}/auth-check`. Every request is logged in `requests`.

`access`: None serves a public repo; a set of tokens makes it gated as the Hub
does (huggingface_hub's hf_raise_for_status reads X-Error-Code GatedRepo): no
token -> 401, a token without access -> 403; a token in the set reads it.
`failures`: HTTP statuses answered, one each, to the next requests before the hub
serves normally again ([503, 503]: a hub in trouble twice).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class FakeHub:
    def __init__(self, repo_id: str, folder: Path, host: str = "127.0.0.1", access: set[str] | None = None):
        self.repo_id, self.folder, self.access = repo_id, Path(folder), access
        self.files = {p.relative_to(self.folder).as_posix(): p for p in sorted(self.folder.rglob("*")) if p.is_file()}
        self.sha = hashlib.sha1(b"".join(p.read_bytes() for p in self.files.values())).hexdigest()
        self.requests: list[tuple[str, str]] = []
        self.failures: list[int] = []  # statuses served, one each, to the next requests (e.g. [503, 503])
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                hub.requests.append((self.command, path))
                if hub.failures:  # a hub in trouble (5xx) answers these first
                    self._reply(hub.failures.pop(0), b'{"error": "stand-in hub trouble"}', {}, body)
                    return
                info = f"/api/models/{hub.repo_id}/revision/"
                tree = f"/api/models/{hub.repo_id}/tree/"
                resolve = f"/{hub.repo_id}/resolve/"
                if path.endswith("/auth-check") and path != f"/api/models/{hub.repo_id}/auth-check":
                    self._reply(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, body)
                elif (denied := self._denied()) is not None:
                    self._reply(denied, b'{"error": "gated"}', {
                        "X-Error-Code": "GatedRepo",
                        "X-Error-Message": f"Access to model {hub.repo_id} is restricted. You must have access to it "
                                           "and be authenticated to access it. Please log in."}, body)
                elif path == f"/api/models/{hub.repo_id}/auth-check":
                    self._reply(200, b"{}", {"Content-Type": "application/json"}, body)
                elif path.startswith(tree):
                    data = json.dumps([{"type": "file", "path": name, "size": p.stat().st_size,
                                        "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
                                       for name, p in hub.files.items()]).encode()
                    self._reply(200, data, {"Content-Type": "application/json"}, body)
                elif path.startswith(info):
                    data = json.dumps({"id": hub.repo_id, "modelId": hub.repo_id, "sha": hub.sha, "private": False,
                                       "siblings": [{"rfilename": name} for name in hub.files]}).encode()
                    self._reply(200, data, {"Content-Type": "application/json"}, body)
                elif path.startswith(resolve) and (name := path[len(resolve):].split("/", 1)[-1]) in hub.files:
                    data = hub.files[name].read_bytes()
                    etag = hashlib.sha1(data).hexdigest()
                    self._reply(200, data, {"ETag": f'"{etag}"', "X-Repo-Commit": hub.sha,
                                            "Content-Type": "application/octet-stream"}, body)
                else:
                    self._reply(404, b'{"error": "not found"}', {"X-Error-Code": "EntryNotFound"}, body)

            def _denied(self) -> int | None:
                if hub.access is None:
                    return None
                auth = self.headers.get("Authorization", "")
                token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
                return None if token in hub.access else 401 if token is None else 403

            def _reply(self, code: int, data: bytes, headers: dict[str, str], body: bool) -> None:
                self.send_response(code)
                for key, value in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(key, value)
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.endpoint = f"http://{host}:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
