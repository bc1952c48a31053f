"""The baseline: an AtomAI-style ensemble predictor, written here on purpose (not imported).

Like AtomAI's ``EnsemblePredictor``: ONE PyTorch network in eager mode, the members run one after
another by loading each member's state dict into it, every prediction copied into a float64 host
array ``[M, C, H, W]``, and mean / variance over members taken in numpy. Same U-Net
(``trainer.model.unet``) and the same weights as the artifact under test: read back from the artifact's
ONNX initializers by name (``trainer.model.init_weights.onnx_member_state``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trainer.model.init_weights import onnx_member_state
from trainer.model.unet import UNet, UNetConfig, atom_probabilities


class AtomAIStyleEnsemble:
    """``predict(frame) -> (mean [C, H, W], var [C, H, W])``, float64, AtomAI's way."""

    def __init__(self, unet_cfg: UNetConfig, states: list[dict]):
        self.net = UNet(unet_cfg).eval()
        self.states = states
        self.n_classes = unet_cfg.n_classes

    @classmethod
    def from_artifact(cls, artifact_dir: Path, manifest: dict) -> AtomAIStyleEnsemble:
        arch = {k: v for k, v in manifest["model"]["architecture"].items() if k != "type"}
        ids = [m["id"] for m in manifest["members"]]
        return cls(UNetConfig.from_dict(arch), [onnx_member_state(artifact_dir, i) for i in ids])

    def predict(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``frame``: raw [H, W]; min-max normalised here (float64, then float32 for the net)."""
        x = frame.astype(np.float64)
        lo, hi = x.min(), x.max()
        x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
        inp = torch.from_numpy(x.astype(np.float32))[None, None]
        preds = np.zeros((len(self.states), self.n_classes, *frame.shape), np.float64)
        with torch.no_grad():
            for i, state in enumerate(self.states):
                self.net.load_state_dict(state)
                preds[i] = atom_probabilities(self.net(inp))[0].numpy()
        return preds.mean(axis=0), preds.var(axis=0)
