"""The `productvlm` command line: help everywhere, model init/info, one-line errors with exit code 2."""

import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from productvlm.cli import app
from productvlm.errors import UserError
from productvlm.models.phi3v import Phi3VForCausalLM

runner = CliRunner()


def command_paths(group, prefix=()):
    for name, command in group.commands.items():
        path = (*prefix, name)
        yield path
        if hasattr(command, "commands"):  # a sub-app
            yield from command_paths(command, path)


ALL_COMMANDS = list(command_paths(typer.main.get_command(app)))


def test_there_are_commands_to_check():
    expected = {("data", "synth"), ("data", "import"), ("data", "stats"), ("model", "init")}
    expected |= {("train",), ("eval",), ("predict",), ("serve",), ("export",)}
    assert expected <= set(ALL_COMMANDS)


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=" ".join)
def test_every_command_has_help(path):
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output.splitlines()) > 5


def test_model_init_writes_a_loadable_folder(tmp_path):
    result = runner.invoke(
        app, ["model", "init", "--out", str(tmp_path / "m"), "--seed", "3"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "16 tokens/crop" in result.output
    model = Phi3VForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.crop_size == 112


def test_unknown_preset_is_a_user_error(tmp_path):
    result = runner.invoke(app, ["model", "init", "--out", str(tmp_path), "--preset", "huge"])
    assert isinstance(result.exception, UserError) and "tiny" in str(result.exception)


def test_user_errors_are_one_line_with_exit_code_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "productvlm", "model", "info", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "no config.json" in proc.stderr
    assert "Traceback" not in proc.stderr
