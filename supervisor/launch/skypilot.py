"""JobSpec -> SkyPilot managed job (`sky jobs launch`), and views over it.

The task is built from SkyPilot's own objects (sky.Task, sky.Resources,
sky.data.Storage) so SkyPilot validates it; `render_yaml` prints what
SkyPilot would receive, with secret values redacted by SkyPilot's own
redaction. `sky` is imported inside functions: `supervise --help` stays fast.

How checkpoints reach the bucket:
- MOUNT_CACHED (default) / MOUNT: the bucket *root* is mounted at
  `checkpoint.mount_path` (SkyPilot mounts roots only: sky/data/storage.py,
  Storage._validate_source); TorchTitan writes to `<mount>/<prefix>/<name>` and
  the node wrapper commits only after every object is visible through the
  bucket API (`--checkpoints <bucket URL>`, bounded by `--commit-wait`).
- DIRECT: TorchTitan writes `s3://...` itself through fsspec. This is the mode
  for generic S3-compatible endpoints (MinIO, SeaweedFS, ...): SkyPilot 0.14
  mounts s3:// from AWS only, and R2/Nebius under their own r2:// / nebius://
  schemes. The endpoint reaches the nodes as AWS_ENDPOINT_URL_S3 (S3 only: the
  all-services AWS_ENDPOINT_URL would also redirect STS, IMDS-backed roles...).

What travels with the job: the wheel of the supervise code being launched
(NodeTask.files, a directory file_mounts entry; for managed jobs SkyPilot
uploads it to its jobs bucket and every recovery fetches it again:
sky/utils/controller_utils.py, maybe_translate_local_file_mounts_and_sync_up).

`stop` saves first (SkyPilotBackend.cancel: a stop request in the bucket, the
nodes' exits awaited in the ledger, then the cancel). SkyPilot's own graceful
cancel cannot: it SIGTERMs every process of the job at once, torchrun's workers
included, and SIGKILLs about 30 s later (sky/skylet/subprocess_daemon.py).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from supervisor import registry
from supervisor.contract.layout import STOP_REQUEST, bucket_root, ledger_url, stop_request_url
from supervisor.errors import SuperviseError, first_line
from supervisor.launch import kubernetes, placement
from supervisor.launch.base import AlreadyFinished, JobStatus, is_terminal
from supervisor.launch.placement import Placement
from supervisor.launch.setup import VENV
from supervisor.launch.task import NodeTask
from supervisor.spec import S3_COMPATIBLE, JobSpec

BACKEND = "skypilot"
# Store credentials forwarded as secrets when set in the launching shell (on AWS/GCP
# with instance roles they are not needed). Session keys only when asked (spec.forward_aws_session).
STORE_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
SESSION_TOKEN = "AWS_SESSION_TOKEN"
STORE_ENVS = ("AWS_DEFAULT_REGION", "AWS_REGION")
# The launching shell's S3 endpoint (S3-only variable first), forwarded as the S3-only one.
ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
NODE_ENDPOINT_ENV = "AWS_ENDPOINT_URL_S3"
# Every variable of the launching shell the rendered task reads (besides the recipe's secrets).
LAUNCH_ENV = (*STORE_SECRETS, SESSION_TOKEN, *STORE_ENVS, *ENDPOINT_ENVS)
STOP_POLL_S = 5.0
STOP_PROGRESS_S = 30.0  # stop: a line about the wait this often
# stop: beyond a node's own wait for the save (notices.SaveWait): its poll of the
# request, the step boundary, killing the workers and writing its exit
STOP_SLACK_S = 300.0
UNSET = "<unset>"  # stands in for a secret the launching shell does not have (dry runs)


class SkyPilotUnavailable(SuperviseError):
    """SkyPilot is missing or not set up; the message names the fixing command."""

    exit_code = 1


def _sky():
    try:
        import sky
    except ImportError:
        raise SkyPilotUnavailable("SkyPilot is not installed; install the cloud extra: "
                                  "pip install -e '.[cloud]' (then run `sky check`)") from None
    return sky


# ---------------------------------------------------------------- rendering


def run_script(task: NodeTask) -> str:
    """The node command as the script's last command: no `exec`, no `set -e`, no `exit`.

    SkyPilot appends its MOUNT_CACHED flush to `run` and exits with the status of
    our last command (sky/backends/task_codegen.py, get_rclone_flush_script:
    `__skypilot_user_exit_code=$?` ... `exit $__skypilot_user_exit_code`), so the
    wrapper's code (0/75/69/78) is the job's and the flush still runs. SIGTERM
    reaches the wrapper anyway: SkyPilot signals every process of the job.
    """
    return (
        f"if [ -f {VENV}/bin/activate ]; then . {VENV}/bin/activate; fi\n"
        f"{shlex.join(task.run.to_argv())}\n"
    )


def store_endpoint(environ: Mapping[str, str]) -> str | None:
    return next((environ[k] for k in ENDPOINT_ENVS if environ.get(k)), None)


def task_envs(task: NodeTask, environ: Mapping[str, str]) -> dict[str, str]:
    envs = {k: environ[k] for k in STORE_ENVS if environ.get(k)}
    endpoint = store_endpoint(environ)
    if endpoint:
        envs[NODE_ENDPOINT_ENV] = endpoint
    envs.update(task.envs)
    return envs


def task_secrets(task: NodeTask, environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """Secret values from the launching shell, and the names it lacks (those get UNSET)."""
    secrets = {key: environ.get(key) or UNSET for key in task.secrets}
    missing = [key for key in task.secrets if not environ.get(key)]
    secrets.update({k: v for k, v in store_credentials(task, environ).items() if k not in secrets})
    return secrets, missing


def store_credentials(task: NodeTask, environ: Mapping[str, str]) -> dict[str, str]:
    """The launching shell's store keys for the nodes. Short-lived session keys
    (AWS_SESSION_TOKEN set) expire within hours, mid-run, and would override the
    nodes' instance role: none of the three travel unless forward_aws_session."""
    keys = {k: environ[k] for k in STORE_SECRETS if environ.get(k)}
    if environ.get(SESSION_TOKEN):
        return {**keys, SESSION_TOKEN: environ[SESSION_TOKEN]} if task.forward_aws_session else {}
    return keys


def check_store(task: NodeTask, environ: Mapping[str, str]) -> None:
    """Bucket rules that depend on the launching environment."""
    scheme = task.checkpoint.bucket.split("://", 1)[0]
    endpoint = store_endpoint(environ)
    if scheme == "s3" and endpoint and task.checkpoint.mode != "DIRECT":
        raise SuperviseError(
            f"field 'checkpoint.mode': SkyPilot 0.14 mounts s3:// buckets from AWS only, but the S3 endpoint "
            f"{endpoint} (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) points elsewhere; use --set checkpoint.mode=DIRECT "
            f"(TorchTitan writes through the endpoint), or an r2:// / nebius:// bucket for those stores"
        )
    if scheme in S3_COMPATIBLE and not endpoint:
        raise SuperviseError(
            f"field 'checkpoint.bucket': {scheme}:// checkpoints are verified through the S3 API; "
            f"export AWS_ENDPOINT_URL_S3 (and AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) for that store"
        )


def near_bucket(task: NodeTask, environ: Mapping[str, str]) -> Placement:
    """FAILOVER and the bucket's region unless the recipe chose otherwise (launch.placement)."""
    from sky.utils.infra_utils import InfraInfo

    chosen = task.resources.infra
    try:  # SkyPilot's own parser: `k8s/<context>` and wildcards included (sky/utils/infra_utils.py)
        parsed = InfraInfo.from_str(chosen) if chosen else InfraInfo(None, None, None)
    except ValueError as err:
        raise SuperviseError(f"field 'resources.infra': SkyPilot rejects it: {first_line(err)}") from None
    strategy = task.restart.strategy
    location = None
    if placement.needs_location(strategy, parsed.region):
        location = placement.read_location(task.checkpoint.bucket, store_endpoint(environ))
    return placement.place(task.checkpoint.bucket, strategy, chosen, parsed.cloud, parsed.region, location)


def build_task(task: NodeTask, environ: Mapping[str, str]):
    """The sky.Task for `task`, the secret names the launching shell lacks, and where it runs (Placement)."""
    sky = _sky()
    from sky import exceptions

    check_store(task, environ)
    res = task.resources
    where = near_bucket(task, environ)
    common: dict[str, Any] = {
        "use_spot": res.spot,
        "disk_size": res.disk_size,
        "job_recovery": {
            # FAILOVER or the recipe's: the names of sky/jobs/recovery_strategy.py's registry
            "strategy": where.strategy,
            "max_restarts_on_errors": task.restart.max_restarts_on_errors,
            "recover_on_exit_codes": task.restart.recover_on_exit_codes,
        },
        # the task's `config:` (Task.from_yaml_config passes it on the same way)
        "_cluster_config_overrides": kubernetes.config_overrides(res.termination_grace_s),
    }
    if where.infra is not None:
        common["infra"] = where.infra  # sky.Resources(infra="aws/us-east-1"): cloud/region[/zone]
    for key in ("cpus", "memory", "image_id", "disk_tier", "network_tier"):
        if getattr(res, key) is not None:
            common[key] = getattr(res, key)
    choices = [{name: n} for name, n in sorted(res.accelerators.items())] if res.accelerators else [None]
    try:
        resources = {sky.Resources(accelerators=acc, **common) for acc in choices}
    except (ValueError, exceptions.InvalidCloudConfigs, exceptions.NotSupportedError) as err:
        raise SuperviseError(f"field {rejected_field(str(err))!r}: SkyPilot rejects it: {first_line(err)}") from None
    secrets, missing = task_secrets(task, environ)
    sky_task = sky.Task(name=task.name, setup=task.setup, run=run_script(task), num_nodes=task.num_nodes,
                        envs={**task_envs(task, environ), **kubernetes.NODE_ENVS}, secrets=secrets)
    sky_task.set_resources(resources)
    if task.files:  # directories only: SkyPilot hard-links single files, which fails across filesystems
        sky_task.set_file_mounts(dict(task.files))
    if task.checkpoint.mode != "DIRECT":
        # The bucket root; its prefix is in the node's checkpoint path (JobSpec.checkpoint_dir).
        storage = sky.data.Storage(source=bucket_root(task.checkpoint.bucket),
                                   mode=sky.data.StorageMode[task.checkpoint.mode])
        sky_task.set_storage_mounts({task.checkpoint.mount_path: storage})
    return sky_task, missing, where


def rejected_field(message: str) -> str:
    """The recipe field a sky.Resources error is about (sky/resources.py words it
    "Invalid disk_tier", "Disk tier ... is not supported", "Invalid network tier", infra/cloud...)."""
    text = message.lower()
    for key in ("disk_tier", "network_tier"):
        if key in text or key.replace("_", " ") in text:
            return f"resources.{key}"
    return "resources.infra" if "infra" in text or "cloud" in text else "resources"


def task_config(task) -> dict[str, Any]:
    """The task as SkyPilot's YAML dict, secrets redacted, any-of in a stable order."""
    from sky.task import redact_task_yaml_dict

    config = task.to_yaml_config()
    redact_task_yaml_dict(config)
    any_of = config.get("resources", {}).get("any_of")
    if any_of:
        any_of.sort(key=lambda r: sorted((r.get("accelerators") or {}).items()))
    return config


def render_yaml(task) -> str:
    """The sky.Task as YAML, secrets redacted: what `start --dry-run` prints."""
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return yaml.dump(task_config(task), Dumper=Dumper, sort_keys=False, width=1000)


@dataclass
class SkyPilotRequest:
    """A managed job ready for `sky.jobs.launch`: the sky.Task, built once."""

    name: str
    task: Any  # sky.Task
    checkpoints_url: str
    missing_secrets: list[str] = field(default_factory=list)
    placement: Placement | None = None  # job_recovery strategy and infra as rendered, and why

    def render(self) -> str:
        return render_yaml(self.task)


# ---------------------------------------------------------------- SkyPilot calls


def explain_sky_error(err: BaseException) -> SuperviseError:
    """A SkyPilot failure as one line that names the `sky` command that fixes it."""
    from sky import exceptions

    text = first_line(err)
    if isinstance(err, exceptions.ApiServerConnectionError):
        return SkyPilotUnavailable(f"the SkyPilot API server is unreachable ({text}); start it with `sky api start` "
                                   "or point at yours with `sky api login -e URL`")
    if isinstance(err, exceptions.ApiServerAuthenticationError):
        return SkyPilotUnavailable(f"SkyPilot API server login failed ({text}); run `sky api login`")
    if isinstance(err, (exceptions.NoCloudAccessError, exceptions.InvalidCloudCredentials,
                        exceptions.InvalidCloudConfigs)) or "sky check" in str(err) or "No cloud" in str(err):
        return SkyPilotUnavailable(f"no usable cloud in SkyPilot ({text}); run `sky check` and follow its hints")
    if isinstance(err, exceptions.ResourcesUnavailableError):
        return SkyPilotUnavailable(f"no capacity for this job ({text}); try another --infra, other accelerators, "
                                   "or see `sky show-gpus`")
    if isinstance(err, exceptions.ClusterNotUpError):
        return SkyPilotUnavailable(f"the jobs controller is not up ({text}); see `sky status` and `sky jobs queue`")
    return SkyPilotUnavailable(f"SkyPilot failed: {text} (see `sky api logs` for details)")


def _call(fn, *args, **kwargs):
    """Run a SkyPilot SDK call to completion, turning its errors into one clear line."""
    sky = _sky()
    try:
        return sky.stream_and_get(fn(*args, **kwargs))
    except SuperviseError:
        raise
    except Exception as err:  # SkyPilot raises many unrelated types; all become one line
        raise explain_sky_error(err) from err


def summary(spec: JobSpec, where: Placement | None = None) -> list[tuple[str, str]]:
    """What `start` shows before launching (`where`: the request's placement, as rendered)."""
    res, ck, rec = spec.resources, spec.checkpoint, spec.recovery
    infra = where.infra if where else res.infra
    strategy = where.strategy if where else rec.strategy
    accel = " or ".join(f"{k}:{v}" for k, v in sorted(res.accelerators.items())) if res.accelerators else "CPU"
    rows = [
        ("job", spec.name),
        ("model", f"{spec.model.module} / {spec.model.config}"),
        ("nodes", str(res.num_nodes)),
        ("accelerators", f"{accel} per node"),
        ("capacity", "spot" if res.spot else "on-demand"),
        ("infra", infra or "any enabled (SkyPilot chooses)"),
        ("checkpoints", f"{spec.checkpoints_url} ({ck.mode}, every "
                        + ("{} steps)".format(ck.interval) if ck.interval != "auto" else
                           "N steps: interval auto, Young/Daly in {}..{} at each start)".format(*ck.interval_range))),
        ("recovery", f"{strategy or 'SkyPilot default'}; restart on exit codes {rec.recover_on_exit_codes}, "
                     f"other codes never (gives up after {rec.max_restarts_without_progress} restarts "
                     f"without a new checkpoint)"),
    ]
    price, source = estimate_hourly(spec, infra)
    rows.append(("estimated cost", f"${price:.2f}/h ({source})"))
    return rows


def estimate_hourly(spec: JobSpec, infra: str | None = None) -> tuple[float, str]:
    """$/h for the whole job and where the price came from: the ledger's one price reader
    (a cached SkyPilot catalog, else the built-in table; never a download)."""
    from supervisor.ledger.prices import price_for

    res = spec.resources
    infra = infra or res.infra
    price = price_for(res.accelerators, cloud=infra.split("/")[0] if infra else None, prefer_spot=res.spot)
    return (price.spot if res.spot else price.on_demand) * res.num_nodes, price.source


class SkyPilotBackend:
    """Backend over SkyPilot managed jobs."""

    name = BACKEND

    def adapt(self, spec: JobSpec) -> JobSpec:
        return spec  # SkyPilot provides everything a JobSpec can ask for

    def dryrun(self, task: NodeTask, *, environ: Mapping[str, str] | None = None) -> SkyPilotRequest:
        sky_task, missing, where = build_task(task, os.environ if environ is None else environ)
        for line in where.lines:  # stderr: `start --dry-run` prints the YAML alone on stdout
            _say(line)
        return SkyPilotRequest(task.name, sky_task, task.checkpoints_url, missing, where)

    def schedule(self, request: SkyPilotRequest) -> str:
        sky = _sky()
        clear_stop_request(request.checkpoints_url)  # an old `stop` must not stop this new job
        job_ids, _handle = _call(sky.jobs.launch, request.task, name=request.name)
        job_id = str(job_ids[0]) if job_ids else ""
        registry.record(request.name, backend=BACKEND, checkpoints_url=request.checkpoints_url, job_id=job_id)
        return job_id

    def status(self, name: str | None = None) -> list[JobStatus]:
        latest: dict[str, dict[str, Any]] = {}
        for rec in _queue():  # newest job of each name wins
            job_name = _job_name(rec)
            if name is not None and job_name != name:
                continue
            if job_name not in latest or _job_id(rec) > _job_id(latest[job_name]):
                latest[job_name] = rec
        out = []
        for job_name, rec in sorted(latest.items()):
            known = registry.lookup(job_name) or {}
            out.append(JobStatus(name=job_name, backend=BACKEND, state=_state(rec),
                                 recoveries=int(rec.get("recovery_count") or 0), job_id=str(rec.get("job_id")),
                                 reason=rec.get("failure_reason"), checkpoints_url=known.get("checkpoints_url"),
                                 details=rec.get("details")))
        return out

    def logs(self, name: str, *, follow: bool = False) -> None:
        """By job id: SkyPilot's tail_logs by name only finds jobs still running."""
        sky = _sky()
        job_id, state = self._resolve(name)
        try:  # refresh: a jobs controller that autostopped is started again
            code = sky.jobs.tail_logs(job_id=job_id, follow=follow and not is_terminal(state),
                                      output_stream=sys.stdout, refresh=True)
        except Exception as err:
            raise explain_sky_error(err) from err
        if code:
            sys.exit(code)

    def cancel(self, name: str, *, graceful: bool = True, timeout_s: float | None = None) -> StopResult | None:
        """Graceful: the stop request first (the nodes save, commit and exit 0), then the
        cancel; returns what was saved. `timeout_s` caps the wait (None: as long as this
        run's measured saves need, see wait_for_stop). --now (not graceful): None."""
        sky = _sky()
        job_id, state = self._resolve(name)
        if is_terminal(state):
            raise AlreadyFinished(f"{name} (managed job {job_id}) already finished: {state}; nothing to stop")
        url = (registry.lookup(name) or {}).get("checkpoints_url")
        result = None
        if graceful and not url:
            result = StopResult(name, False, None, "no checkpoint URL is recorded for this job; cancelled without a save")
        elif graceful and state != "RUNNING":
            result = StopResult(name, False, None, f"the job is {state}: no node is running to save; cancelled")
        elif graceful:
            _say(f"asking the nodes of {name} to save and stop ({stop_request_url(url)})")
            write_stop_request(url)
            ended: dict[str, str | None] = {}

            def done(events: list) -> bool:
                _id, ended["state"] = self._resolve(name)
                return is_terminal(ended["state"]) or nodes_exited(events)

            events, waited_out = wait_for_stop(name, ledger_url(url), done, cap_s=timeout_s, poll_s=STOP_POLL_S)
            result = stop_result(name, events, url, waited_out=waited_out)
            if is_terminal(ended.get("state")):
                clear_stop_request(url)
                return result
            _say(f"the nodes of {name} exited; cancelling managed job {job_id}" if waited_out is None
                 else f"{waited_out}; cancelling managed job {job_id}")
        _call(sky.jobs.cancel, job_ids=[job_id])
        if url:
            clear_stop_request(url)
        return result

    def _resolve(self, name: str) -> tuple[int, str | None]:
        recorded = (registry.lookup(name) or {}).get("job_id")
        return find_job(_queue(), name, recorded)


def find_job(records: list[dict[str, Any]], name: str, recorded_id: str | int | None) -> tuple[int, str | None]:
    """(job id, state) of the job `name`: the id recorded at launch when the queue
    still lists it under that name, else the newest job of that name, else the
    recorded id with an unknown state (the queue no longer has it)."""
    mine = [r for r in records if _job_name(r) == name]
    if recorded_id not in (None, ""):
        for rec in mine:
            if str(_job_id(rec)) == str(recorded_id):
                return _job_id(rec), _state(rec)
    if mine:
        rec = max(mine, key=_job_id)
        return _job_id(rec), _state(rec)
    if recorded_id not in (None, ""):
        return int(recorded_id), None
    raise SuperviseError(f"no SkyPilot managed job named {name!r}; see `sky jobs queue`")


def nodes_exited(events: list) -> bool:
    """Every node's latest start (`node_start`, one writer per node) has an `exit` after it."""
    wanted, exits = latest_exits(events)
    return wanted > 0 and len(exits) >= wanted


def write_stop_request(checkpoints_url: str) -> None:
    """The stop request in the bucket. It carries no deadline: nothing reclaims the
    machines, so the trainer always saves (the node wrapper ignores any deadline in it)."""
    from supervisor.store.fs import Store

    body = {"requested_at": time.time(), "by": "supervise stop"}
    Store(checkpoints_url).put(json.dumps(body).encode(), *STOP_REQUEST)


def clear_stop_request(checkpoints_url: str) -> None:
    from supervisor.store.fs import Store

    store = Store(checkpoints_url)
    store.rm([store.path(*STOP_REQUEST)])


# ---- what a stop saved (both backends) ------------------------------------------


@dataclass
class StopResult:
    """What `supervise stop` saved: the step committed at the stop, or why none was."""

    name: str
    saved: bool
    step: int | None
    reason: str

    def line(self) -> str:
        return f"saved and committed step {self.step}" if self.saved else f"not saved: {self.reason}"

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "saved": self.saved, "step": self.step, "reason": self.reason}


_SAVED_AT = re.compile(r"saved and committed at step (\d+)")
_REASON_PREFIXES = ("stopped on request; ", "not saved: ")


def _say(line: str) -> None:
    """stop's progress lines: stderr, so that `stop --json` prints JSON alone."""
    print(line, file=sys.stderr, flush=True)


def latest_exits(events: list) -> tuple[int, list]:
    """(nodes of the newest start, the `exit` events of that start), from the run ledger."""
    latest: dict[str, Any] = {}
    for e in events:
        if e.kind == "node_start":
            latest[e.writer] = e
    wanted = max((int(e.get("num_nodes", 1)) for e in latest.values()), default=0)
    exits = {e.writer: e for e in events if e.kind == "exit" and e.writer in latest
             and e.incarnation == latest[e.writer].incarnation}
    return wanted, [exits[w] for w in sorted(exits)]


def stop_outcome(events: list) -> tuple[int | None, str]:
    """(step the nodes saved and committed at the stop, or None; why not), from the
    node wrappers' exit events: their `saved_step`, else the step their reason names."""
    wanted, exits = latest_exits(events)
    if not exits:
        return None, "no node reported its exit in the run ledger" if wanted else "no node ever started"
    steps = set()
    for e in exits:
        step = e.get("saved_step")
        if not isinstance(step, int) or isinstance(step, bool):
            m = _SAVED_AT.search(str(e.get("reason") or ""))
            step = int(m.group(1)) if m else None
        if step is not None:
            steps.add(step)
    if steps:
        return max(steps), ""
    why = str(exits[0].get("reason") or f"exit {exits[0].get('code')}")
    for prefix in _REASON_PREFIXES:
        why = why[len(prefix):] if why.startswith(prefix) else why
    return None, why


def stop_result(name: str, events: list, checkpoints_url: str | None, *, waited_out: str | None = None,
                catalog=None) -> StopResult:
    """What the nodes said they saved, checked against the catalog: a step counts
    only if it is committed and verifies there."""
    step, why = stop_outcome(events)
    if step is None:
        wanted, exits = latest_exits(events)
        if waited_out and len(exits) < wanted:
            why = waited_out
        return StopResult(name, False, None, why)
    if checkpoints_url is None and catalog is None:
        return StopResult(name, True, step, "reported by the nodes (no catalog to check)")
    try:
        from supervisor.store.catalog import Catalog

        info = (catalog or Catalog(checkpoints_url)).inspect(step)
    except Exception as err:  # noqa: BLE001 - then the nodes' word is all there is, and not enough
        return StopResult(name, False, step, f"the nodes reported step {step} saved, but the catalog could not be "
                                             f"read to confirm it: {type(err).__name__}: {err}")
    if info.state != "committed":
        return StopResult(name, False, step, f"the nodes reported step {step} saved, but the catalog has it "
                                             f"{info.state}" + (f" ({info.reason})" if info.reason else ""))
    return StopResult(name, True, step, "committed at the stop; it verifies in the catalog")


def wait_for_stop(name: str, ledger: str, done: Callable[[list], bool], *, cap_s: float | None = None,
                  poll_s: float = STOP_POLL_S, floor_s: float | None = None) -> tuple[list, str | None]:
    """Poll the run ledger until `done(events)` (the nodes exited); returns (events,
    None), or (events, why the wait ended first). No fixed budget: the wait is the
    node's own (notices.SaveWait: this run's measured save + commit, extended while
    save/commit events keep coming) plus STOP_SLACK_S; `cap_s` caps it where given."""
    from supervisor.ledger.journal import read_events
    from supervisor.node.notices import SAVE_EVENTS, SaveWait
    from supervisor.contract.node import NodeOptions

    defaults = NodeOptions()
    start = time.monotonic()
    wait = SaveWait(defaults.grace_s if floor_s is None else floor_s, defaults.hang_timeout_s, start)
    next_line = start + STOP_PROGRESS_S
    while True:
        events, _problems = read_events(ledger)
        if done(events):
            return events, None
        now = time.monotonic()
        wait.observe(events, now)
        limit = wait.give_up_at + STOP_SLACK_S if cap_s is None else start + cap_s
        if now > limit:
            return events, f"the nodes did not finish saving within {now - start:.0f} s ({wait.describe()})"
        if now >= next_line:
            next_line = now + STOP_PROGRESS_S
            saves = [e for e in events if e.kind in SAVE_EVENTS]
            last = f"; last: {saves[-1].kind.replace('checkpoint_', '')} step {saves[-1].get('step')}" if saves else ""
            _say(f"waiting for the nodes of {name} to save and exit: {now - start:.0f} s so far, "
                 f"at most {limit - now:.0f} s more ({wait.describe()}{last})")
        time.sleep(poll_s)


# What status/stop/logs read from the queue; queue_v2's default fields
# (sky/jobs/constants.py, DEFAULT_MANAGED_JOB_FIELDS) drop failure_reason and details.
# `details` is computed, not stored: sky/jobs/utils.py, _update_fields adds what it
# needs (schedule_state, priority, ...) and _format_job_details fills it: "In backoff,
# waiting for resources", a PENDING/STARTING job's launch progress, "Recovering: ...",
# "Failure: ..." -- why a job is not running.
QUEUE_FIELDS = ["job_id", "task_id", "job_name", "task_name", "status", "recovery_count", "failure_reason",
                "details", "submitted_at", "end_at"]


def _queue() -> list[dict[str, Any]]:
    """The managed-job queue; a jobs controller that autostopped is started again (refresh)."""
    sky = _sky()
    from sky import exceptions

    try:
        result = sky.stream_and_get(sky.jobs.queue_v2(refresh=False, skip_finished=False, fields=QUEUE_FIELDS))
    except exceptions.ClusterNotUpError:  # stopped controller: only refresh=True brings it back
        result = _call(sky.jobs.queue_v2, refresh=True, skip_finished=False, fields=QUEUE_FIELDS)
    except Exception as err:  # SkyPilot raises many unrelated types; all become one line
        raise explain_sky_error(err) from err
    records = result[0] if isinstance(result, tuple) else result
    return [rec if isinstance(rec, dict) else rec.model_dump() for rec in records]


def _job_name(rec: Mapping[str, Any]) -> str | None:
    return rec.get("job_name") or rec.get("task_name")


def _job_id(rec: Mapping[str, Any]) -> int:
    return int(rec.get("job_id") or 0)


def _state(rec: Mapping[str, Any]) -> str:
    state = rec.get("status")
    return str(getattr(state, "value", state))
