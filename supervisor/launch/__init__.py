"""Launching a JobSpec: recipe -> JobSpec -> NodeTask -> Backend, one path for all.

`submit(spec, backend=...)` is what `supervise start` and `supervise demo`
call: the backend adapts the spec to what it can provide, the NodeTask is
rendered once, the backend turns it into its request (`dryrun`), and
`schedule` submits exactly that request (torchx: `schedule(submit_dryrun(app))`).
Backends are looked up by name and imported only when used.
"""

from __future__ import annotations

import importlib
from typing import Any

from supervisor.errors import SuperviseError

# name -> (module, class): imported on first use, so `supervise --help` pays for neither.
BACKENDS = {
    "skypilot": ("supervisor.launch.skypilot", "SkyPilotBackend"),
    "local": ("supervisor.launch.local", "LocalBackend"),
}


def get_backend(name: str):
    try:
        module, cls = BACKENDS[name]
    except KeyError:
        raise SuperviseError(f"unknown backend {name!r}; use one of: {', '.join(BACKENDS)}", exit_code=2) from None
    return getattr(importlib.import_module(module), cls)()


def dryrun(spec, *, backend: str, **options: Any):
    """(backend, request): the request `schedule` would submit for `spec`, built once."""
    from supervisor.launch.task import render

    impl = get_backend(backend)
    return impl, impl.dryrun(render(impl.adapt(spec)), **options)


def submit(spec, *, backend: str, **options: Any) -> str:
    """Launch `spec` on `backend`; writes the job's `launch` ledger event; returns the job id."""
    impl, request = dryrun(spec, backend=backend, **options)
    return schedule(impl, request, spec)


def require_secrets(request) -> None:
    """A dry run may lack secret values (it prints placeholders); a launch may not."""
    if request.missing_secrets:
        key = request.missing_secrets[0]
        raise SuperviseError(f"field 'secrets': {key} is not set in this shell; export {key}=... "
                             f"(or drop it with --set secrets=[...])")


def schedule(impl, request, spec) -> str:
    """Submit a request from `dryrun`, then record the launch in the run's ledger."""
    require_secrets(request)
    job_id = impl.schedule(request)
    record_launch(spec, backend=impl.name, job_id=job_id)
    return job_id


def record_launch(spec, *, backend: str, job_id: str) -> None:
    """The `launch` event, the same fields for every backend (ledger.events.launch_fields)."""
    from supervisor.ledger.events import launch_fields
    from supervisor.ledger.journal import Journal
    from supervisor.contract.layout import ledger_url

    res = spec.resources
    fields = launch_fields(name=spec.name, backend=backend, num_nodes=res.num_nodes, accelerators=res.accelerators,
                           spot=res.spot, infra=res.infra, job_id=job_id)
    Journal(ledger_url(spec.checkpoints_url), writer="launcher", incarnation="0").emit("launch", **fields)
