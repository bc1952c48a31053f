"""ELIT steps 4–5: retrain on a relabelled experimental set and run the whole loop.

Owns ``retrain`` (a dataset file + a parent artifact → a new ensemble and artifact whose manifest
``lineage`` names the parent, the frames, members and filter settings), ``detection_report``
(F1 and per-atom uncertainty AUROC against a known truth) and ``run_iterations`` (Algorithm 1 of
the paper with programmatic or operator selection), with one resumable folder per iteration:

    RUN/iter_0/analysis, RUN/iter_0/report, RUN/iter_0/selection.json, RUN/iter_0/relabel,
    RUN/iter_1/train (training run), RUN/iter_1/<run>-iter1 (the new ensemble), RUN/iter_1/analysis, …
    RUN/progress.md (the per-iteration table), RUN/recommendation.json

Artifacts are named by run and iteration (``<run folder>-iter<i>``), so a child's lineage names its
parent unambiguously. Classes are carried: a child has as many classes as its parent (a 2-class
parent's atoms are split by local Z-contrast). Every iteration is judged against its parent on
label-free figures of the movie (``trainer.elit.judge``); the loop stops when a child is not
better and recommends the last accepted ensemble (``RUN/recommendation.json``, ``progress.md``).

Scale: the new ensemble works at its parent's pixel size; relabelled tiles are rescaled to it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from trainer.elit.experiment import Analysis, analyse_movie, load_analysis, save_analysis
from trainer.elit.relabel import (RelabelConfig, build_dataset, rehearsal_tiles, select_atoms,
                                  write_relabel)
from trainer.elit.report import (
    Selection,
    load_selection,
    operator_selection,
    save_selection,
    write_report,
)
from trainer.elit.scoring import detection_report
from trainer.model.artifact import read_manifest, sha256_file
from trainer.model.executor import ExecutorSpec


@dataclass(frozen=True)
class RetrainConfig:
    members: int = 4
    epochs: int = 6
    swa_epochs: int = 2
    patience: int = 2
    lr: float = 1e-3
    batch_size: int = 16
    n_val: int = 16
    n_test: int = 16
    seed: int = 2000
    from_scratch: bool = False       # False: every member starts from the parent's best member
    anchor: bool = True              # children start from the loop's first artifact's best member
    diverse: bool = True             # ... member k from the k-th selected member (best first)
    threads: int = 0
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)   # where members train


# ----------------------------------------------------------------------------- step 4


def parent_lineage(parent: Path, notes: str, step: str = "retrain", **extra) -> dict:
    """``lineage`` of a child of ``parent``: its name and manifest sha256, the step that made it,
    the ELIT iteration (parent's + 1 for a retraining; the parent's for a multi-class step on top
    of it), extras."""
    manifest = read_manifest(parent)
    iteration = int(manifest["lineage"].get("iteration", 0)) + (step == "retrain")
    return {"parent": {"name": manifest["name"], "manifest_sha256": sha256_file(Path(parent) / "manifest.json")},
            "iteration": iteration, "step": step, "notes": notes, **extra}


def artifact_name(run: Path, iteration: int, step: str = "iter") -> str:
    """``<run folder>-iter<i>`` (characters a manifest name allows)."""
    import re

    base = re.sub(r"[^A-Za-z0-9._-]", "-", Path(run).resolve().name) or "elit"
    return f"{base}-{step}{iteration}" if step == "iter" else f"{base}-{step}"


def retrain_config(dataset: Path, parent: Path, rc: RetrainConfig, init_member: int | None):
    """The TrainConfig of a retraining run: the parent's U-Net (classes from the dataset)."""
    from trainer.model.train import TrainConfig, dataset_config, load_dataset
    from trainer.model.unet import UNetConfig

    manifest = read_manifest(parent)
    arch = {k: v for k, v in manifest["model"]["architecture"].items() if k != "type"}
    synth = dataset_config(dataset)
    unet = replace(UNetConfig.from_dict(arch), n_classes=synth.n_classes)
    n = len(load_dataset(dataset).images)
    init = (None if rc.from_scratch or init_member is None
            else f"{Path(parent).resolve()}:{_member_list(init_member)}")
    return TrainConfig(members=rc.members, base_seed=rc.seed, max_epochs=rc.epochs,
                       swa_epochs=rc.swa_epochs, patience=rc.patience, lr=rc.lr,
                       batch_size=rc.batch_size, n_train=n - rc.n_val - rc.n_test, n_val=rc.n_val,
                       n_test=rc.n_test, threads=rc.threads, data_path=str(Path(dataset).resolve()),
                       init_from=init, synth=synth, unet=unet)


def _member_list(members) -> str:
    """``3`` or ``3,0,5,6`` (one starting member for all, or member k from the k-th listed)."""
    return str(members) if isinstance(members, int) else ",".join(map(str, members)) + \
        ("," if len(members) == 1 else "")


def retrain(dataset: Path, parent: Path, run_dir: Path, out: Path, rc: RetrainConfig,
            init_member: int | list[int] | None, lineage: dict, command: str, force: bool = False,
            log=print, show_progress: bool = False) -> Path:
    """Train a new ensemble on ``dataset`` and export it to ``out`` with ``lineage``."""
    from trainer.model.export import write_artifact
    from trainer.model.train import load_members, train_ensemble

    cfg = retrain_config(dataset, parent, rc, init_member)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "command.txt").write_text(command + "\n")
    (run_dir / "lineage.json").write_text(json.dumps(lineage, indent=1) + "\n")
    results = train_ensemble(cfg, run_dir, log=log, show_progress=show_progress,
                             executor=rc.executor)
    write_artifact(out, load_members(run_dir, cfg), results, cfg, command, lineage=lineage,
                   report_dir=run_dir / "report", force=force, log=log)
    log(f"artifact written and verified: {out}")
    return out


# ----------------------------------------------------------------------------- step 5


@dataclass(frozen=True)
class LoopConfig:
    iterations: int = 2
    pixel_size_pm: float | None = None
    operator: bool = False
    threshold: float = 3.0           # scoring rule's flag threshold (robust z)
    keep_going: bool = False         # retrain on even when an iteration is not better
    analyse_frames: str | None = None
    relabel: RelabelConfig = field(default_factory=RelabelConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)


def run_iterations(artifact: Path, frames: np.ndarray, run: Path, cfg: LoopConfig, command: str,
                   truth: dict | None = None, select: list[int] | None = None,
                   best: int | None = None, log=print) -> list[dict]:
    """Algorithm 1 from ``artifact``; returns one row per analysed ensemble (iteration 0 = parent).
    In operator mode, stops after a report that has no ``selection.json`` yet (unless ``select``
    is given for it) and prints the command that continues. Stops early when an iteration is not
    better than its parent on the label-free figures (``trainer.elit.judge``)."""
    from trainer.elit.experiment import parse_frames
    from trainer.elit.judge import compare, movie_figures

    run.mkdir(parents=True, exist_ok=True)
    idx = parse_frames(cfg.analyse_frames, len(frames))
    rows, current, root = [], Path(artifact), None
    world = _parent_synth(read_manifest(current))      # rehearsal tiles: the first parent's world
    for i in range(cfg.iterations + 1):
        it = run / f"iter_{i}"
        an = _analysis(current, frames, idx, cfg.pixel_size_pm, it / "analysis", log)
        sel = _selection(an, it, cfg, select, best, last=i == cfg.iterations)
        row = _progress_row(i, current, an, sel, truth)
        rows.append(row)
        if sel is None:
            _write_progress(run, rows)
            hint = load_selection(it / "report" / "suggested.json")
            log(f"\nreview {it / 'report' / 'report.md'} and {it / 'report' / 'grid.png'}; the rule "
                f"suggests members {hint.members}, best {hint.best}. Continue with your choice:"
                f"\n  {command} --select {','.join(map(str, hint.members))} --best {hint.best}")
            return rows
        select, best = None, None                      # an operator's choice applies once
        start = ([sel.best] + [m for m in sel.members if m != sel.best] if cfg.retrain.diverse
                 else sel.best)                        # --diverse: member k from the k-th of these
        if root is None:
            root = (current, start)                    # --anchor: every child starts from here
        rcfg = replace(cfg.relabel, n_classes=len(read_manifest(current)["classes"]))
        dataset = _relabel(an, sel, rcfg, current, it / "relabel", log, truth, world)
        info = json.loads((it / "relabel" / "relabel.json").read_text())
        f = info["filters"]
        row["label_free"] = movie_figures(an, f["kept"] / max(f["atoms"], 1))
        if (it / "relabel" / "filter_truth.json").is_file():
            row["filter_truth"] = json.loads((it / "relabel" / "filter_truth.json").read_text())
        if i > 0:
            row["verdict"] = compare(row["label_free"], rows[-2]["label_free"])
        _write_progress(run, rows)
        if i == cfg.iterations:
            break
        if i > 0 and not row["verdict"]["accepted"]:
            log(f"iteration {i} is not better than its parent ({row['verdict']['why']}): "
                + ("going on (--keep-going)" if cfg.keep_going else "stopping"))
            if not cfg.keep_going:
                break
        child = it.parent / f"iter_{i + 1}"
        out = child / artifact_name(run, i + 1)
        init_art, init_member = root if cfg.retrain.anchor else (current, start)
        if not (out / "manifest.json").is_file():
            lineage = parent_lineage(current, f"ELIT iteration {i + 1}: analyse with {current.name}, "
                                     f"relabel {len(info['frames'])} frames by members {sel.members} "
                                     f"(patch GMM + lattice geometry + vacuum test, {rcfg.n_classes} "
                                     f"class(es)), retrain", frames=info["frames"],
                                     members=sel.members, best_member=sel.best,
                                     selection=sel.chosen_by, filters=info["filters"],
                                     relabel=info["config"], init_from=None if cfg.retrain.from_scratch
                                     else f"member(s) {_member_list(init_member)} of {init_art.name}",
                                     steps=_steps(current, sel, rcfg, info, cfg.retrain,
                                                  (init_art, init_member)))
            retrain(dataset, init_art, child / "train", out, cfg.retrain,
                    None if cfg.retrain.from_scratch else init_member, lineage, command, force=True,
                    log=log)
        current = out
    return rows


def _steps(parent: Path, sel: Selection, rcfg: RelabelConfig, info: dict, rc: RetrainConfig,
           init: tuple[Path, int]) -> list:
    """What each step of one iteration was, for the lineage (``init``: the artifact and member
    the new members start from)."""
    f = info["filters"]
    return [{"step": "analyse", "artifact": parent.name, "frames": len(info["frames"])},
            {"step": "select", "members": sel.members, "best": sel.best, "by": sel.chosen_by},
            {"step": "relabel", "filter": f"patch GMM ({rcfg.gmm_keep}) + lattice geometry rescue + "
             f"vacuum test (dropped_as={rcfg.dropped_as}) + uncertainty q{rcfg.std_quantile}",
             "classes": rcfg.n_classes, "atoms": f["atoms"], "kept": f["kept"],
             "background": f["dropped_as_background"]},
            {"step": "retrain", "members": rc.members, "epochs": rc.epochs,
             "init_from": None if rc.from_scratch else f"{init[0].name}:{_member_list(init[1])}"}]


def _analysis(artifact, frames, idx, pixel_size_pm, out: Path, log) -> Analysis:
    if (out / "analysis.npz").is_file():
        return load_analysis(out)
    an = analyse_movie(artifact, frames[idx], pixel_size_pm, idx, log=log)
    save_analysis(an, out)
    return an


def _selection(an: Analysis, it: Path, cfg: LoopConfig, select, best, last: bool) -> Selection | None:
    path = it / "selection.json"
    suggested = write_report(an, it / "report", cfg.threshold)
    if path.is_file():
        return load_selection(path)
    if cfg.operator and not last:
        if select is None:
            return None
        sel = suggested if select == ["suggested"] else operator_selection(an, select, best, suggested)
    else:
        sel = suggested
    save_selection(sel, path)
    return sel


def _relabel(an: Analysis, sel: Selection, rcfg: RelabelConfig, artifact: Path, out: Path, log,
             truth: dict | None = None, world=None) -> Path:
    if (out / "dataset.npz").is_file() and (out / "relabel.json").is_file():
        return out / "dataset.npz"
    manifest = read_manifest(artifact)
    atoms, info = select_atoms(an, sel.members, rcfg, manifest["pixel_size_pm"])
    if truth is not None:
        from trainer.elit.figures import filter_truth_png
        from trainer.elit.scoring import filter_vs_truth

        table = filter_vs_truth(atoms, truth, an.frames.shape[1:], info["patch_px_on_frames"] / 2)
        out.mkdir(parents=True, exist_ok=True)
        (out / "filter_truth.json").write_text(json.dumps(table, indent=1) + "\n")
        filter_truth_png(an, atoms, truth, table, out / "filter_truth.png")
    ds = build_dataset(an, atoms, rcfg, manifest["pixel_size_pm"], manifest["atom_radius_px"],
                       _parent_synth(manifest), world)
    path = write_relabel(out, ds, atoms, info, rcfg, an, sel.members)
    rehearsal = rehearsal_tiles(ds, atoms, rcfg)
    log(f"relabelled ({rcfg.n_classes} class(es)): {info['kept']} atoms kept, {info['dropped']} "
        f"dropped by the GMM ({info['geometry_rescued']} rescued by lattice geometry, "
        f"{info['dropped_as_background']} vacuum → background), {info['dropped_uncertainty']} "
        f"by uncertainty; {len(ds.images)} tiles ({rehearsal} of them rehearsal of the parent's "
        f"synthetic world) -> {path}")
    return path


def _parent_synth(manifest: dict):
    from trainer.data.synth import SynthConfig

    return SynthConfig.from_dict(manifest["training"]["synth"])


def _progress_row(i: int, artifact: Path, an: Analysis, sel: Selection | None, truth) -> dict:
    from trainer.elit.scoring import impurity_scores, segment_scores

    f = an.figures
    row = {"iteration": i, "artifact": str(artifact), "members": len(an.member_ids),
           "classes": int(an.probs.shape[2]),
           "atoms_per_frame_mean_member": float(f["atoms"].mean()),
           "agreement": float(f["agreement"].mean()),
           "mean_std_at_atoms": None, "selected": sel.members if sel else None}
    if truth is not None:
        row["all"] = detection_report(an, truth)
        row["mean_std_at_atoms"] = row["all"]["mean_uncertainty"]
        row["segments"] = segment_scores(an, truth)
        row["impurity"] = impurity_scores(an, truth)
        if sel is not None:
            cols = [an.member_ids.index(m) for m in sel.members]
            row["selected_scores"] = detection_report(an, truth, cols)
            row["best_scores"] = detection_report(an, truth, [an.member_ids.index(sel.best)])
    return row


def _write_progress(run: Path, rows: list[dict]) -> None:
    """``progress.json``, ``progress.md`` (label-free table, verdicts, recommendation; truth
    tables when the truth is known) and ``recommendation.json``."""
    from trainer.elit.judge import recommend
    from trainer.elit.progress import progress_markdown

    rec = recommend([r for r in rows if "label_free" in r] or rows[:1])
    (run / "progress.json").write_text(json.dumps(rows, indent=1) + "\n")
    (run / "recommendation.json").write_text(json.dumps(rec, indent=1) + "\n")
    text = progress_markdown(rows, rec)
    (run / "progress.md").write_text(text)
    print(next(line for line in text.splitlines() if line.startswith(f"| {rows[-1]['iteration']} |")))


def loop_config_dict(cfg: LoopConfig) -> dict:
    return asdict(cfg)
