"""Kubernetes notices (supervisor.launch.kubernetes): the rendered task's preStop
hook and grace period pass SkyPilot's own schema and merge, and running the hook
for real (sh, as the kubelet's exec does) hands a running `supervise node` a
notice it saves and commits for (75), the hook returning once the wrapper exited.
No cluster here: the kubelet is the test, which runs the hook's command."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from supervisor.contract.exitcodes import ExitCode
from supervisor.launch import kubernetes
from supervisor.launch.local_controller import free_port
from supervisor.contract.layout import ledger_url
from supervisor.contract.runtime import heartbeat_steps
from tests.node.nodeproc import cleanup, start_node, wait_for

GOLDEN = Path(__file__).parent / "golden" / "skypilot"


def _sky_template() -> str:
    import sky

    return (Path(sky.__file__).parent / "templates" / "kubernetes-ray.yml.j2").read_text()


def test_skypilot_pid1_ignores_sigterm_and_names_the_container():
    """What the hook is for, read from SkyPilot's installed pod template."""
    template = _sky_template()
    assert "trap : TERM INT" in template
    assert re.search(rf"^\s+- name: {kubernetes.CONTAINER}\s*$", template, re.M)


@pytest.mark.parametrize("golden", sorted(GOLDEN.glob("*.yaml")), ids=lambda p: p.stem)
def test_rendered_task_config_passes_skypilot_schema(golden):
    """The task each recipe renders carries the hook and the grace period as the task's
    `config` (SkyPilot moves it to resources._cluster_config_overrides), valid against
    SkyPilot's own task schema; the nodes' wrappers watch the file the hook writes."""
    import sky
    from sky.utils import common_utils, schemas

    config = yaml.safe_load(golden.read_text())
    resources = config["resources"].get("any_of") or [config["resources"]]
    overrides = [r["_cluster_config_overrides"] for r in resources]
    assert all(o == overrides[0] for o in overrides)
    common_utils.validate_schema(overrides[0], schemas.get_task_schema()["properties"]["config"], "task config: ")
    as_written = {k: v for k, v in config.items() if k != "resources"}
    task = {**as_written, "resources": {k: v for k, v in resources[0].items() if k != "_cluster_config_overrides"},
            "config": overrides[0]}  # fmt: skip
    common_utils.validate_schema(task, schemas.get_task_schema(), "task: ")
    parsed = sky.Task.from_yaml_config(task)
    assert next(iter(parsed.resources)).cluster_config_overrides == overrides[0]
    spec = overrides[0]["kubernetes"]["pod_config"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == 300  # the recipe default (resources.termination_grace_s)
    (container,) = spec["containers"]
    assert kubernetes.NOTICE_FILE in container["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert config["envs"][kubernetes.NOTICE_ENV] == kubernetes.NOTICE_FILE


def test_skypilot_merges_the_hook_into_its_container():
    """SkyPilot's own merge (combine_pod_config_fields) patches the template's container by name."""
    from sky.provision.kubernetes.utils import combine_pod_config_fields

    pod = {"spec": {"containers": [{"name": kubernetes.CONTAINER, "image": "img", "env": []}]}}
    cluster = {"available_node_types": {"ray_head_default": {"node_config": pod}}}
    merged = combine_pod_config_fields(cluster, kubernetes.config_overrides(120))
    spec = merged["available_node_types"]["ray_head_default"]["node_config"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == 120
    (container,) = spec["containers"]
    assert container["image"] == "img" and container["lifecycle"]["preStop"]["exec"]["command"][:2] == ["/bin/sh", "-c"]


def _prestop(monkeypatch, notice_file: Path, grace_s: int) -> list[str]:
    """The preStop command as rendered, for a notice file in the test's folder."""
    monkeypatch.setattr(kubernetes, "NOTICE_FILE", str(notice_file))
    spec = kubernetes.config_overrides(grace_s)["kubernetes"]["pod_config"]["spec"]
    return spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]


def test_prestop_without_a_wrapper_returns(monkeypatch, tmp_path):
    """Nobody takes the notice (setup, or the job ended): the hook does not hold the pod."""
    monkeypatch.setattr(kubernetes, "TAKEN_WAIT_S", 1)
    notice = tmp_path / "k8s" / "notice.json"
    done = subprocess.run(_prestop(monkeypatch, notice, 60), timeout=30)
    assert done.returncode == 0 and json.loads(notice.read_text()) == {"source": "kubernetes", "deadline_s": 55}


@pytest.mark.slow
def test_prestop_hands_the_wrapper_a_notice_it_saves_for(monkeypatch, tmp_path, s3_url):
    notice = tmp_path / "k8s" / "notice.json"
    run_dir = tmp_path / "run"
    args = ["--checkpoints", s3_url, "--trainer-module", "tests.node.standin_trainer", "--nproc-per-node", "1",
            "--master-port", str(free_port()), "--run-dir", str(run_dir), "--cloud", "none"]  # fmt: skip
    trainer = ["--module", "llama3", "--config", "llama3_debugmodel", "--training.steps", "1000"]
    proc = start_node(args, trainer, env={"STANDIN_SAVE_EVERY": "0", "STANDIN_STEP_S": "0.2",
                                          kubernetes.NOTICE_ENV: str(notice)}, log=tmp_path / "node.log")  # fmt: skip
    try:
        wait_for(lambda: max(heartbeat_steps(run_dir).values(), default=0) >= 3, 120)
        hook = subprocess.Popen(_prestop(monkeypatch, notice, 60))  # what the kubelet runs
        code = proc.wait(120)
        assert hook.wait(30) == 0  # it waited for the wrapper's exit, then let the pod go
    finally:
        cleanup(proc)
    log = (tmp_path / "node.log").read_text(errors="replace")
    assert code == ExitCode.PREEMPTED_SAVED, log
    outcome = json.loads((run_dir / "outcome.json").read_text())
    assert outcome["outcome"] == "preempted_saved"
    from supervisor.ledger.journal import read_events
    from supervisor.store.catalog import Catalog

    assert Catalog(s3_url).inspect(outcome["step"]).state == "committed"
    (event,) = [e for e in read_events(ledger_url(s3_url))[0] if e.kind == "notice"]
    assert event.get("source") == "kubernetes" and event.get("deadline") is not None
    assert json.loads(Path(f"{notice}.done").read_text())["code"] == ExitCode.PREEMPTED_SAVED
