"""Loaded only by the local SkyPilot API server that infra/slurm/up.sh starts
(this folder is on its PYTHONPATH; the controllers it spawns inherit it).

SkyPilot's managed-job controller asks "is the internet up?" (HEAD
https://8.8.8.8 and https://1.1.1.1) before every job-status check and skips
the check while the answer is no. This machine has no route there, so the
controller would never notice a finished job or a vanished Slurm allocation.
The cluster is on loopback: the probe is pointed at a loopback URL instead
($SUPERVISE_SKY_NETWORK_PROBE, the API server itself). Nothing else changes.
"""

import importlib.abc
import importlib.machinery
import os
import sys

_MODULE = "sky.backends.backend_utils"
_PROBE = os.environ.get("SUPERVISE_SKY_NETWORK_PROBE")


class _PatchProbe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _MODULE or not _PROBE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module._TEST_IP_LIST[:] = [_PROBE]

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchProbe())
