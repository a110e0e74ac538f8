"""State: the service's jobs, model versions and histories, behind the Store protocol (base).

    base          the Store and WorkerStore protocols; history pages and their thinning
    jobs          the job state machine: pure transitions both stores call, then persist
    memory        MemoryStore, in this process
    redis         RedisStore, on Redis, with redis_jobs (keys and transactions), redis_worker
                  (the worker API), reconcile (the Reconciler) and watch (the watcher thread)
    changes       which jobs changed, for the event streams

It imports service.core only (and the redis and dramatiq libraries), never runner or http.
"""
