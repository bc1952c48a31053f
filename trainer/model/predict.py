"""Apply an exported ensemble to images offline and draw member-by-member prediction grids.

Runs the artifact with onnxruntime (the same graph the service runs), so what the grid shows is what
the service will see. Reads ``.npy``, ``.npz``, TIFF and HDF5/EMD files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from trainer.model.artifact import normalise_minmax, read_manifest


def read_frames(path: Path, key: str | None = None) -> np.ndarray:
    """A frame or stack from a file, as ``[T, H, W]``; raises ValueError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            data = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                name = key or ("frames" if "frames" in z else "images" if "images" in z else z.files[0])
                data = z[name]
        elif suffix in (".tif", ".tiff"):
            import tifffile
            data = tifffile.imread(path)
        elif suffix in (".h5", ".hdf5", ".emd"):
            data = _read_hdf5(path, key)
        else:
            raise ValueError(f"{path}: unsupported file type {suffix!r} "
                             "(use .npy, .npz, .tif/.tiff, .h5/.hdf5/.emd)")
    except (OSError, KeyError) as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from None
    data = np.squeeze(np.asarray(data))
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 2-D image or a 3-D stack, got shape {data.shape}")
    return data


def _read_hdf5(path: Path, key: str | None) -> np.ndarray:
    import h5py

    with h5py.File(path, "r") as f:
        if key is not None:
            return f[key][()]
        found = []
        f.visititems(lambda name, obj: found.append(name)
                     if isinstance(obj, h5py.Dataset) and obj.ndim in (2, 3) and obj.size > 1024 else None)
        if not found:
            raise ValueError(f"{path}: no 2-D or 3-D dataset inside; name one with --key")
        return f[found[0]][()]


class EnsembleRunner:
    """The artifact under onnxruntime: ``probs(frame, pixel_size_pm) -> [M, C, H, W]`` on the
    frame's own grid (rescaled to the training pixel size and back, padded to valid sizes)."""

    def __init__(self, artifact_dir: Path):
        import onnxruntime as ort

        self.manifest = read_manifest(artifact_dir)
        self.session = ort.InferenceSession(str(Path(artifact_dir) / self.manifest["model"]["file"]),
                                            providers=["CPUExecutionProvider"])
        self.multiple = self.manifest["input_size"]["multiple_of"]

    def probs(self, frame: np.ndarray, pixel_size_pm: float | None = None) -> np.ndarray:
        frame = frame.astype(np.float32)
        scale = 1.0 if pixel_size_pm is None else pixel_size_pm / self.manifest["pixel_size_pm"]
        net = ndimage.zoom(frame, scale, order=1) if abs(scale - 1) > 0.01 else frame
        net = normalise_minmax(net)
        h, w = net.shape
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        padded = np.pad(net, ((0, ph), (0, pw)), mode="reflect")
        out = self.session.run(["probs"], {"frame": padded[None, None]})[0][:, :, :h, :w]
        if net.shape != frame.shape:
            zoom = (1, 1, frame.shape[0] / h, frame.shape[1] / w)
            out = ndimage.zoom(out, zoom, order=1)
        return out


GRID_COLS = 4
PANEL_IN = 3.0                      # inches per panel: readable at 100 dpi


def member_grid_png(frames: list[np.ndarray], probs: list[np.ndarray], manifest: dict, path: Path,
                    titles: list[str] | None = None) -> None:
    """One block of panels per image: the input, the ensemble mean, the spread (std) and every
    member, each member titled with what it finds (atoms, agreement with the mean, its test IoU
    from the manifest), and a legend panel saying what the colours mean."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_members = probs[0].shape[0]
    per_image = -(-(n_members + 4) // GRID_COLS)          # rows of panels per image
    fig, axes = plt.subplots(per_image * len(frames), GRID_COLS, squeeze=False,
                             figsize=(PANEL_IN * GRID_COLS, PANEL_IN * per_image * len(frames)))
    for i, (frame, p) in enumerate(zip(frames, probs)):
        block = axes[i * per_image:(i + 1) * per_image].ravel()
        _image_block(block, frame, p, manifest, titles[i] if titles else f"image {i}", fig)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _image_block(block, frame: np.ndarray, p: np.ndarray, manifest: dict, title: str, fig) -> None:
    mean = p.mean(0)
    mean_mask = mean.sum(0) > 0.5
    block[0].imshow(frame, cmap="gray")
    block[0].set_title(f"{title}\ninput {frame.shape[1]}x{frame.shape[0]} px", fontsize=9)
    block[1].imshow(_rgb(mean))
    block[1].set_title(f"ensemble mean: {_count_atoms(mean)} atoms", fontsize=9)
    spread = block[2].imshow(p.std(0).sum(0), cmap="magma", vmin=0)
    block[2].set_title("spread: std over members", fontsize=9)
    fig.colorbar(spread, ax=block[2], fraction=0.046, pad=0.02)
    for k, member in enumerate(manifest["members"]):
        mask = p[k].sum(0) > 0.5
        iou = (mask & mean_mask).sum() / max((mask | mean_mask).sum(), 1)
        test = f", test IoU {member['test_iou']:.2f}" if "test_iou" in member else ""
        block[3 + k].imshow(_rgb(p[k]))
        block[3 + k].set_title(f"member {member['id']}: {_count_atoms(p[k])} atoms\n"
                               f"IoU vs mean {iou:.2f}{test}", fontsize=9)
    _legend_panel(block[-1], manifest)
    for ax in block:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in block[3 + len(manifest["members"]):-1]:
        ax.set_axis_off()


def _count_atoms(p: np.ndarray) -> int:
    """Connected regions where the summed class probability exceeds 0.5."""
    return int(ndimage.label(p.sum(0) > 0.5)[1])


def _legend_panel(ax, manifest: dict) -> None:
    names = [c["name"] if isinstance(c, dict) else str(c) for c in manifest.get("classes", [])]
    lines = ["colour = probability of a class", "(brighter = more certain)"]
    colours = ["#00ff00", "#ff00ff"]
    ax.set_facecolor("black")
    for k, name in enumerate(names[:2]):
        ax.text(0.05, 0.78 - 0.14 * k, f"\u25a0 {name}", color=colours[k], fontsize=11,
                transform=ax.transAxes)
    ax.text(0.05, 0.35, "\n".join(lines + ["spread: where members", "disagree (std, summed",
                                            "over classes)"]),
            color="white", fontsize=8, transform=ax.transAxes, va="top")
    ax.set_title("legend", fontsize=9)


def _rgb(p: np.ndarray) -> np.ndarray:
    """[C, H, W] probabilities → RGB: class 0 green, class 1 magenta."""
    rgb = np.zeros(p.shape[1:] + (3,), np.float32)
    rgb[..., 1] = p[0]
    if p.shape[0] > 1:
        rgb[..., 0] = p[1]
        rgb[..., 2] = p[1]
    return np.clip(rgb, 0, 1)
