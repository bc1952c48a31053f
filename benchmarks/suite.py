"""The benchmark suite (not a test): engine vs. an AtomAI-style baseline, scaling, service.

    .venv/bin/python -m benchmarks.suite                    # full run (~10 min on 2 busy cores)
    .venv/bin/python -m benchmarks.suite --smoke            # seconds: tiny U-Nets, tiny frames

Builds N-member artifacts from --source (default models/default) with the real exporter, checks
that the engine and the baseline agree (max |diff| of mean and std <= 1e-4) before timing
anything, then times, as median and spread (min..max) over repeats after warm-up: engine and
baseline per frame for each N, the engine at each frame size, post-processing, and the service
end to end. Writes results.md, results.json and PNG plots to --out (default runs/bench/<time>).
Ratios are the headline: each repeat times both sides back to back, so load drift hits both.
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
from benchmarks.service_load import ServiceBench, rss_mb     # noqa: E402
from elit_stream.engine import Engine                         # noqa: E402
from elit_stream.manifest import load_artifact                # noqa: E402
from elit_stream.movie import make_movie                      # noqa: E402
from elit_stream.postprocess import Params, active_maps, analyse   # noqa: E402

PARITY_ATOL = 1e-4


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


def engine_step(engine: Engine, frame: np.ndarray):
    """What the engine side does per frame to match the baseline: prepare, run, mean/std maps."""
    x, geom = engine.prepare(frame)
    probs = engine.run(x)
    return active_maps(probs, np.arange(engine.n_members), *geom.valid_shape)


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def check_parity(engine: Engine, base: AtomAIStyleEnsemble, frame: np.ndarray) -> dict:
    mean_e, std_e = engine_step(engine, frame)
    mean_b, var_b = base.predict(frame)
    diff = {"mean": float(np.abs(mean_e - mean_b).max()),
            "std": float(np.abs(std_e - np.sqrt(var_b)).max())}
    if not max(diff.values()) <= PARITY_ATOL:
        raise ParityError(f"engine and baseline disagree ({diff}, limit {PARITY_ATOL}): no timings")
    return diff


def members_sweep(arts: dict[int, Path], size: int, repeats: int, threads, log) -> dict:
    """Engine vs. baseline per N at size x size: parity first, then interleaved repeats."""
    out = {}
    for n, path in arts.items():
        art = load_artifact(path)
        rss0 = rss_mb()["VmRSS"]
        engine = Engine(art, device="cpu", threads=threads)
        base = AtomAIStyleEnsemble.from_artifact(path, art.manifest)
        frame = frame_of(size, art.pixel_size_pm)
        parity = check_parity(engine, base, frame)
        t_e, t_b = [], []
        for _ in range(repeats):
            t_e += timed(lambda: engine_step(engine, frame), 1, warmup=0)
            t_b += timed(lambda: base.predict(frame), 1, warmup=0)
        run = timed(lambda: engine.run(engine.prepare(frame)[0]), repeats, warmup=0)
        ratios = np.asarray(t_b) / np.asarray(t_e)
        out[n] = {"engine": stats_ms(t_e), "baseline": stats_ms(t_b), "engine_run": stats_ms(run),
                  "ratio": {"median": float(np.median(ratios)), "min": float(ratios.min()),
                            "max": float(ratios.max())},
                  "parity": parity, "rss_engine_mb": rss_mb()["VmRSS"] - rss0, "load": load_now()}
        log(f"N={n:2d} {size}px: engine {out[n]['engine']['median']:8.1f} ms, baseline "
            f"{out[n]['baseline']['median']:8.1f} ms, ratio {out[n]['ratio']['median']:.2f} "
            f"(parity {max(parity.values()):.1e}; load {load_now()})")
        del engine, base
    return out


def sizes_sweep(path: Path, sizes: list[int], repeats: int, threads, log) -> dict:
    art = load_artifact(path)
    engine = Engine(art, device="cpu", threads=threads)
    out = {}
    for size in sizes:
        frame = frame_of(size, art.pixel_size_pm)
        t = timed(lambda: engine_step(engine, frame), repeats)
        out[size] = {"engine": stats_ms(t), "load": load_now()}
        log(f"N={art.n_members} {size}px: engine {out[size]['engine']['median']:8.1f} ms")
    return out


def postprocess_times(path: Path, size: int, repeats: int, threads) -> dict:
    """prepare and analyse (consensus, uncertainty, atoms) on the engine's real output."""
    art = load_artifact(path)
    engine = Engine(art, device="cpu", threads=threads)
    frame = frame_of(size, art.pixel_size_pm)
    x, geom = engine.prepare(frame)
    probs = engine.run(x)
    act, p, vs = np.arange(art.n_members), Params(), geom.valid_shape
    n = 3 * repeats
    return {"prepare": stats_ms(timed(lambda: engine.prepare(frame), n)),
            "analyse": stats_ms(timed(lambda: analyse(probs, act, p, vs), n)),
            "analyse+maps": stats_ms(timed(lambda: analyse(probs, act, p, vs, want_maps=True), n)),
            "n_atoms": analyse(probs, act, p, vs).n_atoms, "members": art.n_members,
            "size": size, "load": load_now()}


def service_figures(path: Path, size: int, n_frames: int, threads, log) -> dict:
    art = load_artifact(path)
    ps = art.pixel_size_pm
    frames = make_movie(n_frames=n_frames, size_px=size, seed=1, pixel_size_pm=ps).frames
    engine = Engine(art, device="cpu", threads=threads)
    engine.warm_up((size, size))
    with ServiceBench(path, threads) as sb:
        served, local = sb.closed_loop(frames, ps, engine)
        interval = 1.5 * float(np.median(local))
        fixed, got_f, sent_f, _ = sb.open_loop(frames, ps, interval, "bench-fixed")
        flood, got, sent, wall = sb.open_loop(frames, ps, 0.0, "bench-flood")
        mem = rss_mb(sb.pid)
    overhead = float(np.median(served) / np.median(local) - 1)
    out = {"closed_loop": stats_ms(served), "in_process": stats_ms(local),
           "overhead": overhead, "fixed_rate_hz": 1 / interval, "fixed": stats_ms(fixed),
           "fixed_received": f"{got_f}/{sent_f}", "flood": stats_ms(flood),
           "flood_received": f"{got}/{sent}", "sustained_fps": got / wall, "service_rss_mb": mem,
           "members": art.n_members, "size": size, "load": load_now()}
    log(f"service N={art.n_members} {size}px: round trip p50 {out['closed_loop']['median']:.1f} ms"
        f" vs in-process {out['in_process']['median']:.1f} ms (overhead {100 * overhead:+.1f} %),"
        f" lossless flood {got}/{sent} at {out['sustained_fps']:.2f} frames/s")
    return out


# --- report -------------------------------------------------------------------------------------

def _fmt(st: dict) -> str:
    return f"{st['median']:.1f} ({st['min']:.1f}–{st['max']:.1f})"


def slopes(members: dict, sizes: dict) -> dict:
    out = {}
    if len(members) >= 2:
        n = np.array(sorted(members), float)
        t = np.array([members[k]["engine"]["median"] for k in sorted(members)])
        out["ms_per_member"], out["ms_fixed"] = map(float, np.polyfit(n, t, 1))
    if len(sizes) >= 2:
        px = np.array(sorted(sizes), float) ** 2
        t = np.array([sizes[k]["engine"]["median"] for k in sorted(sizes)])
        out["pixel_exponent"] = float(np.polyfit(np.log(px), np.log(t), 1)[0])
    return out


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# Benchmark results ({res['created']})", "",
             f"Command: `{res['command']}`  ", f"Machine: {m['cpu']}, {m['cpus']} logical CPUs, "
             f"onnxruntime {m['onnxruntime']}, torch {m['torch']} ({m['torch_threads']} threads); "
             f"engine threads {m['engine_threads']}  ",
             f"Load average: {res['load_start']} at start, {res['load_end']} at end  ",
             f"Source: {res['source']}", ""]
    if res["members"]:
        size = res["members_size"]
        lines += [f"## Engine vs. AtomAI-style baseline, {size}×{size}, per frame "
                  "(ms: median (min–max))", "",
                  "| members | engine (prepare+run+mean/std) | engine run only | baseline | "
                  "ratio baseline/engine | parity max diff | engine RSS MiB | load |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|"]
        for n, r in sorted(res["members"].items(), key=lambda kv: int(kv[0])):
            q = r["ratio"]
            lines.append(f"| {n} | {_fmt(r['engine'])} | {_fmt(r['engine_run'])} | "
                         f"{_fmt(r['baseline'])} | **{q['median']:.2f}×** ({q['min']:.2f}–"
                         f"{q['max']:.2f}) | {max(r['parity'].values()):.1e} | "
                         f"{r['rss_engine_mb']:.0f} | {r['load']} |")
        lines.append("")
    if res["sizes"]:
        lines += ["## Engine vs. frame size (ms)", "", "| size | engine | load |",
                  "|---:|---:|---|"]
        lines += [f"| {s} | {_fmt(r['engine'])} | {r['load']} |"
                  for s, r in sorted(res["sizes"].items(), key=lambda kv: int(kv[0]))]
        lines.append("")
    if res["slopes"]:
        lines += ["Slopes: " + ", ".join(f"{k} {v:.3g}" for k, v in res["slopes"].items()), ""]
    if res["postprocess"]:
        p = res["postprocess"]
        lines += [f"## Post-processing, {p['size']}², {p['members']} members, {p['n_atoms']} atoms "
                  f"(ms)", "", f"prepare {_fmt(p['prepare'])}; analyse {_fmt(p['analyse'])}; "
                  f"analyse + mean/std maps {_fmt(p['analyse+maps'])}", ""]
    if res["service"]:
        s = res["service"]
        lines += [f"## Service end to end, {s['size']}², {s['members']} members (ms)", "",
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
    lines += ["GPU: not measured in this run (CPU provider).", ""]
    return "\n".join(lines)


def plots(res: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if res["members"]:
        ns = sorted(res["members"], key=int)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for key, label in (("engine", "engine (onnxruntime)"), ("baseline", "AtomAI-style")):
            med = [res["members"][n][key]["median"] for n in ns]
            lo = [res["members"][n][key]["min"] for n in ns]
            hi = [res["members"][n][key]["max"] for n in ns]
            x = [int(n) for n in ns]
            ax.errorbar(x, med, yerr=[np.subtract(med, lo), np.subtract(hi, med)], marker="o",
                        capsize=3, label=label)
        ax.set(xlabel="members", ylabel="ms per frame",
               title=f"latency vs. members, {res['members_size']} px")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "latency_vs_members.png", dpi=120)
        plt.close(fig)
    if res["sizes"]:
        ss = sorted(res["sizes"], key=int)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.loglog([int(s) ** 2 for s in ss], [res["sizes"][s]["engine"]["median"] for s in ss],
                  marker="o")
        ax.set(xlabel="pixels per frame", ylabel="ms per frame", title="engine latency vs. size")
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
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--service-frames", type=int, default=12)
    ap.add_argument("--threads", type=int, help="engine intra-op threads (default: engine's)")
    ap.add_argument("--skip", default="", help="comma list of: members,sizes,post,service")
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
    skip = set(a.skip.split(",")) - {""}
    out = a.out or ROOT / "runs" / "bench" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)                        # noqa: E731
    res = {"created": dt.datetime.now().isoformat(timespec="seconds"),
           "command": " ".join(["python -m benchmarks.suite", *(argv or sys.argv[1:])]),
           "load_start": load_now(), "members": {}, "sizes": {}, "postprocess": None,
           "service": None, "members_size": msize}
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
    res["machine"] = machine(arts[size_n], a.threads)
    if "members" not in skip:
        res["members"] = members_sweep({n: arts[n] for n in members}, msize, repeats, a.threads,
                                       log)
    if "sizes" not in skip:
        res["sizes"] = sizes_sweep(arts[size_n], sizes, repeats, a.threads, log)
    if "post" not in skip:
        res["postprocess"] = postprocess_times(arts[size_n], msize, repeats, a.threads)
    if "service" not in skip:
        res["service"] = service_figures(arts[size_n], msize, nsvc, a.threads, log)
    res["slopes"] = slopes(res["members"], res["sizes"])
    res["load_end"] = load_now()
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    text = markdown(res)
    (out / "results.md").write_text(text)
    plots(res, out)
    print("\n" + text)
    print(f"written to {out}")
    return res


def machine(path: Path, threads) -> dict:
    import onnxruntime
    import torch
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    eng = Engine(load_artifact(path), device="cpu", threads=threads)
    return {"cpu": cpu, "cpus": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "engine_threads": eng.threads, "python": platform.python_version()}


if __name__ == "__main__":
    main()
