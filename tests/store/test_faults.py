"""Network faults and a store that dies mid-commit: retried where transient, consistent after restart."""

import os
import subprocess
import sys
import time

import pytest

from supervisor.store.catalog import Catalog, StoreInputError
from supervisor.store.local_server import LocalObjectStore
from tests.store.dcp_helpers import save
from tests.store.tcp_proxy import FaultProxy

pytestmark = pytest.mark.slow


@pytest.fixture
def proxy(s3_store, s3_env, monkeypatch):
    with FaultProxy(s3_store.ports["s3"]) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.endpoint)
        yield p


def test_resets_503s_and_delays_are_retried(s3_url, proxy, monkeypatch):
    monkeypatch.setenv("SUPERVISE_STORE_RETRY_S", "30")
    save(s3_url, 1)
    proxy.delay_s = 0.02
    proxy.reset(3)
    proxy.unavailable(2)
    cat = Catalog(s3_url)
    cat.commit(1)
    assert not proxy._faults, "every injected fault was hit"
    proxy.reset(2)
    assert Catalog(s3_url).latest().step == 1


def test_wrong_credentials_fail_fast_with_a_clear_message(s3_url, proxy, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StoreInputError, match="access denied.*AWS_SECRET_ACCESS_KEY"):
        Catalog(s3_url).latest()
    assert proxy.requests == 1  # not retried


_COMMIT = """
import sys
from supervisor.store.catalog import Catalog
import torch.distributed.checkpoint  # the commit reads .metadata with it: import before the clock starts
cat = Catalog(sys.argv[1])
cat.steps()  # client set up and connected before the clock starts
print("ready", flush=True)
cat.commit(int(sys.argv[2]))
"""


def test_store_sigkilled_during_commit_then_restarted(tmp_path, monkeypatch):
    with LocalObjectStore(tmp_path / "s3") as store:
        for key, value in store.env.items():
            monkeypatch.setenv(key, value)
        url = store.url("run/checkpoint")
        save(url, 1)
        Catalog(url).commit(1)
        outcomes = []
        for step, kill_after in ((2, 0.4), (3, 1.2)):
            save(url, step)
            with FaultProxy(store.ports["s3"]) as proxy:
                proxy.delay_s = 0.05  # stretch the commit so the kill lands inside it
                env = {**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint, "SUPERVISE_STORE_RETRY_S": "2"}
                child = subprocess.Popen([sys.executable, "-c", _COMMIT, url, str(step)], env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
                assert child.stdout.readline().strip() == "ready"
                time.sleep(kill_after)
                store.kill()
                child.communicate(timeout=120)
            store.restart()
            cat = Catalog(url)
            info = cat.verify(step, deep=True)
            assert info.state in ("committed", "legacy"), info  # committed, or complete but not committed
            outcomes.append(info.state)
            if info.state != "committed":
                cat.commit(step)  # the retry succeeds
            assert cat.latest().step == step
        assert [i.state for i in Catalog(url).list()] == ["committed"] * 3
        print("states right after the kill:", outcomes)


def test_canary_refuses_a_store_that_ignores_if_none_match(s3_url, proxy):
    cat = Catalog(s3_url)
    cat.prove_conditional_create()  # SeaweedFS enforces it
    proxy.ignore_preconditions = True  # now every lost create looks won
    with pytest.raises(StoreInputError, match="does not enforce conditional create"):
        cat.prove_conditional_create()
    assert cat.steps() == []  # the canary left nothing behind


def test_a_refused_marker_raises_no_pointer(s3_url, proxy, monkeypatch):
    monkeypatch.setenv("SUPERVISE_STORE_RETRY_S", "2")
    cat = Catalog(s3_url)
    save(s3_url, 1)
    cat.commit(1)
    save(s3_url, 2)
    proxy.deny(rb"^PUT [^ ]*step-2/_COMMIT\.json")  # a bucket policy denying the marker
    with pytest.raises(StoreInputError, match="access denied"):
        cat.commit(2)
    assert proxy.denied >= 1
    proxy.deny(None)
    assert cat._pointer() == 1 and cat.latest().step == 1
