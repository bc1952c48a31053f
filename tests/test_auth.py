"""CURVE authentication: real service processes, real sockets, keys from `elit-stream keys`.

An unauthenticated client and a client whose key is not allowed get nothing (no reply, no
result, their frames never arrive); the service keeps serving allowed clients and counts the
refusals in `elit_auth_failures_total`. No timed assertions: "nothing arrives" waits a few
seconds, and the positive checks wait generously.
"""
from __future__ import annotations

import logging
import urllib.request

import pytest

from elit_stream.tools import cli
from elit_stream.protocol.auth import AuthError, ClientCurve, create_keys
from elit_stream.protocol.client import ControlClient, FrameSender, ResultSubscriber
from elit_stream.service.config import ConfigError, load_config
from elit_stream.tools.launcher import ServiceProcess
from tests.fixtures.tiny_artifact import gaussian_blobs

TIMEOUT_S = 30.0
SILENCE_S = 1.0   # how long a refused client waits before we call it refused


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    assert cli.main(["keys", str(root), "--client", "scope", "--client", "rogue"]) == 0
    (root / "allowed" / "rogue.key").unlink()          # rogue has a key pair but is not allowed
    server = root / "server.key"
    return {"dir": root,
            "scope": ClientCurve.from_files(root / "clients" / "scope.key_secret", server),
            "rogue": ClientCurve.from_files(root / "clients" / "rogue.key_secret", server)}


def serve(tiny_artifact, keys, sockets: str) -> ServiceProcess:
    return ServiceProcess(["--model", str(tiny_artifact), "--threads", "1",
                           "--auth", sockets, "--keys", str(keys["dir"])])


def refused_call(address: str, curve) -> bool:
    with ControlClient(address, timeout_s=SILENCE_S, curve=curve) as ctl:
        try:
            ctl.call("ping")
        except TimeoutError:
            return True
    return False


def metric_lines(sp: ServiceProcess, prefix: str) -> dict[str, float]:
    text = urllib.request.urlopen(sp.endpoints["metrics"], timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(prefix)}


def test_keys_command_makes_pairs_and_allows_clients(keys):
    root = keys["dir"]
    assert (root / "server.key").is_file() and (root / "server.key_secret").stat().st_mode \
        & 0o077 == 0
    assert sorted(p.name for p in (root / "allowed").iterdir()) == ["scope.key"]
    before = (root / "server.key_secret").read_bytes()
    create_keys(root, ["scope"])                     # idempotent: never overwrites a key
    assert (root / "server.key_secret").read_bytes() == before
    with pytest.raises(AuthError):
        create_keys(root, ["../evil"])


@pytest.mark.slow
def test_all_sockets_curve_refuses_unknown_and_unauthenticated_clients(tiny_artifact, keys):
    with serve(tiny_artifact, keys, "all") as sp:
        ep = sp.endpoints
        assert refused_call(ep["control"], None)             # no keys at all
        assert refused_call(ep["control"], keys["rogue"])    # a key, but not allowed
        with ControlClient(ep["control"], timeout_s=TIMEOUT_S, curve=keys["scope"]) as ctl, \
                ResultSubscriber(ep["results"], curve=keys["scope"]) as sub, \
                ResultSubscriber(ep["results"]) as anon_sub, \
                FrameSender(ep["ingest"], curve=keys["scope"]) as sender, \
                FrameSender(ep["ingest"]) as anon_sender, \
                FrameSender(ep["ingest"], curve=keys["rogue"]) as rogue_sender:
            assert ctl.call("status")["auth"] == {"ingest": True, "results": True,
                                                  "control": True}
            sub.wait_ready(ctl)
            for s in (anon_sender, rogue_sender):   # queued on the client side, never delivered
                try:
                    s.send(gaussian_blobs(seed=1)[0], 99, "intruder", timeout_s=SILENCE_S)
                except TimeoutError:
                    pass
            for i in range(3):
                sender.send(gaussian_blobs(seed=i)[0], i, "allowed", timeout_s=TIMEOUT_S)
            got = []
            while len(got) < 3:
                msg = sub.recv(TIMEOUT_S)
                assert msg is not None, sp.log_tail()
                if msg["topic"] == "result":
                    got.append((msg["acquisition"], msg["frame_id"]))
            assert got == [("allowed", 0), ("allowed", 1), ("allowed", 2)]
            assert anon_sub.recv(SILENCE_S) is None          # the unauthenticated SUB sees nothing
            counts = ctl.call("status")["counts"]
            assert counts["received"] == 3                   # the intruders' frames never arrived
            failures = metric_lines(sp, "elit_auth_failures_total{")
            reasons = {(k.split('socket="')[1].split('"')[0], k.split('reason="')[1].split('"')[0])
                       for k, v in failures.items() if v > 0}
            # A client without keys is seen as no_curve, or as a bare handshake failure when it
            # hangs up first (a race inside libzmq); a refused key is always refused_key.
            for sock in ("control", "ingest"):
                assert (sock, "refused_key") in reasons
                assert {(sock, "no_curve"), (sock, "handshake")} & reasons
            assert ctl.call("ping")["ok"]                    # still serving
        assert sp.terminate(TIMEOUT_S) == 0
        log = sp.log_tail(20000)
        assert "auth: refused a connection on control" in log
        assert "client key not in the allowed" in log


@pytest.mark.slow
def test_control_only_curve_leaves_data_streams_open(tiny_artifact, keys):
    with serve(tiny_artifact, keys, "control") as sp:
        ep = sp.endpoints
        assert refused_call(ep["control"], None)
        with ControlClient(ep["control"], timeout_s=TIMEOUT_S, curve=keys["scope"]) as ctl, \
                ResultSubscriber(ep["results"]) as sub, FrameSender(ep["ingest"]) as sender:
            sub.wait_ready(ctl)
            sender.send(gaussian_blobs()[0], 0, "open", timeout_s=TIMEOUT_S)
            msg = sub.recv(TIMEOUT_S)
            while msg is not None and msg["topic"] != "result":
                msg = sub.recv(TIMEOUT_S)
            assert msg is not None and msg["frame_id"] == 0
            assert ctl.call("status")["auth"] == {"ingest": False, "results": False,
                                                  "control": True}
            assert metric_lines(sp, "elit_socket_curve{") == {
                'elit_socket_curve{socket="ingest"}': 0.0,
                'elit_socket_curve{socket="results"}': 0.0,
                'elit_socket_curve{socket="control"}': 1.0}


def test_ctl_command_with_keys_and_a_clear_timeout_without(tiny_artifact, keys, capsys):
    with serve(tiny_artifact, keys, "control") as sp:
        args = ["ctl", "ping", "--control", sp.endpoints["control"]]
        assert cli.main([*args, "--client-key", str(keys["dir"] / "clients/scope.key_secret"),
                         "--server-key", str(keys["dir"] / "server.key")]) == 0
        assert '"ok": true' in capsys.readouterr().out
        assert cli.main([*args, "--timeout", str(SILENCE_S)]) == 2
        assert "CURVE" in capsys.readouterr().err


@pytest.fixture
def clean_env(monkeypatch):
    import os
    for key in list(os.environ):
        if key.startswith("ELIT_"):
            monkeypatch.delenv(key)


def test_config_requires_a_key_folder_and_names_the_key(clean_env, tmp_path):
    with pytest.raises(ConfigError, match="auth.keys_dir"):
        load_config(None, {"auth.control": True})
    with pytest.raises(ConfigError, match="server.key_secret"):
        load_config(None, {"auth.control": True, "auth.keys_dir": str(tmp_path)})


def test_exposed_without_auth_warns_and_with_auth_does_not(clean_env, keys, caplog):
    exposed = {"endpoints.control": "tcp://0.0.0.0:5557", "endpoints.ingest": "tcp://0.0.0.0:5555"}
    with caplog.at_level(logging.WARNING):
        load_config(None, {**exposed, "auth.control": True, "auth.keys_dir": str(keys["dir"])})
    assert "ingest tcp://0.0.0.0:5555 beyond loopback WITHOUT authentication" in caplog.text
    assert "control tcp://0.0.0.0" not in caplog.text


@pytest.mark.slow
def test_a_refused_sender_never_blocks_past_its_timeout(tiny_artifact, keys):
    """A refused CURVE handshake drops the connection at any moment, also between the client's
    POLLOUT and its send; with a timeout the send must still return (CI once hung here)."""
    with serve(tiny_artifact, keys, "ingest") as sp:
        frame = gaussian_blobs(seed=2)[0]
        for curve in (None, keys["rogue"]):
            with FrameSender(sp.endpoints["ingest"], hwm=1, curve=curve) as sender:
                for i in range(40):
                    try:
                        sender.send(frame, i, "intruder", timeout_s=0.05)
                    except TimeoutError:
                        pass
        with ControlClient(sp.endpoints["control"], timeout_s=TIMEOUT_S) as ctl:
            assert ctl.call("status")["counts"]["received"] == 0     # none got through
