"""JobSpec -> NodeTask: what every node of a job runs, rendered once, for any backend.

Like torchx's AppDef (specs/) against its schedulers: the NodeTask is plain
data and says *what* runs; a backend (launch.skypilot, launch.local) turns it
into its own request (a sky.Task, a local job folder) and says *where*.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from supervisor.contract.exitcodes import RECOVER_ON
from supervisor.contract.layout import ledger_url
from supervisor.contract.node import NodeOptions
from supervisor.spec import Checkpoint, JobSpec, Resources, node_options

# SkyPilot's restart rule (sky/jobs/recovery_strategy.py, should_restart_on_failure):
# a code in recover_on_exit_codes restarts without limit or count, any other
# non-zero code spends max_restarts_on_errors. Its only "never retry" is a zero
# budget, so 78 (config error) is never retried; 69 loops are bounded by the
# node wrapper instead (--max-restarts-without-progress, then it exits 78).
MAX_RESTARTS_ON_ERRORS = 0


@dataclass
class RestartPolicy:
    """SkyPilot's `job_recovery` fields, which the local emulator obeys too."""

    strategy: str | None = None  # None: SkyPilot's default (EAGER_NEXT_REGION)
    max_restarts_on_errors: int = MAX_RESTARTS_ON_ERRORS
    recover_on_exit_codes: list[int] = field(default_factory=lambda: [int(c) for c in RECOVER_ON])


@dataclass
class NodeTask:
    name: str
    setup: str  # bash, run on every node before the first run of `run`
    run: NodeOptions  # the node command, run on every node on every (re)start
    num_nodes: int
    ranks_per_node: int
    checkpoints_url: str
    ledger_url: str
    restart: RestartPolicy
    envs: dict[str, str] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)  # names; values come from the launching shell
    resources: Resources = field(default_factory=Resources)  # what to ask a cloud for
    checkpoint: Checkpoint | None = None  # bucket, mount mode and path (backends that mount)
    files: dict[str, str] = field(default_factory=dict)  # node folder -> local folder to ship (the supervise wheel)
    forward_aws_session: bool = False  # the launching shell's AWS session keys go to the nodes (spec's switch)


def render(spec: JobSpec) -> NodeTask:
    """The one rendering of `spec` every backend starts from."""
    from supervisor.launch.setup import setup_script, shipped_files, shipped_wheel

    built = shipped_wheel(spec)  # once: the setup names the very file that is shipped
    return NodeTask(
        name=spec.name,
        setup=setup_script(spec, built),
        run=node_options(spec),
        num_nodes=spec.num_nodes,
        ranks_per_node=spec.gpus_per_node,
        checkpoints_url=spec.checkpoints_url,
        ledger_url=ledger_url(spec.checkpoints_url),
        restart=RestartPolicy(strategy=spec.recovery.strategy),
        envs={"PYTHONUNBUFFERED": "1", **spec.envs},
        secrets=list(spec.secrets),
        resources=spec.resources.model_copy(deep=True),
        checkpoint=spec.checkpoint.model_copy(deep=True),
        files=shipped_files(built),
        forward_aws_session=spec.forward_aws_session,
    )
