"""The web page in a real headless browser (Debian's chromium driven by Playwright).

`make browser-deps` installs chromium. The screenshot is kept in artifacts/page.png; with
SGD_UPDATE_DOCS=1 the README's pictures (docs/page.png, docs/plot.png) are refreshed too.
"""

import io
import math
import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from tests.conftest import TIMEOUT, TUTORIAL, Server, wait_job

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
DOCS = ROOT / "docs"
NO_SCORE = "\u2013"  # the en dash the page shows before a score
WAIT_MS = 60_000  # for the fit and its stream, on a loaded machine


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run `make browser-deps` (Debian's chromium package)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=WAIT_MS)
        yield b
        b.close()


def text(page: Page, selector: str) -> str:
    return page.locator(selector).inner_text(timeout=TIMEOUT * 1000)


def test_fit_the_tutorial_watch_it_and_predict(browser: Browser, server: Server) -> None:
    page = browser.new_page(viewport={"width": 960, "height": 860})
    page.set_default_timeout(TIMEOUT * 1000)
    requested: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    page.goto(f"{server.url}/")
    assert page.input_value("#x") == "1, 2, 3"
    assert page.input_value("#y") == "2, 4, 6"
    # A service that has never fitted says so.
    expect(page.locator("#fit-status")).to_have_text("No fit yet.")
    expect(page.locator("#served")).to_have_text("No model is served yet: fit one.")
    expect(page.locator("#versions tbody")).to_have_text("No versions yet.")

    # Before any fit: the service's problem is shown, not a crash.
    page.click("#predict-button")
    expect(page.locator("#score-version")).not_to_have_text("")
    assert "No model has been trained yet" in text(page, "#score-version")
    assert text(page, "#score") == NO_SCORE

    # A refused fit shows the offending field.
    page.fill("#y", "2, 4")
    page.click("#fit-button")
    expect(page.locator("#fit-status")).to_contain_text("refused")
    assert "y: x has 3 values but y has 2" in text(page, "#fit-status")
    errors.clear()  # the browser logs the 503 and 422 answers above as console errors

    # The tutorial: the live chart reaches the final epoch (0-based 99), then we predict.
    page.fill("#y", "2, 4, 6")
    page.click("#fit-button")
    page.wait_for_selector('#loss-chart[data-last-epoch="99"]', timeout=WAIT_MS)
    page.wait_for_selector('#param-chart[data-last-epoch="99"]', timeout=WAIT_MS)
    page.wait_for_selector('#fit-status[data-status="succeeded"]', timeout=WAIT_MS)
    assert text(page, "#live-epoch") == "100"
    assert text(page, "#live-epochs") == "100"
    # no b: the fit had no intercept
    result = re.fullmatch(
        r"Model version 1: w = ([\d.]+), mse on the data = .*", text(page, "#result")
    )
    assert result is not None
    assert float(result[1]) == pytest.approx(2.0, abs=1e-3)
    # the fit's end refreshes what the service holds: its model is served, version 1
    expect(page.locator("#served")).to_have_attribute("data-version", "1")
    expect(page.locator('#versions tr[data-version="1"]')).to_have_attribute("data-served", "true")
    expect(page.locator("#jobs tbody tr")).to_have_attribute("data-status", "succeeded")
    page.fill("#hours", "4")
    page.click("#predict-button")
    expect(page.locator("#score")).not_to_have_text(NO_SCORE)
    score = text(page, "#score")
    assert re.fullmatch(r"[78]\.\d{0,5}", score)  # six significant digits at most
    assert float(score) == pytest.approx(8.0, abs=0.01)
    assert text(page, "#score-version") == "(model version 1)"

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page.png"), full_page=True)
    assert (ARTIFACTS / "page.png").stat().st_size > 10_000
    assert errors == []  # a CSP violation would be logged as an error
    elsewhere = [url for url in requested if not url.startswith(server.url)]
    assert elsewhere == [], "the page loads everything from the service"
    assert any("/events" in url for url in requested), "progress came from the event stream"

    if os.environ.get("SGD_UPDATE_DOCS") == "1":
        plot = page.request.get(f"{server.url}/history/plot", timeout=TIMEOUT * 1000)
        assert plot.ok
        DOCS.mkdir(exist_ok=True)
        save_small(Image.open(ARTIFACTS / "page.png"), DOCS / "page.png")
        save_small(Image.open(io.BytesIO(plot.body())), DOCS / "plot.png")
    page.close()


def save_small(image: Image.Image, path: Path) -> None:
    """A README picture: 64 colours are plenty for a page and a line plot (a third the bytes)."""
    image.convert("RGB").quantize(colors=64).save(path, optimize=True)


DOC_PAGES = [("/docs", ".swagger-ui .info .title"), ("/redoc", "h1")]


@pytest.mark.parametrize(("path", "shows"), DOC_PAGES)
def test_the_api_docs_render_without_internet(
    browser: Browser, shared_server: Server, path: str, shows: str
) -> None:
    """Every request the docs page makes goes to the service itself: no CDN (issue 15); and
    its CSP, which the browser enforces, blocks nothing the page needs."""
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT * 1000)
    elsewhere: list[str] = []
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    def local_only(route: Route) -> None:
        if route.request.url.startswith(shared_server.url):
            route.continue_()
        else:  # as on a machine without internet access
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", local_only)
    page.goto(f"{shared_server.url}{path}")
    assert "sgd-service" in text(page, shows)
    assert page.evaluate("fetch('/openapi.json').then((r) => r.status)") == 200
    assert elsewhere == []
    # ReDoc's bundle links its "powered by" logo on its CDN: the CSP blocks that, nothing else.
    blocked_logo = "Loading the image 'https://cdn.redoc.ly/redoc/logo-mini.svg' violates"
    assert [e for e in errors if not e.startswith(blocked_logo)] == []
    page.close()


# -- recovery, cancel, the token, the numbers ---------------------------------------------------

LONG_FIT = {"epochs": "1000000", "batch_size": "65536"}


def open_page(browser: Browser, srv: Server) -> Page:
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT * 1000)
    page.goto(f"{srv.url}/")
    return page


def start_long_fit(page: Page) -> None:
    for field, value in LONG_FIT.items():
        page.fill(f"#{field}", value)
    page.click("#fit-button")
    expect(page.locator("#stream-state")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
    expect(page.locator("#live-epoch")).not_to_have_text("\u2013", timeout=WAIT_MS)


def test_the_page_recovers_when_the_server_restarts_mid_fit(
    browser: Browser, make_server: Callable[..., Server]
) -> None:
    first = make_server()
    page = open_page(browser, first)
    start_long_fit(page)
    expect(page.locator("#fit-button")).to_be_disabled()
    expect(page.locator("#cancel-button")).to_be_visible()

    first.stop(signal.SIGKILL)  # the service dies mid-fit: the stream drops
    expect(page.locator("#stream-state")).to_have_attribute("data-state", "reconnecting")
    expect(page.locator("#fit-button")).to_be_enabled()  # never left disabled

    port = first.url.rsplit(":", 1)[1]
    second = make_server(SGD_PORT=port)  # back on the same port, without the job
    expect(page.locator("#stream-state")).to_have_attribute("data-state", "lost", timeout=WAIT_MS)
    assert "lost (No such job" in text(page, "#fit-status")
    expect(page.locator("#cancel-button")).to_be_hidden()

    page.fill("#epochs", "100")
    page.fill("#batch_size", "1")
    page.click("#fit-button")  # and a new fit works on the new server
    expect(page.locator("#fit-status")).to_have_attribute(
        "data-status", "succeeded", timeout=WAIT_MS
    )
    assert second.proc.poll() is None
    page.close()


def test_cancel_a_running_fit(browser: Browser, shared_server: Server) -> None:
    page = open_page(browser, shared_server)
    start_long_fit(page)
    page.click("#cancel-button")
    expect(page.locator("#fit-status")).to_have_attribute("data-status", "cancelled")
    expect(page.locator("#fit-button")).to_be_enabled()
    expect(page.locator("#cancel-button")).to_be_hidden()
    job_id = text(page, "#fit-status").split()[1].rstrip(":")
    with shared_server.client() as http:
        assert http.get(f"/jobs/{job_id}").json()["status"] == "cancelled"
    page.close()


def test_the_token_is_a_header_only(browser: Browser, make_server: Callable[..., Server]) -> None:
    srv = make_server(SGD_API_TOKEN="s3cret")
    page = open_page(browser, srv)
    sent: list[tuple[str, str | None]] = []
    page.on("request", lambda r: sent.append((r.url, r.headers.get("authorization"))))

    page.click("#fit-button")
    expect(page.locator("#fit-status")).to_contain_text("Missing or wrong bearer token")

    page.fill("#token", "s3cret")
    page.click("#fit-button")
    expect(page.locator("#fit-status")).to_have_attribute(
        "data-status", "succeeded", timeout=WAIT_MS
    )
    start_long_fit(page)
    page.click("#cancel-button")  # cancel needs the token too
    expect(page.locator("#fit-status")).to_have_attribute("data-status", "cancelled")

    posts = [auth for url, auth in sent if url.endswith(("/fit", "/cancel"))]
    assert posts == [None, "Bearer s3cret", "Bearer s3cret", "Bearer s3cret"]
    assert not any("s3cret" in url for url, _ in sent)
    assert page.context.cookies() == []
    page.reload()  # kept in the page's memory only
    assert page.input_value("#token") == ""
    page.close()


def test_numbers_keep_their_significant_digits(browser: Browser, shared_server: Server) -> None:
    """w = 0.002 is not 0.00, and b appears only when the fit learned one."""
    page = open_page(browser, shared_server)
    page.fill("#y", "0.002, 0.004, 0.006")
    page.fill("#init_w", "0.002")  # the optimum already: w stays 0.002
    page.click("#fit-button")
    expect(page.locator("#fit-status")).to_have_attribute(
        "data-status", "succeeded", timeout=WAIT_MS
    )
    result = text(page, "#result")
    assert re.fullmatch(r"Model version \d+: w = 0\.002, mse on the data = .*", result), result
    page.fill("#hours", "1")
    page.click("#predict-button")
    expect(page.locator("#score")).to_have_text("0.002")

    page.check("#fit_intercept")
    page.click("#fit-button")
    expect(page.locator("#fit-status")).to_have_attribute(
        "data-status", "succeeded", timeout=WAIT_MS
    )
    assert ", b = " in text(page, "#result")
    page.close()


# -- what the service holds, as the page opens; versions; the log scale; the fit options ---------


def api_fit(srv: Server, body: dict[str, Any], token: str | None = None) -> dict[str, Any]:
    """A fit through the API (not the page), waited for: it succeeded."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with srv.client() as http:
        job = http.post("/fit", json=body, headers=headers).json()
        ended = wait_job(http, job["id"])
    assert ended["status"] == "succeeded", ended
    return ended


def test_the_page_shows_what_the_service_holds_as_it_opens(
    browser: Browser, server: Server
) -> None:
    """A model fitted before the page opened is shown at once, with its job: never "No fit
    yet" while a model is served; the latest job's history is drawn."""
    job = api_fit(server, {**TUTORIAL, "seed": 1})
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT * 1000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{server.url}/")  # and nothing else: no click, no fill

    expect(page.locator("#served")).to_have_attribute("data-version", "1")
    assert text(page, "#served-version") == "1"
    assert float(text(page, "#served-w")) == pytest.approx(job["result"]["w"], rel=1e-5)
    assert page.get_attribute("#served-job code", "title") == job["id"]
    row = page.locator(f'#jobs tr[data-job-id="{job["id"]}"]')
    expect(row).to_have_attribute("data-status", "succeeded")
    assert "v1: w = 1.99" in row.inner_text()
    expect(page.locator("#fit-status")).to_have_text(f"Job {job['id']}: succeeded.")
    expect(page.locator("#loss-chart")).to_have_attribute("data-points", "100")
    assert text(page, "#live-epoch") == "100"
    assert text(page, "#live-w").startswith("1.99")  # w before the last update
    assert text(page, "#result").startswith("Model version 1: w = 1.99")
    assert "No fit yet" not in text(page, "body")
    assert errors == []
    page.close()


def test_serve_a_kept_version_from_the_page(browser: Browser, server: Server) -> None:
    first = api_fit(server, {**TUTORIAL, "seed": 1})  # w = 2
    second = api_fit(server, {"x": [1.0, 2.0, 3.0], "y": [3.0, 6.0, 9.0], "seed": 2})  # w = 3
    page = open_page(browser, server)
    rows = page.locator("#versions tbody tr")
    expect(rows).to_have_count(2)
    assert [r.get_attribute("data-version") for r in rows.all()] == ["2", "1"]  # newest first
    assert [r.get_attribute("data-served") for r in rows.all()] == ["true", "false"]
    v1, v2 = page.locator('#versions tr[data-version="1"]'), rows.first
    expect(v2.locator("button.serve")).to_have_count(0)  # the served one has no Serve button
    assert "served" in v2.inner_text()
    assert fmt_close(v1.locator("td").nth(1).inner_text(), first["result"]["w"])
    assert fmt_close(v2.locator("td").nth(1).inner_text(), second["result"]["w"])
    # its metrics: the mse on its data (train_mse, once versions carry the split's metrics)
    assert re.fullmatch(r"(train )?mse \S+", v1.locator(".metric").first.inner_text())

    v1.locator("button.serve").click()
    expect(v1).to_have_attribute("data-served", "true")
    expect(page.locator('#versions tr[data-version="2"]')).to_have_attribute("data-served", "false")
    expect(page.locator("#served")).to_have_attribute("data-version", "1")
    assert text(page, "#versions-status") == "Version 1 is served now."
    expect(page.locator('#versions tr[data-version="2"] button.serve')).to_be_visible()
    with server.client() as http:
        answer = http.get("/predict", params={"hours": 4}).json()
    assert answer["model_version"] == 1
    assert answer["score"] == pytest.approx(8.0, abs=0.01)
    page.click("#predict-button")
    expect(page.locator("#score-version")).to_have_text("(model version 1)")
    page.close()


def test_roll_a_canary_out_and_back_and_see_the_live_quality(
    browser: Browser, server: Server
) -> None:
    api_fit(server, {**TUTORIAL, "seed": 1})  # w = 2, served
    api_fit(server, {"x": [1.0, 2.0, 3.0], "y": [3.0, 6.0, 9.0], "seed": 2, "publish": "never"})
    with server.client() as http:  # what really happened: y = 3x
        assert http.post("/outcomes", json={"hours": [1, 2], "score": [3, 6]}).status_code == 200
    page = open_page(browser, server)
    v1, v2 = (page.locator(f'#versions tr[data-version="{v}"]') for v in (1, 2))
    expect(v1.locator(".quality")).to_contain_text("MAE 1.5")  # |3 - 2| and |6 - 4|
    expect(v1.locator(".quality")).to_contain_text("n 2")
    expect(v2.locator(".quality")).to_have_text("\N{EN DASH}")  # it was not live

    v2.locator("button.canary").click()
    expect(v2).to_have_attribute("data-canary", "true")
    expect(v2.locator(".rollout")).to_have_text("canary 10%")
    assert text(page, "#versions-status") == "Version 2 gets 10% of predictions now."
    with server.client() as http:
        assert http.get("/models").json()["canary"]["traffic"] == 10
    v2.locator("button.rollback").click()
    expect(v2).to_have_attribute("data-canary", "false")
    expect(v2.locator(".rollout")).to_have_attribute("data-state", "rolled_back")
    with server.client() as http:
        assert http.get("/models").json()["canary"] is None
    expect(page.locator("#served")).to_have_attribute("data-version", "1")
    page.close()


def fmt_close(shown: str, value: float) -> bool:
    return float(shown) == pytest.approx(value, rel=1e-5)


def test_serve_takes_the_pages_token(browser: Browser, make_server: Callable[..., Server]) -> None:
    srv = make_server(SGD_API_TOKEN="s3cret")
    for seed in (1, 2):
        api_fit(srv, {**TUTORIAL, "seed": seed}, token="s3cret")
    page = open_page(browser, srv)
    sent: list[str | None] = []
    page.on(
        "request",
        lambda r: sent.append(r.headers.get("authorization")) if r.url.endswith("/serve") else None,
    )
    serve = page.locator('#versions tr[data-version="1"] button.serve')
    serve.click()
    expect(page.locator("#versions-status")).to_contain_text(
        "Serving version 1 was refused: Missing or wrong bearer token"
    )
    expect(page.locator("#served")).to_have_attribute("data-version", "2")  # nothing changed
    page.fill("#token", "s3cret")
    serve.click()
    expect(page.locator("#served")).to_have_attribute("data-version", "1")
    assert sent == [None, "Bearer s3cret"]
    page.close()


def chart(page: Page) -> dict[str, str | None]:
    canvas = page.locator("#loss-chart")
    return {
        "scale": canvas.get_attribute("data-scale"),
        "points": canvas.get_attribute("data-points"),
        "ticks": canvas.get_attribute("data-y-ticks"),
        "pixels": canvas.evaluate("(c) => c.toDataURL()"),
        "caption": text(page, "#loss-caption"),
    }


def test_the_loss_chart_has_a_log_scale(browser: Browser, shared_server: Server) -> None:
    job = api_fit(shared_server, {**TUTORIAL, "seed": 1})  # losses from about 8 to about 1e-9
    with shared_server.client() as http:
        losses = http.get("/history", params={"job_id": job["id"]}).json()["loss"]
    low, high = min(losses), max(losses)
    assert 0 < low < 1e-6 < 1 < high
    page = open_page(browser, shared_server)
    expect(page.locator("#loss-chart")).to_have_attribute("data-points", "100")
    linear = chart(page)
    assert (linear["scale"], linear["caption"]) == ("linear", "loss per epoch")
    assert [float(t) for t in (linear["ticks"] or "").split()] == [
        pytest.approx(high, rel=1e-3),
        pytest.approx(low, rel=1e-3),
    ]

    page.check("#log-scale")
    expect(page.locator("#loss-chart")).to_have_attribute("data-scale", "log")
    log = chart(page)
    assert log["points"] == "100"  # the same points, drawn again
    assert log["caption"] == "loss per epoch (log scale)"
    assert log["pixels"] != linear["pixels"]
    ticks = [float(t) for t in (log["ticks"] or "").split()]
    assert all(math.log10(t).is_integer() for t in ticks), ticks  # decades
    assert min(ticks) <= low < 10 * min(ticks), ticks  # the axis spans the losses
    assert max(ticks) >= high, ticks

    page.uncheck("#log-scale")
    expect(page.locator("#loss-chart")).to_have_attribute("data-scale", "linear")
    assert chart(page) == linear
    page.close()


def test_a_log_chart_of_losses_that_are_zero(browser: Browser, shared_server: Server) -> None:
    """w starts at the optimum, so every loss is exactly 0: the log chart still draws them."""
    api_fit(shared_server, {**TUTORIAL, "init_w": 2.0, "seed": 1})
    page = open_page(browser, shared_server)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    expect(page.locator("#loss-chart")).to_have_attribute("data-points", "100")
    page.check("#log-scale")
    expect(page.locator("#loss-chart")).to_have_attribute("data-scale", "log")
    assert chart(page)["points"] == "100"
    assert errors == []
    page.close()


# What the page sends for the fit options below (read from the request it makes: the job the
# service answers shows the options as resolved, with its defaults filled in).
BASE_BODY = {
    "x": [1, 2, 3],
    "y": [2, 4, 6],
    "epochs": 100,
    "learning_rate": 0.01,
    "batch_size": 1,
    "fit_intercept": False,
}


def test_the_fit_options_are_sent_only_when_set(browser: Browser, server: Server) -> None:
    page = open_page(browser, server)
    expect(page.locator("#fit-status")).to_have_text("No fit yet.")
    bodies: list[Any] = []
    page.on(
        "request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/fit") else None
    )

    # Every option set: each is sent, and a warm start replaces init_w. Nothing is served yet,
    # so the service refuses to start from it, and the page says why.
    page.fill("#validation_fraction", "0.2")
    page.fill("#tol", "0.0001")
    page.fill("#n_iter_no_change", "3")
    page.select_option("#publish", "if_better")
    page.select_option("#init_from", "served")
    expect(page.locator("#init_w")).to_be_disabled()
    page.click("#fit-button")
    expect(page.locator("#fit-status")).to_contain_text(
        "The fit was refused: No model is served to start from"
    )
    assert bodies == [
        {
            **BASE_BODY,
            "validation_fraction": 0.2,
            "tol": 0.0001,
            "n_iter_no_change": 3,
            "publish": "if_better",
            "init_from": "served",
        }
    ]

    # Options that do not go together: the 422's messages are shown under the form, and the
    # fields they name are marked.
    page.fill("#validation_fraction", "")
    page.fill("#tol", "")
    page.select_option("#init_from", "")
    page.click("#fit-button")
    expect(page.locator("#fit-status")).to_contain_text("these options do not go together")
    status = text(page, "#fit-status")
    assert 'publish, validation_fraction: publish "if_better" compares validation MSEs' in status
    assert "n_iter_no_change, tol: n_iter_no_change only applies with tol" in status
    for field in ("publish", "validation_fraction", "n_iter_no_change", "tol"):
        expect(page.locator(f"#{field}")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#epochs")).not_to_have_attribute("aria-invalid", "true")
    assert bodies[-1] == {**BASE_BODY, "init_w": 1.0, "n_iter_no_change": 3, "publish": "if_better"}

    # Nothing set: none is sent, and the fit goes as it always has.
    page.fill("#n_iter_no_change", "")
    page.select_option("#publish", "")
    page.click("#fit-button")
    expect(page.locator("#fit-status")).to_have_attribute(
        "data-status", "succeeded", timeout=WAIT_MS
    )
    assert bodies[-1] == {**BASE_BODY, "init_w": 1.0}
    expect(page.locator("#tol")).not_to_have_attribute("aria-invalid", "true")

    # The kept versions are warm-start choices: a version is sent as a number.
    expect(page.locator('#init_from option[value="1"]')).to_have_count(1)
    page.select_option("#init_from", "1")
    page.select_option("#publish", "never")
    page.click("#fit-button")
    expect(page.locator("#fit-status")).to_have_attribute(
        "data-status", "succeeded", timeout=WAIT_MS
    )
    assert bodies[-1] == {**BASE_BODY, "init_from": 1, "publish": "never"}
    assert len(bodies) == 4
    expect(page.locator("#served")).to_have_attribute("data-version", "1")  # "never"
    page.close()


def test_a_fit_with_a_split_from_the_page(browser: Browser, server: Server) -> None:
    """The service takes the page's options: a split's held-out loss is drawn and its metrics
    shown; "never" keeps the version unserved; a warm start is recorded on the job."""
    api_fit(server, {**TUTORIAL, "seed": 1})  # version 1, served
    page = open_page(browser, server)
    expect(page.locator("#served")).to_have_attribute("data-version", "1")
    page.fill("#x", ", ".join(str(i) for i in range(1, 13)))
    page.fill("#y", ", ".join(str(2 * i + 0.5 * (-1) ** i) for i in range(1, 13)))
    page.fill("#seed", "2")
    page.fill("#validation_fraction", "0.25")
    page.select_option("#publish", "never")
    page.select_option("#init_from", "served")
    page.click("#fit-button")
    expect(page.locator("#fit-status")).to_have_attribute(
        "data-status", "succeeded", timeout=WAIT_MS
    )
    result = text(page, "#result")
    assert re.search(r"On the held-out rows: mse = \S+, r² = \S+\.", result), result
    assert "Kept, not served" in result
    assert page.get_attribute("#loss-chart", "data-series") == "loss,held-out loss"
    expect(page.locator('#versions tr[data-version="2"]')).to_have_attribute("data-served", "false")
    assert page.locator('#versions tr[data-version="2"] [data-metric="val_mse"]').count() == 1
    expect(page.locator("#served")).to_have_attribute("data-version", "1")  # still version 1
    job = page.locator("#jobs tbody tr").first
    expect(job).to_contain_text("held out 0.25 · publish never · from v1")
    expect(job).to_contain_text("(not served)")
    page.close()


# -- prediction intervals ------------------------------------------------------------------

# x = 1..20, y = 2x + a little noise, half the rows held out: both methods; 10 held-out rows
# bound a conformal interval up to coverage 10/11 (90% is bounded, 95% is not)
SPLIT_FIT = {
    "x": [float(i) for i in range(1, 21)],
    "y": [2 * i + 0.3 * ((i * 7) % 5 - 2) for i in range(1, 21)],
    "validation_fraction": 0.5,
    "seed": 4,
    "learning_rate": 0.001,
    "batch_size": None,
    "epochs": 300,
}


def interval_shown(page: Page) -> dict[str, str | None]:
    shown = page.locator("#interval")
    names = ("lower", "upper", "coverage", "method", "unbounded")
    return {"text": shown.inner_text(), **{n: shown.get_attribute(f"data-{n}") for n in names}}


def test_the_page_shows_a_prediction_interval(browser: Browser, server: Server) -> None:
    api_fit(server, SPLIT_FIT)  # version 1, served
    with server.client() as http:
        plain = http.get("/predict", params={"hours": 4}).json()
        conformal = http.get("/predict", params={"hours": 4, "coverage": 0.9}).json()
        gaussian = http.get(
            "/predict", params={"hours": 4, "coverage": 0.8, "method": "gaussian"}
        ).json()
    assert conformal["interval"]["method"] == "conformal"
    page = open_page(browser, server)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    queries: list[str] = []
    page.on("request", lambda r: queries.append(r.url) if "/predict" in r.url else None)
    expect(page.locator("#served")).to_have_attribute("data-version", "1")
    expect(page.locator("#method")).to_be_disabled()  # no interval asked for: no method

    # none: the score alone, as before
    page.fill("#hours", "4")
    page.click("#predict-button")
    expect(page.locator("#score")).not_to_have_text(NO_SCORE)
    assert float(text(page, "#score")) == pytest.approx(plain["score"], rel=1e-5)
    assert interval_shown(page)["text"] == ""
    assert interval_shown(page)["method"] == ""

    # 90%: the version's first method, conformal, beside the score
    page.select_option("#coverage", "0.9")
    expect(page.locator("#method")).to_be_enabled()
    page.click("#predict-button")
    expect(page.locator("#interval")).to_have_attribute("data-method", "conformal")
    shown = interval_shown(page)
    lower, upper = conformal["interval"]["lower"], conformal["interval"]["upper"]
    assert (shown["lower"], shown["upper"]) == (str(lower), str(upper))
    assert (shown["coverage"], shown["unbounded"]) == ("0.9", "false")
    match = re.fullmatch(r"90% interval: \[(\S+), (\S+)\] \(conformal\)", shown["text"] or "")
    assert match is not None, shown
    assert float(match[1]) == pytest.approx(lower, rel=1e-5)
    assert float(match[2]) == pytest.approx(upper, rel=1e-5)
    assert float(match[1]) < float(text(page, "#score")) < float(match[2])
    assert text(page, "#score-version") == "(model version 1)"

    # 95%: more than 10 held-out rows can bound
    page.select_option("#coverage", "0.95")
    page.click("#predict-button")
    expect(page.locator("#interval")).to_have_attribute("data-unbounded", "true")
    shown = interval_shown(page)
    assert (shown["lower"], shown["upper"], shown["method"]) == ("", "", "conformal")
    assert "95% interval: unbounded" in (shown["text"] or "")

    # 80%, gaussian
    page.select_option("#coverage", "0.8")
    page.select_option("#method", "gaussian")
    page.click("#predict-button")
    expect(page.locator("#interval")).to_have_attribute("data-method", "gaussian")
    shown = interval_shown(page)
    assert (shown["lower"], shown["upper"]) == (
        str(gaussian["interval"]["lower"]),
        str(gaussian["interval"]["upper"]),
    )
    assert (shown["text"] or "").startswith("80% interval: [")

    # back to none: the interval goes, and no coverage or method is sent
    page.select_option("#coverage", "")
    expect(page.locator("#method")).to_be_disabled()
    page.click("#predict-button")
    expect(page.locator("#interval")).to_have_text("")
    assert [q.split("?", 1)[1] for q in queries] == [
        "hours=4",
        "hours=4&coverage=0.9",
        "hours=4&coverage=0.95",
        "hours=4&coverage=0.8&method=gaussian",
        "hours=4",
    ]
    assert errors == []
    page.close()


def test_an_interval_the_version_lacks_shows_the_problem(browser: Browser, server: Server) -> None:
    api_fit(server, {**TUTORIAL, "seed": 1})  # no split: no conformal interval
    page = open_page(browser, server)
    expect(page.locator("#served")).to_have_attribute("data-version", "1")
    page.select_option("#coverage", "0.9")
    page.select_option("#method", "gaussian")
    page.click("#predict-button")
    expect(page.locator("#interval")).to_have_attribute("data-method", "gaussian")
    expect(page.locator("#score")).not_to_have_text(NO_SCORE)

    page.select_option("#method", "conformal")
    page.click("#predict-button")
    expect(page.locator("#score")).to_have_text(NO_SCORE)
    says = text(page, "#score-version")
    assert says.startswith("This model version has no such interval — model version 1 has no ")
    assert "validation_fraction > 0" in says
    assert "method: " in says  # the field it names
    assert interval_shown(page)["text"] == ""
    assert interval_shown(page)["method"] == ""
    page.close()
