"""The in-memory runner's training worker: a long-lived process that imports torch once and runs
fits one at a time (service.runner.session), and the messages between it and the runner.

It shares nothing with the server but a pipe. The server may lose it at any moment (the OOM
killer, kill -9) and must never be left waiting on something it held, so there is no lock,
semaphore or event between them: every request and answer is a message, and the worker checks
for a cancel between blocks of epochs by polling the pipe, which a dead peer cannot block.
"""

import os
import signal
import socket
import time
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
    """The next `count` epochs follow as raw float64 columns, these in this order: w, loss,
    then b (with an intercept) and val_loss (with a validation split)."""

    job_id: str
    count: int
    columns: tuple[str, ...]


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
    outcome = run_session(
        samples, msg.params, _PipeSink(chan, msg.job_id), lambda: _interrupted(conn, msg.job_id)
    )
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
    """A fit's history down the pipe, as the server stores it (a session.Sink)."""

    def __init__(self, chan: Channel, job_id: str) -> None:
        self._chan = chan
        self._job_id = job_id

    def write(self, history: dict[str, bytes], final: bool) -> bool:
        try:
            self._chan.send_floats(self._job_id, history)
        except (BrokenPipeError, ConnectionResetError):
            # The server closed the pipe: it is gone, or it gave this worker up (its fork server
            # died, which the server sees as the worker's death). Nothing is left to report to.
            _exit()
        return True


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
