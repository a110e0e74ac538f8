"""The in-memory worker's history on its way to the server: the worker's sink on one end of a
pipe, the server's reading of it (JobRunner._receive's) on the other, no process between them.
What arrives must be what the fit wrote, bit for bit, through the shared file or raw."""

import mmap
import multiprocessing as mp
import os
from array import array
from typing import Any

import pytest

from service.runner import worker


def read_history(chan: worker.Channel, messages: int) -> dict[str, bytes]:
    """What the server stores of `messages` messages (a Shared, then Chunks), as it does."""
    shared: list[worker.SharedHistory] = []
    out: dict[str, bytes] = {}
    for _ in range(messages):
        msg = chan.conn.recv()
        if isinstance(msg, worker.Shared):
            shared[:] = [chan.recv_shared(msg)]
            continue
        assert isinstance(msg, worker.Chunk)
        if shared:
            cols = shared[0].take(msg.count, msg.columns)
        else:
            cols = {name: chan.recv_floats(msg.count) for name in msg.columns}
        for name, view in cols.items():
            assert view.readonly
            assert view.format == "d"
            assert len(view) == msg.count
            out[name] = out.get(name, b"") + view.tobytes()
    return out


def chunks(epochs: int, sizes: list[int], names: tuple[str, ...]) -> list[dict[str, bytes]]:
    values = {name: [i * 1.1 + n / 7 for i in range(epochs)] for n, name in enumerate(names)}
    out, at = [], 0
    for size in sizes:
        out.append({name: array("d", values[name][at : at + size]).tobytes() for name in names})
        at += size
    return out


@pytest.mark.parametrize(
    "names", [("w", "loss"), ("w", "loss", "b"), ("w", "loss", "b", "val_loss")]
)
@pytest.mark.parametrize("way", ["shared", "no memfd", "no map"])
def test_the_history_arrives_bit_for_bit(
    names: tuple[str, ...], way: str, monkeypatch: Any
) -> None:
    shared = way == "shared"
    if way == "no memfd":  # a platform without memfd_create: raw down the pipe
        monkeypatch.delattr(os, "memfd_create")
    if way == "no map":  # no room to map the file: raw down the pipe too

        def refuse(*args: Any) -> None:
            raise OSError(12, "Cannot allocate memory")

        monkeypatch.setattr(mmap, "mmap", refuse)
    ours, theirs = mp.Pipe()
    server, sent = worker.Channel(ours), worker.Channel(theirs)
    epochs, sizes = 1000, [1, 400, 599]  # the fit stopped early: fewer epochs than it had room for
    written = chunks(epochs, sizes, names)
    sink = worker._PipeSink(sent, "job", epochs + 500)
    try:
        for i, history in enumerate(written):
            assert sink.write(history, final=i == len(written) - 1)
        got = read_history(server, len(written) + shared)
    finally:
        sink.close()
        sent.close()
    # what the worker unmapped and closed stays readable through the server's map
    assert got == {name: b"".join(h[name] for h in written) for name in names}
    server.close()


def test_a_history_file_holds_no_more_epochs_than_it_has_room_for() -> None:
    ours, theirs = mp.Pipe()
    server, sent = worker.Channel(ours), worker.Channel(theirs)
    sink = worker._PipeSink(sent, "job", 10)
    try:
        sink.write(chunks(10, [10], ("w", "loss"))[0], final=False)
        msg = server.conn.recv()
        assert isinstance(msg, worker.Shared)
        history = server.recv_shared(msg)
        assert isinstance(server.conn.recv(), worker.Chunk)
        history.take(10, ("w", "loss"))
        with pytest.raises(ValueError, match="11 epochs in a history file for 10"):
            history.take(1, ("w", "loss"))
    finally:
        sink.close()
        sent.close()
        server.close()
