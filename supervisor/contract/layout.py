"""Every name under a run's checkpoints URL, in one place: what the launcher, the
node wrapper, the trainer, the store and the ledger read and write in the bucket.

    <run>/step-N/                .metadata, shards, _WRITTEN.json, _COMMIT.json, _QUARANTINE.json,
                                 _superseded/<time>/ (old markers of a step saved again)
    <run>/LATEST                 the newest committed step
    <run>/_canary/               the start-up probe's scratch objects (Catalog.prove_conditional_create)
    <run>/_ledger/               the run's journal (supervisor.ledger.journal)
    <run>/_supervise/            restarts.json (node.budget), nodes/node-R.json (its PeerMarks),
                                 stop.json (`supervise stop`'s request), env/<key>/ (store.envsnap)

A `_` folder is ignored by the catalog, retention and TorchTitan.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

STEP_RE = re.compile(r"^step-(\d+)$")  # exactly; TorchTitan's r"step-(\d+)" also matches bad-step-12
METADATA = ".metadata"
COMMIT = "_COMMIT.json"
WRITTEN = "_WRITTEN.json"  # the writers' record of a save: each file's size and MD5 (supervisor.titan.hashing)
QUARANTINE = "_QUARANTINE.json"
SUPERSEDED = "_superseded"
POINTER = "LATEST"
CANARY_DIR = "_canary"
LEDGER_DIR = "_ledger"
RECORDS = "_supervise"
RESTARTS = (RECORDS, "restarts.json")  # parts under the run, for a Store rooted at it
NODE_MARKS = (RECORDS, "nodes")
STOP_REQUEST = (RECORDS, "stop.json")  # `supervise stop` asks the nodes to save and stop: {"requested_at", "by"}


def parse_step(name: str) -> int | None:
    m = STEP_RE.match(name)
    return int(m.group(1)) if m else None


def step_dir(step: int) -> str:
    return f"step-{step}"


def node_mark(node: int) -> tuple[str, ...]:
    return (*NODE_MARKS, f"node-{node}.json")


@dataclass(frozen=True)
class RunLayout:
    """The URLs of one run's records, from its checkpoints URL."""

    url: str

    def _under(self, *parts: str) -> str:
        return "/".join((self.url.rstrip("/"), *parts))

    @property
    def ledger(self) -> str:
        return self._under(LEDGER_DIR)

    @property
    def stop_request(self) -> str:
        """The node wrapper polls it as a notice."""
        return self._under(*STOP_REQUEST)

    @property
    def env_snapshots(self) -> str:
        return self._under(RECORDS, "env")


def bucket_root(url: str) -> str:
    """`s3://b/prefix` -> `s3://b`: what a MOUNT/MOUNT_CACHED entry accepts; one bucket's reach."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}://{rest.partition('/')[0]}" if sep else url  # a local folder is its own reach


def ledger_url(checkpoints_url: str) -> str:
    return RunLayout(checkpoints_url).ledger


def stop_request_url(checkpoints_url: str) -> str:
    return RunLayout(checkpoints_url).stop_request
