"""`predict` on image files and on a CSV, through the command function on a local typer app."""

import csv
import json

import pytest
import typer
from typer.testing import CliRunner

from productvlm.data.folder import read_split
from productvlm.errors import UserError
from productvlm.evaluation.cli import predict_command
from productvlm.evaluation.predict import COLUMNS

app = typer.Typer()
app.command("predict")(predict_command)
app.command("noop")(lambda: None)  # two commands, so the verb is spelled out as with the main app
FIELDS = set(COLUMNS)


def invoke(*args):
    result = CliRunner().invoke(app, ["predict", *map(str, args)])
    return result


def test_predict_images_to_stdout(eval_run, eval_catalog):
    images = [r["image_path"] for r in read_split(eval_catalog, "test")[:3]]
    result = invoke(*images, "--model", eval_run, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["id"] for r in records] == images
    assert all(set(r) == FIELDS and isinstance(r["raw"], str) for r in records)


def test_predict_csv_with_relative_paths_to_file(eval_run, eval_catalog, tmp_path):
    rows = read_split(eval_catalog, "validation")[:4]
    table = eval_catalog / "validation" / "photos.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sku", "photo"])
        writer.writerows([r["product_code"], r["file_name"]] for r in rows)  # relative to the CSV
    out = tmp_path / "preds.jsonl"
    result = invoke("--model", eval_run / "final", "--input", table, "--column", "photo", "--output", out)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in records] == [r["file_name"] for r in rows]
    assert [r["id"] for r in records] == [str(r["product_code"]) for r in rows]
    assert all(set(r) == FIELDS for r in records)


def test_predict_matches_eval_generation(eval_run, eval_catalog, tmp_path):
    """Same model, same prompt settings: predict (photos only, one at a time) writes the raw answers
    that eval (catalog rows, batched) wrote to predictions.jsonl."""
    from productvlm.evaluation.run import run_eval

    evaluated = run_eval(
        eval_run, eval_catalog, "test", tmp_path / "eval", batch_size=3, limit=3, device="cpu", progress=False
    )
    images = [p["image_path"] for p in evaluated.predictions]
    result = invoke(*images, "--model", eval_run, "-b", 1)
    assert result.exit_code == 0, result.output
    predicted = [json.loads(x) for x in result.stdout.splitlines() if x[:1] == "{"]
    assert [r["id"] for r in predicted] == images
    assert [r["raw"] for r in predicted] == [p["raw"] for p in evaluated.predictions]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--column", "nope"], "no column 'nope'"),
        ([], "no column 'image'"),  # nor imageurl, image_url or file_name
    ],
)
def test_predict_csv_errors_name_the_column(eval_run, tmp_path, args, message):
    table = tmp_path / "t.csv"
    table.write_text("photo\nx.jpg\n")
    result = invoke("--model", eval_run, "--input", table, *args)
    assert isinstance(result.exception, UserError) and message in str(result.exception)


def test_predict_errors(eval_run, tmp_path):
    (tmp_path / "bad.jpg").write_text("not an image")
    rows = invoke(tmp_path / "nope.jpg", tmp_path / "bad.jpg", "--model", eval_run)
    errors = [json.loads(x)["error"] for x in rows.stdout.splitlines() if x[:1] == "{"]
    assert "no such file" in errors[0] and "nope.jpg" in errors[0]
    assert "not a supported image" in errors[1]
    neither = invoke("--model", eval_run)
    assert isinstance(neither.exception, UserError) and "one of the three" in str(neither.exception)
