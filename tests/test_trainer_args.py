"""`train.trainer_args`: any transformers.TrainingArguments field reaches the Trainer; a name that is not a
field, or that one of our keys sets (config.TRAINER_FIELDS, the one table), stops the config load with a
one-line error naming `train.trainer_args.<name>`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from transformers import TrainingArguments

from productvlm.config import TRAINER_FIELDS, load_config
from productvlm.errors import UserError
from productvlm.training import run as run_module

README = Path(__file__).resolve().parents[1] / "README.md"


def _error(*sets: str) -> str:
    with pytest.raises(UserError) as e:
        load_config(None, list(sets))
    message = str(e.value)
    assert "\n" not in message
    return message


def test_unknown_name_is_refused_with_a_close_match():
    message = _error("train.trainer_args.adam_beta=0.9")
    assert "train.trainer_args.adam_beta: not a transformers.TrainingArguments field" in message
    assert "(did you mean adam_beta" in message  # adam_beta1 or adam_beta2
    assert "(did you mean" not in _error("train.trainer_args.zzzz_qqqq=1")


@pytest.mark.parametrize(
    ("name", "ours"),
    [
        ("learning_rate", "train.lr"),
        ("per_device_train_batch_size", "train.batch_size"),
        ("num_train_epochs", "train.epochs"),
        ("bf16", "train.precision"),
        ("report_to", "tracking.backend"),
        ("load_best_model_at_end", "eval.select"),
    ],
)
def test_a_field_our_keys_set_is_refused_naming_our_key(name, ours):
    assert f"train.trainer_args.{name}: set {ours} instead" in _error(f"train.trainer_args.{name}=1")


def test_fields_productvlm_fixes_are_refused():
    message = _error("train.trainer_args.remove_unused_columns=true", "train.trainer_args.adam_beta2=0.9")
    assert message.endswith("train.trainer_args.remove_unused_columns: productvlm sets it itself")


def test_the_table_names_real_fields_and_real_keys():
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    config = load_config(None).to_dict()
    for key, names in TRAINER_FIELDS.items():
        assert set(names) <= fields, key
        if not key.startswith("("):
            node = config
            for part in key.split("."):
                node = node[part]  # KeyError: the table names a key the config does not have


def test_readme_shows_the_table():
    text = README.read_text(encoding="utf-8")
    for key, names in TRAINER_FIELDS.items():
        shown = "set by productvlm" if key.startswith("(") else f"`{key}`"
        assert f"| {shown} | {', '.join(f'`{n}`' for n in names)} |" in text, key


def _cfg(tmp_path, *sets: str):
    return load_config(None, [f"output_dir={tmp_path / 'run'}", "tracking.backend=none", *sets])


def test_trainer_args_reach_training_arguments(tmp_path):
    cfg = _cfg(
        tmp_path,
        "train.trainer_args.adam_beta2=0.95",
        "train.trainer_args.torch_empty_cache_steps=7",
        "train.trainer_args.label_smoothing_factor=0.1",
    )
    args = run_module.training_args(cfg, tmp_path / "run", [])
    assert (args.adam_beta2, args.torch_empty_cache_steps, args.label_smoothing_factor) == (0.95, 7, 0.1)
    assert args.learning_rate == cfg.train.lr  # ours are untouched


def test_every_field_training_args_sets_is_in_the_table(tmp_path, monkeypatch):
    """Were one missing, a trainer_args entry would clash with ours (or be dropped) instead of being refused."""
    seen = {}
    monkeypatch.setattr(run_module, "TrainingArguments", lambda **kwargs: seen.update(kwargs))
    cfg = _cfg(tmp_path, "train.trainer_args.adam_beta2=0.95")
    run_module.training_args(cfg, tmp_path / "run", [])
    table = {name for names in TRAINER_FIELDS.values() for name in names}
    assert set(seen) - {"adam_beta2"} <= table, set(seen) - {"adam_beta2"} - table
    assert seen["adam_beta2"] == 0.95


def test_a_value_training_arguments_refuses_is_a_user_error(tmp_path):
    cfg = _cfg(tmp_path, "train.trainer_args.logging_strategy=sometimes")
    with pytest.raises(
        UserError, match=r"^train\.trainer_args: transformers\.TrainingArguments refused them"
    ):
        run_module.training_args(cfg, tmp_path / "run", [])
