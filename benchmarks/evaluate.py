"""The evaluation suite (not a test): the artifact on independent physics-based cases with truth.

    .venv/bin/python -m benchmarks.evaluate                        # models/default, full (~minutes)
    .venv/bin/python -m benchmarks.evaluate --quick --out /tmp/ev  # a few frames per case

Makes the cases with the suite's own image model (benchmarks/evaluation, never the trainer's),
runs the artifact through the service's engine and post-processing in-process, scores detection,
impurity class, localisation, uncertainty, class confidence and the OOD flag per case and
segment against the truth and against a tuned classical peak finder, prints the table and writes
results.md, results.json, movie.npz (the drift movie, reusable; format in
benchmarks/evaluation/movie.py) and one PNG per case and segment to --out. docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.evaluation import movie, report, suite
from elit_stream.core.postprocess import Params


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default runs/evaluation/<time>)")
    ap.add_argument("--quick", action="store_true", help="a few frames per case (CI smoke test)")
    ap.add_argument("--seed", type=int, default=suite.DEFAULT_SEED)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime threads")
    ap.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                    help="a post-processing parameter other than the default, e.g. "
                         "heavy_contrast=3.2 (repeatable)")
    args = ap.parse_args(argv)
    out = args.out or ROOT / "runs" / "evaluation" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    command = "python -m benchmarks.evaluate " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    params = {}
    for item in args.param:
        name, _, value = item.partition("=")
        try:
            params[name] = int(value) if value.isdigit() else float(value)
            Params().replace(**params)
        except ValueError as exc:
            ap.error(f"--param {item}: {exc}")
    result = suite.run(args.model, args.seed, args.quick, args.threads, params=params)
    out.mkdir(parents=True, exist_ok=True)
    movie.save_movie(out / "movie.npz", result["movie"], args.seed)
    report.write(result, out, command.strip())
    print(report.text_table(result))
    print(f"\n{len(result['frames'])} frames in {result['seconds']:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
