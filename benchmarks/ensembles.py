"""N-member artifacts for the benchmark, built with the real exporter (trainer.model.export).

Members come from a source artifact (read back from its ONNX initializers) and are repeated to
reach N; a repeated member is scaled by (1 + 1e-6 k) in every float tensor (k = repeat index) so
that no two members are equal and no graph optimiser can merge them. `tiny_members` makes random
small U-Nets for the smoke run. Built artifacts are cached in the results folder under a key of
the source manifest and the exporter's code, never in models/.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from trainer.model.export import write_artifact
from trainer.model.init_weights import onnx_member_state
from trainer.model.train import MemberResult, TrainConfig
from trainer.model.unet import UNet, UNetConfig

ROOT = Path(__file__).resolve().parents[1]
_CODE = ("trainer/model/export.py", "trainer/model/unet.py", "benchmarks/ensembles.py")


def _code_key(extra: bytes) -> str:
    h = hashlib.sha256(extra)
    for rel in _CODE:
        h.update((ROOT / rel).read_bytes())
    return h.hexdigest()[:12]


def source_members(artifact_dir: Path) -> tuple[list[UNet], TrainConfig]:
    """The members of an exported artifact as PyTorch U-Nets, and its training config."""
    manifest = json.loads((Path(artifact_dir) / "manifest.json").read_text())
    cfg = TrainConfig.from_dict(manifest["training"])
    members = []
    for m in manifest["members"]:
        net = UNet(cfg.unet)
        net.load_state_dict(onnx_member_state(artifact_dir, m["id"]))
        members.append(net.eval())
    return members, cfg


def tiny_members(n: int, seed: int = 0) -> tuple[list[UNet], TrainConfig]:
    """Random small U-Nets (4 base filters) with non-trivial BatchNorm statistics (smoke run)."""
    from trainer.data.synth import SynthConfig
    cfg = TrainConfig(members=n, n_test=0, unet=UNetConfig(base_filters=4),
                      synth=SynthConfig.from_dict({**SynthConfig().to_dict(), "size_px": 32}))
    torch.manual_seed(seed)
    members = []
    for _ in range(n):
        net = UNet(cfg.unet)
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
        members.append(net.eval())
    return members, cfg


def repeat_members(members: list[UNet], n: int) -> list[UNet]:
    """n members cycling through `members`; repeats scaled by (1 + 1e-6 k) (see module doc)."""
    out = []
    for i in range(n):
        src, k = members[i % len(members)], i // len(members)
        net = UNet(src.cfg)
        state = {name: (t * (1 + 1e-6 * k) if t.is_floating_point() and k else t.clone())
                 for name, t in src.state_dict().items()}
        net.load_state_dict(state)
        out.append(net.eval())
    return out


def build_artifact(members: list[UNet], cfg: TrainConfig, n: int, cache_dir: Path,
                   source_key: str, log=print) -> Path:
    """An n-member artifact in cache_dir (reused when the same source and code built it)."""
    key = _code_key(f"{source_key}:{n}".encode())
    out = Path(cache_dir) / f"n{n:02d}-{key}"
    if (out / "manifest.json").is_file():
        return out
    nets = repeat_members(members, n)
    results = [MemberResult(id=i, seed=cfg.base_seed + i, epochs=0, swa_epochs=0, best_epoch=0,
                            best_val_loss=0.0, history={}, test_iou=0.0) for i in range(n)]
    write_artifact(out, nets, results, cfg, f"benchmarks.ensembles.build_artifact n={n}",
                   lineage={"parent": None, "iteration": 0, "notes": f"benchmark, {source_key}"},
                   force=True, log=lambda *a: None)
    log(f"built {n}-member artifact {out.name}")
    return out
