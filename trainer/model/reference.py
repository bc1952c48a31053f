"""The in-distribution reference of frame-level figures, for the service's out-of-distribution
score (the manifest's optional ``ood_reference``; docs/artifact.md, docs/ood.md).

Frames: synthetic, from the artifact's own recorded ``SynthConfig`` (``training.synth``) at
``size_px``, with a seed the training did not use. Each frame runs through the artifact with
onnxruntime, as the service runs it (per-frame min-max, no rescaling: the frames are at the
training pixel sizes). Figures per frame, over all members (the service computes the same over its
active members, in ``elit_stream/core/postprocess.py``; the two sides share no code and
``tests/test_ood.py`` checks that they agree on the same maps), with a_m the member's atom map
(sum over classes) and a the members' mean:

- ``density``: fraction of pixels with a > threshold;
- ``disagreement``: mean over members of 1 - IoU(a_m > threshold, a > threshold) (0 if both empty);
- ``area_cv``: std / mean over members of the pixel count of a_m > threshold (0 if all are 0);
- ``crystallinity``: with P = |FFT|^2 of the central CRYSTAL_SIDE_PX square of a[::2, ::2] minus
  its mean, the largest P / exp(mean of log P over its ring) among frequencies with rounded
  |k| >= CRYSTAL_MIN_CYCLES cycles per side (0 for a constant map);
- ``order``: crystallinity / (density + ORDER_DENSITY_FLOOR) (a dense frame without lattice order).

Per figure the reference keeps quantiles of log(value + floor): ``low`` (0.5 %), ``median``,
``high`` (99.5 %) and ``scale`` (the interquartile range), and the ``side`` that flags (SIDES). The
service flags a frame whose figures leave the [low, high] band on that side by more than
``flag_above`` × scale.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from trainer.data.config import SynthConfig
from trainer.data.synth import make_sample
from trainer.model.artifact import read_manifest, verify_artifact

VERSION = 1
THRESHOLD = 0.5                      # the service's default post-processing threshold
FLOORS = {"density": 1e-4, "disagreement": 1e-2, "area_cv": 1e-2, "crystallinity": 1.0,
          "order": 1.0}
# The side of the band that flags: fewer or more detections than ever (density), more disagreement
# or spread of the members' areas than ever, less lattice order than ever (crystallinity).
SIDES = {"density": "both", "disagreement": "high", "area_cv": "high", "crystallinity": "low",
         "order": "low"}
ORDER_DENSITY_FLOOR = 0.01
CRYSTAL_MIN_CYCLES = 4
CRYSTAL_SIDE_PX = 128
QUANTILES = (0.005, 0.25, 0.5, 0.75, 0.995)
FLAG_ABOVE = 0.1
MIN_SCALE = 0.05                     # log units: a figure that hardly varies still gets a band
DEFAULT_FRAMES = 200
DEFAULT_SEED = 60_613
DEFAULT_SIZE_PX = 256


def frame_figures(probs: np.ndarray, threshold: float = THRESHOLD) -> dict[str, float]:
    """The figures of one frame from ``probs`` [M, C, H, W] (all members)."""
    atom = probs.sum(axis=1)                                  # [M, H, W]
    on = atom > threshold
    cons = atom.mean(axis=0) > threshold
    areas = on.reshape(len(on), -1).sum(axis=1).astype(np.float64)
    inter = (on & cons).reshape(len(on), -1).sum(axis=1)
    either = areas + cons.sum() - inter
    dis = np.where(either > 0, 1.0 - inter / np.maximum(either, 1), 0.0)
    mean_area = areas.mean()
    density = float(cons.mean())
    crystallinity = _crystallinity(_central(atom.mean(axis=0)[::2, ::2]))
    return {"density": density, "disagreement": float(dis.mean()),
            "area_cv": float(areas.std() / mean_area) if mean_area > 0 else 0.0,
            "crystallinity": crystallinity,
            "order": crystallinity / (density + ORDER_DENSITY_FLOOR)}


def _central(a: np.ndarray, side: int = CRYSTAL_SIDE_PX) -> np.ndarray:
    y0, x0 = max(0, (a.shape[0] - side) // 2), max(0, (a.shape[1] - side) // 2)
    return a[y0:y0 + side, x0:x0 + side]


def _crystallinity(half: np.ndarray) -> float:
    h, w = half.shape
    power = np.abs(np.fft.rfft2(half - half.mean())) ** 2
    scale = float(power.mean())
    if scale <= 0:
        return 0.0
    ring = np.rint(np.hypot(np.fft.fftfreq(h)[:, None] * h, np.fft.rfftfreq(w)[None, :] * w))
    ring = ring.astype(np.intp).ravel()
    logp = np.log(power.ravel() / scale + 1e-12)
    envelope = np.bincount(ring, logp) / np.maximum(np.bincount(ring), 1)
    keep = ring >= CRYSTAL_MIN_CYCLES
    return float(np.exp((logp - envelope[ring])[keep].max())) if keep.any() else 0.0


def bands(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per figure: low / median / high / scale / floor of log(value + floor) over ``rows``."""
    out = {}
    for name, floor in FLOORS.items():
        logs = np.log(np.array([r[name] for r in rows]) + floor)
        low, q1, med, q3, high = np.quantile(logs, QUANTILES)
        out[name] = {"low": round(float(low), 5), "median": round(float(med), 5),
                     "high": round(float(high), 5),
                     "scale": round(max(float(q3 - q1), MIN_SCALE), 5), "floor": floor,
                     "side": SIDES[name]}
    return out


EXCLUDED_SCENES = ("vacuum",)       # a frame with nothing to find is what the alarm is for
MIN_ATOMS = 3                        # ... and so is a frame that shows (almost) no atoms


def reference_frames(synth: SynthConfig, n: int, seed: int, size_px: int):
    """``n`` in-distribution frames (float32, [0, 1]) of ``synth`` at ``size_px``. Left out: the
    physical world's empty scenes (EXCLUDED_SCENES) and any frame with fewer than MIN_ATOMS
    visible atoms (a sparse single-atom scene at a fine pixel size can show none): an empty field
    of view is to be flagged, not learnt as normal."""
    rng = np.random.default_rng(seed)
    weights = tuple(0.0 if name in EXCLUDED_SCENES else w
                    for name, w in zip(synth.scenes, synth.scene_weights))
    cfg = replace(synth, size_px=size_px, scene_weights=weights)
    made = 0
    for _ in range(50 * n):
        sample = make_sample(rng, cfg)
        if len(sample.xy) < MIN_ATOMS:
            continue
        yield sample.image
        made += 1
        if made == n:
            return
    raise ValueError(f"only {made} of {n} reference frames show >= {MIN_ATOMS} atoms "
                     f"after {50 * n} draws: the training world is (nearly) empty")


def training_seeds(manifest: dict) -> set[int]:
    """Seeds the training data were drawn with (train, validation, test)."""
    base = int(manifest["training"].get("data_seed", 0))
    return {base, base + 1, base + 2, int(manifest["test_set"]["seed"])}


def compute_reference(artifact_dir: Path, frames: int = DEFAULT_FRAMES, seed: int = DEFAULT_SEED,
                      size_px: int = DEFAULT_SIZE_PX, command: str = "", log=None) -> dict:
    """The ``ood_reference`` of the artifact at ``artifact_dir`` (its manifest is not changed)."""
    from trainer.model.predict import EnsembleRunner

    if frames < 8:
        raise ValueError(f"--frames must be at least 8 for quantiles, got {frames}")
    if size_px < 32 or size_px % 8:
        raise ValueError(f"--size must be a multiple of 8 and at least 32, got {size_px}")
    runner = EnsembleRunner(artifact_dir)
    if seed in training_seeds(runner.manifest):
        raise ValueError(f"seed {seed} drew training data; choose another")
    if "synth" not in runner.manifest["training"]:
        raise ValueError(f"{artifact_dir}: the manifest records no training.synth, so there are no "
                         "in-distribution frames to make")
    synth = SynthConfig.from_dict(runner.manifest["training"]["synth"])
    rows = []
    for i, image in enumerate(reference_frames(synth, frames, seed, size_px)):
        rows.append(frame_figures(runner.probs(image)))
        if log is not None and (i + 1) % 50 == 0:
            log(f"reference: {i + 1}/{frames} frames")
    ref = {"version": VERSION, "threshold": THRESHOLD, "flag_above": FLAG_ABOVE, "frames": frames,
           "seed": seed, "size_px": size_px, "figures": bands(rows)}
    if set(synth.scenes) & set(EXCLUDED_SCENES):
        ref["scenes_excluded"] = sorted(set(synth.scenes) & set(EXCLUDED_SCENES))
    ref["min_atoms"] = MIN_ATOMS
    if command:
        ref["command"] = command
    return ref


def write_reference(artifact_dir: Path, ref: dict) -> dict:
    """Put ``ref`` into the artifact's manifest (replacing one there) and verify the artifact.

    Only manifest.json changes: the listed files (ONNX, probe) and their checksums stay valid."""
    path = Path(artifact_dir) / "manifest.json"
    manifest = read_manifest(artifact_dir)
    manifest["ood_reference"] = ref
    tmp = path.with_name(".manifest.json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(path)
    return verify_artifact(artifact_dir)
