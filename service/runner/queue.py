"""The queue of fits in Redis as both its sides use it: the replicas that put fits on it
(service.runner.fleet) and the training workers that take them off (service.runner.queue_worker).

The queue's actor and name (ACTOR, QUEUE) are the store's (service.state.redis), which writes a
fit's message in the transaction that creates its job.
"""

import threading
from typing import Any

from service.core.settings import Settings
from service.state.reconcile import Reconciler
from service.state.redis import RedisStore

# How long a queue worker told to stop gets to hand its running fit back and exit: Dramatiq
# waits this long for the fit's thread, and the replica that started it kills it after that.
HAND_BACK_SECONDS = 20.0


def make_broker(settings: Settings, store: RedisStore) -> Any:
    """Dramatiq's Redis broker in the store's namespace: no middleware (retries, time limits and
    cancels are the service's own, per attempt) and a heartbeat timeout of SGD_LEASE_SECONDS.
    Its redelivery of a silent worker's messages runs on every fetch, but what it delivers
    again is only ever a duplicate or a job the reconciler would queue anyway."""
    from dramatiq.brokers.redis import MAINTENANCE_SCALE, RedisBroker

    return RedisBroker(  # type: ignore[no-untyped-call]
        client=store.redis,
        namespace=store.queue_namespace,
        middleware=[],
        heartbeat_timeout=int(settings.lease_seconds * 1000),
        maintenance_chance=MAINTENANCE_SCALE,
    )


def start_reconciler(store: RedisStore, settings: Settings, stop: threading.Event) -> None:
    """Run a Reconciler on a thread of its own until stop is set: every replica and worker runs
    one, which queues a job again once its owner's beat stood still for SGD_LEASE_SECONDS."""
    reconciler = Reconciler(store, settings.job_attempts)
    threading.Thread(target=reconciler.run, args=(stop,), name="sgd-reconcile", daemon=True).start()
