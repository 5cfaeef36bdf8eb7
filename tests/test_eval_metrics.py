"""Metrics on hand-made cases whose answers are worked out by hand, baselines, and the bootstrap CIs."""

import json
import math

import pytest

from productvlm.prompting.metrics import (
    baselines,
    category_metrics,
    ci95,
    evaluate,
    price_metrics,
    title_metrics,
    token_f1,
)
from productvlm.training import generation_scores as flat


def row(title="Black Tote", category="TOTE", price=100.0):
    return {"title": title, "category3_code": category, "full_price": price, "file_name": "x.jpg"}


def test_category_accuracy_and_macro_f1():
    m = category_metrics(["TOTE", "CAPS", "CAPS", None], ["TOTE", "TOTE", "CAPS", "CAPS"])
    assert m["accuracy"] == 0.5
    # TOTE: P 1/1, R 1/2 -> F1 2/3; CAPS: P 1/2, R 1/2 -> 1/2; a missing answer counts against recall only
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_price_metrics_over_answers_with_a_price_and_hits_over_all_rows():
    m = price_metrics([110.0, None, 300.0], [100.0, 200.0, 400.0])
    assert m["n"] == 2
    assert m["mae"] == pytest.approx(55.0)
    assert m["mape"] == pytest.approx((0.10 + 0.25) / 2)
    assert m["median_ape"] == pytest.approx(0.175)
    assert m["within_10pct"] == pytest.approx(1 / 3)  # the missing price is a miss
    assert m["within_25pct"] == pytest.approx(2 / 3)


def test_price_metrics_without_any_price_are_none_not_nan():
    m = price_metrics([None, None], [10.0, 20.0])
    assert (m["n"], m["mae"], m["mape"], m["within_10pct"]) == (0, None, None, 0.0)
    json.dumps(m, allow_nan=False)


def test_title_metrics():
    m = title_metrics(["black  TOTE", None, "Red Scarf"], ["Black Tote", "Beige Cap", "Red Check Scarf"])
    assert m["exact_match"] == pytest.approx(1 / 3)  # case and spacing ignored; missing title is ""
    assert m["token_f1"] == pytest.approx((1 + 0 + 0.8) / 3)  # P 1, R 2/3 -> 0.8
    assert 0 < m["chrf"] < 100
    assert title_metrics(["Red Check Scarf"], ["Red Check Scarf"])["chrf"] == pytest.approx(100)


@pytest.mark.parametrize(
    "pred, truth, f1", [("a b c", "a b c", 1.0), ("a a b", "a b", 0.8), ("x", "y", 0.0), (None, "y", 0.0)]
)
def test_token_f1(pred, truth, f1):
    assert token_f1(pred, truth) == pytest.approx(f1)


def test_baselines_from_train_split():
    train = [
        row(category="TOTE", price=100),
        row(category="TOTE", price=200),
        row(category="CAPS", price=300),
    ]
    test = [
        row(category="TOTE", price=150),
        row(category="CAPS", price=330),
        row(category="BELTS", price=200),
    ]
    b = baselines(train, test)
    assert b["majority_category"]["value"] == "TOTE"
    assert b["majority_category"]["category"]["accuracy"] == pytest.approx(1 / 3)
    assert b["mean_price"]["value"] == pytest.approx(200)
    assert b["mean_price"]["price"]["mape"] == pytest.approx((50 / 150 + 130 / 330 + 0) / 3)
    # per true category: TOTE -> median 150, CAPS -> 300, unseen BELTS -> overall median 200
    per_cat = b["median_price_per_true_category"]["price"]
    assert per_cat["mae"] == pytest.approx((0 + 30 + 0) / 3)
    assert per_cat["within_10pct"] == pytest.approx(1.0)


def test_evaluate_nests_by_field_like_the_design():
    rows = [row("Black Tote", "TOTE", 100), row("Beige Cap", "CAPS", 200), row("Red Scarf", "SCARVES", 400)]
    answers = [
        "Product: Black Tote, Category: TOTE, Full Price: 100.0",
        "Product: Beige Cap, Category: TOTE, Full Price: 250",
        "no idea",
    ]
    m = evaluate(rows, answers, train_rows=rows, seed=0)
    assert m["n"] == 3 and m["parse_rate"] == pytest.approx(2 / 3)
    assert m["category"]["accuracy"] == pytest.approx(1 / 3)
    assert m["price"]["n"] == 2 and m["price"]["mape"] == pytest.approx(0.125)
    assert m["title"]["exact_match"] == pytest.approx(2 / 3)
    assert set(m["baselines"]) == {"majority_category", "mean_price", "median_price_per_true_category"}
    assert "accuracy" in m["baselines"]["majority_category"]["category"]
    assert "mape" in m["baselines"]["mean_price"]["price"]
    json.dumps(m, allow_nan=False)  # plain numbers only


@pytest.mark.parametrize("seed", [0, 1])
def test_confidence_intervals_contain_the_estimate_and_are_seeded(seed):
    rows = [row(category=c, price=100 + 10 * i) for i, c in enumerate(["TOTE", "CAPS"] * 20)]
    answers = [
        f"Product: Black Tote, Category: {'TOTE' if i % 3 else 'CAPS'}, Full Price: {100 + 13 * i}"
        for i in range(len(rows))
    ]
    m = evaluate(rows, answers, train_rows=rows, seed=seed)
    for block, key in [
        ("category", "accuracy"),
        ("price", "mape"),
        ("price", "median_ape"),
        ("price", "mae"),
    ]:
        low, high = m[block][f"{key}_ci95"]
        assert low <= m[block][key] <= high, (block, key)
        assert low < high  # these samples vary, so the interval has a width
    assert evaluate(rows, answers, train_rows=rows, seed=seed) == m


def test_ci95_degenerate_samples():
    assert ci95([1, 1, 1]) == [1.0, 1.0]
    assert ci95([0.5]) == [0.5, 0.5]
    low, high = ci95([0, 1] * 50, seed=3)
    assert 0.35 < low < 0.5 < high < 0.65


def test_training_score_keeps_its_flat_keys():
    rows = [row("Black Tote", "TOTE", 100), row("Beige Cap", "CAPS", 200)]
    s = flat.score(rows, ["Product: Black Tote, Category: TOTE, Full Price: 110", "Category: TOTE"])
    assert s == pytest.approx(
        {
            "n": 2,
            "parse_rate": 0.5,
            "category_accuracy": 0.5,
            "price_mape": 0.1,
            "price_mae": 10.0,
            "price_n": 1,
            "title_token_f1": 0.5,
        }
    )
    assert math.isnan(flat.score(rows, ["", ""])["price_mape"])
    b = flat.baselines(rows, rows)
    assert b["majority_category_accuracy"] == 0.5
    assert b["mean_price_mape"] == pytest.approx((50 / 100 + 50 / 200) / 2)


def test_macro_f1_interval_matches_sklearn_on_resamples_and_exposes_a_head_only_model():
    """macro-F1's bootstrap statistic equals sklearn's macro-F1 (over the categories a resample holds) on
    the full rows, its interval brackets the point, and a model that only says the head category gets an
    interval far below its accuracy's (the long-tail reading)."""
    from sklearn.metrics import f1_score

    truths = ["A"] * 60 + ["B"] * 20 + ["C"] * 10 + ["D"] * 5 + ["E"] * 5
    good = truths[:]
    good[60:70] = ["A"] * 10  # half of B mistaken for the head
    m = category_metrics(good, truths, ci=True)
    expected = f1_score(truths, good, labels=sorted(set(truths)), average="macro", zero_division=0)
    assert m["macro_f1"] == pytest.approx(expected)
    low, high = m["macro_f1_ci95"]
    assert low <= m["macro_f1"] <= high and high - low > 0.01
    head = category_metrics(["A"] * len(truths), truths, ci=True)
    assert head["accuracy_ci95"][0] > 0.45 and head["macro_f1_ci95"][1] < 0.2
