"""What a newcomer meets on the command line: one configuration for every command, errors that
blame what was actually wrong, a quick "no service", and `replay`'s pixel-size checks."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from elit_stream.service.config import ConfigError
from elit_stream.tools.launcher import ServiceProcess
from elit_stream.tools.settings import client_settings, connect_address

CLI = [sys.executable, "-m", "elit_stream.tools.cli"]


def run_cli(*args, env=None, timeout=120):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ELIT_")}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, check=False,
                          timeout=timeout, env={**clean, **(env or {})})


@pytest.fixture
def no_elit_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("ELIT_"):
            monkeypatch.delenv(k)
    return monkeypatch


# ------------------------------------------------------------------------ client settings
def test_options_beat_environment_beat_file_beat_defaults(tmp_path, no_elit_env):
    cfg = tmp_path / "elit.toml"
    cfg.write_text('[endpoints]\ncontrol = "tcp://*:6557"\nresults = "tcp://0.0.0.0:6556"\n'
                   '[client]\ntimeout_s = 2.5\n')
    s = client_settings(str(cfg))
    assert s.endpoints == {"ingest": "tcp://127.0.0.1:5555", "results": "tcp://127.0.0.1:6556",
                           "control": "tcp://127.0.0.1:6557"} and s.timeout_s == 2.5
    no_elit_env.setenv("ELIT_ENDPOINTS__CONTROL", "tcp://127.0.0.1:7557")
    assert client_settings(str(cfg)).endpoints["control"] == "tcp://127.0.0.1:7557"
    flags = {"--control": "tcp://127.0.0.1:8557"}
    assert client_settings(str(cfg), flags).endpoints["control"] == "tcp://127.0.0.1:8557"
    no_elit_env.setenv("ELIT_CONFIG", str(cfg))             # the file without --config
    assert client_settings().timeout_s == 2.5


def test_client_errors_name_their_source(tmp_path, no_elit_env):
    with pytest.raises(ConfigError, match=r"option --control: 'localhost:5557' is not a ZeroMQ"):
        client_settings(None, {"--control": "localhost:5557"})
    no_elit_env.setenv("ELIT_CLIENT__TIMEOUT_S", "soon")
    with pytest.raises(ConfigError, match=r"environment variable ELIT_CLIENT__TIMEOUT_S: 'soon' "
                                          r"is not a number of seconds > 0"):
        client_settings()
    with pytest.raises(ConfigError, match=r"is port 0 \(the service picks a free port"):
        connect_address("tcp://127.0.0.1:0", "config file x.toml")


def test_the_service_accepts_a_file_with_a_client_section(tmp_path):
    from elit_stream.service.config import load_config
    cfg = tmp_path / "elit.toml"
    cfg.write_text('[client]\ntimeout_s = 3\nserver_key = "keys/server.key"\n')
    assert load_config(cfg).client.timeout_s == 3


# ------------------------------------------------------------------------ errors
def test_a_bad_option_is_blamed_not_an_environment_variable():
    out = run_cli("serve", "--threads", "0", "--no-metrics")
    assert out.returncode == 2
    assert "model.threads: Input should be greater than or equal to 1 (got 0; option --threads)" \
        in out.stderr
    out = run_cli("serve", "--no-metrics", env={"ELIT_MODEL__THREADS": "0"})
    assert "(got '0'; environment variable ELIT_MODEL__THREADS)" in out.stderr


def test_ctl_without_a_service_says_so_at_the_configured_address(tmp_path):
    cfg = tmp_path / "elit.toml"
    cfg.write_text('[endpoints]\ncontrol = "tcp://127.0.0.1:1"\n[client]\ntimeout_s = 0.3\n')
    out = run_cli("ctl", "status", env={"ELIT_CONFIG": str(cfg)})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert ("elit-stream ctl: no service answers at tcp://127.0.0.1:1 (waited 0.3 s): is "
            "`elit-stream serve` running there?") in out.stderr


def test_ctl_waits_five_seconds_by_default_and_longer_for_load_model():
    from elit_stream.tools.cli import build_parser
    from elit_stream.tools.settings import CTL_TIMEOUT_S, LOAD_TIMEOUT_S
    assert CTL_TIMEOUT_S == 5.0 and LOAD_TIMEOUT_S == 120.0
    assert build_parser().parse_args(["ctl", "status"]).timeout is None   # -> the config's


@pytest.mark.parametrize("value", ["0", "-14", "nan", "abc"])
def test_replay_refuses_a_pixel_size_that_is_not_positive(tmp_path, value):
    out = run_cli("replay", tmp_path / "m.npy", "--pixel-size-pm", value)
    assert out.returncode == 2
    assert f"argument --pixel-size-pm: '{value}' is not a pixel size: give picometres > 0" \
        in out.stderr


def test_every_option_says_what_it_does_and_its_default():
    from elit_stream.tools.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("serve", "replay", "ctl", "config", "demo", "keys"):
        for action in sub[name]._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help"
            if action.option_strings and action.default is not True:
                text = action.help.lower()
                assert "default" in text, f"{name} {action.option_strings}: no default said"


# ------------------------------------------------------------------------ replay, live
@pytest.fixture(scope="module")
def service(tiny_artifact):
    with ServiceProcess(["--model", str(tiny_artifact), "--threads", "1"]) as sp:
        yield sp


def _endpoint_env(service) -> dict:
    return {f"ELIT_ENDPOINTS__{n.upper()}": service.endpoints[n]
            for n in ("ingest", "results", "control")}


@pytest.mark.slow
def test_replay_finds_the_service_through_the_environment_and_converts_int16(service, tmp_path):
    movie = tmp_path / "signed.npy"
    np.save(movie, (np.random.default_rng(1).random((3, 48, 48)) * 900 - 100).astype(np.int16))
    out = run_cli("replay", movie, "--pixel-size-pm", 20, env=_endpoint_env(service))
    assert out.returncode == 0, out.stderr
    assert f"note: {movie}: int16 pixels converted to float32 for sending" in out.stderr
    assert "sent 3: 3 results, 0 dropped, 0 rejected" in out.stdout


@pytest.mark.slow
def test_replay_warns_when_the_pixel_size_is_missing_or_far_off(service, tmp_path):
    movie = tmp_path / "plain.tif"
    tifffile.imwrite(movie, np.zeros((2, 40, 40), np.uint16) + 7, photometric="minisblack")
    out = run_cli("replay", movie, env=_endpoint_env(service))
    assert out.returncode == 0, out.stderr
    assert (f"warning: {movie} carries no pixel size and no --pixel-size-pm was given: the "
            "service assumes the model's, 14.1 pm") in out.stderr
    out = run_cli("replay", movie, "--pixel-size-pm", 141, env=_endpoint_env(service))  # typo
    assert ("warning: 141 pm is 10x the model's 14.1 pm: every 40x40 frame is rescaled to "
            "400x400 px before the networks see it") in out.stderr
    assert "pixel size 141 pm (--pixel-size-pm); the model's is 14.1 pm" in out.stdout


@pytest.mark.slow
def test_replay_without_a_service_says_so(tmp_path):
    movie = tmp_path / "m.npy"
    np.save(movie, np.zeros((1, 8, 8), np.uint16))
    out = run_cli("replay", movie, "--control", "tcp://127.0.0.1:1",
                  env={"ELIT_CLIENT__TIMEOUT_S": "0.3"})
    assert out.returncode == 2
    assert "no service answers at tcp://127.0.0.1:1 (waited 0.3 s)" in out.stderr


# ------------------------------------------------------------------------ the sample movie
def test_the_shipped_sample_is_the_documented_movie():
    """samples/README.md: pixel size 14.0 pm, ground truth inside, made by the command it shows
    (a new numpy whose random streams changed would fail here: regenerate the file then)."""
    from pathlib import Path

    from elit_stream.tools.movie import load_movie, make_movie
    path = Path(__file__).resolve().parents[1] / "samples" / "graphene-14pm.npz"
    assert path.stat().st_size < 2_000_000
    shipped = load_movie(path)
    assert shipped.pixel_size_pm == 14.0 and shipped.frames.shape == (10, 256, 256)
    assert sum(len(a) for a in shipped.xy) == 4636
    again = make_movie(n_frames=10, size_px=256, seed=0, pixel_size_pm=14.0)
    for t in range(10):
        np.testing.assert_array_equal(shipped.xy[t], again.xy[t])
        np.testing.assert_array_equal(shipped.cls[t], again.cls[t])
    np.testing.assert_array_equal(shipped.frames, again.frames)


def test_the_bf16_hint_says_what_changes(monkeypatch):
    """Where it is printed (fp32 on a CPU with bf16 and OpenVINO), the hint names the measured
    consequences, not only the speed-up."""
    from elit_stream.core import engine
    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(engine.importlib.util, "find_spec", lambda name, *a: object())
    hint = engine.bf16_hint(engine.CPU, "fp32")
    assert "--precision bf16 runs ~3.5x faster. What changes: the probability maps differ " \
           "from fp32 by up to ~0.02" in hint
    assert "4-5 of 15,876" in hint and "docs/benchmarks.md" in hint
