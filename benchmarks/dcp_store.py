"""DCP save and load through fsspec to the embedded S3 store (SeaweedFS on
loopback) vs the best raw parallel put/get of the same bytes (issue 12),
measured side by side in one run on this machine.

One process, one rank: a state dict of `--tensors` float32 tensors, `--mib` MiB
in all. DCP (`torch.distributed.checkpoint`, the writer TorchTitan gets for an
`s3://` checkpoint folder: FsspecWriter, one file per rank per thread) saves it
with thread_count 1 (TorchTitan's default: it passes no storage writer) and with
more threads; then the same bytes go up as plain objects through s3fs, one
object per DCP file and concurrently (`fs.pipe` of a dict: s3fs's own
asyncio batch), which is the best this client does for those bytes. Loads: DCP
load with TorchTitan's reader (FsspecReader, fsspec's default: one 50 MiB ranged
read at a time) and with the supervised trainer's (supervisor/titan/store_reader.py:
each file as concurrent ranged GETs), for the widest layout and for TorchTitan's
one file per rank, vs the best raw get of the same bytes: the files as objects
concurrently, and for the one file a single GET or the same ranged GETs
(`fs.cat_ranges`), whichever is faster. Every transfer goes through one warm
client (the readers get the benchmark's S3FileSystem): a process's first
request also pays importing s3fs and creating the client, measured apart in
fresh interpreters, cold and with the backend imported in the background
during a stand-in for the model build, as the supervised trainer does
(`import_backend_in_background`). Each timing is the best of `--repeat` runs,
alternated. Numbers are printed and written to benchmarks/results/dcp_store.json.

    OMP_NUM_THREADS=1 python benchmarks/dcp_store.py [--mib 256] [--tensors 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from supervisor.store.local_server import LocalObjectStore  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", default="1,2,4,8", help="DCP writer thread counts to try")
    args = parser.parse_args()

    import os

    import s3fs
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    from supervisor.titan.policy import LOAD_PART_BYTES
    from supervisor.titan.store_reader import PartsReader

    per = args.mib * 2**20 // args.tensors // 4
    state = {f"layer{i}.weight": torch.randn(per, generator=torch.Generator().manual_seed(i)) for i in range(args.tensors)}
    nbytes = sum(t.numel() * 4 for t in state.values())
    threads = [int(t) for t in args.threads.split(",")]

    with tempfile.TemporaryDirectory(prefix="dcp-bench-") as tmp, LocalObjectStore(Path(tmp) / "s3") as store:
        os.environ.update(store.env)
        fs = s3fs.S3FileSystem(endpoint_url=store.endpoint, key=store.env["AWS_ACCESS_KEY_ID"],
                               secret=store.env["AWS_SECRET_ACCESS_KEY"])
        rounds: dict[str, list[float]] = {}
        layouts: dict[int, dict[str, int]] = {}

        def timed(label: str, fn) -> None:
            t0 = time.perf_counter()
            fn()
            rounds.setdefault(label, []).append(time.perf_counter() - t0)

        for r in range(args.repeat):
            for n in threads:
                url = store.url(f"dcp-t{n}-r{r}")
                timed(f"dcp_save_t{n}", lambda: dcp.save(state, storage_writer=FsspecWriter(url, thread_count=n,
                                                                                          sync_files=False)))
                root = url.removeprefix("s3://")
                layouts[n] = {p: fs.size(p) for p in fs.find(root) if p.endswith(".distcp")}
            # raw: the same files (those of the widest DCP layout) as plain objects, all at once
            widest = max(threads)
            src = {p: fs.cat_file(p) for p in layouts[widest]}
            raw_root = f"{store.bucket}/raw-r{r}"
            blobs = {f"{raw_root}/{Path(p).name}": data for p, data in src.items()}
            timed("raw_put", lambda: fs.pipe(blobs))
            single = {f"{raw_root}-one/all.bin": b"".join(src.values())}
            timed("raw_put_one_object", lambda: fs.pipe(single))

            for label, layout, make in (("dcp_load", widest, FsspecReader), ("dcp_load_parts", widest, PartsReader),
                                        ("dcp_load_t1", 1, FsspecReader), ("dcp_load_t1_parts", 1, PartsReader)):
                target = {k: torch.empty_like(v) for k, v in state.items()}
                reader = make(store.url(f"dcp-t{layout}-r{r}"))
                reader.fs.fs = fs  # the raw transfers' warm client
                timed(label, lambda: dcp.load(target, storage_reader=reader))
                assert all(torch.equal(target[k], state[k]) for k in state), f"{label} returned other bytes"
            (one, size), = layouts[1].items()
            starts = list(range(0, size, LOAD_PART_BYTES))
            timed("raw_get_t1", lambda: fs.cat(one))
            timed("raw_get_t1_ranges", lambda: fs.cat_ranges([one] * len(starts), starts,
                                                              [min(s + LOAD_PART_BYTES, size) for s in starts]))
            timed("raw_get", lambda: fs.cat(list(blobs)))
            for label, warm in (("first_request_cold", False), ("first_request_after_background_import", True)):
                rounds.setdefault(label, []).append(first_request_s(store.url(f"dcp-t1-r{r}/.metadata"), warm))

    best = {k: min(v) for k, v in rounds.items()}
    mib = nbytes / 2**20
    result = {
        "bytes": nbytes, "tensors": args.tensors, "repeat": args.repeat,
        "files_per_thread_count": {n: len(files) for n, files in layouts.items()},
        "best_s": {k: round(v, 3) for k, v in best.items()},
        "mib_per_s": {k: round(mib / v, 1) for k, v in best.items()},
        "save_ratio_vs_raw_put": {f"t{n}": round(best["raw_put"] / best[f"dcp_save_t{n}"], 2) for n in threads},
        "load_ratio_vs_raw_get": {k: round(best["raw_get"] / best[k], 2) for k in ("dcp_load", "dcp_load_parts")},
        "first_request_saved_s": round(best["first_request_cold"] - best["first_request_after_background_import"], 3),
        "load_ratio_vs_raw_get_one_file": {k: round(min(best["raw_get_t1"], best["raw_get_t1_ranges"]) / best[k], 2)
                                           for k in ("dcp_load_t1", "dcp_load_t1_parts")},  # fmt: skip
    }
    out = REPO / "benchmarks" / "results" / "dcp_store.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"written to {out}")


FIRST_REQUEST = """
import sys, time
from supervisor.titan.store_reader import import_backend_in_background
url, warm = sys.argv[1], sys.argv[2] == "1"
if warm:
    import_backend_in_background(url)
time.sleep(2.0)  # stands in for TorchTitan building the model
begin = time.perf_counter()
import fsspec
fs, path = fsspec.core.url_to_fs(url)
fs.info(path)
print(time.perf_counter() - begin)
"""


def first_request_s(url: str, background_import: bool) -> float:
    """A fresh process's first request to the store: import, client, one HEAD."""
    done = subprocess.run([sys.executable, "-c", FIRST_REQUEST, url, "1" if background_import else "0"],
                          capture_output=True, text=True, check=True, cwd=REPO)
    return float(done.stdout.split()[-1])


if __name__ == "__main__":
    main()
