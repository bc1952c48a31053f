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


def member_grid_png(frames: list[np.ndarray], probs: list[np.ndarray], manifest: dict, path: Path,
                    titles: list[str] | None = None) -> None:
    """Rows: input, each member, mean, std; columns: frames. Colour: green = lattice class,
    magenta = impurity class (if any)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_members = probs[0].shape[0]
    rows = n_members + 3
    fig, axes = plt.subplots(rows, len(frames), figsize=(2.2 * len(frames), 2.2 * rows), squeeze=False)
    for col, (frame, p) in enumerate(zip(frames, probs)):
        axes[0, col].imshow(frame, cmap="gray")
        axes[0, col].set_title(titles[col] if titles else f"frame {col}", fontsize=8)
        for m in range(n_members):
            axes[1 + m, col].imshow(_rgb(p[m]))
        axes[-2, col].imshow(_rgb(p.mean(0)))
        axes[-1, col].imshow(p.std(0).sum(0), cmap="magma")
    labels = ["input"] + [f"member {m['id']}" for m in manifest["members"]] + ["mean", "std (sum)"]
    for row, label in enumerate(labels):
        axes[row, 0].set_ylabel(label, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _rgb(p: np.ndarray) -> np.ndarray:
    """[C, H, W] probabilities → RGB: class 0 green, class 1 magenta."""
    rgb = np.zeros(p.shape[1:] + (3,), np.float32)
    rgb[..., 1] = p[0]
    if p.shape[0] > 1:
        rgb[..., 0] = p[1]
        rgb[..., 2] = p[1]
    return np.clip(rgb, 0, 1)
