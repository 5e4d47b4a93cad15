"""A stand-in for a Python package index (PyPI) on loopback, for machines that cannot
reach pypi.org: a PEP 503 simple index (`/simple/<project>/`, links with sha256)
served from a folder by the standard library's file server, for the real pip.

`failures`: HTTP statuses answered, one each, to the next requests before the index
serves normally again ([503, 503]: an index in trouble twice). An unknown project is
a 404, as on PyPI. Every request is logged in `requests`.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def tiny_wheel(folder: Path, name: str, version: str) -> Path:
    """A pure-Python wheel of one module `name` (enough for pip to install)."""
    info = f"{name}-{version}.dist-info"
    members = {
        f"{name}.py": f"VERSION = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: fakeindex\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    members[f"{info}/RECORD"] = "".join(f"{m},,\n" for m in members) + f"{info}/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, text in members.items():
            zf.writestr(member, text)
    return path


class FakeIndex:
    def __init__(self, root: Path, wheels: list[Path], host: str = "127.0.0.1"):
        (root / "files").mkdir(parents=True)
        for wheel in wheels:
            project = wheel.name.split("-")[0].replace("_", "-").lower()
            (root / "files" / wheel.name).write_bytes(wheel.read_bytes())
            sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
            page = root / "simple" / project / "index.html"
            page.parent.mkdir(parents=True, exist_ok=True)
            page.write_text(f'<a href="/files/{wheel.name}#sha256={sha}">{wheel.name}</a>\n')
        self.failures: list[int] = []
        self.requests: list[str] = []
        index = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                index.requests.append(self.path)
                if index.failures:
                    self.send_error(index.failures.pop(0))
                    return
                super().do_GET()

        self.server = ThreadingHTTPServer((host, 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://{host}:{self.server.server_address[1]}/simple"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeIndex":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
