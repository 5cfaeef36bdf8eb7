"""The page in headless Chromium (Debian's chromium + chromedriver by path; skipped without them): its
blocks do not overlap at desktop and phone widths, it shows the model's name and held-out metrics, sends
several photos at once and shows a table of photo + the fields the API returns (price with currency,
time taken), and with --api-key it asks for the key once (kept for the tab) and sends it."""

from __future__ import annotations

import functools
import itertools
import json
import shutil
from pathlib import Path

import httpx
import pytest
import yaml

from browser import chromium
from productvlm.serving.app import ServeSettings, app_from_folder
from serve_helpers import product_jpeg, running_server

KEY = "page-key-42"
BLOCKS = ["h1", "#intro", "#model", "#drop", "#status", "#results"]


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model in a run folder with a held-out evaluation and a dataset priced in EUR."""
    run = tmp_path_factory.mktemp("page-run")
    shutil.copytree(tiny_model_dir, run / "final")
    (run / "shop").mkdir()
    (run / "shop" / "dataset.json").write_text(json.dumps({"currency": "EUR"}))
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"dir": str(run / "shop"), "num_crops": 1}}))
    (run / "eval-test").mkdir()
    metrics = {"split": "test", "n": 36, "parse_rate": 0.9722, "category": {"accuracy": 0.8333},
               "price": {"mape": 0.0412}, "model": str(run / "final")}  # fmt: skip
    (run / "eval-test" / "metrics.json").write_text(json.dumps(metrics))
    return run


@pytest.fixture(scope="module")
def server(run_dir):
    settings = ServeSettings(model_name="shop-reader", catalog_max_tokens=12, batch_wait_ms=30)
    with running_server(app_from_folder(run_dir, settings)) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_server(run_dir):
    settings = ServeSettings(model_name="shop-reader", catalog_max_tokens=12, api_key=KEY)
    with running_server(app_from_folder(run_dir, settings)) as url:
        yield url


@pytest.fixture
def browser():
    with chromium("--lang=en-US") as driver:
        yield driver


def _photos(tmp_path: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        path = tmp_path / f"photo-{i}.jpg"
        path.write_bytes(product_jpeg(10 + i))
        paths.append(path)
    return paths


def _wait(driver, condition, seconds: float = 90):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds).until(condition)


def _rows_done(driver, n: int) -> bool:
    cells = driver.find_elements("css selector", "#results tbody td.time")
    return len(cells) == n and all(c.text.endswith(" s") for c in cells)


def _upload(driver, photos: list[Path]) -> None:
    driver.find_element("id", "file").send_keys("\n".join(str(p) for p in photos))
    _wait(driver, lambda d: _rows_done(d, len(photos)))


RECTS = """
const box = (el) => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
const blocks = {};
for (const sel of arguments[0]) blocks[sel] = box(document.querySelector(sel));
const rows = [...document.querySelectorAll("#results tbody tr")].map((tr) => ({
  img: box(tr.querySelector("img")), loaded: tr.querySelector("img").naturalWidth > 0,
  cells: [...tr.children].map(box)}));
return {blocks, rows, width: document.documentElement.clientWidth, scrollWidth: document.body.scrollWidth};
"""


def _overlap(a, b) -> bool:
    return min(a[2], b[2]) - max(a[0], b[0]) > 0.5 and min(a[3], b[3]) - max(a[1], b[1]) > 0.5


def _inside(inner, outer) -> bool:
    return all(inner[i] >= outer[i] - 0.5 for i in (0, 1)) and all(inner[i] <= outer[i] + 0.5 for i in (2, 3))


def _check_layout(found: dict) -> None:
    blocks = found["blocks"]
    for name, box in blocks.items():
        assert box[2] - box[0] > 10 and box[3] - box[1] > 10, f"{name} is not shown: {box}"
    for (a, box_a), (b, box_b) in itertools.combinations(blocks.items(), 2):
        assert not _overlap(box_a, box_b), f"{a} {box_a} overlaps {b} {box_b}"
    assert blocks["#drop"][3] - blocks["#drop"][1] >= 60  # a real target, not a line of text
    assert found["scrollWidth"] <= found["width"] + 1  # nothing pushes the page sideways
    assert blocks["#results"][2] <= found["width"]  # every column shows, none hides behind a scrollbar
    for row in found["rows"]:
        assert row["loaded"], "a photo did not render"
        assert _inside(row["img"], row["cells"][0]) and _inside(row["img"], blocks["#results"])
        for a, b in itertools.combinations(row["cells"], 2):
            assert not _overlap(a, b), f"cells {a} and {b} overlap"


@pytest.mark.parametrize("width", [1280, 420])
def test_layout_has_no_overlaps(server, browser, tmp_path, width):
    browser.set_window_size(width, 1000)
    browser.get(f"{server}/")
    _wait(browser, lambda d: d.find_element("id", "model-name").text == "shop-reader")
    _upload(browser, _photos(tmp_path, 3))
    _check_layout(browser.execute_script(RECTS, BLOCKS))
    browser.save_screenshot(str(tmp_path / f"page-{width}.png"))
    assert (tmp_path / f"page-{width}.png").stat().st_size > 10_000


def _cell(row, name: str):
    return row.find_element("css selector", "." + name)


def test_several_photos_give_a_table_of_their_entries(server, browser, tmp_path):
    photos = _photos(tmp_path, 3)
    expected = {}
    for p in photos:
        r = httpx.post(
            f"{server}/v1/catalog", files={"file": (p.name, p.read_bytes(), "image/jpeg")}, timeout=60
        )
        expected[p.name] = r.json()
    browser.get(f"{server}/")
    _wait(browser, lambda d: d.find_element("id", "model-name").text == "shop-reader")
    assert browser.find_element("id", "model-eval").text.startswith("· held-out test split, 36 photos")
    shown_metrics = [li.text for li in browser.find_elements("css selector", "#model-metrics li")]
    assert shown_metrics == ["answers parsed 97.2%", "category accuracy 83.3%", "price MAPE 4.1%"]
    assert browser.find_element("id", "price-head").get_attribute("textContent") == "Price (EUR)"

    _upload(browser, photos)
    rows = browser.find_elements("css selector", "#results tbody tr")
    assert sorted(r.find_element("tag name", "img").get_attribute("alt") for r in rows) == sorted(expected)
    for row in rows:
        want = expected[row.find_element("tag name", "img").get_attribute("alt")]
        cell = functools.partial(_cell, row)
        assert cell("title").text.split("\n")[0] == (want["title"] or "\u2014")
        assert cell("category").text == (want["category"] or "\u2014")
        raw = row.find_element("tag name", "pre").get_attribute("textContent")
        assert raw == want["raw"]
        price = cell("price").text
        if want["price"] is None:
            assert price == "\u2014"
        else:
            assert f"{want['price']:,.2f}" in price and "€" in price
        assert float(cell("time").text.removesuffix(" s")) > 0
    assert browser.find_element("id", "status").text.startswith("Done: 3 photos in ")

    fmt = "currency = arguments[0]; return formatPrice(arguments[1]);"
    assert browser.execute_script(fmt, "EUR", 1234.5) == "€1,234.50"
    assert browser.execute_script(fmt, "points", 1234.5) == "1234.50 points"
    assert browser.execute_script(fmt, None, 1234.5) == "1234.50"
    assert browser.execute_script(fmt, "EUR", None) == "\u2014"


def test_page_without_an_evaluation_says_so(tiny_model_dir, browser):
    with running_server(app_from_folder(tiny_model_dir, ServeSettings(model_name="bare"))) as url:
        browser.get(f"{url}/")
        _wait(browser, lambda d: d.find_element("id", "model-name").text == "bare")
        assert "not evaluated yet" in browser.find_element("id", "model-eval").text
        assert browser.find_elements("css selector", "#model-metrics li") == []
        assert (
            browser.find_element("id", "price-head").get_attribute("textContent")
            == "Price (currency not recorded)"
        )


def test_page_asks_for_the_key_once(keyed_server, browser, tmp_path):
    browser.get(f"{keyed_server}/")
    form = browser.find_element("id", "keyform")
    _wait(browser, lambda d: form.is_displayed())
    assert "API key" in browser.find_element("id", "status").text
    browser.find_element("id", "key").send_keys("wrong-key\n")
    _wait(browser, lambda d: "refused" in d.find_element("id", "status").text)
    assert form.is_displayed() and browser.execute_script("return sessionStorage.length") == 0

    browser.find_element("id", "key").send_keys(KEY + "\n")
    _wait(browser, lambda d: d.find_element("id", "model-name").text == "shop-reader")
    assert not form.is_displayed()
    _upload(browser, _photos(tmp_path, 1))
    assert "Error" not in browser.find_element("css selector", "#results td.title").text

    browser.refresh()  # the key is kept for the tab: not asked again
    _wait(browser, lambda d: d.find_element("id", "model-name").text == "shop-reader")
    assert not browser.find_element("id", "keyform").is_displayed()
