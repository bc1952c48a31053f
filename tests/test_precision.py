"""Reduced precisions, checked against fp32: bf16 (the same ONNX graph through OpenVINO on the
CPU) and fp16 (onnxruntime on a float16 copy of the graph; meant for CUDA, run here on the CPU).

bf16 tests skip when OpenVINO is not installed (it is, with the `openvino` extra that
scripts/test.sh installs). On a CPU without bf16 instructions OpenVINO computes in fp32; the
engine reports that, and these tests accept either.
"""
from __future__ import annotations

import builtins
import importlib.util

import numpy as np
import pytest

from elit_stream.core import engine as engine_mod
from elit_stream.protocol.client import ControlClient, FrameSender, ResultSubscriber
from elit_stream.core.engine import Engine, EngineError
from elit_stream.tools.launcher import ServiceProcess
from elit_stream.core.artifact import load_artifact
from tests.fixtures.tiny_artifact import build_tiny_artifact, gaussian_blobs

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="OpenVINO not installed (the openvino extra)")
BF16_TOL = engine_mod.PROBE_TOLERANCE["bf16"]

TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def engines(tiny_artifact):
    art = load_artifact(tiny_artifact)
    return Engine(art, device="cpu", threads=1), Engine(art, device="cpu", threads=1,
                                                        precision="bf16")


@needs_openvino
def test_bf16_engine_reports_what_it_runs_on(engines):
    _, bf16 = engines
    assert bf16.provider == engine_mod.OPENVINO and bf16.session is None
    assert bf16.precision == ("bf16" if engine_mod.cpu_has_bf16() else "fp32")
    assert 0.0 <= bf16.probe_diff <= BF16_TOL
    assert bf16.options["precision"] == "bf16" and bf16.options["threads"] == 1


@needs_openvino
def test_bf16_matches_fp32_within_tolerance_on_several_shapes(engines):
    fp32, bf16 = engines
    rng = np.random.default_rng(7)
    for shape in [(64, 64), (48, 80), (64, 64)]:
        frame = gaussian_blobs(shape, n=12, seed=int(rng.integers(100)))[0]
        x = fp32.prepare(frame)[0]
        want = fp32.run(x)
        got = bf16.run(x)
        assert got.shape == want.shape and got.dtype == np.float32
        diff = np.abs(got.mean(axis=0) - want.mean(axis=0)).max()
        assert diff <= BF16_TOL, (shape, diff)
        if bf16.precision == "bf16":
            assert diff > 0                   # it really is another arithmetic, not fp32


@needs_openvino
def test_bf16_output_buffers_are_a_ring_of_two_per_shape(engines):
    """A result stays valid while one more frame runs (the service analyses before that)."""
    _, bf16 = engines
    x = bf16.prepare(np.random.default_rng(1).random((64, 64), dtype=np.float32))[0]
    a = bf16.run(x)
    a_copy = a.copy()
    b = bf16.run(x * 0.5)
    np.testing.assert_array_equal(a, a_copy)              # untouched by the next frame
    c = bf16.run(x)
    assert not np.shares_memory(a, b) and np.shares_memory(a, c)


def test_bf16_is_refused_on_cuda_and_unknown_precisions_are_named(tiny_artifact):
    art = load_artifact(tiny_artifact)
    with pytest.raises(EngineError, match="bf16 runs on the CPU"):
        Engine(art, device="cuda", precision="bf16")
    with pytest.raises(EngineError, match="precision must be one of fp32, bf16, fp16"):
        Engine(art, precision="int4")


def _hide(monkeypatch, package: str) -> None:
    """Make `import package` (and its submodules) fail, as on a machine without it."""
    real_import = builtins.__import__

    def without(name, *args, **kwargs):
        if name == package or name.startswith(package + "."):
            raise ImportError(f"No module named '{package}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without)


def test_without_openvino_bf16_says_which_extra_to_install(tiny_artifact, monkeypatch):
    _hide(monkeypatch, "openvino")
    with pytest.raises(EngineError, match=r"pip install 'elit-stream\[openvino\]'"):
        Engine(load_artifact(tiny_artifact), precision="bf16")


@needs_openvino
def test_a_model_that_bf16_changes_too_much_is_refused(tiny_artifact, monkeypatch):
    monkeypatch.setitem(engine_mod.PROBE_TOLERANCE, "bf16", -1.0)
    with pytest.raises(EngineError, match="use precision fp32 for this model"):
        Engine(load_artifact(tiny_artifact), precision="bf16")


@needs_openvino
def test_service_in_bf16_reports_it_and_keeps_it_across_load_model(tmp_path):
    """The real service with --precision bf16: start event, status, results, and a load_model
    that opens the new artifact in bf16 too."""
    tiny = build_tiny_artifact(tmp_path, n_members=3, name="tiny")
    build_tiny_artifact(tmp_path, n_members=4, seed=1, name="tiny4")
    proc = ServiceProcess(["--model", str(tiny), "--threads", "1", "--precision", "bf16",
                           "--allowed-dir", str(tmp_path)])
    ep = proc.endpoints
    ctl = ControlClient(ep["control"], timeout_s=TIMEOUT_S)
    sub = ResultSubscriber(ep["results"])
    sender = FrameSender(ep["ingest"])
    try:
        sub.wait_ready(ctl)
        status = ctl.call("status")
        assert status["model"]["provider"] == engine_mod.OPENVINO
        assert status["model"]["precision"] == ("bf16" if engine_mod.cpu_has_bf16() else "fp32")
        img, true_xy = gaussian_blobs((64, 64), n=10, seed=3)
        sender.send(img, 0, "bf16", timeout_s=TIMEOUT_S)
        result = None
        while result is None:
            msg = sub.recv(TIMEOUT_S)
            assert msg is not None, proc.log_tail()
            result = msg if msg["topic"] == "result" else None
        pred = np.column_stack([result["atoms"]["x"], result["atoms"]["y"]])
        d = np.linalg.norm(pred[:, None] - true_xy[None], axis=2)
        assert result["n_atoms"] >= 5 and np.median(d.min(axis=0)) < 1.0   # fp32 finds 7
        reply = ctl.call("load_model", path="tiny4", timeout_s=120)
        assert reply["ok"] and reply["provider"] == engine_mod.OPENVINO, reply
        assert reply["precision"] == status["model"]["precision"]
    finally:
        for c in (sender, sub, ctl):
            c.close()
        proc.close()


def test_fp16_engine_on_the_cpu_stays_within_its_tolerance(tiny_artifact):
    """fp16 is for CUDA; on the CPU provider it still runs (slowly), which tests the conversion
    (float16 weights and arithmetic, float32 in and out) and the probe check."""
    pytest.importorskip("onnx")
    art = load_artifact(tiny_artifact)
    fp32 = Engine(art, device="cpu", threads=1)
    fp16 = Engine(art, device="cpu", threads=1, precision="fp16")
    assert fp16.provider == "CPUExecutionProvider" and fp16.precision == "fp16"
    assert 0.0 < fp16.probe_diff <= engine_mod.PROBE_TOLERANCE["fp16"]
    assert fp16.session.get_inputs()[0].type == "tensor(float)"
    x = fp32.prepare(gaussian_blobs((48, 80), n=10, seed=2)[0])[0]
    want, got = fp32.run(x), fp16.run(x)
    assert got.dtype == np.float32
    assert 0 < np.abs(got - want).max() <= engine_mod.PROBE_TOLERANCE["fp16"]


def test_without_onnx_fp16_says_what_to_install(tiny_artifact, monkeypatch):
    _hide(monkeypatch, "onnx")
    with pytest.raises(EngineError, match="precision fp16 needs the onnx package"):
        Engine(load_artifact(tiny_artifact), precision="fp16")


def test_the_bf16_hint_appears_only_where_bf16_would_run(engines):
    fp32, bf16 = engines
    hint = engine_mod.bf16_hint(fp32.provider, fp32.precision)
    if engine_mod.cpu_has_bf16():
        assert hint is not None and "--precision bf16" in hint
    else:
        assert hint is None
    assert engine_mod.bf16_hint(bf16.provider, bf16.precision) is None
