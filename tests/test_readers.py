"""Microscope files for `replay`: formats, the pixel size they carry, one-line errors, pixel types."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from elit_stream.tools import readers
from elit_stream.tools.readers import StackError, read_movie
from elit_stream.tools.replay import sendable

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_rsciio = pytest.mark.skipif(readers.importlib.util.find_spec("rsciio") is None,
                                  reason="the io extra (RosettaSciIO) is not installed")


@pytest.fixture
def stack():
    return (np.random.default_rng(0).random((3, 40, 48)) * 1000).astype(np.uint16)


def _rsciio_signal(data, scale, units):
    """A signal dict as RosettaSciIO's writers take it: frames navigate, rows/columns are signal."""
    axes = [{"name": "time", "size": data.shape[0], "scale": 1.0, "offset": 0.0, "units": "s",
             "navigate": True}] + [{"name": n, "size": s, "scale": scale, "offset": 0.0,
                                    "units": units, "navigate": False}
                                   for n, s in zip("yx", data.shape[1:])]
    return {"data": data, "axes": axes, "original_metadata": {}, "tmp_parameters": {},
            "metadata": {"General": {"title": "t"}, "Signal": {"signal_type": ""}},
            "attributes": {"_lazy": False}, "learning_results": {}, "models": {},
            "package_info": {"name": "elit-stream", "version": "test"}}


@needs_rsciio
def test_imagej_tiff_scale_in_nm_gives_the_pixel_size(tmp_path, stack):
    p = tmp_path / "scan.tif"
    tifffile.imwrite(p, stack, imagej=True, resolution=(1 / 0.0141, 1 / 0.0141),
                     metadata={"unit": "nm", "axes": "ZYX"})
    movie = read_movie(p)
    assert movie.frames.shape == (3, 40, 48)
    assert movie.pixel_size_pm == pytest.approx(14.1)
    assert "0.0141 nm per pixel" in movie.pixel_size_from


@needs_rsciio
def test_tiff_resolution_tags_in_cm_count_but_72_dpi_does_not(tmp_path, stack):
    scale = tmp_path / "cm.tif"
    tifffile.imwrite(scale, stack[0], resolution=(1 / 1.41e-9, 1 / 1.41e-9),
                     resolutionunit="CENTIMETER")
    assert read_movie(scale).pixel_size_pm == pytest.approx(14.1)
    display = tmp_path / "dpi.tif"
    tifffile.imwrite(display, stack[0], resolution=(72, 72), resolutionunit="INCH")
    assert read_movie(display).pixel_size_pm is None


def test_plain_tiff_has_no_pixel_size(tmp_path, stack):
    p = tmp_path / "plain.tif"
    tifffile.imwrite(p, stack, photometric="minisblack")
    movie = read_movie(p)
    np.testing.assert_array_equal(np.asarray(movie.frames), stack)
    assert movie.pixel_size_pm is None


def test_rgb_tiff_is_refused_not_read_as_frames(tmp_path):
    p = tmp_path / "colour.tif"
    tifffile.imwrite(p, np.zeros((300, 32, 3), np.uint8), photometric="rgb")
    with pytest.raises(StackError, match=r"colour.tif: a colour \(RGB\) TIFF, shape \(300, 32, "
                                         r"3\); save the detector's grey-level image"):
        read_movie(p)


@needs_rsciio
@pytest.mark.parametrize("suffix", ["hspy", "emd"])
def test_hspy_and_emd_with_their_axis_scale(tmp_path, stack, suffix):
    import importlib
    writer = importlib.import_module(f"rsciio.{suffix}").file_writer
    p = tmp_path / f"movie.{suffix}"
    writer(str(p), _rsciio_signal(stack, 0.0141, "nm"))
    movie = read_movie(p)
    np.testing.assert_array_equal(np.asarray(movie.frames), stack)
    assert movie.pixel_size_pm == pytest.approx(14.1)


@needs_rsciio
@pytest.mark.skipif(not (SHARED / "Acquisition_18.emd").is_file(), reason="../shared absent")
def test_a_real_berkeley_emd_file():
    movie = read_movie(SHARED / "Acquisition_18.emd")
    assert movie.frames.shape == (1, 1024, 1024) and movie.frames.dtype == np.uint16
    assert movie.pixel_size_pm == pytest.approx(12.25, abs=0.01)   # its units are spelt "n_m"


def test_dm4_without_rosettasciio_says_what_to_install(tmp_path, monkeypatch):
    p = tmp_path / "scan.dm4"
    p.write_bytes(b"\0" * 64)
    real = readers.importlib.util.find_spec
    monkeypatch.setattr(readers.importlib.util, "find_spec",
                        lambda name, *a: None if name == "rsciio" else real(name, *a))
    with pytest.raises(StackError, match=r"scan.dm4: reading .dm4 files needs RosettaSciIO: "
                                         r"pip install 'elit-stream\[io\]'"):
        read_movie(p)


@needs_rsciio
def test_a_broken_dm3_is_one_line_naming_the_file(tmp_path):
    p = tmp_path / "broken.dm3"
    p.write_bytes(b"not a Gatan file at all" * 4)
    with pytest.raises(StackError) as err:
        read_movie(p)
    assert str(err.value).startswith(f"{p}: cannot read (") and "\n" not in str(err.value)


def test_a_2d_hdf5_dataset_is_one_frame(tmp_path, stack):
    p = tmp_path / "image.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("image", data=stack[0]).attrs["pixel_size_pm"] = 20.0
    movie = read_movie(p)
    assert movie.frames.shape == (1, 40, 48) and movie.pixel_size_pm == 20.0


def test_a_text_file_named_npy(tmp_path):
    p = tmp_path / "frame.npy"
    p.write_text("1 2 3\n4 5 6\n")
    with pytest.raises(StackError, match=r"frame.npy: not a NumPy .npy file \(it starts with "
                                         r"b'1 2 3\\n'\); a text file\? load it with "
                                         r"numpy.loadtxt"):
        read_movie(p)


@pytest.mark.parametrize("bad", [0.0, -14.0])
def test_a_file_with_zero_or_negative_pixel_size_is_refused(tmp_path, stack, bad):
    p = tmp_path / "bad.npz"
    np.savez(p, frames=stack, pixel_size_pm=bad)
    with pytest.raises(StackError, match=rf"bad.npz: the file gives a pixel size of {bad} pm "
                                         r"\(the file's pixel_size_pm field\); pass the right "
                                         r"one with --pixel-size-pm"):
        read_movie(p)


@pytest.mark.parametrize("dtype,note", [
    ("int16", "m.npy: int16 pixels converted to float32 for sending"),
    ("int64", "values beyond +-16,777,216 are rounded"),
    ("float16", "float16 pixels converted to float32")])
def test_pixel_types_the_service_refuses_are_converted_once(stack, dtype, note):
    frames, said = sendable(stack.astype(dtype), "m.npy")
    out = list(frames)
    assert note in said
    assert all(f.dtype == np.float32 for f in out)
    np.testing.assert_array_equal(np.stack(out), stack.astype(np.float32))


def test_sendable_types_pass_unchanged(stack):
    frames, said = sendable(stack, "m.npy")
    assert frames is stack and said is None
    with pytest.raises(StackError, match="pixels of type complex64 cannot be sent"):
        sendable(stack.astype(np.complex64), "m.npy")
