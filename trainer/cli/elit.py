"""``elit-train`` subcommands of the ELIT loop: analyse, relabel, iterate, multiclass (and the
retraining options of ``train``). Argument parsing and printing only; the work is in
``trainer.elit.experiment``, ``report``, ``relabel``, ``iterate`` and ``multiclass``."""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

RELABEL_HELP = """\
Atoms are the blobs of the selected members' mean map on the chosen frames. A 2-class Gaussian
mixture on 48x48 patches around every atom calls atoms "not lattice" (the tighter class is the
lattice); of those, atoms whose bonds match the frame's lattice (next to edges, holes, defects) and
bright (high local Z-contrast) atoms are kept; the rest are marked "ignore" (255, skipped by the
loss) unless the ensemble and the frame agree the place is empty (vacuum), where they become
background. Atoms with high ensemble uncertainty are ignored too. A 2-class ensemble's atoms are
split into lattice / heavy by local Z-contrast, so the classes carry over. Masks are
rebuilt on the experimental frames, rescaled to the ensemble's pixel size, and augmented (crops,
90° rotations, flips, small zoom, Gaussian noise). Writes dataset.npz, relabel.json and
kept_dropped.png (look at it!)."""


def add_elit_commands(sub) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("analyse", help="ELIT steps 1-2: apply an ensemble to a movie; figures + report",
                       formatter_class=raw, description="Run every member on every frame of a movie "
                       "or image stack, measure each member (atoms found, agreement with the mean, "
                       "'fog' away from atoms, blob sizes) and write the operator report: a members "
                       "x frames picture, the figures table and a suggested artifact-free subset.")
    _movie_args(p)
    p.add_argument("--out", type=Path, required=True, help="folder for analysis/ and report/")
    p.add_argument("--frames", help="frames to analyse, e.g. 0:10 or 0,5,9 (default: all)")
    p.add_argument("--threshold", type=float, default=3.0,
                   help="flag members whose robust z-score exceeds this (default 3)")
    p.set_defaults(func=cmd_analyse)

    p = sub.add_parser("relabel", help="ELIT step 3: new training set from the good part of a movie",
                       formatter_class=raw, description=RELABEL_HELP)
    p.add_argument("analysis", type=Path, help="folder written by `elit-train analyse` (its analysis/)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--members", help="member ids to use, e.g. 0,3,5 (default: the report's suggestion)")
    _relabel_args(p)
    p.set_defaults(func=cmd_relabel)

    p = sub.add_parser("iterate", help="ELIT steps 1-5: the whole loop for N iterations",
                       formatter_class=raw, description="Analyse the movie, pick members (scoring "
                       "rule, or you with --operator), relabel, retrain a new ensemble starting from "
                       "the best member, export it with its lineage, and repeat. Resumable: re-run "
                       "the same command to continue. Prints one line per iteration (and F1 when "
                       "the movie's true atom positions are known).")
    _movie_args(p)
    p.add_argument("--run-dir", type=Path, required=True, help="one folder per iteration goes here")
    p.add_argument("--iterations", type=_pos_int, default=2, help="retraining rounds (default 2)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--auto", action="store_true", help="use the scoring rule's selection (default)")
    mode.add_argument("--operator", action="store_true",
                      help="stop after each report; continue with --select")
    p.add_argument("--select", help="operator: member ids for the pending iteration, or 'suggested'")
    p.add_argument("--best", type=int, help="operator: member whose weights start the next ensemble")
    p.add_argument("--analyse-frames", help="frames analysed and scored (default: all)")
    p.add_argument("--keep-going", action="store_true",
                   help="retrain all --iterations even when an iteration is not better than its "
                   "parent on the label-free figures (the recommendation is unchanged)")
    _relabel_args(p)
    _retrain_args(p)
    p.set_defaults(func=cmd_iterate)

    p = sub.add_parser("multiclass", help="ELIT step 6: lattice vs heavy-atom classes; 2-class ensemble",
                       formatter_class=raw, description="Find atoms with an (ELIT-retrained) "
                       "ensemble, split them by local Z-contrast at the atom (lattice vs heavier "
                       "impurity above 2.2, or --intensity-threshold), build 2-class masks "
                       "and train a 2-class ensemble.")
    _movie_args(p)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--intensity-threshold", type=float,
                   help="heavy if the local Z-contrast (height over the neighbours' median) exceeds "
                   "this (default 2.2)")
    _relabel_args(p, gmm_default="tight")
    _retrain_args(p)
    p.set_defaults(func=cmd_multiclass)


def _pos_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _movie_args(p) -> None:
    p.add_argument("artifact", type=Path, help="ensemble artifact folder, e.g. models/default")
    p.add_argument("movie", type=Path, help="movie or image: .npy/.npz/.tif/.h5/.emd ([T,] H, W)")
    p.add_argument("--pixel-size-pm", type=float,
                   help="pixel size of the movie in pm (default: read from the .npz, else the "
                   "ensemble's training pixel size)")
    p.add_argument("--key", help="dataset key inside .npz/.h5/.emd files")
    p.add_argument("--truth", type=Path, help="file with true atom positions (a test movie from "
                   "`python -m trainer.data.testmovie`); default: the movie itself if it has them")


def _relabel_args(p, gmm_default: str = "tight") -> None:
    from trainer.elit.relabel import RelabelConfig

    d = RelabelConfig()
    g = p.add_argument_group("training set from the movie")
    g.add_argument("--frames", help="frames to learn from, e.g. 0:8 (default: all)")
    g.add_argument("--source", default="mean", help="'mean' of the selected members or one member id")
    g.add_argument("--patch-px", type=_pos_int, default=d.patch_px,
                   help=f"GMM patch size at the ensemble's pixel size (default {d.patch_px})")
    g.add_argument("--gmm-keep", default=gmm_default, choices=["tight", "large", "0", "1", "none"],
                   help="which GMM class is the lattice: the tighter (default), the larger, by index, "
                   "or none = no GMM filter")
    g.add_argument("--std-quantile", type=float, default=d.std_quantile,
                   help="drop atoms above this quantile of ensemble std (default 0.9; 1 = keep all)")
    g.add_argument("--std-max", type=float, help="drop atoms whose ensemble std exceeds this")
    g.add_argument("--dropped-as", choices=["auto", "ignore", "background"], default=d.dropped_as,
                   help="atoms the GMM calls 'not lattice' (after the geometry rescue): auto "
                   "(default) = background only where the place is confidently empty (vacuum: low "
                   "ensemble map and std around it, frame darker than the lattice), else ignored by "
                   "the loss; or all ignored; or all background. Uncertain atoms are always ignored")
    g.add_argument("--no-geometry-rescue", action="store_true",
                   help="do not keep GMM-dropped atoms whose bonds match the frame's lattice")
    g.add_argument("--keep-bright", type=float, default=d.keep_bright,
                   help="never let the GMM drop atoms whose local Z-contrast (peak above the local "
                   f"background over the neighbours') exceeds this (dopants; default {d.keep_bright:g}; "
                   "0 = off)")
    g.add_argument("--keep-atom-like", type=float, default=0.0,
                   help="teach GMM-dropped atoms (not vacuum) whose local Z-contrast exceeds this "
                   "as atoms (e.g. 0.6: amorphous carbon is atoms; default 0 = off: ignored)")
    g.add_argument("--heavy-threshold", type=float,
                   help="2 classes: heavy above this local Z-contrast (peak above the local "
                   "background over the neighbours' median; default 2.2)")
    g.add_argument("--no-class-vote", action="store_true",
                   help="2 classes: teach the local Z-contrast class of every atom, also where the "
                   "selected members' consensus class disagrees (default: such atoms are ignored)")
    g.add_argument("--no-teach-light", action="store_true",
                   help="2 classes: ignore every heavy call of the parent that the local "
                   "Z-contrast does not confirm (default: the frame's band pass settles it: "
                   "lattice, or heavy where the atom stands out of the frame)")
    g.add_argument("--no-not-heavy", action="store_true",
                   help="2 classes: leave the places the filter ignores fully open (default: "
                   "taught 'not heavy' unless an atom there may be heavy)")
    g.add_argument("--tile", type=_pos_int, default=d.tile_px, help="tile size in px (multiple of 8)")
    g.add_argument("--tiles-per-frame", type=_pos_int, default=d.tiles_per_frame)
    g.add_argument("--rehearsal", type=float, default=d.rehearsal,
                   help="add this many tiles of the parent's synthetic training world (exact labels) "
                   "per movie tile, so a child does not forget what its parent learnt from truth "
                   f"(default {d.rehearsal:g}: none)")
    g.add_argument("--relabel-seed", type=int, default=0)


def relabel_config(args, n_classes: int = 1):
    from trainer.elit.relabel import RelabelConfig

    q = None if args.std_quantile is None or args.std_quantile >= 1 else args.std_quantile
    return RelabelConfig(frames=args.frames, source=args.source, patch_px=args.patch_px,
                         gmm_keep=args.gmm_keep, std_quantile=q, std_max=args.std_max,
                         dropped_as=args.dropped_as, keep_bright=args.keep_bright or None,
                         geometry_rescue=not args.no_geometry_rescue,
                         keep_atom_like=args.keep_atom_like or None,
                         heavy_threshold=args.heavy_threshold, class_vote=not args.no_class_vote,
                         teach_light=not args.no_teach_light, not_heavy=not args.no_not_heavy,
                         n_classes=n_classes, tile_px=args.tile,
                         tiles_per_frame=args.tiles_per_frame, rehearsal=args.rehearsal,
                         seed=args.relabel_seed)


def _retrain_args(p) -> None:
    from trainer.elit.iterate import RetrainConfig

    d = RetrainConfig()
    g = p.add_argument_group("retraining")
    g.add_argument("--members", type=_pos_int, default=d.members, help=f"new ensemble size ({d.members})")
    g.add_argument("--epochs", type=_pos_int, default=d.epochs, help=f"maximum epochs ({d.epochs})")
    g.add_argument("--swa-epochs", type=_pos_int, default=d.swa_epochs)
    g.add_argument("--patience", type=_pos_int, default=d.patience,
                   help="early stopping: epochs without validation improvement")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--n-val", type=_pos_int, default=d.n_val, help="validation tiles")
    g.add_argument("--n-test", type=_pos_int, default=d.n_test, help="test tiles (last frames)")
    g.add_argument("--seed", type=int, default=d.seed, help="member i uses seed SEED + i")
    g.add_argument("--from-scratch", action="store_true",
                   help="random initial weights instead of the parent's best member")
    g.add_argument("--anchor", action=argparse.BooleanOptionalAction, default=d.anchor,
                   help="iterate: every child starts from the first artifact's best member, not "
                   "from the previous child's (default; less loss from iteration to iteration, "
                   "docs/elit.md runs D and 6); --no-anchor: from the previous child's")
    g.add_argument("--diverse", action=argparse.BooleanOptionalAction, default=d.diverse,
                   help="iterate: child member k starts from the k-th selected member (best "
                   "first), so the children's members differ as the parent's do (default; better "
                   "uncertainty and no F1 lost over three movies, docs/elit.md session 8); "
                   "--no-diverse: every member from the best one")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    from trainer.cli.common import executor_args
    executor_args(p)


def retrain_config(args):
    from trainer.cli.common import executor_spec
    from trainer.elit.iterate import RetrainConfig

    return RetrainConfig(executor=executor_spec(args), members=args.members, epochs=args.epochs,
                         swa_epochs=args.swa_epochs, patience=args.patience,
                         lr=args.lr, n_val=args.n_val, n_test=args.n_test, seed=args.seed,
                         from_scratch=args.from_scratch,
                         anchor=getattr(args, "anchor", RetrainConfig.anchor),
                         diverse=getattr(args, "diverse", RetrainConfig.diverse),
                         threads=args.threads)


# ----------------------------------------------------------------------------- helpers


def read_movie(args):
    """(frames [T, H, W], pixel size or None, truth or None) from the movie arguments."""
    import numpy as np

    from trainer.data.testmovie import load_truth
    from trainer.model.predict import read_frames

    frames = read_frames(args.movie, args.key)
    pixel = args.pixel_size_pm
    if pixel is None and args.movie.suffix.lower() == ".npz":
        with np.load(args.movie, allow_pickle=False) as z:
            pixel = float(z["pixel_size_pm"]) if "pixel_size_pm" in z else None
        if pixel is not None:
            print(f"pixel size from {args.movie}: {pixel:g} pm")
    if pixel is not None and not pixel > 0:
        raise ValueError(f"--pixel-size-pm must be positive, got {pixel}")
    truth = load_truth(args.truth or args.movie)
    if args.truth and truth is None:
        raise ValueError(f"{args.truth}: no truth_xy inside")
    return frames, pixel, truth


def retrain_train_config(args, cfg):
    """``elit-train train --data/--init-from``: the TrainConfig of a retraining run."""
    from trainer.model.train import dataset_config, load_dataset

    if args.data:
        synth = dataset_config(args.data)
        n = len(load_dataset(args.data).images)
        cfg = replace(cfg, data_path=str(args.data.resolve()), synth=synth,
                      n_train=n - cfg.n_val - cfg.n_test,
                      unet=replace(cfg.unet, n_classes=synth.n_classes))
        if cfg.n_train < 1:
            raise ValueError(f"{args.data}: {n} tiles, too few for --n-val {cfg.n_val} + --n-test {cfg.n_test}")
    if args.init_from:
        cfg = replace(cfg, init_from=args.init_from)
    if args.parent:
        from trainer.elit.iterate import parent_lineage

        extra = {}
        info = args.data.parent / "relabel.json" if args.data else None
        if info is not None and info.is_file():
            d = json.loads(info.read_text())
            extra = {"frames": d["frames"], "members": d["members"], "filters": d["filters"],
                     "relabel": d["config"]}
        lineage = parent_lineage(args.parent, f"retrained on {args.data or 'synthetic data'}",
                                 init_from=args.init_from, **extra)
        args.run_dir.mkdir(parents=True, exist_ok=True)
        (args.run_dir / "lineage.json").write_text(json.dumps(lineage, indent=1) + "\n")
    return cfg


# ----------------------------------------------------------------------------- commands


def cmd_analyse(args) -> None:
    from trainer.elit.experiment import analyse_movie, parse_frames, save_analysis
    from trainer.elit.report import write_report
    from trainer.elit.scoring import detection_report

    frames, pixel, truth = read_movie(args)
    idx = parse_frames(args.frames, len(frames))
    an = analyse_movie(args.artifact, frames[idx], pixel, idx)
    save_analysis(an, args.out / "analysis")
    sel = write_report(an, args.out / "report", args.threshold)
    print((args.out / "report" / "report.md").read_text())
    if truth is not None:
        print(f"against the truth (mean of all members): {_fmt_scores(detection_report(an, truth))}")
    print(f"report: {args.out / 'report'}; next:\n  elit-train relabel {args.out} --out RELABEL_DIR "
          f"--members {','.join(map(str, sel.members))}")


def cmd_relabel(args) -> None:
    from trainer.elit.experiment import load_analysis
    from trainer.elit.iterate import _parent_synth
    from trainer.elit.relabel import build_dataset, select_atoms, write_relabel
    from trainer.elit.report import score_members
    from trainer.model.artifact import read_manifest

    src = args.analysis / "analysis" if (args.analysis / "analysis").is_dir() else args.analysis
    an = load_analysis(src)
    sel = score_members(an)
    members = [int(m) for m in args.members.split(",")] if args.members else sel.members
    print(f"members {members}" + ("" if args.members else " (the scoring rule's suggestion)"))
    manifest = read_manifest(an.artifact)
    cfg = relabel_config(args, n_classes=len(manifest["classes"]))
    atoms, info = select_atoms(an, members, cfg, manifest["pixel_size_pm"])
    ds = build_dataset(an, atoms, cfg, manifest["pixel_size_pm"], manifest["atom_radius_px"],
                       _parent_synth(manifest))
    path = write_relabel(args.out, ds, atoms, info, cfg, an, members)
    print(f"{info['kept']} atoms kept, {info['dropped']} dropped by the GMM "
          f"({info['dropped_as_background']} of them as background), "
          f"{info['dropped_uncertainty']} by uncertainty; {len(ds.images)} tiles -> {path}\n"
          f"look at {args.out / 'kept_dropped.png'}; then:\n  elit-train train --run-dir RUN --data {path} "
          f"--parent {an.artifact} --init-from {an.artifact}:{sel.best if not args.members else members[0]} "
          f"--members 4 --epochs 6 --export models/NAME")


def cmd_iterate(args) -> None:
    from trainer.cli.common import command_line
    from trainer.elit.iterate import LoopConfig, run_iterations

    frames, pixel, truth = read_movie(args)
    cfg = LoopConfig(iterations=args.iterations, pixel_size_pm=pixel, operator=args.operator,
                     keep_going=args.keep_going,
                     analyse_frames=args.analyse_frames, relabel=relabel_config(args),
                     retrain=retrain_config(args))
    select = None
    if args.select:
        select = ["suggested"] if args.select == "suggested" else [int(m) for m in args.select.split(",")]
    command = _without_select(command_line(None))
    run_iterations(args.artifact, frames, args.run_dir, cfg, command, truth, select, args.best)
    rec = json.loads((args.run_dir / "recommendation.json").read_text())
    print(f"per-iteration table: {args.run_dir / 'progress.md'}\nrecommended: iteration "
          f"{rec['iteration']} ({rec['artifact']}): {rec['why']}")


def cmd_multiclass(args) -> None:
    from trainer.cli.common import command_line
    from trainer.elit.multiclass import run_multiclass

    frames, pixel, truth = read_movie(args)
    run_multiclass(args.artifact, frames, pixel, args.run_dir, relabel_config(args, n_classes=2),
                   retrain_config(args), command_line(None), truth, args.intensity_threshold)


def _without_select(command: str) -> str:
    import shlex

    words, out, skip = shlex.split(command), [], False
    for w in words:
        if skip:
            skip = False
        elif w in ("--select", "--best"):
            skip = True
        elif not w.startswith(("--select=", "--best=")):
            out.append(w)
    return " ".join(shlex.quote(w) for w in out)


def _fmt_scores(d: dict) -> str:
    auc = "–" if d.get("auroc_uncertainty") is None else f"{d['auroc_uncertainty']:.3f}"
    return (f"F1 {d['f1']:.3f} (precision {d['precision']:.3f}, recall {d['recall']:.3f}; "
            f"{d['tp']} right, {d['fp']} wrong, {d['fn']} missed), uncertainty AUROC {auc}")
