"""The web page in a real headless browser (Debian's chromium driven by Playwright).

`make browser-deps` installs chromium. The screenshot is kept in artifacts/page.png; with
SGD_UPDATE_DOCS=1 the README's pictures (docs/page.png, docs/plot.png) are refreshed too.
"""

import io
import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from tests.conftest import TIMEOUT, Server

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
    browser: Browser, server: Server, path: str, shows: str
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
        if route.request.url.startswith(server.url):
            route.continue_()
        else:  # as on a machine without internet access
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", local_only)
    page.goto(f"{server.url}{path}")
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


def test_cancel_a_running_fit(browser: Browser, server: Server) -> None:
    page = open_page(browser, server)
    start_long_fit(page)
    page.click("#cancel-button")
    expect(page.locator("#fit-status")).to_have_attribute("data-status", "cancelled")
    expect(page.locator("#fit-button")).to_be_enabled()
    expect(page.locator("#cancel-button")).to_be_hidden()
    job_id = text(page, "#fit-status").split()[1].rstrip(":")
    with server.client() as http:
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


def test_numbers_keep_their_significant_digits(browser: Browser, server: Server) -> None:
    """w = 0.002 is not 0.00, and b appears only when the fit learned one."""
    page = open_page(browser, server)
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
