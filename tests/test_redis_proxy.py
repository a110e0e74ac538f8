"""The fault-injecting Redis proxy alone, in front of the session's real redis-server."""

import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import RedisServer, wait_until
from tests.redis_proxy import Command, RedisProxy

BIG = 16 * 1024 * 1024


def connect(url: str, **kwargs: Any) -> redis.Redis:
    """A client that never retries: a fault shows as the error it raised."""
    options: dict[str, Any] = {"retry": Retry(NoBackoff(), 0), "socket_timeout": 10.0}
    return redis.Redis.from_url(url, **{**options, **kwargs})


def resp(*args: bytes) -> bytes:
    """A command as the RESP array of bulk strings that clients send."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def mine(proxy: RedisProxy) -> list[tuple[str, tuple[bytes, ...]]]:
    """The recorded commands but redis-py's handshake (HELLO, CLIENT ...) on connecting."""
    return [(c.name, c.args) for c in proxy.commands if c.name not in ("HELLO", "CLIENT")]


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[RedisProxy]:
    """A proxy to the session's redis-server."""
    with RedisProxy(redis_server.port) as p:
        yield p


@pytest.fixture
def direct(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client straight to the redis-server, to see what really reached it."""
    with connect(redis_server.url) as r:
        yield r


@pytest.mark.timeout(60)
def test_commands_pass_through_and_are_recorded(
    proxy: RedisProxy, redis_server: RedisServer
) -> None:
    key, counter, large = (redis_server.prefix() + n for n in ("k", "n", "big"))
    with connect(proxy.url) as r:
        assert r.set(key, b"v") is True
        assert r.get(key) == b"v"
        with r.pipeline(transaction=False) as pipe:
            pipe.set(counter, 1).incr(counter).get(counter)
            assert pipe.execute() == [True, 2, b"2"]
        value = os.urandom(BIG)
        assert r.set(large, value) is True
        assert r.get(large) == value
    k, n, g = key.encode(), counter.encode(), large.encode()
    assert mine(proxy) == [
        ("SET", (k, b"v")),
        ("GET", (k,)),
        ("SET", (n, b"1")),
        ("INCRBY", (n, b"1")),
        ("GET", (n,)),
        ("SET", (g, value[:200])),
        ("GET", (g,)),
    ]
    assert len({c.conn for c in proxy.commands}) == 1
    proxy.clear()
    assert proxy.names() == []


@pytest.mark.timeout(60)
def test_split_inline_and_pipelined_commands(proxy: RedisProxy, redis_server: RedisServer) -> None:
    key = redis_server.prefix().encode() + b"k"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in resp(b"SET", key, b"ab"):
            s.sendall(bytes([byte]))
            time.sleep(0.002)
        s.sendall(b"PING\r\n")
        s.sendall(resp(b"GET", key) + resp(b"del", key) + b"PING\r\n")
        expected = b"+OK\r\n+PONG\r\n$2\r\nab\r\n:1\r\n+PONG\r\n"
        got = b""
        while len(got) < len(expected):
            chunk = s.recv(4096)
            assert chunk, f"proxy closed after {got!r}"
            got += chunk
    assert got == expected
    assert proxy.commands == [
        Command(1, "SET", (key, b"ab")),
        Command(1, "PING", ()),
        Command(1, "GET", (key,)),
        Command(1, "DEL", (key,)),
        Command(1, "PING", ()),
    ]


@pytest.mark.timeout(60)
def test_cut_after_applies_the_command_but_loses_its_reply(
    proxy: RedisProxy, redis_server: RedisServer, direct: redis.Redis
) -> None:
    key = redis_server.prefix() + "n"
    direct.set(key, 5)
    with connect(proxy.url) as r:
        assert r.ping() is True
        # redis-py sends INCR as INCRBY key 1.
        trap = proxy.cut_after(lambda c: c.name == "INCRBY")
        assert not trap.fired
        with pytest.raises(redis.ConnectionError):
            r.incr(key)
        assert trap.wait(5)
        wait_until(lambda: direct.get(key) == b"6", 10.0, "the cut INCR applied")
        # The trap is spent: the client's next connection works.
        assert r.incr(key) == 7
    assert proxy.names().count("INCRBY") == 2


@pytest.mark.timeout(60)
def test_cut_after_count_fires_on_that_match_only(
    proxy: RedisProxy, redis_server: RedisServer, direct: redis.Redis
) -> None:
    key = redis_server.prefix() + "n"
    with connect(proxy.url) as r:
        trap = proxy.cut_after(lambda c: c.name == "INCRBY" and c.args[0] == key.encode(), 2)
        assert r.get(key) is None
        assert r.incr(key) == 1
        assert not trap.wait(0.2)
        with pytest.raises(redis.ConnectionError):
            r.incr(key)
        assert trap.wait(5)
        wait_until(lambda: direct.get(key) == b"2", 10.0, "the cut INCR applied")
        assert r.incr(key) == 3


@pytest.mark.timeout(60)
def test_refuse_closes_new_and_current_connections(proxy: RedisProxy) -> None:
    with connect(proxy.url) as before:
        assert before.ping() is True
        proxy.refuse(True)
        with pytest.raises(redis.ConnectionError):
            before.ping()
        with connect(proxy.url) as r, pytest.raises(redis.ConnectionError):
            r.ping()
        proxy.refuse(False)
        assert before.ping() is True
    with connect(proxy.url) as r:
        assert r.ping() is True


@pytest.mark.timeout(60)
def test_hang_holds_bytes_until_released(
    proxy: RedisProxy, redis_server: RedisServer, direct: redis.Redis
) -> None:
    key = redis_server.prefix() + "n"
    with connect(proxy.url) as held, ThreadPoolExecutor(1) as pool:
        assert held.ping() is True
        proxy.hang(True)
        with connect(proxy.url, socket_timeout=0.5) as r, pytest.raises(redis.TimeoutError):
            r.ping()
        incr = pool.submit(held.incr, key)
        time.sleep(0.3)
        assert not incr.done()
        assert direct.get(key) is None
        proxy.hang(False)
        assert incr.result(10) == 1
    with connect(proxy.url, socket_timeout=0.5) as r:
        assert r.ping() is True


@pytest.mark.timeout(60)
def test_close_cuts_connections_and_is_idempotent(redis_server: RedisServer) -> None:
    proxy = RedisProxy(redis_server.port).start()
    assert proxy.url == f"redis://127.0.0.1:{proxy.port}/0"
    with connect(proxy.url) as r:
        assert r.ping() is True
        proxy.close()
        proxy.close()
        with pytest.raises(redis.ConnectionError):
            r.ping()
