"""`elit-stream view`: the operator's live view of a running service (tools/view/; docs/view.md)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from elit_stream.tools.cli_common import (
    CliError,
    client_curve,
    client_settings_for,
    config_arg,
    curve_client_args,
    endpoint_args,
)


def add_parser(sub) -> None:
    v = sub.add_parser("view", help="the operator's live view: a web page with the latest frame, "
                       "atoms, uncertainty, every member, health; select/deselect members",
                       description="Serve the live view of a running service (docs/view.md). "
                       "Needs the `view` extra (pip install -e '.[view]'). Loopback only unless "
                       "an access token is given. Prints one JSON line {\"ready\": true, "
                       "\"url\": ...} when serving.")
    endpoint_args(v, which=("results", "control"))
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
    config_arg(v)
    curve_client_args(v)
    v.set_defaults(func=cmd_view)


def cmd_view(args) -> int:
    import asyncio
    try:
        from elit_stream.tools.view.server import ViewConfigError, ViewOptions, serve
    except ImportError as exc:
        raise CliError(f"the view needs the `view` extra ({exc}): "
                       "pip install -e '.[view]'") from None
    settings = client_settings_for(args, **{"--results": args.results, "--control": args.control})
    opts = ViewOptions(results=settings.endpoints["results"], control=settings.endpoints["control"],
                       host=args.host, port=args.port,
                       token=args.token or os.environ.get("ELIT_VIEW_TOKEN"),
                       curve=client_curve(settings),
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
