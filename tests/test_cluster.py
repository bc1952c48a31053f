"""Beyond one machine: members and movies as Ray tasks on a real local Ray (2 CPUs, no cluster).

Skips cleanly when Ray is not installed (it is the optional extra `cluster`; scripts/test.sh
installs it). One Ray instance serves the whole module.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from elit_stream.tools.batch import BatchConfig, run_batch
from elit_stream.tools.launcher import ServiceProcess
from elit_stream.tools.movie import make_movie, save_movie
from trainer.model.executor import ExecutorSpec, MemberFailures, run_members

CLI = [sys.executable, "-m", "elit_stream.tools.cli"]
# Fields of a result that legitimately differ between `batch` and the service (see docs/cluster.md):
# timings are measured; acquired_at is the replay's send time (batch has no acquisition clock);
# seq is the publisher's counter (the service's runs across both movies; batch counts per movie).
DIFFERENT = ("timings_ms", "acquired_at", "seq")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    yield
    ray.shutdown()


def _tiny(**kw):
    from trainer.data.synth import SynthConfig
    from trainer.model.train import TrainConfig
    from trainer.model.unet import UNetConfig

    return TrainConfig(members=2, n_train=16, n_val=8, n_test=8, batch_size=8, max_epochs=2,
                       synth=SynthConfig(size_px=32), unet=UNetConfig(n_classes=2, base_filters=4),
                       **kw)


@pytest.mark.train
def test_members_trained_through_ray_equal_the_local_ones(tmp_path):
    """Same seeds and the same torch thread count (1: what a 1-CPU Ray task gets) => the same
    weights. A different thread count changes float summation order, which Adam amplifies in
    parameters with almost no gradient (conv biases before BatchNorm): docs/cluster.md."""
    torch = pytest.importorskip("torch")
    from trainer.model.train import train_ensemble

    cfg = _tiny(threads=1)
    threads = torch.get_num_threads()
    try:
        local = train_ensemble(cfg, tmp_path / "local", log=lambda s: None, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    remote = train_ensemble(cfg, tmp_path / "ray", log=lambda s: None, show_progress=False,
                            executor=ExecutorSpec(kind="ray"))
    assert [r.seed for r in remote] == [r.seed for r in local] == [1000, 1001]
    for a, b in zip(local, remote):
        for curve in ("train_loss", "val_loss"):
            assert b.history[curve] == pytest.approx(a.history[curve], rel=1e-6)
    for m in range(cfg.members):
        wa = torch.load(tmp_path / "local" / f"member_{m:02d}" / "final.pt")
        wb = torch.load(tmp_path / "ray" / f"member_{m:02d}" / "final.pt")
        assert wa.keys() == wb.keys()
        for k in wa:
            if wa[k].is_floating_point():
                scale = float(wa[k].abs().max()) or 1.0
                diff = float((wb[k] - wa[k]).abs().max()) / scale
                assert diff < 1e-5, f"member {m} {k}: differs by {diff:.2e} of its largest value"
            else:
                assert torch.equal(wa[k], wb[k]), f"member {m} {k}"
    # different seeds give different members: the comparison above can fail
    w0 = torch.load(tmp_path / "ray" / "member_00" / "final.pt")
    w1 = torch.load(tmp_path / "ray" / "member_01" / "final.pt")
    assert not torch.allclose(w0[k], w1[k])


def flaky_member(member_id: int, marker_dir: str) -> int:
    """Member 1 always fails; member 2 fails on its first try only; others return id * 10."""
    if member_id == 1:
        raise RuntimeError("out of memory (simulated)")
    marker = Path(marker_dir) / f"tried_{member_id}"
    if member_id == 2 and not marker.exists():
        marker.write_text(str(os.getpid()))
        raise RuntimeError("transient failure (simulated)")
    return member_id * 10


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_a_failed_member_is_retried_once_then_reported_by_id(tmp_path, kind):
    got, lines = {}, []
    with pytest.raises(MemberFailures) as err:
        for member_id, value in run_members(flaky_member, [0, 1, 2, 3], str(tmp_path),
                                            ExecutorSpec(kind=kind), lines.append, False):
            got[member_id] = value
    assert got == {0: 0, 2: 20, 3: 30}                 # nobody else lost; member 2 retried
    assert list(err.value.failures) == [1]
    assert "out of memory (simulated)" in err.value.failures[1]
    assert "member 1" in str(err.value)


# ----------------------------------------------------------------------------- batch


@pytest.fixture(scope="module")
def movies(tmp_path_factory):
    """Two small movies; the second has a NaN frame (rejected by service and batch alike)."""
    folder = tmp_path_factory.mktemp("movies")
    first = save_movie(make_movie(n_frames=4, size_px=64, seed=3, pixel_size_pm=14.1),
                       folder / "first.npz")
    frames = make_movie(n_frames=3, size_px=72, seed=4).frames.astype(np.float32)
    frames[1, 5, 5] = np.nan
    np.savez(folder / "second.npz", frames=frames, pixel_size_pm=15.0)
    return [first, folder / "second.npz"]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _comparable(msg: dict) -> dict:
    return {k: v for k, v in msg.items() if k not in DIFFERENT}


@pytest.mark.slow
def test_batch_through_ray_records_what_the_service_publishes(tiny_artifact, movies, tmp_path):
    with ServiceProcess(["--model", str(tiny_artifact), "--threads", "1", "--no-metrics"]) as sp:
        ep = sp.endpoints
        for movie in movies:
            out = subprocess.run([*CLI, "replay", movie, "--ingest", ep["ingest"], "--results",
                                  ep["results"], "--control", ep["control"], "--acquisition",
                                  movie.stem, "--record", tmp_path / f"{movie.stem}.service.jsonl",
                                  "--quiet"], capture_output=True, text=True, timeout=120, check=False)
            assert "rejected" in out.stdout, out.stdout + out.stderr
    cfg = BatchConfig(model=tiny_artifact, out=tmp_path / "batch", executor="ray", workers=2,
                      threads=1, chunk_frames=2)
    rows = run_batch(movies, cfg, log=lambda s: None, show_progress=False)
    for movie, row in zip(movies, rows):
        served = _lines(tmp_path / f"{movie.stem}.service.jsonl")
        batch = _lines(tmp_path / "batch" / f"{movie.stem}.jsonl")
        want = [m for m in served if m["topic"] == "result"]
        got = [m for m in batch if m["topic"] == "result"]
        assert [m["frame_id"] for m in got] == [m["frame_id"] for m in want]
        assert [_comparable(m) for m in got] == [_comparable(m) for m in want]
        assert [m["seq"] for m in got] == [m["seq"] - want[0]["seq"] for m in want]
        assert all(set(m["timings_ms"]) == set(w["timings_ms"]) for m, w in zip(got, want))
        assert row["results"] == len(want) and row["frames"] == len(want) + row["rejected"]
    rejected = lambda lines: [(m["frame"], m["code"], m["message"]) for m in lines
                              if m["topic"] == "event.frame_rejected"]
    second = movies[1].stem
    assert rejected(_lines(tmp_path / "batch" / f"{second}.jsonl")) == \
        rejected(_lines(tmp_path / f"{second}.service.jsonl")) == \
        [({"acquisition": second, "frame_id": 1}, "non_finite", "float frame contains NaN or Inf")]
    assert [r["rejected"] for r in rows] == [0, 1]
    assert (tmp_path / "batch" / "disagreement.png").stat().st_size > 1000


@pytest.mark.slow
def test_batch_cli_local_writes_records_summary_and_reports_a_bad_movie(tiny_artifact, movies,
                                                                      tmp_path):
    (tmp_path / "broken.npy").write_bytes(b"not numpy")
    out = subprocess.run([*CLI, "batch", *movies, tmp_path / "broken.npy", "--model",
                          tiny_artifact, "--out", tmp_path / "local", "--threads", "1",
                          "--quiet"], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1, out.stderr                 # a rejected frame and a bad movie
    assert "| first | 4 | 4 | 0 |" in out.stdout and "broken" in out.stdout
    summary = json.loads((tmp_path / "local" / "summary.json").read_text())
    assert [r["acquisition"] for r in summary] == ["first", "second", "broken"]
    assert "broken.npy" in summary[2]["error"]          # the reader's one-line error
    assert len(summary[0]["disagreement_per_member"]) == 4           # frames x members
    assert len(summary[0]["disagreement_per_member"][0]) == len(summary[0]["members"])


@pytest.mark.slow
def test_batch_cli_without_model_takes_the_default_artifact(tiny_artifact, movies, tmp_path):
    env = {**os.environ, "ELIT_MODEL": str(tiny_artifact)}          # what `serve` would load
    out = subprocess.run([*CLI, "batch", movies[0], "--out", tmp_path / "b", "--threads", "1",
                          "--quiet"], capture_output=True, text=True, timeout=120, check=False,
                         env=env)
    assert out.returncode == 0, out.stderr
    first = json.loads((tmp_path / "b" / "first.jsonl").read_text().splitlines()[0])
    assert first["model"]["name"] == tiny_artifact.name


def test_iterate_and_multiclass_take_the_executor_into_their_retraining():
    pytest.importorskip("torch")
    from trainer.cli import build_parser
    from trainer.cli.elit import retrain_config

    for command in ("iterate", "multiclass"):
        args = build_parser().parse_args([command, "models/default", "movie.npz", "--run-dir", "r",
                                          "--executor", "ray", "--address", "auto",
                                          "--threads", "2"])
        assert retrain_config(args).executor == ExecutorSpec(kind="ray", address="auto",
                                                             cpus_per_member=2)
    with pytest.raises(ValueError, match="--address needs --executor ray"):
        ExecutorSpec(kind="local", address="auto")
