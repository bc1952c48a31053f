"""`elit-stream serve`: the service's options, read into one validated config (errors blame the
option that set a value), then the service run until Ctrl-C, SIGTERM or `ctl shutdown`."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from elit_stream.tools.cli_common import CliError, config_arg, endpoint_args


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="run the service (until Ctrl-C, SIGTERM or `ctl shutdown`)",
                       description="Run the service. Settings come from defaults, then --config "
                       "FILE, then ELIT_* environment variables (e.g. ELIT_DELIVERY__MODE=latest),"
                       " then these options. Port 0 picks a free port. When ready it prints one "
                       "JSON line with the bound endpoints on stdout.")
    config_arg(s)
    s.add_argument("--model", metavar="DIR", help="model artifact folder (default "
                   "models/default, the shipped ensemble)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to run the "
                   "ensemble (default auto: CUDA when present, else CPU)")
    s.add_argument("--threads", type=int, metavar="N", help="CPU threads for inference "
                   "(default: the physical cores)")
    s.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="arithmetic of the networks (default fp32: onnxruntime, the trainer's "
                        "numbers to 1e-4); bf16: OpenVINO on CPUs with AMX/AVX-512 BF16, ~3.5x "
                        "faster, maps differ by <= 0.02 and 4-5 in 15,876 atoms change "
                        "(docs/benchmarks.md; the openvino extra); fp16: for CUDA (the gpu "
                        "extra)")
    s.add_argument("--warmup-shape", type=shape_arg, metavar="HxW",
                   help="frame size to prepare for before serving, e.g. 512x512 or 512 (default "
                        "256x256): the first frame of a new size pays for set-up (bf16: 0.5-1 s)")
    s.add_argument("--delivery", choices=["lossless", "latest"],
                   help="lossless (default): every frame, in order (slows the sender down if "
                        "needed); latest: skip stale frames to keep up (each one reported)")
    endpoint_args(s, verb="bind; port 0: a free one")
    s.add_argument("--metrics-host", metavar="HOST", help="Prometheus endpoint host "
                   "(default 127.0.0.1)")
    s.add_argument("--metrics-port", type=int, metavar="PORT", help="Prometheus endpoint port "
                   "(default 9108; 0: a free one)")
    s.add_argument("--no-metrics", action="store_true", help="no Prometheus endpoint (default: "
                   "one is served)")
    s.add_argument("--allowed-dir", action="append", metavar="DIR",
                   help="folder load_model may load artifacts from (repeatable; default: the "
                        "repository's models/)")
    s.add_argument("--maps", choices=["subscribe", "always", "never"],
                   help="publish mean/std maps (default subscribe: only while a subscriber "
                        "listens to topic 'maps'), always, or never")
    s.add_argument("--auth", metavar="SOCKETS", help="require CURVE authentication on these "
                   "sockets: all, or a comma list of ingest,results,control (default: none)")
    s.add_argument("--keys", metavar="DIR", help="CURVE key folder (`elit-stream keys DIR`; "
                   "default: none)")
    s.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log detail on stderr (default INFO)")
    s.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    import zmq

    from elit_stream.core.manifest import ArtifactError, default_artifact_path
    from elit_stream.service.config import ConfigError, load_config
    from elit_stream.tools.settings import config_file
    overrides = {
        "model.path": args.model, "model.device": args.device, "model.threads": args.threads,
        "model.precision": args.precision, "model.warmup_shape_px": args.warmup_shape,
        "model.allowed_dirs": args.allowed_dir, "delivery.mode": args.delivery,
        "endpoints.ingest": args.ingest, "endpoints.results": args.results,
        "endpoints.control": args.control, "metrics.host": args.metrics_host,
        "metrics.port": args.metrics_port, "metrics.enabled": False if args.no_metrics else None,
        "maps.mode": args.maps, "log_level": args.log_level, "auth.keys_dir": args.keys,
        **_auth_overrides(args.auth)}
    try:
        cfg = load_config(config_file(args.config), overrides, SERVE_FLAGS)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    logging.getLogger().setLevel(cfg.log_level)
    from elit_stream.core.engine import EngineError
    from elit_stream.service.loop import Service
    try:
        service = Service(cfg)
    except ArtifactError as exc:
        where = cfg.model.path or default_artifact_path()
        raise CliError(f"cannot load the model at {where}: {exc}\n"
                       "  (train one with `elit-train`, or pass --model DIR)") from None
    except EngineError as exc:
        where = cfg.model.path or default_artifact_path()
        raise CliError(f"cannot run the model at {where} (device {cfg.model.device}, precision "
                       f"{cfg.model.precision}): {exc}") from None
    from elit_stream.protocol.auth import AuthError
    try:
        endpoints = service.bind()
    except AuthError as exc:
        raise CliError(f"CURVE keys: {exc}") from None
    except (zmq.ZMQError, OSError) as exc:
        raise CliError(f"cannot bind: {exc} (is another elit-stream running? change the "
                       "port with --ingest/--results/--control/--metrics-port)") from None
    print(json.dumps({"ready": True, "endpoints": endpoints, "model": service.state.model_ref(),
                      "provider": service.state.engine.provider,
                      "precision": service.state.engine.precision}), flush=True)
    logging.getLogger("elit_stream").info("listening: %s", endpoints)
    code = service.run()
    if service.hard_exit:   # a frame or a model load still in a native thread: leave now
        logging.shutdown()
        sys.stdout.flush()
        os._exit(code)
    return code


SERVE_FLAGS = {  # config key -> the serve option that sets it (errors blame the option)
    "model.path": "--model", "model.device": "--device", "model.threads": "--threads",
    "model.precision": "--precision", "model.warmup_shape_px": "--warmup-shape",
    "model.allowed_dirs": "--allowed-dir", "delivery.mode": "--delivery",
    "endpoints.ingest": "--ingest", "endpoints.results": "--results",
    "endpoints.control": "--control", "metrics.host": "--metrics-host",
    "metrics.port": "--metrics-port", "metrics.enabled": "--no-metrics", "maps.mode": "--maps",
    "log_level": "--log-level", "auth.keys_dir": "--keys", "auth.ingest": "--auth",
    "auth.results": "--auth", "auth.control": "--auth"}


def shape_arg(text: str) -> list[int]:
    """'512x384' -> [512, 384]; '512' -> [512, 512]."""
    parts = text.lower().split("x")
    try:
        shape = [int(v) for v in parts]
    except ValueError:
        shape = []
    if len(shape) == 1:
        shape *= 2
    if len(shape) != 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give HxW (e.g. 512x512) or one side (512)")
    return shape


def _auth_overrides(spec: str | None) -> dict:
    """--auth all | ingest,control -> {"auth.ingest": True, ...}."""
    if not spec:
        return {}
    names = {"ingest", "results", "control"} if spec == "all" else \
        {n.strip() for n in spec.split(",") if n.strip()}
    bad = names - {"ingest", "results", "control"}
    if bad:
        raise CliError(f"--auth: unknown socket(s) {sorted(bad)}; use all or "
                       "ingest,results,control")
    return {f"auth.{n}": True for n in names}
