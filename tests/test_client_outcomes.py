"""The client and the command line for outcomes, prediction ids and canary rollouts, against a
real server on each store (and what they send, read off the requests themselves)."""

import asyncio
import json
import re
from collections.abc import Iterator

import httpx
import pytest

from service.client import (
    AsyncSGDClient,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    Publish,
    SGDClient,
    UnexpectedResponse,
)
from tests.conftest import (
    STORES,
    TIMEOUT,
    TUTORIAL,
    Server,
    free_port,
    start_server,
    stop_shared,
    store_env,
)
from tests.test_cli import run

X = TUTORIAL["x"]
KEYS = [f"user-{i}" for i in range(20)]  # at 50% traffic both versions get some of these


@pytest.fixture(scope="module", params=STORES)
def live_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A server of this module's own: its tests change which version is served and run
    canaries, which no other module's predictions may meet. Each test fits its own versions."""
    log_dir = str(tmp_path_factory.mktemp("outcomes"))
    srv = start_server(log_dir, **store_env(request, request.param))
    yield srv
    stop_shared(srv)


@pytest.fixture
def sent(live_server: Server) -> Iterator[tuple[SGDClient, list[httpx.Request]]]:
    """A client of the live server, and every request it sends. A canary that a failed test
    left running is rolled back, so that it fails alone."""
    requests: list[httpx.Request] = []
    hooks = {"request": [requests.append]}
    with httpx.Client(base_url=live_server.url, timeout=TIMEOUT, event_hooks=hooks) as http:
        sgd = SGDClient(http)
        yield sgd, requests
        canary = sgd.models().canary
        if canary is not None:
            sgd.rollback(canary.version)


@pytest.fixture
def sgd(sent: tuple[SGDClient, list[httpx.Request]]) -> SGDClient:
    return sent[0]


def fit_version(sgd: SGDClient, slope: float, publish: Publish = "always") -> int:
    """A new model version of y = slope * x (served unless publish="never")."""
    job = sgd.fit(X, [slope * x for x in X], seed=1, publish=publish)
    ended = sgd.wait(job.id, timeout=60)
    assert ended.result is not None, ended
    return ended.result.model_version


def stable_and_candidate(sgd: SGDClient) -> tuple[int, int]:
    """A served version (y = 2x, 8 at 4 hours) and a kept one that is not (y = 3x, 12)."""
    return fit_version(sgd, 2.0), fit_version(sgd, 3.0, publish="never")


def is_prediction_id(text: str, version: int) -> bool:
    return re.fullmatch(rf"v{version}-[0-9a-f]{{16}}", text) is not None


# -- outcomes and prediction ids --------------------------------------------------------------


def test_a_prediction_id_names_the_version_that_answered(sgd: SGDClient) -> None:
    old, served = fit_version(sgd, 2.0), fit_version(sgd, 2.0)
    prediction, prediction_id = sgd.predict_with_id(4)
    assert prediction.model_version == served
    assert prediction.score == pytest.approx(8.0, abs=0.01)
    assert is_prediction_id(prediction_id, served), prediction_id
    kept, kept_id = sgd.predict_with_id(4, version=old)
    assert kept.model_version == old
    assert is_prediction_id(kept_id, old), kept_id
    assert len({prediction_id, kept_id, sgd.predict_with_id(4)[1]}) == 3  # one per answer


def test_record_outcomes_scores_the_served_version(sgd: SGDClient) -> None:
    version = fit_version(sgd, 2.0)  # predicts 2, 4, 6 for 1, 2, 3 hours
    _, prediction_id = sgd.predict_with_id(1)
    receipt = sgd.record_outcomes([1, 2], [2.5, 4.5], prediction_id=prediction_id)
    assert receipt.recorded == 2
    assert version in receipt.versions
    assert 2 <= receipt.kept <= receipt.total
    assert (receipt.decision, receipt.retrain_job) == (None, None)
    again = sgd.record_outcomes([3], [6.5], model_version=version)
    assert again.recorded == 1
    assert again.total == receipt.total + 1
    quality = sgd.version(version).quality
    assert quality is not None
    assert quality.outcomes == 3
    assert quality.mae == pytest.approx(0.5, abs=1e-3)
    assert quality.rmse == pytest.approx(0.5, abs=1e-3)
    listed = {v.version: v for v in sgd.models().versions}
    assert listed[version].quality == quality


def test_outcomes_the_service_refuses(sgd: SGDClient) -> None:
    version = fit_version(sgd, 2.0)
    with pytest.raises(InvalidRequestError):
        sgd.record_outcomes([1, 2], [2.0])  # one score short
    with pytest.raises(InvalidRequestError):
        sgd.record_outcomes(
            [1], [2.0], prediction_id=f"v{version}-0123456789abcdef", model_version=version
        )
    with pytest.raises(InvalidRequestError):
        sgd.record_outcomes([1], [2.0], prediction_id="not-an-id")
    with pytest.raises(NotFoundError):
        sgd.record_outcomes([1], [2.0], model_version=version + 1000)
    with pytest.raises(NotFoundError):
        sgd.record_outcomes([1], [2.0], prediction_id=f"v{version + 1000}-0123456789abcdef")


# -- canary rollouts ------------------------------------------------------------------------


def test_a_canary_gives_each_key_one_version_until_rolled_back(
    sent: tuple[SGDClient, list[httpx.Request]],
) -> None:
    sgd, requests = sent
    stable, canary = stable_and_candidate(sgd)
    started = sgd.serve(canary, traffic=50)
    assert started.rollout is not None
    assert (started.rollout.version, started.rollout.stable_version) == (canary, stable)
    assert (started.rollout.traffic, started.rollout.state) == (50, "running")
    assert json.loads(requests[-1].content) == {"traffic": 50}
    listed = sgd.models()
    assert listed.served_version == stable
    assert listed.canary is not None
    assert listed.canary.version == canary

    chosen: dict[str, int] = {}
    for key in KEYS:
        answers = [sgd.predict_with_id(4, key=key) for _ in range(3)]
        versions = {prediction.model_version for prediction, _ in answers}
        assert len(versions) == 1, (key, versions)  # the same key, the same version
        chosen[key] = versions.pop()
        assert all(is_prediction_id(i, chosen[key]) for _, i in answers), answers
    assert set(chosen.values()) == {stable, canary}
    scores = {stable: 8.0, canary: 12.0}
    for key in KEYS[:4]:  # every predict route splits the same way
        expected = scores[chosen[key]]
        assert sgd.predict(4, key=key) == pytest.approx(expected, abs=0.01)
        assert sgd.predict_many([4, 4], key=key) == pytest.approx([expected] * 2, abs=0.01)
        one = sgd.predict_interval(4, 0.9, key=key)
        assert one.model_version == chosen[key]
        many = sgd.predict_many_intervals([4], 0.9, key=key)
        assert many.model_version == chosen[key]
    assert requests[-1].headers["X-Caller-Key"] == KEYS[3]
    # ?version= bypasses the split
    assert {sgd.predict_with_id(4, key=k, version=stable)[0].model_version for k in KEYS} == {
        stable
    }

    ended = sgd.rollback(canary)
    assert ended.rollout is not None
    assert ended.rollout.state == "rolled_back"
    assert ended.rollout.ended_at is not None
    assert requests[-1].method == "DELETE"
    listed = sgd.models()
    assert (listed.served_version, listed.canary) == (stable, None)
    assert {sgd.predict_with_id(4, key=k)[0].model_version for k in KEYS} == {stable}
    with pytest.raises(ConflictError):
        sgd.rollback(canary)  # no canary now


def test_serve_sends_a_body_only_for_a_canary(
    sent: tuple[SGDClient, list[httpx.Request]],
) -> None:
    sgd, requests = sent
    stable, canary = stable_and_candidate(sgd)
    with pytest.raises(ConflictError):
        sgd.serve(stable, traffic=10)  # served already: no canary of it
    started = sgd.serve(canary, traffic=10, promote_after=200, max_worse=0.05)
    body = {"traffic": 10, "promote_after": 200, "max_worse": 0.05}
    assert json.loads(requests[-1].content) == body
    assert started.rollout is not None
    assert (started.rollout.promote_after, started.rollout.max_worse) == (200, 0.05)
    other = fit_version(sgd, 4.0, publish="never")
    with pytest.raises(ConflictError):
        sgd.serve(other, traffic=10)  # another canary runs
    with pytest.raises(ConflictError):
        sgd.serve(other)  # nor by hand while it runs

    promoted = sgd.serve(canary)  # no options: to everyone, as serve always did
    assert requests[-1].content == b""
    assert "content-type" not in requests[-1].headers
    assert promoted.served
    assert promoted.rollout is not None
    assert promoted.rollout.state == "promoted"
    listed = sgd.models()
    assert (listed.served_version, listed.canary) == (canary, None)

    sgd.serve(other, traffic=10)
    rolled_back = sgd.serve(other, traffic=0)
    assert rolled_back.rollout is not None
    assert rolled_back.rollout.state == "rolled_back"
    assert sgd.models().served_version == canary


@pytest.mark.parametrize(("truth", "state"), [(3.0, "promoted"), (2.0, "rolled_back")])
def test_outcomes_decide_a_canary(sgd: SGDClient, truth: float, state: str) -> None:
    """With promote_after, the outcomes that reach it promote the canary or roll it back."""
    stable, canary = stable_and_candidate(sgd)
    sgd.serve(canary, traffic=50, promote_after=4, max_worse=0.05)
    hours = [1.0, 2.0, 3.0, 4.0]
    receipt = sgd.record_outcomes(hours, [truth * h for h in hours])
    assert receipt.decision is not None
    assert (receipt.decision.version, receipt.decision.state) == (canary, state)
    assert receipt.decision.outcomes == 4
    assert receipt.decision.reason
    listed = sgd.models()
    assert listed.canary is None
    assert listed.served_version == (canary if state == "promoted" else stable)
    rollout = sgd.version(canary).rollout
    assert rollout is not None
    assert rollout.state == state


def test_the_async_client_does_the_same(live_server: Server, sgd: SGDClient) -> None:
    stable, canary = stable_and_candidate(sgd)

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=live_server.url, timeout=TIMEOUT) as http:
            client = AsyncSGDClient(http)
            started = await client.serve(canary, traffic=50)
            assert started.rollout is not None
            assert started.rollout.state == "running"
            key = "async-user"
            answers = [await client.predict_with_id(4, key=key) for _ in range(3)]
            versions = {prediction.model_version for prediction, _ in answers}
            assert len(versions) == 1
            (version,) = versions
            assert all(is_prediction_id(i, version) for _, i in answers)
            expected = {stable: 8.0, canary: 12.0}[version]
            assert await client.predict(4, key=key) == pytest.approx(expected, abs=0.01)
            assert await client.predict_many([4], key=key) == pytest.approx([expected], abs=0.01)
            assert (await client.predict_interval(4, 0.9, key=key)).model_version == version
            assert (await client.predict_many_intervals([4], 0.9, key=key)).model_version == version
            receipt = await client.record_outcomes([1, 2], [2.0, 4.0], prediction_id=answers[0][1])
            assert receipt.recorded == 2
            ended = await client.rollback(canary)
            assert ended.rollout is not None
            assert ended.rollout.state == "rolled_back"
            assert (await client.models()).canary is None

    asyncio.run(scenario())


# -- refused before any request ---------------------------------------------------------------


@pytest.mark.parametrize("key", ["", " user", "user ", "us\u00e9r", "a\nb"])
def test_a_key_no_header_can_carry_is_refused(key: str) -> None:
    def service(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"sent {request}")

    with httpx.Client(transport=httpx.MockTransport(service), base_url="http://sgd") as http:
        sgd = SGDClient(http)
        for ask in (
            lambda: sgd.predict(4, key=key),
            lambda: sgd.predict_with_id(4, key=key),
            lambda: sgd.predict_many([4], key=key),
            lambda: sgd.predict_interval(4, 0.9, key=key),
            lambda: sgd.predict_many_intervals([4], 0.9, key=key),
        ):
            with pytest.raises(ValueError, match="a caller key is visible ASCII"):
                ask()

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url="http://sgd") as http:
            await AsyncSGDClient(http).predict(4, key=key)

    with pytest.raises(ValueError, match="a caller key is visible ASCII"):
        asyncio.run(scenario())


def test_an_answer_without_a_prediction_id_is_unexpected() -> None:
    """A service that predates prediction ids: no id is made up."""

    def service(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"hours": 4.0, "score": 8.0, "model_version": 1})

    with (
        httpx.Client(transport=httpx.MockTransport(service), base_url="http://sgd") as http,
        pytest.raises(UnexpectedResponse),
    ):
        SGDClient(http).predict_with_id(4)


# -- the command line -------------------------------------------------------------------------


def test_the_command_line_runs_a_canary_and_records_outcomes(
    live_server: Server, sgd: SGDClient, capsys: pytest.CaptureFixture[str]
) -> None:
    url = ["--url", live_server.url]
    stable, canary = stable_and_candidate(sgd)
    args = ["--traffic", "50", "--promote-after", "200", "--max-worse", "0.05"]
    code, out, _ = run(["models", *url, "--serve", str(canary), *args], capsys)
    assert code == 0
    rollout = json.loads(out)["rollout"]
    assert (rollout["version"], rollout["stable_version"]) == (canary, stable)
    assert (rollout["traffic"], rollout["promote_after"], rollout["max_worse"]) == (50, 200, 0.05)

    for key in KEYS[:5]:
        answers = {run(["predict", *url, "4", "--key", key], capsys)[1] for _ in range(3)}
        assert len(answers) == 1, (key, answers)
        assert float(answers.pop()) in (pytest.approx(8.0, abs=0.01), pytest.approx(12.0, abs=0.01))

    code, out, _ = run(
        [
            "outcomes",
            *url,
            "--hours",
            "1",
            "2",
            "--score",
            "2",
            "4",
            "--model-version",
            str(stable),
        ],
        capsys,
    )
    assert code == 0
    receipt = json.loads(out)
    assert receipt["recorded"] == 2
    assert stable in receipt["versions"]
    _, prediction_id = sgd.predict_with_id(4)
    code, out, _ = run(
        ["outcomes", *url, "--hours", "3", "--score", "6", "--prediction-id", prediction_id],
        capsys,
    )
    assert (code, json.loads(out)["recorded"]) == (0, 1)

    code, out, _ = run(["models", *url, "--rollback", str(canary)], capsys)
    assert code == 0
    assert json.loads(out)["rollout"]["state"] == "rolled_back"
    code, out, err = run(["models", *url, "--rollback", str(canary)], capsys)
    assert (code, out) == (1, "")
    assert err.startswith("error: ")
    code, out, _ = run(["models", *url], capsys)
    assert (json.loads(out)["served_version"], json.loads(out)["canary"]) == (stable, None)


def test_outcomes_the_service_refuses_exit_1(
    live_server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    url = ["--url", live_server.url]
    code, out, err = run(["outcomes", *url, "--hours", "1", "2", "--score", "2"], capsys)
    assert (code, out) == (1, "")
    assert err.startswith("error: ")
    assert "  hours, score: " in err  # the problem's field, one line


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["models", "--traffic", "10"], "start a canary; add --serve"),
        (["models", "--max-worse", "0.1"], "start a canary; add --serve"),
        (["models", "--serve", "2", "--traffic", "101"], "a percent of predictions, 0..100"),
        (["models", "--serve", "2", "--promote-after", "0"], "a number of outcomes"),
        (["models", "--serve", "2", "--max-worse", "-1"], "a share >= 0"),
        (["models", "--serve", "2", "--rollback", "2"], "not allowed with argument --serve"),
        (["predict", "4", "--key", " user"], "argument --key: a key is visible ASCII"),
        (["predict", "4", "--key", "us\u00e9r"], "argument --key: a key is visible ASCII"),
        (
            [
                "outcomes",
                "--hours",
                "1",
                "--score",
                "2",
                "--prediction-id",
                "v1-0",
                "--model-version",
                "1",
            ],
            "not allowed with argument --prediction-id",
        ),
        (["outcomes", "--hours", "1", "--score", "nan"], "not a finite number"),
        (["outcomes", "--hours", "1"], "the following arguments are required: --score"),
    ],
)
def test_a_usage_mistake_is_one_line(
    args: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before any request (nothing listens at the URL): one line, exit status 2."""
    code, out, err = run([*args, "--url", f"http://127.0.0.1:{free_port()}"], capsys)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1, err
    assert says in err
