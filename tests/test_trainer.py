"""Trainer: SWA averaging, BatchNorm recomputation, early-stopping window, export parity, artifacts."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from trainer.model.artifact import ArtifactError, verify_artifact  # noqa: E402
from trainer.model.export import (EnsembleGraph, ExportError, check_parity, export_onnx,  # noqa: E402
                            parity_frames, write_artifact)
from trainer.data.synth import SynthConfig  # noqa: E402
from trainer.model.train import (MemberResult, SplitData, TrainConfig, _stop_reason,  # noqa: E402
                                 _swa_window, dataset_config, recompute_bn, swa_average)
from trainer.model.unet import UNet, UNetConfig  # noqa: E402

pytestmark = pytest.mark.train
SMALL = UNetConfig(n_classes=2, base_filters=4)
REPO = Path(__file__).resolve().parent.parent


def small_member(seed: int) -> UNet:
    torch.manual_seed(seed)
    return UNet(SMALL).eval()


def tiny_config(**kw) -> TrainConfig:
    return TrainConfig(members=2, n_train=16, n_val=8, n_test=8, batch_size=8, max_epochs=2,
                       synth=SynthConfig(size_px=32), unet=SMALL, **kw)


def test_unet_shapes_and_multiples_of_8():
    out = small_member(0)(torch.zeros(2, 1, 40, 56))
    assert out.shape == (2, 3, 40, 56)


def test_swa_average_is_the_mean_of_snapshots():
    states = [small_member(s).state_dict() for s in (1, 2, 3)]
    averaged = swa_average(states, SMALL).state_dict()
    for name, param in small_member(0).named_parameters():
        expected = torch.stack([s[name] for s in states]).mean(0)
        torch.testing.assert_close(averaged[name], expected)


def test_bn_statistics_are_recomputed_for_the_averaged_weights():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.random((32, 1, 32, 32), dtype=np.float32) * 3 + 1)
    data = SplitData(images, torch.zeros(32, 32, 32, dtype=torch.int64))
    model = swa_average([small_member(1).state_dict(), small_member(2).state_dict()], SMALL)
    bn = model.enc1[0][2]
    stale = bn.running_mean.clone()
    captured = []
    conv_act = torch.nn.Sequential(model.enc1[0][0], model.enc1[0][1])
    with torch.no_grad():
        for i in range(0, 32, 8):
            captured.append(conv_act(images[i:i + 8]).mean((0, 2, 3)))
    recompute_bn(model, data, batch_size=8, n_batches=4)
    expected = torch.stack(captured).mean(0)
    torch.testing.assert_close(bn.running_mean, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(bn.running_mean, stale)
    assert not model.training


@pytest.mark.parametrize("epoch,best,n_snap,k,expected", [
    (8, 6, 5, 3, [4, 5, 6]),     # snapshots are epochs 4..8; window ends at best epoch 6
    (8, 8, 5, 3, [6, 7, 8]),
    (2, 2, 2, 3, [1, 2]),        # short run: fewer than K snapshots
    (5, 1, 5, 3, [1]),
])
def test_swa_window_ends_at_best_epoch(epoch, best, n_snap, k, expected):
    snapshots = [{"epoch": e} for e in range(epoch - n_snap + 1, epoch + 1)]
    state = {"epoch": epoch, "best_epoch": best, "snapshots": snapshots}
    assert [s["epoch"] for s in _swa_window(state, k)] == expected


@pytest.mark.parametrize("epoch,best,elapsed,kw,expected", [
    (3, 3, 10.0, {}, None),
    (4, 2, 10.0, {}, "early stopping"),                  # patience 2 spent
    (8, 8, 10.0, {}, "max_epochs"),
    (3, 3, 10.0, {"member_budget_s": 5.0}, "budget"),
    (3, 3, 4.0, {"member_budget_s": 5.0}, None),
])
def test_stop_reason_early_stopping_max_epochs_or_budget(epoch, best, elapsed, kw, expected):
    cfg = TrainConfig(max_epochs=8, patience=2, **kw)
    assert _stop_reason({"epoch": epoch, "best_epoch": best, "elapsed_s": elapsed}, cfg) == expected


def test_member_init_spec_star_means_member_k_from_member_k():
    from trainer.model.init_weights import member_spec
    assert member_spec("models/default:*", 3) == "models/default:3"
    assert member_spec("models/default:5", 3) == "models/default:5"


def test_member_init_spec_list_gives_member_k_the_kth_listed_member_cycling():
    from trainer.model.init_weights import member_spec, per_member
    assert [member_spec("runs/x/a:6,0,3", k) for k in range(4)] == \
        ["runs/x/a:6", "runs/x/a:0", "runs/x/a:3", "runs/x/a:6"]
    assert per_member("runs/x/a:6,0,3") and per_member("runs/x/a:*") and per_member("runs/x/a:6,")
    assert not per_member("runs/x/a:6") and not per_member(None)


def test_a_run_config_written_before_new_fields_existed_still_resumes(tmp_path):
    from trainer.model.train import _check_or_write_config
    cfg = tiny_config()
    old = cfg.to_dict()
    del old["min_delta"], old["member_budget_s"], old["synth"]["imaging"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    _check_or_write_config(cfg, tmp_path)                       # no "different configuration"
    with pytest.raises(ValueError, match="different configuration"):
        _check_or_write_config(tiny_config(min_delta=0.01), tmp_path)


def test_export_parity_passes_for_the_right_graph(tmp_path):
    graph = EnsembleGraph([small_member(1), small_member(2)]).eval()
    export_onnx(graph, tmp_path / "e.onnx")
    worst = check_parity(graph, tmp_path / "e.onnx", parity_frames(tiny_config()))
    assert len(worst) == 2 and max(worst) <= 1e-4


def test_export_parity_refuses_a_wrong_graph(tmp_path):
    a, b = small_member(1), small_member(2)
    export_onnx(EnsembleGraph([a, b]), tmp_path / "e.onnx")
    with pytest.raises(ExportError, match="member 0"):
        check_parity(EnsembleGraph([b, a]).eval(), tmp_path / "e.onnx", parity_frames(tiny_config()))
    with torch.no_grad():
        b.head.bias[1] += 0.5        # (a shift of every logit would not change softmax)
    with pytest.raises(ExportError, match="member 1"):
        check_parity(EnsembleGraph([a, b]).eval(), tmp_path / "e.onnx", parity_frames(tiny_config()))


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("artifacts") / "small"
    results = [MemberResult(id=i, seed=1000 + i, epochs=1, swa_epochs=1, best_epoch=1,
                            best_val_loss=0.5, history={}, test_iou=0.5) for i in range(2)]
    write_artifact(out, [small_member(1), small_member(2)], results, tiny_config(),
                   "elit-train test", log=lambda *_: None)
    return out


def test_written_artifact_verifies_and_matches_schema(small_artifact):
    manifest = verify_artifact(small_artifact)
    assert manifest["model"]["output"]["shape"][:2] == [2, 2]
    assert sorted(manifest["files"]) == ["ensemble.onnx", "probe.npz"]
    assert manifest["normalization"] == {"kind": "minmax", "scope": "frame"}


def test_existing_artifact_is_not_overwritten_without_force(small_artifact):
    with pytest.raises(ExportError, match="--force"):
        write_artifact(small_artifact, [small_member(1)], [], tiny_config(), "x")


def test_corrupted_file_is_refused_naming_it(small_artifact, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(small_artifact, bad)
    data = bytearray((bad / "ensemble.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "ensemble.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"ensemble\.onnx: sha256 mismatch"):
        verify_artifact(bad)


@pytest.mark.parametrize("mutate,match", [
    (lambda m: m.pop("pixel_size_pm"), "pixel_size_pm"),
    (lambda m: m.update(format_version="2.0"), "format_version"),
    (lambda m: m["normalization"].update(scope="batch"), "normalization/scope"),
    (lambda m: m["members"][0].update(seed="one"), "members/0/seed"),
])
def test_bad_manifest_is_refused_naming_the_field(small_artifact, tmp_path, mutate, match):
    bad = tmp_path / "bad"
    shutil.copytree(small_artifact, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    mutate(manifest)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=match):
        verify_artifact(bad)


def test_probe_mismatch_is_refused(small_artifact, tmp_path):
    from trainer.model.artifact import check_probe

    bad = tmp_path / "bad"
    shutil.copytree(small_artifact, bad)
    probe = dict(np.load(bad / "probe.npz"))
    probe["probs"] = probe["probs"] + 0.01
    np.savez(bad / "probe.npz", **probe)
    manifest = json.loads((bad / "manifest.json").read_text())
    with pytest.raises(ArtifactError, match="probe output differs"):
        check_probe(bad, manifest)


@pytest.mark.slow
def test_cli_train_export_verify_and_resume(tmp_path, capsys):
    from trainer.cli import main

    run, out = tmp_path / "run", tmp_path / "models" / "tiny"
    args = ["train", "--run-dir", str(run), "--members", "2", "--epochs", "2", "--n-train", "16",
            "--n-val", "8", "--n-test", "8", "--size", "32", "--batch-size", "8",
            "--base-filters", "4", "--quiet", "--export", str(out)]
    assert main(args) == 0
    assert (run / "report" / "loss_curves.png").stat().st_size > 0
    assert main(["verify", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["producer"]["command"].startswith("elit-train")
    assert [m["seed"] for m in manifest["members"]] == [1000, 1001]
    capsys.readouterr()
    assert main(args[:-2]) == 0                      # resume: nothing left to train
    assert "already trained" in capsys.readouterr().out


def test_cli_errors_are_clear(tmp_path, capsys):
    from trainer.cli import main

    assert main(["verify", str(tmp_path)]) == 1
    assert "no manifest.json" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), str(tmp_path / "missing.npy"), "--out", "x.png"]) == 1


def test_cli_set_changes_one_field_of_the_world_and_names_what_is_wrong(tmp_path, capsys):
    from trainer.cli import main

    out = tmp_path / "tiles.npz"
    assert main(["generate", "--out", str(out), "--n", "2", "--world", "physical", "--size", "32",
                 "--set", "contamination_prob=0.8", "--set", "dose_range=[5, 50]"]) == 0
    synth = dataset_config(out)
    assert synth.contamination_prob == 0.8 and synth.dose_range == (5, 50)
    capsys.readouterr()
    for setting, said in [("nosuch=1", "no such field of the synthetic world: nosuch"),
                          ("contamination_prob=1.5", "contamination_prob must be in [0, 1]"),
                          ("dose_range=5", "dose_range must be (low, high)")]:
        assert main(["generate", "--out", str(out), "--n", "1", "--set", setting]) == 1
        assert said in capsys.readouterr().err
    with pytest.raises(SystemExit):                       # argparse: not FIELD=VALUE
        main(["generate", "--out", str(out), "--set", "contamination_prob=abc"])
    assert "expected FIELD=VALUE" in capsys.readouterr().err


def test_shipped_default_artifact_verifies():
    default = REPO / "models" / "default"
    if not (default / "manifest.json").exists():
        pytest.skip("models/default not trained yet")
    manifest = verify_artifact(default)
    assert len(manifest["members"]) >= 8
    assert [c["name"] for c in manifest["classes"]] == ["lattice", "impurity"]
    size = sum(p.stat().st_size for p in default.rglob("*") if p.is_file())
    assert size <= 20 * 2**20
