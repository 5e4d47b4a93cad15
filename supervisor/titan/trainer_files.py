"""Names of files the supervised trainer writes (importable without torch)."""

METRICS_FILE = "supervise_metrics.jsonl"  # in --dump_folder, rank 0: {step, loss, time, incarnation, pid}
