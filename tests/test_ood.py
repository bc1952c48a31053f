"""Class confidence, frame figures, the OOD reference (trainer) and score + advisories (service)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from elit_stream.core.artifact import load_artifact
from elit_stream.core.ensemble import ActiveSet
from elit_stream.core.ood import OodReference, ReferenceError
from elit_stream.core.postprocess import MAX_UNCERTAINTY, FrameFigures, Params, analyse
from elit_stream.service.selection import OodWatch, PolicyConfig, SelectionPolicy

H = W = 32


def blob(probs, m, y, x, lattice, impurity, r=2):
    probs[m, 0, y - r:y + r + 1, x - r:x + r + 1] = lattice
    probs[m, 1, y - r:y + r + 1, x - r:x + r + 1] = impurity


def two_atoms(n_members=4):
    """Atom A at (8, 8): all members say impurity. Atom B at (20, 20): 3 of 4 say lattice."""
    probs = np.zeros((n_members, 2, H, W), np.float32)
    for m in range(n_members):
        blob(probs, m, 8, 8, 0.1, 0.85)
        blob(probs, m, 20, 20, *((0.2, 0.7) if m == 0 else (0.8, 0.1)))
    return probs


def test_class_confidence_and_agreement():
    fa = analyse(two_atoms(), np.arange(4), Params())
    order = np.argsort(fa.y)
    cls, cls_prob, agree = fa.cls[order], fa.cls_prob[order], fa.cls_agree[order]
    assert cls.tolist() == [1, 0]
    assert cls_prob[0] == pytest.approx(0.85 / 0.95, abs=1e-5)
    assert cls_prob[1] == pytest.approx((0.2 + 3 * 0.8) / 4 / ((0.9 + 3 * 0.9) / 4), abs=1e-5)
    assert agree.tolist() == [1.0, 0.75]


def test_class_agreement_counts_active_members_only():
    fa = analyse(two_atoms(), [1, 2, 3], Params())
    assert sorted(fa.cls_agree.tolist()) == [1.0, 1.0]


def test_one_class_model_is_fully_confident():
    probs = two_atoms().sum(axis=1, keepdims=True)
    fa = analyse(probs, np.arange(4), Params())
    assert fa.cls_prob.tolist() == [1.0, 1.0] and fa.cls_agree.tolist() == [1.0, 1.0]


def test_empty_consensus_of_disagreeing_members_is_maximally_uncertain():
    probs = np.zeros((4, 2, H, W), np.float32)
    blob(probs, 0, 10, 10, 0.9, 0.0)                   # one member of four sees an atom
    fa = analyse(probs, np.arange(4), Params())
    assert fa.n_atoms == 0 and fa.count_per_member.tolist() == [1, 0, 0, 0]
    assert fa.mean_uncertainty == MAX_UNCERTAINTY
    assert analyse(probs, [1, 2, 3], Params()).mean_uncertainty == 0.0   # the rest agree: empty
    assert analyse(np.zeros_like(probs), np.arange(4), Params()).mean_uncertainty == 0.0


def test_frame_figures():
    probs = two_atoms()
    blob(probs, 3, 26, 6, 0.9, 0.0)                    # member 3 sees an extra atom
    f = analyse(probs, np.arange(4), Params()).figures
    assert f.density == pytest.approx(50 / (H * W))
    areas = np.array([50, 50, 50, 75.0])
    assert f.area_cv == pytest.approx(areas.std() / areas.mean())
    assert f.disagreement == pytest.approx((1 - 50 / 75) / 4)


def blob_maps(rng, n_members=5, shape=(48, 56), n_atoms=20):
    """Members' class maps of Gaussian atoms at jittered positions, some missed, some extra."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    centres = rng.uniform(3, np.array(shape)[::-1] - 3, (n_atoms, 2))
    probs = np.zeros((n_members, 2, *shape), np.float32)
    for m in range(n_members):
        seen = centres[rng.random(n_atoms) < 0.9] + rng.normal(0, 0.4, (1, 2))
        atom = sum(np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 4.5) for x, y in seen)
        share = rng.uniform(0.6, 1.0)
        probs[m, 0], probs[m, 1] = 0.95 * share * np.minimum(atom, 1), 0.95 * (1 - share) * \
            np.minimum(atom, 1)
    return probs


def test_trainer_and_service_compute_the_same_figures():
    from trainer.model.reference import frame_figures

    rng = np.random.default_rng(3)
    for _ in range(5):
        probs = blob_maps(rng)
        fa = analyse(probs, np.arange(5), Params(min_peak=0.5))     # random blobs: no lattice
        assert fa.n_atoms >= 10 and fa.figures.crystallinity > 0
        assert frame_figures(probs) == pytest.approx(fa.figures.as_dict(), rel=1e-5, abs=1e-6)


def test_crystallinity_tells_a_lattice_from_random_atoms():
    from elit_stream.core.postprocess import crystallinity

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:128, :128]
    lattice = np.cos(2 * np.pi * xx / 8) ** 8 * np.cos(2 * np.pi * yy / 8) ** 8
    spots = rng.uniform(0, 128, (256, 2))
    random = sum(np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 4) for x, y in spots)
    assert crystallinity(lattice[::2, ::2]) > 100
    assert crystallinity(random[::2, ::2]) < 30
    assert crystallinity(np.zeros((64, 64))) == 0.0


# --- the score ------------------------------------------------------------------------------

REF = {"version": 1, "threshold": 0.5, "flag_above": 1.0, "frames": 100, "seed": 1,
       "size_px": 64, "figures": {
           "density": {"low": np.log(0.02), "median": np.log(0.15), "high": np.log(0.3),
                       "scale": 0.5, "floor": 1e-4},
           "unknown_figure": {"low": 0, "median": 1, "high": 2, "scale": 1, "floor": 1}}}


def test_score_is_zero_inside_the_band_and_grows_outside():
    ref = OodReference.from_manifest(REF)
    assert sorted(ref.bands) == ["density"]                  # unknown figures are ignored
    inside = ref.score(FrameFigures(0.1, 0.2, 0.1, 50.0), 0.5)
    assert inside.score == 0.0 and not inside.flagged
    empty = ref.score(FrameFigures(0.0, 0.0, 0.0, 0.0), 0.5)       # vacuum: nothing detected
    assert empty.flagged and empty.score == pytest.approx((np.log(0.02) - np.log(1e-4)) / 0.5,
                                                          rel=1e-3)
    assert ref.score(FrameFigures(0.0, 0.0, 0.0, 0.0), 0.6) is None  # another threshold


def test_a_pixel_size_outside_the_trained_range_is_an_excursion():
    """A frame recorded at a pixel size the ensemble never saw is out of distribution however
    ordinary its figures look (a lattice at 3x the range, rescaled, looks like a lattice)."""
    ref = OodReference.of(REF, pixel_range_pm=[10.0, 20.0])
    ordinary = FrameFigures(0.1, 0.2, 0.1, 50.0)
    assert ref.score(ordinary, 0.5, 15.0).excursions["pixel_size"] == 0.0
    assert ref.score(ordinary, 0.5, None).score == 0.0                  # no pixel size: no excursion
    coarse = ref.score(ordinary, 0.5, 60.0)                             # 3x the coarsest
    assert coarse.flagged and coarse.worst == "pixel_size"
    assert coarse.score == pytest.approx(np.log(3) / np.log(2), rel=1e-3)
    assert ref.score(ordinary, 0.5, 5.0).excursions["pixel_size"] == pytest.approx(1.0)  # 2x finer
    assert OodReference.of(REF).score(ordinary, 0.5, 60.0).score == 0.0  # range unknown

def test_reference_without_known_figures_is_refused():
    with pytest.raises(ReferenceError, match="none of the figures"):
        OodReference.from_manifest({**REF, "figures": {"x": REF["figures"]["unknown_figure"]}})


def test_ood_advisory_on_the_first_frame_and_on_each_change():
    watch = OodWatch(REF)
    ref = watch.reference
    seq = [("a", 0.0), ("a", 0.0), ("b", 0.1), ("a", 0.1), ("a", 0.1), ("a", 0.0)]
    kinds = []
    for i, (acq, density) in enumerate(seq):
        score = ref.score(FrameFigures(density, 0.1, 0.1, 50.0), 0.5)
        kinds.append([a.kind for a in watch.observe(score, acq, i, (0, 1))])
    assert kinds == [["ood"], [], [], ["ood_cleared"], [], ["ood"]]
    assert watch.status()["flagged_acquisitions"] == ["a"]


def test_policy_without_reference_has_no_score_and_says_so():
    policy = SelectionPolicy(PolicyConfig(), [0, 1, 2])
    fa = analyse(np.zeros((3, 2, H, W), np.float32), np.arange(3), Params())
    assert policy.ood.score(fa, 0.5) is None
    assert policy.observe(fa, ActiveSet.full((0, 1, 2)), None, "a", 0) == []
    assert policy.ood.status()["reference"] is False
    assert "elit-train reference" in policy.ood.status()["note"]


# --- the trainer's reference command ------------------------------------------------------------

def artifact_with_synth(tiny_artifact, folder):
    """The tiny artifact with a recorded SynthConfig (the manifest is not checksummed)."""
    from trainer.data.config import SynthConfig

    shutil.copytree(tiny_artifact, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["training"]["synth"] = SynthConfig(size_px=32).to_dict()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_reference_command_writes_a_verified_reference(tiny_artifact, tmp_path, capsys):
    from trainer.cli import main

    art = artifact_with_synth(tiny_artifact, tmp_path / "art")
    before = json.loads((art / "manifest.json").read_text())
    assert main(["reference", str(art), "--frames", "8", "--size", "32", "--seed", "77"]) == 0
    assert "written and verified" in capsys.readouterr().out
    after = json.loads((art / "manifest.json").read_text())
    ref = after.pop("ood_reference")
    before.pop("ood_reference", None)
    assert after == before                                   # nothing else changed
    assert ref["command"].startswith("elit-train ")
    assert ref["frames"] == 8 and ref["seed"] == 77 and set(ref["figures"]) >= {"density"}
    loaded = load_artifact(art)                             # the service accepts it (probe too)
    assert OodReference.from_manifest(loaded.ood_reference).frames == 8


def test_reference_refuses_a_training_seed(tiny_artifact, tmp_path, capsys):
    from trainer.cli import main

    art = artifact_with_synth(tiny_artifact, tmp_path / "art")
    seed = json.loads((art / "manifest.json").read_text())["test_set"]["seed"]
    assert main(["reference", str(art), "--frames", "8", "--size", "32", "--seed", str(seed)]) == 1
    assert "training data" in capsys.readouterr().err


# --- the service, end to end ------------------------------------------------------------------

def served_reference(art_dir, blob_frame) -> dict:
    """A reference whose density band is centred on what the model gives for `blob_frame`."""
    from elit_stream.core.engine import Engine

    eng = Engine(load_artifact(art_dir), threads=1)
    x, geom = eng.prepare(blob_frame)
    density = analyse(eng.run(x), np.arange(3), Params(), geom.valid_shape).figures.density
    assert density > 0.01
    c = float(np.log(density + 1e-4))
    return {"version": 1, "threshold": 0.5, "flag_above": 1.0, "frames": 10, "seed": 1,
            "size_px": 64, "figures": {"density": {"low": c - 0.5, "median": c, "high": c + 0.5,
                                                   "scale": 0.5, "floor": 1e-4}}}


@pytest.mark.slow
def test_service_streams_class_confidence_and_flags_ood_from_the_first_frame(tmp_path):
    from elit_stream.protocol import messages
    from elit_stream.protocol.client import ControlClient, FrameSender, ResultSubscriber
    from elit_stream.tools.launcher import ServiceProcess
    from tests.fixtures.tiny_artifact import build_tiny_artifact, gaussian_blobs

    art = build_tiny_artifact(tmp_path, n_members=3, name="tiny")
    blobs = gaussian_blobs((64, 64), seed=1)[0]
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["ood_reference"] = served_reference(art, blobs)
    (art / "manifest.json").write_text(json.dumps(manifest))
    empty = np.full((64, 64), 7.0, np.float32)
    with ServiceProcess(["--model", str(art), "--threads", "1"]) as sp, \
            ControlClient(sp.endpoints["control"], timeout_s=30) as ctl, \
            ResultSubscriber(sp.endpoints["results"]) as sub, \
            FrameSender(sp.endpoints["ingest"]) as sender:
        sub.wait_ready(ctl)
        for i, frame in enumerate([empty, empty, blobs]):      # starts out of distribution
            sender.send(frame, i, "session-1", timeout_s=30)
        results, advisories = [], []
        while len(results) < 3 or len(advisories) < 2:     # events follow their result
            msg = sub.recv(30)
            assert msg is not None, sp.log_tail()
            if msg["topic"] == "result":
                messages.ResultHeader.model_validate(
                    {k: v for k, v in msg.items() if k not in ("topic", "atoms")})
                results.append(msg)
            elif msg.get("event") == "drift_advisory":
                advisories.append(msg)
        status = ctl.call("status")
    assert [r["ood_flag"] for r in results] == [True, True, False]
    assert results[2]["ood"] == 0.0 and results[0]["ood"] > 1.0
    assert [(a["advisory"], a["frame_id"]) for a in advisories] == [("ood", 0), ("ood_cleared", 2)]
    atoms = results[2]["atoms"]
    assert len(atoms["cls_prob"]) == len(atoms["cls_agree"]) == results[2]["n_atoms"] > 0
    assert all(0 <= v <= 1 for v in atoms["cls_agree"])
    assert status["ood"]["reference"] is True and status["ood"]["last"]["frame_id"] == 2


@pytest.mark.slow
def test_ood_benchmark_runs_on_the_shipped_model():
    from pathlib import Path

    from benchmarks.ood import CASES, run

    model = Path(__file__).resolve().parents[1] / "models" / "default"
    if not (model / "manifest.json").exists() or load_artifact(model, check_probe=False) \
            .ood_reference is None:
        pytest.skip("models/default has no ood_reference")
    res = run(model, n_id=2, n_ood=1, size=64, seed=5, log=lambda *_: None)
    assert set(res["cases"]) == {"in_distribution", *CASES}
    assert all(0.0 <= c["flag_rate"] <= 1.0 for c in res["cases"].values())


def test_export_records_a_reference(tmp_path):
    from tests.test_trainer import small_member, tiny_config
    from trainer.model.artifact import verify_artifact
    from trainer.model.export import write_artifact
    from trainer.model.train import MemberResult

    results = [MemberResult(id=i, seed=1000 + i, epochs=1, swa_epochs=1, best_epoch=1,
                            best_val_loss=0.5, history={}, test_iou=0.5) for i in range(2)]
    out = tmp_path / "exported"
    write_artifact(out, [small_member(1), small_member(2)], results, tiny_config(), "test",
                   log=lambda *_: None, reference_frames=8)
    ref = verify_artifact(out)["ood_reference"]
    assert ref["frames"] == 8 and "order" in ref["figures"]


def test_reference_frames_leave_out_empty_scenes(monkeypatch):
    """The physical world has vacuum tiles; an empty field of view is what the alarm is for, so the
    reference is made from the scenes with atoms only."""
    from trainer.data.config import SynthConfig
    from trainer.data.synth import make_sample
    from trainer.model import reference

    world = SynthConfig.physical(scenes=("single_atoms", "vacuum"), scene_weights=(1.0, 1000.0))
    used = []

    def spy(rng, cfg):
        used.append(cfg.scene_weights)
        return make_sample(rng, cfg)

    monkeypatch.setattr(reference, "make_sample", spy)
    frames = list(reference.reference_frames(world, 3, seed=5, size_px=64))
    assert set(used) == {(1.0, 0.0)} and len(frames) == 3
    assert all(f.shape == (64, 64) for f in frames)


def test_reference_frames_leave_out_frames_without_atoms(monkeypatch):
    """A frame that shows fewer than MIN_ATOMS atoms (a sparse scene at a fine pixel size) is not
    taken as normal either: noise or vacuum frames look just like it."""
    from trainer.data.config import SynthConfig
    from trainer.data.synth import Sample
    from trainer.model import reference

    def sample(n_atoms):
        return Sample(np.full((8, 8), float(n_atoms), np.float32), np.zeros((8, 8), np.uint8),
                      np.zeros((n_atoms, 2), np.float32), np.ones(n_atoms, np.uint8), 10.0)

    counts = iter([0, 5, 2, 3, 1, 9, 0, 4])
    monkeypatch.setattr(reference, "make_sample", lambda rng, cfg: sample(next(counts)))
    frames = list(reference.reference_frames(SynthConfig(), 4, seed=5, size_px=64))
    assert [int(f[0, 0]) for f in frames] == [5, 3, 9, 4]
    monkeypatch.setattr(reference, "make_sample", lambda rng, cfg: sample(0))
    with pytest.raises(ValueError, match="nearly"):
        list(reference.reference_frames(SynthConfig(), 2, seed=5, size_px=64))
