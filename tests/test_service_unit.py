"""Service pieces in-process (real sockets on free ports): automatic deselection, maps gate.

(That auto-deselection publishes a subset_changed event with cause "policy" goes through the same
`_event` path as every other event; the integration tests cover event delivery.)"""
from __future__ import annotations

import pytest

from elit_stream.protocol.client import ControlClient, ResultSubscriber
from elit_stream.service.config import load_config
from elit_stream.service.loop import Service, zmq_bind_address


class FakePolicy:
    def __init__(self, suggest):
        self.suggest = suggest

    def suggest_deselect(self):
        return self.suggest


@pytest.fixture
def service(tiny_artifact):
    cfg = load_config(None, {"model.path": str(tiny_artifact), "model.device": "cpu",
                             "model.threads": 1, "metrics.enabled": False,
                             "policy.auto_deselect": True, "policy.min_active": 2,
                             "endpoints.ingest": "tcp://127.0.0.1:0",
                             "endpoints.results": "tcp://127.0.0.1:0",
                             "endpoints.control": "tcp://127.0.0.1:0"})
    svc = Service(cfg)
    svc.bind()
    yield svc
    svc.close()


def test_bind_address_port_zero():
    assert zmq_bind_address("tcp://127.0.0.1:0") == "tcp://127.0.0.1:*"
    assert zmq_bind_address("ipc:///tmp/x") == "ipc:///tmp/x"


@pytest.mark.parametrize("suggest,active", [((2,), (0, 1)), ((1, 2), (0, 1, 2)), ((), (0, 1, 2))])
def test_auto_deselect_is_reported_and_keeps_min_active(service, suggest, active):
    service.state.policy = FakePolicy(suggest)
    service.frames._auto_deselect()
    assert service.state.active.active == active
    if active != (0, 1, 2):
        assert service.state.active.version == 1


def test_maps_follow_subscriptions(service):
    assert not service.frames._maps_wanted()
    ctl = ControlClient(service.endpoints["control"])
    with ResultSubscriber(service.endpoints["results"], topics=(), maps=True):
        for _ in range(100):
            service.hub.turn(50)
            if service.frames._maps_wanted():
                break
        assert service.frames._maps_wanted()
    service.state.maps_mode = "never"
    assert not service.frames._maps_wanted()
    ctl.close()


def test_the_service_never_imports_torch():
    import subprocess
    import sys
    code = ("import sys, elit_stream.tools.cli, elit_stream.service.loop, elit_stream.protocol.client, "
            "elit_stream.tools.replay, elit_stream.tools.demo; assert 'torch' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code], timeout=60, check=False).returncode == 0
