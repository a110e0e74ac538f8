"""The web page in a real headless browser (Debian's chromium driven by Playwright).

`make browser-deps` installs chromium. The screenshot is kept in artifacts/page.png; with
SGD_UPDATE_DOCS=1 the README's pictures (docs/page.png, docs/plot.png) are refreshed too.
"""

import io
import os
import re
from collections.abc import Iterator
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
    result = re.fullmatch(r"Model version 1: w = ([\d.]+), b = 0\.00000, .*", text(page, "#result"))
    assert result is not None
    assert float(result[1]) == pytest.approx(2.0, abs=1e-3)
    page.fill("#hours", "4")
    page.click("#predict-button")
    expect(page.locator("#score")).not_to_have_text(NO_SCORE)
    assert text(page, "#score") == "8.00"
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
