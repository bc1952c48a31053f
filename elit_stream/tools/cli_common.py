"""What the `elit-stream` subcommands share: the user-facing error, the options every client
command has (config file, endpoints, CURVE keys) and reading them into client settings."""
from __future__ import annotations

import argparse


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML or JSON config file (default: "
                   "$ELIT_CONFIG if set, else none: built-in defaults and ELIT_* variables)")


def curve_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--client-key", metavar="FILE", help="CURVE: this client's key pair "
                   "(NAME.key_secret from `elit-stream keys`); needs a server key (default: "
                   "config client.key, ELIT_CLIENT__KEY; none)")
    p.add_argument("--server-key", metavar="FILE", help="CURVE: the service's public key "
                   "(default: config client.server_key, else server.key in auth.keys_dir; none)")


def client_settings_for(args, **flags):
    """The client side of the configuration (tools/settings.py), options first."""
    from elit_stream.service.config import ConfigError
    from elit_stream.tools.settings import client_settings
    flags.update({"--client-key": args.client_key, "--server-key": args.server_key})
    try:
        return client_settings(args.config, flags)
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def client_curve(settings):
    """The settings' CURVE key files -> ClientCurve or None (CliError if only one is set)."""
    if not (settings.client_key or settings.server_key):
        return None
    if not (settings.client_key and settings.server_key):
        raise CliError("CURVE needs both a client key (--client-key) and the server's public "
                       "key (--server-key)")
    from elit_stream.protocol.auth import AuthError, ClientCurve
    try:
        return ClientCurve.from_files(settings.client_key, settings.server_key)
    except AuthError as exc:
        raise CliError(str(exc)) from None


def no_answer(address: str, timeout_s: float, curve) -> CliError:
    hint = ("does it require CURVE keys (--client-key, --server-key)?" if curve is None
            else "is this client's public key in the service's allowed/ folder?")
    return CliError(f"no service answers at {address} (waited {timeout_s:g} s): is "
                    f"`elit-stream serve` running there? ({hint})")


def endpoint_args(p: argparse.ArgumentParser, which=("ingest", "results", "control"),
                   verb: str = "connect to") -> None:
    what = {"ingest": "frames socket (PUSH -> PULL)", "results": "results and events "
            "socket (PUB)", "control": "control socket (ROUTER)"}
    port = {"ingest": 5555, "results": 5556, "control": 5557}
    for name in which:
        p.add_argument(f"--{name}", metavar="ADDR", help=f"{what[name]} to {verb} (default: "
                       f"config endpoints.{name}, ELIT_ENDPOINTS__{name.upper()}; "
                       f"tcp://127.0.0.1:{port[name]})")


FAST_SCAN_WORDS = {"right": "x", "left": "-x", "down": "y", "up": "-y",
                   "x": "x", "-x": "-x", "y": "y", "-y": "-y"}
FAST_SCAN_HELP = ("which way the fast scan runs in the stored frames: right (along the rows, "
                  "the usual, default), left, down (the columns, top to bottom), up (bottom to "
                  "top: a frame turned by 90 degrees counterclockwise); the frame header's "
                  "x, -x, y, -y (write --fast-scan=-y). Such frames are turned for the networks, "
                  "trained with scan noise and detector lag along the rows, and the atoms back")


def fast_scan_arg(text: str) -> str:
    try:
        return FAST_SCAN_WORDS[text.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a scan direction: right, left, down or up "
            "(or x, -x, y, -y)") from None


def pixel_size_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a pixel size: give picometres > 0 "
                                         "(e.g. 14.1)")
    return value
