"""A wheel of the supervise code being launched, so the nodes run exactly it.

The PyPI name `supervise` belongs to another project, and a release on PyPI
would lag the code a user launches anyway. So `start` packs the imported
`supervisor/` package (whatever is on disk now, editable install or not) with
the installed distribution's own METADATA and entry points into a wheel whose
version carries a hash of that content (`0.1.0+<hash>`): the same code gives
the same file, a change gives a new one. The wheel sits alone in a directory
that the task mounts (a directory: SkyPilot hard-links single-file mounts into
a temp dir, which fails across filesystems), and setup pip-installs that path.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import supervisor
from supervisor import DIST
from supervisor.errors import SuperviseError

REMOTE_DIR = "~/.supervise/wheel"  # where the nodes find it (a file_mounts destination)
_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed zip timestamps: same content, same bytes
_SKIP = re.compile(r"(^|/)__pycache__(/|$)|\.py[co]$")


@dataclass(frozen=True)
class Wheel:
    directory: Path  # holds only this wheel (the mount source)
    filename: str
    version: str  # base version + local tag of the content hash

    @property
    def remote_path(self) -> str:
        return f"{REMOTE_DIR}/{self.filename}"


def package_files(root: Path | None = None) -> dict[str, bytes]:
    """The package's files as wheel paths (`supervisor/...`) -> bytes, caches left out."""
    root = Path(supervisor.__file__).parent if root is None else root
    files = {}
    for path in sorted(root.rglob("*")):
        rel = f"{root.name}/{path.relative_to(root).as_posix()}"
        if path.is_file() and not _SKIP.search(rel):
            files[rel] = path.read_bytes()
    return files


def _dist_texts() -> tuple[str, str, str]:
    """(version, METADATA text, entry_points.txt text) of the installed distribution."""
    try:
        dist = metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        raise SuperviseError(f"cannot build the wheel the nodes install: distribution {DIST!r} is not installed; "
                             "run `pip install -e .` in the supervise checkout") from None
    meta = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
    return dist.version.split("+")[0], meta, dist.read_text("entry_points.txt") or ""


def content_hash(files: dict[str, bytes], meta: str, entry_points: str) -> str:
    h = hashlib.sha256()
    for name, data in sorted(files.items()):
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    h.update(meta.encode() + b"\0" + entry_points.encode())
    return h.hexdigest()[:12]


def wheel_bytes(files: dict[str, bytes], *, version: str, meta: str, entry_points: str) -> bytes:
    """A py3-none-any wheel (PEP 427) with a RECORD of every member."""
    info = f"{DIST.replace('-', '_')}-{version}.dist-info"
    meta = re.sub(r"(?m)^Version: .*$", f"Version: {version}", meta, count=1)
    members = dict(files)
    members[f"{info}/METADATA"] = meta.encode()
    members[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: supervise\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    if entry_points:
        members[f"{info}/entry_points.txt"] = entry_points.encode()
    members[f"{info}/top_level.txt"] = b"supervisor\n"
    record = []
    for name, data in members.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    members[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            entry = zipfile.ZipInfo(name, date_time=_EPOCH)
            entry.external_attr = 0o644 << 16
            zf.writestr(entry, data, compress_type=zipfile.ZIP_DEFLATED)
    return buf.getvalue()


def build(out_root: Path) -> Wheel:
    """The wheel of the code on disk, in `out_root/<hash>/` (reused when already built)."""
    files = package_files()
    base, meta, entry_points = _dist_texts()
    digest = content_hash(files, meta, entry_points)
    version = f"{base}+{digest}"
    filename = f"{DIST.replace('-', '_')}-{version}-py3-none-any.whl"
    directory = out_root / digest
    target = directory / filename
    if not target.exists():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{filename}.{os.getpid()}"
        tmp.write_bytes(wheel_bytes(files, version=version, meta=meta, entry_points=entry_points))
        tmp.replace(target)  # atomic: a concurrent start never mounts half a wheel
    return Wheel(directory=directory, filename=filename, version=version)
