"""control: the handler table on a real (tiny) engine, without sockets.

Every request gets exactly one reply and never an exception; refused requests change nothing.
"""
from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elit_stream.protocol import messages
from elit_stream.service import control
from elit_stream.core.engine import Engine
from elit_stream.core.ensemble import ActiveSet
from elit_stream.core.artifact import load_artifact
from elit_stream.core.postprocess import Params
from elit_stream.service.selection import PolicyConfig, SelectionPolicy
from tests.fixtures.tiny_artifact import build_tiny_artifact


@pytest.fixture(scope="module")
def engine(tiny_artifact):
    return Engine(load_artifact(tiny_artifact), device="cpu", threads=1)


@pytest.fixture
def state(engine, tiny_artifact):
    ids = list(engine.artifact.member_ids)
    return control.State(engine=engine, active=ActiveSet.full(ids), params=Params(),
                         policy=SelectionPolicy(PolicyConfig(), ids), policy_cfg=PolicyConfig(),
                         delivery="lossless", run_uid="test",
                         allowed_dirs=[tiny_artifact.parent])


def call(state, **request):
    return control.handle(state, [msgpack.packb(request)])


def refused(state, code, **request):
    before = (state.active, state.params, state.engine)
    reply = call(state, id="r1", **request)
    assert reply["ok"] is False, reply
    assert reply["error"]["code"] == code, reply
    assert reply["id"] == "r1" and reply["error"]["message"]
    assert (state.active, state.params, state.engine) == before  # nothing changed
    assert not [e for e in state.outbox if e[0] != "ping"]
    return reply


def test_every_command_has_a_handler_and_a_request_model():
    assert set(control.HANDLERS) == set(messages.REQUESTS)


def test_ping_echoes_the_id_and_can_publish_a_token(state):
    reply = call(state, cmd="ping", id=5, token="abc")
    assert reply["ok"] and reply["id"] == 5 and reply["cmd"] == "ping"
    assert state.outbox == [("ping", {"token": "abc"})]


def test_status_reports_model_active_set_counts_and_params(state):
    reply = call(state, cmd="status")
    assert reply["model"]["name"] == "tiny" and reply["model"]["members"] == [0, 1, 2]
    assert reply["active"] == [0, 1, 2] and reply["active_version"] == 0
    assert reply["counts"] == {"received": 0, "processed": 0, "dropped": 0, "rejected": 0}
    assert reply["params"]["threshold"] == Params().threshold


def test_members_lists_every_member_with_its_state(state):
    call(state, cmd="deselect", members=[2])
    rows = call(state, cmd="members")["members"]
    assert [(r["id"], r["active"]) for r in rows] == [(0, True), (1, True), (2, False)]


def test_deselect_makes_a_new_version_and_an_event(state):
    reply = call(state, cmd="deselect", members=[1])
    assert reply["ok"] and reply["active"] == [0, 2] and reply["active_version"] == 1
    assert state.active.active == (0, 2)
    (name, ev), = state.outbox
    assert name == "subset_changed" and ev["active_version"] == 1 and ev["cause"] == "command"
    state.outbox.clear()
    assert call(state, cmd="select", members=[1])["active"] == [0, 1, 2]
    assert call(state, cmd="set_active", members=[2])["active"] == [2]
    assert call(state, cmd="reset")["active"] == [0, 1, 2]


def test_a_change_that_changes_nothing_keeps_the_version(state):
    reply = call(state, cmd="select", members=[0])
    assert reply["ok"] and reply["active_version"] == 0 and not state.outbox


@pytest.mark.parametrize("request_", [
    dict(cmd="deselect", members=[0, 1, 2]),
    dict(cmd="set_active", members=[]),
])
def test_empty_active_set_is_refused(state, request_):
    refused(state, "empty_set", **request_)


@pytest.mark.parametrize("request_", [
    dict(cmd="deselect", members=[3]),
    dict(cmd="select", members=[-1]),
    dict(cmd="set_active", members=[0, 99]),
])
def test_unknown_member_ids_are_refused(state, request_):
    refused(state, "unknown_member", **request_)


@pytest.mark.parametrize("request_,code", [
    (dict(cmd="set_params", threshold=1.5), "bad_params"),
    (dict(cmd="set_params", threshold=0.3, min_blob_px=0), "bad_params"),
    (dict(cmd="set_params", min_blob_px=50, max_blob_px=5), "bad_params"),
    (dict(cmd="set_params", sigma=2.0), "bad_args"),
    (dict(cmd="set_params", threshold="high"), "bad_args"),
    (dict(cmd="set_params"), "bad_args"),
])
def test_bad_params_are_refused_and_nothing_changes(state, request_, code):
    refused(state, code, **request_)


def test_set_params_applies_and_reports(state):
    reply = call(state, cmd="set_params", threshold=0.3, min_blob_px=2)
    assert reply["ok"] and reply["params"]["threshold"] == 0.3
    assert state.params.threshold == 0.3 and state.params.min_blob_px == 2
    assert state.outbox[0][0] == "params_changed"


@pytest.mark.parametrize("body,code", [
    ([b"\xc1"], "bad_msgpack"),
    ([msgpack.packb([1])], "bad_header"),
    ([b"a", b"b"], "bad_parts"),
    ([msgpack.packb({"members": [1]})], "missing_field"),
    ([msgpack.packb({"cmd": "launch"})], "unknown_command"),
    ([msgpack.packb({"cmd": "status", "verbose": True})], "bad_args"),
    ([msgpack.packb({"cmd": "deselect"})], "bad_args"),
    ([msgpack.packb({"cmd": "deselect", "members": "1"})], "bad_args"),
])
def test_malformed_requests_get_error_replies(state, body, code):
    reply = control.handle(state, body)
    assert reply["ok"] is False and reply["error"]["code"] == code


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(set(messages.REQUESTS) - {"load_model"})),
       st.dictionaries(st.sampled_from(["members", "threshold", "min_blob_px", "max_blob_px",
                                        "detect_threshold", "mode", "downsample", "token", "x"]),
                       st.none() | st.booleans() | st.integers(-3, 500) | st.floats()
                       | st.text(max_size=4) | st.lists(st.integers(-2, 5), max_size=4),
                       max_size=3),
       st.none() | st.integers(-2**63, 2**63 - 1) | st.text(max_size=4))
def test_any_request_gets_exactly_one_well_formed_reply(state, cmd, args, rid):
    reply = call(state, cmd=cmd, id=rid, **args)
    assert isinstance(reply, dict) and isinstance(reply["ok"], bool)
    assert reply["id"] == rid and reply["cmd"] == cmd
    if not reply["ok"]:
        assert reply["error"]["code"] in messages.ERROR_CODES
        assert reply["error"]["code"] != "internal", reply
    assert len(state.active.active) >= 1


def test_load_model_verifies_off_the_hot_path_and_swaps_on_request(state, tmp_path):
    new = build_tiny_artifact(state.allowed_dirs[0], n_members=4, seed=2, name="tiny-next")
    deferred = call(state, cmd="load_model", path=str(new), id=9)
    assert isinstance(deferred, control.Deferred) and deferred.id == 9
    assert refused(state, "busy", cmd="load_model", path=str(new))
    assert deferred.loader.wait(120)
    assert state.engine.artifact.name == "tiny"  # nothing changes until the frame boundary
    reply = control.swap_in(state, deferred.loader, next_seq=17)
    assert reply["ok"] and reply["model"]["name"] == "tiny-next" and reply["from_frame_seq"] == 17
    assert state.active.active == (0, 1, 2, 3) and state.active.version == 1
    assert [e[0] for e in state.outbox] == ["model_loaded", "subset_changed"]
    assert state.loader is None


@pytest.mark.parametrize("path", ["/etc", "does-not-exist", "../../etc"])
def test_load_model_outside_allowed_dirs_or_missing_is_refused_before_loading(state, path):
    reply = refused(state, "model_error", cmd="load_model", path=path)
    assert state.loader is None
    assert str(state.allowed_dirs[0].resolve()) in reply["error"]["message"]


def test_load_model_refuses_a_fifo_and_a_file_linked_from_outside(state, tmp_path):
    import os
    import shutil
    fifo_art = state.allowed_dirs[0] / "tiny-fifo"
    shutil.copytree(state.artifact.path, fifo_art, dirs_exist_ok=True)
    (fifo_art / "manifest.json").unlink()
    os.mkfifo(fifo_art / "manifest.json")
    reply = refused(state, "model_error", cmd="load_model", path="tiny-fifo")
    assert "not a regular file" in reply["error"]["message"]
    linked = state.allowed_dirs[0] / "tiny-linked"
    shutil.copytree(state.artifact.path, linked, dirs_exist_ok=True)
    outside = tmp_path / "manifest.json"
    shutil.move(linked / "manifest.json", outside)
    (linked / "manifest.json").symlink_to(outside)
    reply = refused(state, "model_error", cmd="load_model", path=str(linked))
    assert "outside the allowed model folders" in reply["error"]["message"]


@pytest.mark.parametrize("args", [{"threshold": "0.5"}, {"min_blob_px": 2.5},
                                  {"threshold": True}, {"members": ["1"]}])
def test_set_params_and_member_lists_are_type_checked(state, args):
    cmd = "deselect" if "members" in args else "set_params"
    refused(state, "bad_args", cmd=cmd, **args)


def test_shutdown_sets_the_stop_reason(state):
    assert call(state, cmd="shutdown")["ok"] and state.stop_reason == "shutdown command"


def test_load_model_refuses_a_corrupted_artifact_naming_the_file(state):
    import shutil
    bad = state.allowed_dirs[0] / "tiny-corrupt"
    shutil.copytree(state.artifact.path, bad, dirs_exist_ok=True)
    onnx_file = bad / "ensemble.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-1] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    deferred = call(state, cmd="load_model", path="tiny-corrupt")
    assert deferred.loader.wait(60)
    reply = control.swap_in(state, deferred.loader, next_seq=0)
    assert reply["error"]["code"] == "model_error"
    assert "ensemble.onnx" in reply["error"]["message"] and "sha256" in reply["error"]["message"]
    assert state.engine.artifact.name == "tiny"
