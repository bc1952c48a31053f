"""`elit-stream batch`: re-analyse recorded movies offline, here or on a Ray cluster
(tools/batch.py does the work; docs/cluster.md)."""
from __future__ import annotations

from pathlib import Path

from elit_stream.tools.cli_common import FAST_SCAN_HELP, CliError, fast_scan_arg


def add_parser(sub) -> None:
    b = sub.add_parser("batch", help="re-analyse recorded movies offline (here or on a Ray "
                       "cluster): one replay --record file per movie + a summary",
                       description="Analyse every frame of each MOVIE with the service's engine "
                       "and post-processing, without a service: OUT/<movie>.jsonl in the "
                       "`replay --record` format, OUT/summary.md, summary.json and "
                       "disagreement.png. Formats as for replay. docs/cluster.md.")
    b.add_argument("movies", metavar="MOVIE", nargs="+", help="stacks to analyse")
    b.add_argument("--model", metavar="DIR",
                   help="artifact folder (default $ELIT_MODEL, else models/default)")
    b.add_argument("--out", metavar="DIR", required=True, help="output folder")
    b.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: this process (default); ray: chunks of frames as Ray tasks, the "
                   "model loaded once per worker (pip install 'elit-stream[cluster]')")
    b.add_argument("--address", metavar="ADDR", help="Ray cluster (auto, ray://HEAD:10001); "
                   "default: start a local Ray")
    b.add_argument("--workers", type=int, metavar="N", help="Ray workers (default: one per CPU)")
    b.add_argument("--threads", type=int, metavar="N",
                   help="engine threads per worker (default: all cores locally, 1 per Ray worker)")
    b.add_argument("--chunk", type=int, default=32, metavar="FRAMES",
                   help="frames per task (default 32)")
    b.add_argument("--pixel-size-pm", type=float, metavar="PM", help="overrides the files'")
    b.add_argument("--fast-scan", type=fast_scan_arg, default="x", metavar="DIRECTION",
                   help=FAST_SCAN_HELP)
    b.add_argument("--dataset", metavar="KEY", help="HDF5 dataset (default: the first 2-D/3-D one)")
    b.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    b.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_batch)


def cmd_batch(args) -> int:
    from elit_stream.core.engine import EngineError
    from elit_stream.core.manifest import ArtifactError, default_artifact_path
    from elit_stream.tools.batch import BatchConfig, BatchError, run_batch

    if args.chunk < 1 or (args.workers is not None and args.workers < 1):
        raise CliError("--chunk and --workers must be positive")
    if args.address and args.executor != "ray":
        raise CliError("--address needs --executor ray")
    model = Path(args.model) if args.model else default_artifact_path()
    cfg = BatchConfig(model=model, out=Path(args.out), executor=args.executor,
                      address=args.address, workers=args.workers, threads=args.threads,
                      chunk_frames=args.chunk, pixel_size_pm=args.pixel_size_pm,
                      fast_scan=args.fast_scan,
                      dataset=args.dataset, device=args.device, precision=args.precision)
    try:
        rows = run_batch(args.movies, cfg, show_progress=not args.quiet)
    except (BatchError, ArtifactError, EngineError) as exc:
        raise CliError(str(exc)) from None
    print((Path(args.out) / "summary.md").read_text(), end="")
    print(f"records and summary in {args.out}")
    return 0 if all(r["error"] is None and r["rejected"] == r["unanswered"] == 0 for r in rows) else 1
