"""Beyond one machine: members and movies as Ray tasks on a real local Ray (2 CPUs, no cluster).

Skips cleanly when Ray is not installed (it is the optional extra `cluster`; scripts/test.sh
installs it). One Ray instance serves the whole module.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")

from trainer.data.synth import SynthConfig  # noqa: E402
from trainer.model.executor import ExecutorSpec, MemberFailures, run_members  # noqa: E402
from trainer.model.train import TrainConfig, train_ensemble  # noqa: E402
from trainer.model.unet import UNetConfig  # noqa: E402

RAY = ExecutorSpec(kind="ray")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    yield
    ray.shutdown()


def _tiny(**kw) -> TrainConfig:
    return TrainConfig(members=2, n_train=16, n_val=8, n_test=8, batch_size=8, max_epochs=2,
                       synth=SynthConfig(size_px=32), unet=UNetConfig(n_classes=2, base_filters=4),
                       **kw)


@pytest.mark.train
def test_members_trained_through_ray_equal_the_local_ones(tmp_path):
    """Same seeds and the same torch thread count (1: what a 1-CPU Ray task gets) => the same
    weights. A different thread count changes float summation order, which Adam amplifies in
    parameters with almost no gradient (conv biases before BatchNorm): docs/cluster.md."""
    cfg = _tiny(threads=1)
    threads = torch.get_num_threads()
    try:
        local = train_ensemble(cfg, tmp_path / "local", log=lambda s: None, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    remote = train_ensemble(cfg, tmp_path / "ray", log=lambda s: None, show_progress=False,
                            executor=RAY)
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
