"""Which runtime and precision for one member on this CPU: the measurements behind the choice of
onnxruntime fp32 (reference) and OpenVINO bf16 (fast path). Not a test; prints a table.

    .venv/bin/python -m benchmarks.compare_runtimes            # 1 member of models/default, 512²

Variants, each its own session on the same 1-member graph (built by benchmarks.ensembles, the
real exporter), timed as median (min-max) of --repeats runs after a warm-up, a pause between
variants so that no thread pool is still spinning:

- ort-fp32     onnxruntime CPU provider, the engine's session options (the service's default)
- ort-int8     onnxruntime static QDQ quantisation (per-channel int8 weights, uint8 activations,
               calibrated on 8 synthetic tiles)
- ort-fp16     onnxruntime on the engine's float16 copy of the graph (float32 in/out): for CUDA
- ov-fp32      the engine's OpenVINO runner with f32 inference precision
- ov-bf16      the engine's OpenVINO runner, bf16 (compiled for the frame's static shape)
- ov-bf16-dyn  the same settings, compiled once for dynamic shapes

For each: max |diff| of the atom map from ort-fp32 on the timed frame.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import ensembles                              # noqa: E402
from benchmarks.suite import frame_of                         # noqa: E402
from elit_stream.core import engine as eng                          # noqa: E402
from elit_stream.core.artifact import load_artifact                # noqa: E402


def ort_session(path: Path, threads: int, graph: bytes | None = None):
    """A session with the engine's options on `path` (or on `graph`, derived from it)."""
    sess = eng._create(path, eng._session_options(threads, False), [eng.CPU], graph)
    return lambda x: sess.run(None, {"frame": x})[0]


def ov_dynamic(path: Path, threads: int):
    """The engine's OpenVINO settings, but one compile for dynamic shapes."""
    runner = eng._OpenVinoRunner(path, threads)
    compiled = runner._core.compile_model(runner._model, "CPU", runner._config)
    req = compiled.create_infer_request()

    def run(x):
        req.infer({0: x}, share_inputs=True, share_outputs=True)
        return req.get_output_tensor(0).data
    return run


def int8_model(path: Path, out: Path) -> Path:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from trainer.data.synth import SynthConfig, make_dataset
    tiles = make_dataset(8, 777, SynthConfig.from_dict({**SynthConfig().to_dict(),
                                                        "size_px": 256})).images

    class Tiles(CalibrationDataReader):
        def __init__(self):
            self.it = iter({"frame": t.reshape(1, 1, *t.shape[-2:]).astype(np.float32)}
                           for t in tiles)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(path), str(out), Tiles(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare_runtimes",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, default=ROOT / "models" / "default")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=eng.physical_cores())
    a = ap.parse_args(argv)
    import json
    src, cfg = ensembles.source_members(a.source)
    key = json.loads((a.source / "manifest.json").read_text())["files"]["ensemble.onnx"]["sha256"]
    art_dir = ensembles.build_artifact(src, cfg, 1, ROOT / "runs" / "bench" / "artifacts", key,
                                       print)
    art = load_artifact(art_dir)
    onnx_path = art.onnx_path
    x, _ = eng.Engine(art, device="cpu", threads=1).prepare(frame_of(a.size, art.pixel_size_pm))
    with tempfile.TemporaryDirectory() as tmp:
        variants = {
            "ort-fp32": lambda: ort_session(onnx_path, a.threads),
            "ort-int8": lambda: ort_session(int8_model(onnx_path, Path(tmp) / "q.onnx"),
                                            a.threads),
            "ort-fp16": lambda: ort_session(onnx_path, a.threads, eng._float16_graph(onnx_path)),
            "ov-fp32": lambda: eng._OpenVinoRunner(onnx_path, a.threads, "f32").run,
            "ov-bf16": lambda: eng._OpenVinoRunner(onnx_path, a.threads, "bf16").run,
            "ov-bf16-dyn": lambda: ov_dynamic(onnx_path, a.threads),
        }
        ref, rows = None, {}
        for name, make in variants.items():
            run = make()
            out = np.array(run(x))
            run(x)
            ts = []
            for _ in range(a.repeats):
                time.sleep(0.3)
                t0 = time.perf_counter()
                run(x)
                ts.append(1e3 * (time.perf_counter() - t0))
            atom = out.sum(axis=1)
            ref = atom if ref is None else ref
            rows[name] = {"median": float(np.median(ts)), "min": min(ts), "max": max(ts),
                          "diff": float(np.abs(atom - ref).max())}
            print(f"{name:12s} {rows[name]['median']:7.1f} ms ({rows[name]['min']:.1f}–"
                  f"{rows[name]['max']:.1f})  max |atom map - ort-fp32| {rows[name]['diff']:.1e}",
                  flush=True)
    base = rows["ort-fp32"]["median"]
    print(f"\n1 member, {a.size}², {a.threads} threads, {a.repeats} repeats\n")
    print("| variant | ms (median, min–max) | vs ort-fp32 | max abs diff of the atom map |")
    print("|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['median']:.1f} ({r['min']:.1f}–{r['max']:.1f}) | "
              f"{base / r['median']:.2f}× | {r['diff']:.1e} |")
    return rows


if __name__ == "__main__":
    main()
