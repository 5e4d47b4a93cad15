"""supervise: keep long TorchTitan runs alive on spot capacity."""

__version__ = "0.1.0"
