"""The in-memory runner's training worker: a long-lived process that imports torch once and runs
fits one at a time (service.runner.session), and the messages between it and the runner.

It shares nothing with the server but a pipe. The server may lose it at any moment (the OOM
killer, kill -9) and must never be left waiting on something it held, so there is no lock,
semaphore or event between them: every request and answer is a message, and the worker checks
for a cancel between blocks of epochs by polling the pipe, which a dead peer cannot block.
"""

import ctypes
import mmap
import os
import signal
import socket
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, NoReturn

from service.core.processes import lower_priority, name_process

# -- messages: server to worker --------------------------------------------------------------


# A fit's x or y as float64 bytes (native order), in one piece or several, sent as they are.
Samples = tuple[bytes | bytearray, ...]


@dataclass(frozen=True)
class Fit:
    """Run this fit on n samples: x's and y's float64 bytes (native order) follow it raw."""

    job_id: str
    params: dict[str, Any]
    n: int


@dataclass(frozen=True)
class Cancel:
    """Stop this job's fit after its current block (ignored once that fit has ended)."""

    job_id: str


@dataclass(frozen=True)
class Stop:
    """Exit now."""


# -- messages: worker to server --------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """Torch is imported and the engine prepared: the worker can take fits."""

    info: dict[str, Any]


@dataclass(frozen=True)
class Chunk:
    """The next `count` epochs of these columns: w, loss, then b (with an intercept) and
    val_loss (with a validation split). After a Shared, they are in its file; before, they
    follow as raw float64 columns, in this order."""

    job_id: str
    count: int
    columns: tuple[str, ...]


# The columns of a shared history file, in this order, each `epochs` float64 values long.
SHARED_COLUMNS = ("w", "loss", "b", "val_loss")


@dataclass(frozen=True)
class Shared:
    """This fit's history is written into a shared file, whose descriptor follows (SCM_RIGHTS):
    SHARED_COLUMNS one after the other, each room for `epochs` values; every Chunk after this
    says how many more epochs it holds."""

    job_id: str
    epochs: int


@dataclass(frozen=True)
class Done:
    job_id: str
    report: dict[str, Any]  # a schemas.FitReport's fields: plain types, no import of its own


@dataclass(frozen=True)
class Cancelled:
    job_id: str


@dataclass(frozen=True)
class Failed:
    job_id: str
    problem: dict[str, Any]


class Channel:
    """The pipe to or from the worker: pickled messages, and float64 columns sent raw.

    A history chunk is a small pickled header, then each column's bytes, which the server reads
    straight into one immutable bytes object per column (the kernel copies them while the GIL is
    free) and stores as is. Through pickle it took four copies with the GIL held, and /predict,
    waiting for the GIL, paid for them in its p99.

    The pipe is multiprocessing's duplex Pipe, a Unix socket pair; the raw reads and writes go
    through a socket on the same descriptor, which works because a Connection never reads ahead.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._sock = socket.socket(fileno=os.dup(conn.fileno()))

    def send_floats(self, job_id: str, columns: dict[str, bytes]) -> None:
        first = next(iter(columns.values()))
        self.conn.send(Chunk(job_id, len(first) // 8, tuple(columns)))
        for column in columns.values():
            self._sock.sendall(column)

    def send_raw(self, *buffers: bytes | bytearray) -> None:
        """Bytes after a message, as they are: no pickle, no copy with the GIL held."""
        for buffer in buffers:
            self._sock.sendall(buffer)

    def recv_floats(self, count: int) -> "memoryview[float]":
        return memoryview(self.recv_raw(8 * count)).cast("d")

    def send_shared(self, job_id: str, epochs: int, fd: int) -> None:
        self.conn.send(Shared(job_id, epochs))
        socket.send_fds(self._sock, [b"F"], [fd])

    def recv_shared(self, msg: Shared) -> "SharedHistory":
        _, fds, _, _ = socket.recv_fds(self._sock, 1, 1)
        if not fds:
            raise EOFError("the pipe closed before the history file")
        try:
            return SharedHistory(fds[0], msg.epochs)
        finally:
            for fd in fds:
                os.close(fd)

    def recv_raw(self, size: int) -> bytes:
        data = self._sock.recv(size, socket.MSG_WAITALL)
        while len(data) < size:  # a signal can cut MSG_WAITALL short; EOF means the worker died
            more = self._sock.recv(size - len(data), socket.MSG_WAITALL)
            if not more:
                raise EOFError("the pipe closed in the middle of raw bytes")
            data += more
        return data

    def close(self) -> None:
        self._sock.close()
        self.conn.close()


class SharedHistory:
    """The server's read-only map of a fit's shared history file (see Shared).

    The worker writes the history into the file, at its own priority; the server maps it and
    stores views of it, so a chunk costs the server a header and no copy. Read from the pipe,
    each epoch's 16-24 bytes were copied into freshly faulted pages by the dispatcher thread,
    at the server's priority (24 ms of CPU, 174 wake-ups, a 2,000,000-epoch fit), and freeing
    an evicted history held the GIL (2.6 ms for 32 MB). The map is made with libc's mmap,
    which keeps no descriptor (Python's mmap keeps one open per map: one per kept history),
    and unmapped, the GIL released, once no view of it is left.
    """

    def __init__(self, fd: int, epochs: int) -> None:
        size = 8 * epochs * len(SHARED_COLUMNS)
        address = _libc().mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address is None or address == _MAP_FAILED:
            raise OSError(
                ctypes.get_errno(),
                f"could not map a history file: {os.strerror(ctypes.get_errno())}",
            )
        mapped = (ctypes.c_ubyte * size).from_address(address)
        weakref.finalize(mapped, _libc().munmap, address, size).atexit = False
        self._values = memoryview(mapped).cast("B").cast("d").toreadonly()
        self._epochs = epochs
        self._done = 0

    def take(self, count: int, columns: tuple[str, ...]) -> dict[str, "memoryview[float]"]:
        """Read-only views of the next `count` epochs of these columns."""
        if self._done + count > self._epochs:
            raise ValueError(f"{self._done + count} epochs in a history file for {self._epochs}")
        out = {}
        for name in columns:
            start = SHARED_COLUMNS.index(name) * self._epochs + self._done
            out[name] = self._values[start : start + count]
        self._done += count
        return out


_MAP_FAILED = ctypes.c_void_p(-1).value


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        libc.munmap.restype = ctypes.c_int
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _LIBC = libc
    return _LIBC


_LIBC: ctypes.CDLL | None = None


def main(conn: Connection, threads: int, nice: int, sched_idle: bool) -> None:
    """Entry point of the worker process: run fits one at a time until told to stop."""
    # The server decides when the worker stops: a Ctrl-C or a SIGTERM sent to the whole process
    # group (a terminal, systemd's KillMode=control-group) must not kill a fit it will cancel.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    name_process("sgd-worker")
    started = time.perf_counter()
    import torch

    torch.set_num_threads(threads)
    # Plain types only: unpickling a TorchVersion made the server import torch.
    info = {"pid": os.getpid(), "torch": str(torch.__version__), "threads": threads, "nice": nice}
    info["startup_seconds"] = round(time.perf_counter() - started, 3)
    # Fits are background work and run at the lower priority; the start-up before them does
    # not. It is a one-off while the replica is not ready (no balancer sends it traffic), and
    # under SCHED_IDLE on a busy machine it would take minutes: that long without training.
    info["policy"] = lower_priority(nice, sched_idle)
    conn.send(Hello(info))
    chan = Channel(conn)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the server is gone
            _exit()
        if isinstance(msg, Fit):
            _run(chan, msg)
        elif isinstance(msg, Stop):
            _exit()
        # else a Cancel for a fit that has already ended: nothing to do


def _exit() -> NoReturn:
    # Skip interpreter teardown (torch's costs seconds): nothing is left to flush.
    os._exit(0)


def _run(chan: Channel, msg: Fit) -> None:
    """One fit: stream its history, then exactly one of Done, Cancelled or Failed."""
    from service.runner.session import run_session

    samples = (chan.recv_raw(8 * msg.n), chan.recv_raw(8 * msg.n))
    conn = chan.conn
    sink = _PipeSink(chan, msg.job_id, int(msg.params["epochs"]))
    try:
        outcome = run_session(samples, msg.params, sink, lambda: _interrupted(conn, msg.job_id))
    finally:
        sink.close()
    if outcome.report is not None:
        reply: Done | Cancelled | Failed = Done(msg.job_id, outcome.report.model_dump())
    elif outcome.problem is not None:
        reply = Failed(msg.job_id, outcome.problem)
    else:
        reply = Cancelled(msg.job_id)
    try:
        conn.send(reply)
    except (BrokenPipeError, ConnectionResetError):
        _exit()  # the server is gone: see _PipeSink


class _PipeSink:
    """A fit's history for the server (a session.Sink): written into a shared file (see Shared)
    and announced down the pipe a chunk at a time; where no shared file can be made, sent down
    the pipe raw."""

    def __init__(self, chan: Channel, job_id: str, epochs: int) -> None:
        self._chan = chan
        self._job_id = job_id
        self._epochs = epochs
        self._file: mmap.mmap | None = None
        self._done = 0
        self._raw = False

    def write(self, history: dict[str, bytes], final: bool) -> bool:
        try:
            if self._file is None and not self._raw:
                self._share()
            if self._file is None:
                self._chan.send_floats(self._job_id, history)
                return True
            count = len(next(iter(history.values()))) // 8
            for name, column in history.items():
                at = 8 * (SHARED_COLUMNS.index(name) * self._epochs + self._done)
                self._file[at : at + len(column)] = column
            self._done += count
            self._chan.conn.send(Chunk(self._job_id, count, tuple(history)))
        except (BrokenPipeError, ConnectionResetError):
            # The server closed the pipe: it is gone, or it gave this worker up (its fork server
            # died, which the server sees as the worker's death). Nothing is left to report to.
            _exit()
        return True

    def _share(self) -> None:
        size = 8 * self._epochs * len(SHARED_COLUMNS)
        try:
            fd = os.memfd_create("sgd-history", os.MFD_CLOEXEC)
        except (AttributeError, OSError):  # not Linux: raw down the pipe
            self._raw = True
            return
        try:
            try:
                os.ftruncate(fd, size)  # sparse: only the pages written take memory
                self._file = mmap.mmap(fd, size)
            except OSError:  # no room to map it: raw down the pipe
                self._raw = True
                return
            self._chan.send_shared(self._job_id, self._epochs, fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Unmap the worker's side; the server's map keeps the history."""
        if self._file is not None:
            self._file.close()
            self._file = None


def _interrupted(conn: Connection, job_id: str) -> bool:
    """Whether the server asked to stop this fit; exits if it asked the worker to stop."""
    while conn.poll():
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            _exit()
        if isinstance(msg, Stop):
            _exit()
        if isinstance(msg, Cancel) and msg.job_id == job_id:
            return True
    return False
