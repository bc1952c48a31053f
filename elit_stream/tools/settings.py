"""Where the client commands (`ctl`, `replay`, …) find the service: the same configuration `serve`
reads, seen from the client's side.

Precedence, as for `serve`: defaults < config file (`--config FILE`, else `ELIT_CONFIG`) <
`ELIT_*` environment < command-line options. From the file and the environment it takes the
`[endpoints]` the service binds (turned into addresses to connect to: `*` / `0.0.0.0` become
127.0.0.1) and the `[client]` section (CURVE key files, reply timeout). A bad value is reported
with where it came from: the option, the variable or the file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from elit_stream.service.config import ConfigError, read_config_file

ENDPOINT_DEFAULTS = {"ingest": "tcp://127.0.0.1:5555", "results": "tcp://127.0.0.1:5556",
                     "control": "tcp://127.0.0.1:5557"}
CTL_TIMEOUT_S = 5.0          # a reply to a command (ping, status, deselect, …)
LOAD_TIMEOUT_S = 120.0       # load_model answers when the new model is loaded and checked
CONFIG_ENV = "ELIT_CONFIG"


@dataclass(frozen=True)
class ClientSettings:
    endpoints: dict            # ingest / results / control: addresses to connect to
    client_key: Path | None    # CURVE: this client's NAME.key_secret
    server_key: Path | None    # CURVE: the service's server.key
    timeout_s: float           # seconds to wait for a reply to a command


def config_file(flag: str | None) -> str | None:
    """--config, else $ELIT_CONFIG, else None."""
    return flag or os.environ.get(CONFIG_ENV) or None


def client_settings(config: str | None = None, flags: dict | None = None) -> ClientSettings:
    """Resolve the settings; `flags` maps option names (e.g. "--control") to values or None."""
    flags = flags or {}
    path = config_file(config)
    data = read_config_file(path) if path else {}
    where_file = f"config file {path}" if path else ""

    def pick(section: str, key: str, flag: str, default):
        env = f"ELIT_{section.upper()}__{key.upper()}"
        if flags.get(flag) is not None:
            return flags[flag], f"option {flag}"
        if os.environ.get(env):
            return os.environ[env], f"environment variable {env}"
        if key in data.get(section, {}):
            return data[section][key], f"{where_file} ([{section}] {key})"
        return default, "default"

    endpoints = {}
    for name, default in ENDPOINT_DEFAULTS.items():
        value, source = pick("endpoints", name, f"--{name}", default)
        endpoints[name] = connect_address(str(value), source)
    client_key, _ = pick("client", "key", "--client-key", None)
    server_key, _ = pick("client", "server_key", "--server-key", _server_key_default(data))
    timeout, source = pick("client", "timeout_s", "--timeout", CTL_TIMEOUT_S)
    try:
        timeout_s = float(timeout)
    except (TypeError, ValueError):
        timeout_s = -1.0
    if not timeout_s > 0:
        raise ConfigError(f"{source}: {timeout!r} is not a number of seconds > 0")
    return ClientSettings(endpoints, Path(client_key) if client_key else None,
                          Path(server_key) if server_key else None, timeout_s)


def _server_key_default(data: dict) -> str | None:
    """The service's public key in its key folder (auth.keys_dir), when one is configured."""
    keys_dir = os.environ.get("ELIT_AUTH__KEYS_DIR") or data.get("auth", {}).get("keys_dir")
    if keys_dir and (Path(keys_dir) / "server.key").is_file():
        return str(Path(keys_dir) / "server.key")
    return None


def connect_address(addr: str, source: str) -> str:
    """A bind address as a client connects to it: tcp://*:5555 -> tcp://127.0.0.1:5555."""
    scheme = addr.split("://", 1)[0] if "://" in addr else ""
    if scheme not in ("tcp", "ipc", "inproc"):
        raise ConfigError(f"{source}: {addr!r} is not a ZeroMQ address like "
                          "tcp://127.0.0.1:5557")
    if scheme != "tcp":
        return addr
    host, _, port = urlsplit(addr).netloc.rpartition(":")
    if not port.isdigit():
        raise ConfigError(f"{source}: {addr!r} has no port")
    if port == "0":
        raise ConfigError(f"{source}: {addr!r} is port 0 (the service picks a free port when it "
                          "starts and prints it): give the address `serve` printed")
    if host in ("*", "0.0.0.0", ""):
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"tcp://{host}:{port}"
