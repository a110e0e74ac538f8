"""Imported once, by the training workers' fork server only: torch, the engine and the fit loop.

The server never imports torch. Its training workers (the in-memory runner's, and a Redis-mode
replica's embedded ones) are forked from a small process of its own (multiprocessing's fork
server) that has imported them, so a new worker, at start-up and after every crash, is a fork
ready in about 0.06 s, not an interpreter importing torch for 0.9 s or more.
The fork server forks nothing else and runs no thread: OpenBLAS (loaded with numpy by torch)
would start a thread pool here, so it is asked for one thread before anything loads it.
"""

import os
import signal

from service.core.processes import name_process

name_process("sgd-forkserver")
# The server decides when its processes stop, as for the worker: a SIGTERM sent to the whole
# process group must not take the fork server away from a fit the server is cancelling. It
# exits when the server does (multiprocessing closes its pipe), even after a kill -9.
signal.signal(signal.SIGTERM, signal.SIG_IGN)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

try:
    import torch  # noqa: F401

    from service.runner import session  # noqa: F401  (and the engine it runs)
except Exception:  # noqa: S110
    # A broken install: each worker imports torch again, fails and says why, and the runner
    # counts the failed start as it would any other.
    pass
