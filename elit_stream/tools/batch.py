"""`elit-stream batch`: re-analyse recorded movies offline, in this process or on a Ray cluster.

Every frame goes through ``core.pipeline`` (the engine and post-processing the service runs, not a
re-implementation) and becomes the same result document the service publishes; each movie gives
``OUT/<movie>.jsonl`` in the ``replay --record`` format (docs/protocol.md, "Recording"), and the
run gives ``OUT/summary.md`` / ``summary.json`` (frames, atoms, mean uncertainty, per-member
disagreement) and ``OUT/disagreement.png`` (per-member disagreement over time, one panel per movie).
A frame the model cannot take becomes a ``frame_rejected`` event line, as in the service.

Executors (docs/cluster.md): ``local`` analyses chunk after chunk with one engine; ``ray`` starts
``workers`` actors, each loading the model once (its files go to the object store once), and sends
them chunks of ``chunk_frames`` frames as tasks, at most two per worker in flight. Records are
written per movie in frame order, whichever worker analysed which chunk.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from elit_stream.core.artifact import load_artifact
from elit_stream.core.engine import Engine
from elit_stream.core.ensemble import ActiveSet
from elit_stream.core.ood import OodReference
from elit_stream.core.pipeline import FrameRejected, analyse_frame, result_document
from elit_stream.core.postprocess import Params
from elit_stream.protocol import wire
from elit_stream.tools.readers import StackError, read_stack
from elit_stream.tools.replay import to_json_line


class BatchError(Exception):
    """The batch cannot run at all (no model, no Ray); a bad movie is reported, not raised."""


@dataclass(frozen=True)
class BatchConfig:
    model: Path
    out: Path
    executor: str = "local"                 # local | ray
    address: str | None = None              # Ray cluster; None: a private local Ray
    workers: int | None = None              # Ray actors; None: one per free CPU (at most chunks)
    threads: int | None = None              # engine threads per worker; None: local all, Ray 1
    chunk_frames: int = 32
    pixel_size_pm: float | None = None      # overrides the file's
    fast_scan: str = "x"                    # the fast scan's direction: x, -x, y, -y
    dataset: str | None = None              # HDF5 dataset key
    device: str = "auto"
    precision: str = "fp32"


@dataclass
class MovieJob:
    """One movie: its frames (lazy), and its record file written in frame order as chunks come
    back in any order (only chunks ahead of a missing one wait in memory)."""
    path: Path
    acquisition: str
    frames: object = None
    pixel_size_pm: float | None = None
    error: str | None = None
    waiting: dict = field(default_factory=dict)     # chunk start -> docs, not yet written
    written: int = 0                                # frames written so far
    events: int = 0
    figures: list = field(default_factory=list)     # per result: n_atoms, unc., disagreement
    members: list = field(default_factory=list)

    def chunk_starts(self, chunk_frames: int) -> list[int]:
        return [] if self.frames is None else list(range(0, len(self.frames), chunk_frames))

    def add(self, start: int, docs: list[dict], out: Path, run_uid: str) -> bool:
        """Write what is now in order; True when every frame is written. Numbering as a freshly
        started service: results' seq counts results, events' seq counts events."""
        self.waiting[start] = docs
        with open(out / f"{self.acquisition}.jsonl", "a" if self.written else "w") as f:
            while self.written in self.waiting:
                for doc in self.waiting.pop(self.written):
                    self._number(doc, run_uid)
                    f.write(to_json_line(doc) + "\n")
                    self.written += 1
        return self.written == len(self.frames)

    def _number(self, doc: dict, run_uid: str) -> None:
        if doc["topic"] == "result":
            doc["seq"] = len(self.figures)
            self.figures.append((doc["n_atoms"], doc["mean_uncertainty"],
                                 doc["disagreement_per_member"]))
            self.members = self.members or list(doc["active"])
        else:
            doc["seq"], doc["run_uid"], self.events = self.events, run_uid, self.events + 1


# ----------------------------------------------------------------------------- one worker


class ChunkAnalyser:
    """Holds one engine (the model loaded once); ``run`` analyses a chunk of frames."""

    def __init__(self, model: Path | dict, device: str, threads: int | None, precision: str):
        if isinstance(model, dict):                 # files sent by value (Ray): a local copy
            self._tmp = tempfile.TemporaryDirectory(prefix="elit-batch-")
            folder = Path(self._tmp.name) / model["name"]
            folder.mkdir()
            for name, data in model["files"].items():
                (folder / name).write_bytes(data)
            model = folder
        art = load_artifact(model)
        self.engine = Engine(art, device=device, threads=threads, precision=precision)
        self.active, self.params = ActiveSet.full(art.member_ids), Params()
        self.model_ref = {"name": art.name, "sha256": art.manifest_sha256}
        self.ood_reference = OodReference.of(art.ood_reference,     # as the service scores frames
                                             art.manifest["pixel_size_range_pm"])

    def run(self, acquisition: str, first_id: int, frames: np.ndarray,
            pixel_size_pm: float | None, fast_scan: str = "x") -> list[dict]:
        """-> one document per frame: a result (as decoded from the wire) or frame_rejected."""
        return [self._frame(wire.Frame(first_id + i, acquisition, pixels, pixel_size_pm, None,
                                       True, fast_scan)) for i, pixels in enumerate(frames)]

    def _frame(self, frame: wire.Frame) -> dict:
        t0 = time.perf_counter()
        try:
            wire.ensure_finite(frame)
            out = analyse_frame(self.engine, frame.pixels, frame.pixel_size_pm, self.active,
                                self.params, ood_reference=self.ood_reference,
                                fast_scan=frame.fast_scan)
        except wire.ProtocolError as exc:
            return _rejected(frame, exc.code, exc.message)
        except FrameRejected as exc:
            return _rejected(frame, "bad_frame", str(exc))
        except Exception as exc:  # noqa: BLE001 - a failed inference: this frame reported, the rest go on
            return _rejected(frame, "internal", f"{type(exc).__name__}: {exc}")
        header, columns = result_document(
            frame, out, self.active, self.model_ref, self.engine.artifact.class_names, 0,
            {"decode": 0.0, **out.timings_s}, time.perf_counter() - t0)
        return wire.decode_published(wire.encode_result(header, columns))


def _rejected(frame: wire.Frame, code: str, message: str) -> dict:
    return {"protocol": 1, "kind": "event", "event": "frame_rejected", "run_uid": "", "seq": 0,
            "time": time.time(), "frame": {"acquisition": frame.acquisition,
                                           "frame_id": frame.frame_id},
            "code": code, "message": message, "topic": "event.frame_rejected"}


# ----------------------------------------------------------------------------- the run


def run_batch(movies: list[Path], cfg: BatchConfig, log: Callable[[str], None] = print,
              show_progress: bool = True) -> list[dict]:
    """Analyse every movie; write records, summary and picture into ``cfg.out``; -> summary rows."""
    load_artifact(cfg.model, check_probe=False)        # a bad model fails here, not per worker
    cfg.out.mkdir(parents=True, exist_ok=True)
    jobs = _open_movies(movies, cfg, log)
    bar = _Progress(sum(len(j.frames) for j in jobs if j.frames is not None), cfg.executor,
                    show_progress)
    run_uid, by_acq = uuid.uuid4().hex, {j.acquisition: j for j in jobs}
    run = _run_local if cfg.executor == "local" else _run_ray
    for acquisition, start, docs in run(jobs, cfg, log):
        job = by_acq[acquisition]
        if job.add(start, docs, cfg.out, run_uid):
            log(f"batch: {job.path} -> {cfg.out / (acquisition + '.jsonl')}")
        bar.update(len(docs), f"{job.path.name} frame {start + len(docs)}/{len(job.frames)}")
    bar.close()
    rows = [summary_row(j) for j in jobs]
    write_summary(rows, cfg.out)
    return rows


def _open_movies(movies: list[Path], cfg: BatchConfig, log) -> list[MovieJob]:
    jobs, seen = [], set()
    for path in map(Path, movies):
        acq = path.stem if path.stem not in seen else f"{path.stem}-{len(seen)}"
        seen.add(acq)
        job = MovieJob(path, acq)
        try:
            job.frames, ps = read_stack(path, cfg.dataset)
            job.pixel_size_pm = cfg.pixel_size_pm or ps
        except StackError as exc:
            job.error = str(exc)
            log(f"batch: {exc} — skipped, reported in the summary")
        jobs.append(job)
    return jobs


def _chunks(jobs: list[MovieJob], chunk_frames: int, fast_scan: str = "x"):
    for job in jobs:
        for start in job.chunk_starts(chunk_frames):
            frames = np.asarray(job.frames[start:start + chunk_frames])
            yield job.acquisition, start, frames, job.pixel_size_pm, fast_scan


def _run_local(jobs, cfg: BatchConfig, log):
    analyser = ChunkAnalyser(cfg.model, cfg.device, cfg.threads, cfg.precision)
    for acquisition, start, frames, ps, fast_scan in _chunks(jobs, cfg.chunk_frames, cfg.fast_scan):
        yield acquisition, start, analyser.run(acquisition, start, frames, ps, fast_scan)


# ----------------------------------------------------------------------------- Ray


def _run_ray(jobs, cfg: BatchConfig, log):
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=cfg.address, include_dashboard=False)
    try:
        yield from _ray_chunks(ray, jobs, cfg, log)
    finally:
        if started_here:
            ray.shutdown()


def _ray_chunks(ray, jobs, cfg: BatchConfig, log):
    model = Path(cfg.model)
    files = {"name": model.name, "files": {p.name: p.read_bytes() for p in model.iterdir()
                                           if p.is_file()}}
    threads = cfg.threads or 1
    gpus = 1 if cfg.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0 else 0
    n_chunks = sum(len(j.chunk_starts(cfg.chunk_frames)) for j in jobs)
    workers = cfg.workers or max(1, int(ray.available_resources().get("CPU", 1) // threads))
    workers = max(1, min(workers, n_chunks))
    model_ref = ray.put(files)                                      # the weights, once
    actor = ray.remote(ChunkAnalyser).options(num_cpus=threads, num_gpus=gpus, max_restarts=1,
                                              max_task_retries=1)
    pool = [actor.remote(model_ref, cfg.device, threads, cfg.precision) for _ in range(workers)]
    log(f"ray: {workers} worker(s) x {threads} CPU + {gpus} GPU, model "
        f"{sum(map(len, files['files'].values())) / 1e6:.1f} MB sent once, chunks of "
        f"{cfg.chunk_frames} frames")
    chunks, in_flight, idle = _chunks(jobs, cfg.chunk_frames, cfg.fast_scan), {}, pool * 2
    while True:
        while idle and (item := next(chunks, None)) is not None:
            worker = idle.pop()
            in_flight[worker.run.remote(*item)] = (worker, item)
        if not in_flight:
            return
        done, _ = ray.wait(list(in_flight), num_returns=1)
        worker, (acquisition, start, frames, *_) = in_flight.pop(done[0])
        idle.append(worker)
        try:
            docs = ray.get(done[0])
        except Exception as exc:  # noqa: BLE001 - worker died twice: the chunk's frames reported
            message = f"worker failed: {type(getattr(exc, 'cause', None) or exc).__name__}: {exc}"
            docs = [_rejected(wire.Frame(start + i, acquisition, f, None, None, True), "internal",
                              message.splitlines()[0]) for i, f in enumerate(frames)]
        yield acquisition, start, docs


def _import_ray():
    try:
        import ray
    except ImportError:
        raise BatchError("--executor ray needs Ray: pip install 'elit-stream[cluster]'") from None
    return ray


# ----------------------------------------------------------------------------- summary


def summary_row(job: MovieJob) -> dict:
    n_frames = 0 if job.frames is None else len(job.frames)
    n_atoms = np.array([f[0] for f in job.figures], float)
    disagreement = np.array([f[2] for f in job.figures], float)
    some = bool(job.figures)
    return {
        "movie": str(job.path), "acquisition": job.acquisition, "error": job.error,
        "frames": n_frames, "results": len(job.figures), "rejected": job.events,
        "unanswered": n_frames - job.written,
        "atoms_mean": float(n_atoms.mean()) if some else None,
        "atoms_min": int(n_atoms.min()) if some else None,
        "atoms_max": int(n_atoms.max()) if some else None,
        "mean_uncertainty": float(np.mean([f[1] for f in job.figures])) if some else None,
        "members": job.members,
        "disagreement_per_member_mean": disagreement.mean(0).round(4).tolist() if some else [],
        "disagreement_per_member": disagreement.tolist(),           # [frame][member]
    }


def write_summary(rows: list[dict], out: Path) -> None:
    """summary.json (everything), summary.md (the table) and disagreement.png."""
    (out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    fmt = lambda v, f: "–" if v is None else format(v, f)
    lines = [("| movie | frames | results | rejected | atoms mean (min–max) | mean uncertainty | "
              "disagreement per member (mean over frames) |"), "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['acquisition']} | – | – | – | {r['error']} | | |")
            continue
        dis = " ".join(f"{m}:{d:.3f}" for m, d in zip(r["members"], r["disagreement_per_member_mean"]))
        lines.append(f"| {r['acquisition']} | {r['frames']} | {r['results']} | {r['rejected']} | "
                     f"{fmt(r['atoms_mean'], '.1f')} ({r['atoms_min']}–{r['atoms_max']}) | "
                     f"{fmt(r['mean_uncertainty'], '.4f')} | {dis} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    _disagreement_png(rows, out / "disagreement.png")


def _disagreement_png(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["disagreement_per_member"]]
    if not shown:
        return
    fig, axes = plt.subplots(len(shown), 1, figsize=(9, 2.4 * len(shown) + 0.6), squeeze=False)
    for ax, r in zip(axes[:, 0], shown):
        d = np.array(r["disagreement_per_member"])
        for k, member in enumerate(r["members"]):
            ax.plot(d[:, k], label=f"member {member}", lw=1)
        ax.set(title=f"{r['acquisition']}: per-member disagreement with the active consensus",
               xlabel="frame", ylabel="disagreement")
    axes[0, 0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class _Progress:
    """A frames bar (tqdm when installed, else a line per chunk) on stderr."""

    def __init__(self, total: int, kind: str, enabled: bool):
        self.enabled, self.done, self.total, self.bar = enabled, 0, total, None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=f"batch ({kind})", unit="frame", file=sys.stderr)
            except ImportError:
                pass

    def update(self, n: int, text: str) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix_str(text)
        elif self.enabled:
            print(f"batch: {self.done}/{self.total} frames ({text})", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
