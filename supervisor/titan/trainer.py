"""TorchTitan 0.3.0 Trainer subclass: commits checkpoints, saves on notice,
writes heartbeats, checkpoints RNG state. TorchTitan is not forked or
patched, but five *private* CheckpointManager methods are overridden (and
call through to TorchTitan's): `_find_load_step` (no guess of a step folder
when the catalog has no verified step), `_should_save` (a forced save on a
notice), `_save` (timing, async completion, commit hand-off), and
`_maybe_wait_for_staging` / `_close` (the `async` mode's background copy,
see `dcp_save`); `dcp_save` and `dcp_load` are overridden for object stores. Private
names can change in any release: pyproject pins torchtitan to 0.3.x
(`>=0.3.0,<0.4`), and the CPU training tests exercise every override.

Extension points used:
- `Trainer.should_continue_training()` runs at every step boundary (after
  the step's periodic save): heartbeats, notice agreement, stop.
- a `CheckpointManager` subclass with its own nested `Config` (TorchTitan's
  Configurable pattern) times every save, can force one, and reports it.
- `checkpointer.states` gets one more Stateful ("rng"), saved and loaded by
  DCP together with TorchTitan's own states.

Commits run on rank 0 in a background thread (titan/committer.py): no
collective waits on them (see `_stop_agreed` and `_finish_commits`).

Import this module only after `cpu_compat.apply()` on a CPU machine.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.checkpointer.base import MODEL
from torchtitan.components.checkpointer.dcp import AsyncMode
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools import filesystem
from torchtitan.tools.utils import GarbageCollection
from torchtitan.trainer import Trainer

from supervisor.contract import layout, runtime
from supervisor.titan import rng
from supervisor.titan.committer import CommitResult, Committer
from supervisor.titan.hashing import hashing_writer
from supervisor.titan.policy import (
    COMM_MARGIN_S,
    NoticePlan,
    SaveTimer,
    Throttle,
    commit_budget_s,
    commit_wait_s,
    early_save_plan,
    notice_plan,
    save_comm_timeout_s,
    save_kind,
    resume_load_step,
)
from supervisor.titan.store_reader import PartsReader, import_backend_in_background
from supervisor.titan.trainer_files import METRICS_FILE

log = logging.getLogger("supervisor.titan")


class SuperviseCheckpointManager(CheckpointManager):
    """TorchTitan's DCP checkpoint manager, plus: a forced save, a callback
    with the duration after each save, and completion of async saves on demand."""

    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config(CheckpointManager.Config):
        pass

    # Class-level defaults: a disabled manager returns from __init__ early.
    force_next: bool = False
    before_save: Callable[[int], None] | None = None  # (step): about to save into step-N
    save_timeouts: Callable[[], tuple[timedelta, timedelta]] | None = None  # (during a save, after), all ranks
    parallel_dims: Any = None
    on_saved: Callable[[int, float], None] | None = None  # (step, seconds): save returned
    on_complete: Callable[[int, float], None] | None = None  # (step, seconds): on storage
    pending_async: tuple[int, float] | None = None  # (step, monotonic start) in flight
    upload_done_at: float | None = None  # monotonic time the upload in flight completed
    pending_staged: tuple[int, float] | None = None  # (step, seconds blocked so far): copy in flight
    background_stager: DefaultStager | None = None  # `async` mode: one for the run
    fresh_start: bool = False  # the catalog has no verified step: load no step folder
    load_url: str | None = None  # the catalog's URL where `folder` is a mount of it: step-N is read there
    hashed_saves: set[int] = set()  # steps written by the hashing writer (set per manager in __init__)

    def _find_load_step(self, folder: str = "") -> int:
        # TorchTitan's guess for load_step -1 (highest step-N with a .metadata,
        # maybe uncommitted or quarantined); -1 makes its _load start fresh.
        if self.fresh_start:
            return -1
        return super()._find_load_step(folder)

    def _should_save(self, curr_step: int, last_step: bool = False) -> bool:
        if self.force_next and self.enable and not self.load_only:
            return True
        return super()._should_save(curr_step, last_step)

    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        if not self._should_save(curr_step, last_step):
            return False  # TorchTitan calls this every step: an async upload goes on
        begin = time.monotonic()
        self.finish_async()  # an older async save completes (and commits) before a new one
        waited = time.monotonic() - begin  # the loop is blocked by the older upload too
        if self.before_save is not None:
            self.before_save(curr_step)
        sync = last_step or self.async_mode == AsyncMode.DISABLED
        # A sync save's collectives run on the training groups, every rank at this
        # step: their timeout is raised for it. An async save's run in the upload
        # thread on TorchTitan's own gloo group (self.pg): no barrier, no change.
        timeouts = self.save_timeouts() if self.save_timeouts is not None and sync else None
        if timeouts:
            dist_utils.set_pg_timeouts(timeouts[0], self.parallel_dims)
        begin = time.monotonic()  # after set_pg_timeouts' barrier: the slowest rank is not the save
        try:
            saved = super()._save(curr_step, last_step) if sync else self._save_async(curr_step)
        finally:
            if timeouts:
                dist_utils.set_pg_timeouts(timeouts[1], self.parallel_dims)
        if not saved:
            return False
        blocked = waited + time.monotonic() - begin
        if self.staging_future is None:
            self._saved(curr_step, blocked)
        else:  # reported once the optimizer step has waited for the copy too
            self.pending_staged = (curr_step, blocked)
        if last_step and self.last_save_in_hf:
            return True  # an HF export, not a DCP checkpoint: nothing to commit or resume from
        if self.save_future is None:  # synchronous save (always so for the last step)
            if self.on_complete is not None:
                self.on_complete(curr_step, time.monotonic() - begin)
        else:
            self.pending_async = (curr_step, begin)
            self.upload_done_at = None
            if hasattr(self.save_future, "add_done_callback"):  # when it landed, not when a step boundary saw it
                self.save_future.add_done_callback(lambda _f: setattr(self, "upload_done_at", time.monotonic()))
        return True

    @torch.no_grad()
    def _save_async(self, step: int) -> bool:
        """TorchTitan's `async` branch of `_save` without its two gc.collect(1):
        they are there to free the CPU copy an earlier save left behind, and the
        run's one stager (`dcp_save`) reuses that copy instead. With TorchTitan's
        automatic gc off, each collect walks every object made since the last
        one: 20-60 ms of the loop per save here. Its periodic gc
        (`training.gc_freq`) still runs."""
        self.save_future = self.dcp_save(self._flattened_model_states_sd(),
                                         checkpoint_id=self._create_checkpoint_id(step), async_mode=AsyncMode.ASYNC)
        self._purge_stale_checkpoints()
        return True

    def _saved(self, step: int, blocked: float) -> None:
        if self.on_saved is not None:
            self.on_saved(step, blocked)

    def dcp_save(self, state_dict, checkpoint_id, async_mode, enable_garbage_collection=False, to_hf=False):
        """TorchTitan's sync and `async` saves through a writer that hashes every
        file as it writes it (supervisor.titan.hashing), and for `async` the copy
        to CPU memory off the training loop as well: one stager for the run (DCP's DefaultStager, its buffers
        reused from the second save on) copies in a background thread, and the
        optimizer step waits for the copy (`_maybe_wait_for_staging`), not the
        save call. Parameters and optimizer state change only in that step.
        Pinned-memory saves (a writer in another process) and HF exports are
        TorchTitan's own, without hashes: their commit relies on sizes and ETags."""
        if async_mode not in (AsyncMode.ASYNC, AsyncMode.DISABLED) or to_hf:
            self.hashed_saves.discard(_step_of(checkpoint_id))  # committed on sizes and ETags
            return super().dcp_save(state_dict, checkpoint_id, async_mode, enable_garbage_collection, to_hf)
        self.hashed_saves.add(_step_of(checkpoint_id))
        writer = hashing_writer(checkpoint_id)  # each file's MD5 as it is written: the commit reads nothing back
        if async_mode == AsyncMode.DISABLED:
            dcp.save(state_dict, storage_writer=writer, checkpoint_id=checkpoint_id)
            if enable_garbage_collection:
                GarbageCollection.collect("GC collection invoked by checkpointer.")
            return None
        if self.background_stager is None:
            self.background_stager = DefaultStager(StagingOptions(
                use_pinned_memory=False, use_shared_memory=False, use_async_staging=True, use_non_blocking_copy=False))
        response = dcp.async_save(state_dict, storage_writer=writer, checkpoint_id=checkpoint_id,
                                  process_group=self.pg, async_stager=self.background_stager)  # fmt: skip
        self.staging_future = response.staging_completion
        return response.upload_completion  # TorchTitan's `async` branch keeps it as save_future

    def dcp_load(self, state_dict, checkpoint_id, from_hf, from_quantized):
        """TorchTitan's load, with each checkpoint file in an object store fetched as
        concurrent ranged GETs (supervisor.titan.store_reader). Through a bucket mount
        the step is read from the bucket itself (`load_source`): the catalog verified it
        there, and a FUSE mount reads one stream at a time. An HF load is TorchTitan's own."""
        if from_hf:
            return super().dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)
        source = self.load_source(checkpoint_id)
        remote = "://" in source and not source.startswith("file://")
        how = "bucket API, parallel ranged reads" if remote else "filesystem"
        log.info("supervise: loading %s from %s (%s)", checkpoint_id, source, how)
        if not remote:
            return super().dcp_load(state_dict, source, from_hf, from_quantized)
        dcp.load(state_dict, storage_reader=PartsReader(source))
        if MODEL in self.states:  # TorchTitan's step after its load: the model state is flattened
            self.states[MODEL].load_state_dict(state_dict)

    def load_source(self, checkpoint_id) -> str:
        """Where a checkpoint under `folder` is read from: the same path under
        `load_url` when that is set (`folder` is a mount of it), else itself."""
        path, folder = str(checkpoint_id), str(self.folder).rstrip("/")
        if self.load_url is None or not path.startswith(folder + "/"):
            return path
        return self.load_url.rstrip("/") + path[len(folder) :]

    def _maybe_wait_for_staging(self) -> None:
        if self.staging_future is None:
            return
        begin = time.monotonic()
        self.staging_future.result()
        self.staging_future = None
        if self.pending_staged is not None:
            step, blocked = self.pending_staged
            self.pending_staged = None
            self._saved(step, blocked + time.monotonic() - begin)

    def _close(self) -> None:
        super()._close()
        if self.background_stager is not None:
            self.background_stager.close()
            self.background_stager = None

    def save_now(self, step: int, wait: bool = True) -> None:
        """Save `step` whatever the interval; with `wait`, until it is on storage
        (else an async save uploads while training goes on)."""
        self.force_next = True
        try:
            self.save(step)
        finally:
            self.force_next = False
        if wait:
            self.finish_async()

    def finish_async(self, block: bool = True) -> None:
        """Complete the async save in flight (wait for it, or only if it is done)."""
        if not self.enable or self.pending_async is None:
            return
        if self.save_future is not None:
            if not block and not self.save_future.done():
                return
            self.maybe_wait_for_saving()
        self._maybe_wait_for_staging()  # done with the upload: reports the save first
        step, begin = self.pending_async
        self.pending_async = None
        if self.on_complete is not None:
            self.on_complete(step, (self.upload_done_at or time.monotonic()) - begin)


def _as_supervise_checkpoint_config(cfg: Any) -> Any:
    """Same settings, our manager. Other managers (e.g. torchft's) are kept.

    The last save is full state (TorchTitan defaults `last_save_model_only` to
    True): it is committed like any other, and a run extended with more
    `--training.steps` resumes from it. Only `last_save_in_hf` (an export,
    model-only by TorchTitan's rule) keeps it model-only."""
    if type(cfg) is not CheckpointManager.Config:
        return cfg
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}
    if not values.get("last_save_in_hf"):
        values["last_save_model_only"] = False
    return SuperviseCheckpointManager.Config(**values)


class SuperviseTrainer(Trainer):
    """Trainer whose step boundaries talk to the node wrapper and the catalog."""

    def __init__(self, config: Trainer.Config):
        config.checkpoint = _as_supervise_checkpoint_config(config.checkpoint)
        if config.checkpoint.enable:  # while the model is built, not on the resume's critical path
            import_backend_in_background(os.environ.get(runtime.ENV_CHECKPOINTS) or config.checkpoint.folder)
        super().__init__(config)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        env = os.environ
        self.run_dir = Path(env[runtime.ENV_RUN_DIR]) if env.get(runtime.ENV_RUN_DIR) else None
        self.catalog_url = env.get(runtime.ENV_CHECKPOINTS) or None
        self.ledger_url = env.get(runtime.ENV_LEDGER) or None
        self.incarnation = env.get(runtime.ENV_INCARNATION) or None
        self.node_rank = int(env.get("GROUP_RANK", "0"))
        self.local_rank = int(env.get("LOCAL_RANK", self.rank))

        self.outcome: dict[str, Any] = {"outcome": "finished"}  # rank 0's decision, see write_outcome
        self.save_timer = SaveTimer()  # notice -> committed, per kind of save (policy.save_kind)
        self.commit_timer = SaveTimer()  # the commits alone: through a mount, the wait for the upload
        self.progress = Throttle(every_s=10.0, every_steps=100)
        self._stop = False
        self._boundary_step: int | None = None  # step of the last boundary seen
        self._loaded_step = 0
        self._last_loss: tuple[int, float] | None = None
        self._last_saved_step: int | None = None
        self._last_committed_step: int | None = None
        self._verified_step: int | None = None  # the catalog's step this start loads: committed
        self._save_seconds: dict[int, float] = {}
        self._steps_on_store: set[int] | None = None  # step folders found or written (rank 0)
        self._stopped: tuple[bool, str] | None = None  # a notice was acted on: (saved, reason)
        self._notice_deadline: float | None = None
        self._notice_save: dict[str, Any] | None = None  # the plan acted on: step, predicted_s, started
        self._early_acted = float("-inf")  # received_at of the last early notice acted on
        self._commit_stop: str | None = None  # rank 0's reason to end: commits keep failing
        self.committer: Committer | None = None
        self._journal = None
        self._journal_lock = threading.Lock()
        self._metrics_path = Path(config.dump_folder) / METRICS_FILE

        ckpt = self.checkpointer
        # the wrapper says where TorchTitan writes: through a bucket mount, the catalog reads the bucket
        self.mounted = env.get(runtime.ENV_WRITE_MODE) == runtime.WRITE_MOUNT
        self.commit_wait_s = commit_wait_s(env.get(runtime.ENV_COMMIT_WAIT_S), not self.mounted)  # parsed at start
        self.keep = int(env.get(runtime.ENV_CHECKPOINT_KEEP) or 0)  # in-run retention after each commit
        self.supervised_checkpoints = isinstance(ckpt, SuperviseCheckpointManager) and ckpt.enable
        if self.supervised_checkpoints:
            # Trainer.train() loads config.checkpoint.load_step: the wrapper's choice wins.
            step = resume_load_step(env.get(runtime.ENV_RESUME_STEP), config.checkpoint.load_step)
            ckpt.fresh_start = step is None
            self.config.checkpoint.load_step = -1 if step is None else step
            if env.get(runtime.ENV_RESUME_STEP, "").strip().isdigit():
                self._verified_step = self._last_committed_step = step
                ckpt.load_url = self.catalog_url if self.mounted else None  # verified there through its API
            ckpt.hashed_saves = set()
            ckpt.states[rng.STATE_KEY] = rng.RngState(self.rank)
            ckpt.on_saved, ckpt.on_complete = self._on_saved, self._on_complete
            if dist.is_initialized() and self.world_size > 1:
                ckpt.save_timeouts, ckpt.parallel_dims = self._save_timeouts, self.parallel_dims
            if self.rank == 0:
                ckpt.before_save = self._set_aside
                if self.catalog_url is not None:
                    self.committer = Committer(self._commit, self._on_committed)
        original_log = self.metrics_processor.log

        def log_and_keep_loss(step, global_avg_loss, *args, **kwargs):
            self._last_loss = (step, float(global_avg_loss))
            return original_log(step, global_avg_loss, *args, **kwargs)

        self.metrics_processor.log = log_and_keep_loss

    # -- the training loop's step boundary ---------------------------------

    def train(self):
        if self.supervised_checkpoints:
            self._skip_rng_if_absent()
        # TorchTitan's train() loads the checkpoint first: the report's start-up
        # ends here and its checkpoint load at the first step boundary.
        self._emit("trainer_ready", **{f"torchrun_{k}": v for k, v in self._torchrun_times().items()})
        super().train()
        self._finish_commits()

    def _torchrun_times(self) -> dict[str, float]:
        """The prestarted torchrun's timings (supervisor.node.prestarted), if it was one."""
        try:
            times = json.loads(os.environ.get(runtime.ENV_TORCHRUN_TIMES) or "{}")
        except ValueError:
            return {}
        return {k: v for k, v in times.items() if isinstance(v, (int, float))} if isinstance(times, dict) else {}

    def should_continue_training(self) -> bool:
        first = self._boundary_step is None
        if first:
            self._loaded_step = self.step
            self._emit("checkpoint_loaded", step=self.step)
        if first or self.step != self._boundary_step:
            self._boundary_step = self.step
            self._after_step(first)
        if self.supervised_checkpoints:
            self.checkpointer.finish_async(block=False)  # commit an async save once done
        finishing = self.step >= self.config.training.steps
        if not self._stop and not finishing and self._stop_agreed():
            self._stop = True
        return not self._stop and super().should_continue_training()

    def _after_step(self, first: bool) -> None:
        if self.run_dir is not None:
            runtime.write_json_atomic(
                self.run_dir / runtime.HEARTBEAT_DIR / f"rank-{self.rank}.json",
                {"rank": self.rank, "step": self.step, "time": time.time()},
            )
        if first or self.rank != 0:
            return
        loss = self._last_loss[1] if self._last_loss and self._last_loss[0] == self.step else None
        if loss is not None:
            self._metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._metrics_path, "a") as f:
                f.write(json.dumps({"step": self.step, "loss": loss, "time": time.time(),
                                    "incarnation": self.incarnation, "pid": os.getpid()}) + "\n")
        if self.step == self._loaded_step + 1:
            self._emit("first_step", step=self.step)
        if self.progress.due(time.monotonic(), self.step):
            self._emit("progress", step=self.step, loss=loss)

    # -- saves and commits ----------------------------------------------------

    def _save_timeouts(self) -> tuple[timedelta, timedelta]:
        """Collective timeout during a save (policy.save_comm_timeout_s), and TorchTitan's after it."""
        comm = self.config.comm
        during = save_comm_timeout_s(self.save_timer.expected(), comm.init_timeout_seconds, comm.train_timeout_seconds)
        return timedelta(seconds=during), timedelta(seconds=comm.train_timeout_seconds)

    def _on_saved(self, step: int, seconds: float) -> None:
        self._last_saved_step = step
        self._emit("checkpoint_saved", step=step, duration_s=round(seconds, 3))

    def _on_complete(self, step: int, seconds: float) -> None:
        # Sync DCP save returns on every rank only after the coordinator wrote
        # .metadata; an async one's future on rank 0 completes only then too.
        # Either way rank 0 knows that every rank's shard is written.
        kind = self._kind_of_save(step)
        if kind.startswith("async"):  # what a stop must wait for (notices.SaveWait)
            self._emit("checkpoint_uploaded", step=step, duration_s=round(seconds, 3))
        if self.committer is None:
            self.save_timer.add(seconds, kind)
            return
        self._save_seconds[step] = seconds
        self.committer.submit(step)  # returns at once; the result arrives at a later boundary

    def _set_aside(self, step: int) -> None:
        """Before TorchTitan saves into an existing step-N (a re-save after a
        fallback), move the old marker aside so the new save needs its own commit.
        The store is listed once per incarnation, not at every save (a round
        trip inside the loop's pause): a step folder this incarnation neither
        found nor wrote is new."""
        from supervisor.store.catalog import Catalog

        try:
            catalog = Catalog(str(self.checkpointer.folder))
            if self._steps_on_store is None:
                self._steps_on_store = set(catalog.steps())
            if step not in self._steps_on_store:
                self._steps_on_store.add(step)
                return
            moved = catalog.set_aside(step)
        except Exception as err:  # noqa: BLE001 - then the commit refuses (already committed, does not verify)
            log.error("supervise: could not set aside the old files of step %d: %s", step, err)
            return
        if moved:
            log.warning("supervise: step %d is saved again; its old %s moved to %s", step, ", ".join(moved[1]), moved[0])

    def _commit(self, step: int) -> tuple[bool, str]:
        """Commit `step` in the catalog (the committer's thread, rank 0). A step that
        is already committed counts only if its manifest verifies against this save."""
        from supervisor.store.catalog import AlreadyCommitted, Catalog

        catalog = Catalog(self.catalog_url)
        try:
            catalog.commit(step, world_size=self.world_size, writer=f"node{self.node_rank}-rank0",
                           wait_s=self._commit_wait(), written=step in self.checkpointer.hashed_saves)  # fmt: skip
        except AlreadyCommitted:
            info = catalog.inspect(step)
            if info.state != "committed":
                return False, f"an older commit marker is there and does not verify ({info.reason})"
            return True, "already committed, verifies"
        if self.keep > 0:
            self._retain(catalog)
        return True, "committed"

    def _retain(self, catalog) -> None:
        """The catalog's safe retention after a commit: the newest `keep` committed
        steps stay, the newest verified one always, unknown folders are never touched."""
        try:
            result = catalog.prune(self.keep, dry_run=False)
        except Exception as err:  # noqa: BLE001 - a bucket that grows is better than a stopped run
            log.warning("supervise: retention (keep %d) failed: %s", self.keep, err)
            return
        if result.delete:
            log.info("supervise: retention (keep %d) deleted %s", self.keep, ", ".join(map(layout.step_dir, result.delete)))

    def _kind_of_save(self, step: int) -> str:
        """policy.save_kind of the save of `step`: the last step's is always sync."""
        sync = self.checkpointer.async_mode == AsyncMode.DISABLED or step >= self.config.training.steps
        return save_kind(sync, self.mounted)

    def _commit_wait(self) -> float:
        """How long a commit waits for objects (restarted while they land): through a
        mount, the configured wait or three measured commits, whichever is longer."""
        if not self.mounted:
            return self.commit_wait_s
        return max(self.commit_wait_s, 3.0 * (self.commit_timer.expected() or 0.0))

    def _on_committed(self, result: CommitResult) -> None:
        # A notice save is predicted from the save alone: a commit is a listing and a
        # marker, except through a mount, where it waits for the upload of the save.
        upload = result.seconds if self.mounted else 0.0
        self.save_timer.add(self._save_seconds.pop(result.step, 0.0) + upload, self._kind_of_save(result.step))
        self.commit_timer.add(result.seconds)
        if not result.ok:
            log.error("supervise: could not commit step %d: %s", result.step, result.reason)
            return
        self._last_committed_step = max(result.step, self._last_committed_step or 0)
        log.info("supervise: step %d %s in %.2f s", result.step, result.reason, result.seconds)
        self._emit("checkpoint_committed", step=result.step, duration_s=round(result.seconds, 3))

    def _is_committed(self, step: int) -> bool:
        if self.catalog_url is None or step == self._verified_step:
            return True
        return self.committer is not None and self.committer.committed(step)

    def _finish_commits(self) -> None:
        """Rank 0 waits for its pending commits (within the notice's deadline); the
        other ranks wait for it in write_outcome's broadcast, under a collective
        timeout raised to the same bound (TorchTitan's is train_timeout_seconds)."""
        if not self.supervised_checkpoints:
            return
        budget = commit_budget_s(time.time(), self._notice_deadline, self._commit_wait(), self.commit_timer.expected())
        if dist.is_initialized() and self.world_size > 1:
            dist_utils.set_pg_timeouts(timedelta(seconds=budget + COMM_MARGIN_S), self.parallel_dims)
        if self.committer is not None and not self.committer.wait(budget):
            log.error("supervise: commits still pending after %.0f s", budget)
        if self._notice_save is not None and self.rank == 0:  # what the notice plan predicted, and what happened
            plan = self._notice_save
            self._emit("notice_save", step=plan["step"], predicted_s=plan["predicted_s"],
                       actual_s=round(time.monotonic() - plan["started"], 3),
                       committed=self._is_committed(plan["step"]))  # fmt: skip

    # -- preemption notice ------------------------------------------------------

    def _stop_agreed(self) -> bool:
        """All ranks agree (one small all_reduce) on a notice, on rank 0's commits
        failing, or on an early notice (save, train on); act on it. True: stop."""
        notice = runtime.read_json(self.run_dir / runtime.NOTICE_FILE) if self.run_dir else None
        deadline = notice.get("deadline") if notice else None
        failing = self.committer.should_stop() if self.committer is not None else None
        early = runtime.read_json(self.run_dir / runtime.SAVE_NOW_FILE) if self.run_dir else None
        early_at = float(early.get("received_at") or 0.0) if early else float("-inf")
        flags = torch.tensor([1.0 if notice else 0.0, -float(deadline) if deadline else float("-inf"),
                              1.0 if failing else 0.0, early_at], dtype=torch.float64, device=self.device)  # fmt: skip
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[2].item() > 0:
            self._commit_stop = failing or "rank 0's checkpoint commits keep failing"
            log.error("supervise: %s; ending this incarnation (retryable)", self._commit_stop)
            return True
        if flags[0].item() == 0.0:
            if flags[3].item() > self._early_acted:  # a new early notice on some node
                self._early_acted = flags[3].item()
                self._save_early()
            return False
        earliest = -flags[1].item() if flags[1].item() != float("-inf") else None
        source = (notice or {}).get("source", "another node")
        log.warning("supervise: preemption notice (%s) at step %d", source, self.step)
        self._notice_deadline = earliest
        self._stopped = self._act_on_notice(earliest)
        return True

    def _act_on_notice(self, deadline: float | None) -> tuple[bool, str]:
        """(saved, reason); whether the save is also committed is known at the end."""
        ckpt = self.checkpointer
        if not self.supervised_checkpoints:
            return False, "checkpointing is off (--checkpoint.enable)"
        ckpt.maybe_wait_for_staging()  # a save copied in the background is reported (saved) first
        if self._last_saved_step == self.step or (self.step == self._loaded_step and self.step > 0):
            # this step is already on storage (periodic save, or just loaded)
            ckpt.finish_async()
            if self.committer is not None and not self.committer.pending() and not self._is_committed(self.step):
                self.committer.submit(self.step)  # its commit failed (or was never tried): once more
            return True, "step already saved"
        if self.step == 0:
            return False, "no training step completed yet"
        kind = self._kind_of_save(self.step)
        predicted = self.save_timer.expected(kind)
        plan = notice_plan(time.time(), deadline, predicted)
        self._emit("notice_plan", step=self.step, save_kind=kind, save=plan.save, reason=plan.reason,
                   predicted_s=None if predicted is None else round(predicted, 3),
                   left_s=None if deadline is None else round(deadline - time.time(), 3))
        skip = torch.tensor([0.0 if plan.save else 1.0], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(skip, op=dist.ReduceOp.MAX)  # ranks' clocks differ: agree
        if skip.item() > 0:
            reason = plan.reason if not plan.save else "another rank cannot save in time"
            log.warning("supervise: %s", reason)
            return False, reason
        log.warning("supervise: %s (step %d)", plan.reason, self.step)
        self._notice_save = {"step": self.step, "predicted_s": predicted, "started": time.monotonic()}
        ckpt.save_now(self.step)  # rank 0 hands it to the committer
        return True, plan.reason

    def _save_early(self) -> None:
        """An early notice (AWS's rebalance recommendation): every rank saves this
        step (policy.early_save_plan) and training goes on; an async save uploads
        meanwhile, and rank 0 commits it as any other."""
        plan = (early_save_plan(self.step, self._last_saved_step, self._loaded_step) if self.supervised_checkpoints
                else NoticePlan(False, "checkpointing is off (--checkpoint.enable)"))
        log.warning("supervise: early notice at step %d: %s", self.step, plan.reason)
        if plan.save:
            self.checkpointer.save_now(self.step, wait=False)
        self._emit("early_save", step=self.step, save=plan.save, reason=plan.reason)

    def _decide_outcome(self) -> dict[str, Any]:
        """Rank 0's outcome (the one broadcast): 75 promises a commit that verified."""
        last = self._last_committed_step if self._last_committed_step is not None else (self._loaded_step or None)
        if self._commit_stop is not None:
            return {"outcome": "commit_failed", "step": last, "reason": self._commit_stop}
        if self._stopped is not None:
            saved, reason = self._stopped
            if saved and self._is_committed(self.step):
                return {"outcome": "preempted_saved", "step": self.step, "reason": reason}
            if saved:
                reason = f"saved step {self.step} but could not commit it"
            return {"outcome": "preempted_unsaved", "step": last, "reason": reason}
        exported = getattr(self.checkpointer, "last_save_in_hf", False)  # the last save is an HF export
        if self.supervised_checkpoints and self._last_saved_step == self.step and not exported \
                and not self._is_committed(self.step):
            failed = self.committer.results.get(self.step) if self.committer else None
            why = failed.reason if failed else "the commit did not finish in time"
            return {"outcome": "commit_failed", "step": last,
                    "reason": f"training finished but the final step {self.step} is not committed ({why})"}
        return {"outcome": "finished", "step": self.step, "reason": "training finished"}

    # -- helpers ----------------------------------------------------------------

    def _emit(self, kind: str, **fields: Any) -> None:
        if self.rank != 0 or self.ledger_url is None:
            return
        with self._journal_lock:  # the training loop and the committer both emit
            if self._journal is None:
                from supervisor.ledger.journal import Journal

                # background: a frozen store must not stall the training loop (written at exit too)
                self._journal = Journal(self.ledger_url, writer=f"node{self.node_rank}-rank0",
                                        incarnation=self.incarnation, background=True)
            self._journal.emit(kind, **fields)

    def _skip_rng_if_absent(self) -> None:
        """A checkpoint written without our RNG state (plain TorchTitan) still loads."""
        ckpt = self.checkpointer
        step = self.config.checkpoint.load_step
        if step == -1:
            step = ckpt._find_load_step()
        if step <= 0:
            return
        path = ckpt.load_source(filesystem.join(ckpt.folder, layout.step_dir(step)))  # read where the load reads
        from supervisor.titan.results import dcp_reader

        try:
            keys = dcp_reader(path).read_metadata().state_dict_metadata
        except Exception:  # unreadable: let TorchTitan's own load report it
            return
        if not any(k.startswith(rng.STATE_KEY + ".") for k in keys):
            log.warning("supervise: %s has no RNG state; resuming with the seeded RNG", path)
            ckpt.exclude_from_loading = [*ckpt.exclude_from_loading, rng.STATE_KEY]

    def write_outcome(self) -> None:
        """outcome.json on local rank 0 of every node (run dirs are node-local), so
        every node's wrapper can tell a saved notice from the end of training.
        All ranks call it; the content is global rank 0's, the same everywhere."""
        if self.rank == 0:
            self.outcome = self._decide_outcome()
        shared = [{**self.outcome, "host": socket.gethostname()}]
        if dist.is_initialized() and self.world_size > 1:
            dist.broadcast_object_list(shared, src=0, device=self.device)
        self.outcome = shared[0]
        if self.local_rank == 0 and self.run_dir is not None:
            runtime.write_json_atomic(self.run_dir / runtime.OUTCOME_FILE, self.outcome)


def _step_of(checkpoint_id: str) -> int:
    """N of TorchTitan's `<folder>/step-N` checkpoint id (-1 for anything else)."""
    step = layout.parse_step(str(checkpoint_id).rstrip("/").rsplit("/", 1)[-1])
    return -1 if step is None else step
