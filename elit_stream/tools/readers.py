"""Read a movie (or one image) from a file: frames [T, H, W] and the pixel size it carries.

Microscope formats go through RosettaSciIO (HyperSpy's I/O library, the `io` extra), which knows
their axis scales: Gatan `.dm3`/`.dm4`, `.emd` (Velox and Berkeley), HyperSpy `.hspy` and TIFF
(ImageJ, DigitalMicrograph, FEI, Zeiss, … scale tags). `.npy`, `.npz` (array `frames`, optional
scalar `pixel_size_pm`, e.g. `movie.save_movie`) and HDF5 (`.h5`/`.hdf5`; dataset attribute
`pixel_size_pm`) are read here. Without the extra, TIFF is still read (tifffile), without its scale.

Every failure is one `StackError` line naming the file and what was wrong with it.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NPY_MAGIC = b"\x93NUMPY"
RSCIIO_PLUGINS = {".dm3": "digitalmicrograph", ".dm4": "digitalmicrograph", ".emd": "emd",
                  ".hspy": "hspy", ".tif": "tiff", ".tiff": "tiff"}
H5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs")
KNOWN = ".npy, .npz, .h5/.hdf5, .tif/.tiff, .dm3/.dm4, .emd, .hspy"
# length units (as RosettaSciIO / ImageJ / DM spell them) -> picometres
PM_PER_UNIT = {"m": 1e12, "mm": 1e9, "µm": 1e6, "μm": 1e6, "um": 1e6, "micron": 1e6,
               "microns": 1e6, "nm": 1e3, "\u00c5": 100.0, "\u212b": 100.0, "A": 100.0,
               "angstrom": 100.0, "pm": 1.0}


class StackError(ValueError):
    """A file cannot be read as a stack of 2-D frames; the message names the file and why."""


@dataclass
class Stack:
    """What a file holds: frames [T, H, W] (an array, memory map or h5py dataset), its pixel
    size (None when the file carries none) and where that came from."""

    frames: object
    pixel_size_pm: float | None = None
    pixel_size_from: str = ""                       # e.g. "the file's pixel_size_pm field"
    notes: list[str] = field(default_factory=list)  # things the reader assumed


def read_stack(path: str | Path, dataset: str | None = None) -> tuple[object, float | None]:
    """-> (frames [T, H, W], pixel_size_pm or None); see `read_movie`."""
    stack = read_movie(path, dataset)
    return stack.frames, stack.pixel_size_pm


def read_movie(path: str | Path, dataset: str | None = None) -> Stack:
    """Read `path` by its suffix; `dataset` names the HDF5 dataset (default: the first 2-D/3-D)."""
    p = Path(path)
    if not p.is_file():
        raise StackError(f"{p}: no such file")
    suffix = p.suffix.lower()
    readers = {".npy": _read_npy, ".npz": _read_npz}
    try:
        if suffix in readers:
            stack = readers[suffix](p)
        elif suffix in H5_SUFFIXES:
            stack = _read_h5(p, dataset)
        elif suffix in RSCIIO_PLUGINS:
            stack = _read_with_rsciio(p, RSCIIO_PLUGINS[suffix])
        else:
            raise StackError(f"{p}: unknown file type {suffix!r} (use {KNOWN})")
    except StackError:
        raise
    except Exception as exc:  # noqa: BLE001 - an unreadable file: say which and why, in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise StackError(f"{p}: cannot read ({type(exc).__name__}: {first})") from None
    stack.frames = _as_stack(stack.frames, p)
    if stack.pixel_size_pm is not None and not stack.pixel_size_pm > 0:
        raise StackError(f"{p}: the file gives a pixel size of {stack.pixel_size_pm} pm "
                         f"({stack.pixel_size_from}); pass the right one with --pixel-size-pm")
    return stack


def _as_stack(a, p: Path):
    if a.dtype.names is not None:
        raise StackError(f"{p}: colour (RGB) pixels {a.dtype.names}; save the detector's "
                         "grey-level image instead")
    if a.dtype == object:
        raise StackError(f"{p}: holds Python objects, not pixels")
    if a.ndim == 2:
        return np.asarray(a)[None]
    if a.ndim != 3:
        raise StackError(f"{p}: need a 2-D frame or a 3-D stack [T, H, W], got shape {a.shape}")
    return a


def _read_npy(p: Path) -> Stack:
    with open(p, "rb") as f:
        head = f.read(len(NPY_MAGIC))
    if head != NPY_MAGIC:
        raise StackError(f"{p}: not a NumPy .npy file (it starts with {head!r}); a text file? "
                         "load it with numpy.loadtxt and write it with numpy.save")
    return Stack(np.load(p, mmap_mode="r", allow_pickle=False))


def _read_npz(p: Path) -> Stack:
    with np.load(p, allow_pickle=False) as z:
        if "frames" not in z.files:
            raise StackError(f"{p}: no 'frames' array (has {z.files})")
        if "pixel_size_pm" not in z.files:
            return Stack(z["frames"])
        return Stack(z["frames"], float(z["pixel_size_pm"]), "the file's pixel_size_pm field")


def _read_h5(p: Path, dataset: str | None) -> Stack:
    import h5py
    f = h5py.File(p, "r")
    if dataset is None:
        found: list[str] = []
        f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset)
                     and obj.ndim in (2, 3) and not found else None)
        if not found:
            raise StackError(f"{p}: no 2-D or 3-D dataset inside (name one with --dataset)")
        dataset = found[0]
    if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
        raise StackError(f"{p}: no dataset {dataset!r}")
    ds = f[dataset]
    ps = ds.attrs.get("pixel_size_pm")
    frames = ds[()] if ds.ndim == 2 else ds          # one frame: in memory; a stack: lazily
    if ps is None:
        return Stack(frames)
    return Stack(frames, float(np.asarray(ps).ravel()[0]),
                 f"attribute pixel_size_pm of dataset {dataset!r}")


# ---------------------------------------------------------------------- RosettaSciIO formats
def _read_with_rsciio(p: Path, plugin: str) -> Stack:
    if plugin == "tiff":
        _refuse_colour_tiff(p)
    if importlib.util.find_spec("rsciio") is None:
        if plugin == "tiff":
            import tifffile
            note = ("pixel size not read: reading TIFF scale tags needs RosettaSciIO "
                    "(pip install 'elit-stream[io]')")
            return Stack(tifffile.imread(p), notes=[note])
        raise StackError(f"{p}: reading {p.suffix} files needs RosettaSciIO: "
                         "pip install 'elit-stream[io]'")
    reader = importlib.import_module(f"rsciio.{plugin}").file_reader
    signals = [s for s in reader(str(p)) if _signal_dims(s) >= 2]
    if not signals:
        raise StackError(f"{p}: no image inside (RosettaSciIO found no signal with two "
                         "spatial axes)")
    sig = signals[0]
    data = np.asarray(sig["data"])
    if data.ndim > 3:
        raise StackError(f"{p}: {data.ndim}-D data {data.shape} (e.g. 4-D STEM), not a movie "
                         "of 2-D frames")
    ps, source = _pixel_size_from_axes(sig["axes"])
    if ps is None and plugin == "tiff":
        ps, source = _tiff_tag_pixel_size(p)
    return Stack(data, ps, source)


def _signal_dims(sig: dict) -> int:
    return sum(1 for ax in sig["axes"] if not ax.get("navigate", False))


def _pixel_size_from_axes(axes: list[dict]) -> tuple[float | None, str]:
    """The last (column) signal axis' scale in pm, when its unit is a length."""
    spatial = [ax for ax in axes if not ax.get("navigate", False)]
    ax = spatial[-1]
    unit = str(ax.get("units") or "").strip().replace("_", "")   # Berkeley EMD writes "n_m"
    if unit not in PM_PER_UNIT:
        return None, ""
    scale = float(ax.get("scale", 1.0))
    return scale * PM_PER_UNIT[unit], f"the file's axis scale, {scale:g} {unit} per pixel"


def _refuse_colour_tiff(p: Path) -> None:
    import tifffile
    with tifffile.TiffFile(p) as tif:
        page = tif.pages[0]
        if page.photometric == tifffile.PHOTOMETRIC.RGB or page.samplesperpixel > 1:
            raise StackError(f"{p}: a colour (RGB) TIFF, shape {tif.series[0].shape}; save "
                             "the detector's grey-level image (one channel) instead")


def _tiff_tag_pixel_size(p: Path) -> tuple[float | None, str]:
    """ImageJ's unit (RosettaSciIO converts only 'micron'), else resolution tags in cm / inch
    when they give a microscope's scale (< 1 µm per pixel; 72 dpi is a display setting)."""
    import tifffile
    with tifffile.TiffFile(p) as tif:
        page = tif.pages[0]
        unit = str((tif.imagej_metadata or {}).get("unit", "")).strip()
        if unit not in PM_PER_UNIT:
            unit = {tifffile.RESUNIT.CENTIMETER: "cm", tifffile.RESUNIT.INCH: "inch"}.get(
                page.tags.valueof("ResolutionUnit"), "")
        xres = page.tags.valueof("XResolution")
    pm_per_unit = {**PM_PER_UNIT, "cm": 1e10, "inch": 2.54e10}.get(unit)
    if pm_per_unit is None or not xres or xres[0] <= 0:
        return None, ""
    scale = xres[1] / xres[0]
    if unit in ("cm", "inch") and scale * pm_per_unit >= 1e6:
        return None, ""
    return scale * pm_per_unit, f"the TIFF scale, {scale:g} {unit} per pixel"
