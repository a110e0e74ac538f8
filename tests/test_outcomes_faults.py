"""Outcomes in Redis mode under cut connections: a batch lands once or not at all.

POST /outcomes through a replica whose connection to Redis a TCP proxy cuts right after the
1st, 2nd, ... last command of the batch's transaction (tests.redis_proxy). Whatever the cut, the
batch lands whole exactly once when the answer is 200 (redis-py sends it again after the cut,
and a batch that had landed finds its own token), and whole once or not at all when it is a
503: never twice, never in part. The canary's sums count each outcome once with it.
"""

from collections.abc import Iterator

import httpx
import pytest
import redis

from tests.conftest import TUTORIAL, Fleet, RedisServer, wait_job
from tests.redis_proxy import RedisProxy
from tests.test_redis_faults import nth_of, transaction

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def proxy(own_redis: RedisServer) -> Iterator[RedisProxy]:
    with RedisProxy(own_redis.port) as p:
        yield p


def fit(http: httpx.Client, slope: float, publish: str = "always") -> int:
    body = {**TUTORIAL, "y": [slope * x for x in TUTORIAL["x"]], "publish": publish}
    job = wait_job(http, http.post("/fit", json=body).json()["id"])
    assert job["status"] == "succeeded", job
    return int(job["result"]["model_version"])


@pytest.mark.parametrize("down", [False, True], ids=["reconnects", "stays-down"])
def test_outcomes_cut_after_each_command_land_once(
    fleet: Fleet, proxy: RedisProxy, down: bool
) -> None:
    a = fleet.replica(workers=0, SGD_REDIS_URL=proxy.url)
    b = fleet.replica(workers=1)
    direct = redis.Redis.from_url(fleet.redis.url)

    def total() -> int:
        return int(direct.get(fleet.prefix + "outcomes:total") or 0)

    def canary_n() -> int:
        return int(direct.hget(fleet.prefix + "canary:sums", "n") or 0)

    batch = {"hours": [1.0, 2.0, 3.0], "score": [3.0, 6.0, 9.0]}
    with a.client() as via_a, b.client() as via_b:
        fit(via_b, 2.0)
        v2 = fit(via_b, 3.0, publish="never")
        assert via_b.post(f"/models/{v2}/serve", json={"traffic": 10}).status_code == 200
        proxy.clear()
        assert via_a.post("/outcomes", json=batch).status_code == 200
        seq = transaction(
            proxy.commands, lambda c: c.name == "WATCH" and c.args[0].endswith(b"served")
        )
        names = [c.name for c in seq]
        assert names[-1] == "EXEC"
        assert "RPUSH" in names
        assert "HINCRBY" in names  # the canary's sums in the same transaction
        answers = []
        for k in range(len(seq)):
            before, before_n = total(), canary_n()
            trap = proxy.cut_after(nth_of(seq, k), refuse=down)
            answer = via_a.post("/outcomes", json=batch)
            assert trap.wait(5), f"the cut after {seq[k].name} did not happen"
            proxy.refuse(False)
            assert answer.status_code in ((503,) if down else (200,)), answer.text
            answers.append(answer.status_code)
            landed = total() - before
            if answer.status_code == 200:
                assert landed == 3, (k, seq[k].name, landed)
                assert answer.json()["total"] == total()
            else:
                assert landed in (0, 3), (k, seq[k].name, landed)
            assert canary_n() - before_n == landed  # the sums count what landed, once
        kept = direct.llen(fleet.prefix + "outcomes")
        assert kept == total()
        print(f"cut after each of {len(seq)} commands: answers {answers}")
    direct.close()
