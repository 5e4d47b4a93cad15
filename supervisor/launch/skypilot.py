"""JobSpec -> SkyPilot managed job (`sky jobs launch`), and views over it.

The task is built from SkyPilot's own objects (sky.Task, sky.Resources,
sky.data.Storage) so SkyPilot validates it; `render_yaml` prints what
SkyPilot would receive, with secret values redacted by SkyPilot's own
redaction. `sky` is imported inside functions: `supervise --help` stays fast.

How checkpoints reach the bucket:
- MOUNT_CACHED (default) / MOUNT: the bucket (with its prefix) is mounted at
  `checkpoint.mount_path`; TorchTitan writes to `<mount>/<name>` and the node
  wrapper commits only after every object is visible through the bucket API
  (`--checkpoints <bucket URL>`, bounded by `--commit-wait`).
- DIRECT: TorchTitan writes `s3://...` itself through fsspec. This is the mode
  for generic S3-compatible endpoints (MinIO, SeaweedFS, ...) set by
  AWS_ENDPOINT_URL: SkyPilot 0.14 mounts s3:// from AWS only, and R2/Nebius
  under their own r2:// / nebius:// schemes.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping

from supervisor import registry
from supervisor.errors import SuperviseError
from supervisor.launch.base import AlreadyFinished, JobStatus, is_terminal
from supervisor.launch.setup import VENV
from supervisor.launch.task import NodeTask
from supervisor.spec import S3_COMPATIBLE, JobSpec

BACKEND = "skypilot"
# Store credentials forwarded as secrets when set in the launching shell
# (on AWS/GCP with instance roles they are not needed).
STORE_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
STORE_ENVS = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")
GRACEFUL_TIMEOUT_S = 900  # stop: time for the final save + MOUNT_CACHED upload
UNSET = "<unset>"  # stands in for a secret the launching shell does not have (dry runs)


class SkyPilotUnavailable(SuperviseError):
    """SkyPilot is missing or not set up; the message names the fixing command."""

    exit_code = 1


def _sky():
    try:
        import sky
    except ImportError:
        raise SkyPilotUnavailable(
            "SkyPilot is not installed; install the cloud extra: pip install -e '.[cloud]' (then run `sky check`)"
        ) from None
    return sky


# ---------------------------------------------------------------- rendering


def run_script(task: NodeTask) -> str:
    """The node command, exec'd so its exit code (75/69/78) is the job's and SIGTERM reaches it."""
    return (
        "set -euo pipefail\n"
        f"if [ -f {VENV}/bin/activate ]; then . {VENV}/bin/activate; fi\n"
        f"exec {shlex.join(task.run)}\n"
    )


def task_envs(task: NodeTask, environ: Mapping[str, str]) -> dict[str, str]:
    envs = {k: environ[k] for k in STORE_ENVS if environ.get(k)}
    envs.update(task.envs)
    return envs


def task_secrets(task: NodeTask, environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """Secret values from the launching shell, and the names it lacks (those get UNSET)."""
    secrets, missing = {}, []
    for key in task.secrets:
        if environ.get(key):
            secrets[key] = environ[key]
        else:
            secrets[key] = UNSET
            missing.append(key)
    secrets.update({k: environ[k] for k in STORE_SECRETS if environ.get(k) and k not in secrets})
    return secrets, missing


def check_store(task: NodeTask, environ: Mapping[str, str]) -> None:
    """Bucket rules that depend on the launching environment."""
    scheme = task.checkpoint.bucket.split("://", 1)[0]
    endpoint = environ.get("AWS_ENDPOINT_URL")
    if scheme == "s3" and endpoint and task.checkpoint.mode != "DIRECT":
        raise SuperviseError(
            f"field 'checkpoint.mode': SkyPilot 0.14 mounts s3:// buckets from AWS only, but AWS_ENDPOINT_URL="
            f"{endpoint} points elsewhere; use --set checkpoint.mode=DIRECT (TorchTitan writes through the endpoint), "
            f"or an r2:// / nebius:// bucket for those stores"
        )
    if scheme in S3_COMPATIBLE and not endpoint:
        raise SuperviseError(
            f"field 'checkpoint.bucket': {scheme}:// checkpoints are verified through the S3 API; "
            f"export AWS_ENDPOINT_URL (and AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) for that store"
        )


def build_task(task: NodeTask, environ: Mapping[str, str]):
    """The sky.Task for `task`, and the secret names the launching shell lacks."""
    sky = _sky()
    from sky import exceptions

    check_store(task, environ)
    res = task.resources
    common: dict[str, Any] = {
        "use_spot": res.spot,
        "disk_size": res.disk_size,
        "job_recovery": {
            "strategy": task.restart.strategy,
            "max_restarts_on_errors": task.restart.max_restarts_on_errors,
            "recover_on_exit_codes": task.restart.recover_on_exit_codes,
        },
    }
    for key in ("infra", "cpus", "memory", "image_id"):
        if getattr(res, key) is not None:
            common[key] = getattr(res, key)
    choices = [{name: n} for name, n in sorted(res.accelerators.items())] if res.accelerators else [None]
    try:
        resources = {sky.Resources(accelerators=acc, **common) for acc in choices}
    except (ValueError, exceptions.InvalidCloudConfigs, exceptions.NotSupportedError) as err:
        field = "resources.infra" if res.infra and "infra" in str(err).lower() or "cloud" in str(err).lower() else "resources"
        raise SuperviseError(f"field {field!r}: SkyPilot rejects it: {_first_line(err)}") from None
    secrets, missing = task_secrets(task, environ)
    sky_task = sky.Task(
        name=task.name,
        setup=task.setup,
        run=run_script(task),
        num_nodes=task.num_nodes,
        envs=task_envs(task, environ),
        secrets=secrets,
    )
    sky_task.set_resources(resources)
    if task.checkpoint.mode != "DIRECT":
        storage = sky.data.Storage(source=task.checkpoint.bucket, mode=sky.data.StorageMode[task.checkpoint.mode])
        sky_task.set_storage_mounts({task.checkpoint.mount_path: storage})
    return sky_task, missing


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

    def render(self) -> str:
        return render_yaml(self.task)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# ---------------------------------------------------------------- SkyPilot calls


def explain_sky_error(err: BaseException) -> SuperviseError:
    """A SkyPilot failure as one line that names the `sky` command that fixes it."""
    from sky import exceptions

    text = _first_line(err)
    if isinstance(err, exceptions.ApiServerConnectionError):
        return SkyPilotUnavailable(
            f"the SkyPilot API server is unreachable ({text}); start it with `sky api start` "
            f"or point at yours with `sky api login -e URL`"
        )
    if isinstance(err, exceptions.ApiServerAuthenticationError):
        return SkyPilotUnavailable(f"SkyPilot API server login failed ({text}); run `sky api login`")
    if isinstance(err, (exceptions.NoCloudAccessError, exceptions.InvalidCloudCredentials,
                        exceptions.InvalidCloudConfigs)) or "sky check" in str(err) or "No cloud" in str(err):
        return SkyPilotUnavailable(f"no usable cloud in SkyPilot ({text}); run `sky check` and follow its hints")
    if isinstance(err, exceptions.ResourcesUnavailableError):
        return SkyPilotUnavailable(
            f"no capacity for this job ({text}); try another --infra, other accelerators, "
            f"or see `sky show-gpus`"
        )
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


def summary(spec: JobSpec) -> list[tuple[str, str]]:
    """What `start` shows before launching."""
    res, ck, rec = spec.resources, spec.checkpoint, spec.recovery
    accel = " or ".join(f"{k}:{v}" for k, v in sorted(res.accelerators.items())) if res.accelerators else "CPU"
    rows = [
        ("job", spec.name),
        ("model", f"{spec.model.module} / {spec.model.config}"),
        ("nodes", str(res.num_nodes)),
        ("accelerators", f"{accel} per node"),
        ("capacity", "spot" if res.spot else "on-demand"),
        ("infra", res.infra or "any enabled (SkyPilot chooses)"),
        ("checkpoints", f"{spec.checkpoints_url} ({ck.mode}, every {ck.interval} steps)"),
        ("recovery", f"{rec.strategy or 'SkyPilot default'}; restart on exit codes {rec.recover_on_exit_codes}, "
                     f"other codes never (gives up after {rec.max_restarts_without_progress} restarts "
                     f"without a new checkpoint)"),
    ]
    price, source = estimate_hourly(spec)
    rows.append(("estimated cost", f"${price:.2f}/h ({source})"))
    return rows


def estimate_hourly(spec: JobSpec) -> tuple[float, str]:
    """$/h for the whole job and where the price came from: the ledger's one price reader
    (a cached SkyPilot catalog, else the built-in table; never a download)."""
    from supervisor.ledger.prices import price_for

    res = spec.resources
    price = price_for(res.accelerators, cloud=res.infra.split("/")[0] if res.infra else None, prefer_spot=res.spot)
    return (price.spot if res.spot else price.on_demand) * res.num_nodes, price.source


class SkyPilotBackend:
    """Backend over SkyPilot managed jobs."""

    name = BACKEND

    def adapt(self, spec: JobSpec) -> JobSpec:
        return spec  # SkyPilot provides everything a JobSpec can ask for

    def dryrun(self, task: NodeTask, *, environ: Mapping[str, str] | None = None) -> SkyPilotRequest:
        sky_task, missing = build_task(task, os.environ if environ is None else environ)
        return SkyPilotRequest(task.name, sky_task, task.checkpoints_url, missing)

    def schedule(self, request: SkyPilotRequest) -> str:
        sky = _sky()
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
            out.append(JobStatus(
                name=job_name, backend=BACKEND,
                state=_state(rec),
                recoveries=int(rec.get("recovery_count") or 0),
                job_id=str(rec.get("job_id")),
                reason=rec.get("failure_reason"),
                checkpoints_url=known.get("checkpoints_url"),
            ))
        return out

    def logs(self, name: str, *, follow: bool = False) -> None:
        """By job id: SkyPilot's tail_logs by name only finds jobs still running."""
        sky = _sky()
        job_id, state = self._resolve(name)
        try:
            code = sky.jobs.tail_logs(job_id=job_id, follow=follow and not is_terminal(state),
                                      output_stream=sys.stdout)
        except Exception as err:
            raise explain_sky_error(err) from err
        if code:
            sys.exit(code)

    def cancel(self, name: str, *, graceful: bool = True) -> None:
        sky = _sky()
        job_id, state = self._resolve(name)
        if is_terminal(state):
            raise AlreadyFinished(f"{name} (managed job {job_id}) already finished: {state}; nothing to stop")
        if graceful:
            _call(sky.jobs.cancel, job_ids=[job_id], graceful=True, graceful_timeout=GRACEFUL_TIMEOUT_S)
        else:
            _call(sky.jobs.cancel, job_ids=[job_id])

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


def _queue() -> list[dict[str, Any]]:
    sky = _sky()
    result = _call(sky.jobs.queue_v2, refresh=False, skip_finished=False)
    records = result[0] if isinstance(result, tuple) else result
    return [rec if isinstance(rec, dict) else rec.model_dump() for rec in records]


def _job_name(rec: Mapping[str, Any]) -> str | None:
    return rec.get("job_name") or rec.get("task_name")


def _job_id(rec: Mapping[str, Any]) -> int:
    return int(rec.get("job_id") or 0)


def _state(rec: Mapping[str, Any]) -> str:
    state = rec.get("status")
    return str(getattr(state, "value", state))
