"""ELIT loop: patch-GMM filter, training set from coordinates, scoring rule, intensity classes,
weights from ONNX, manifest lineage of a retrained artifact (tiny networks, a few seconds)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from trainer.elit.experiment import Analysis, member_figures, parse_frames
from trainer.elit.multiclass import split_by_contrast
from trainer.elit.relabel import (
    IGNORE,
    RelabelConfig,
    augment_tile,
    gmm_lattice_filter,
    label_mask,
    patch_features,
    patch_stack,
)
from trainer.elit.report import score_members
from trainer.data.testmovie import honeycomb_pm
from trainer.elit.scoring import match_atoms

BOND_PX = 10.0


def gaussians(xy: np.ndarray, amp: np.ndarray, size: int, sigma: float = 2.2) -> np.ndarray:
    g = np.arange(size, dtype=float)
    gx = np.exp(-0.5 * ((g - xy[:, :1]) / sigma) ** 2)
    gy = np.exp(-0.5 * ((g - xy[:, 1:]) / sigma) ** 2)
    return (gy * amp[:, None]).T @ gx


def half_lattice_half_amorphous(seed: int = 0, size: int = 192):
    """Left half graphene, right half random hard-core positions; returns image, xy, is_lattice."""
    rng = np.random.default_rng(seed)
    lat = honeycomb_pm(size, BOND_PX, 0.3) + size / 2
    lat = lat[(lat[:, 0] >= 2) & (lat[:, 0] < size / 2) & (lat[:, 1] >= 2) & (lat[:, 1] < size - 2)]
    density = 4 / (3 * np.sqrt(3) * BOND_PX ** 2)
    n_am = int(density * (size / 2) * size)
    am = np.stack([rng.uniform(size / 2 + 3, size - 2, 4 * n_am), rng.uniform(2, size - 2, 4 * n_am)], 1)
    keep = []
    for p in am:                                   # hard core 0.8 bond
        if all(np.hypot(*(p - q)) >= 0.8 * BOND_PX for q in keep):
            keep.append(p)
        if len(keep) == n_am:
            break
    am = np.array(keep)
    xy = np.concatenate([lat, am])
    amp = np.concatenate([np.ones(len(lat)), rng.uniform(0.6, 1.4, len(am))])
    image = gaussians(xy, amp, size) + rng.normal(0, 0.15, (size, size))
    return image, xy, np.r_[np.ones(len(lat), bool), np.zeros(len(am), bool)]


def test_gmm_filter_removes_amorphous_keeps_lattice():
    image, xy, is_lattice = half_lattice_half_amorphous()
    patches = patch_features(patch_stack(image, xy, 48))
    keep, info = gmm_lattice_filter(patches, "tight")
    assert info["lattice_component"] in (0, 1)
    assert (~keep[~is_lattice]).mean() > 0.9          # amorphous atoms removed
    # lattice atoms kept: nearly all those a quarter patch (12 px) away from the amorphous half and
    # the frame edges; nearer ones see disorder or reflect padding in their patch and may go too
    away = is_lattice & np.all((xy > 12) & (xy < [96 - 12, 192 - 12]), axis=1)
    assert keep[away].mean() > 0.95 and keep[is_lattice].mean() > 0.6
    none, _ = gmm_lattice_filter(patches, "none")
    assert none.all()


def test_label_mask_discs_and_ignore_regions():
    xy = np.array([[10.0, 12.0], [30.0, 30.0]])
    dropped = np.array([[50.0, 20.0], [33.0, 30.0]])      # the second overlaps a kept atom
    mask = label_mask(xy, np.array([1, 2], np.uint8), dropped, 3.0, 5.0, 64)
    assert mask[12, 10] == 1 and mask[30, 30] == 2 and mask[20, 50] == IGNORE
    assert mask[12, 13] == 1 and mask[12, 14] == 0        # disc radius 3
    assert mask[30, 32] == 2                              # kept disc wins over the ignore disc
    assert mask[30, 36] == IGNORE and mask[0, 0] == 0


@pytest.mark.parametrize("seed", range(6))
def test_augmented_tile_keeps_mask_and_image_aligned(seed):
    size = 128
    rng = np.random.default_rng(100 + seed)
    grid = np.stack(np.meshgrid(np.arange(6, size - 5, 12.0), np.arange(6, size - 5, 12.0)), -1)
    xy = grid.reshape(-1, 2) + rng.uniform(-2, 2, (grid.size // 2, 2))   # >= 8 px apart
    image = gaussians(xy, np.ones(len(xy)), size, sigma=1.5)
    image[:, : size // 3] += 0.3                          # asymmetric, so a wrong rotation shows
    cfg = RelabelConfig(tile_px=64, noise_max=0.0)
    img, mask, txy, _, _ = augment_tile(np.random.default_rng(seed), image, xy,
                                          np.ones(len(xy), np.uint8), xy[:0], cfg, 2.0)
    assert img.shape == mask.shape == (64, 64) and len(txy) > 0
    inner = np.all((txy > 3) & (txy < 60), axis=1)
    rows, cols = np.rint(txy[inner, 1]).astype(int), np.rint(txy[inner, 0]).astype(int)
    assert (mask[rows, cols] == 1).all()
    peak = img[rows, cols]
    assert peak.mean() > img[mask == 0].mean() + 0.3      # bright atoms under the discs
    for r, c in zip(rows, cols):                          # a local maximum within 1 px
        window = img[max(r - 3, 0):r + 4, max(c - 3, 0):c + 4]
        assert img[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2].max() >= window.max() - 1e-6


def fake_analysis(broken: int | None = 3, members: int = 6) -> Analysis:
    """Members see the same lattice (slightly jittered); ``broken`` adds fog and spurious blobs."""
    rng = np.random.default_rng(0)
    size, frames = 96, 3
    sites = honeycomb_pm(size, BOND_PX, 0.2) + size / 2
    sites = sites[np.all((sites > 3) & (sites < size - 3), axis=1)]
    maps = np.zeros((frames, members, 1, size, size), np.float32)
    for t in range(frames):
        for m in range(members):
            disc = gaussians(sites + rng.normal(0, 0.2, sites.shape), np.ones(len(sites)), size, 1.6)
            a = np.clip(1.3 * disc, 0, 1)
            if m == broken:
                fake = np.stack([rng.uniform(0, size, 30), rng.uniform(0, size, 30)], 1)
                a = np.clip(a + 0.35 + 1.2 * gaussians(fake, np.ones(30), size, 1.2), 0, 1)
            maps[t, m, 0] = a
    radius = 2.0
    return Analysis(np.zeros((frames, size, size), np.float32), np.arange(frames),
                    maps.astype(np.float16), member_figures(maps.sum(2), radius), 11.0, radius,
                    list(range(members)), "fake")


def test_scoring_rule_flags_a_broken_member():
    sel = score_members(fake_analysis(broken=3))
    assert 3 in sel.flagged and 3 not in sel.members
    assert sel.best != 3 and len(sel.members) >= 2
    clean = score_members(fake_analysis(broken=None))
    assert clean.flagged == []                            # agreeing members are not flagged


def test_scoring_keeps_at_least_two():
    sel = score_members(fake_analysis(broken=3, members=3), threshold=-1.0)
    assert len(sel.members) == 2 and 3 not in sel.members


def test_multiclass_split_of_a_bimodal_sample():
    rng = np.random.default_rng(1)
    light = np.exp(rng.normal(0, 0.12, 400))
    heavy = 3.5 * np.exp(rng.normal(0, 0.1, 12))
    cls, _ = split_by_contrast(np.r_[light, heavy])
    assert (cls[400:] == 2).all() and (cls[:400] == 2).sum() <= 2
    cls_uni, _ = split_by_contrast(light)
    assert (cls_uni == 2).sum() == 0                      # unimodal: nothing heavy
    cls_t, _ = split_by_contrast(np.r_[light, heavy], threshold=2.0)
    assert (cls_t == 2).sum() == 12


def test_parse_frames_and_matching():
    assert parse_frames("0:4", 10).tolist() == [0, 1, 2, 3]
    assert parse_frames("1,3,-1", 10).tolist() == [1, 3, 9]
    assert parse_frames(None, 3).tolist() == [0, 1, 2]
    with pytest.raises(ValueError):
        parse_frames("20", 10)
    ok, partner = match_atoms(np.array([[0.0, 0], [5, 5], [9, 9]]), np.array([[0.5, 0], [5.2, 5]]), 1.0)
    assert ok.tolist() == [True, True, False] and partner.tolist() == [0, 1, -1]


# ----------------------------------------------------------------------------- retraining + lineage


@pytest.fixture(scope="module")
def parent_artifact(tmp_path_factory) -> Path:
    from tests.fixtures.trainer_artifacts import build_random_parent

    return build_random_parent(tmp_path_factory.mktemp("models") / "parent")


def test_weights_read_back_from_onnx_match(parent_artifact):
    from trainer.model.train import apply_init_state, onnx_member_state
    from trainer.model.unet import UNet, UNetConfig

    state = onnx_member_state(parent_artifact, 1)
    torch.manual_seed(2)
    reference = UNet(UNetConfig(n_classes=2, base_filters=4)).state_dict()
    for name, value in reference.items():
        if "num_batches" not in name:
            torch.testing.assert_close(state[name], value)
    one_class = UNet(UNetConfig(n_classes=1, base_filters=4))
    assert apply_init_state(one_class, state) == ["head.bias", "head.weight"]


def tiny_iterate(parent_artifact, tmp_path, iterations: int) -> tuple[list[str], Path]:
    """`elit-train iterate` arguments for a tiny loop on a 3-frame test movie, and its run folder."""
    from trainer.data.testmovie import MovieConfig, make_movie, save_movie

    movie, run = tmp_path / "movie.npz", tmp_path / "run"
    save_movie(make_movie(MovieConfig(frames=3, size_px=64, seed=3)), movie)
    return ["iterate", str(parent_artifact), str(movie), "--run-dir", str(run), "--iterations",
            str(iterations), "--tile", "32", "--tiles-per-frame", "6", "--members", "2",
            "--epochs", "1", "--n-val", "3", "--n-test", "3", "--std-quantile", "1",
            "--threads", "1"], run


def test_iterate_writes_a_child_artifact_with_lineage(parent_artifact, tmp_path):
    from trainer.model.artifact import sha256_file, verify_artifact
    from trainer.cli import main

    args, run = tiny_iterate(parent_artifact, tmp_path, 1)
    assert main(args + ["--operator"]) == 0               # stops after the first report
    assert (run / "iter_0" / "report" / "grid.png").stat().st_size > 0
    assert not (run / "iter_1").exists()
    assert main(args + ["--operator", "--select", "0,1", "--best", "1"]) == 0
    child = run / "iter_1" / "run-iter1"                  # named by run and iteration
    manifest = verify_artifact(child)
    assert manifest["name"] == "run-iter1"
    assert len(manifest["classes"]) == 2                  # the 2-class parent's classes carried
    lineage = manifest["lineage"]
    assert lineage["step"] == "retrain"
    assert [s["step"] for s in lineage["steps"]] == ["analyse", "select", "relabel", "retrain"]
    assert lineage["steps"][2]["classes"] == 2
    assert lineage["parent"] == {"name": "parent",
                                 "manifest_sha256": sha256_file(parent_artifact / "manifest.json")}
    assert lineage["iteration"] == 1 and lineage["members"] == [0, 1] and lineage["best_member"] == 1
    assert lineage["frames"] == [0, 1, 2] and "gmm" in lineage["filters"]
    assert lineage["selection"] == "operator"
    assert manifest["training"]["init_from"].endswith("parent:1,0")    # best first, --diverse
    rows = json.loads((run / "progress.json").read_text())
    assert [r["iteration"] for r in rows] == [0, 1] and "f1" in rows[1]["all"]
    assert "verdict" in rows[1] and "keep_fraction" in rows[1]["label_free"]
    rec = json.loads((run / "recommendation.json").read_text())
    assert rec["iteration"] in (0, 1) and rec["why"]
    assert "Recommended: iteration" in (run / "progress.md").read_text()


def test_anchored_children_start_from_the_first_artifact(parent_artifact, tmp_path):
    """--anchor --no-diverse: iteration 2's members start from the first artifact's best member,
    not from iteration 1's (so errors learnt in one iteration are not the next one's starting
    point)."""
    from trainer.cli import main
    from trainer.model.artifact import verify_artifact

    args, run = tiny_iterate(parent_artifact, tmp_path, 2)
    assert main(args + ["--keep-going", "--anchor", "--no-diverse"]) == 0
    first = json.loads((run / "iter_0" / "selection.json").read_text())["best"]
    second = verify_artifact(run / "iter_2" / "run-iter2")
    source, member = second["training"]["init_from"].rsplit(":", 1)
    assert Path(source).name == "parent" and int(member) == first
    assert second["lineage"]["steps"][-1]["init_from"] == f"parent:{first}"
    assert second["lineage"]["parent"]["name"] == "run-iter1"      # the data still come from iter 1


def test_diverse_children_start_each_member_from_another_selected_member(parent_artifact, tmp_path):
    """--diverse (the default): child member k starts from the k-th selected member of the first
    artifact, best first (not every member from the best), and the lineage says which."""
    from trainer.cli import main
    from trainer.model.artifact import verify_artifact

    args, run = tiny_iterate(parent_artifact, tmp_path, 1)
    assert main(args) == 0                                          # --diverse: the default
    sel = json.loads((run / "iter_0" / "selection.json").read_text())
    order = [sel["best"]] + [m for m in sel["members"] if m != sel["best"]]
    assert len(order) >= 2
    child = verify_artifact(run / "iter_1" / "run-iter1")
    source, members = child["training"]["init_from"].rsplit(":", 1)
    assert Path(source).name == "parent" and members == ",".join(map(str, order))
    assert child["lineage"]["steps"][-1]["init_from"] == f"parent:{members}"


def test_a_tiny_tight_cluster_is_not_taken_for_the_lattice():
    rng = np.random.default_rng(0)
    lattice = rng.normal(0, 1.0, (200, 4, 4))
    clones = np.repeat(rng.normal(5, 1, (1, 4, 4)), 8, 0) + rng.normal(0, 0.01, (8, 4, 4))
    keep, info = gmm_lattice_filter(np.concatenate([lattice, clones]), "tight")
    assert info["component_sizes"][info["lattice_component"]] > 100   # the big one, not the clones
    assert keep[:200].mean() > 0.85 and not keep[200:].any()


def test_lineage_iteration_and_names_by_step(parent_artifact, tmp_path):
    from trainer.elit.iterate import artifact_name, parent_lineage

    assert parent_lineage(parent_artifact, "x")["iteration"] == 1           # a retraining
    mc = parent_lineage(parent_artifact, "x", step="multiclass")
    assert mc["iteration"] == 0 and mc["step"] == "multiclass"              # not a new iteration
    assert artifact_name(tmp_path / "my run", 2) == "my-run-iter2"
    assert artifact_name(tmp_path / "mc", 0, "multiclass") == "mc-multiclass"


def test_multiclass_writes_a_two_class_child_named_by_run(parent_artifact, tmp_path):
    from trainer.cli import main
    from trainer.data.testmovie import MovieConfig, make_movie, save_movie
    from trainer.model.artifact import verify_artifact

    movie = tmp_path / "movie.npz"
    save_movie(make_movie(MovieConfig(frames=3, size_px=64, seed=5)), movie)
    run = tmp_path / "mc"
    assert main(["multiclass", str(parent_artifact), str(movie), "--run-dir", str(run),
                 "--tile", "32", "--tiles-per-frame", "6", "--members", "2", "--epochs", "1",
                 "--n-val", "3", "--n-test", "3", "--std-quantile", "1", "--threads", "1"]) == 0
    manifest = verify_artifact(run / "mc-multiclass")
    assert manifest["name"] == "mc-multiclass" and len(manifest["classes"]) == 2
    assert manifest["lineage"]["step"] == "multiclass" and manifest["lineage"]["iteration"] == 0
    assert "impurity" in json.loads((run / "scores.json").read_text())


def test_children_are_anchored_by_default_and_no_anchor_turns_it_off():
    from trainer.cli import build_parser
    from trainer.cli.elit import retrain_config

    base = ["iterate", "models/default", "movie.npz", "--run-dir", "r"]
    assert retrain_config(build_parser().parse_args(base)).anchor is True
    assert retrain_config(build_parser().parse_args(base + ["--no-anchor"])).anchor is False
    assert retrain_config(build_parser().parse_args(base)).diverse is True
    assert retrain_config(build_parser().parse_args(base + ["--no-diverse"])).diverse is False
