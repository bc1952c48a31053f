"""Starting weights for a retraining run (``TrainConfig.init_from``).

Owns reading a member's weights from a ``final.pt`` state dict, a training run folder or an
exported artifact (read back from the ONNX graph's initializers, which carry the PyTorch parameter
names ``members.K.<name>``; tensors the exporter shared through ``Identity`` nodes are resolved),
and copying them into a new U-Net (same-shape tensors only, so a new head can differ).
"""
from __future__ import annotations

from pathlib import Path

import torch

from trainer.model.unet import UNet, UNetConfig


def per_member(spec: str | None) -> bool:
    """Does ``spec`` give each member its own starting weights (``PATH:*`` or ``PATH:A,B,...``)?"""
    return bool(spec) and (spec.endswith(":*") or "," in spec.rpartition(":")[2])


def member_spec(spec: str, member_id: int) -> str:
    """``PATH:*`` means "member K starts from member K of PATH" (keeps the parent's diversity);
    ``PATH:A,B,...`` "member K starts from the K-th listed member of PATH" (cycling)."""
    if spec.endswith(":*"):
        return f"{spec[:-2]}:{member_id}"
    path, _, listed = spec.rpartition(":")
    if "," in listed:
        ids = [m for m in listed.split(",") if m]
        return f"{path}:{ids[member_id % len(ids)]}"
    return spec


def load_init_state(spec: str, unet_cfg: UNetConfig, log=print) -> dict:
    """Starting weights from ``spec``: ``PATH.pt`` (a state dict, e.g. ``member_03/final.pt``),
    ``RUN_DIR:K`` (that run's ``member_KK/final.pt``) or ``ARTIFACT_DIR:K`` (member K of an exported
    ensemble, read back from the ONNX graph's initializers, which carry the PyTorch parameter names
    ``members.K.<name>``). ``PATH:*`` is resolved per member by `member_spec` first."""
    path, _, member = spec.rpartition(":") if ":" in spec else (spec, "", "")
    path = Path(path)
    if path.suffix == ".pt" and not member:
        if not path.is_file():
            raise ValueError(f"--init-from {spec}: no such file")
        return torch.load(path, weights_only=True)
    if not member.isdigit():
        raise ValueError(f"--init-from {spec}: give a .pt file, RUN_DIR:MEMBER or ARTIFACT_DIR:MEMBER")
    k = int(member)
    if (path / f"member_{k:02d}" / "final.pt").is_file():
        return torch.load(path / f"member_{k:02d}" / "final.pt", weights_only=True)
    if (path / "manifest.json").is_file():
        state = onnx_member_state(path, k)
        log(f"initial weights: member {k} of {path} (from the ONNX initializers)")
        return state
    raise ValueError(f"--init-from {spec}: {path} is neither a run folder with member_{k:02d}/final.pt "
                     "nor an artifact folder")


def onnx_member_state(artifact_dir: Path, member: int) -> dict:
    """Member ``member``'s state dict from an artifact's ``ensemble.onnx`` (by initializer name)."""
    import onnx
    from onnx import numpy_helper

    from trainer.model.artifact import read_manifest

    manifest = read_manifest(artifact_dir)
    ids = [m["id"] for m in manifest["members"]]
    if member not in ids:
        raise ValueError(f"{artifact_dir}: no member {member} (members {ids})")
    graph = onnx.load(str(Path(artifact_dir) / manifest["model"]["file"])).graph
    tensors = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:          # the exporter shares equal tensors through Identity nodes
        if node.op_type == "Identity" and node.input[0] in tensors:
            tensors[node.output[0]] = tensors[node.input[0]]
    prefix = f"members.{ids.index(member)}."
    state = {name[len(prefix):]: torch.from_numpy(value.copy())
             for name, value in tensors.items() if name.startswith(prefix)}
    if not state:
        raise ValueError(f"{artifact_dir}: the ONNX graph has no named weights for member {member}")
    return state


def apply_init_state(model: UNet, state: dict) -> list[str]:
    """Copy same-name, same-shape tensors into ``model``; returns the names left as initialised.
    Raises ValueError when almost nothing matches (a different architecture)."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in own if k not in usable and not k.endswith("num_batches_tracked"))
    if len(usable) < len(own) // 2:
        raise ValueError(f"initial weights do not fit this U-Net ({len(usable)} of {len(own)} "
                         "tensors match): use the same --base-filters as the parent")
    own.update(usable)
    model.load_state_dict(own)
    return skipped
