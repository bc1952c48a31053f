"""``elit-train``: make synthetic data, train an ensemble, export and check artifacts.

Typical use:

    elit-train train --run-dir runs/default --members 8 --export models/default
    elit-train verify models/default
    elit-train predict models/default image.npy --pixel-size-pm 14 --out grid.png

ELIT on an experimental movie (docs/elit.md):

    elit-train analyse models/default movie.npz --pixel-size-pm 11 --out runs/elit/a0
    elit-train relabel runs/elit/a0 --out runs/elit/r0 --frames 0:8       # suggested members
    elit-train train --run-dir runs/elit/t1 --data runs/elit/r0/dataset.npz \
        --parent models/default --init-from models/default:3 --export models/elit-1
    elit-train iterate models/default movie.npz --pixel-size-pm 11 --iterations 2 --run-dir runs/elit
    elit-train multiclass models/elit-2 movie.npz --pixel-size-pm 11 --run-dir runs/elit-mc
"""
from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import fields, replace
from pathlib import Path

from trainer.cli.common import command_line, executor_args, executor_spec
from trainer.model.executor import MemberFailures

EPILOG = """\
An artifact (models/<name>/) is an ONNX graph of all members plus manifest.json and a probe;
its format is docs/artifact.md. The service (elit-stream serve) loads it."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted; `elit-train train` resumes from the last finished epoch", file=sys.stderr)
        return 130
    except (ValueError, OSError, MemberFailures) as exc:
        print(f"elit-train {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:      # ExportError, ArtifactError: expected failures with a message
        if type(exc).__name__ in ("ExportError", "ArtifactError"):
            print(f"elit-train {args.command}: error: {exc}", file=sys.stderr)
            return 1
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elit-train", description="Train ensembles of U-Nets that find atoms in STEM images "
        "(ELIT: ensemble learning + iterative training), and export them for the service.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", help="make a synthetic training set (.npz) and a preview PNG",
                       description="Simulated HAADF-STEM images with atom masks (graphene with "
                       "vacancies, holes and dopants, or square / perovskite-like lattices).")
    _synth_args(p)
    p.add_argument("--n", type=_positive_int, default=64, help="number of images (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed = same data)")
    p.add_argument("--out", type=Path, required=True, help="output .npz")
    p.add_argument("--preview", type=Path, help="also write a PNG preview grid here")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train", help="train an ensemble (multi-SWA); resumable",
                       description="Train N U-Nets on synthetic data, each with its own seed (weight "
                       "init + batch order), constant learning rate, early stopping, weight "
                       "averaging over the last epochs and BatchNorm recomputation. Re-running the "
                       "same command resumes an interrupted run.")
    p.add_argument("--run-dir", type=Path, required=True, help="where data, checkpoints and report go")
    _synth_args(p)
    _train_args(p)
    p.add_argument("--export", type=Path, metavar="ARTIFACT_DIR",
                   help="export the trained ensemble to this folder (e.g. models/default)")
    p.add_argument("--force", action="store_true", help="replace an existing artifact folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    executor_args(p)
    g = p.add_argument_group("retraining on experimental data (ELIT)")
    g.add_argument("--data", type=Path, metavar="DATASET",
                   help="train on this dataset file (e.g. from `elit-train relabel`) instead of "
                   "synthetic data; the synthetic-data options are then ignored; its last --n-test "
                   "tiles are the test set and the --n-val before them validation")
    g.add_argument("--init-from", metavar="SPEC",
                   help="start every member from these weights instead of from scratch: "
                   "ARTIFACT_DIR:MEMBER (e.g. models/default:3), RUN_DIR:MEMBER or a final.pt file; "
                   "ARTIFACT_DIR:* or RUN_DIR:* starts member K from member K")
    g.add_argument("--parent", type=Path, metavar="ARTIFACT_DIR",
                   help="the artifact this one is retrained from: recorded in the manifest lineage")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="export a trained run as an artifact (ONNX + manifest + probe)")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="artifact folder, e.g. models/my-ensemble")
    p.add_argument("--force", action="store_true", help="replace an existing artifact folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("verify", help="check an artifact: schema, checksums, probe")
    p.add_argument("artifact", type=Path)
    p.set_defaults(func=cmd_verify)

    from trainer.model import reference as ref
    p = sub.add_parser("reference", help="record the in-distribution reference of frame figures "
                       "(the service's out-of-distribution score) in an artifact's manifest",
                       description="Run the artifact over synthetic in-distribution frames of its "
                       "own recorded SynthConfig (a seed the training did not use) and write the "
                       "quantiles of its frame figures into manifest.json (ood_reference); the "
                       "ONNX graph, the probe and their checksums are unchanged. See docs/ood.md.")
    p.add_argument("artifact", type=Path)
    p.add_argument("--frames", type=_positive_int, default=ref.DEFAULT_FRAMES,
                   help=f"number of synthetic frames (default {ref.DEFAULT_FRAMES})")
    p.add_argument("--seed", type=int, default=ref.DEFAULT_SEED,
                   help=f"seed of the frames (default {ref.DEFAULT_SEED})")
    p.add_argument("--size", type=_positive_int, default=ref.DEFAULT_SIZE_PX,
                   help=f"frame size in px (default {ref.DEFAULT_SIZE_PX})")
    p.set_defaults(func=cmd_reference)

    p = sub.add_parser("evaluate", help="per-member IoU of an artifact on fresh synthetic frames")
    p.add_argument("artifact", type=Path)
    p.add_argument("--frames", type=_positive_int, default=64, help="number of test frames")
    p.add_argument("--seed", type=int, default=4242, help="seed of the test frames")
    p.add_argument("--grid", type=Path, help="write a members × frames prediction grid PNG")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="apply an artifact to image files; members × images PNG grid")
    p.add_argument("artifact", type=Path)
    p.add_argument("images", type=Path, nargs="+", help=".npy/.npz/.tif/.h5/.emd; first frame of a stack")
    p.add_argument("--pixel-size-pm", type=float, nargs="+",
                   help="pixel size of each image in pm (one value for all); omit = training scale")
    p.add_argument("--key", help="dataset key inside .npz/.h5/.emd files")
    p.add_argument("--out", type=Path, required=True, help="output PNG")
    p.set_defaults(func=cmd_predict)
    from trainer.cli.elit import add_elit_commands
    add_elit_commands(sub)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _synth_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("synthetic data")
    g.add_argument("--lattice", choices=["graphene", "square", "perovskite"], default="graphene")
    g.add_argument("--world", choices=["legacy", "physical"], default="legacy",
                   help="legacy: Gaussian atoms on --lattice (the original generator); physical: "
                        "every scene under an aberrated probe, 7-40 pm/px (docs/training-world.md)")
    g.add_argument("--classes", type=int, choices=[1, 2], default=2,
                   help="1: atoms vs background; 2: lattice atoms vs heavy impurities (default)")
    g.add_argument("--size", type=int, default=None, help="training tile size in px (multiple of 8)")
    g.add_argument("--pixel-size-pm", type=float, default=None,
                   help="pixel size at zoom 1 in pm (zoom 1-2x makes it finer)")
    g.add_argument("--set", dest="world_set", metavar="FIELD=VALUE", action="append", default=[],
                   type=_world_setting,
                   help="change one field of the synthetic world (SynthConfig, "
                        "docs/training-world.md), e.g. contamination_prob=0.8 or "
                        "dose_range=[5,50]; repeatable; recorded with the run")


def _world_setting(text: str) -> tuple[str, object]:
    name, eq, value = text.partition("=")
    try:
        parsed = ast.literal_eval(value) if eq and name else _world_setting
    except (ValueError, SyntaxError):
        parsed = _world_setting          # not a literal
    if parsed is _world_setting:
        raise argparse.ArgumentTypeError(
            f"expected FIELD=VALUE with a Python literal value (0.8, [5, 50]), got {text!r}")
    return name, tuple(parsed) if isinstance(parsed, list) else parsed


def _train_args(p: argparse.ArgumentParser) -> None:
    from trainer.model.train import TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("ensemble training")
    g.add_argument("--members", type=_positive_int, default=d.members, help=f"ensemble size (default {d.members})")
    g.add_argument("--epochs", type=_positive_int, default=d.max_epochs, help="maximum epochs per member")
    g.add_argument("--swa-epochs", type=_positive_int, default=d.swa_epochs,
                   help="epochs whose weights are averaged (SWA), ending at the best epoch")
    g.add_argument("--patience", type=_positive_int, default=d.patience,
                   help="early stopping: epochs without validation improvement")
    g.add_argument("--min-delta", type=float, default=d.min_delta,
                   help="early stopping: a relative fall of the validation loss below this is no "
                        "improvement (default 0)")
    g.add_argument("--member-budget-s", type=float, default=d.member_budget_s,
                   help="wall-clock budget per member in s: no new epoch once spent (default 0: none)")
    g.add_argument("--lr", type=float, default=d.lr, help="constant learning rate (Adam)")
    g.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    g.add_argument("--n-train", type=_positive_int, default=d.n_train, help="training images")
    g.add_argument("--n-val", type=_positive_int, default=d.n_val, help="validation images")
    g.add_argument("--n-test", type=_positive_int, default=d.n_test, help="held-out test images (IoU)")
    g.add_argument("--seed", type=int, default=d.base_seed, help="member i uses seed SEED + i")
    g.add_argument("--data-seed", type=int, default=d.data_seed)
    g.add_argument("--base-filters", type=_positive_int, default=d.unet.base_filters)
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")


def synth_config(args):
    from trainer.data.synth import SynthConfig

    cfg = SynthConfig(lattice=args.lattice, n_classes=args.classes)
    if getattr(args, "world", "legacy") == "physical":
        cfg = SynthConfig.physical(n_classes=args.classes)
    if args.size is not None:
        if args.size % 8 or args.size < 32:
            raise ValueError(f"--size must be a multiple of 8 and at least 32, got {args.size}")
        cfg = replace(cfg, size_px=args.size)
    if args.pixel_size_pm is not None:
        if not args.pixel_size_pm > 0:
            raise ValueError(f"--pixel-size-pm must be positive, got {args.pixel_size_pm}")
        cfg = replace(cfg, pixel_size_pm=args.pixel_size_pm)
    changes = dict(getattr(args, "world_set", []))
    unknown = sorted(set(changes) - {f.name for f in fields(SynthConfig)})
    if unknown:
        raise ValueError(f"--set: no such field of the synthetic world: {', '.join(unknown)} "
                         "(fields: trainer/data/config.py, SynthConfig)")
    return replace(cfg, **changes)


def train_config(args):
    from trainer.model.train import TrainConfig
    from trainer.model.unet import UNetConfig

    if not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    return TrainConfig(members=args.members, base_seed=args.seed, max_epochs=args.epochs,
                       swa_epochs=args.swa_epochs, patience=args.patience,
                       min_delta=args.min_delta, member_budget_s=args.member_budget_s, lr=args.lr,
                       batch_size=args.batch_size, n_train=args.n_train, n_val=args.n_val,
                       n_test=args.n_test, data_seed=args.data_seed, threads=args.threads,
                       synth=synth_config(args),
                       unet=UNetConfig(n_classes=args.classes, base_filters=args.base_filters))


def cmd_generate(args) -> None:
    from trainer.data.synth import make_dataset, preview_png, save_dataset

    ds = make_dataset(args.n, args.seed, synth_config(args), progress=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_dataset(ds, args.out)
    print(f"wrote {args.n} images ({ds.images.shape[-2]}×{ds.images.shape[-1]} px) to {args.out}")
    if args.preview:
        preview_png(ds, args.preview)
        print(f"preview: {args.preview}")


def cmd_train(args) -> None:
    from trainer.model.train import train_ensemble

    cfg = train_config(args)
    if args.data or args.init_from or args.parent:
        from trainer.cli.elit import retrain_train_config
        cfg = retrain_train_config(args, cfg)
    if args.export and args.export.exists() and not args.force:
        raise ValueError(f"{args.export} exists; pass --force to replace it after training")
    args.run_dir.mkdir(parents=True, exist_ok=True)
    (args.run_dir / "command.txt").write_text(command_line(None) + "\n")
    results = train_ensemble(cfg, args.run_dir, show_progress=not args.quiet,
                             executor=executor_spec(args))
    _print_iou_table(results)
    if args.export:
        _export(args.run_dir, args.export, args.force)
    elif args.data:
        print(f"export it with: elit-train export --run-dir {args.run_dir} --out models/NAME")


def cmd_export(args) -> None:
    _export(args.run_dir, args.out, args.force, also=command_line(None))


def _export(run_dir: Path, out: Path, force: bool, also: str | None = None) -> None:
    import json

    from trainer.model.export import write_artifact
    from trainer.model.train import TrainConfig, load_members, load_results

    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{run_dir}: no config.json — not a training run folder")
    cfg = TrainConfig.from_dict(json.loads(config_path.read_text()))
    command_path = run_dir / "command.txt"
    command = command_path.read_text().strip() if command_path.exists() else "unknown"
    if also:
        command = f"{command} && {also}"
    lineage_path = run_dir / "lineage.json"
    lineage = json.loads(lineage_path.read_text()) if lineage_path.is_file() else None
    manifest = write_artifact(out, load_members(run_dir, cfg), load_results(run_dir, cfg), cfg,
                              command, lineage=lineage, report_dir=run_dir / "report", force=force)
    print(f"artifact written and verified: {manifest.parent}")


def cmd_verify(args) -> None:
    from trainer.model.artifact import verify_artifact

    manifest = verify_artifact(args.artifact)
    print(f"{args.artifact}: OK — {len(manifest['members'])} members, classes "
          f"{[c['name'] for c in manifest['classes']]}, pixel size {manifest['pixel_size_pm']} pm, "
          f"simulated test IoU {manifest['test_set']['iou_mean']:.4f} ± {manifest['test_set']['iou_std']:.4f}")


def cmd_reference(args) -> None:
    import numpy as np

    from trainer.model.reference import compute_reference, write_reference

    ref = compute_reference(args.artifact, frames=args.frames, seed=args.seed, size_px=args.size,
                            command=command_line(None), log=print)
    write_reference(args.artifact, ref)
    for name, band in ref["figures"].items():
        lo, med, hi = (float(np.exp(band[k]) - band["floor"]) for k in ("low", "median", "high"))
        print(f"{name:13s} in-distribution band {lo:.4g} .. {hi:.4g} (median {med:.4g})")
    print(f"{args.artifact}: ood_reference from {args.frames} frames written and verified")


def cmd_evaluate(args) -> None:
    import numpy as np

    from trainer.data.synth import SynthConfig, make_dataset
    from trainer.model.predict import EnsembleRunner, member_grid_png

    runner = EnsembleRunner(args.artifact)
    synth = SynthConfig.from_dict(runner.manifest["training"]["synth"])
    ds = make_dataset(args.frames, args.seed, synth)
    inter = np.zeros(len(runner.manifest["members"]))
    union = np.zeros_like(inter)
    probs = []
    for image, mask in zip(ds.images[:, 0], ds.masks):
        p = runner.probs(image)
        probs.append(p)
        valid = mask != 255                       # "ignore": e.g. atoms too faint to be seen
        pred, truth = (p.sum(1) > 0.5) & valid, (mask > 0) & valid
        inter += (pred & truth).sum((1, 2))
        union += (pred | truth).sum((1, 2))
    iou = inter / np.maximum(union, 1)
    for member, value in zip(runner.manifest["members"], iou):
        print(f"member {member['id']:2d}  seed {member['seed']}  IoU {value:.4f}")
    print(f"mean ± std: {iou.mean():.4f} ± {iou.std():.4f} over {args.frames} frames (seed {args.seed})")
    if args.grid:
        k = min(6, args.frames)
        member_grid_png(list(ds.images[:k, 0]), probs[:k], runner.manifest, args.grid)
        print(f"grid: {args.grid}")


def cmd_predict(args) -> None:
    from trainer.model.predict import EnsembleRunner, member_grid_png, read_frames

    sizes = args.pixel_size_pm or [None]
    if len(sizes) not in (1, len(args.images)):
        raise ValueError("give one --pixel-size-pm for all images or one per image")
    sizes = sizes * len(args.images) if len(sizes) == 1 else sizes
    runner = EnsembleRunner(args.artifact)
    frames = [read_frames(path, args.key)[0] for path in args.images]
    probs = [runner.probs(f, s) for f, s in zip(frames, sizes)]
    member_grid_png(frames, probs, runner.manifest, args.out, [p.name for p in args.images])
    print(f"grid: {args.out}")


def _print_iou_table(results) -> None:
    import numpy as np

    print("member  seed  epochs  swa  test IoU")
    for r in results:
        print(f"{r.id:6d}  {r.seed:4d}  {r.epochs:6d}  {r.swa_epochs:3d}  {r.test_iou:.4f}")
    ious = np.array([r.test_iou for r in results])
    print(f"mean ± std test IoU: {ious.mean():.4f} ± {ious.std():.4f}")


if __name__ == "__main__":
    sys.exit(main())
