"""The run config: defaults, YAML, --set overrides, and one-line errors that name the key."""

import re
from pathlib import Path

import pytest

from productvlm.config import DEFAULT_ANSWER, DEFAULT_PROMPT, Config, load_config
from productvlm.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_seed_project_prompt_and_lora():
    cfg = Config()
    assert cfg.data.prompt == DEFAULT_PROMPT and cfg.data.answer == DEFAULT_ANSWER
    assert cfg.train.method == "lora" and cfg.tracking.backend == "wandb" and cfg.tracking.offline


def test_unknown_key_is_named(tmp_path):
    path = write(tmp_path, "train:\n  lr_rate: 0.1\n")
    with pytest.raises(UserError, match=r"train\.lr_rate: unknown key"):
        load_config(path)


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(UserError, match=r"trainer: unknown key"):
        load_config(write(tmp_path, "trainer: {}\n"))


@pytest.mark.parametrize(
    "text, key",
    [
        ("train:\n  lr: fast\n", "train.lr"),
        ("train:\n  batch_size: 0\n", "train.batch_size"),
        ("train:\n  method: qlora\n", "train.method"),
        ("data:\n  num_crops: [4]\n", "data.num_crops"),
        ("train:\n  lora:\n    r: x\n", "train.lora.r"),
    ],
)
def test_bad_type_is_named(tmp_path, text, key):
    with pytest.raises(UserError, match=re.escape(key) + ": "):
        load_config(write(tmp_path, text))


def test_set_overrides_file_values_as_yaml_scalars(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.1\n  epochs: 2\n")
    cfg = load_config(
        path,
        [
            "train.lr=3e-4",
            "data.blank_images=true",
            "train.max_steps=null",
            "train.lora.targets=[qkv_proj]",
            "output_dir=/tmp/x",
            "tracking.run_name=my run",
        ],
    )
    assert cfg.train.lr == 3e-4 and cfg.train.epochs == 2
    assert cfg.data.blank_images is True and cfg.train.max_steps is None
    assert cfg.train.lora.targets == ["qkv_proj"]
    assert cfg.output_dir == Path("/tmp/x") and cfg.tracking.run_name == "my run"


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.lr_rate=1", r"train\.lr_rate: unknown key"),
        ("train.lr=abc", r"train\.lr: "),
        ("train.lr.x=1", r"train\.lr is not a section"),
        ("novalue", "expected key=value"),
    ],
)
def test_bad_set_is_named(tmp_path, item, message):
    with pytest.raises(UserError, match=message):
        load_config(write(tmp_path, "train:\n  lr: 0.1\n"), [item])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(CONFIGS / "tiny-cpu.yaml", ["train.lr=0.01"])
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize("name", ["tiny-cpu.yaml", "phi3-vision-lora.yaml", "phi35-vision-lora.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.output_dir


@pytest.mark.parametrize("ratio, steps", [(0.03, 3), (0.0, 0), (0.5, 50)])
def test_warmup_ratio_is_a_share_of_the_total_steps(tmp_path, ratio, steps):
    """TrainingArguments.warmup_steps reads a float below 1 as a ratio (transformers 5); guard that."""
    from productvlm.training.run import training_args

    cfg = load_config(None, [f"train.warmup_ratio={ratio}", "train.precision=fp32"])
    assert training_args(cfg, tmp_path, []).get_warmup_steps(100) == steps


def test_pack_length_below_the_sample_budget_is_rejected():
    with pytest.raises(UserError, match=r"train\.pack_length 100 is below data\.max_tokens_per_sample 256"):
        load_config(CONFIGS / "tiny-cpu.yaml", ["train.packing=true", "train.pack_length=100"])
