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
        ("train:\n  method: prefix_tuning\n", "train.method"),
        ("train:\n  optim: sgd\n", "train.optim"),
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


@pytest.mark.parametrize(
    "name", ["tiny-cpu.yaml", "phi3-vision-lora.yaml", "phi35-vision-lora.yaml", "phi3-vision-qlora.yaml"]
)
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
        load_config(
            CONFIGS / "tiny-cpu.yaml", ["train.packing=true", "train.balance=0", "train.pack_length=100"]
        )


def test_qlora_config_is_the_lora_one_with_a_4bit_base_and_a_paged_8bit_optimizer():
    lora, qlora = (
        load_config(CONFIGS / "phi3-vision-lora.yaml"),
        load_config(CONFIGS / "phi3-vision-qlora.yaml"),
    )
    assert qlora.train.method == "qlora" and qlora.train.optim == "paged_adamw_8bit"
    assert qlora.train.lora == lora.train.lora and qlora.data == lora.data and qlora.model == lora.model


@pytest.mark.parametrize(
    "sets, message",
    [
        (
            ["train.method=full", "train.lora.projector=true"],
            r"train\.lora\.projector is for method lora or qlora",
        ),
        (  # lora's projector would train fp16 weights, which the fp16 grad scaler cannot unscale
            ["train.method=lora", "train.lora.projector=true", "model.dtype=float16", "train.precision=fp16"],
            r"train\.precision fp16 with model\.dtype float16 trains fp16 weights \(lora \+ train\.lora\.projector\)",
        ),
    ],
)
def test_combinations_that_cannot_train_are_refused(sets, message):
    with pytest.raises(UserError, match=message):
        load_config(None, sets)


def test_qlora_trains_fp32_weights_under_fp16():
    """prepare_model_for_kbit_training casts what is not 4-bit (the projector) to fp32; LoRA is fp32 under fp16."""
    cfg = load_config(
        None,
        ["train.method=qlora", "train.lora.projector=true", "model.dtype=float16", "train.precision=fp16"],
    )
    assert cfg.train.method == "qlora"


@pytest.mark.parametrize(
    "optim", ["auto", "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit"]
)
def test_train_optim_reaches_the_trainer(tmp_path, optim):
    import bitsandbytes
    import torch
    from transformers import Trainer

    from productvlm.training.run import training_args

    args = training_args(load_config(None, [f"train.optim={optim}", "train.precision=fp32"]), tmp_path, [])
    auto = "adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch"
    names = {"auto": auto, "adamw_8bit": "adamw_bnb_8bit"}
    assert args.optim == names.get(optim, optim)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    if optim.endswith("8bit"):
        assert cls is bitsandbytes.optim.AdamW and kwargs["optim_bits"] == 8
        assert kwargs["is_paged"] == optim.startswith("paged")
    else:
        assert cls is torch.optim.AdamW and kwargs.get("fused", False) == (args.optim == "adamw_torch_fused")
