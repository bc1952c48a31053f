"""The service configuration: defaults < TOML/JSON file < ELIT_* environment < command line.

Validated once, at start; a bad value raises `ConfigError` naming the key (dotted path) and,
for environment variables, the variable. Nested keys map to environment variables with a double
underscore: `delivery.mode` <- `ELIT_DELIVERY__MODE`, `endpoints.ingest` <- `ELIT_ENDPOINTS__INGEST`.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

log = logging.getLogger(__name__)

REPO_MODELS_DIR = Path(__file__).resolve().parents[2] / "models"


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Overrides(Section):
    """A section whose unset (None) keys keep the model side's defaults."""

    def overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class Endpoints(Section):
    """ZeroMQ endpoints the service binds. Port 0 (or *) picks a free port (printed at start)."""

    ingest: str = "tcp://127.0.0.1:5555"    # PULL: frames in
    results: str = "tcp://127.0.0.1:5556"   # PUB: results, maps, events
    control: str = "tcp://127.0.0.1:5557"   # ROUTER: commands

    @field_validator("ingest", "results", "control")
    @classmethod
    def _zmq_address(cls, v: str) -> str:
        scheme = v.split("://", 1)[0] if "://" in v else ""
        if scheme not in ("tcp", "ipc", "inproc"):
            raise ValueError(f"{v!r} is not a ZeroMQ endpoint like tcp://127.0.0.1:5555")
        if scheme == "tcp" and not urlsplit(v).netloc.rpartition(":")[2]:
            raise ValueError(f"{v!r} has no port")
        return v


class Metrics(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9108, ge=0, le=65535)  # 0: a free port (printed at start)


class ModelSection(Section):
    path: Path | None = None              # artifact folder; None: the shipped default
    allowed_dirs: list[Path] = [REPO_MODELS_DIR]  # load_model accepts artifacts only under these
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_fallback: bool = True             # device=cuda but CUDA fails: CPU (logged) or refuse
    threads: int | None = Field(None, ge=1, le=256)  # inference threads (default: physical cores)
    # fp32: onnxruntime, matches the trainer; bf16: OpenVINO on the CPU (AMX / AVX-512 BF16),
    # ~3.5x faster, checked against the fp32 probe (the `openvino` extra; docs/benchmarks.md);
    # fp16: onnxruntime on a float16 copy of the graph, for CUDA (the `gpu` extra)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    warmup_shape_px: tuple[int, int] = (256, 256)


class Delivery(Section):
    mode: Literal["lossless", "latest"] = "lossless"
    ingest_hwm: int = Field(4, ge=1, le=100_000)  # frames queued in ZeroMQ before back-pressure
    max_frame_px: int = Field(4096 * 4096, ge=64)


class Limits(Section):
    """Bounds on what one client can make the service spend (docs/operations.md, Limits)."""

    # the network input a frame may become after rescaling and padding (px, rows x columns)
    max_input_px: int = Field(4096 * 4096, ge=64)
    # frames are accepted at pixel sizes within the model's pixel_size_range_pm widened by this
    # factor both ways ([lo / f, hi * f]); outside: frame_rejected `bad_pixel_size`
    pixel_size_factor: float = Field(2.0, ge=1.0, le=1000.0)
    # messages queued per subscriber of the results socket before ZeroMQ drops that
    # subscriber's messages (PUB behaviour); bounds the memory a stalled subscriber costs
    results_sndhwm: int = Field(100, ge=1, le=1_000_000)
    # seconds a stop (SIGTERM, SIGINT, shutdown) waits for the frame in hand and a model load
    # before the frame is abandoned (said in the stop event); below systemd's TimeoutStopSec
    stop_grace_s: float = Field(20.0, gt=0, le=3600)


class Postprocess(_Overrides):
    """Overrides of postprocess.Params; unset keys keep the model side's defaults."""

    threshold: float | None = None
    min_blob_px: int | None = None
    max_blob_px: int | None = None
    detect_threshold: float | None = None
    split_dip: float | None = None
    min_peak_distance_px: int | None = None
    min_peak: float | None = None
    lattice_crystallinity: float | None = None
    heavy_contrast: float | None = None
    contrast_radius_px: float | None = None


class Policy(_Overrides):
    """Overrides of selection.PolicyConfig; unset keys keep the model side's defaults."""

    window: int | None = None
    drift_factor: float | None = None
    outlier_z: float | None = None
    auto_deselect: bool = False                 # deselect outlier members by itself (reported)
    min_active: int | None = None
    outlier_frames: int | None = None
    min_baseline: int | None = None
    drift_floor: float | None = None
    mad_floor: float | None = None


class Maps(Section):
    """Mean/std maps per class: published on topic `maps` only when asked."""

    mode: Literal["subscribe", "always", "never"] = "subscribe"  # subscribe: when a SUB asks "maps"
    downsample: int = Field(1, ge=1, le=64)


class Auth(Section):
    """CURVE authentication + encryption, per socket (elit_stream.protocol.auth; docs/service.md)."""

    ingest: bool = False                  # frames in: only allowed clients may send
    results: bool = False                 # results out: only allowed clients may subscribe
    control: bool = False                 # commands: only allowed clients (can be the only one)
    keys_dir: Path | None = None          # made by `elit-stream keys DIR --client NAME`

    def required(self) -> set[str]:
        return {name for name in ("ingest", "results", "control") if getattr(self, name)}


class ClientSection(Section):
    """Read by the client commands (`ctl`, `replay`: elit_stream/tools/settings.py), not by the
    service; here so that one file configures both sides."""

    key: Path | None = None               # CURVE: this client's NAME.key_secret
    server_key: Path | None = None        # CURVE: the service's server.key
    timeout_s: float = Field(5.0, gt=0)   # seconds `ctl` waits for a reply (load_model: 120)


_FILE_DATA: ContextVar[dict] = ContextVar("_FILE_DATA", default={})


class _FileSource(PydanticBaseSettingsSource):
    def get_field_value(self, field, field_name):  # pragma: no cover - unused by __call__
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return _FILE_DATA.get()


class _EnvSource(EnvSettingsSource):
    """ELIT_* variables, except ELIT_MODEL: that one is the artifact path the model side reads
    (manifest.default_artifact_path), not this config's whole `model` section."""

    def _load_env_vars(self):
        return {k: v for k, v in super()._load_env_vars().items() if k.lower() != "elit_model"}


class ServiceConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ELIT_", env_nested_delimiter="__",
                                      extra="forbid", validate_default=True)

    endpoints: Endpoints = Endpoints()
    metrics: Metrics = Metrics()
    model: ModelSection = ModelSection()
    delivery: Delivery = Delivery()
    limits: Limits = Limits()
    postprocess: Postprocess = Postprocess()
    policy: Policy = Policy()
    maps: Maps = Maps()
    auth: Auth = Auth()
    client: ClientSection = ClientSection()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings,
                                   dotenv_settings, file_secret_settings):
        return (init_settings, _EnvSource(settings_cls), _FileSource(settings_cls))


def read_config_file(path: str | Path) -> dict:
    """A TOML (.toml) or JSON (.json) file -> dict; ConfigError if unreadable."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from None
    try:
        return json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {p} does not parse: {exc}") from None


def load_config(path: str | Path | None = None, overrides: dict | None = None,
                flag_names: dict[str, str] | None = None) -> ServiceConfig:
    """Build and validate the config once. `overrides` (dotted keys, e.g. from the CLI) win;
    `flag_names` (dotted key -> option, e.g. "--ingest") lets an error blame the option."""
    token = _FILE_DATA.set(read_config_file(path) if path else {})
    try:
        cfg = ServiceConfig(**_nest(overrides or {}))
    except ValidationError as exc:
        given = {k: f for k, f in (flag_names or {}).items()
                 if (overrides or {}).get(k) is not None}
        raise ConfigError(_explain(exc, given)) from None
    finally:
        _FILE_DATA.reset(token)
    _check_model_side(cfg)
    _check_auth(cfg)
    warn_if_exposed(cfg)
    return cfg


def _check_model_side(cfg: ServiceConfig) -> None:
    """Values the model side validates (postprocess.Params, selection.PolicyConfig)."""
    from elit_stream.core.postprocess import Params
    from elit_stream.service.selection import PolicyConfig
    for section, build in (("postprocess", lambda: Params().replace(**cfg.postprocess.overrides())),
                           ("policy", lambda: PolicyConfig(**cfg.policy.overrides()))):
        try:
            build()
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"bad configuration:\n  {section}.{exc}") from None


def _check_auth(cfg: ServiceConfig) -> None:
    """CURVE on any socket needs a key folder with the server's key pair and `allowed/`."""
    a = cfg.auth
    if not a.required():
        return
    if a.keys_dir is None:
        raise ConfigError("bad configuration:\n  auth.keys_dir: required when auth."
                          + "/".join(sorted(a.required())) + " is true (make one with "
                          "`elit-stream keys DIR --client NAME`; environment variable "
                          "ELIT_AUTH__KEYS_DIR)")
    for need in (a.keys_dir / "server.key_secret", a.keys_dir / "allowed"):
        if not need.exists():
            raise ConfigError(f"bad configuration:\n  auth.keys_dir: {need} does not exist "
                              f"(make it with `elit-stream keys {a.keys_dir} --client NAME`)")


def _nest(flat: dict) -> dict:
    """{"delivery.mode": "latest"} -> {"delivery": {"mode": "latest"}}; None values dropped."""
    out: dict = {}
    for key, value in flat.items():
        if value is None:
            continue
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _explain(exc: ValidationError, flags: dict[str, str] | None = None) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        flag = next((f for k, f in (flags or {}).items() if key == k or key.startswith(k + ".")),
                    None)
        env = "ELIT_" + "__".join(str(p) for p in err["loc"]).upper()
        origin = f"option {flag}" if flag else f"environment variable {env}"
        got = err.get("input")
        lines.append(f"{key}: {err['msg']} (got {got!r}; {origin})")
    return "bad configuration:\n  " + "\n  ".join(lines)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or interface name: assume reachable from outside


def exposed_addresses(cfg: ServiceConfig, unauthenticated_only: bool = False) -> list[str]:
    """Addresses that bind beyond the loopback interface (optionally: only those without
    CURVE authentication; the metrics endpoint never has any)."""
    out = []
    secured = cfg.auth.required() if unauthenticated_only else set()
    for name, addr in cfg.endpoints.model_dump().items():
        if name in secured:
            continue
        if addr.startswith("tcp://") and not is_loopback(urlsplit(addr).hostname or "*"):
            out.append(f"{name} {addr}")
    if cfg.metrics.enabled and not is_loopback(cfg.metrics.host):
        out.append(f"metrics http://{cfg.metrics.host}:{cfg.metrics.port}")
    return out


def warn_if_exposed(cfg: ServiceConfig) -> None:
    for what in exposed_addresses(cfg, unauthenticated_only=True):
        if what.startswith("metrics"):
            log.warning("binding %s beyond loopback: anyone on the network can read the "
                        "metrics (HTTP, no authentication; read-only). Prefer 127.0.0.1 and a "
                        "Prometheus on the same host, or a firewall.", what)
        else:
            log.warning("binding %s beyond loopback WITHOUT authentication: anyone on the "
                        "network can send frames, read results or send commands. Use "
                        "127.0.0.1, or CURVE: auth.%s = true with auth.keys_dir "
                        "(docs/service.md, Security).", what, what.split()[0])


def _unset_defaults() -> dict[tuple[str, str], str]:
    """What an unset (None) key means, for `dump_config`."""
    import dataclasses

    from elit_stream.core.manifest import default_artifact_path
    from elit_stream.core.postprocess import Params
    from elit_stream.service.selection import PolicyConfig
    out = {("model", "path"): json.dumps(str(default_artifact_path())),
           ("model", "threads"): "(all physical cores)"}
    for section, obj in (("postprocess", Params()), ("policy", PolicyConfig())):
        for f in dataclasses.fields(obj):
            out[(section, f.name)] = json.dumps(getattr(obj, f.name))
    return out


def dump_config(cfg: ServiceConfig) -> str:
    """The effective config as TOML (for `elit-stream config --print`); unset keys as comments
    with the value they default to."""
    defaults = _unset_defaults()
    lines = []
    for section, values in cfg.model_dump(mode="json").items():
        if not isinstance(values, dict):
            lines.insert(0, f"{section} = {json.dumps(values)}")
            continue
        lines.append(f"\n[{section}]")
        for k, v in values.items():
            if v is None:
                lines.append(f"# {k} = {defaults.get((section, k), '(unset)')}")
            else:
                lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines).lstrip() + "\n"
