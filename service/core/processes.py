"""Process helpers shared by every process of the service: priority, naming, fork context."""

import contextlib
import multiprocessing as mp
import os
from collections.abc import Collection
from typing import Any


def lower_priority(nice: int, sched_idle: bool, spare: Collection[int] = ()) -> str:
    """Lower every thread of this process to niceness `nice` and, when asked and the OS has it,
    SCHED_IDLE; the policy it runs under.

    Every thread, not only the caller: on Linux both settings are per thread, and libraries
    start threads of their own before this runs (OpenBLAS's pool, loaded with torch, spins
    while it waits for work), which would keep the normal priority and compete with the API.
    Lowering one's own priority needs no privilege (not even CAP_SYS_NICE), so this works in
    a container with every capability dropped. The hello reports the policy; the server logs it.
    The threads `spare` (ids) keep their priority.
    """
    policy = "idle" if sched_idle else "other"
    for tid in _threads():
        if tid in spare:
            continue
        with contextlib.suppress(OSError):  # a thread may end meanwhile
            if nice:
                os.setpriority(
                    os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid))
                )
        if sched_idle:
            try:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            except ProcessLookupError:
                pass
            except (AttributeError, OSError):  # not Linux, or refused by a sandbox: niceness only
                policy = "other"
    return policy


def fork_context() -> Any:
    """Where training workers come from, in both runners: multiprocessing's fork server, which
    has imported torch and the engine and nothing else, and runs no thread
    (service.runner.forkserver). A worker is a fork of it, ready in about 0.06 s; never a fork
    of the server, which has threads.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["service.runner.forkserver"])
    return ctx


def name_process(name: str) -> None:
    """The name ps and top show for this process (Linux; elsewhere nothing happens)."""
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write(name)


def _threads() -> list[int]:
    """The ids of this process's threads (Linux), or just its own id elsewhere."""
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return [0]
