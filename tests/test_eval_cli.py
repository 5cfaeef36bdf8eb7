"""`eval` through the command function: the three files and their shapes."""

import json

import typer
from typer.testing import CliRunner

from productvlm.data.folder import read_split
from productvlm.evaluation.cli import eval_command

app = typer.Typer()
app.command("eval")(eval_command)
app.command("noop")(lambda: None)


def test_eval_writes_metrics_predictions_and_report(eval_run, eval_catalog, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--model", str(eval_run), "--data", str(eval_catalog), "--split", "validation"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--constrained", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    rows = read_split(eval_catalog, "validation")

    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["split"], metrics["n"], metrics["constrained"], metrics["num_crops"]) == (
        "validation",
        len(rows),
        True,
        1,
    )
    assert metrics["model"] == str(eval_run / "final")
    assert metrics["parse_rate"] == 1.0  # constrained
    assert {"accuracy", "accuracy_ci95", "macro_f1"} <= set(metrics["category"])
    assert {"mae", "mape", "median_ape", "within_10pct", "within_25pct", "mape_ci95"} <= set(metrics["price"])
    assert {"exact_match", "token_f1", "chrf"} <= set(metrics["title"])
    assert metrics["baselines"]["mean_price"]["price"]["mape"] > 0

    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in records] == [r["file_name"] for r in rows]
    assert all(set(r["truth"]) == set(r["pred"]) == {"title", "category", "price"} for r in records)
    assert sum(r["category_correct"] for r in records) / len(rows) == metrics["category"]["accuracy"]

    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and 'id="metrics"' in page and 'id="curves"' in page
    assert "http://" not in page and "https://" not in page  # self-contained


def test_eval_default_out_is_in_the_run_folder(eval_run, eval_catalog):
    args = [
        "eval",
        "-m",
        str(eval_run / "final"),
        "-d",
        str(eval_catalog),
        "--limit",
        "2",
        "--max-new-tokens",
        "8",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((eval_run / "eval-test" / "metrics.json").read_text())
    assert metrics["n"] == 2 and metrics["constrained"] is False


def test_eval_bad_split_is_a_user_error(eval_run, eval_catalog):
    result = CliRunner().invoke(app, ["eval", "-m", str(eval_run), "-d", str(eval_catalog), "--split", "dev"])
    assert result.exit_code != 0 and "dev" in str(result.exception)
