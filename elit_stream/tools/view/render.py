"""Turn the service's messages into what the browser draws (pure numpy, no I/O).

The browser gets small 8-bit images (base64) and rounded atom columns as JSON; colour maps
are applied in the page. Downsampling for the browser happens here, once per frame, whatever
the number of pages open.

- `images(member_maps, ...)`: the frame as the members saw it (normalised network input),
  the uncertainty map = std over the ACTIVE members of each member's atom map (the same
  quantity whose 3x3 mean around a peak is an atom's `uncertainty`, docs/protocol.md), and a
  thumbnail of every member's atom map.
- `result_summary(result, ...)`: frame counter, atoms (frame pixels), per-member figures.
"""
from __future__ import annotations

import base64
import math

import numpy as np

MAX_ATOMS = 20_000


def step_for(shape: tuple[int, ...], max_px: int) -> int:
    """Smallest integer step that brings the longer side to at most `max_px`."""
    return max(1, math.ceil(max(shape[-2:]) / max_px))


def b64_u8(a: np.ndarray, lo: float, hi: float) -> str:
    """Scale [lo, hi] to 0..255 and base64 the bytes (row-major)."""
    span = hi - lo if hi > lo else 1.0
    u8 = np.clip((np.asarray(a, np.float32) - lo) * (255.0 / span), 0, 255).astype(np.uint8)
    return base64.b64encode(np.ascontiguousarray(u8).tobytes()).decode("ascii")


def _image(a: np.ndarray, lo: float, hi: float) -> dict:
    return {"h": int(a.shape[0]), "w": int(a.shape[1]), "data": b64_u8(a, lo, hi)}


def images(mm: dict, unc_max: float, max_px: int = 384, thumb_px: int = 96) -> dict:
    """Browser payload from a decoded `member_maps` message."""
    image = np.asarray(mm["image"], np.float32)              # [hi, wi]
    atom = np.asarray(mm["atom"], np.float32)                # [M, h, w], often coarser
    s, us, ts = (step_for(a.shape, n) for a, n in ((image, max_px), (atom, max_px),
                                                    (atom, thumb_px)))
    active = [int(i) for i in mm.get("active", range(atom.shape[0]))]
    unc = atom[active, ::us, ::us].std(axis=0) if active else np.zeros_like(atom[0, ::us, ::us])
    img = image[::s, ::s]
    lo, hi = np.percentile(img, (0.5, 99.5)) if img.size else (0.0, 1.0)
    per_map_px = float(mm["frame_px_per_map_px"])
    return {
        "frame_id": mm["frame_id"], "acquisition": mm["acquisition"],
        "active_version": mm.get("active_version"),
        "frame_px_per_px": float(mm.get("frame_px_per_image_px", per_map_px)) * s,
        "frame_px_per_thumb_px": per_map_px * ts,
        "image": _image(img, float(lo), float(hi)),
        "uncertainty": _image(unc, 0.0, unc_max), "unc_max": unc_max,
        "unc_frame_max": round(float(unc.max()) if unc.size else 0.0, 4),
        "members": [_image(atom[m, ::ts, ::ts], 0.0, 1.0) for m in range(atom.shape[0])],
    }


def result_summary(msg: dict, max_atoms: int = MAX_ATOMS) -> dict:
    """Browser payload from a decoded `result` message (atoms in input-frame pixels)."""
    atoms = msg.get("atoms") or {}
    n = min(int(msg.get("n_atoms", 0)), max_atoms)

    def col(name: str, nd: int) -> list:
        a = atoms.get(name)
        return [] if a is None else np.round(np.asarray(a[:n], np.float64), nd).tolist()
    return {
        "frame_id": msg["frame_id"], "acquisition": msg["acquisition"], "seq": msg.get("seq"),
        "frame_shape": msg.get("frame_shape"), "pixel_size_pm": msg.get("pixel_size_pm"),
        "n_atoms": msg.get("n_atoms", 0), "unconfirmed": int(msg.get("unconfirmed", 0)),
        "atoms_shown": n, "classes": msg.get("classes", []),
        "active": msg.get("active", []), "active_version": msg.get("active_version"),
        "model": (msg.get("model") or {}).get("name"),
        "count_per_member": msg.get("count_per_member", []),
        "disagreement_per_member": [round(float(d), 4)
                                    for d in msg.get("disagreement_per_member", [])],
        "mean_uncertainty": round(float(msg.get("mean_uncertainty", 0.0)), 4),
        "timings_ms": msg.get("timings_ms", {}),
        "atoms": {"x": col("x", 1), "y": col("y", 1),
                  "cls": [int(c) for c in atoms.get("cls", [])[:n]],
                  "u": col("spread" if "spread" in atoms else "uncertainty", 4)},
    }


def event_entry(doc: dict) -> dict | None:
    """An operator-readable line for the events the operator cares about (None: not shown)."""
    name = doc.get("event")
    if name == "drift_advisory":
        return {"kind": "advisory", "event": doc.get("advisory"), "members": doc.get("members"),
                "frame": doc.get("frame_id"), "text": doc.get("message", "")}
    if name == "subset_changed":
        return {"kind": "subset", "event": "subset_changed", "members": doc.get("active"),
                "text": f"active {doc.get('active')} (v{doc.get('active_version')}, "
                        f"{doc.get('cause')}) {doc.get('detail') or ''}".strip(),
                "active_version": doc.get("active_version")}
    if name == "model_loaded":
        model = (doc.get("model") or {}).get("name")
        return {"kind": "model", "event": name, "frame_seq": doc.get("from_frame_seq"),
                "text": f"model {model} loaded ({doc.get('precision')}, "
                        f"{len(doc.get('members') or [])} members)"}
    if name in ("params_changed", "error", "start", "stop"):
        detail = {k: v for k, v in doc.items() if k in ("params", "code", "message", "reason",
                                                        "exit_status")}
        return {"kind": "error" if name == "error" else "info", "event": name, "text": str(detail)}
    if name == "frame_rejected":
        return {"kind": "error", "event": name, "frame": (doc.get("frame") or {}).get("frame_id"),
                "text": f"{doc.get('code')}: {doc.get('message')}"}
    return None
