"""`elit-stream`: run the service, replay a movie into it, send it commands, run the demo.

Every command prints a clear message (no traceback) for bad arguments, missing files and
busy ports, and exits non-zero on error.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXAMPLES = """\
examples:
  elit-stream demo                             the main job: service + synthetic movie + overlay
  elit-stream serve                            serve models/default on the default ports
  elit-stream serve --model models/v2 --delivery latest
  elit-stream replay movie.tif --rate 10 --pixel-size-pm 14.1 --record results.jsonl
  elit-stream ctl status
  elit-stream ctl deselect 3 5                 stop counting members 3 and 5
  elit-stream ctl set_params threshold=0.4
  elit-stream ctl load_model models/v2         swap the ensemble without dropping frames
  elit-stream config --print                   show the effective configuration
  elit-stream keys /etc/elit-stream/keys --client scope --client operator
  elit-stream serve --auth control --keys /etc/elit-stream/keys
  elit-stream ctl status --client-key scope.key_secret --server-key server.key
  elit-stream view                             the operator's live view at http://127.0.0.1:8090/

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
    c.add_argument("--config", metavar="FILE", help="TOML or JSON config file")
    c.add_argument("--print", action="store_true", default=True,
                   help="print it as TOML (the default action)")
    c.set_defaults(func=cmd_config)
    _demo_parser(sub)
    _keys_parser(sub)
    _view_parser(sub)
    return p


def _curve_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--client-key", metavar="FILE", help="CURVE: this client's key pair "
                   "(NAME.key_secret from `elit-stream keys`); needs --server-key")
    p.add_argument("--server-key", metavar="FILE", help="CURVE: the service's public key "
                   "(server.key)")


def _client_curve(args):
    """--client-key/--server-key -> ClientCurve or None (CliError if only one is given)."""
    if not (args.client_key or args.server_key):
        return None
    if not (args.client_key and args.server_key):
        raise CliError("CURVE needs both --client-key and --server-key")
    from elit_stream.protocol.auth import AuthError, ClientCurve
    try:
        return ClientCurve.from_files(args.client_key, args.server_key)
    except AuthError as exc:
        raise CliError(str(exc)) from None


def _keys_parser(sub) -> None:
    k = sub.add_parser("keys", help="create CURVE key pairs: the server's and one per client",
                       description="Create DIR/server.key (public: give it to clients) and "
                       "DIR/server.key_secret (stays on the server), and for each --client NAME "
                       "a key pair DIR/clients/NAME.key(_secret) whose public key is copied to "
                       "DIR/allowed/ (the clients the service accepts). Existing keys are kept. "
                       "Then: elit-stream serve --auth all --keys DIR.")
    k.add_argument("dir", metavar="DIR")
    k.add_argument("--client", action="append", default=[], metavar="NAME",
                   help="make (or re-allow) a client key pair (repeatable)")
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


def _endpoint_args(p: argparse.ArgumentParser, defaults: bool) -> None:
    d = (lambda v: v) if defaults else (lambda v: None)
    p.add_argument("--ingest", metavar="ADDR", default=d("tcp://127.0.0.1:5555"),
                   help="frames socket (PUSH->PULL), default tcp://127.0.0.1:5555")
    p.add_argument("--results", metavar="ADDR", default=d("tcp://127.0.0.1:5556"),
                   help="results/events socket (PUB), default tcp://127.0.0.1:5556")
    p.add_argument("--control", metavar="ADDR", default=d("tcp://127.0.0.1:5557"),
                   help="control socket (ROUTER), default tcp://127.0.0.1:5557")


def _serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="run the service (until Ctrl-C, SIGTERM or `ctl shutdown`)",
                       description="Run the service. Settings come from defaults, then --config "
                       "FILE, then ELIT_* environment variables (e.g. ELIT_DELIVERY__MODE=latest),"
                       " then these options. Port 0 picks a free port. When ready it prints one "
                       "JSON line with the bound endpoints on stdout.")
    s.add_argument("--config", metavar="FILE", help="TOML or JSON config file")
    s.add_argument("--model", metavar="DIR", help="model artifact folder (default models/default)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to run the ensemble")
    s.add_argument("--threads", type=int, metavar="N", help="CPU threads for inference")
    s.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="fp32 (default; onnxruntime, matches the trainer); bf16 (OpenVINO on "
                        "CPUs with AMX/AVX-512 BF16: ~3.5x faster, checked against the fp32 "
                        "probe; the openvino extra); fp16 (onnxruntime, for CUDA; the gpu extra)")
    s.add_argument("--warmup-shape", type=_shape_arg, metavar="HxW",
                   help="frame size to prepare for before serving, e.g. 512x512 or 512 (default "
                        "256x256): the first frame of a new size pays for set-up (bf16: 0.5-1 s)")
    s.add_argument("--delivery", choices=["lossless", "latest"],
                   help="lossless: every frame, in order (slows the sender down if needed); "
                        "latest: skip stale frames to keep up (each one reported)")
    _endpoint_args(s, defaults=False)
    s.add_argument("--metrics-host", metavar="HOST", help="Prometheus endpoint host")
    s.add_argument("--metrics-port", type=int, metavar="PORT", help="Prometheus port (9108)")
    s.add_argument("--no-metrics", action="store_true", help="no Prometheus endpoint")
    s.add_argument("--allowed-dir", action="append", metavar="DIR",
                   help="folder load_model may load artifacts from (repeatable; default models/)")
    s.add_argument("--maps", choices=["subscribe", "always", "never"],
                   help="publish mean/std maps: when a subscriber asks (topic 'maps'), always, "
                        "never")
    s.add_argument("--auth", metavar="SOCKETS", help="require CURVE authentication on these "
                   "sockets: all, or a comma list of ingest,results,control (e.g. control)")
    s.add_argument("--keys", metavar="DIR", help="CURVE key folder (`elit-stream keys DIR`)")
    s.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    s.set_defaults(func=cmd_serve)


def _replay_parser(sub) -> None:
    r = sub.add_parser("replay", help="act as the microscope: send a recorded movie to the service",
                       description="Send every frame of MOVIE to a running service and wait "
                       "until each is answered. Reads .npy, .npz (array 'frames'), multi-page "
                       ".tif/.tiff and .h5/.hdf5 stacks [frames, rows, columns].")
    r.add_argument("movie", metavar="MOVIE", help="the stack to send")
    r.add_argument("--dataset", metavar="KEY", help="HDF5 dataset (default: the first 2-D/3-D one)")
    r.add_argument("--rate", type=float, metavar="FPS", help="frames per second (default: as "
                   "fast as the service takes them)")
    r.add_argument("--pixel-size-pm", type=float, metavar="PM",
                   help="pixel size in picometres (frames are rescaled to the model's)")
    r.add_argument("--acquisition", metavar="ID", help="acquisition id (default: replay-<time>)")
    r.add_argument("--record", metavar="FILE", help="write every result/event as one JSON line")
    r.add_argument("--wait", type=float, default=60.0, metavar="S",
                   help="seconds to wait for the last answers (default 60)")
    r.add_argument("--quiet", action="store_true", help="no line per frame")
    _endpoint_args(r, defaults=True)
    _curve_client_args(r)
    r.set_defaults(func=cmd_replay)


def _ctl_parser(sub) -> None:
    c = sub.add_parser("ctl", help="send one control command and print the reply as JSON",
                       description="Commands: ping, status, members, set_active IDS, deselect "
                       "IDS, select IDS, reset, set_params KEY=VALUE..., set_maps mode=always, "
                       "load_model DIR, shutdown. Exit status 1 if the service refuses.")
    c.add_argument("cmd", metavar="CMD")
    c.add_argument("args", nargs="*", metavar="ARG", help="member ids, a path, or KEY=VALUE")
    c.add_argument("--control", metavar="ADDR", default="tcp://127.0.0.1:5557")
    c.add_argument("--timeout", type=float, default=120.0, metavar="S")
    _curve_client_args(c)
    c.set_defaults(func=cmd_ctl)


def _demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="the main job: start the service, replay a synthetic movie, "
                       "print a line per frame, score against the truth, write a PNG overlay")
    d.add_argument("--model", metavar="DIR", help="artifact (default models/default)")
    d.add_argument("--frames", type=int, default=20, help="frames in the movie (20)")
    d.add_argument("--size", type=int, default=256, metavar="PX", help="frame side (256)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--rate", type=float, metavar="FPS", help="send rate (default: as fast as "
                   "the service takes them)")
    d.add_argument("--delivery", choices=["lossless", "latest"], default="lossless")
    d.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    d.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="bf16: OpenVINO on the CPU, faster, not bit-identical (see serve --help)")
    d.add_argument("--out", metavar="PNG", default="runs/demo/last_frame.png")
    d.set_defaults(func=cmd_demo)


# ------------------------------------------------------------------------------ commands
def cmd_serve(args) -> int:
    import zmq

    from elit_stream.core.manifest import ArtifactError, default_artifact_path
    from elit_stream.service.config import ConfigError, load_config
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
        cfg = load_config(args.config, overrides)
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
    return service.run()


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
    try:
        print(dump_config(load_config(args.config)), end="")
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
    kwargs = parse_ctl_args(args.cmd, args.args)
    curve = _client_curve(args)
    with ControlClient(args.control, timeout_s=args.timeout, curve=curve) as ctl:
        try:
            reply = ctl.call(args.cmd, **kwargs)
        except TimeoutError:
            hint = "is the service running? does it require CURVE keys (--client-key, " \
                "--server-key)?" if curve is None else "is the service running? is this " \
                "client's public key in the service's allowed folder?"
            raise CliError(f"no reply from {args.control} within {args.timeout} s "
                           f"({hint})") from None
    print(json.dumps(reply, indent=2))
    return 0 if reply.get("ok") else 1


def cmd_replay(args) -> int:
    from elit_stream.tools.replay import StackError, read_stack, replay, result_line
    try:
        frames, ps = read_stack(args.movie, args.dataset)
    except StackError as exc:
        raise CliError(str(exc)) from None
    endpoints = {"ingest": args.ingest, "results": args.results, "control": args.control}

    def show(msg, rep):
        if not args.quiet and msg["topic"] == "result":
            print(result_line(msg, rep), flush=True)
    try:
        rep = replay(frames, endpoints, acquisition=args.acquisition, rate_fps=args.rate,
                     pixel_size_pm=args.pixel_size_pm or ps, wait_s=args.wait,
                     record=Path(args.record) if args.record else None, on_message=show,
                     curve=_client_curve(args))
    except TimeoutError as exc:
        raise CliError(f"{exc} (is the service running at {args.control}?)") from None
    print(f"sent {rep.sent}: {len(rep.results)} results, {len(rep.dropped)} dropped, "
          f"{len(rep.rejected)} rejected" + ("" if rep.complete else " (some never answered)"))
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


def _view_parser(sub) -> None:
    v = sub.add_parser("view", help="the operator's live view: a web page with the latest frame, "
                       "atoms, uncertainty, every member, health; select/deselect members",
                       description="Serve the live view of a running service (docs/view.md). "
                       "Needs the `view` extra (pip install -e '.[view]'). Loopback only unless "
                       "an access token is given. Prints one JSON line {\"ready\": true, "
                       "\"url\": ...} when serving.")
    v.add_argument("--results", metavar="ADDR", default="tcp://127.0.0.1:5556",
                   help="the service's results socket (default tcp://127.0.0.1:5556)")
    v.add_argument("--control", metavar="ADDR", default="tcp://127.0.0.1:5557",
                   help="the service's control socket (default tcp://127.0.0.1:5557)")
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
    opts = ViewOptions(results=args.results, control=args.control, host=args.host,
                       port=args.port, token=args.token or os.environ.get("ELIT_VIEW_TOKEN"),
                       curve=_client_curve(args),
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
