"""`elit-stream`: run the service, replay a movie into it, send it commands, run the demo.

Every command prints a clear message (no traceback) for bad arguments, missing files and
busy ports, and exits non-zero on error.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

EXAMPLES = """\
examples:
  elit-stream demo                             the main job: service + synthetic movie + overlay
  elit-stream serve                            serve models/default on the default ports
  elit-stream serve --model models/v2 --delivery latest
  elit-stream replay samples/graphene-14pm.npz  the shipped sample movie (pixel size in the file)
  elit-stream replay movie.tif --rate 10 --pixel-size-pm 14.1 --record results.jsonl
  elit-stream ctl status
  elit-stream ctl deselect 3 5                 stop counting members 3 and 5
  elit-stream ctl set_params threshold=0.4
  elit-stream ctl load_model models/v2         swap the ensemble without dropping frames
  elit-stream config --print                   show the effective configuration
  elit-stream keys /etc/elit-stream/keys --client scope --client operator
  elit-stream serve --auth control --keys /etc/elit-stream/keys
  elit-stream ctl status --client-key scope.key_secret --server-key server.key
  elit-stream batch runs/*.npz --model models/default --out runs/batch --executor ray
  elit-stream view                             the operator's live view at http://127.0.0.1:8090/

Every command reads one configuration: defaults < --config FILE (or ELIT_CONFIG=FILE) < ELIT_*
environment variables (e.g. ELIT_ENDPOINTS__CONTROL=tcp://127.0.0.1:6557) < options. So a
service moved to other ports is reached by `ctl` and `replay` with the same file or variables.
The wire protocol (for microscope software) is in docs/protocol.md.
"""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=getattr(args, "log_level", None) or "INFO",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `elit-stream ctl status | head`
        sys.stderr.close()
        return 0
    except CliError as exc:
        print(f"elit-stream {args.command}: {exc}", file=sys.stderr)
        return 2


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="elit-stream", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Real-time atom finding with ensemble uncertainty for STEM microscopes. "
                    "A service receives frames over ZeroMQ, runs every member of an ensemble of "
                    "neural networks on each frame, and publishes atom positions with their "
                    "uncertainty.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _serve_parser(sub)
    _replay_parser(sub)
    _ctl_parser(sub)
    c = sub.add_parser("config", help="show the effective configuration (defaults + file + "
                       "ELIT_* environment)")
    _config_arg(c)
    c.add_argument("--print", action="store_true", default=True,
                   help="print it as TOML (the default action)")
    c.set_defaults(func=cmd_config)
    _demo_parser(sub)
    _keys_parser(sub)
    _batch_parser(sub)
    _view_parser(sub)
    return p


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML or JSON config file (default: "
                   "$ELIT_CONFIG if set, else none: built-in defaults and ELIT_* variables)")


def _curve_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--client-key", metavar="FILE", help="CURVE: this client's key pair "
                   "(NAME.key_secret from `elit-stream keys`); needs a server key (default: "
                   "config client.key, ELIT_CLIENT__KEY; none)")
    p.add_argument("--server-key", metavar="FILE", help="CURVE: the service's public key "
                   "(default: config client.server_key, else server.key in auth.keys_dir; none)")


def _settings(args, **flags):
    """The client side of the configuration (tools/settings.py), options first."""
    from elit_stream.service.config import ConfigError
    from elit_stream.tools.settings import client_settings
    flags.update({"--client-key": args.client_key, "--server-key": args.server_key})
    try:
        return client_settings(args.config, flags)
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def _client_curve(settings):
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


def _no_answer(address: str, timeout_s: float, curve) -> CliError:
    hint = ("does it require CURVE keys (--client-key, --server-key)?" if curve is None
            else "is this client's public key in the service's allowed/ folder?")
    return CliError(f"no service answers at {address} (waited {timeout_s:g} s): is "
                    f"`elit-stream serve` running there? ({hint})")


def _keys_parser(sub) -> None:
    k = sub.add_parser("keys", help="create CURVE key pairs: the server's and one per client",
                       description="Create DIR/server.key (public: give it to clients) and "
                       "DIR/server.key_secret (stays on the server), and for each --client NAME "
                       "a key pair DIR/clients/NAME.key(_secret) whose public key is copied to "
                       "DIR/allowed/ (the clients the service accepts). Existing keys are kept. "
                       "Then: elit-stream serve --auth all --keys DIR.")
    k.add_argument("dir", metavar="DIR", help="key folder (created if missing)")
    k.add_argument("--client", action="append", default=[], metavar="NAME",
                   help="make (or re-allow) a client key pair (repeatable; default: none)")
    k.set_defaults(func=cmd_keys)


def cmd_keys(args) -> int:
    from elit_stream.protocol.auth import AuthError, create_keys
    try:
        written = create_keys(args.dir, args.client)
    except (AuthError, OSError) as exc:
        raise CliError(str(exc)) from None
    root = Path(args.dir)
    for name, public in written.items():
        print(f"created {name}: {public} (+ .key_secret, mode 600)")
    print(f"allowed clients: {sorted(p.stem for p in (root / 'allowed').glob('*.key'))}")
    print(f"server public key for clients: {root / 'server.key'}")
    return 0


def _endpoint_args(p: argparse.ArgumentParser, which=("ingest", "results", "control"),
                   verb: str = "connect to") -> None:
    what = {"ingest": "frames socket (PUSH -> PULL)", "results": "results and events "
            "socket (PUB)", "control": "control socket (ROUTER)"}
    port = {"ingest": 5555, "results": 5556, "control": 5557}
    for name in which:
        p.add_argument(f"--{name}", metavar="ADDR", help=f"{what[name]} to {verb} (default: "
                       f"config endpoints.{name}, ELIT_ENDPOINTS__{name.upper()}; "
                       f"tcp://127.0.0.1:{port[name]})")


def _serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="run the service (until Ctrl-C, SIGTERM or `ctl shutdown`)",
                       description="Run the service. Settings come from defaults, then --config "
                       "FILE, then ELIT_* environment variables (e.g. ELIT_DELIVERY__MODE=latest),"
                       " then these options. Port 0 picks a free port. When ready it prints one "
                       "JSON line with the bound endpoints on stdout.")
    _config_arg(s)
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
    s.add_argument("--warmup-shape", type=_shape_arg, metavar="HxW",
                   help="frame size to prepare for before serving, e.g. 512x512 or 512 (default "
                        "256x256): the first frame of a new size pays for set-up (bf16: 0.5-1 s)")
    s.add_argument("--delivery", choices=["lossless", "latest"],
                   help="lossless (default): every frame, in order (slows the sender down if "
                        "needed); latest: skip stale frames to keep up (each one reported)")
    _endpoint_args(s, verb="bind; port 0: a free one")
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


def _replay_parser(sub) -> None:
    r = sub.add_parser("replay", help="act as the microscope: send a recorded movie to the service",
                       description="Send every frame of MOVIE to a running service and wait "
                       "until each is answered. Reads .npy, .npz (array 'frames', scalar "
                       "'pixel_size_pm'), .h5/.hdf5 (attribute pixel_size_pm), and with the io "
                       "extra (RosettaSciIO) .dm3/.dm4, .emd, .hspy and TIFF with their scale; "
                       "TIFF without it. Pixel types the service does not take (int16, int64, "
                       "...) are converted to float32 once, with a note.")
    r.add_argument("movie", metavar="MOVIE", help="the file to send: a stack [frames, rows, "
                   "columns] or one image")
    r.add_argument("--dataset", metavar="KEY", help="HDF5 dataset (default: the first 2-D/3-D one)")
    r.add_argument("--rate", type=float, metavar="FPS", help="frames per second (default: as "
                   "fast as the service takes them)")
    r.add_argument("--pixel-size-pm", type=_pixel_size_arg, metavar="PM",
                   help="pixel size in picometres, > 0; frames are rescaled to the model's "
                        "(default: the file's, else the service assumes the model's, with a "
                        "warning)")
    r.add_argument("--acquisition", metavar="ID", help="acquisition id (default: replay-<time>)")
    r.add_argument("--record", metavar="FILE", help="write every result/event as one JSON line "
                   "(default: none)")
    r.add_argument("--wait", type=float, default=60.0, metavar="S",
                   help="seconds to wait for the last answers after the last frame (default 60)")
    r.add_argument("--quiet", action="store_true", help="no line per frame (default: one per "
                   "frame)")
    _endpoint_args(r)
    _config_arg(r)
    _curve_client_args(r)
    r.set_defaults(func=cmd_replay)


def _ctl_parser(sub) -> None:
    c = sub.add_parser("ctl", help="send one control command and print the reply as JSON",
                       description="Commands: ping, status, members, set_active IDS, deselect "
                       "IDS, select IDS, reset, set_params KEY=VALUE..., set_maps mode=always, "
                       "load_model DIR, shutdown (docs/protocol.md). Exit status 1 if the "
                       "service refuses, 2 if none answers.")
    c.add_argument("cmd", metavar="CMD", help="the command, e.g. status")
    c.add_argument("args", nargs="*", metavar="ARG", help="member ids, a path, or KEY=VALUE")
    _endpoint_args(c, which=("control",))
    c.add_argument("--timeout", type=float, metavar="S", help="seconds to wait for the reply "
                   "(default: config client.timeout_s, 5; load_model: 120, as it answers when "
                   "the model is loaded)")
    _config_arg(c)
    _curve_client_args(c)
    c.set_defaults(func=cmd_ctl)


def _demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="the main job: start the service, replay a synthetic movie, "
                       "print a line per frame, score against the truth, write a PNG overlay")
    d.add_argument("--model", metavar="DIR", help="artifact (default models/default)")
    d.add_argument("--frames", type=int, default=20, help="frames in the movie (default 20)")
    d.add_argument("--size", type=int, default=256, metavar="PX", help="frame side in pixels "
                   "(default 256)")
    d.add_argument("--seed", type=int, default=0, help="random seed of the synthetic movie "
                   "(default 0)")
    d.add_argument("--rate", type=float, metavar="FPS", help="send rate (default: as fast as "
                   "the service takes them)")
    d.add_argument("--delivery", choices=["lossless", "latest"], default="lossless",
                   help="as for serve (default lossless: every frame)")
    d.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="as for serve (default auto)")
    d.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="as for serve (default fp32; bf16: faster, see serve --help)")
    d.add_argument("--out", metavar="PNG", default="runs/demo/last_frame.png",
                   help="the overlay picture (default runs/demo/last_frame.png)")
    d.set_defaults(func=cmd_demo)


# ------------------------------------------------------------------------------ commands
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


def _pixel_size_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a pixel size: give picometres > 0 "
                                         "(e.g. 14.1)")
    return value


def _shape_arg(text: str) -> list[int]:
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


def cmd_config(args) -> int:
    from elit_stream.service.config import ConfigError, dump_config, load_config
    from elit_stream.tools.settings import config_file
    try:
        print(dump_config(load_config(config_file(args.config))), end="")
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    return 0


def parse_ctl_args(cmd: str, args: list[str]) -> dict:
    """`deselect 3 5` -> {members: [3, 5]}; `load_model DIR` -> {path}; KEY=VALUE (JSON values)."""
    out: dict = {}
    positional = [a for a in args if "=" not in a]
    for a in args:
        if "=" in a:
            key, _, value = a.partition("=")
            try:
                out[key] = json.loads(value)
            except ValueError:
                out[key] = value
    if positional:
        if cmd in ("set_active", "deselect", "select"):
            try:
                out["members"] = [int(v) for v in positional]
            except ValueError:
                raise CliError(f"{cmd}: member ids are integers, got {positional}") from None
        elif cmd == "load_model" and len(positional) == 1:
            out["path"] = str(Path(positional[0]).resolve()) if Path(positional[0]).exists() \
                else positional[0]
        else:
            raise CliError(f"{cmd}: unexpected argument(s) {positional}; use KEY=VALUE")
    return out


def cmd_ctl(args) -> int:
    from elit_stream.protocol.client import ControlClient
    from elit_stream.tools.settings import LOAD_TIMEOUT_S
    kwargs = parse_ctl_args(args.cmd, args.args)
    settings = _settings(args, **{"--control": args.control, "--timeout": args.timeout})
    timeout_s = settings.timeout_s
    if args.cmd == "load_model" and args.timeout is None:
        timeout_s = max(timeout_s, LOAD_TIMEOUT_S)
    address, curve = settings.endpoints["control"], _client_curve(settings)
    with ControlClient(address, timeout_s=timeout_s, curve=curve) as ctl:
        try:
            reply = ctl.call(args.cmd, **kwargs)
        except TimeoutError:
            raise _no_answer(address, timeout_s, curve) from None
    print(pretty_json(reply))
    return 0 if reply.get("ok") else 1


def pretty_json(obj, indent: str = "") -> str:
    """JSON with one key per line, but short lists of numbers/strings on one line."""
    inner = indent + "  "
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(k)}: {pretty_json(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(obj, list) and obj and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(inner + pretty_json(v, inner) for v in obj) + f"\n{indent}]"
    return json.dumps(obj)


def cmd_replay(args) -> int:
    from elit_stream.tools.replay import (
        StackError,
        choose_pixel_size,
        read_movie,
        replay,
        result_line,
        sendable,
        service_model,
    )
    settings = _settings(args, **{"--ingest": args.ingest, "--results": args.results,
                                  "--control": args.control})
    curve = _client_curve(settings)
    try:
        movie = read_movie(args.movie, args.dataset)
        frames, note = sendable(movie.frames, args.movie)
    except StackError as exc:
        raise CliError(str(exc)) from None
    for line in movie.notes + ([note] if note else []):
        print(f"note: {line}", file=sys.stderr)
    try:
        model = service_model(settings.endpoints["control"], settings.timeout_s, curve)
    except TimeoutError:
        raise _no_answer(settings.endpoints["control"], settings.timeout_s, curve) from None
    pixel_size_pm, said, warnings = choose_pixel_size(args.movie, movie, args.pixel_size_pm,
                                                      model.get("pixel_size_pm"))
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    if said:
        print(said, flush=True)
    print(f"movie {args.movie}: {movie.frames.shape[0]} frames of {movie.frames.shape[1]}x"
          f"{movie.frames.shape[2]} px, {movie.frames.dtype}", flush=True)

    def show(msg, rep):
        if not args.quiet and msg["topic"] == "result":
            print(result_line(msg, rep), flush=True)
    try:
        rep = replay(frames, settings.endpoints, acquisition=args.acquisition,
                     rate_fps=args.rate, pixel_size_pm=pixel_size_pm, wait_s=args.wait,
                     record=Path(args.record) if args.record else None, on_message=show,
                     curve=curve)
    except TimeoutError:
        raise _no_answer(settings.endpoints["control"], settings.timeout_s, curve) from None
    print(f"sent {rep.sent}: {len(rep.results)} results, {len(rep.dropped)} dropped, "
          f"{len(rep.rejected)} rejected" + ("" if rep.complete else
                                             f" ({len(rep.unanswered)} never answered)")
          + (f"; service restarted {rep.restarts}x, {rep.resent} frames sent again, "
             f"{rep.repeats} repeated results ignored" if rep.restarts or rep.resent else ""))
    for fid, (code, message) in sorted(rep.rejected.items()):
        print(f"  frame {fid} rejected: {code}: {message}")
    if args.record:
        print(f"recorded to {args.record}")
    return 0 if rep.complete and not rep.rejected else 1


def cmd_demo(args) -> int:
    from elit_stream.tools.demo import DemoError, run_demo
    try:
        return run_demo(args)
    except DemoError as exc:
        raise CliError(str(exc)) from None


# ------------------------------------------------------------------------------ batch (offline)
def _batch_parser(sub) -> None:
    b = sub.add_parser("batch", help="re-analyse recorded movies offline (here or on a Ray "
                       "cluster): one replay --record file per movie + a summary",
                       description="Analyse every frame of each MOVIE with the service's engine "
                       "and post-processing, without a service: OUT/<movie>.jsonl in the "
                       "`replay --record` format, OUT/summary.md, summary.json and "
                       "disagreement.png. Formats as for replay. docs/cluster.md.")
    b.add_argument("movies", metavar="MOVIE", nargs="+", help="stacks to analyse")
    b.add_argument("--model", metavar="DIR", required=True, help="artifact folder")
    b.add_argument("--out", metavar="DIR", required=True, help="output folder")
    b.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: this process (default); ray: chunks of frames as Ray tasks, the "
                   "model loaded once per worker (pip install 'elit-stream[cluster]')")
    b.add_argument("--address", metavar="ADDR", help="Ray cluster (auto, ray://HEAD:10001); "
                   "default: start a local Ray")
    b.add_argument("--workers", type=int, metavar="N", help="Ray workers (default: one per CPU)")
    b.add_argument("--threads", type=int, metavar="N",
                   help="engine threads per worker (default: all cores locally, 1 per Ray worker)")
    b.add_argument("--chunk", type=int, default=32, metavar="FRAMES",
                   help="frames per task (default 32)")
    b.add_argument("--pixel-size-pm", type=float, metavar="PM", help="overrides the files'")
    b.add_argument("--dataset", metavar="KEY", help="HDF5 dataset (default: the first 2-D/3-D one)")
    b.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    b.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_batch)


def cmd_batch(args) -> int:
    from elit_stream.core.engine import EngineError
    from elit_stream.core.manifest import ArtifactError
    from elit_stream.tools.batch import BatchConfig, BatchError, run_batch

    if args.chunk < 1 or (args.workers is not None and args.workers < 1):
        raise CliError("--chunk and --workers must be positive")
    if args.address and args.executor != "ray":
        raise CliError("--address needs --executor ray")
    cfg = BatchConfig(model=Path(args.model), out=Path(args.out), executor=args.executor,
                      address=args.address, workers=args.workers, threads=args.threads,
                      chunk_frames=args.chunk, pixel_size_pm=args.pixel_size_pm,
                      dataset=args.dataset, device=args.device, precision=args.precision)
    try:
        rows = run_batch(args.movies, cfg, show_progress=not args.quiet)
    except (BatchError, ArtifactError, EngineError) as exc:
        raise CliError(str(exc)) from None
    print((Path(args.out) / "summary.md").read_text(), end="")
    print(f"records and summary in {args.out}")
    return 0 if all(r["error"] is None and r["rejected"] == r["unanswered"] == 0 for r in rows) else 1


def _view_parser(sub) -> None:
    v = sub.add_parser("view", help="the operator's live view: a web page with the latest frame, "
                       "atoms, uncertainty, every member, health; select/deselect members",
                       description="Serve the live view of a running service (docs/view.md). "
                       "Needs the `view` extra (pip install -e '.[view]'). Loopback only unless "
                       "an access token is given. Prints one JSON line {\"ready\": true, "
                       "\"url\": ...} when serving.")
    _endpoint_args(v, which=("results", "control"))
    v.add_argument("--host", default="127.0.0.1", help="address to serve the page on "
                   "(default 127.0.0.1; anything else needs --token)")
    v.add_argument("--port", type=int, default=8090, help="HTTP port (default 8090; 0: free)")
    v.add_argument("--token", metavar="TEXT", help="access token the page URL must carry "
                   "(default: $ELIT_VIEW_TOKEN, which other users cannot see in `ps`)")
    v.add_argument("--models", action="append", metavar="DIR", help="folder whose artifacts "
                   "the page offers to load (repeatable; default models/)")
    v.add_argument("--fps", type=float, default=5.0, help="most frames per second sent to a "
                   "page (default 5)")
    v.add_argument("--unc-max", type=float, default=0.25, help="top of the uncertainty colour "
                   "bar (default 0.25)")
    v.add_argument("--max-px", type=int, default=384, help="longest side of the frame image "
                   "sent to the page (default 384)")
    v.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    _config_arg(v)
    _curve_client_args(v)
    v.set_defaults(func=cmd_view)


def cmd_view(args) -> int:
    import asyncio
    import os
    try:
        from elit_stream.tools.view.server import ViewConfigError, ViewOptions, serve
    except ImportError as exc:
        raise CliError(f"the view needs the `view` extra ({exc}): "
                       "pip install -e '.[view]'") from None
    settings = _settings(args, **{"--results": args.results, "--control": args.control})
    opts = ViewOptions(results=settings.endpoints["results"], control=settings.endpoints["control"],
                       host=args.host, port=args.port,
                       token=args.token or os.environ.get("ELIT_VIEW_TOKEN"),
                       curve=_client_curve(settings),
                       models_dirs=[Path(d) for d in (args.models or ["models"])],
                       fps=args.fps, unc_max=args.unc_max, max_px=args.max_px)

    def ready(url: str, port: int) -> None:
        print(json.dumps({"ready": True, "url": url, "port": port}), flush=True)
        logging.getLogger("elit_stream").info("live view at %s", url)
    try:
        asyncio.run(serve(opts, ready))
    except ViewConfigError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot serve on {args.host}:{args.port}: {exc} (another view "
                       "running? change --port)") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
