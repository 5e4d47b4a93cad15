"""Benchmark: `latest` cost vs history size, and commit+verify cost vs the DCP save.

Runs against a real local SeaweedFS (started here). Prints numbers side by side
and writes them to benchmarks/results/catalog_latest.json.

1. `latest` latency and S3 request count with 10/100/1000/10000 committed step
   folders (small objects), for the catalog (LATEST pointer + verify) and for
   TorchTitan's own discovery (`CheckpointManager._find_load_step`: list the
   folder, then probe `.metadata` in every step folder) on the same bucket.
2. commit + verify (shallow and deep) time as a fraction of `dcp.save` of the
   same checkpoint straight to s3:// (FsspecWriter, 1 writer).

    python benchmarks/catalog_latest.py [--sizes 10,100,1000,10000] [--params-mb 100]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from supervisor.store import manifest as mf  # noqa: E402
from supervisor.store.catalog import Catalog  # noqa: E402
from supervisor.store.local_server import LocalObjectStore  # noqa: E402
from tests.store.tcp_proxy import FaultProxy  # noqa: E402


def _connect(fs) -> None:
    """Set up the s3fs client (no request is sent): client start-up is per process, not per call."""
    import fsspec.asyn

    fsspec.asyn.sync(fs.loop, fs.set_session)


def _populate(url: str, n: int, metadata: bytes, shard: bytes) -> None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True)
    listing = {
        ".metadata": {"size": len(metadata), "ETag": hashlib.md5(metadata).hexdigest(), "type": "file"},
        "__0_0.distcp": {"size": len(shard), "ETag": hashlib.md5(shard).hexdigest(), "type": "file"},
    }
    objects = {}
    for step in range(1, n + 1):
        d = f"{root}/step-{step}"
        manifest = mf.build_manifest(step, listing, world_size=1, writer="bench", versions={}, created="bench")
        objects[f"{d}/.metadata"] = metadata
        objects[f"{d}/__0_0.distcp"] = shard
        objects[f"{d}/{mf.COMMIT}"] = json.dumps(manifest).encode()
    objects[f"{root}/{mf.POINTER}"] = json.dumps({"step": n}).encode()
    fs.pipe(objects, batch_size=64)


def _time(prepare, proxy: FaultProxy, repeats: int):
    """Median latency and request count (seen on the wire by the proxy) of prepare()'s call."""
    times, counts, result = [], [], None
    for _ in range(repeats):
        call = prepare()
        before = proxy.requests
        t = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - t)
        counts.append(proxy.requests - before)
    return statistics.median(times), max(counts), result


def bench_latest(store: LocalObjectStore, sizes, repeats: int, metadata: bytes, shard: bytes) -> list[dict]:
    import fsspec
    from torchtitan.components.checkpointer.dcp import CheckpointManager

    rows = []
    for n in sizes:
        url = store.url(f"bench-latest/n{n}")
        t = time.perf_counter()
        _populate(url, n, metadata, shard)
        populate_s = time.perf_counter() - t

        def ours():
            cat = Catalog(url)
            _connect(cat.store.fs)
            return lambda: cat.latest().step

        def titan():
            cls = fsspec.get_filesystem_class("s3")
            cls.clear_instance_cache()  # a fresh process: no listings cache
            _connect(fsspec.filesystem("s3"))  # the instance torchtitan.tools.filesystem will get
            return lambda: CheckpointManager._find_load_step(None, folder=url)

        with FaultProxy(store.ports["s3"]) as proxy:  # counts requests; both sides go through it
            os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
            ours_s, ours_req, ours_step = _time(ours, proxy, repeats)
            titan_s, titan_req, titan_step = _time(titan, proxy, repeats if n < 10000 else 1)
            os.environ["AWS_ENDPOINT_URL"] = store.endpoint
        assert ours_step == titan_step == n, (ours_step, titan_step, n)
        rows.append({"steps": n, "ours_s": ours_s, "ours_requests": ours_req, "titan_s": titan_s,
                     "titan_requests": titan_req, "speedup": titan_s / ours_s, "populate_s": populate_s})  # fmt: skip
        print(f"{n:>6} steps | catalog latest {ours_s * 1e3:8.1f} ms {ours_req:>6} req | "
              f"torchtitan discovery {titan_s * 1e3:9.1f} ms {titan_req:>6} req | {titan_s / ours_s:7.1f}x", flush=True)  # fmt: skip
    return rows


def bench_commit(store: LocalObjectStore, params_mb: int) -> dict:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    torch.manual_seed(0)
    n = params_mb * 2**20 // 4
    width = 2048
    state = {"model": {f"layer{i}": torch.randn(width, width) for i in range(max(1, n // (width * width)))}}
    url = store.url("bench-commit/ckpt")
    rows = []
    for step in (1, 2, 3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time.perf_counter()
            dcp.save(state, storage_writer=FsspecWriter(f"{url}/step-{step}", sync_files=False))
            save_s = time.perf_counter() - t
        cat = Catalog(url)
        cat.steps()  # client set-up is per process, not per commit
        t = time.perf_counter()
        cat.commit(step)
        commit_s = time.perf_counter() - t
        t = time.perf_counter()
        assert cat.verify(step).ok
        verify_s = time.perf_counter() - t
        t = time.perf_counter()
        assert cat.verify(step, deep=True).ok
        deep_s = time.perf_counter() - t
        rows.append((save_s, commit_s, verify_s, deep_s))
    save_s, commit_s, verify_s, deep_s = (statistics.median(c) for c in zip(*rows))
    size = sum(int(v.numel()) * 4 for v in state["model"].values())
    out = {"checkpoint_bytes": size, "save_s": save_s, "commit_s": commit_s, "verify_s": verify_s,
           "deep_verify_s": deep_s, "commit_plus_verify_fraction": (commit_s + verify_s) / save_s,
           "deep_verify_fraction": deep_s / save_s}  # fmt: skip
    print(f"checkpoint {size / 2**20:.0f} MiB: dcp.save {save_s:.2f}s | commit {commit_s * 1e3:.0f} ms + "
          f"verify {verify_s * 1e3:.0f} ms = {100 * out['commit_plus_verify_fraction']:.1f}% of save | "
          f"deep verify {deep_s:.2f}s = {100 * out['deep_verify_fraction']:.0f}% of save")  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100,1000,10000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--params-mb", type=int, default=100)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "catalog_latest.json"))
    args = parser.parse_args()
    import logging

    logging.getLogger("supervisor.store").setLevel(logging.ERROR)
    with LocalObjectStore() as store:
        os.environ.update(store.env)
        import fsspec
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        # one real tiny DCP save provides the .metadata/.distcp bytes copied into every step folder
        tiny = store.url("bench-seed/step-0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"w": torch.zeros(16)}, storage_writer=FsspecWriter(tiny, sync_files=False))
        fs, root = fsspec.core.url_to_fs(tiny, skip_instance_cache=True)
        metadata, shard = fs.cat_file(f"{root}/.metadata"), fs.cat_file(f"{root}/__0_0.distcp")
        from torchtitan.components.checkpointer.dcp import CheckpointManager

        seed_root = store.url("bench-seed")  # warm-up: module imports and botocore models load once
        Catalog(seed_root).latest()
        CheckpointManager._find_load_step(None, folder=seed_root)
        latest_rows = bench_latest(store, [int(s) for s in args.sizes.split(",")], args.repeats, metadata, shard)
        commit = bench_commit(store, args.params_mb)
    result = {"store": "SeaweedFS weed mini on loopback", "latest": latest_rows, "commit": commit,
              "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
