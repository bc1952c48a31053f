"""Export a trained ensemble as a verified artifact (see docs/artifact.md).

All members go into ONE ONNX graph as parallel subgraphs over the same input (on CPU this beats
grouped convolutions: fewer layout conversions), each ending in softmax with the background channel
dropped, concatenated to ``probs [M, C, H, W]``. Before anything is written, onnxruntime's output is
compared with PyTorch's for every member on random and synthetic frames; a difference above
``PARITY_ATOL`` refuses the export. The artifact is assembled in a temporary folder and moved into
place only when complete.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.data.synth import make_sample
from trainer.model import reference
from trainer.model.artifact import normalise_minmax, sha256_file
from trainer.model.train import MemberResult, TrainConfig
from trainer.model.unet import UNet, atom_probabilities

FORMAT_VERSION = "1.0"
OPSET = 17
PARITY_ATOL = 1e-4
PROBE_SIZE_PX = 64
INPUT_SIZE = {"multiple_of": 8, "min_px": 16, "max_px": 4096}


class ExportError(Exception):
    """The ensemble could not be exported faithfully; nothing was written."""


class EnsembleGraph(nn.Module):
    """``frame [1, 1, H, W]`` → ``probs [M, C, H, W]``: every member, one pass.

    ``fast=True`` (the default, what is exported) evaluates each member in the inference form of
    ``inference_forward``; ``fast=False`` is the plain PyTorch model, the reference for parity.
    """

    def __init__(self, members: list[UNet], fast: bool = True):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.fast = fast

    def forward(self, frame: torch.Tensor) -> torch.Tensor:
        if self.fast:
            return torch.cat([inference_forward(m, frame) for m in self.members], dim=0)
        return torch.cat([atom_probabilities(m(frame)) for m in self.members], dim=0)


# --- the exported (inference) form of one member ------------------------------------------------
# Same parameters (so the ONNX initializers keep their PyTorch names, see init_weights), same
# function, fewer operations for onnxruntime's CPU kernels. Each rewrite is exact in real
# arithmetic; check_parity compares the exported graph with the plain model (PARITY_ATOL).
# Measured and NOT kept: splitting each decoder's first conv into two summed convs instead of the
# skip concat (slower in onnxruntime 1.31: the Add is not fused). See docs/benchmarks.md.

def _upsample_first_conv(up: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """1×1 conv, then bilinear ×2: equal to the reverse order (bilinear weights sum to 1, also at
    the clamped border), with half the channels to interpolate and a quarter of the conv's pixels."""
    return F.interpolate(up.conv(x), scale_factor=2.0, mode="bilinear", align_corners=False)


def _softmax_drop_background(logits: torch.Tensor) -> torch.Tensor:
    """softmax over channels, background dropped, as per-plane elementwise ops (onnxruntime's
    Softmax over axis 1 of NCHW transposes; this is 10 % of the plain graph's time at 512²)."""
    planes = torch.split(logits, 1, dim=1)
    top = planes[0]
    for p in planes[1:]:
        top = torch.maximum(top, p)
    exps = [torch.exp(p - top) for p in planes]
    total = exps[0]
    for e in exps[1:]:
        total = total + e
    return torch.cat(exps[1:], dim=1) / total


def inference_forward(unet: UNet, x: torch.Tensor) -> torch.Tensor:
    """``atom_probabilities(unet(x))`` in the exported form (eval mode only)."""
    e1 = unet.enc1(x)
    e2 = unet.enc2(F.max_pool2d(e1, 2))
    e3 = unet.enc3(F.max_pool2d(e2, 2))
    b = unet.bottleneck(F.max_pool2d(e3, 2))
    d3 = unet.dec3(torch.cat([_upsample_first_conv(unet.up3, b), e3], 1))
    d2 = unet.dec2(torch.cat([_upsample_first_conv(unet.up2, d3), e2], 1))
    d1 = unet.dec1(torch.cat([_upsample_first_conv(unet.up1, d2), e1], 1))
    return _softmax_drop_background(unet.head(d1))


def reference_graph(graph: EnsembleGraph) -> EnsembleGraph:
    """The same members as the plain PyTorch model (``fast=False``), in eval mode."""
    return EnsembleGraph(list(graph.members), fast=False).eval()


def export_onnx(graph: EnsembleGraph, path: Path) -> None:
    graph.eval()
    example = torch.zeros(1, 1, 64, 64)
    torch.onnx.export(graph, (example,), str(path), dynamo=False, opset_version=OPSET,
                      input_names=["frame"], output_names=["probs"],
                      dynamic_axes={"frame": {2: "H", 3: "W"}, "probs": {2: "H", 3: "W"}})


def parity_frames(cfg: TrainConfig, seed: int = 0) -> list[np.ndarray]:
    """Random and synthetic frames, normalised, ``[1, 1, H, W]`` float32, of several sizes."""
    rng = np.random.default_rng(seed)
    frames = [rng.random((64, 64)), rng.random((48, 80))]
    frames.append(make_sample(rng, cfg.synth).image)
    return [normalise_minmax(f)[None, None] for f in frames]


def check_parity(graph: EnsembleGraph, onnx_path: Path, frames: list[np.ndarray],
                 atol: float = PARITY_ATOL) -> list[float]:
    """Max |torch − onnxruntime| per member over ``frames``; raises ExportError above ``atol``.

    The reference is the plain PyTorch model (``reference_graph``), not the exported form."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = np.zeros(len(graph.members))
    graph = reference_graph(graph)
    with torch.no_grad():
        for frame in frames:
            expected = graph(torch.from_numpy(frame)).numpy()
            got = session.run(["probs"], {"frame": frame})[0]
            if got.shape != expected.shape:
                raise ExportError(f"onnxruntime output shape {got.shape} != torch {expected.shape}")
            worst = np.maximum(worst, np.abs(got - expected).reshape(len(worst), -1).max(axis=1))
    bad = [(i, d) for i, d in enumerate(worst) if not d <= atol]
    if bad:
        detail = ", ".join(f"member {i}: {d:.2e}" for i, d in bad)
        raise ExportError(f"exported graph differs from PyTorch beyond {atol:g} ({detail}); "
                          "artifact not written")
    return worst.tolist()


def git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "trainer"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def class_table(n_classes: int, imaging: str = "gaussian") -> list[dict]:
    if n_classes == 1:
        return [{"index": 0, "name": "atom", "description": "any atomic column"}]
    if imaging == "probe":        # the physical world (docs/training-world.md, "Samples")
        return [{"index": 0, "name": "lattice",
                 "description": "light host atoms or columns (C, B, N in monolayers; S2 in MoS2; "
                                "the lighter sublattice of a crystal)"},
                {"index": 1, "name": "impurity",
                 "description": "heavier atoms: Z >= 14 on a light host, single heavy atoms and "
                                "particles on a support, the heavier sublattice or heavy "
                                "substitutions of a crystal (Z-contrast, not brightness)"}]
    return [{"index": 0, "name": "lattice", "description": "host lattice atoms (e.g. carbon in graphene)"},
            {"index": 1, "name": "impurity", "description": "heavier substitutional atoms (Z >= 14)"}]


def build_manifest(name: str, graph: EnsembleGraph, results: list[MemberResult], cfg: TrainConfig,
                   command: str, lineage: dict | None, test_frames: int) -> dict:
    from trainer import __version__

    ious = np.array([r.test_iou for r in results], dtype=float)
    return {
        "format": "elit-ensemble", "format_version": FORMAT_VERSION, "name": name,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "producer": {"tool": "elit-train", "version": __version__, "command": command},
        "model": {
            "file": "ensemble.onnx", "opset": OPSET,
            "input": {"name": "frame", "shape": [1, 1, "H", "W"], "dtype": "float32",
                      "meaning": "one frame, min-max normalised per frame"},
            "output": {"name": "probs", "shape": [len(results), cfg.unet.n_classes, "H", "W"],
                       "dtype": "float32",
                       "meaning": "per-member probability of each atom class (background dropped)"},
            "architecture": {"type": "unet", **cfg.unet.to_dict()},
        },
        "input_size": dict(INPUT_SIZE),
        "normalization": {"kind": "minmax", "scope": "frame"},
        "pixel_size_pm": round(cfg.synth.nominal_pixel_size_pm, 4),
        "pixel_size_range_pm": [round(v, 4) for v in cfg.synth.pixel_size_range_pm],
        "atom_radius_px": round(cfg.synth.nominal_atom_radius_px, 4),
        "classes": class_table(cfg.unet.n_classes, cfg.synth.imaging),
        "members": [{"id": r.id, "seed": r.seed, "epochs": r.epochs, "swa_epochs": r.swa_epochs,
                     "best_val_loss": r.best_val_loss, "test_iou": r.test_iou} for r in results],
        "test_set": {"frames": test_frames, "seed": cfg.data_seed + 2,
                     "iou_mean": float(ious.mean()), "iou_std": float(ious.std())},
        "training": cfg.to_dict(),
        "lineage": lineage or {"parent": None, "iteration": 0,
                               "notes": "trained on synthetic data only"},
        "files": {}, "probe": {"file": "probe.npz", "atol": PARITY_ATOL},
    }


def write_probe(graph: EnsembleGraph, path: Path, cfg: TrainConfig) -> None:
    """A fixed raw frame (counts, not normalised), its normalisation and the expected output."""
    sample = make_sample(np.random.default_rng(12345), _probe_synth(cfg))
    raw = (sample.image * 900.0 + 100.0).astype(np.float32)
    net_input = normalise_minmax(raw)[None, None]
    with torch.no_grad():
        probs = reference_graph(graph)(torch.from_numpy(net_input)).numpy()
    np.savez(path, raw=raw, input=net_input, probs=probs)


def _probe_synth(cfg: TrainConfig):
    from dataclasses import replace
    return replace(cfg.synth, size_px=PROBE_SIZE_PX)


def write_artifact(out_dir: Path, members: list[UNet], results: list[MemberResult],
                   cfg: TrainConfig, command: str, lineage: dict | None = None,
                   report_dir: Path | None = None, force: bool = False,
                   log=print, reference_frames: int | None = None) -> Path:
    """Export, verify and write ``out_dir`` (atomically); returns the manifest path.

    The manifest gets an ``ood_reference`` from ``reference_frames`` synthetic frames
    (``trainer.model.reference``, as ``elit-train reference`` computes it; default: the
    environment's ``ELIT_REFERENCE_FRAMES``, else 200); 0 leaves it out."""
    if reference_frames is None:
        reference_frames = int(os.environ.get("ELIT_REFERENCE_FRAMES", reference.DEFAULT_FRAMES))
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise ExportError(f"{out_dir} exists; pass --force to replace it")
    graph = EnsembleGraph(members).eval()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        tmp = Path(tmp)
        export_onnx(graph, tmp / "ensemble.onnx")
        worst = check_parity(graph, tmp / "ensemble.onnx", parity_frames(cfg))
        log(f"parity torch vs onnxruntime: max |diff| per member {max(worst):.2e} (limit {PARITY_ATOL:g})")
        write_probe(graph, tmp / "probe.npz", cfg)
        manifest = build_manifest(out_dir.name, graph, results, cfg, command, lineage, cfg.n_test)
        for fname in ("ensemble.onnx", "probe.npz"):
            manifest["files"][fname] = {"sha256": sha256_file(tmp / fname),
                                        "bytes": (tmp / fname).stat().st_size}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if reference_frames:
            ref = reference.compute_reference(tmp, frames=reference_frames, log=log)
            manifest["ood_reference"] = ref
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
            log(f"ood reference from {reference_frames} synthetic frames written")
        if report_dir is not None and report_dir.exists():
            shutil.copytree(report_dir, tmp / "report")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.chmod(0o755)          # mkdtemp makes it private; an artifact is for everyone to read
        tmp.rename(out_dir)
        tmp.mkdir()           # TemporaryDirectory cleans up a folder of its own name
    return out_dir / "manifest.json"
