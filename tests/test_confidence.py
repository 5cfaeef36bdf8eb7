"""Per-field confidence: the math (calibration, ECE, risk-coverage), the token log-probabilities of the one
generate call, eval's calibration file, and the API (`/v1/catalog`, OpenAI `logprobs` / `top_logprobs`)."""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest
import torch

from productvlm.errors import UserError
from productvlm.prompting.confidence import (
    Calibration,
    Calibrator,
    accuracy_at_coverage,
    expected_calibration_error,
    field_correct,
    field_scores,
    load_calibration,
    names_category,
    needs_review,
    review_thresholds,
    risk_coverage,
    threshold_for_accuracy,
)


def overconfident(n: int = 4000, seed: int = 0):
    """Scores whose true chance of being right is score**3: confident-looking, right less often."""
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0.3, 1.0, n)
    correct = rng.uniform(size=n) < scores**3
    return scores, correct


def test_ece_of_perfect_and_of_constant_confidence():
    assert expected_calibration_error([1.0, 1.0, 0.0, 0.0], [True, True, False, False]) == 0.0
    assert expected_calibration_error([0.9] * 10, [True] * 5 + [False] * 5) == pytest.approx(0.4)


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_calibration_fixes_overconfident_scores(method):
    scores, correct = overconfident(seed=0)
    calibrator = Calibrator.fit(scores, correct, method)
    test_scores, test_correct = overconfident(seed=1)
    before = expected_calibration_error(test_scores, test_correct)
    after = expected_calibration_error(calibrator(test_scores), test_correct)
    assert before > 0.15 and after < 0.03
    ranked = np.argsort(test_scores)
    assert np.all(np.diff(calibrator(test_scores)[ranked]) >= -1e-12)  # monotone: the ranking is kept


def test_one_class_calibrates_to_the_base_rate():
    assert Calibrator.fit([0.2, 0.9, 0.5], [True] * 3)([0.1, 0.99]) == pytest.approx([1.0, 1.0], abs=1e-5)


def test_accuracy_at_coverage_and_the_curve():
    conf = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]
    correct = [True, True, True, True, False, True, False, False, False, False]
    assert accuracy_at_coverage(conf, correct, 0.4) == 1.0
    assert accuracy_at_coverage(conf, correct, 0.6) == pytest.approx(5 / 6)
    assert accuracy_at_coverage(conf, correct, 1.0) == 0.5
    curve = risk_coverage(conf, correct)
    assert curve[0] == [0.9, 1.0, 0.1] and curve[-1] == [0.05, 0.5, 1.0]
    assert threshold_for_accuracy(curve, 0.8) == 0.4  # 5 of the 6 rows at >= 0.4 are right
    assert threshold_for_accuracy(curve, 1.01) > 1.0


def test_field_scores_follow_the_tokens_of_each_field():
    text = "Product: Red Bag, Category: TOTE, Full Price: 590.0"
    pieces = ["Product:", " Red", " Bag", ",", " Category:", " TO", "TE", ",", " Full Price:", " 590", ".0"]
    ends = list(np.cumsum([len(p) for p in pieces]))
    assert "".join(pieces) == text
    logprobs = [-0.1, math.log(0.5), math.log(0.8), -0.2, -0.1, math.log(0.6), math.log(0.5), 0, 0, -1.0, 0.0]
    scores = field_scores(text, logprobs, ends)
    assert scores["title"] == pytest.approx(math.sqrt(0.5 * 0.8))  # geometric mean of " Red", " Bag"
    # the probability of the answer up to the category's end: the title before it names the product
    assert scores["category"] == pytest.approx(math.exp(-0.1 - 0.2 - 0.1) * 0.5 * 0.8 * 0.6 * 0.5)
    assert scores["price"] == pytest.approx(math.exp(-0.5))
    assert field_scores("Product: Red Bag", [-0.1, -0.1, -0.1], [8, 12, 16])["price"] == 0.0  # missing


def test_category_scores_the_title_words_that_name_it():
    text = "Product: Red Tote Bag, Category: TOTE, Full Price: 590.0"
    pieces = [
        "Product:",
        " Red",
        " To",
        "te",
        " Bag",
        ",",
        " Category:",
        " TOTE",
        ",",
        " Full Price:",
        " 590",
        ".0",
    ]
    ends = list(np.cumsum([len(p) for p in pieces]))
    assert "".join(pieces) == text
    p = [1.0, 0.5, 0.7, 0.9, 0.95, 1.0, 1.0, 0.99, 1.0, 1.0, 0.8, 1.0]
    # "Tote" decides the category; "Red" (0.5) is a doubt about the title's colour, not the category
    assert field_scores(text, np.log(p), ends)["category"] == pytest.approx(0.7 * 0.9 * 0.99)


@pytest.mark.parametrize(
    "word, category, names",
    [("Cap", "CAPS", True), ("Scarf", "SCARVES", True), ("Trench", "TRENCH COATS", True),
     ("shoulder", "SHOULDER", True), ("Bag", "TOTE", False), ("To", "TOTE", False), ("Red", "RED-WINE", True),
     ("Tee", "T-SHIRTS", False)],
)  # fmt: skip
def test_which_title_words_name_the_category(word, category, names):
    assert names_category(word, category) is names


def test_auto_calibration_picks_the_shape_that_fits():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.5, 1.0, 600)
    level = rng.uniform(size=600) < np.where(scores > 0.9, 0.97, 0.4)  # accuracy levels off: a step
    assert Calibrator.fit(scores, level).method == "isotonic"
    smooth = rng.uniform(size=600) < scores**3  # a smooth function of the log-odds
    assert Calibrator.fit(scores, smooth).method == "platt"


def test_field_correct_and_review():
    row = {"title": "Red Leather Tote Bag", "category3_code": "TOTE", "full_price": 1000}
    ok = field_correct("Product: Red Leather Tote Bag, Category: TOTE, Full Price: 1090", row)
    assert ok == {"title": True, "category": True, "price": True}
    bad = field_correct("Product: Blue Scarf, Category: SCARF, Full Price: 1200", row)
    assert bad == {"title": False, "category": False, "price": False}
    thresholds = review_thresholds(None, 0.7, None)
    assert needs_review({"title": 0.9, "category": 0.69, "price": 0.9}, thresholds)
    assert not needs_review({"title": 0.9, "category": 0.7, "price": 0.9}, thresholds)
    with pytest.raises(UserError, match="needs a calibrated model"):
        review_thresholds(None, None, 0.9)


def test_calibration_file_round_trip_and_target_accuracy(tmp_path):
    scores, correct = overconfident()
    rows = [{"title": s, "category": s, "price": s} for s in scores]
    right = [{"title": c, "category": c, "price": c} for c in correct]
    calibration = Calibration.fit(rows, right, split="validation", data="d")
    calibration.save(tmp_path)
    loaded = load_calibration(tmp_path)
    assert loaded.calibrators == calibration.calibrators and loaded.curves == calibration.curves
    assert loaded({"category": 0.9})["category"] == pytest.approx(0.9**3, abs=0.05)
    thresholds = review_thresholds(loaded, None, 0.8)
    accepted = calibration.calibrators["category"](scores) >= thresholds["category"]
    assert correct[accepted].mean() >= 0.8 > correct.mean()
    (tmp_path / "calibration.json").write_text("{")
    with pytest.raises(UserError, match="not a calibration file"):
        load_calibration(tmp_path)


# ---- the model side ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def predictor(tiny_model_dir):
    from productvlm.inference.predictor import Predictor

    return Predictor(tiny_model_dir, num_crops=1, device="cpu", dtype="float32", max_new_tokens=6)


def photos(n: int):
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def test_token_logprobs_equal_transition_scores_and_leave_tokens_alone(predictor):
    """The log-probabilities RowStops records are transformers' own `compute_transition_scores` of the
    same greedy generate call, row by row in a padded batch; asking for them changes no token."""
    from productvlm.inference.generate import generate, stop_ids
    from productvlm.inference.inputs import batch, prepare

    prompt = predictor.settings.photo_prompt()
    prepared = [prepare(predictor.processor, prompt, [p], 1) for p in photos(3)]
    inputs = batch(predictor.processor, prepared)
    stops = stop_ids(predictor.model, predictor.processor)
    plain = generate(predictor.model, inputs, [6] * 3, stops)
    scored = generate(predictor.model, inputs, [6] * 3, stops, logprobs=3)
    assert scored.tokens == plain.tokens and scored.logprobs != [[]] * 3
    with torch.no_grad():
        out = predictor.model.generate(
            **inputs, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    reference = predictor.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    for i in range(3):
        n = len(scored.logprobs[i])
        assert np.allclose(scored.logprobs[i], reference[i, :n].numpy(), atol=1e-5)
        assert [t[0][1] for t in scored.top[i]] == pytest.approx(
            scored.logprobs[i], abs=1e-6
        )  # greedy: top 1


def test_eval_writes_the_calibration_and_predict_uses_it(eval_run, eval_catalog, tmp_path):
    import shutil

    from productvlm.evaluation.run import run_eval
    from productvlm.inference.predictor import Predictor

    model = tmp_path / "model"
    shutil.copytree(eval_run / "final", model)
    result = run_eval(
        model,
        eval_catalog,
        "test",
        tmp_path / "eval",
        batch_size=8,
        constrained=True,
        max_new_tokens=40,
        device="cpu",
        progress=False,
    )
    block = result.metrics["confidence"]
    assert block["calibrated_on"]["split"] == "validation" and block["calibrated_on"]["rows"] > 0
    for field in ("title", "category", "price"):
        assert 0 <= block[field]["ece"] <= 1 and 0 <= block[field]["accuracy_at_80"] <= 1
    assert load_calibration(model).constrained is True
    record = result.predictions[0]
    assert record["confidence"] == load_calibration(model)(record["confidence_raw"])
    assert 'id="risk-coverage"' in (tmp_path / "eval" / "report.html").read_text()
    assert Predictor(model, device="cpu").calibration.calibrators == load_calibration(model).calibrators


# ---- the API -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    from productvlm.models.loading import load_pretrained
    from productvlm.prompting.settings import load_prompt_settings
    from productvlm.serving.app import ServeSettings, create_app
    from serve_helpers import running_server

    model, processor = load_pretrained(tiny_model_dir)
    settings = ServeSettings(model_name="tiny", catalog_max_tokens=8, max_tokens_limit=16)
    app = create_app(model, processor, load_prompt_settings(tiny_model_dir), settings)
    with running_server(app) as url:
        yield url


def test_openai_client_gets_logprobs_and_top_logprobs(server):
    from openai import BadRequestError, OpenAI

    from serve_helpers import data_url, image_message, product_jpeg

    client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    messages = image_message(data_url(product_jpeg(1)))
    r = client.chat.completions.create(
        model="tiny", max_tokens=8, messages=messages, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens > 0
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy: the most likely
    assert "".join(e.token for e in content) == r.choices[0].message.content
    plain = client.chat.completions.create(model="tiny", max_tokens=8, messages=messages)
    assert (
        plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content
    )
    only_chosen = client.chat.completions.create(model="tiny", max_tokens=8, messages=messages, logprobs=True)
    assert all(e.top_logprobs == [] for e in only_chosen.choices[0].logprobs.content)
    with pytest.raises(BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model="tiny", max_tokens=8, messages=messages, top_logprobs=2)


def test_catalog_endpoint_says_how_sure_it_is(server):
    from serve_helpers import product_jpeg

    r = httpx.post(
        f"{server}/v1/catalog", files={"file": ("bag.jpg", product_jpeg(2), "image/jpeg")}, timeout=60
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body["confidence"]) == {"title", "category", "price"}
    assert all(0 <= c <= 1 for c in body["confidence"].values()) and body["calibrated"] is False
    assert body["needs_review"] == any(c < 0.5 for c in body["confidence"].values())
