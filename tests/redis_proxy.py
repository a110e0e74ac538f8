"""A TCP proxy in front of a real redis-server that records commands and injects faults.

Tests point Redis clients at `RedisProxy.url`; the proxy parses the client->server stream as
RESP to record each command and to cut a connection right after a chosen command reached Redis
but before its reply reaches the client. The server->client stream is forwarded untouched.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

RECV_SIZE = 256 * 1024
MAX_RECORDS = 100_000
MAX_ARGS = 8  # arguments kept per recorded command, after its name
MAX_ARG_BYTES = 200
MAX_LINE = 1 << 20  # a longer header or inline line is not RESP: stop parsing that stream
POLL = 0.05  # seconds between checks of a held pump for its connection's end


@dataclass(frozen=True)
class Command:
    """One command a client sent: its connection, upper-case name and first arguments."""

    conn: int
    name: str
    args: tuple[bytes, ...]


class _Parser:
    """An incremental RESP command parser that streams bulk bodies instead of buffering them."""

    def __init__(self) -> None:
        self._line = bytearray()  # a header or inline line split across reads
        self._pending = 0  # bulk strings still to come in the current array
        self._body_left = 0  # bytes of the current bulk string left, its CRLF included
        self._keep = 0  # bytes of the current bulk string worth keeping
        self._arg = bytearray()
        self._args: list[bytes] = []
        self._broken = False

    def feed(self, data: bytes) -> list[tuple[int, list[bytes]]]:
        """The commands that end in `data`, each with the offset just past its last byte."""
        done: list[tuple[int, list[bytes]]] = []
        if self._broken:
            return done
        try:
            self._feed(data, done)
        except ValueError:
            # Not RESP after all: keep forwarding it, stop recording it.
            self._broken = True
        return done

    def _feed(self, data: bytes, done: list[tuple[int, list[bytes]]]) -> None:
        """Consume `data`, appending every completed command to `done`."""
        pos, size = 0, len(data)
        while pos < size:
            if self._body_left:
                take = min(self._body_left, size - pos)
                want = self._keep - len(self._arg)
                if want > 0:
                    self._arg += data[pos : pos + min(take, want)]
                pos += take
                self._body_left -= take
                if not self._body_left:
                    if len(self._args) <= MAX_ARGS:
                        self._args.append(bytes(self._arg))
                    self._arg.clear()
                    self._pending -= 1
                    if not self._pending:
                        done.append((pos, self._args))
                        self._args = []
                continue
            end = data.find(b"\n", pos)
            if end < 0:
                self._line += data[pos:]
                if len(self._line) > MAX_LINE:
                    raise ValueError("line too long")
                return
            line = bytes(self._line + data[pos:end]).rstrip(b"\r")
            self._line.clear()
            pos = end + 1
            if self._pending:
                if not line.startswith(b"$"):
                    raise ValueError("bulk string expected")
                length = int(line[1:])
                if length < 0:
                    raise ValueError("null bulk string in a command")
                self._body_left = length + 2
                self._keep = min(length, MAX_ARG_BYTES) if len(self._args) <= MAX_ARGS else 0
            elif line.startswith(b"*"):
                self._pending = max(int(line[1:]), 0)
            elif line.strip():
                done.append((pos, line.split()))


class Trap:
    """A cut armed by `RedisProxy.cut_after`; `wait` tells whether it fired."""

    def __init__(self, match: Callable[[Command], bool], count: int, refuse: bool) -> None:
        self.match = match
        self.left = count
        self.refuse = refuse
        self._fired = threading.Event()

    @property
    def fired(self) -> bool:
        """Whether the trap has cut its connection."""
        return self._fired.is_set()

    def fire(self) -> None:
        """Mark the trap fired: the proxy's call, once it cut the connection."""
        self._fired.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to `timeout` seconds for the trap to fire; whether it did."""
        return self._fired.wait(timeout)


class _Conn:
    """One client connection and its own upstream connection."""

    def __init__(self, cid: int, client: socket.socket, upstream: socket.socket) -> None:
        self.id = cid
        self.client = client
        self.upstream = upstream
        self.dead = False
        # Set before the trapped command goes upstream: its reply can only arrive after that.
        self.muted = False
        self._lock = threading.Lock()
        self._users = 2  # the two pumps; the last one out closes the sockets

    def shut(self) -> None:
        """End both sides now, waking any pump blocked on them."""
        self.dead = True
        for s in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def release(self) -> None:
        """A pump is done; close the sockets once neither pump can touch them."""
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last:
            # Closing only after both pumps quit keeps a reused fd out of their reach.
            self.client.close()
            self.upstream.close()


class RedisProxy:
    """A fault-injecting TCP proxy to a redis-server on 127.0.0.1:`upstream_port`."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._lock = threading.Lock()
        self._records: deque[Command] = deque(maxlen=MAX_RECORDS)
        self._conns: dict[int, _Conn] = {}
        self._traps: list[Trap] = []
        self._threads: list[threading.Thread] = []
        self._next_id = 0
        self._refusing = False
        self._closed = False
        self._flowing = threading.Event()
        self._flowing.set()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The redis:// URL of the proxy, database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProxy:
        """Listen on a free port of 127.0.0.1 and serve clients in background threads."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, name="redis-proxy", daemon=True)
        self._acceptor.start()
        return self

    def close(self) -> None:
        """Stop listening and close every connection; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns.values())
            threads = list(self._threads)
        if self._listener is not None:
            with contextlib.suppress(OSError):
                # On Linux this wakes the blocked accept().
                self._listener.shutdown(socket.SHUT_RDWR)
        for conn in conns:
            conn.shut()
        if self._acceptor is not None:
            self._acceptor.join(10)
        if self._listener is not None:
            self._listener.close()
        for t in threads:
            t.join(10)

    def __enter__(self) -> RedisProxy:
        """Start the proxy unless started."""
        return self if self._listener is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the proxy."""
        self.close()

    @property
    def commands(self) -> list[Command]:
        """The commands recorded so far, oldest first (a copy)."""
        with self._lock:
            return list(self._records)

    def names(self) -> list[str]:
        """The names of the commands recorded so far, oldest first."""
        return [c.name for c in self.commands]

    def clear(self) -> None:
        """Forget the recorded commands."""
        with self._lock:
            self._records.clear()

    def cut_after(
        self, match: Callable[[Command], bool], count: int = 1, refuse: bool = False
    ) -> Trap:
        """Cut the connection of the `count`-th matching command once it reached Redis; with
        `refuse`, refuse every connection from that moment on (as refuse(True)), so that the
        client's own retries fail too."""
        if count < 1:
            raise ValueError("count must be at least 1")
        trap = Trap(match, count, refuse)
        with self._lock:
            self._traps.append(trap)
        return trap

    def cut_all(self) -> None:
        """Close every current connection, both sides."""
        with self._lock:
            conns = list(self._conns.values())
        for conn in conns:
            conn.shut()

    def refuse(self, on: bool) -> None:
        """While on, close new connections at once and cut the current ones."""
        with self._lock:
            self._refusing = on
        if on:
            self.cut_all()

    def hang(self, on: bool) -> None:
        """While on, hold the bytes of both directions (neither forwarded nor dropped)."""
        if on:
            self._flowing.clear()
        else:
            self._flowing.set()

    def _accept(self) -> None:
        """Accept clients until closed, each with a connection of its own to Redis."""
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refused = self._refusing or self._closed
            if refused:
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_RDWR)
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), 5.0)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for s in (client, upstream):
                # Nagle plus delayed ACKs would add tens of ms to each forwarded small write.
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._refusing or self._closed:
                    client.close()
                    upstream.close()
                    continue
                self._next_id += 1
                conn = _Conn(self._next_id, client, upstream)
                self._conns[conn.id] = conn
                self._threads = [t for t in self._threads if t.is_alive()]
                pumps = [
                    threading.Thread(target=self._pump_up, args=(conn,), daemon=True),
                    threading.Thread(target=self._pump_down, args=(conn,), daemon=True),
                ]
                self._threads += pumps
                # Started under the lock, so that close() never joins an unstarted thread.
                for t in pumps:
                    t.start()

    def _held(self, conn: _Conn) -> bool:
        """Wait while hung; whether the connection ended meanwhile."""
        while not self._flowing.wait(POLL):
            if conn.dead:
                return True
        return conn.dead

    def _pump_up(self, conn: _Conn) -> None:
        """Forward client->server, recording commands and springing traps."""
        parser = _Parser()
        try:
            while True:
                data = conn.client.recv(RECV_SIZE)
                if not data or self._held(conn):
                    return
                for end, args in parser.feed(data):
                    fired = self._record(conn, args)
                    if fired:
                        conn.muted = True
                        if any(t.refuse for t in fired):
                            with self._lock:
                                self._refusing = True
                        try:
                            conn.upstream.sendall(data[:end])
                        finally:
                            conn.shut()
                        for trap in fired:
                            trap.fire()
                        return
                conn.upstream.sendall(data)
        except OSError:
            return
        finally:
            self._end(conn)

    def _pump_down(self, conn: _Conn) -> None:
        """Forward server->client untouched, until muted by a trap."""
        try:
            while True:
                data = conn.upstream.recv(RECV_SIZE)
                if not data or self._held(conn) or conn.muted:
                    return
                conn.client.sendall(data)
        except OSError:
            return
        finally:
            self._end(conn)

    def _record(self, conn: _Conn, args: list[bytes]) -> list[Trap]:
        """Record a command; the armed traps that fire on it."""
        if not args:
            return []
        name = args[0].decode("latin-1").upper()
        cmd = Command(conn.id, name, tuple(a[:MAX_ARG_BYTES] for a in args[1 : MAX_ARGS + 1]))
        fired: list[Trap] = []
        with self._lock:
            self._records.append(cmd)
            for trap in self._traps:
                if trap.match(cmd):
                    trap.left -= 1
                    if trap.left == 0:
                        fired.append(trap)
            self._traps = [t for t in self._traps if t.left > 0]
        return fired

    def _end(self, conn: _Conn) -> None:
        """A pump of `conn` quits: end the connection and forget it."""
        conn.shut()
        with self._lock:
            self._conns.pop(conn.id, None)
        conn.release()
