"""Which runtime and precision for one member on this CPU: the measurements behind the choice of
onnxruntime fp32 (reference) and OpenVINO bf16 (fast path). Not a test; prints a table.

    .venv/bin/python -m benchmarks.compare_runtimes            # 1 member of models/default, 512²

Variants, each its own session on the same 1-member graph (built by benchmarks.ensembles, the
real exporter), timed as median (min-max) of --repeats runs after a warm-up, a pause between
variants so that no thread pool is still spinning:

- ort-fp32     onnxruntime CPU provider, the engine's settings (what the service runs by default)
- ort-int8     onnxruntime static QDQ quantisation (per-channel int8 weights, uint8 activations,
               calibrated on 8 synthetic tiles)
- ort-fp16     onnxruntime on the graph converted to float16 (float32 in/out): meant for CUDA
- ov-fp32      OpenVINO CPU plugin, f32 inference precision
- ov-bf16      OpenVINO CPU plugin, bf16, compiled for the frame's static shape (the engine's way)
- ov-bf16-dyn  the same, compiled once for dynamic shapes

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
from elit_stream.engine import Engine, physical_cores        # noqa: E402
from elit_stream.manifest import load_artifact                # noqa: E402


def ort_session(model, threads: int):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"frame": x})[0]


def ov_request(path: Path, threads: int, precision: str, shape=None):
    import openvino
    core = openvino.Core()
    model = core.read_model(str(path))
    if shape is not None:
        model.reshape({0: list(shape)})
    compiled = core.compile_model(model, "CPU", {
        "INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"})
    req = compiled.create_infer_request()

    def run(x):
        req.infer({0: x}, share_inputs=True, share_outputs=True)
        return req.get_output_tensor(0).data
    return run


def int8_model(path: Path, out: Path) -> Path:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from trainer.synth import SynthConfig, make_dataset
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


def fp16_model(path: Path) -> bytes:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    return convert_float_to_float16(onnx.load(str(path)), keep_io_types=True).SerializeToString()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare_runtimes",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, default=ROOT / "models" / "default")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=physical_cores())
    a = ap.parse_args(argv)
    import json
    src, cfg = ensembles.source_members(a.source)
    key = json.loads((a.source / "manifest.json").read_text())["files"]["ensemble.onnx"]["sha256"]
    art_dir = ensembles.build_artifact(src, cfg, 1, ROOT / "runs" / "bench" / "artifacts", key,
                                       print)
    art = load_artifact(art_dir)
    onnx_path = art.onnx_path
    x, _ = Engine(art, device="cpu", threads=1).prepare(frame_of(a.size, art.pixel_size_pm))
    shape = x.shape
    with tempfile.TemporaryDirectory() as tmp:
        variants = {
            "ort-fp32": lambda: ort_session(str(onnx_path), a.threads),
            "ort-int8": lambda: ort_session(str(int8_model(onnx_path, Path(tmp) / "q.onnx")),
                                            a.threads),
            "ort-fp16": lambda: ort_session(fp16_model(onnx_path), a.threads),
            "ov-fp32": lambda: ov_request(onnx_path, a.threads, "f32", shape),
            "ov-bf16": lambda: ov_request(onnx_path, a.threads, "bf16", shape),
            "ov-bf16-dyn": lambda: ov_request(onnx_path, a.threads, "bf16"),
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
