"""Sockets: the only place gped touches ZeroMQ. The message format lives in :mod:`gped.wire`.

Topology (all addresses from :class:`~gped.config.CoordinatorConfig`):

* control — the coordinator binds a ROUTER at ``tcp://host:port``; every role connects a DEALER.
  Handshake, heartbeats, reports, checkpoint notices and stop travel here.
* samples — the sampler binds a PUB at ``tcp://sampler_host:port+1``; students and the coordinator
  connect SUBs. Each message is prefixed by a one-frame topic: ``p`` parameters, ``t`` targets,
  ``c`` the sampler's own heartbeats and end of stream.

Flow control: every socket has a bounded high-water mark. A PUB socket never blocks: when a
subscriber's queue is full ZeroMQ drops for that subscriber, and the receiver counts the gap in
sequence numbers. DEALER sends use NOBLOCK and count what could not be queued. Every receive takes a
timeout. ``linger`` is bounded so closing never hangs on a dead peer.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import socket
import time
from dataclasses import dataclass

import zmq

from .config import CoordinatorConfig
from .wire import Message, RejectCounter, encode, safe_decode

log = logging.getLogger(__name__)

TOPIC_PARAMS = b"p"
TOPIC_TARGETS = b"t"
TOPIC_CONTROL = b"c"

DEFAULT_HWM = 1000
LINGER_MS = 2000
BIND_RETRIES = 6


@dataclass(frozen=True)
class Addresses:
    control: str
    samples: str
    control_bind: str
    samples_bind: str

    @classmethod
    def from_config(cls, cfg: CoordinatorConfig) -> "Addresses":
        sampler_host = cfg.sampler_host or cfg.host
        return cls(
            control=f"tcp://{cfg.host}:{cfg.port}",
            samples=f"tcp://{sampler_host}:{cfg.port + 1}",
            control_bind=f"tcp://{cfg.bind or cfg.host}:{cfg.port}",
            samples_bind=f"tcp://{cfg.bind or sampler_host}:{cfg.port + 1}",
        )


def is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Channel:
    """One ZeroMQ socket with encode/decode, sequence numbering and rejection counting."""

    def __init__(self, socket: zmq.Socket, sender: str, logger: logging.Logger | None = None):
        self.socket = socket
        self.sender = sender
        self.seq = 0
        self.rejected = RejectCounter()
        self.dropped_sends = 0
        self.log = logger or log

    def send(self, msg: Message, prefix: list[bytes] | None = None) -> bool:
        """Queue ``msg`` without blocking; returns False (and counts) when the queue is full.

        A PUB socket never reports a full queue (it drops for the slow subscriber instead), so
        on the sample stream losses show up as gaps in the receivers' sample ids.
        """
        frames = list(prefix or []) + encode(msg, sender=self.sender, seq=self.seq)
        self.seq += 1
        try:
            self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            self.dropped_sends += 1
            return False

    def recv(self, timeout_ms: int = 0, prefix_frames: int = 0) -> tuple[list[bytes], Message | None] | None:
        """Wait up to ``timeout_ms`` for one message. Returns None on timeout, else (prefix, message);
        a malformed message comes back as (prefix, None) after it has been counted and logged."""
        if timeout_ms and not self.socket.poll(timeout_ms):
            return None
        try:
            frames = self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        prefix = [f.bytes for f in frames[:prefix_frames]]
        if len(frames) <= prefix_frames:
            self.rejected.add("frames")
            return prefix, None
        return prefix, safe_decode(frames[prefix_frames:], self.rejected, self.log)


#: largest inbound frame libzmq accepts before gped even sees it (a peer sending more is disconnected):
#: data sockets allow the wire's message limit; a PUB only ever receives subscriptions, which
#: libzmq stores byte by byte, so a hostile subscriber could otherwise exhaust the sampler's memory
MAX_INBOUND = {zmq.PUB: 1024}


def make_socket(ctx: zmq.Context, kind: int, hwm: int = DEFAULT_HWM) -> zmq.Socket:
    from .wire import MAX_MESSAGE_BYTES

    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_INBOUND.get(kind, MAX_MESSAGE_BYTES))
    return sock


def bind(sock: zmq.Socket, address: str, cfg: CoordinatorConfig, what: str) -> None:
    from .errors import GpedError

    if not is_loopback(address) and not cfg.keys:
        if not cfg.allow_insecure:
            raise GpedError(
                f"refusing to bind {what} to non-loopback {address} without CURVE keys; "
                "set coordinator.keys (gped keys) or coordinator.allow_insecure=true"
            )
        log.warning("binding %s to %s without authentication: anyone who can reach it can connect", what, address)
    # A peer that connects before we listen can, on loopback, end up connected to itself with its
    # local port equal to ours (TCP self-connect, when the port lies in the kernel's ephemeral
    # range); zmq drops such a connection soon, so a few retries ride it out.
    for attempt in range(BIND_RETRIES):
        try:
            sock.bind(address)
            return
        except zmq.ZMQError as exc:
            if attempt == BIND_RETRIES - 1:
                raise GpedError(
                    f"cannot bind {what} to {address}: {exc} (is another run using this port? ports in the "
                    "kernel's ephemeral range, /proc/sys/net/ipv4/ip_local_port_range, can be taken by outgoing "
                    "connections: prefer one below it)"
                ) from None
            log.warning("cannot bind %s to %s yet (%s); retrying", what, address, exc)
            time.sleep(0.5)


# --------------------------------------------------------------------------------------------------
# CURVE authentication (across hosts)

KEY_FILES = ("server.key", "server.key_secret", "client.key", "client.key_secret")


def make_keys(folder: str) -> list[str]:
    """Write a server and a client CURVE key pair into ``folder`` (``gped keys``).

    Bound sockets (coordinator, sampler) use the server pair; every connecting socket uses the
    client pair and pins the server's public key. ``authorized/`` holds the client public keys the
    servers accept: copy the folder to every host of the run (the secret files stay private).
    """
    import zmq.auth

    from .errors import GpedError

    path = __import__("pathlib").Path(folder)
    if any((path / name).exists() for name in KEY_FILES):
        raise GpedError(f"{path} already holds CURVE keys; refusing to overwrite them")
    (path / "authorized").mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(str(path), "server")
    zmq.auth.create_certificates(str(path), "client")
    (path / "authorized" / "client.key").write_bytes((path / "client.key").read_bytes())
    for secret in ("server.key_secret", "client.key_secret"):
        (path / secret).chmod(0o600)
    return [str(path / name) for name in KEY_FILES]


class Security:
    """CURVE for one process: servers authenticate clients against ``keys/authorized``.

    With ``keys`` None everything is plain TCP (fine on loopback; :func:`bind` refuses a
    non-loopback address unless ``allow_insecure``).
    """

    def __init__(self, ctx: zmq.Context, keys: str | None):
        self.keys = keys or None  # "" (e.g. --set coordinator.keys="") means no keys
        self.auth = None
        if self.keys is None:
            return
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        from .errors import GpedError

        folder = __import__("pathlib").Path(keys)
        missing = [name for name in KEY_FILES if not (folder / name).is_file()]
        if missing:
            raise GpedError(f"CURVE key folder {folder} lacks {', '.join(missing)}; make one with `gped keys {folder}`")
        try:
            self.server_public, self.server_secret = zmq.auth.load_certificate(str(folder / "server.key_secret"))
            self.client_public, self.client_secret = zmq.auth.load_certificate(str(folder / "client.key_secret"))
        except (OSError, ValueError) as exc:
            raise GpedError(f"cannot read CURVE keys in {folder}: {exc}") from None
        self.authorized = str(folder / "authorized")
        self.ctx = ctx

    def server(self, sock: zmq.Socket) -> None:
        if self.keys is None:
            return
        if self.auth is None:
            from zmq.auth.thread import ThreadAuthenticator

            self.auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("gped.auth"))
            self.auth.start()
            self.auth.configure_curve(domain="*", location=self.authorized)
        sock.curve_secretkey = self.server_secret
        sock.curve_publickey = self.server_public
        sock.curve_server = True

    def client(self, sock: zmq.Socket) -> None:
        if self.keys is None:
            return
        sock.curve_secretkey = self.client_secret
        sock.curve_publickey = self.client_public
        sock.curve_serverkey = self.server_public

    def close(self) -> None:
        if self.auth is not None:
            self.auth.stop()
            self.auth = None


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``port`` can be bound on ``host`` right now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port p such that p and p+1 (a run's control and sample ports) are both free on ``host``,
    taken *below* the kernel's ephemeral range: a pair from that range (what bind(0) gives) can see
    p+1 grabbed as the local end of some outgoing connection (ZeroMQ reconnects every 100 ms)
    before the sampler binds it. For tests, benchmarks and local experiments."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            low = int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()  # not seeded: concurrent sessions must not pick the same ports
    for _ in range(500):
        port = rng.randrange(max(1024, low - 12000), low - 2)
        if port_free(port, host) and port_free(port + 1, host):
            return port
    raise RuntimeError("no free port pair below the ephemeral range")
