"""Preemption notices from a file and from loopback fakes of each cloud's metadata service."""

import json
import threading
import time

import pytest

from supervisor.node.notices import SOURCES, Detection, NoticeWatcher, parse_aws, parse_azure, parse_gcp, parse_notice_file
from tests.node.fake_metadata import FakeMetadata, urls_for
from tests.node.nodeproc import wait_for


def test_parsers():
    now = 1000.0
    assert parse_aws(404, "", now) is None
    assert parse_aws(200, json.dumps({"action": "terminate", "time": "2017-09-18T08:22:00Z"}), now).deadline == 1505722920.0
    assert parse_gcp(200, "FALSE", now) is None
    assert parse_gcp(200, "TRUE", now).deadline == now + 30
    assert parse_azure(200, json.dumps({"Events": [{"EventType": "Reboot"}]}), now) is None
    ev = {"Events": [{"EventType": "Preempt", "NotBefore": "Mon, 19 Sep 2016 18:29:47 GMT"}]}
    assert parse_azure(200, json.dumps(ev), now).deadline == 1474309787.0
    assert parse_notice_file("", now).deadline is None
    assert parse_notice_file('{"deadline_s": 5}', now).deadline == now + 5


@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
def test_each_cloud_is_detected_and_its_notice_delivered(cloud):
    got: list = []
    done = threading.Event()
    with FakeMetadata(cloud) as fake:
        watcher = NoticeWatcher(lambda n: (got.append(n), done.set()), urls=urls_for(fake), poll_s=0.05)
        watcher.start()
        time.sleep(0.3)
        assert not got and watcher.poller is not None and watcher.poller.name == cloud
        fake.preempt(in_s=30)  # GCP states no time; its documented notice is 30 s
        assert done.wait(10)
        watcher.stop()
    assert got[0].source == cloud
    assert abs(got[0].deadline - fake.deadline) < 1.5  # AWS/Azure carry whole seconds; GCP 30 s is close


def test_no_metadata_server_is_quiet_and_the_file_still_works(tmp_path, caplog):
    got: list = []
    notice_file = tmp_path / "preempt"
    probes = Detection([SOURCES[cloud](url, timeout=0.2) for cloud, url in urls_for(None).items()])
    wait_for(probes.done, 10)
    assert probes.found() is None  # no cloud answers here
    watcher = NoticeWatcher(got.append, notice_file=notice_file, urls=urls_for(None), poll_s=0.05)
    watcher.start()
    notice_file.write_text('{"deadline_s": 60}')
    for _ in range(100):
        if got:
            break
        time.sleep(0.05)
    watcher.stop()
    assert got and got[0].source == "file" and got[0].deadline is not None
    assert not notice_file.exists()  # consumed, so the restart does not stop at once
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]


def test_azure_slow_first_call_blocks_nothing_and_its_notice_is_detected(tmp_path):
    """Azure documents that the first Scheduled Events call (it enables the service)
    can take up to two minutes: stand-ins whose first answer takes 10 s. One watcher
    gets the Preempt event all the same; another shows that the notice file is
    watched while its first call is still under way."""
    got: list = []
    from_file: list = []
    done = threading.Event()
    notice_file = tmp_path / "preempt"
    with FakeMetadata("azure", first_call_delay_s=10.0) as fake, \
            FakeMetadata("azure", first_call_delay_s=10.0) as other:
        fake.preempt(in_s=60)  # already there when the first call finally answers
        watcher = NoticeWatcher(lambda n: (got.append(n), done.set()), urls=urls_for(fake), poll_s=0.2)
        watcher.start()
        meanwhile = NoticeWatcher(from_file.append, urls=urls_for(other), poll_s=0.2, notice_file=notice_file)
        meanwhile.start()
        wait_for(lambda: fake.requests and other.requests, 5)  # both first calls under way
        notice_file.write_text("{}")
        wait_for(lambda: from_file, 5)
        assert from_file[0].source == "file" and meanwhile.poller is None and not got
        assert done.wait(60)
        watcher.stop()
        meanwhile.stop()
    assert got[0].source == "azure" and abs(got[0].deadline - fake.deadline) < 1.5
    assert len([r for r in fake.requests if r[1].startswith("/metadata/scheduledevents")]) >= 2  # then polled


def test_every_source_gets_its_url_option_and_variable(monkeypatch):
    """A cloud is one class in notices.SOURCES: its URL variable, default and the
    node's --<cloud>-metadata-url option follow from that row."""
    import inspect

    from supervisor.node.cli import node
    from supervisor.node.notices import SOURCES, cloud_urls, url_env

    options = {p.default.param_decls[0] for p in inspect.signature(node).parameters.values()
               if p.name.endswith("_metadata_url")}
    assert options == {f"--{c}-metadata-url" for c in SOURCES}
    monkeypatch.setenv(url_env("gcp"), "http://127.0.0.1:1")
    urls = cloud_urls({"aws": "http://127.0.0.1:2"})
    assert urls == {"aws": "http://127.0.0.1:2", "gcp": "http://127.0.0.1:1", "azure": SOURCES["azure"].default_url}
