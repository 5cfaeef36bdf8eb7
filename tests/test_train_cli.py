"""`productvlm train` as a command: config errors are one line with exit code 2, before any work."""

from typer.testing import CliRunner

from productvlm.cli import app
from test_train_run import CONFIGS


def test_unknown_key_exits_before_any_work(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--config",
            str(CONFIGS / "tiny-cpu.yaml"),
            "--set",
            "train.lr_rate=1",
            "--set",
            f"output_dir={out}",
        ],
    )
    assert result.exit_code != 0
    assert "train.lr_rate: unknown key" in str(result.exception)
    assert not out.exists()


def test_cli_trains_and_prints_the_run_folder(tmp_path):
    from productvlm.data.synth import synthesize

    synthesize(tmp_path / "data", rows=24, seed=1, overwrite=True, progress=False, workers=1)
    out = tmp_path / "run"
    sets = [
        f"data.dir={tmp_path / 'data'}",
        f"output_dir={out}",
        "train.max_steps=2",
        "eval.subset=2",
        "tracking.backend=none",
        "train.vision_pretrain.epochs=2",
    ]
    args = ["train", "--config", str(CONFIGS / "tiny-cpu.yaml")] + [x for s in sets for x in ("--set", s)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert str(out) in result.output.replace("\n", "") and "eval_category_accuracy" in result.output
    assert (out / "final" / "model.safetensors").is_file()
