"""Scale rehearsal (issue 23): a model state of at least 4 GiB through the real
node wrapper, 2 CPU ranks, on the embedded S3 store (SeaweedFS on loopback),
every figure next to the best raw transfer of files of the same sizes, all in one run.

Runs, in order, each a `supervise node --nproc-per-node 2` on its own prefix,
checkpoints written straight to `s3://` (DIRECT: DCP through s3fs):

1. sync     uninterrupted, a sync save at every step (the last is TorchTitan's
            final save): save time, commit time, and the reference for 4.
2. async    `--checkpoint.async_mode async`, an async save at step 1 (the last is
            sync): time the training loop was blocked, and the upload.
3. probe    one sync save, every request of the node (wrapper and ranks) through
            a loopback TCP proxy (tests/store/tcp_proxy.py) that counts the bytes
            the store sent back: the bytes the commit read back are measured in the
            commit's window (ledger time stamps, proxy counter sampled every 5 ms),
            next to everything the store sent the node while it saved and committed.
            A separate run because the proxy slows uploads (Python, 2 cores).
4. notice   SIGTERM to the node's process group (as SkyPilot's graceful cancel
            sends it) after step 1; the trainer saves at the next step boundary,
            commits, exits 75: notice -> committed from the ledger. Then the node
            starts again and resumes (load time: TorchTitan's own log line), trains
            to the last step; its final checkpoint (model and optimizer tensors) and
            losses are compared bit for bit with run 1's.
5. raw      shard files of the same sizes (the sync run's step 2), as plain objects,
            through one warm s3fs client: put concurrently (one stream per file,
            like DCP's one writer thread per rank, and 8 parts in flight per file),
            get concurrently (whole objects, and 16 MiB ranged GETs as the
            product's reader issues them); two rounds, after run 1 and at the end
            (other work may share the machine), the best of each kind.

The model is TorchTitan's llama3 debug model made wider and deeper
(benchmarks/scale_configs.py): 4.11 GiB of fp32 parameters and AdamW moments by
default, `--gib N` for a shape of at least N GiB, `--quick` for the 0.33 GiB
smoke size. Prints a table and writes benchmarks/results/scale_rehearsal.json.

    OMP_NUM_THREADS=1 python benchmarks/scale_rehearsal.py [--quick | --gib 4] [--out PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.demo_goodput import _LOADED  # noqa: E402  TorchTitan's "Finished loading the checkpoint in X seconds"
from benchmarks.node_bench import SUPERVISE, free_port, heartbeat_step, wait_for  # noqa: E402
from supervisor.ledger.journal import read_events  # noqa: E402
from supervisor.contract.runtime import ledger_url  # noqa: E402
from supervisor.store import manifest as mf  # noqa: E402
from supervisor.store.catalog import Catalog  # noqa: E402
from supervisor.store.local_server import LocalObjectStore  # noqa: E402
from supervisor.titan import cpu_compat  # noqa: E402
from supervisor.titan.policy import LOAD_PART_BYTES  # noqa: E402
from supervisor.titan.results import load_tensors, read_losses, step_path, tensor_differences  # noqa: E402
from supervisor.titan.tinydata import build_assets, debug_model_args  # noqa: E402
from tests.store.tcp_proxy import FaultProxy  # noqa: E402

cpu_compat.apply()  # the configs below import TorchTitan's model code, which imports triton on a CPU machine
from benchmarks.scale_configs import checkpoint_bytes  # noqa: E402

STEPS = 3  # sync reference and notice run: SIGTERM after step 1, saved at step 2, the resume trains step 3
GIB = 2**30
SHAPES = {"quick": (1024, 2), "4g": (2048, 7)}  # benchmarks/scale_configs.py's named configs


def model_choice(quick: bool, gib: float | None) -> tuple[str, dict[str, str], int]:
    """(TorchTitan config name, env for its shape, checkpoint bytes expected)."""
    if quick:
        return "llama3_scale_quick", {}, checkpoint_bytes(*SHAPES["quick"])
    if gib is None:
        return "llama3_scale_4g", {}, checkpoint_bytes(*SHAPES["4g"])
    dim = 2048 if gib >= 1 else 1024
    layers = next(n for n in itertools.count(1) if checkpoint_bytes(dim, n) >= gib * GIB)
    env = {"SUPERVISE_SCALE_DIM": str(dim), "SUPERVISE_SCALE_LAYERS": str(layers)}
    return "llama3_scale", env, checkpoint_bytes(dim, layers)


class ByteSampler(threading.Thread):
    """(time, bytes the proxy sent to clients, requests) every `every_s`: what a
    window of wall time received, read off afterwards."""

    def __init__(self, proxy: FaultProxy, every_s: float = 0.005):
        super().__init__(daemon=True)
        self.proxy, self.every_s, self.samples = proxy, every_s, []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.time(), self.proxy.to_client_bytes, self.proxy.requests))
            time.sleep(self.every_s)

    def window(self, start: float, end: float) -> tuple[int, int]:
        """(bytes, requests) from the last sample at or before `start` to the first at or after `end`."""
        before = [s for s in self.samples if s[0] <= start] or self.samples[:1]
        after = [s for s in self.samples if s[0] >= end] or self.samples[-1:]
        return after[0][1] - before[-1][1], after[0][2] - before[-1][2]


class Rehearsal:
    def __init__(self, opts, work: Path, store: LocalObjectStore):
        self.work, self.store = work, store
        self.config, self.shape_env, self.expected_bytes = model_choice(opts.quick, opts.gib)
        self.assets = build_assets(work / "assets")
        self.env = {**os.environ, **store.env, **self.shape_env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def url(self, name: str) -> str:
        return self.store.url(f"rehearsal/{name}")

    def trainer_args(self, name: str, steps: int, interval: int, extra: tuple[str, ...] = ()) -> list[str]:
        # batch 1 x 64 tokens: a step of the 4 GiB model takes ~10 s on 2 cores; the saves are the subject
        args = debug_model_args(self.assets, self.work / name / "dump", steps=steps, checkpoint_interval=interval,
                                local_batch_size=1, seq_len=64)  # fmt: skip
        args[args.index("--module") + 1] = "benchmarks.scale_configs"
        args[args.index("--config") + 1] = self.config
        return [*args, *extra]

    def start(self, name: str, incarnation: str, trainer_args: list[str], endpoint: str | None = None):
        """`supervise node` in its own process group, as SkyPilot's `run` starts it."""
        run_dir, log = self.work / name / f"run-{incarnation}", self.work / name / f"node-{incarnation}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        argv = [SUPERVISE, "node", "--checkpoints", self.url(name), "--nproc-per-node", "2", "--cloud", "none",
                "--run-dir", str(run_dir), "--master-port", str(free_port()), "--", *trainer_args]  # fmt: skip
        env = {**self.env, **({"AWS_ENDPOINT_URL": endpoint} if endpoint else {})}
        proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        return proc, run_dir, log

    def run(self, name: str, steps: int, interval: int, extra: tuple[str, ...] = (), endpoint: str | None = None) -> dict:
        t0 = time.time()
        proc, _, log = self.start(name, "1", self.trainer_args(name, steps, interval, extra), endpoint)
        code = proc.wait(3600)
        if code != 0:
            raise RuntimeError(f"{name}: supervise node exited {code}; see {log}")
        return {"wall_s": round(time.time() - t0, 1), **self.ledger(name, since=t0)}

    def ledger(self, name: str, since: float = 0.0) -> dict:
        """Saves and commits of one run's incarnation(s) since `since`, from its ledger."""
        events = [e for e in read_events(ledger_url(self.url(name)))[0] if e.t >= since]
        of = lambda kind: [e for e in events if e.kind == kind]  # noqa: E731
        return {
            "events": events,
            "saved_s": {e.get("step"): e.get("duration_s") for e in of("checkpoint_saved")},
            "saved_at": {e.get("step"): e.t for e in of("checkpoint_saved")},
            "committed_s": {e.get("step"): e.get("duration_s") for e in of("checkpoint_committed")},
            "committed_at": {e.get("step"): e.t for e in of("checkpoint_committed")},
        }

    def drop(self, name: str) -> None:
        """A run's checkpoints once measured: the store's disk holds a few of them at 4 GiB each."""
        store = Catalog(self.url(name)).store
        store.fs.rm(store.root, recursive=True)

    def shards(self, name: str, step: int) -> dict[str, dict]:
        """The step's DCP shard objects: key -> listing entry (size, ETag)."""
        catalog = Catalog(self.url(name))
        listing = catalog.store.listdir(mf.step_dir(step))
        return {catalog.store.path(mf.step_dir(step), n): e for n, e in listing.items() if n.endswith(".distcp")}

    # -- the runs ------------------------------------------------------------------

    def sync(self) -> dict:
        out = self.run("sync", STEPS, 1)
        out["state_bytes"] = self.step_bytes("sync", STEPS)
        return out

    def asynchronous(self) -> dict:
        out = self.run("async", 2, 1, ("--checkpoint.async_mode", "async"))
        ev = out["events"]
        # the upload: save call -> upload complete, which the step boundary (or the final save) hands to the
        # committer at once: commit start is the upload's end, at most one step late
        saved = next(e for e in ev if e.kind == "checkpoint_saved" and e.get("step") == 1)
        began = saved.t - saved.get("duration_s")  # the save call; the event comes after the copy to CPU
        commit_start = out["committed_at"][1] - out["committed_s"][1]
        out["upload_s"] = round(commit_start - began, 3)
        self.drop("async")
        return out

    def probe(self) -> dict:
        """A sync save + commit with every request through the counting proxy."""
        with FaultProxy(self.store.ports["s3"]) as proxy:
            sampler = ByteSampler(proxy)
            sampler.start()
            try:
                out = self.run("probe", 1, 1, endpoint=proxy.endpoint)
                time.sleep(0.05)
            finally:
                sampler.stop.set()
                sampler.join()
            start = out["committed_at"][1] - out["committed_s"][1]
            received, requests = sampler.window(start, out["committed_at"][1])
            out.update(commit_received_bytes=received, commit_requests=requests,
                       node_received_bytes=proxy.to_client_bytes, node_requests=proxy.requests)  # fmt: skip
        listing = Catalog(self.url("probe")).store.listdir(mf.step_dir(1))
        # what the commit reads on purpose: DCP's .metadata and the writers' record
        out["commit_reads_objects_bytes"] = sum(int(listing[n]["size"]) for n in (mf.METADATA, mf.WRITTEN))
        shards = self.shards("probe", 1)
        out["shard_etags"] = sorted(mf.etag_of(e) or "" for e in shards.values())
        out["shard_bytes"] = sum(int(e["size"]) for e in shards.values())
        out["smallest_shard_bytes"] = min(int(e["size"]) for e in shards.values())
        out["manifest_hashes"] = Catalog(self.url("probe")).inspect(1).manifest["hashes"]
        self.drop("probe")
        return out

    def notice(self) -> dict:
        """SIGTERM after step 1: save at the notice, commit, exit 75; then the resume."""
        name = "notice"
        args = self.trainer_args(name, STEPS, 1000)  # no periodic save: the notice's is the only one
        t0 = time.time()
        proc, run_dir, log = self.start(name, "1", args)
        wait_for(lambda: heartbeat_step(run_dir) >= 1 or proc.poll() is not None, timeout=1800, interval=0.2)
        sent = time.time()
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(1800)
        exited = time.time()
        if code != 75:
            raise RuntimeError(f"notice: supervise node exited {code}, not 75; see {log}")
        first = self.ledger(name, since=t0)
        (note,) = [e for e in first["events"] if e.kind == "notice"]
        (step,) = first["committed_at"]
        received = note.get("received_at") or note.t
        save = next((e for e in first["events"] if e.kind == "notice_save"), None)
        out = {
            "notice_step": step,
            "notice_to_committed_s": round(first["committed_at"][step] - received, 3),
            "notice_save_s": first["saved_s"].get(step),
            "notice_commit_s": first["committed_s"][step],
            "signal_to_exit_s": round(exited - sent, 3),
            "notice_plan": {k: save.get(k) for k in ("predicted_s", "actual_s", "committed")} if save else None,
        }
        t1 = time.time()
        proc, _, log = self.start(name, "2", args)
        code = proc.wait(3600)
        if code != 0:
            raise RuntimeError(f"resume: supervise node exited {code}; see {log}")
        second = self.ledger(name, since=t1)
        (resumed,) = [e.get("step") for e in second["events"] if e.kind == "resume"]
        loads = [float(m.group(1)) for m in _LOADED.finditer(log.read_text(errors="replace"))]
        ready = next(e.t for e in second["events"] if e.kind == "trainer_ready")
        loaded = next(e.t for e in second["events"] if e.kind == "checkpoint_loaded")
        out.update(resumed_from=resumed, load_s=max(loads) if loads else None,
                   ready_to_loaded_s=round(loaded - ready, 3), resume_wall_s=round(time.time() - t1, 1))  # fmt: skip
        return out

    def step_bytes(self, name: str, step: int) -> int:
        return sum(int(e["size"]) for e in self.shards(name, step).values())

    def identical(self) -> dict:
        """The resumed run's final checkpoint and losses vs the uninterrupted run's, bit for bit."""
        ref = load_tensors(step_path(self.url("sync"), STEPS), model_only=False)
        got = load_tensors(step_path(self.url("notice"), STEPS), model_only=False)
        diffs = tensor_differences(ref, got)
        tensors, nbytes = len(ref), sum(t.numel() * t.element_size() for t in ref.values())
        del ref, got
        ref_loss, got_loss = read_losses(self.work / "sync" / "dump"), read_losses(self.work / "notice" / "dump")
        return {"tensors_compared": tensors, "tensor_bytes_compared": nbytes, "tensors_differing": diffs,
                "losses_reference": ref_loss, "losses_resumed": got_loss,
                "shard_md5s_equal": self.md5s("sync", STEPS) == self.md5s("notice", STEPS),
                "bit_identical": not diffs and ref_loss == got_loss}

    def md5s(self, name: str, step: int) -> dict[str, str]:
        """The shards' MD5s, as the writers recorded them in the step's commit manifest."""
        objects = Catalog(self.url(name)).inspect(step).manifest["objects"]
        return {k: v.get("md5") for k, v in objects.items() if k.endswith(".distcp")}


class RawTransfers:
    """Concurrent raw puts and gets of one step's shard files, through one warm s3fs
    client, in rounds between the runs (the machine is shared: the best of all rounds)."""

    PUTS = (("put_stream_per_file", 1), ("put_8_parts_per_file", 8))  # s3fs max_concurrency per file

    def __init__(self, bench: Rehearsal, name: str, step: int):
        import s3fs

        self.fs = s3fs.S3FileSystem(endpoint_url=bench.store.endpoint, key=bench.store.access_key,
                                    secret=bench.store.secret_key, skip_instance_cache=True)  # fmt: skip
        self.bucket, self.source = bench.store.bucket, f"{name}/step-{step}"
        self.sizes = {k: int(e["size"]) for k, e in bench.shards(name, step).items()}
        local = bench.work / "raw"
        local.mkdir(exist_ok=True)
        self.files = {k: str(local / Path(k).name) for k in self.sizes}
        self.fs.get(list(self.files), list(self.files.values()))  # the bytes to put, on local disk (page cache)
        self.times: dict[str, list[float]] = {}
        self.rounds = 0

    def _timed(self, label: str, fn) -> None:
        t = time.perf_counter()
        fn()
        self.times.setdefault(label, []).append(time.perf_counter() - t)

    def round(self, repeat: int) -> None:
        fs, sizes = self.fs, self.sizes
        starts = {k: range(0, n, LOAD_PART_BYTES) for k, n in sizes.items()}
        paths = [k for k in sizes for _ in starts[k]]
        begins = [b for k in sizes for b in starts[k]]
        ends = [min(b + LOAD_PART_BYTES, sizes[k]) for k in sizes for b in starts[k]]
        for _ in range(repeat):
            for label, conc in self.PUTS:
                dst = [f"{self.bucket}/raw/{label}/{Path(k).name}" for k in self.files]
                self._timed(label, lambda: fs.put(list(self.files.values()), dst, max_concurrency=conc))
                fs.rm(dst)  # the store's disk is not the subject
            self._timed("get_whole_objects", lambda: fs.cat(list(self.files)))
            self._timed("get_16mib_ranges", lambda: fs.cat_ranges(paths, begins, ends))
        self.rounds += 1

    def result(self) -> dict:
        best = {k: min(v) for k, v in self.times.items()}
        return {"bytes": sum(self.sizes.values()), "files": len(self.files), "source": self.source,
                "rounds": self.rounds, "best_s": best, "runs_s": self.times,
                "put_s": min(v for k, v in best.items() if k.startswith("put")),
                "get_s": min(v for k, v in best.items() if k.startswith("get"))}


def summarize(runs: dict) -> dict:
    sync, asy, probe, notice, raw = (runs[k] for k in ("sync", "async", "probe", "notice", "raw"))
    gib = raw["bytes"] / GIB
    sync_saves = [sync["saved_s"][s] for s in sorted(sync["saved_s"])]
    commits = [c for r in (sync, asy, probe) for c in r["committed_s"].values()] + [notice["notice_commit_s"]]
    save_mean = sum(sync_saves) / len(sync_saves)
    per_step = [sync["committed_s"][s] / sync["saved_s"][s] for s in sorted(sync["saved_s"])]
    return {
        "checkpoint_gib": round(gib, 3),
        "sync_save_s": sync_saves,
        "sync_save_gib_per_s": round(gib / save_mean, 3),
        "async_blocking_s": asy["saved_s"][1],
        "async_upload_s": asy["upload_s"],
        "commit_s": commits,
        "commit_over_save_max": round(max(per_step), 5),
        "raw_put_s": round(raw["put_s"], 3),
        "raw_put_gib_per_s": round(gib / raw["put_s"], 3),
        "save_over_raw_put": round(save_mean / raw["put_s"], 3),
        "async_upload_over_raw_put": round(asy["upload_s"] / raw["put_s"], 3),
        "commit_received_bytes": probe["commit_received_bytes"],
        "commit_received_other_bytes": probe["commit_received_bytes"] - probe["commit_reads_objects_bytes"],
        "node_received_bytes_while_saving_and_committing": probe["node_received_bytes"],
        "shards_multipart": all("-" in e for e in probe["shard_etags"]),
        "notice_to_committed_s": notice["notice_to_committed_s"],
        "load_s": notice["load_s"],
        "raw_get_s": round(raw["get_s"], 3),
        "raw_get_gib_per_s": round(gib / raw["get_s"], 3),
        "load_over_raw_get": round(notice["load_s"] / raw["get_s"], 3) if notice["load_s"] else None,
        "bit_identical": runs["identical"]["bit_identical"],
    }


def print_table(s: dict, runs: dict) -> None:
    n, p = runs["notice"], runs["probe"]
    commit = f"{s['commit_received_bytes']} B in {p['commit_requests']} requests"
    node = f"{s['node_received_bytes_while_saving_and_committing']} B in {p['node_requests']} requests"
    notice = (f"{s['notice_to_committed_s']:.1f} s (save {n['notice_save_s']:.1f} s, commit {n['notice_commit_s']:.2f} s;"
              f" signal -> exit {n['signal_to_exit_s']:.1f} s)")
    rows = [
        ("checkpoint (model + AdamW, 2 shards)", f"{s['checkpoint_gib']:.2f} GiB"),
        ("sync save, per save", ", ".join(f"{x:.1f}" for x in s["sync_save_s"]) + " s"),
        ("  best raw parallel put of files that size", f"{s['raw_put_s']:.1f} s ({s['raw_put_gib_per_s']:.2f} GiB/s)"),
        ("  save / raw put", f"{s['save_over_raw_put']:.2f}x"),
        ("async save: loop blocked", f"{s['async_blocking_s']:.2f} s"),
        ("async save: upload (save -> on store)", f"{s['async_upload_s']:.1f} s"),
        ("  upload / raw put", f"{s['async_upload_over_raw_put']:.2f}x"),
        ("commit, per commit", ", ".join(f"{x:.2f}" for x in s["commit_s"]) + " s"),
        ("commit / sync save (worst step; goal <= 1 %)", f"{100 * s['commit_over_save_max']:.2f} %"),
        ("store -> node during the commit (goal: no shard)", commit),
        ("  of which .metadata + _WRITTEN.json", f"{p['commit_reads_objects_bytes']} B"),
        ("  store -> node, whole save + commit run", f"{node}; shards multipart: {s['shards_multipart']}"),
        ("notice (SIGTERM) -> committed", notice),
        ("resume: load", f"{s['load_s']:.1f} s" if s["load_s"] else "?"),
        ("  best raw parallel get of files that size", f"{s['raw_get_s']:.1f} s ({s['raw_get_gib_per_s']:.2f} GiB/s)"),
        ("  load / raw get", f"{s['load_over_raw_get']:.2f}x" if s["load_over_raw_get"] else "?"),
        ("resume bit-identical (final state + losses)", str(s["bit_identical"])),
    ]
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the 0.33 GiB config: a smoke run")
    size.add_argument("--gib", type=float, help="a model state of at least this many GiB (llama3_scale's shape)")
    parser.add_argument("--repeat", type=int, default=1, help="raw transfers: best of this many")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scale_rehearsal.json")
    opts = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="supervise-scale-") as tmp, LocalObjectStore(Path(tmp) / "s3") as store:
        os.environ.update(store.env)  # this process reads the store too
        bench = Rehearsal(opts, Path(tmp), store)
        runs: dict = {"load_average": {}}
        raw = None
        for name, fn in (("sync", bench.sync), ("raw_1", None), ("async", bench.asynchronous), ("probe", bench.probe),
                         ("notice", bench.notice), ("identical", bench.identical), ("raw_2", None)):  # fmt: skip
            t = time.monotonic()
            if fn is None:  # files of the sizes the notice run's resume loads (sync's step 2; compared below)
                raw = raw or RawTransfers(bench, "sync", 2)
                raw.round(opts.repeat)
            else:
                runs[name] = fn()
            runs["load_average"][name] = os.getloadavg()
            print(f"[{name}] done in {time.monotonic() - t:.0f} s; load average {os.getloadavg()[0]:.1f}", flush=True)
        runs["raw"] = raw.result()
        loaded = bench.shards("notice", runs["notice"]["resumed_from"])
        runs["raw"]["same_sizes_as_loaded"] = sorted(raw.sizes.values()) == sorted(int(e["size"]) for e in loaded.values())
    summary = summarize(runs)
    print_table(summary, runs)
    for r in runs.values():
        r.pop("events", None)
    result = {"config": bench.config, "shape_env": bench.shape_env, "expected_state_bytes": bench.expected_bytes,
              "steps": STEPS, "ranks": 2, "store": "SeaweedFS (weed mini) on loopback", "mode": "DIRECT (s3fs)",
              "machine": f"{os.cpu_count()} CPUs, {platform.machine()}", "bench_wall_s": round(time.monotonic() - began),
              "summary": summary, "runs": runs}  # fmt: skip
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {opts.out}")
    # a commit that read a shard back would have received at least the smallest shard
    return 0 if summary["bit_identical"] and summary["commit_received_bytes"] < runs["probe"]["smallest_shard_bytes"] else 1


if __name__ == "__main__":
    sys.exit(main())
