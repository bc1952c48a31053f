"""service.admission: header numbers against the model and the limits, repeats, log throttling."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from elit_stream.core.artifact import load_artifact
from elit_stream.core.engine import Engine
from elit_stream.protocol.wire import Frame, ProtocolError
from elit_stream.service.admission import Admission, AnsweredFrames, RateLimitedLog
from tests.fixtures.tiny_artifact import PIXEL_SIZE_PM


@pytest.fixture(scope="module")
def engine(tiny_artifact):
    return Engine(load_artifact(tiny_artifact), device="cpu", threads=1)


def frame(shape=(64, 64), ps=None, acq="a", fid=0):
    return Frame(fid, acq, np.zeros(shape, np.uint8), ps, None, True)


def test_pixel_size_range_is_the_models_widened_by_the_factor(engine):
    warned = []
    adm = Admission(2.0, 4096 * 4096, lambda *a: warned.append(a))
    lo, hi = engine.artifact.manifest["pixel_size_range_pm"]
    assert adm.pixel_size_range_pm(engine) == (lo / 2, hi * 2)
    assert adm.check(frame(ps=hi * 2), engine) == hi * 2
    for ps in (hi * 2.01, lo / 2.01, 1e308):
        with pytest.raises(ProtocolError) as err:
            adm.check(frame(ps=ps, fid=7), engine)
        assert err.value.code == "bad_pixel_size" and err.value.frame_id == 7
    assert not warned


def test_network_input_cap_and_model_limits(engine):
    adm = Admission(2.0, 128 * 128, lambda *a: None)
    assert adm.check(frame((128, 128), PIXEL_SIZE_PM), engine) == PIXEL_SIZE_PM
    with pytest.raises(ProtocolError) as err:
        adm.check(frame((100, 100), PIXEL_SIZE_PM * 1.5), engine)   # becomes 150 x 150
    assert err.value.code == "too_large" and "limits.max_input_px" in err.value.message
    with pytest.raises(ProtocolError) as err:
        adm.check(frame((4, 4), PIXEL_SIZE_PM), engine)
    assert err.value.code == "bad_frame"


def test_missing_pixel_size_assumes_the_models_and_warns_once_per_acquisition(engine):
    warned = []
    adm = Admission(2.0, 4096 * 4096, lambda code, msg, f: warned.append((code, f.acquisition)))
    for fid in range(3):
        assert adm.check(frame(acq="x", fid=fid), engine) == engine.artifact.pixel_size_pm
    adm.check(frame(acq="y"), engine)
    assert warned == [("no_pixel_size", "x"), ("no_pixel_size", "y")]


def test_answered_frames_forget_the_oldest():
    seen = AnsweredFrames(capacity=3)
    for i in range(5):
        seen.add(("a", i))
    assert ("a", 4) in seen and ("a", 2) in seen and ("a", 1) not in seen


def test_rate_limited_log_counts_what_it_holds_back(caplog):
    rl = RateLimitedLog(logging.getLogger("t"), interval_s=3600)
    with caplog.at_level(logging.WARNING):
        assert rl.warning("k", "first %s", 1)
        assert not any(rl.warning("k", "again") for _ in range(5))
        assert rl.warning("other", "another kind")
        rl._last["k"] = (rl._last["k"][0] - 7200, rl._last["k"][1])   # the interval passed
        assert rl.warning("k", "later")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "first 1" and lines[1] == "another kind"
    assert lines[2].startswith("later (5 more like this")
