"""config: defaults < file < ELIT_* environment < overrides; errors name the key."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from elit_stream.service.config import ConfigError, dump_config, exposed_addresses, load_config


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os
    for key in list(os.environ):
        if key.startswith("ELIT_"):
            monkeypatch.delenv(key)


def test_defaults_bind_loopback_only():
    cfg = load_config()
    assert cfg.endpoints.ingest == "tcp://127.0.0.1:5555"
    assert cfg.endpoints.results == "tcp://127.0.0.1:5556"
    assert cfg.endpoints.control == "tcp://127.0.0.1:5557"
    assert (cfg.metrics.host, cfg.metrics.port) == ("127.0.0.1", 9108)
    assert cfg.delivery.mode == "lossless" and exposed_addresses(cfg) == []


def test_precedence_file_then_environment_then_overrides(tmp_path, monkeypatch):
    f = tmp_path / "c.toml"
    f.write_text('[delivery]\nmode = "latest"\ningest_hwm = 9\n[postprocess]\nthreshold = 0.4\n')
    cfg = load_config(f)
    assert (cfg.delivery.mode, cfg.delivery.ingest_hwm, cfg.postprocess.threshold) == \
        ("latest", 9, 0.4)
    monkeypatch.setenv("ELIT_DELIVERY__INGEST_HWM", "12")
    assert load_config(f).delivery.ingest_hwm == 12
    cfg = load_config(f, {"delivery.ingest_hwm": 3, "model.device": None})
    assert cfg.delivery.ingest_hwm == 3 and cfg.delivery.mode == "latest"


def test_json_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"maps": {"mode": "always", "downsample": 4}}))
    assert load_config(f).maps.downsample == 4


@pytest.mark.parametrize("text,key", [
    ('[delivery]\nmode = "fastest"\n', "delivery.mode"),
    ('[delivery]\ningest_hwm = 0\n', "delivery.ingest_hwm"),
    ('[endpoints]\ningest = "localhost:5555"\n', "endpoints.ingest"),
    ('[metrics]\nport = 70000\n', "metrics.port"),
    ('[delivery]\nspeed = 1\n', "delivery.speed"),
    ('colour = "red"\n', "colour"),
    ('[postprocess]\nthreshold = 1.5\n', "postprocess.threshold"),
    ('[policy]\nwindow = 0\n', "policy.window"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    assert key in str(exc.value)


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("ELIT_METRICS__PORT", "many")
    with pytest.raises(ConfigError, match="ELIT_METRICS__PORT"):
        load_config()


def test_unrelated_elit_variables_are_ignored(monkeypatch):
    monkeypatch.setenv("ELIT_VENV", ".venv")
    monkeypatch.setenv("ELIT_MODEL", "/somewhere")
    load_config()


@pytest.mark.parametrize("problem,match", [("missing", "cannot read"), ("garbage", "parse")])
def test_unreadable_file_is_a_config_error(tmp_path, problem, match):
    f = tmp_path / "c.toml"
    if problem == "garbage":
        f.write_text("[[[")
    with pytest.raises(ConfigError, match=match):
        load_config(f)


def test_binding_beyond_loopback_warns(caplog):
    with caplog.at_level(logging.WARNING):
        cfg = load_config(None, {"endpoints.ingest": "tcp://0.0.0.0:5555",
                                 "metrics.host": "192.168.1.5"})
    assert len(exposed_addresses(cfg)) == 2
    assert "beyond loopback" in caplog.text and "0.0.0.0" in caplog.text


def test_dump_round_trips_through_toml(tmp_path):
    cfg = load_config(None, {"delivery.mode": "latest"})
    text = dump_config(cfg)
    f = tmp_path / "dumped.toml"
    f.write_text(text)
    assert load_config(f) == cfg


def test_cli_config_print_and_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "elit_stream.tools.cli", "config", "--print"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "[delivery]" in out.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[delivery]\nmode = "fastest"\n')
    out = subprocess.run([sys.executable, "-m", "elit_stream.tools.cli", "config", "--config",
                          str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "delivery.mode" in out.stderr
    assert "Traceback" not in out.stderr


def test_warmup_shape_option_parses_and_refuses_with_a_clear_message():
    from elit_stream.tools.cli_serve import shape_arg as _shape_arg
    assert _shape_arg("512x384") == [512, 384] and _shape_arg("256") == [256, 256]
    assert load_config(None, {"model.warmup_shape_px": _shape_arg("64x48")}).model \
        .warmup_shape_px == (64, 48)
    out = subprocess.run([sys.executable, "-m", "elit_stream.tools.cli", "serve", "--warmup-shape",
                          "big"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "give HxW" in out.stderr and "Traceback" not in out.stderr
