"""CURVE authentication and encryption of the service's sockets (ZeroMQ's `zmq.auth`).

Owns the key folder on disk, the server side (a ThreadAuthenticator that accepts only the client
public keys in the allowed folder; CURVE options per socket), the client side (`ClientCurve`: a
key pair plus the server's public key), and the watch on refused handshakes (a thread reading
socket monitors: each refusal is logged, rate-limited, and counted in
`elit_auth_failures_total{socket,reason}`).

Key folder, made by `elit-stream keys DIR --client NAME ...` (zmq.auth.create_certificates):

    DIR/server.key              the server's public key: give it to every client
    DIR/server.key_secret       the server's key pair: stays on the server (mode 600)
    DIR/allowed/NAME.key        public keys of the clients the server accepts
    DIR/clients/NAME.key        a client's public key
    DIR/clients/NAME.key_secret a client's key pair: move it to that client (mode 600)

Revoking a client: delete its file from DIR/allowed/ and restart the service.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger(__name__)

SOCKETS = ("ingest", "results", "control")
ZAP_DOMAIN = b"elit-stream"
SERVER_NAME = "server"
_REFUSED = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused_key",
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake"}
_PROTOCOL_REASONS = {zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "no_curve",
                     zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "crypto"}
LOG_EVERY_S = 10.0


class AuthError(Exception):
    """Keys missing or unreadable; the message names the file."""


# ------------------------------------------------------------------------------ key files
def create_keys(keys_dir: str | Path, clients: list[str] = ()) -> dict[str, Path]:
    """Make the server key pair (if missing) and one key pair per client (if missing); copy
    each client's public key into DIR/allowed/. Never overwrites a key. -> written files."""
    root = Path(keys_dir)
    written: dict[str, Path] = {}
    for sub in ("", "allowed", "clients"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    if not (root / f"{SERVER_NAME}.key_secret").exists():
        written["server"] = _pair(root, SERVER_NAME)
    for name in clients:
        if not name.replace("-", "").replace("_", "").isalnum() or name == SERVER_NAME:
            raise AuthError(f"client name {name!r}: use letters, digits, - and _ "
                            f"(not {SERVER_NAME!r})")
        if not (root / "clients" / f"{name}.key_secret").exists():
            written[name] = _pair(root / "clients", name)
        shutil.copyfile(root / "clients" / f"{name}.key", root / "allowed" / f"{name}.key")
    return written


def _pair(folder: Path, name: str) -> Path:
    public, secret = zmq.auth.create_certificates(folder, name)
    os.chmod(secret, 0o600)
    return Path(public)


def load_pair(secret_file: str | Path) -> tuple[bytes, bytes]:
    """A `.key_secret` file -> (public, secret) Z85 keys."""
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as exc:
        raise AuthError(f"cannot read key pair {secret_file}: {exc}") from None
    if not secret:
        raise AuthError(f"{secret_file} has no secret key (use the .key_secret file)")
    return public, secret


def load_public(key_file: str | Path) -> bytes:
    """A `.key` (or `.key_secret`) file -> the public Z85 key."""
    try:
        public, _ = zmq.auth.load_certificate(key_file)
    except (OSError, ValueError) as exc:
        raise AuthError(f"cannot read public key {key_file}: {exc}") from None
    return public


# ------------------------------------------------------------------------------ client side
@dataclass(frozen=True)
class ClientCurve:
    """A client's key pair and the server's public key; `apply(socket)` before `connect`."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def from_files(cls, client_secret_file: str | Path, server_key_file: str | Path
                   ) -> ClientCurve:
        public, secret = load_pair(client_secret_file)
        return cls(public, secret, load_public(server_key_file))

    def apply(self, socket: zmq.Socket) -> None:
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret
        socket.curve_serverkey = self.server_public


# ------------------------------------------------------------------------------ server side
class ServerAuth:
    """CURVE on the chosen sockets of one context, checked against DIR/allowed/*.key."""

    def __init__(self, keys_dir: str | Path, sockets: set[str], failures=None):
        self.keys_dir, self.sockets = Path(keys_dir), set(sockets)
        self.public, self.secret = load_pair(self.keys_dir / f"{SERVER_NAME}.key_secret")
        self.allowed_dir = self.keys_dir / "allowed"
        if not self.allowed_dir.is_dir():
            raise AuthError(f"{self.allowed_dir}: no such folder (make it with "
                            f"`elit-stream keys {self.keys_dir} --client NAME`)")
        self.n_allowed = len(list(self.allowed_dir.glob("*.key")))
        self._failures = failures              # a prometheus Counter(socket, reason) or None
        self._authenticator: ThreadAuthenticator | None = None
        self._monitors: list[tuple[str, zmq.Socket, zmq.Socket]] = []
        self._watcher: threading.Thread | None = None
        self._halt = threading.Event()

    def start(self, ctx: zmq.Context) -> None:
        if not self.sockets:
            return
        self._authenticator = ThreadAuthenticator(ctx, log=logging.getLogger(__name__ + ".zap"))
        self._authenticator.start()
        self._authenticator.configure_curve(domain=ZAP_DOMAIN.decode(),
                                            location=str(self.allowed_dir))
        log.info("CURVE on %s; %d allowed client key(s) in %s", ", ".join(sorted(self.sockets)),
                 self.n_allowed, self.allowed_dir)
        if self.n_allowed == 0:
            log.warning("no client key in %s: every client will be refused", self.allowed_dir)

    def secure(self, socket: zmq.Socket, name: str) -> None:
        """CURVE server options (before bind) and a monitor of refused handshakes."""
        if name not in self.sockets:
            return
        socket.curve_secretkey, socket.curve_publickey = self.secret, self.public
        socket.curve_server = True
        socket.zap_domain = ZAP_DOMAIN
        mon = socket.get_monitor_socket(sum(_REFUSED))
        self._monitors.append((name, socket, mon))

    def watch(self) -> None:
        """Start the thread that reports refused handshakes (after every `secure`)."""
        if self._monitors:
            self._watcher = threading.Thread(target=self._watch, name="elit-auth-watch",
                                             daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        poller = zmq.Poller()
        for _, _, mon in self._monitors:
            poller.register(mon, zmq.POLLIN)
        names = {mon: name for name, _, mon in self._monitors}
        last_log: dict[tuple[str, str], tuple[float, int]] = {}
        while not self._halt.is_set():
            for mon, _ in poller.poll(200):
                try:
                    evt = recv_monitor_message(mon, zmq.NOBLOCK)
                except zmq.ZMQError:
                    continue
                self._refused(names[mon], evt, last_log)
        for _, _, mon in self._monitors:
            mon.close(linger=0)

    def _refused(self, socket_name: str, evt: dict, last_log: dict) -> None:
        reason = _REFUSED.get(evt["event"], "handshake")
        if reason == "protocol":
            reason = _PROTOCOL_REASONS.get(evt["value"], "protocol")
        if self._failures is not None:
            self._failures.labels(socket=socket_name, reason=reason).inc()
        key = (socket_name, reason)
        t_last, n = last_log.get(key, (0.0, 0))
        now = time.monotonic()
        if now - t_last >= LOG_EVERY_S:
            more = f" ({n} more since the last line)" if n else ""
            log.warning("auth: refused a connection on %s from %s: %s%s", socket_name,
                        evt.get("endpoint", b"?").decode(errors="replace"), _explain(reason), more)
            last_log[key] = (now, 0)
        else:
            last_log[key] = (t_last, n + 1)

    def stop(self) -> None:
        """Stop watching and authenticating (before the sockets and the context close)."""
        self._halt.set()
        if self._watcher is not None:
            self._watcher.join(5)
        for _, socket, _ in self._monitors:
            try:
                socket.disable_monitor()
            except zmq.ZMQError:
                pass
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None


def _explain(reason: str) -> str:
    return {"refused_key": "client key not in the allowed folder",
            "no_curve": "client sent no CURVE keys (unauthenticated)",
            "crypto": "CURVE decryption failed (client has a wrong server key?)",
            "protocol": "CURVE handshake protocol error",
            }.get(reason, "handshake failed")
