"""The local object store is a real S3 server (SIGKILL + restart: see test_faults.py)."""

import fsspec
import pytest

pytestmark = pytest.mark.slow


def test_s3_url_is_writable_through_s3fs(s3_url):
    fs, path = fsspec.core.url_to_fs(s3_url, skip_instance_cache=True)
    fs.pipe_file(f"{path}/hello", b"world")
    assert fs.cat_file(f"{path}/hello") == b"world"
