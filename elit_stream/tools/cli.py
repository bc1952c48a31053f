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

from elit_stream.tools import cli_batch, cli_serve, cli_view
from elit_stream.tools.cli_common import (
    FAST_SCAN_HELP,
    CliError,
    client_curve,
    client_settings_for,
    config_arg,
    curve_client_args,
    endpoint_args,
    fast_scan_arg,
    no_answer,
    pixel_size_arg,
)

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="elit-stream", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Real-time atom finding with ensemble uncertainty for STEM microscopes. "
                    "A service receives frames over ZeroMQ, runs every member of an ensemble of "
                    "neural networks on each frame, and publishes atom positions with their "
                    "uncertainty.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    cli_serve.add_parser(sub)
    _replay_parser(sub)
    _ctl_parser(sub)
    c = sub.add_parser("config", help="show the effective configuration (defaults + file + "
                       "ELIT_* environment)")
    config_arg(c)
    c.add_argument("--print", action="store_true", default=True,
                   help="print it as TOML (the default action)")
    c.set_defaults(func=cmd_config)
    _demo_parser(sub)
    _keys_parser(sub)
    cli_batch.add_parser(sub)
    cli_view.add_parser(sub)
    return p


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
    r.add_argument("--pixel-size-pm", type=pixel_size_arg, metavar="PM",
                   help="pixel size in picometres, > 0; frames are rescaled to the model's "
                        "(default: the file's, else the service assumes the model's, with a "
                        "warning)")
    r.add_argument("--acquisition", metavar="ID", help="acquisition id (default: replay-<time>)")
    r.add_argument("--fast-scan", type=fast_scan_arg, default=None, metavar="DIRECTION",
                   help=FAST_SCAN_HELP)
    r.add_argument("--record", metavar="FILE", help="write every result/event as one JSON line "
                   "(default: none)")
    r.add_argument("--wait", type=float, default=60.0, metavar="S",
                   help="seconds to wait for the last answers after the last frame (default 60)")
    r.add_argument("--quiet", action="store_true", help="no line per frame (default: one per "
                   "frame)")
    endpoint_args(r)
    config_arg(r)
    curve_client_args(r)
    r.set_defaults(func=cmd_replay)


def _ctl_parser(sub) -> None:
    c = sub.add_parser("ctl", help="send one control command and print the reply as JSON",
                       description="Commands: ping, status, members, set_active IDS, deselect "
                       "IDS, select IDS, reset, set_params KEY=VALUE..., set_maps mode=always, "
                       "load_model DIR, shutdown (docs/protocol.md). Exit status 1 if the "
                       "service refuses, 2 if none answers.")
    c.add_argument("cmd", metavar="CMD", help="the command, e.g. status")
    c.add_argument("args", nargs="*", metavar="ARG", help="member ids, a path, or KEY=VALUE")
    endpoint_args(c, which=("control",))
    c.add_argument("--timeout", type=float, metavar="S", help="seconds to wait for the reply "
                   "(default: config client.timeout_s, 5; load_model: 120, as it answers when "
                   "the model is loaded)")
    config_arg(c)
    curve_client_args(c)
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
    settings = client_settings_for(args, **{"--control": args.control, "--timeout": args.timeout})
    timeout_s = settings.timeout_s
    if args.cmd == "load_model" and args.timeout is None:
        timeout_s = max(timeout_s, LOAD_TIMEOUT_S)
    address, curve = settings.endpoints["control"], client_curve(settings)
    with ControlClient(address, timeout_s=timeout_s, curve=curve) as ctl:
        try:
            reply = ctl.call(args.cmd, **kwargs)
        except TimeoutError:
            raise no_answer(address, timeout_s, curve) from None
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
    settings = client_settings_for(args, **{"--ingest": args.ingest, "--results": args.results,
                                  "--control": args.control})
    curve = client_curve(settings)
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
        raise no_answer(settings.endpoints["control"], settings.timeout_s, curve) from None
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
                     curve=curve, fast_scan=args.fast_scan)
    except TimeoutError:
        raise no_answer(settings.endpoints["control"], settings.timeout_s, curve) from None
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
if __name__ == "__main__":
    sys.exit(main())
