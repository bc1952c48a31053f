"""The benchmark suite (not a test): engine vs. an AtomAI-style baseline, scaling, service.

    .venv/bin/python -m benchmarks.suite                    # full run (~10 min on 2 busy cores)
    .venv/bin/python -m benchmarks.suite --smoke            # seconds: tiny U-Nets, tiny frames

Builds N-member artifacts from --source (default models/default) with the real exporter, checks
that the fp32 engine and the baseline agree (max |diff| of mean and std <= 1e-4) and that the
bf16 engine stays within BF16_ATOL of the fp32 engine before timing anything, then times, as
median and spread (min..max) over repeats after warm-up: engine (each precision) and baseline per
frame for each N, the engine at each frame size, post-processing, and the service end to end;
and scores both precisions' atoms against a synthetic movie's ground truth. Writes results.md,
results.json and PNG plots to --out (default runs/bench/<time>). Ratios are the headline: each
repeat times all sides back to back, so load drift hits them alike.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.baseline import AtomAIStyleEnsemble          # noqa: E402
from benchmarks import ensembles                              # noqa: E402
from benchmarks.service_load import SETTLE_S, ServiceBench, rss_mb   # noqa: E402
from elit_stream.tools import movie as movies                        # noqa: E402
from elit_stream.core.engine import PROBE_TOLERANCE, Engine        # noqa: E402
from elit_stream.core.artifact import load_artifact                # noqa: E402
from elit_stream.tools.movie import make_movie                      # noqa: E402
from elit_stream.core.postprocess import Params, active_maps, analyse   # noqa: E402

PARITY_ATOL = 1e-4                   # fp32 engine vs. baseline: max |diff| of mean and std maps
# bf16 engine vs. fp32 engine, max |diff| of the mean and std maps on the 512² frame: a gate
# against a broken bf16 path, not an accuracy claim (the detection comparison is that). One
# member's map moves by up to ~0.06 where it crosses 0.5 steeply; the mean of 8 by ~0.02.
BF16_ATOL = 0.1


def available_precisions() -> list[str]:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return ["fp32"]
    return ["fp32", "bf16"]


class ParityError(SystemExit):
    pass


def stats_ms(seconds: list[float]) -> dict:
    a = 1e3 * np.asarray(seconds, float)
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max()),
            "p99": float(np.percentile(a, 99)), "n": int(a.size)}


def load_now() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min) / {five:.2f} (5 min)"


def frame_of(size: int, ps: float, seed: int = 0) -> np.ndarray:
    return make_movie(n_frames=1, size_px=size, seed=seed, pixel_size_pm=ps).frames[0]


def engine_step(eng: Engine, frame: np.ndarray):
    """What the engine side does per frame to match the baseline: prepare, run, mean/std maps."""
    x, geom = eng.prepare(frame)
    probs = eng.run(x)
    return active_maps(probs, np.arange(eng.n_members), *geom.valid_shape)


def timed(fn, repeats: int, warmup: int = 1, settle_s: float = SETTLE_S) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        time.sleep(settle_s)
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def compare_maps(got: tuple, want: tuple, limit: float, what: str) -> dict:
    """Max (and 99.9th percentile) |diff| of (mean, std) maps; no timings beyond `limit`."""
    diffs = {k: np.abs(g - w) for k, g, w in zip(("mean", "std"), got, want)}
    out = {k: float(d.max()) for k, d in diffs.items()}
    if not max(out.values()) <= limit:
        raise ParityError(f"{what} disagree ({out}, limit {limit}): no timings")
    return {**out, **{f"{k}_p99.9": float(np.percentile(d, 99.9)) for k, d in diffs.items()}}


def check_parity(engine: Engine, base: AtomAIStyleEnsemble, frame: np.ndarray) -> dict:
    mean_b, var_b = base.predict(frame)
    return compare_maps(engine_step(engine, frame), (mean_b, np.sqrt(var_b)), PARITY_ATOL,
                        "engine and baseline")


def check_reduced(low: Engine, fp32: Engine, frame: np.ndarray) -> dict:
    """bf16 / fp16 are other arithmetics: bounded (BF16_ATOL on the maps), never identical."""
    return compare_maps(engine_step(low, frame), engine_step(fp32, frame), BF16_ATOL,
                        f"{low.precision} and fp32 engines")


DEVICE = {"device": "cpu"}           # --device: every engine and the service run there


def engine(art, threads, precision: str = "fp32") -> Engine:
    """An engine on --device; on cuda, a CUDA failure stops the run (no silent CPU figures)."""
    return Engine(art, device=DEVICE["device"], threads=threads, precision=precision,
                  cpu_fallback=DEVICE["device"] == "cpu")


def engines(art, threads, precisions) -> dict[str, Engine]:
    return {p: engine(art, threads, p) for p in precisions}


def members_sweep(arts: dict[int, Path], size: int, repeats: int, threads, precisions,
                  log) -> dict:
    """Engine (each precision) vs. baseline per N at size x size: agreement first, then
    interleaved repeats."""
    out = {}
    for n, path in arts.items():
        art = load_artifact(path)
        rss0 = rss_mb()["VmRSS"]
        engs = engines(art, threads, precisions)
        base = AtomAIStyleEnsemble.from_artifact(path, art.manifest)
        frame = frame_of(size, art.pixel_size_pm)
        parity = check_parity(engs["fp32"], base, frame)
        reduced = {p: check_reduced(e, engs["fp32"], frame) for p, e in engs.items()
                   if p != "fp32"}
        for eng in engs.values():
            eng.warm_up((size, size))
        t_e, t_b = {p: [] for p in engs}, []
        for _ in range(repeats):
            for p, eng in engs.items():
                t_e[p] += timed(lambda: engine_step(eng, frame), 1, warmup=0)
            t_b += timed(lambda: base.predict(frame), 1, warmup=0)
        run = {p: stats_ms(timed(lambda: eng.run(eng.prepare(frame)[0]), repeats, warmup=0))
               for p, eng in engs.items()}
        ratios = {p: np.asarray(t_b) / np.asarray(t) for p, t in t_e.items()}
        out[n] = {"engine": {p: stats_ms(t) for p, t in t_e.items()}, "baseline": stats_ms(t_b),
                  "engine_run": run,
                  "ratio": {p: {"median": float(np.median(r)), "min": float(r.min()),
                                "max": float(r.max())} for p, r in ratios.items()},
                  "parity": parity, "vs_fp32": reduced,
                  "rss_engines_mb": rss_mb()["VmRSS"] - rss0, "load": load_now()}
        log(f"N={n:2d} {size}px: " + ", ".join(
            f"engine {p} {out[n]['engine'][p]['median']:7.1f} ms (x{out[n]['ratio'][p]['median']:.2f})"
            for p in engs) + f", baseline {out[n]['baseline']['median']:8.1f} ms (parity "
            f"{max(parity.values()):.1e}" + "".join(f", {p} {v['mean']:.1e}/{v['std']:.1e}"
                                                    for p, v in reduced.items())
            + f"; load {load_now()})")
        del engs, base
    return out


def sizes_sweep(path: Path, sizes: list[int], repeats: int, threads, precisions, log) -> dict:
    art = load_artifact(path)
    engs = engines(art, threads, precisions)
    out = {}
    for size in sizes:
        frame = frame_of(size, art.pixel_size_pm)
        out[size] = {"engine": {p: stats_ms(timed(lambda: engine_step(eng, frame), repeats))
                                for p, eng in engs.items()}, "load": load_now()}
        log(f"N={art.n_members} {size}px: " + ", ".join(
            f"engine {p} {out[size]['engine'][p]['median']:8.1f} ms" for p in engs))
    return out


def detection_accuracy(path: Path, size: int, n_frames: int, threads, precisions) -> dict:
    """Atoms of each precision against a synthetic movie's ground truth (precision, recall, F1
    on the frame interior, match radius half a C-C bond), and bf16's atoms against fp32's."""
    art = load_artifact(path)
    mov = make_movie(n_frames=n_frames, size_px=size, seed=11, pixel_size_pm=art.pixel_size_pm)
    radius = 0.5 * movies.CC_BOND_PM / mov.pixel_size_pm
    act, params = np.arange(art.n_members), Params()
    out, atoms = {}, {}
    for p, eng in engines(art, threads, precisions).items():
        tp = fp = fn = 0
        atoms[p] = []
        for frame, truth in zip(mov.frames, mov.xy):
            x, geom = eng.prepare(frame, mov.pixel_size_pm)
            fa = analyse(eng.run(x), act, params, geom.valid_shape)
            xy = np.column_stack(geom.to_frame_xy(fa.x, fa.y))
            atoms[p].append((xy, fa.uncertainty))
            keep_p = movies.interior(xy, frame.shape, 2 * radius)
            keep_t = movies.interior(truth, frame.shape, 2 * radius)
            t, f, n = movies.match_atoms(xy[keep_p], np.asarray(truth)[keep_t], radius)
            tp, fp, fn = tp + t, fp + f, fn + n
        prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
        out[p] = {"precision": prec, "recall": rec, "f1": 2 * prec * rec / max(prec + rec, 1e-12),
                  "tp": tp, "fp": fp, "fn": fn}
    out["vs_fp32"] = {p: _atom_agreement(atoms["fp32"], a) for p, a in atoms.items()
                      if p != "fp32"}
    out.update(frames=n_frames, size=size, members=art.n_members, radius_px=radius)
    return out


def _atom_agreement(ref: list, other: list, max_px: float = 1.0) -> dict:
    """Atoms of `other` matched one to one to `ref` within max_px (movie.match_pairs): counts,
    shifts, uncertainty."""
    n_ref = n_other = matched = 0
    shift, d_unc = [], []
    for (xy_a, u_a), (xy_b, u_b) in zip(ref, other):
        n_ref, n_other = n_ref + len(xy_a), n_other + len(xy_b)
        r, c, d = movies.match_pairs(xy_a, xy_b, max_px)
        matched += len(r)
        shift += d.tolist()
        d_unc += np.abs(u_a[r] - u_b[c]).tolist()
    return {"atoms_fp32": n_ref, "atoms": n_other, "matched": matched,
            "shift_px_p99": float(np.percentile(shift, 99)) if shift else 0.0,
            "shift_px_max": float(max(shift, default=0.0)),
            "uncertainty_abs_diff_median": float(np.median(d_unc)) if d_unc else 0.0,
            "uncertainty_abs_diff_p99": float(np.percentile(d_unc, 99)) if d_unc else 0.0}


def postprocess_times(path: Path, size: int, repeats: int, threads) -> dict:
    """prepare and analyse (consensus, uncertainty, atoms) on the engine's real output."""
    art = load_artifact(path)
    eng = engine(art, threads)
    frame = frame_of(size, art.pixel_size_pm)
    x, geom = eng.prepare(frame)
    probs = eng.run(x)
    act, p, vs = np.arange(art.n_members), Params(), geom.valid_shape
    n = 3 * repeats
    return {"prepare": stats_ms(timed(lambda: eng.prepare(frame), n, settle_s=0)),
            "analyse": stats_ms(timed(lambda: analyse(probs, act, p, vs), n, settle_s=0)),
            "analyse+maps": stats_ms(timed(lambda: analyse(probs, act, p, vs, want_maps=True), n,
                                           settle_s=0)),
            "n_atoms": analyse(probs, act, p, vs).n_atoms, "members": art.n_members,
            "size": size, "load": load_now()}


def service_figures(path: Path, size: int, n_frames: int, threads, log,
                    precision: str = "fp32") -> dict:
    art = load_artifact(path)
    ps = art.pixel_size_pm
    frames = make_movie(n_frames=n_frames, size_px=size, seed=1, pixel_size_pm=ps).frames
    eng = engine(art, threads, precision)
    eng.warm_up((size, size))
    with ServiceBench(path, threads, device=DEVICE["device"], precision=precision) as sb:
        served, local = sb.closed_loop(frames, ps, eng)
        interval = 1.5 * float(np.median(local))
        fixed, got_f, sent_f, _ = sb.open_loop(frames, ps, interval, "bench-fixed")
        flood, got, sent, wall = sb.open_loop(frames, ps, 0.0, "bench-flood")
        mem = rss_mb(sb.pid)
    overhead = float(np.median(served) / np.median(local) - 1)
    out = {"closed_loop": stats_ms(served), "in_process": stats_ms(local),
           "overhead": overhead, "fixed_rate_hz": 1 / interval, "fixed": stats_ms(fixed),
           "fixed_received": f"{got_f}/{sent_f}", "flood": stats_ms(flood),
           "flood_received": f"{got}/{sent}", "sustained_fps": got / wall, "service_rss_mb": mem,
           "members": art.n_members, "size": size, "precision": precision, "load": load_now()}
    log(f"service {precision} N={art.n_members} {size}px: round trip p50 {out['closed_loop']['median']:.1f} ms"
        f" vs in-process {out['in_process']['median']:.1f} ms (overhead {100 * overhead:+.1f} %),"
        f" lossless flood {got}/{sent} at {out['sustained_fps']:.2f} frames/s")
    return out


def roofline(path: Path, size: int, members: dict, precisions: list[str],
             gemm_n: int = 4096) -> dict:
    """What the hardware allows: convolution GFLOP per member and frame (PyTorch's FLOP counter on
    the artifact's U-Net), this machine's best dense GEMM rate per precision (torch matmul of
    gemm_n² matrices, best of 5), the floor per member (GFLOP / rate), and what the engine reached
    at the largest N of the member sweep."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from trainer.model.unet import UNet, UNetConfig
    arch = load_artifact(path).manifest["model"]["architecture"]
    net = UNet(UNetConfig.from_dict({k: v for k, v in arch.items() if k != "type"})).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(torch.zeros(1, 1, size, size))
    gflop = fc.get_total_flops() / 1e9
    rates = {}
    for p, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if p not in precisions:
            continue
        a = torch.rand(gemm_n, gemm_n).to(dtype)
        a @ a
        best = min(timed(lambda: a @ a, 5, warmup=1, settle_s=0))
        rates[p] = 2 * gemm_n ** 3 / best / 1e9
    out = {"size": size, "gflop_per_member": gflop, "gemm_gflops": rates,
           "floor_ms_per_member": {p: 1e3 * gflop / r for p, r in rates.items()}}
    if members:
        n = max(members, key=int)
        out["n"] = int(n)
        out["engine_gflops"] = {p: int(n) * gflop / (members[n]["engine_run"][p]["median"] / 1e3)
                                for p in precisions}
        out["baseline_gflops"] = int(n) * gflop / (members[n]["baseline"]["median"] / 1e3)
        out["best_ratio_at_floor"] = {
            p: members[n]["baseline"]["median"] / (int(n) * out["floor_ms_per_member"][p])
            for p in rates}
    return out


# --- report -------------------------------------------------------------------------------------

def _fmt(st: dict) -> str:
    return f"{st['median']:.1f} ({st['min']:.1f}–{st['max']:.1f})"


def slopes(members: dict, sizes: dict, precisions: list[str]) -> dict:
    """Per precision: ms per member and fixed ms (linear fit over N), and the exponent of
    latency vs. pixels (log-log fit over frame sizes; 1 = linear)."""
    out = {}
    for p in precisions:
        if len(members) >= 2:
            n = np.array(sorted(members), float)
            t = np.array([members[k]["engine"][p]["median"] for k in sorted(members)])
            out[f"{p}_ms_per_member"], out[f"{p}_ms_fixed"] = map(float, np.polyfit(n, t, 1))
        if len(sizes) >= 2:
            px = np.array(sorted(sizes), float) ** 2
            t = np.array([sizes[k]["engine"][p]["median"] for k in sorted(sizes)])
            out[f"{p}_pixel_exponent"] = float(np.polyfit(np.log(px), np.log(t), 1)[0])
    return out


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# Benchmark results ({res['created']})", "",
             f"Command: `{res['command']}`  ", f"Machine: {m['cpu']}, {m['cpus']} logical CPUs, "
             f"onnxruntime {m['onnxruntime']}, OpenVINO {m.get('openvino', 'not installed')}, "
             f"torch {m['torch']} ({m['torch_threads']} threads); engine threads "
             f"{m['engine_threads']}; bf16 computed as: {m.get('bf16_runs_as', '-')}  ",
             f"Load average: {res['load_start']} at start, {res['load_end']} at end  ",
             f"Source: {res['source']}", ""]
    precs = res["precisions"]
    if res["members"]:
        size = res["members_size"]
        lines += [f"## Engine vs. AtomAI-style baseline, {size}×{size}, per frame "
                  "(ms: median (min–max))", "",
                  "fp32 = onnxruntime, identical to the baseline (parity: max |diff| of the mean "
                  f"and std maps ≤ {PARITY_ATOL:g}); bf16 = OpenVINO, fp16 = onnxruntime on a "
                  "float16 graph: their max |diff| from fp32 of the mean / std maps, and the "
                  "99.9th percentile of the mean's (gate "
                  f"{BF16_ATOL:g}; what it does to the atoms: the detection table below).", "",
                  "| members | " + " | ".join(f"engine {p}" for p in precs) + " | baseline | "
                  + " | ".join(f"ratio baseline/engine {p}" for p in precs) + " | parity fp32 | "
                  + "".join(f"{p} vs fp32 | " for p in precs[1:]) + "RSS MiB (engines) | load |",
                  "|---:|" + "---:|" * (3 * len(precs) + 2) + "---|"]
        for n, r in sorted(res["members"].items(), key=lambda kv: int(kv[0])):
            cells = [_fmt(r["engine"][p]) for p in precs] + [_fmt(r["baseline"])]
            cells += [f"**{q['median']:.2f}×** ({q['min']:.2f}–{q['max']:.2f})"
                      for q in (r["ratio"][p] for p in precs)]
            cells.append(f"{max(r['parity'].values()):.1e}")
            cells += [f"{v['mean']:.1e} / {v['std']:.1e} (p99.9 {v['mean_p99.9']:.1e})"
                      for v in (r["vs_fp32"][p] for p in precs[1:])]
            cells += [f"{r['rss_engines_mb']:.0f}", r["load"]]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    if res["sizes"]:
        lines += ["## Engine vs. frame size (ms)", "",
                  "| size | " + " | ".join(f"engine {p}" for p in precs) + " | load |",
                  "|---:|" + "---:|" * len(precs) + "---|"]
        lines += [f"| {sz} | " + " | ".join(_fmt(r["engine"][p]) for p in precs)
                  + f" | {r['load']} |"
                  for sz, r in sorted(res["sizes"].items(), key=lambda kv: int(kv[0]))]
        lines.append("")
    if res["slopes"]:
        lines += ["Slopes: " + ", ".join(f"{k} {v:.3g}" for k, v in res["slopes"].items()), ""]
    if res["roofline"]:
        r = res["roofline"]
        lines += [f"## What the hardware allows ({r['size']}², {r['gflop_per_member']:.1f} GFLOP of "
                  "convolution per member and frame)", "",
                  "| precision | best GEMM rate, GFLOP/s | floor, ms per member | engine reaches, "
                  "GFLOP/s | baseline/engine at the floor |", "|---|---:|---:|---:|---:|"]
        for p in res["precisions"]:
            if p in r["gemm_gflops"]:
                lines.append(f"| {p} | {r['gemm_gflops'][p]:.0f} | "
                             f"{r['floor_ms_per_member'][p]:.1f} | "
                             f"{r.get('engine_gflops', {}).get(p, float('nan')):.0f} | "
                             f"{r.get('best_ratio_at_floor', {}).get(p, float('nan')):.2f}× |")
        if "baseline_gflops" in r:
            lines.append(f"\nBaseline (PyTorch eager, fp32) at N = {r['n']}: "
                         f"{r['baseline_gflops']:.0f} GFLOP/s.")
        lines.append("")
    if res["accuracy"]:
        a = res["accuracy"]
        lines += [f"## Detection on a synthetic movie ({a['frames']} frames, {a['size']}², "
                  f"{a['members']} members; interior, match radius {a['radius_px']:.1f} px)", "",
                  "| precision | detection precision | recall | F1 | tp | fp | fn |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {p} | {a[p]['precision']:.4f} | {a[p]['recall']:.4f} | {a[p]['f1']:.4f} "
                  f"| {a[p]['tp']} | {a[p]['fp']} | {a[p]['fn']} |" for p in precs]
        for prec, g in a["vs_fp32"].items():
            lines += ["", f"{prec} vs fp32 atoms (all, one-to-one within 1 px): {g['atoms_fp32']} "
                      f"fp32, {g['atoms']} {prec}, {g['matched']} matched; shift p99 "
                      f"{g['shift_px_p99']:.3f} px, max {g['shift_px_max']:.3f} px; |Δ uncertainty|"
                      f" median {g['uncertainty_abs_diff_median']:.1e}, p99 "
                      f"{g['uncertainty_abs_diff_p99']:.1e}."]
        lines.append("")
    if res["postprocess"]:
        p = res["postprocess"]
        lines += [f"## Post-processing, {p['size']}², {p['members']} members, {p['n_atoms']} atoms "
                  f"(ms)", "", f"prepare {_fmt(p['prepare'])}; analyse {_fmt(p['analyse'])}; "
                  f"analyse + mean/std maps {_fmt(p['analyse+maps'])}", ""]
    for prec, s in (res["service"] or {}).items():
        lines += [f"## Service end to end, {prec}, {s['size']}², {s['members']} members (ms)", "",
                  "| mode | p50 | p99 | min–max | frames |", "|---|---:|---:|---|---|",
                  f"| in-process pipeline (prepare+run+analyse) | {s['in_process']['median']:.1f} "
                  f"| {s['in_process']['p99']:.1f} | {s['in_process']['min']:.1f}–"
                  f"{s['in_process']['max']:.1f} | |",
                  f"| closed loop (one in flight) | {s['closed_loop']['median']:.1f} | "
                  f"{s['closed_loop']['p99']:.1f} | {s['closed_loop']['min']:.1f}–"
                  f"{s['closed_loop']['max']:.1f} | |",
                  f"| fixed rate {s['fixed_rate_hz']:.2f} Hz | {s['fixed']['median']:.1f} | "
                  f"{s['fixed']['p99']:.1f} | {s['fixed']['min']:.1f}–{s['fixed']['max']:.1f} | "
                  f"{s['fixed_received']} |",
                  f"| max rate (lossless flood) | {s['flood']['median']:.1f} | "
                  f"{s['flood']['p99']:.1f} | {s['flood']['min']:.1f}–{s['flood']['max']:.1f} | "
                  f"{s['flood_received']} |", "",
                  f"Service overhead vs. bare engine pipeline (closed-loop p50 / in-process p50 − "
                  f"1): **{100 * s['overhead']:+.1f} %**. Sustained (lossless flood): "
                  f"{s['sustained_fps']:.2f} frames/s. Service RSS {s['service_rss_mb']['VmRSS']:.0f}"
                  f" MiB (peak {s['service_rss_mb']['VmHWM']:.0f}). Load {s['load']}.", ""]
    if m["device"] == "cpu":
        lines += ["GPU: not measured in this run (CPU only).", ""]
    return "\n".join(lines)


def plots(res: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    label = {"fp32": "engine fp32 (onnxruntime)", "bf16": "engine bf16 (OpenVINO)",
             "fp16": "engine fp16 (onnxruntime)"}

    def series(ax, xs, rows):
        for name, get in rows:
            med = np.array([get(x)["median"] for x in xs])
            lo = med - [get(x)["min"] for x in xs]
            hi = np.array([get(x)["max"] for x in xs]) - med
            ax.errorbar([int(x) for x in xs], med, yerr=[lo, hi], marker="o", capsize=3,
                        label=name)

    if res["members"]:
        ns = sorted(res["members"], key=int)
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        rows = [(label[p], lambda n, p=p: res["members"][n]["engine"][p])
                for p in res["precisions"]]
        series(ax, ns, rows + [("AtomAI-style (PyTorch)", lambda n: res["members"][n]["baseline"])])
        ax.set(xlabel="members", ylabel="ms per frame",
               title=f"latency vs. members, {res['members_size']} px")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "latency_vs_members.png", dpi=120)
        plt.close(fig)
    if res["sizes"]:
        ss = sorted(res["sizes"], key=int)
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for p in res["precisions"]:
            ax.loglog([int(s) ** 2 for s in ss],
                      [res["sizes"][s]["engine"][p]["median"] for s in ss], marker="o",
                      label=label[p])
        ax.set(xlabel="pixels per frame", ylabel="ms per frame", title="engine latency vs. size")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "latency_vs_size.png", dpi=120)
        plt.close(fig)


# --- command ------------------------------------------------------------------------------------

SMOKE = {"members": [1, 2], "sizes": [32, 64], "members_size": 64, "repeats": 2,
         "service_frames": 4}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.suite",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, default=ROOT / "models" / "default",
                    help="artifact whose members are repeated to build the N-member artifacts")
    ap.add_argument("--out", type=Path, help="results folder (default runs/bench/<time>)")
    ap.add_argument("--members", default="1,4,8,20", help="N values (comma-separated)")
    ap.add_argument("--sizes", default="256,512,1024", help="frame sizes at --size-members")
    ap.add_argument("--size-members", type=int, default=8)
    ap.add_argument("--members-size", type=int, default=512, help="frame size of the N sweep")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--service-frames", type=int, default=12)
    ap.add_argument("--threads", type=int, help="engine intra-op threads (default: engine's)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where the engine and the service run (cuda: onnxruntime-gpu; fp32 and "
                         "fp16 then; a CUDA failure stops the run)")
    ap.add_argument("--precisions", default=",".join(available_precisions()),
                    help="engine precisions to time: fp32 (onnxruntime) and/or bf16 (OpenVINO; "
                         "default when installed)")
    ap.add_argument("--accuracy-frames", type=int, default=8,
                    help="movie frames for the detection comparison of the precisions")
    ap.add_argument("--skip", default="",
                    help="comma list of: members,sizes,accuracy,post,service,roofline")
    ap.add_argument("--smoke", action="store_true", help="tiny U-Nets and frames (seconds)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    a = parse(argv)
    ints = lambda s: [int(v) for v in s.split(",") if v]          # noqa: E731
    members, sizes = ints(a.members), ints(a.sizes)
    msize, repeats, nsvc, size_n = a.members_size, a.repeats, a.service_frames, a.size_members
    if a.smoke:
        members, sizes, msize = SMOKE["members"], SMOKE["sizes"], SMOKE["members_size"]
        repeats, nsvc, size_n = SMOKE["repeats"], SMOKE["service_frames"], 2
        a.accuracy_frames = 2
    precisions = [p for p in a.precisions.split(",") if p]
    if "fp32" not in precisions or not set(precisions) <= {"fp32", "bf16", "fp16"}:
        raise SystemExit(f"--precisions {a.precisions}: fp32 (the reference) plus optionally "
                         "bf16 (CPU) and fp16 (meant for cuda)")
    DEVICE["device"] = a.device
    skip = set(a.skip.split(",")) - {""}
    out = a.out or ROOT / "runs" / "bench" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)                        # noqa: E731
    res = {"created": dt.datetime.now().isoformat(timespec="seconds"),
           "command": " ".join(["python -m benchmarks.suite", *(argv or sys.argv[1:])]),
           "load_start": load_now(), "members": {}, "sizes": {}, "postprocess": None,
           "accuracy": None, "service": {}, "members_size": msize, "precisions": precisions,
           "roofline": None}
    if a.smoke:
        src, cfg = ensembles.tiny_members(2)
        res["source"], key, cache = "random tiny U-Nets (smoke)", "smoke", out / "artifacts"
    else:
        src, cfg = ensembles.source_members(a.source)
        res["source"] = str(a.source)
        key = json.loads((a.source / "manifest.json").read_text())["files"]["ensemble.onnx"]
        key, cache = key["sha256"], ROOT / "runs" / "bench" / "artifacts"
    arts = {n: ensembles.build_artifact(src, cfg, n, cache, key, log)
            for n in sorted(set(members) | {size_n})}
    res["machine"] = machine(arts[size_n], a.threads, precisions)
    if "members" not in skip:
        res["members"] = members_sweep({n: arts[n] for n in members}, msize, repeats, a.threads,
                                       precisions, log)
    if "sizes" not in skip:
        res["sizes"] = sizes_sweep(arts[size_n], sizes, repeats, a.threads, precisions, log)
    if "accuracy" not in skip:
        res["accuracy"] = detection_accuracy(arts[size_n], msize, a.accuracy_frames, a.threads,
                                             precisions)
    if "post" not in skip:
        res["postprocess"] = postprocess_times(arts[size_n], msize, repeats, a.threads)
    if "service" not in skip:
        res["service"] = {p: service_figures(arts[size_n], msize, nsvc, a.threads, log, p)
                          for p in precisions}
    res["slopes"] = slopes(res["members"], res["sizes"], precisions)
    if "roofline" not in skip:
        res["roofline"] = roofline(arts[size_n], msize, res["members"], precisions,
                                   1024 if a.smoke else 4096)
    res["load_end"] = load_now()
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    text = markdown(res)
    (out / "results.md").write_text(text)
    plots(res, out)
    print("\n" + text)
    print(f"written to {out}")
    return res


def machine(path: Path, threads, precisions) -> dict:
    import onnxruntime
    import torch
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    eng = engine(load_artifact(path), threads)
    out = {"device": DEVICE["device"], "provider": eng.provider, "cpu": cpu, "cpus": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "engine_threads": eng.threads, "python": platform.python_version()}
    if "bf16" in precisions:
        import openvino
        out["openvino"] = openvino.__version__
        out["bf16_runs_as"] = engine(load_artifact(path), threads, "bf16").precision
    return out


if __name__ == "__main__":
    main()
