"""supervise: keep long TorchTitan runs alive on spot capacity."""

__version__ = "0.1.0"
# The distribution name: `supervise` on PyPI is another project. The command is
# `supervise`, the import package `supervisor` (supervisord ships one too).
DIST = "supervise-titan"
