"""The view's web server (aiohttp): the page, its static files and one websocket per page.

Routes: `/` (the page), `/static/...` (shipped in this package: no CDN, no build step),
`/ws` (state to the page, operator actions from it), `/healthz`.

Per page one sender task sends the latest value of each slot of the `ViewState` that is newer
than what the page has, at most `fps` frames per second; while a send waits on a slow page,
newer frames simply replace older ones in the state (nothing queues, and the service never
knows). Security (docs/view.md):

- loopback by default; bound beyond loopback the view refuses to start without a token;
- with a token, the page and the websocket need it (`?token=`), compared in constant time;
- a websocket from a page of another origin is refused (a web page in the operator's browser
  must not drive the microscope's service);
- actions reach the service with the view's own CURVE keys, i.e. the authority of `ctl`.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from elit_stream.tools.view.link import ServiceLink
from elit_stream.tools.view.state import ViewState

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
SEND_TIMEOUT_S = 30.0          # a page that takes this long for one message is closed


class ViewConfigError(ValueError):
    """The view refuses to start with these settings (message says why and what to do)."""


@dataclass
class ViewOptions:
    results: str = "tcp://127.0.0.1:5556"
    control: str = "tcp://127.0.0.1:5557"
    host: str = "127.0.0.1"
    port: int = 8090
    token: str | None = None
    curve: object = None
    models_dirs: list[Path] = field(default_factory=lambda: [Path("models")])
    fps: float = 5.0
    unc_max: float = 0.25
    max_px: int = 384
    thumb_px: int = 96


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_options(opts: ViewOptions) -> None:
    if not is_loopback(opts.host) and not opts.token:
        raise ViewConfigError(
            f"--host {opts.host} is reachable from other machines: give an access token "
            "(--token or ELIT_VIEW_TOKEN), and put a TLS reverse proxy in front if the network "
            "is not trusted (docs/view.md, Security); or keep the default --host 127.0.0.1")
    if opts.fps <= 0 or opts.unc_max <= 0 or opts.max_px < 16 or opts.thumb_px < 8:
        raise ViewConfigError("--fps and --unc-max must be > 0, --max-px >= 16, "
                              "--thumb-px >= 8")


def token_ok(request: web.Request, token: str | None) -> bool:
    if not token:
        return True
    given = request.query.get("token", "")
    return hmac.compare_digest(given.encode(), token.encode())


def origin_ok(request: web.Request) -> bool:
    """No Origin (not a browser) or the page's own origin."""
    origin = request.headers.get("Origin")
    return origin is None or urlsplit(origin).netloc == request.host


class View:
    """The aiohttp application around one ServiceLink."""

    def __init__(self, opts: ViewOptions):
        check_options(opts)
        self.opts = opts
        self.state = ViewState()
        self.link = ServiceLink(self.state, opts.results, opts.control, opts.curve,
                                models_dirs=opts.models_dirs, unc_max=opts.unc_max,
                                fps=opts.fps, max_px=opts.max_px, thumb_px=opts.thumb_px)
        self.app = web.Application()
        self.app.add_routes([web.get("/", self.page), web.get("/ws", self.websocket),
                             web.get("/healthz", self.healthz),
                             web.static("/static", STATIC)])
        self.app.on_startup.append(self._start_link)
        self.app.on_cleanup.append(self._stop_link)

    async def _start_link(self, _app) -> None:
        self._link_task = asyncio.get_running_loop().create_task(self.link.run())

    async def _stop_link(self, _app) -> None:
        self._link_task.cancel()
        try:
            await self._link_task
        except asyncio.CancelledError:
            pass

    async def page(self, request: web.Request) -> web.StreamResponse:
        if not token_ok(request, self.opts.token):
            return web.Response(status=403, text="access token missing or wrong: open the URL "
                                "that `elit-stream view` printed (…/?token=…)\n")
        return web.FileResponse(STATIC / "index.html",
                                headers={"Cache-Control": "no-store"})

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "browsers": self.state.browsers})

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        if not token_ok(request, self.opts.token):
            return web.Response(status=403, text="access token missing or wrong\n")
        if not origin_ok(request):
            return web.Response(status=403, text="websocket from another origin refused\n")
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=1 << 16)
        await ws.prepare(request)
        self._browser(+1)
        sender = asyncio.get_running_loop().create_task(self._send_loop(ws, request))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await self._on_page_message(ws, msg.data)
        finally:
            sender.cancel()
            self._browser(-1)
        return ws

    def _browser(self, delta: int) -> None:
        self.state.browsers += delta
        self.link.browsers_changed(self.state.browsers)

    async def _on_page_message(self, ws: web.WebSocketResponse, text: str) -> None:
        try:
            req = json.loads(text)
        except ValueError:
            return
        if not isinstance(req, dict) or req.get("type") != "action":
            return
        reply = await self.link.action(req)
        await self._send(ws, {"type": "reply", "id": req.get("id"), "cmd": req.get("cmd"),
                              "reply": reply})

    async def _send_loop(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        """Latest-value sender: one copy of each changed slot, frames at most `fps` per s."""
        seen = {name: 0 for name in ViewState.SLOTS}
        gap_s = 1.0 / self.opts.fps
        await self._send(ws, {"type": "hello", "fps": self.opts.fps,
                              "unc_max": self.opts.unc_max})
        while not ws.closed:
            gen = self.state.gen
            for name, slot in self.state.slots.items():
                if slot.gen > seen[name] and slot.value is not None:
                    seen[name] = slot.gen
                    if not await self._send(ws, {"type": name, **slot.value}):
                        if request.transport is not None:     # drop it, no closing handshake
                            request.transport.abort()
                        return
            await asyncio.sleep(gap_s / 2)      # at most ~2 rounds per frame interval
            await self.state.wait_newer(gen, timeout_s=5.0)

    async def _send(self, ws: web.WebSocketResponse, doc: dict) -> bool:
        """False if the page is gone or has not taken a message for SEND_TIMEOUT_S."""
        try:
            await asyncio.wait_for(ws.send_str(json.dumps(doc, separators=(",", ":"))),
                                   SEND_TIMEOUT_S)
            return True
        except TimeoutError:
            log.warning("dropping a page that does not read (no message taken in %s s)",
                        SEND_TIMEOUT_S)
        except ConnectionResetError:
            pass
        return False


async def serve(opts: ViewOptions, ready=None) -> None:
    """Run the view until cancelled; `ready(url)` is called once the port is bound."""
    view = View(opts)
    runner = web.AppRunner(view.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, opts.host, opts.port)
    await site.start()
    port = _bound_port(site)
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    url = f"http://{host}:{port}/" + (f"?token={opts.token}" if opts.token else "")
    if ready is not None:
        ready(url, port)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def _bound_port(site: web.TCPSite) -> int:
    server = site._server                                  # aiohttp keeps the asyncio server
    for sock in getattr(server, "sockets", None) or []:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            return sock.getsockname()[1]
    raise RuntimeError("the view's server has no bound socket")
