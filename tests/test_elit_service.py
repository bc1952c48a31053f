"""ELIT end to end: the running service hot-loads each iteration's artifact mid-stream.

A tiny parent ensemble goes through two `elit-train iterate` iterations on a test movie; the real
service (subprocess, real sockets) serves the parent while frames stream, then loads iteration 1
and iteration 2 with `load_model`. Every frame must be answered once and in order, each swap must
happen at one frame boundary, and after each swap the results must be the new ensemble's: equal to
what that artifact computes offline for the same frame.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from elit_stream.protocol.client import ControlClient, FrameSender, ResultSubscriber
from elit_stream.core.engine import Engine
from elit_stream.tools.launcher import ServiceProcess
from elit_stream.core.artifact import load_artifact
from elit_stream.core.postprocess import Params, analyse

pytestmark = [pytest.mark.slow, pytest.mark.train]
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def iterations(tmp_path_factory) -> dict:
    from tests.fixtures.trainer_artifacts import build_random_parent
    from trainer.cli import main
    from trainer.data.testmovie import MovieConfig, make_movie, save_movie

    root = tmp_path_factory.mktemp("elit")
    parent = build_random_parent(root / "parent")
    movie_path = root / "movie.npz"
    movie = make_movie(MovieConfig(frames=3, size_px=64, seed=3))
    save_movie(movie, movie_path)
    run = root / "run"
    assert main(["iterate", str(parent), str(movie_path), "--run-dir", str(run),
                 "--iterations", "2", "--tile", "32", "--tiles-per-frame", "6", "--members", "2",
                 "--epochs", "1", "--n-val", "3", "--n-test", "3", "--std-quantile", "1",
                 "--threads", "1", "--keep-going"]) == 0
    with np.load(movie_path) as z:
        frames = z["frames"]
    return {"root": root, "parent": parent, "frames": frames,
            "children": [run / "iter_1" / "run-iter1", run / "iter_2" / "run-iter2"]}


def offline_atoms(artifact: Path, frame: np.ndarray) -> int:
    engine = Engine(load_artifact(artifact), device="cpu", threads=1)
    probs, geometry = engine.infer(frame)
    return analyse(probs, np.arange(engine.n_members), Params(), geometry.valid_shape).n_atoms


def test_children_name_their_parents(iterations):
    parent_of = {}
    for child in iterations["children"]:
        lineage = json.loads((child / "manifest.json").read_text())["lineage"]
        parent_of[lineage["iteration"]] = lineage["parent"]["manifest_sha256"]
    assert parent_of[1] == load_artifact(iterations["parent"]).manifest_sha256
    assert parent_of[2] == load_artifact(iterations["children"][0]).manifest_sha256


def test_service_loads_each_iteration_mid_stream(iterations):
    frames, children = iterations["frames"], iterations["children"]
    proc = ServiceProcess(["--model", str(iterations["parent"]), "--threads", "1",
                           "--allowed-dir", str(iterations["root"])])
    ep = proc.endpoints
    ctl = ControlClient(ep["control"], timeout_s=TIMEOUT_S)
    sub = ResultSubscriber(ep["results"])
    sub.wait_ready(ctl)
    sender = FrameSender(ep["ingest"])
    sent, results = 0, []
    try:
        for artifact in [None, *children]:
            if artifact is not None:
                reply = ctl.call("load_model", path=str(artifact), timeout_s=120)
                assert reply["ok"], reply
            for _ in range(4):
                sender.send(frames[sent % len(frames)], sent, "elit", timeout_s=TIMEOUT_S)
                sent += 1
            while len(results) < sent:            # this model's frames answered before the next
                msg = sub.recv(TIMEOUT_S)         # load (a frame still queued at a swap gets the
                assert msg is not None, proc.log_tail()   # new model: docs/protocol.md)
                if msg["topic"] == "result":
                    results.append(msg)
    finally:
        for c in (sender, sub, ctl):
            c.close()
        proc.close()
    assert [r["frame_id"] for r in results] == list(range(sent))
    served = [r["model"]["sha256"] for r in results]
    expected = [load_artifact(a).manifest_sha256
                for a in [iterations["parent"], *children] for _ in range(4)]
    assert served == expected                       # each swap at one frame boundary, in order
    for r in results:                               # and the results are that ensemble's own
        artifact = [iterations["parent"], *children][r["frame_id"] // 4]
        assert r["n_atoms"] == offline_atoms(artifact, frames[r["frame_id"] % len(frames)])
    per_model = [[r["n_atoms"] for r in results[i:i + 4]] for i in (0, 4, 8)]
    assert per_model[0] != per_model[1], per_model  # retraining changed what the service reports
