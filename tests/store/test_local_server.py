"""The local object store is a real S3 server: signatures checked, data survives SIGKILL."""

import fsspec
import pytest

from supervisor.store.local_server import LocalObjectStore

pytestmark = pytest.mark.slow


def test_s3_url_is_writable_through_s3fs(s3_url):
    fs, path = fsspec.core.url_to_fs(s3_url, skip_instance_cache=True)
    fs.pipe_file(f"{path}/hello", b"world")
    assert fs.cat_file(f"{path}/hello") == b"world"


def test_data_survives_sigkill_and_restart(tmp_path):
    with LocalObjectStore(tmp_path / "s3") as store:
        fs = _fs(store)
        fs.pipe_file(f"{store.bucket}/k", b"v")
        endpoint = store.endpoint
        store.kill()
        store.restart()
        assert store.endpoint == endpoint
        assert _fs(store).cat_file(f"{store.bucket}/k") == b"v"


def _fs(store):
    import s3fs

    return s3fs.S3FileSystem(
        key=store.access_key, secret=store.secret_key, skip_instance_cache=True,
        client_kwargs={"endpoint_url": store.endpoint},
    )
