"""Kubernetes: hand the node wrapper the kubelet's termination notice.

On Kubernetes the kubelet's SIGTERM goes to the pod's PID 1, which is SkyPilot's
bash with `trap : TERM INT` (SkyPilot 0.14.1, sky/templates/kubernetes-ray.yml.j2,
"SIGTERM keep-alive"): the node wrapper never sees it, so without help no notice
ever arrives. The help is a preStop hook on SkyPilot's container (`ray-node` in
that template), given through the task's `config: kubernetes: pod_config:`
(task-overridable: sky/skylet/constants.py OVERRIDEABLE_CONFIG_KEYS_IN_TASK;
merged into the pod by sky/provision/kubernetes/utils.py combine_pod_config_fields,
containers patch-merged by name: sky/utils/config_utils.py merge_k8s_configs).

The kubelet runs preStop first and SIGKILLs the pod when the grace period
(`terminationGracePeriodSeconds`) ends. The hook writes the wrapper's notice file
(`--notice-file`, from SUPERVISE_NOTICE_FILE in the task's envs) with the time left
as its deadline, then waits until the wrapper has saved, committed and exited (it
writes notices.done_marker), so the pod is not torn down under the save. Nothing
takes the file within 10 s: no wrapper runs (setup, or the job ended); the hook
returns and the file stays for a wrapper that starts later. SkyPilot's own
preemption hooks (`config.hooks`, events: [preemption]) forward the SIGTERM to the
skylet of the head pod only; this hook runs in every pod, each node's own notice.
"""

from __future__ import annotations

import shlex
from pathlib import PurePosixPath
from typing import Any

from supervisor.node.notices import done_marker

CONTAINER = "ray-node"  # SkyPilot's container in sky/templates/kubernetes-ray.yml.j2
NOTICE_FILE = "/tmp/supervise-notice/notice.json"  # the pod's own /tmp: known to the hook and the wrapper
NOTICE_ENV = "SUPERVISE_NOTICE_FILE"  # `supervise node --notice-file`'s variable
SOURCE = "kubernetes"  # the notice's source in the ledger and the restart record
DEADLINE_MARGIN_S = 5  # the deadline the trainer plans with: before the kubelet's SIGKILL
TAKEN_WAIT_S = 10  # a running wrapper takes the file within its 0.25 s poll


def prestop_script(notice_file: str, grace_s: int) -> str:
    """POSIX sh run by the kubelet's preStop exec: notice, then wait for the wrapper's exit."""
    path = PurePosixPath(notice_file)
    f, d, done = shlex.quote(str(path)), shlex.quote(str(path.parent)), shlex.quote(str(done_marker(path)))
    notice = f'{{"source": "{SOURCE}", "deadline_s": {max(grace_s - DEADLINE_MARGIN_S, 1)}}}'
    return "\n".join([
        f"mkdir -p {d} && chmod 0777 {d} 2>/dev/null; rm -f {done}",
        f"printf '%s' {shlex.quote(notice)} > {f}.tmp && mv {f}.tmp {f}",
        f"i=0; while [ -e {f} ] && [ $i -lt {TAKEN_WAIT_S * 4} ]; do sleep 0.25; i=$((i+1)); done",
        f"[ -e {f} ] && exit 0  # nobody took it: no wrapper is running",
        f"while [ ! -e {done} ]; do sleep 0.5; done  # the save, the commit, the exit (the grace period bounds it)",
    ])  # fmt: skip


def config_overrides(grace_s: int) -> dict[str, Any]:
    """The task's `config` (SkyPilot's cluster config overrides) for Kubernetes pods;
    other clouds ignore the `kubernetes` section."""
    hook = {"exec": {"command": ["/bin/sh", "-c", prestop_script(NOTICE_FILE, grace_s)]}}
    pod = {"spec": {"terminationGracePeriodSeconds": grace_s,
                    "containers": [{"name": CONTAINER, "lifecycle": {"preStop": hook}}]}}  # fmt: skip
    return {"kubernetes": {"pod_config": pod}}


NODE_ENVS = {NOTICE_ENV: NOTICE_FILE}  # every node's wrapper watches the file the hook writes
