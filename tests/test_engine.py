"""Engine on the tiny artifact: shapes, preparation, geometry, probe, providers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from elit_stream.core.artifact import load_artifact
from elit_stream.core.engine import Engine, EngineError, Geometry, normalise, physical_cores
from elit_stream.core.postprocess import Params, analyse
from tests.fixtures.tiny_artifact import PIXEL_SIZE_PM

DEFAULT = Path(__file__).resolve().parents[1] / "models" / "default"


@pytest.fixture(scope="module")
def engine(tiny_artifact):
    return Engine(load_artifact(tiny_artifact), device="cpu", threads=1)


def test_run_shape_and_dtype(engine):
    frame = np.random.default_rng(0).integers(0, 1000, (40, 64)).astype(np.uint16)
    probs, geo = engine.infer(frame)
    assert probs.shape == (3, 2, 40, 64) and probs.dtype == np.float32
    assert probs.flags.c_contiguous
    assert geo == Geometry((40, 64), (40, 64), (40, 64), 1.0)
    assert (probs >= 0).all() and (probs.sum(axis=1) <= 1 + 1e-6).all()
    assert engine.provider == "CPUExecutionProvider" and engine.fallback_reason is None
    assert (engine.n_members, engine.n_classes) == (3, 2)


def test_prepare_pads_to_multiples_by_mirroring(engine):
    frame = np.random.default_rng(1).random((50, 37)) * 100
    x, geo = engine.prepare(frame)
    assert x.shape == (1, 1, 56, 40) and x.dtype == np.float32 and x.flags.c_contiguous
    assert geo.valid_shape == (50, 37) and geo.net_shape == (56, 40) and geo.scale == 1.0
    plane = x[0, 0]
    np.testing.assert_allclose(plane[:50, :37], normalise(frame), atol=1e-7)
    np.testing.assert_array_equal(plane[50:, :37], plane[49:43:-1, :37])
    np.testing.assert_array_equal(plane[:, 37:], plane[:, 36:33:-1])
    assert plane.min() == 0.0 and plane.max() == 1.0


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "int16", "float32", "float64"])
def test_all_dtypes_give_the_same_input(engine, dtype):
    base = np.random.default_rng(2).integers(0, 200, (24, 32))
    ref, _ = engine.prepare(base.astype(np.float64))
    got, _ = engine.prepare(base.astype(dtype))
    np.testing.assert_allclose(got, ref, atol=1e-6)


@pytest.mark.parametrize("dtype, big", [(np.float64, 1e308), (np.float32, 3e38),
                                        (np.float64, 1e-300), (np.float32, 1e-44)])
@pytest.mark.parametrize("pixel_size", [None, 2 * PIXEL_SIZE_PM])
def test_extreme_float_ranges_stay_finite(engine, dtype, big, pixel_size):
    frame = np.zeros((16, 16), dtype)
    frame[0, 0], frame[1, 1] = -big, big
    x, _ = engine.prepare(frame, pixel_size)
    assert np.isfinite(x).all() and x.min() == 0.0 and 0.5 < x.max() <= 1.0
    np.testing.assert_allclose(normalise(frame)[5, 5], 0.5)


def test_constant_frame_becomes_zeros(engine):
    x, _ = engine.prepare(np.full((16, 16), 7, np.uint16))
    assert not x.any()


@pytest.mark.parametrize("frame, match", [
    (np.zeros((8, 64), np.uint16), "16..4096"),
    (np.zeros((4, 4, 3), np.uint8), "2-D"),
    (np.zeros((16, 16), bool), "dtype"),
    (np.array([[np.nan] * 16] * 16), "NaN"),
    (np.full((16, 16), np.inf), "NaN or Inf"),
])
def test_bad_frames_refused(engine, frame, match):
    with pytest.raises(EngineError, match=match):
        engine.prepare(frame)


def test_size_limits_apply_after_rescale(engine):
    frame = np.zeros((20, 20), np.uint16)
    with pytest.raises(EngineError, match="becomes 14x14"):
        engine.prepare(frame, pixel_size_pm=PIXEL_SIZE_PM * 0.7)
    with pytest.raises(EngineError, match="4096"):
        engine.net_shape_for((1000, 1000), PIXEL_SIZE_PM * 5)
    with pytest.raises(EngineError, match="pixel_size_pm"):
        engine.prepare(frame, pixel_size_pm=-1.0)


def test_small_pixel_size_difference_does_not_rescale(engine):
    _, geo = engine.prepare(np.ones((32, 32)), pixel_size_pm=PIXEL_SIZE_PM * 1.009)
    assert geo.scale == 1.0


@pytest.mark.parametrize("factor", [2.0, 1.37, 0.7])
def test_rescale_maps_coordinates_back(engine, factor):
    """A blob at a known frame position lands where Geometry says, in the network grid."""
    x0, y0 = 31.3, 22.8
    yy, xx = np.mgrid[0:48, 0:64]
    frame = 10 + 1000 * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * 3.0 ** 2))
    net, geo = engine.prepare(frame.astype(np.uint16), pixel_size_pm=PIXEL_SIZE_PM * factor)
    assert geo.scale == pytest.approx(factor)
    assert geo.valid_shape == (round(48 * factor), round(64 * factor))
    plane = net[0, 0, : geo.valid_shape[0], : geo.valid_shape[1]]
    w = np.clip(plane - 0.3, 0, None)
    ny, nx = np.mgrid[0: plane.shape[0], 0: plane.shape[1]]
    fx, fy = geo.to_frame_xy(np.float32((w * nx).sum() / w.sum()),
                             np.float32((w * ny).sum() / w.sum()))
    assert abs(fx - x0) < 0.05 and abs(fy - y0) < 0.05


@settings(max_examples=40, deadline=None)
@given(frame=hnp.arrays(st.sampled_from([np.uint8, np.uint16, np.uint32, np.int32, np.float32,
                                         np.float64]),
                        st.tuples(st.integers(16, 40), st.integers(16, 40))),
       pixel_size=st.one_of(st.none(), st.floats(PIXEL_SIZE_PM, 2.5 * PIXEL_SIZE_PM)))
def test_prepare_arbitrary_frames(engine, frame, pixel_size):
    try:
        x, geo = engine.prepare(frame, pixel_size)
    except EngineError as exc:
        assert "NaN" in str(exc) and not np.isfinite(frame).all()
        return
    assert np.isfinite(frame).all()
    assert x.dtype == np.float32 and x.shape[:2] == (1, 1) and x.flags.c_contiguous
    assert all(n % 8 == 0 for n in geo.net_shape) and x.shape[2:] == geo.net_shape
    assert all(v <= n < v + 8 for v, n in zip(geo.valid_shape, geo.net_shape))
    assert x.min() >= 0.0 and x.max() <= 1.0 + 1e-6


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(0.25, 4.0), x=st.floats(-0.5, 500), y=st.floats(-0.5, 500))
def test_geometry_round_trip(scale, x, y):
    geo = Geometry((512, 512), (520, 520), (512, 512), scale)
    fx, fy = geo.to_frame_xy(*geo.to_net_xy(np.float32(x), np.float32(y)))
    assert abs(fx - x) < 1e-3 and abs(fy - y) < 1e-3
    one = Geometry((8, 8), (8, 8), (8, 8), 1.0)
    arr = np.array([1.25], np.float32)
    assert one.to_frame_xy(arr, arr)[0] is arr


def test_probe_reproduces(engine, tiny_artifact):
    with np.load(tiny_artifact / "probe.npz") as z:
        raw, x, expected = z["raw"], z["input"], z["probs"]
    np.testing.assert_allclose(engine.prepare(raw)[0][..., :48, :64], x, atol=1e-6)
    np.testing.assert_allclose(engine.run(x), expected, atol=1e-4)


def test_default_artifact_probe_reproduces():
    if not (DEFAULT / "manifest.json").exists():
        pytest.skip("models/default not built yet")
    art = load_artifact(DEFAULT)                     # runs the probe
    eng = Engine(art, device="cpu")
    with np.load(art.probe_path) as z:
        np.testing.assert_allclose(eng.run(z["input"]), z["probs"], atol=art.probe_atol)


def test_default_artifact_finds_graphene_atoms():
    """The shipped ensemble on the independent synthetic movie (elit_stream.tools.movie)."""
    if not (DEFAULT / "manifest.json").exists():
        pytest.skip("models/default not built yet")
    from elit_stream.tools.movie import interior, make_movie, match_atoms
    eng = Engine(load_artifact(DEFAULT, check_probe=False), device="cpu")
    movie = make_movie(n_frames=2, size_px=128, seed=11)
    tp = fp = fn = 0
    for frame, truth in zip(movie.frames, movie.xy):
        probs, geo = eng.infer(frame, movie.pixel_size_pm)
        r = analyse(probs, np.arange(eng.n_members), Params(), valid_shape=geo.valid_shape)
        pred = np.column_stack(geo.to_frame_xy(r.x, r.y))
        pred, truth = pred[interior(pred, frame.shape, 3)], truth[interior(truth, frame.shape, 3)]
        counts = match_atoms(pred, truth, max_dist_px=3.0)
        tp, fp, fn = tp + counts[0], fp + counts[1], fn + counts[2]
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)


def test_tiny_model_finds_gaussian_atoms(engine):
    rng = np.random.default_rng(5)
    gy, gx = np.mgrid[10:60:16, 10:76:16]
    xy = np.column_stack([gx.ravel(), gy.ravel()]) + rng.uniform(-2, 2, (gx.size, 2))
    yy, xx = np.mgrid[0:64, 0:80]
    frame = 20 + rng.normal(0, 2, (64, 80))
    for x0, y0 in xy:
        frame += 200 * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * 2.0 ** 2))
    probs, geo = engine.infer(frame.astype(np.float32))
    r = analyse(probs, np.arange(3), Params(), valid_shape=geo.valid_shape)
    fx, fy = geo.to_frame_xy(r.x, r.y)
    d = np.hypot(fx[:, None] - xy[None, :, 0], fy[:, None] - xy[None, :, 1])
    assert r.n_atoms == len(xy)
    assert (d.min(axis=0) < 0.5).all() and (d.min(axis=1) < 0.5).all()
    assert (r.det_frac == 1).all() and (r.cls == 0).all()


def test_cuda_request_without_cuda(tiny_artifact):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    art = load_artifact(tiny_artifact, check_probe=False)
    with pytest.raises(EngineError, match="CUDA requested"):
        Engine(art, device="cuda", cpu_fallback=False)
    eng = Engine(art, device="cuda")
    assert eng.provider == "CPUExecutionProvider" and "CUDA" in eng.fallback_reason
    auto = Engine(art)                                 # auto: CPU, not a fallback
    assert auto.provider == "CPUExecutionProvider" and auto.fallback_reason is None
    with pytest.raises(EngineError, match="device"):
        Engine(art, device="tpu")


def test_warm_up_and_threads(tiny_artifact):
    eng = Engine(load_artifact(tiny_artifact, check_probe=False), device="cpu", spin=True)
    assert eng.threads == physical_cores() >= 1
    eng.warm_up((64, 64))


def test_io_binding_runner_matches_plain_run_on_cpu(tiny_artifact):
    """The CUDA path's IO-binding runner, exercised on the CPU provider: same numbers, buffers
    reused per shape (a ring of two), several shapes."""
    art = load_artifact(tiny_artifact)
    plain, bound = Engine(art, device="cpu"), Engine(art, device="cpu", bind=True)
    rng = np.random.default_rng(3)
    seen = []
    for shape in [(64, 64), (48, 80), (64, 64), (64, 64)]:
        x, _ = plain.prepare(rng.random(shape, dtype=np.float32))
        want = plain.run(x).copy()
        got = bound.run(x)
        np.testing.assert_array_equal(got, want)
        seen.append(got)
    assert seen[2] is not seen[0] and seen[3] is seen[0]      # ring of two per shape


@pytest.mark.gpu
@pytest.mark.parametrize("precision, atol", [("fp32", 1e-4), ("fp16", None)])
def test_cuda_engine_matches_cpu(tiny_artifact, precision, atol):
    """On a CUDA machine (onnxruntime-gpu): IO binding on the device, the CPU's output within
    1e-4 (fp32) or the fp16 probe tolerance (the float16 graph)."""
    import onnxruntime as ort

    from elit_stream.core.engine import PROBE_TOLERANCE
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (install the gpu extra)")
    art = load_artifact(tiny_artifact)
    try:
        gpu = Engine(art, device="cuda", cpu_fallback=False, precision=precision)
    except EngineError as exc:
        pytest.skip(f"no usable CUDA device: {exc}")
    cpu = Engine(art, device="cpu")
    assert gpu.provider == "CUDAExecutionProvider" and gpu._bound is not None
    assert gpu.precision == precision
    x, _ = cpu.prepare(np.random.default_rng(4).random((128, 96), dtype=np.float32))
    for _ in range(3):
        assert np.abs(gpu.run(x) - cpu.run(x)).max() <= (atol or PROBE_TOLERANCE["fp16"])


def test_shape_cache_builds_once_per_shape_and_drops_the_least_recently_used():
    from elit_stream.core.engine import _ShapeCache
    built = []
    cache = _ShapeCache(2)
    build = lambda shape, tag: built.append(shape) or [shape, tag]      # noqa: E731
    a = cache.get((1, 8), build, "a")
    assert cache.get((1, 8), build, "ignored") is a                   # built once
    cache.get((2, 8), build, "b")
    cache.get((1, 8), build, "a")                                      # (2, 8) now least recent
    cache.get((3, 8), build, "c")                                      # drops (2, 8)
    cache.get((1, 8), build, "a")
    cache.get((2, 8), build, "b")
    assert built == [(1, 8), (2, 8), (3, 8), (2, 8)]


TURNS = {"x": lambda a: a, "-x": lambda a: a[:, ::-1], "y": lambda a: a.T,
         "-y": lambda a: a.T[:, ::-1]}        # the stored frame -> fast scan left to right


@pytest.mark.parametrize("fast_scan", ["-x", "y", "-y"])
@pytest.mark.parametrize("factor", [1.0, 1.37])
def test_a_frame_whose_fast_scan_runs_another_way_is_turned_for_the_members(
        engine, factor, fast_scan):
    """fast_scan: the members see the frame turned so that the fast scan runs left to right
    along the rows (as in training) and the atoms come back in the frame's own orientation; so
    the stored frame A gives exactly the atoms of turn(A) sent as usual, mapped back."""
    from elit_stream.core.ensemble import ActiveSet
    from elit_stream.core.pipeline import analyse_frame

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:48, 0:72]
    frame = 10 + rng.poisson(5, xx.shape).astype(np.float64)
    for x0, y0 in rng.uniform((6, 6), (66, 42), (25, 2)):
        frame += 400 * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * 2.0 ** 2))
    frame = frame.astype(np.uint16)
    active = ActiveSet.full(engine.artifact.member_ids)
    params = Params(threshold=0.3, min_peak=0.0, heavy_contrast=0.0)
    ps = PIXEL_SIZE_PM * factor
    canonical = np.ascontiguousarray(TURNS[fast_scan](frame))
    usual = analyse_frame(engine, canonical, ps, active, params, True)
    turned = analyse_frame(engine, frame, ps, active, params, True, fast_scan=fast_scan)
    assert usual.analysis.n_atoms > 0
    # where each found atom lies in the canonical frame, by marking it in a stored-frame image
    marks = np.zeros(frame.shape, np.int32)
    iy, ix = np.rint(turned.y).astype(int), np.rint(turned.x).astype(int)
    marks[iy, ix] = np.arange(1, turned.analysis.n_atoms + 1)
    at = TURNS[fast_scan](marks)[np.rint(usual.y).astype(int), np.rint(usual.x).astype(int)]
    assert (at > 0).all()                           # every atom lands on an atom of the other
    order = at - 1
    w = canonical.shape[1]
    back = {"-x": (w - 1 - usual.x, usual.y), "y": (usual.y, usual.x),
            "-y": (usual.y, w - 1 - usual.x)}[fast_scan]
    np.testing.assert_allclose(turned.x[order], back[0], atol=1e-4)
    np.testing.assert_allclose(turned.y[order], back[1], atol=1e-4)
    np.testing.assert_array_equal(turned.analysis.cls[order], usual.analysis.cls)
    for plane, want in zip(turned.analysis.mean_map, usual.analysis.mean_map):
        np.testing.assert_array_equal(TURNS[fast_scan](plane), want)   # maps back too
