"""RunLayout names the same objects the modules named themselves before it (no store, no processes)."""

from supervisor.contract import layout
from supervisor.contract.layout import RunLayout, ledger_url, stop_request_url
from supervisor.store.fs import Store


def test_the_run_records_keep_their_paths():
    run = RunLayout("s3://bucket/run/")
    assert run.ledger == ledger_url("s3://bucket/run") == "s3://bucket/run/_ledger"
    assert run.stop_request == stop_request_url("s3://bucket/run") == "s3://bucket/run/_supervise/stop.json"
    assert run.env_snapshots == "s3://bucket/run/_supervise/env"


def test_parts_under_a_store_rooted_at_the_run(tmp_path):
    store = Store(str(tmp_path))
    assert store.url_of(*layout.RESTARTS) == f"{tmp_path}/_supervise/restarts.json"
    assert store.url_of(*layout.node_mark(2)) == f"{tmp_path}/_supervise/nodes/node-2.json"
    assert store.url_of(*layout.STOP_REQUEST) == stop_request_url(str(tmp_path))


def test_step_folders_and_markers():
    assert layout.step_dir(12) == "step-12" and layout.parse_step(layout.step_dir(12)) == 12
    assert (layout.COMMIT, layout.WRITTEN, layout.METADATA, layout.POINTER, layout.SUPERSEDED) == (
        "_COMMIT.json", "_WRITTEN.json", ".metadata", "LATEST", "_superseded")


def test_a_runs_bucket_root():
    assert layout.bucket_root("s3://b/runs/llama") == "s3://b" == layout.bucket_root("s3://b")
    assert layout.bucket_root("gs://b/x/y") == "gs://b"
    assert layout.bucket_root("/tmp/runs") == "/tmp/runs"
