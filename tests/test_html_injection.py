"""Catalog text and model answers are hostile: the eval report, the `data stats` page and the serving page
show them as text, in headless Chromium (Debian's chromium + chromedriver by path; skipped without them).

Titles, categories, the model's answer, the model's name, the currency and an uploaded file's name hold
a script tag, an attribute break-out with an onerror handler and a `javascript:` URL. No script runs (the
marker `window.__pwned` each payload would set stays unset), no element gets a handler or a
`javascript:` link, and the visible text reads exactly as written.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from browser import chromium
from productvlm.data import folder
from productvlm.serving.batching import Completion
from serve_helpers import product_jpeg, running_server

SCRIPT = "<script>window.__pwned=1</script>"
BREAKOUT = '"><img src=x onerror="window.__pwned=1">'
JS_URL = "javascript:window.__pwned=1"
PAYLOADS = [SCRIPT, BREAKOUT, JS_URL]
ANSWER = f"Product: {BREAKOUT}, Category: {SCRIPT}, Full Price: 12.5"

SAFE = """
const bad = [];
for (const el of document.querySelectorAll("*")) {
  for (const a of el.attributes) {
    const v = a.value.trim().toLowerCase();
    if (a.name.startsWith("on") || v.startsWith("javascript:")) bad.push(el.tagName + " " + a.name + "=" + a.value);
  }
}
return {pwned: window.__pwned === undefined ? null : window.__pwned, bad,
        scripts: document.querySelectorAll("script").length, text: document.body.innerText};
"""


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        yield driver


def _check(browser, scripts: int = 0) -> str:
    """The page ran no payload and has no handler or javascript: link; returns its visible text."""
    found = browser.execute_script(SAFE)
    assert found["pwned"] is None, "a payload ran"
    assert found["bad"] == []
    assert found["scripts"] == scripts  # the page's own scripts only
    return found["text"]


def hostile_rows(tmp_path: Path) -> list[dict]:
    """A catalog whose titles and categories are the payloads, each with a photo."""
    rows = []
    for i, text in enumerate(PAYLOADS * 2):
        photo = tmp_path / f"p{i}.jpg"
        Image.new("RGB", (48, 40), (30 * i, 90, 160)).save(photo)
        rows.append(
            {"image_path": str(photo), "file_name": photo.name, "product_code": i, "title": text,
             "category3_code": PAYLOADS[(i + 1) % 3], "full_price": 10.0 + i}
        )  # fmt: skip
    return rows


def test_the_report_shows_hostile_text_as_text(browser, tmp_path):
    from productvlm.evaluation import report
    from productvlm.evaluation.run import prediction_record
    from productvlm.prompting.metrics import evaluate

    rows = hostile_rows(tmp_path)
    answers = [ANSWER, f"Product: {JS_URL}, Category: {BREAKOUT}, Full Price: 9"] * 3
    metrics = {**evaluate(rows, answers, rows, ci=False), "model": SCRIPT, "split": BREAKOUT, "n": len(rows)}
    page = tmp_path / "report.html"
    page.write_text(report.render(metrics, [prediction_record(r, a) for r, a in zip(rows, answers)]))
    browser.get(page.as_uri())
    text = _check(browser)
    assert browser.title == f"productvlm evaluation: {SCRIPT}"
    assert f"model {SCRIPT} · split {BREAKOUT}" in text
    categories = [td.text for td in browser.find_elements("css selector", "#per-category td.l")]
    assert sorted(categories) == sorted(p.upper() for p in PAYLOADS)  # categories are compared upper case
    worst = browser.find_elements("css selector", "#worst tr")[1:]
    assert len(worst) == len(rows) and all(r.find_element("css selector", "img.thumb") for r in worst)
    truths = {r.find_elements("css selector", "td.l")[0].text.split("\n")[0] for r in worst}
    assert truths == set(PAYLOADS)
    raws = {r.find_element("tag name", "code").text for r in worst}
    assert raws == set(answers)


def test_the_stats_page_shows_hostile_text_as_text(browser, tmp_path):
    from productvlm.data.stats import compute_stats
    from productvlm.data.stats_page import write_html

    ds = tmp_path / "ds"
    (ds / "train" / "images").mkdir(parents=True)
    rows = []
    for row in hostile_rows(tmp_path):
        shutil.copy(row.pop("image_path"), ds / "train" / "images" / row["file_name"])
        rows.append({**row, "file_name": f"images/{row['file_name']}"})
    folder.write_splits(
        ds, {"train": rows}, {ds / folder.DATASET_JSON: json.dumps({"source": SCRIPT}).encode()}
    )
    page = write_html(compute_stats(ds), tmp_path / "stats.html")
    browser.get(page.as_uri())
    text = _check(browser)
    assert f"source: {SCRIPT};" in text
    shown = {td.text for td in browser.find_elements("css selector", "table td:first-child")}
    assert set(PAYLOADS) <= shown


@pytest.fixture
def hostile_server(tiny_model_dir, tmp_path):
    """The real app around the tiny model, named and priced with payloads, whose every answer is markup."""
    from productvlm.serving.app import ServeSettings, app_from_folder

    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "final")
    (run / "shop").mkdir()
    (run / "shop" / "dataset.json").write_text(json.dumps({"currency": SCRIPT}))
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"dir": str(run / "shop"), "num_crops": 1}}))
    app = app_from_folder(run, ServeSettings(model_name=BREAKOUT, catalog_max_tokens=4))

    def answer_with_markup(prepared, max_tokens, *args, **kwargs):
        done = asyncio.get_running_loop().create_future()
        done.set_result(Completion(ANSWER, prompt_tokens=1, completion_tokens=1, finish_reason="stop"))
        return done

    app.state.batcher.submit = answer_with_markup
    with running_server(app) as url:
        yield url


def test_the_serving_page_shows_model_output_as_text(browser, hostile_server, tmp_path):
    api = httpx.post(
        f"{hostile_server}/v1/catalog", files={"file": ("a.jpg", product_jpeg(2), "image/jpeg")}, timeout=60
    ).json()
    assert api["raw"] == ANSWER and api["title"] == BREAKOUT  # the fake answer is what the page gets
    photo = tmp_path / f"{BREAKOUT}.jpg"  # a file name is the user's text too
    photo.write_bytes(product_jpeg(2))
    browser.get(f"{hostile_server}/")
    browser.find_element("id", "file").send_keys(str(photo))
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 60).until(lambda d: d.find_element("css selector", "#results td.time").text)
    _check(browser, scripts=1)
    assert browser.find_element("id", "model-name").text == BREAKOUT
    assert browser.find_element("id", "price-head").get_attribute("textContent") == f"Price ({SCRIPT})"
    row = browser.find_element("css selector", "#results tbody tr")
    assert row.find_element("css selector", ".title").text.split("\n")[0] == api["title"]
    assert row.find_element("css selector", ".category").text == api["category"]
    assert row.find_element("tag name", "pre").get_attribute("textContent") == ANSWER
    assert row.find_element("tag name", "img").get_attribute("alt") == photo.name
    assert row.find_element("css selector", ".price").text == f"12.50 {SCRIPT}"
