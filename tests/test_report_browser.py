"""The eval report renders in headless Chromium: main elements present, every image decoded, no console error.

Uses Debian's chromium and chromedriver by path (selenium-manager never downloads anything); skipped
with the reason when they are not installed.
"""

from pathlib import Path

import pytest
from PIL import Image

from productvlm.evaluation.run import run_eval

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian packages chromium, chromium-driver)",
)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,2400",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def test_report_renders_in_chromium(browser, eval_run, eval_catalog, tmp_path):
    result = run_eval(
        eval_run,
        eval_catalog,
        "validation",
        tmp_path / "eval",
        batch_size=8,
        constrained=True,
        progress=False,
    )
    page = result.out_dir / "report.html"
    browser.get(page.resolve().as_uri())
    find = browser.find_elements

    assert "productvlm evaluation" in browser.title
    metric_rows = find("css selector", "#metrics tr")
    assert len(metric_rows) == 12  # header + 11 figures
    assert "majority category" in metric_rows[0].text
    for fig in ("price-scatter", "error-hist", "confusion", "curves"):
        assert find("css selector", f"#{fig} img"), f"missing figure {fig}"
    assert len(find("css selector", "#per-category tr")) == 1 + len(
        {r["truth"]["category"] for r in result.predictions}
    )
    assert len(find("css selector", "#worst img.thumb")) == min(12, result.metrics["n"])

    broken = browser.execute_script(
        "return Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt)"
    )
    assert broken == []
    external = browser.execute_script(
        "return Array.from(document.querySelectorAll('[src],[href]'))"
        ".map(e => e.getAttribute('src') || e.getAttribute('href')).filter(u => !u.startsWith('data:'))"
    )
    assert external == []
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert errors == []

    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    with Image.open(shot) as im:
        assert im.width >= 1000
        assert len(im.convert("RGB").getcolors(1 << 20) or []) > 50  # plots drawn, not a blank page


def test_price_plot_says_so_when_no_answer_has_a_price():
    """An untrained model answers "Full Price: 0": the report still has the figure, saying why it is empty."""
    import base64
    import io

    from productvlm.evaluation.report import error_histogram, price_scatter
    from productvlm.pages import data_uri

    def png(fig) -> bytes:
        return base64.b64decode(data_uri(fig).split(",", 1)[1])

    zero = [
        {"truth": {"price": 390.0}, "pred": {"price": 0.0}},
        {"truth": {"price": 50.0}, "pred": {"price": None}},
    ]
    real_answer = {"truth": {"price": 390.0}, "pred": {"price": 350.0}}
    empty = Image.open(io.BytesIO(png(price_scatter(zero))))
    real = Image.open(io.BytesIO(png(price_scatter([real_answer]))))
    assert empty.size[0] > 100 and empty.size != real.size  # a picture, not the plot's axes
    assert png(error_histogram(zero)) != png(error_histogram([real_answer]))
