"""The command line and replay: stacks in every format, recording, ctl, clear errors."""
from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import tifffile

from elit_stream.tools.cli import parse_ctl_args
from elit_stream.tools.launcher import ServiceProcess
from elit_stream.tools.movie import make_movie, save_movie
from elit_stream.tools.replay import StackError, read_stack

CLI = [sys.executable, "-m", "elit_stream.tools.cli"]


def run_cli(*args, timeout=120):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, check=False,
                          timeout=timeout)


@pytest.fixture(scope="module")
def stack():
    return (np.random.default_rng(0).random((3, 40, 48)) * 1000).astype(np.uint16)


@pytest.mark.parametrize("fmt", ["npy", "npz", "tif", "h5"])
def test_read_stack_every_format(tmp_path, stack, fmt):
    p = tmp_path / f"movie.{fmt}"
    if fmt == "npy":
        np.save(p, stack)
    elif fmt == "npz":
        np.savez(p, frames=stack, pixel_size_pm=12.0)
    elif fmt == "tif":
        tifffile.imwrite(p, stack, photometric="minisblack")
    else:
        with h5py.File(p, "w") as f:
            f.create_dataset("meta/scalar", data=1.0)
            f.create_dataset("entry/data", data=stack).attrs["pixel_size_pm"] = 12.0
    frames, ps = read_stack(p)
    np.testing.assert_array_equal(np.asarray(frames), stack)
    assert ps == (12.0 if fmt in ("npz", "h5") else None)


def test_read_stack_movie_format_and_single_frames(tmp_path, stack):
    mov = make_movie(n_frames=2, size_px=32, seed=1)
    frames, ps = read_stack(save_movie(mov, tmp_path / "m.npz"))
    assert frames.shape == (2, 32, 32) and ps == mov.pixel_size_pm
    np.save(tmp_path / "one.npy", stack[0])
    assert read_stack(tmp_path / "one.npy")[0].shape == (1, 40, 48)


@pytest.mark.parametrize("name,content,match", [
    ("missing.npy", None, "no such file"),
    ("x.txt", b"hello", "unknown file type"),
    ("bad.npy", b"not numpy", "not a NumPy .npy file"),
    ("vec.npy", "1d", "2-D frame or a 3-D stack"),
    ("nof.npz", "nof", "no 'frames'"),
])
def test_read_stack_errors_are_clear(tmp_path, name, content, match):
    p = tmp_path / name
    if content == "1d":
        np.save(p, np.zeros(5))
    elif content == "nof":
        np.savez(p, other=np.zeros((2, 2)))
    elif content is not None:
        p.write_bytes(content)
    with pytest.raises(StackError, match=match):
        read_stack(p)


def test_parse_ctl_args():
    assert parse_ctl_args("deselect", ["3", "5"]) == {"members": [3, 5]}
    assert parse_ctl_args("set_params", ["threshold=0.4", "min_blob_px=2"]) == \
        {"threshold": 0.4, "min_blob_px": 2}
    assert parse_ctl_args("set_maps", ["mode=always"]) == {"mode": "always"}
    assert parse_ctl_args("load_model", ["not-here"]) == {"path": "not-here"}


@pytest.fixture(scope="module")
def service(tiny_artifact):
    with ServiceProcess(["--model", str(tiny_artifact), "--threads", "1"]) as sp:
        yield sp


@pytest.mark.slow
def test_replay_cli_records_every_result(service, tmp_path):
    mov = make_movie(n_frames=4, size_px=64, seed=2, pixel_size_pm=14.1)
    movie = save_movie(mov, tmp_path / "movie.npz")
    rec = tmp_path / "results.jsonl"
    ep = service.endpoints
    out = run_cli("replay", movie, "--ingest", ep["ingest"], "--results", ep["results"],
                  "--control", ep["control"], "--record", rec, "--rate", 50)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "sent 4: 4 results, 0 dropped, 0 rejected" in out.stdout
    lines = [json.loads(line) for line in rec.read_text().splitlines()]
    results = [m for m in lines if m["topic"] == "result"]
    assert [m["frame_id"] for m in results] == [0, 1, 2, 3]
    assert all(len(m["atoms"]["x"]) == m["n_atoms"] for m in results)
    assert {"cls_prob", "cls_agree"} <= set(results[0]["atoms"]) and "ood" in results[0]
    assert results[0]["pixel_size_pm"] == pytest.approx(14.1)


@pytest.mark.slow
def test_ctl_cli_prints_the_reply_and_fails_on_refusal(service):
    ep = service.endpoints["control"]
    out = run_cli("ctl", "status", "--control", ep)
    assert out.returncode == 0 and json.loads(out.stdout)["model"]["name"] == "tiny"
    out = run_cli("ctl", "deselect", "9", "--control", ep)
    assert out.returncode == 1 and json.loads(out.stdout)["error"]["code"] == "unknown_member"


@pytest.mark.slow
def test_clear_errors_without_tracebacks(service, tmp_path):
    busy = run_cli("serve", "--model", service_model(service), "--ingest",
                   service.endpoints["ingest"], "--results", "tcp://127.0.0.1:0", "--control",
                   "tcp://127.0.0.1:0", "--no-metrics")
    missing_model = run_cli("serve", "--model", tmp_path / "nope", "--no-metrics")
    missing_movie = run_cli("replay", tmp_path / "nope.tif")
    no_service = run_cli("ctl", "ping", "--control", "tcp://127.0.0.1:1", "--timeout", "0.5")
    bad_arg = run_cli("serve", "--delivery", "sometimes")
    for out, text in ((busy, "cannot bind"), (missing_model, "cannot load the model"),
                      (missing_movie, "no such file"),
                          (no_service, "no service answers at tcp://127.0.0.1:1"),
                      (bad_arg, "invalid choice")):
        assert out.returncode == 2, out.stderr
        assert text in out.stderr and "Traceback" not in out.stderr


def service_model(service):
    return json.loads(run_cli("ctl", "status", "--control",
                              service.endpoints["control"]).stdout)["model"]["path"]


def test_fast_scan_takes_words_or_the_header_codes_and_names_a_bad_one():
    """`--fast-scan -y` would be read as an option by argparse: the words work without '='."""
    import argparse

    from elit_stream.tools.cli import build_parser

    parser = build_parser()
    for given, want in (("up", "-y"), ("down", "y"), ("left", "-x"), ("right", "x"), ("Y", "y")):
        args = parser.parse_args(["replay", "m.npz", "--fast-scan", given])
        assert args.fast_scan == want
    assert parser.parse_args(["replay", "m.npz", "--fast-scan=-x"]).fast_scan == "-x"
    assert parser.parse_args(["replay", "m.npz"]).fast_scan is None     # the header stays out
    from elit_stream.tools.cli_common import fast_scan_arg
    with pytest.raises(argparse.ArgumentTypeError, match="right, left, down or up"):
        fast_scan_arg("sideways")
