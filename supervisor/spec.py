"""JobSpec: the one validated description of a training run.

A recipe (YAML) becomes a JobSpec; supervisor.launch renders it once into a
NodeTask that every backend (SkyPilot, local) runs. Every rule a run must obey
is checked here, before anything is launched, and every failure names the
field and says what to do.

`node_options(spec)` is the command every node runs on every (re)start, the
same for all backends.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from supervisor.contract.node import DEFAULT_MAX_RESTARTS_WITHOUT_PROGRESS, Auto, Direct, Mount, NodeOptions
from supervisor.errors import SuperviseError
from supervisor.contract.exitcodes import RECOVER_ON
from supervisor.contract.runtime import DEFAULT_COMMIT_WAIT_S
from supervisor.titan_config import OWNED, PARALLEL_DEGREES, CheckUnavailable, check_args, model_problem, titan_configs

BUCKET_SCHEMES = ("s3", "gs", "r2", "nebius")
# S3-compatible stores SkyPilot mounts under their own scheme; the catalog reads
# them through the S3 API (AWS_ENDPOINT_URL + AWS_* credentials on the node).
S3_COMPATIBLE = ("r2", "nebius")
_BUCKET_RE = re.compile(r"^(?P<scheme>[a-z0-9]+)://(?P<bucket>[^/]+)(?P<prefix>(/[^/]+)*)/?$")
_S3_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_JOB_NAME = re.compile(r"^[a-z][a-z0-9\-]{0,62}$")
log = logging.getLogger(__name__)

Scalar = str | int | float | bool
_UPPER = BeforeValidator(lambda v: v.upper() if isinstance(v, str) else v)  # enum-like fields: any case


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True)


class Model(_Strict):
    module: str = "llama3"  # TorchTitan --module
    config: str  # TorchTitan --config (a config_registry function)


class Resources(_Strict):
    num_nodes: int = Field(1, ge=1)
    accelerators: dict[str, int] | None = None  # any-of, e.g. {H100: 8, H200: 8}; None = CPU
    procs_per_node: int | None = Field(None, ge=1)  # CPU runs: ranks per node (default 1)
    cpus: str | None = None  # SkyPilot syntax, e.g. "8+"
    memory: str | None = None
    disk_size: int = Field(256, ge=10)  # GB
    spot: bool = False
    infra: str | None = None  # SkyPilot --infra: aws, gcp, k8s, slurm, aws/us-east-1, ...
    image_id: str | None = None
    # SkyPilot's tiers, passed through: the OS disk (holds a MOUNT_CACHED cache of a
    # checkpoint per node; `high`/`ultra` for more than gp3's throughput) and the network
    # (`best`: EFA / GPUDirect where the instance type has it). Values: SkyPilot's own.
    disk_tier: str | None = None
    network_tier: str | None = None
    # Kubernetes: the pod's terminationGracePeriodSeconds, the time a preemption leaves for
    # the save (supervisor.launch.kubernetes); at most 600 s, cluster-autoscaler's default
    # cap (SkyPilot caps its own preemption hooks there: sky/clouds/kubernetes.py).
    termination_grace_s: int = Field(300, ge=30, le=600)

    @field_validator("disk_tier", "network_tier", mode="before")
    @classmethod
    def _tier(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None:
            return v
        v = str(v).lower()
        allowed = skypilot_tiers(info.field_name)
        if allowed is not None and v not in allowed:
            raise ValueError(f"{v!r} is not a SkyPilot {info.field_name.replace('_', ' ')}; use one of: {', '.join(allowed)}")
        return v

    @field_validator("accelerators", mode="before")
    @classmethod
    def _any_of(cls, v: Any) -> Any:
        if isinstance(v, str):  # "H100:8" like SkyPilot's shorthand
            name, _, count = v.partition(":")
            return {name: count or 1}
        return v

    @field_validator("accelerators")
    @classmethod
    def _counts(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        if v is not None:
            if not v:
                raise ValueError("give at least one accelerator, e.g. {H100: 8}, or null for CPU")
            bad = [k for k, n in v.items() if n < 1]
            if bad:
                raise ValueError(f"count for {bad[0]} must be >= 1")
        return v

    def ranks_per_node(self) -> set[int]:
        """Every possible ranks-per-node value (one per any-of choice)."""
        if self.accelerators:
            return set(self.accelerators.values())
        return {self.procs_per_node or 1}


def skypilot_tiers(field: str) -> list[str] | None:
    """The values sky.Resources accepts for `disk_tier` / `network_tier`, read from the
    installed SkyPilot (sky/utils/resources_utils.py, DiskTier and NetworkTier; sky/resources.py,
    Resources.__init__ checks `tier.value for tier in ...`); None without SkyPilot (it is
    imported only when a tier is set: `import sky` takes a second)."""
    try:
        from sky.utils import resources_utils
    except ImportError:
        return None
    enum = {"disk_tier": resources_utils.DiskTier, "network_tier": resources_utils.NetworkTier}[field]
    return [tier.value for tier in enum]


class Dataset(_Strict):
    name: str = "c4"  # TorchTitan registered dataset (--dataloader.dataset)
    path: str | None = None  # --dataloader.dataset_path (local folder or hub id)


class Tokenizer(_Strict):
    hf_repo: str | None = None  # downloaded at setup (gated repos need HF_TOKEN in secrets)
    path: str = "./assets/hf/tokenizer"  # --hf_assets_path on the node
    tiny: bool = False  # build a tiny tokenizer + corpus at setup (llama3_debug, no hub)


class Checkpoint(_Strict):
    bucket: str  # s3://bucket[/prefix]; the run's checkpoints go to <bucket>/<name>
    mode: Annotated[Literal["MOUNT_CACHED", "MOUNT", "DIRECT"], _UPPER] = "MOUNT_CACHED"
    mount_path: str = "/checkpoints"  # where the bucket is mounted on the node
    # steps between saves, or "auto": Young/Daly from the ledger at each (re)start (docs/ledger.md)
    interval: int | Literal["auto"] = 500
    interval_range: tuple[int, int] = (50, 5000)  # bounds of `auto`, in steps
    commit_wait_s: float = Field(DEFAULT_COMMIT_WAIT_S, ge=0)  # bounded wait for a cached mount to upload
    keep: int = Field(3, ge=0)  # committed checkpoints kept during the run (pruned after each commit); 0 = all

    @field_validator("interval", mode="before")
    @classmethod
    def _interval(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        if isinstance(v, str) and v.isdigit() and int(v) >= 1:
            return int(v)
        raise ValueError(f"{v!r} must be a number of steps >= 1, or auto")

    @field_validator("interval_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= v[0] <= v[1]:
            raise ValueError(f"{list(v)} must be [low, high] steps with 1 <= low <= high, e.g. [50, 5000]")
        return v

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        m = _BUCKET_RE.match(v)
        schemes = ", ".join(f"{s}://" for s in BUCKET_SCHEMES)
        if not m or m["scheme"] not in BUCKET_SCHEMES:
            raise ValueError(f"{v!r} is not a bucket URL; use {schemes}<bucket>[/prefix], e.g. s3://my-ckpts/runs")
        if not _S3_BUCKET_NAME.match(m["bucket"]) or ".." in m["bucket"]:
            raise ValueError(f"{m['bucket']!r} is not a valid bucket name (3-63 lowercase letters, digits, '.', '-')")
        return v.rstrip("/")

    @field_validator("mount_path")
    @classmethod
    def _abs(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"{v!r} must be an absolute path on the node, e.g. /checkpoints")
        return v.rstrip("/") or "/"


class Recovery(_Strict):
    strategy: Annotated[Literal["FAILOVER", "EAGER_NEXT_REGION"] | None, _UPPER] = None  # None: SkyPilot's default
    # After this many restarts in a row that ended retryable (69) with no new
    # committed step, the node wrapper gives up with 78 (never retried).
    max_restarts_without_progress: int = Field(DEFAULT_MAX_RESTARTS_WITHOUT_PROGRESS, ge=0)

    @property
    def recover_on_exit_codes(self) -> list[int]:
        """The node wrapper's retry codes; never USER_ERROR (a bad config must not loop)."""
        return [int(c) for c in RECOVER_ON]


class Install(_Strict):
    """What setup installs on the node; `pip: false` when the image already has it."""

    pip: bool = True
    python: str = "3.11"  # the node venv's Python (uv fetches it; TorchTitan 0.3.0 needs >= 3.11)
    torch: str | None = None  # None: the launching machine's version
    torchtitan: str | None = None  # None: the launching machine's version
    # None: the wheel of the launching machine's code, built at start and mounted;
    # else a pip spec (requirement, wheel URL or path) installed instead.
    supervise: str | None = None
    index_url: str | None = None  # e.g. https://download.pytorch.org/whl/cu128 for torch
    extra: list[str] = []

    @field_validator("python", mode="before")
    @classmethod
    def _python(cls, v: Any) -> str:
        v = str(v)  # YAML and --set read 3.12 as a number (and 3.10 as 3.1, rejected below)
        if not re.match(r"^3\.(1[1-9]|[2-9][0-9])(\.[0-9]+)?$", v):
            raise ValueError(f"{v!r}: TorchTitan 0.3.0 needs Python >= 3.11; use e.g. 3.11 or 3.12")
        return v


class JobSpec(_Strict):
    name: str
    model: Model
    resources: Resources = Resources()
    dataset: Dataset = Dataset()
    tokenizer: Tokenizer = Tokenizer()
    checkpoint: Checkpoint
    recovery: Recovery = Recovery()
    overrides: dict[str, Scalar | list[Scalar]] = {}  # TorchTitan --section.key value
    secrets: list[str] = ["HF_TOKEN"]  # names only; values come from the launching env
    envs: dict[str, str] = {}
    # The launching shell's short-lived AWS session keys (AWS_SESSION_TOKEN and its
    # key pair) expire within hours and would override the nodes' instance role:
    # forwarded only when asked. Long-lived keys (no session token) are forwarded.
    forward_aws_session: bool = False
    install: Install = Install()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _JOB_NAME.match(v):
            raise ValueError(f"{v!r}: use lowercase letters, digits and '-', starting with a letter (max 63)")
        return v

    @field_validator("secrets")
    @classmethod
    def _secret_names(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if not _ENV_NAME.match(s)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not an environment variable name")
        return list(dict.fromkeys(v))

    @field_validator("envs", mode="before")
    @classmethod
    def _env_values_as_text(cls, v: Any) -> Any:
        """`envs.PORT: 8018` (YAML or --set) means the text "8018": stringify
        scalars as SkyPilot's `Task.from_yaml_config` does with a task's envs."""
        if isinstance(v, dict):
            return {str(k): x if x is None or isinstance(x, (dict, list)) else str(x) for k, x in v.items()}
        return v

    @field_validator("overrides")
    @classmethod
    def _override_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            bare = key.lstrip("-").replace("-", "_")
            if key.startswith("-") or not re.match(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*$", key):
                raise ValueError(f"{key!r}: write TorchTitan keys as section.key without dashes, e.g. training.steps")
            if bare in OWNED:
                raise ValueError(f"{key!r} is managed by supervise: {OWNED[bare].why}")
        return v

    @property
    def num_nodes(self) -> int:
        return self.resources.num_nodes

    @property
    def gpus_per_node(self) -> int:
        """Ranks per node: the smallest any-of accelerator count, or procs_per_node on CPU."""
        return min(self.resources.ranks_per_node())

    @property
    def checkpoints_url(self) -> str:
        """The catalog URL: the bucket folder that holds this run's step-N folders.

        Always an fsspec URL (r2:// and nebius:// are read as s3:// through the endpoint).
        """
        scheme, rest = self.checkpoint.bucket.split("://", 1)
        scheme = "s3" if scheme in S3_COMPATIBLE else scheme
        return f"{scheme}://{rest}/{self.name}"

    @property
    def checkpoint_dir(self) -> str:
        """Where TorchTitan writes on the node: the mount, or the bucket itself.

        SkyPilot mounts a bucket root only (sky/data/storage.py,
        Storage._validate_source: MOUNT modes reject a sub-path), so the
        bucket's prefix goes into the path under the mount.
        """
        if self.checkpoint.mode == "DIRECT":
            return self.checkpoints_url
        prefix = self.checkpoint.bucket.split("://", 1)[1].partition("/")[2]
        return f"{self.checkpoint.mount_path.rstrip('/')}/{prefix + '/' if prefix else ''}{self.name}"


def validate(data: dict[str, Any]) -> JobSpec:
    """Build a JobSpec from plain data, checking every rule; SuperviseError otherwise."""
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as err:
        raise SuperviseError(_explain(err)) from None
    _check_model(spec)
    _check_parallelism(spec)
    _check_secrets(spec)
    _check_titan_args(spec)
    return spec


def _explain(err: ValidationError) -> str:
    """One line per problem, each naming the field and the fix."""
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "recipe"
        kind, msg = e["type"], e["msg"]
        if kind == "extra_forbidden":
            parent = ".".join(str(p) for p in e["loc"][:-1])
            known = _known_fields(e["loc"][:-1])
            where = f" in {parent}" if parent else ""
            lines.append(f"unknown field {field!r}{where}; remove it or use one of: {', '.join(known)}")
        elif kind == "missing":
            lines.append(f"field {field!r} is required; add it to the recipe or pass --set {field}=...")
        elif kind == "value_error":
            lines.append(f"field {field!r}: {msg.removeprefix('Value error, ')}")
        else:
            got = e.get("input")
            lines.append(f"field {field!r}: {msg[:1].lower() + msg[1:]} (got {got!r}); fix the value in the recipe or with --set")
    return "; ".join(lines)


def _known_fields(loc: tuple) -> list[str]:
    model: type[BaseModel] = JobSpec
    for part in loc:
        ann = model.model_fields[str(part)].annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def _check_model(spec: JobSpec) -> None:
    """The node's rule (titan_config.model_problem), said in recipe words."""
    problem = model_problem(spec.model.module, spec.model.config)
    if problem:
        field = "model.config" if titan_configs(spec.model.module) is not None else "model.module"
        raise SuperviseError(f"field {field!r}: {problem}")


def _check_titan_args(spec: JobSpec) -> None:
    """TorchTitan's own parser on the run's arguments, here rather than on a node
    the job already pays for. A parser that cannot run here (e.g. a package that only
    setup installs, on the nodes) is not the recipe's fault: the nodes still check."""
    try:
        problem = check_args(titan_args(spec))
    except (CheckUnavailable, TimeoutError) as err:
        log.warning("TorchTitan arguments not checked before launch (%s); each node checks them before it "
                    "trains, and a bad one ends the job there (exit 78, naming the flag)", err)
        return
    if problem:
        raise SuperviseError(f"field 'overrides': TorchTitan rejects the trainer arguments: {problem}")


def parallelism(spec: JobSpec) -> dict[str, int]:
    """Effective degrees: the TorchTitan config's own, then the recipe's overrides."""
    degrees = dict((titan_configs(spec.model.module) or {}).get(spec.model.config, {}))
    for key, value in spec.overrides.items():
        section, _, leaf = key.partition(".")
        if section == "parallelism" and leaf in PARALLEL_DEGREES:
            try:
                degrees[leaf] = int(value)
            except (TypeError, ValueError):
                raise SuperviseError(f"field 'overrides.{key}': {value!r} is not an integer") from None
    return degrees


def _check_parallelism(spec: JobSpec) -> None:
    degrees = parallelism(spec)
    fixed = math.prod(d for k, d in degrees.items() if d > 0 and k != "data_parallel_shard_degree")
    shard = degrees.get("data_parallel_shard_degree", -1)
    needed = fixed * (shard if shard > 0 else 1)
    for per_node in sorted(spec.resources.ranks_per_node()):
        world = spec.resources.num_nodes * per_node
        ok = world == needed if shard > 0 else world % needed == 0
        if not ok:
            desc = " x ".join(f"{k.removesuffix('_degree')}={v}" for k, v in sorted(degrees.items()) if v > 1)
            field = "resources.accelerators" if spec.resources.accelerators else "resources.procs_per_node"
            raise SuperviseError(
                f"field {field!r}: {spec.resources.num_nodes} node(s) x {per_node} = {world} ranks "
                f"is not divisible by the parallelism ({desc or 'none'} = {needed}); "
                f"change the accelerator count, resources.num_nodes, or the parallelism overrides"
            )


def _check_secrets(spec: JobSpec) -> None:
    repo = spec.tokenizer.hf_repo or ""
    if repo.startswith("meta-llama/") and "HF_TOKEN" not in spec.secrets:
        raise SuperviseError(f"field 'secrets': tokenizer.hf_repo {repo!r} is gated; add HF_TOKEN to secrets")


def titan_args(spec: JobSpec) -> list[str]:
    """TorchTitan arguments of the run (without what the node wrapper adds)."""
    args = ["--module", spec.model.module, "--config", spec.model.config,
            "--hf_assets_path", spec.tokenizer.path,
            "--dataloader.dataset", spec.dataset.name]
    if spec.dataset.path:
        args += ["--dataloader.dataset_path", spec.dataset.path]
    if spec.checkpoint.interval != "auto":  # auto: the node wrapper picks it at each (re)start
        args += ["--checkpoint.interval", str(spec.checkpoint.interval)]
    for key, value in spec.overrides.items():
        args += _override_args(key, value)
    return args


def _override_args(key: str, value: Any) -> list[str]:
    """TorchTitan (tyro) syntax: booleans are flags, lists are repeated values."""
    flag = f"--{key}"
    if value is True:
        return [flag]
    if value is False:
        section, _, leaf = key.rpartition(".")
        return [f"--{section + '.' if section else ''}no-{leaf}"]
    if isinstance(value, list):
        return [flag, *(str(v) for v in value)]
    return [flag, str(value)]


def node_options(spec: JobSpec) -> NodeOptions:
    """The command every node runs on every (re)start (NodeOptions.to_argv renders it).

    The catalog is always read through the bucket URL. With a mount, TorchTitan
    writes to the mount path and a commit waits up to commit_wait_s for the upload.
    """
    ckpt = spec.checkpoint
    return NodeOptions(
        checkpoints=spec.checkpoints_url, max_restarts_without_progress=spec.recovery.max_restarts_without_progress,
        write=Direct() if ckpt.mode == "DIRECT" else Mount(spec.checkpoint_dir, ckpt.commit_wait_s), keep=ckpt.keep,
        interval=Auto(*ckpt.interval_range) if ckpt.interval == "auto" else None,
        nproc_per_node=None if spec.resources.accelerators else spec.resources.procs_per_node or None,
        trainer_args=tuple(titan_args(spec)),
    )
