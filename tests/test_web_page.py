"""The web page in a real headless Chromium (Debian's `chromium`, driven by Playwright) against the real
application: upload a query, see the expected images in the grid, click a result to search again.
Screenshots are saved under test-artifacts/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from served_pool import API_KEY as KEY

from magiclens_core.search.store import ImageTable

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (`apt-get install -y chromium`)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def grid_ids(page) -> list[str]:
    return page.eval_on_selector_all("#results figure.hit", "nodes => nodes.map(n => n.dataset.id)")


def wait_for_search(page, count: int) -> None:
    page.wait_for_function(f"document.body.dataset.searches === '{count}'", timeout=TIMEOUT_MS)
    page.wait_for_function("[...document.querySelectorAll('#results figure.hit img')]"
                           ".every(img => img.complete && img.naturalWidth > 0)", timeout=TIMEOUT_MS)


def test_a_query_from_the_page_shows_the_expected_images(keyed_app, browser):
    pool, url = keyed_app
    image_id, path = list(pool.files.items())[4]
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url + "/")  # the application's page at its route prefix (/keyed/)
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.querySelectorAll('#indexed img').length === 24")

    page.set_input_files("#file", str(path))
    page.fill("#instruction", "")
    page.fill("#k", "8")
    page.click("#search")
    wait_for_search(page, 1)
    ids = grid_ids(page)
    indexed_ids = {value.decode() for value in ImageTable.open(pool.db, pool.table).ids()}
    assert len(ids) == 8 and ids[0] == image_id and set(ids) <= indexed_ids
    assert float(page.inner_text("#results figure.hit .score")) == pytest.approx(1.0, abs=1e-3)
    assert "8 results" in page.inner_text("#status")
    page.screenshot(path=str(ARTIFACTS / "web_page_search.png"), full_page=True)

    clicked = ids[3]
    page.click(f"#results figure.hit[data-id='{clicked}']")  # the result becomes the next query
    wait_for_search(page, 2)
    assert grid_ids(page)[0] == clicked
    page.screenshot(path=str(ARTIFACTS / "web_page_clicked_result.png"), full_page=True)

    indexed = page.get_attribute("#indexed img:nth-child(2)", "data-id")
    page.click("#indexed img:nth-child(2)")
    page.click("#search")
    wait_for_search(page, 3)
    assert grid_ids(page)[0] == indexed

    page.fill("#filter", "colour = 'red'")
    page.click("#search")
    page.wait_for_selector("#status.error")
    assert "unknown_filter_column" in page.inner_text("#status")
    page.close()
