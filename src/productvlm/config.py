"""The run config: pydantic models (unknown keys are errors), read from YAML plus `--set a.b=value` overrides.

Every mistake becomes a one-line UserError naming the key (`train.lr_rate: unknown key`), raised
before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from productvlm.errors import UserError

DEFAULT_PROMPT = "<|user|>\n<|image_1|>What is shown in this image?<|end|><|assistant|>\n"
DEFAULT_ANSWER = "Product: {title}, Category: {category3_code}, Full Price: {full_price}"
DECODER_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
# Our keys and the transformers.TrainingArguments fields they set (training/run.py `training_args`): the
# one table `train.trainer_args` is checked against (README, Train, shows it). Any other field passes through.
TRAINER_FIELDS: dict[str, tuple[str, ...]] = {
    "output_dir": ("output_dir",),
    "train.batch_size": ("per_device_train_batch_size",),
    "train.grad_accum": ("gradient_accumulation_steps",),
    "train.lr": ("learning_rate",),
    "train.weight_decay": ("weight_decay",),
    "train.schedule": ("lr_scheduler_type",),
    "train.warmup_ratio": ("warmup_steps",),
    "train.epochs": ("num_train_epochs",),
    "train.max_steps": ("max_steps",),
    "train.max_grad_norm": ("max_grad_norm",),
    "train.seed": ("seed", "data_seed"),
    "train.precision": ("bf16", "fp16"),
    "train.gradient_checkpointing": (
        "activation_checkpointing",
        "activation_checkpointing_kwargs",
        "gradient_checkpointing",
        "gradient_checkpointing_kwargs",
    ),
    "train.optim": ("optim",),
    "train.save_steps": ("save_steps", "save_strategy"),
    "train.save_total_limit": ("save_total_limit",),
    "train.log_steps": ("logging_steps",),
    "train.num_workers": ("dataloader_num_workers",),
    "train.group_by_length": ("train_sampling_strategy",),
    "eval.steps": ("eval_steps", "eval_strategy"),
    "eval.batch_size": ("per_device_eval_batch_size",),
    "eval.select": ("load_best_model_at_end", "metric_for_best_model", "greater_is_better"),
    "tracking.backend": ("report_to",),
    "tracking.run_name": ("run_name",),
    "(productvlm)": ("remove_unused_columns", "use_cpu", "disable_tqdm", "dataloader_pin_memory"),
}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Section):
    path: str = Field("microsoft/Phi-3-vision-128k-instruct", description="folder, hub id or preset:tiny")
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    attention: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"

    @property
    def preset(self) -> str | None:
        return self.path.removeprefix("preset:") if self.path.startswith("preset:") else None


class AugmentConfig(Section):
    """Geometric changes drawn per sample per epoch for training photos (never colour); off by default."""

    enabled: bool = False
    scale: float = Field(0.0, ge=0, le=0.5, description="zoom factor in [1/(1+s), 1+s]")
    translate: float = Field(0.0, ge=0, le=0.3, description="shift up to this fraction of width/height")
    rotate: float = Field(0.0, ge=0, le=30, description="rotation up to +- this many degrees")
    hflip: bool = False
    jpeg_quality: tuple[int, int] | None = Field(
        None, description="[low, high]: re-compress at a quality drawn in it"
    )

    @model_validator(mode="after")
    def _check(self) -> AugmentConfig:
        q = self.jpeg_quality
        if q is not None and not (1 <= q[0] <= q[1] <= 100):
            raise ValueError(
                f"data.augment.jpeg_quality must be [low, high] with 1 <= low <= high <= 100, got {list(q)}"
            )
        return self


class DataConfig(Section):
    dir: Path = Path("data/sample")
    prompt: str = DEFAULT_PROMPT
    answer: str = DEFAULT_ANSWER
    num_crops: int = Field(4, ge=1, le=16)
    max_tokens_per_sample: int = Field(4096, ge=8)
    blank_images: bool = False
    max_train_rows: int | None = Field(None, ge=1)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    # 0: dropout on the adapter input costs a quarter of a GPU step (issue 13) and a LoRA run of a
    # few epochs is regularised by augmentation and best-checkpoint selection instead
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: list(DECODER_TARGETS))
    vision: bool = Field(False, description="adapters on the CLIP tower's attention and MLP projections too")
    dora: bool = Field(False, description="weight-decomposed LoRA (peft use_dora)")
    adapter_dtype: Literal["compute", "float32"] = Field(
        "compute", description="compute: adapters in model.dtype (bf16 trains faster); float32: fp32 adapters"
    )
    projector: bool = Field(
        False,
        description="also train img_projection, glb_GN, sub_GN in full (method lora or qlora; lora+projector sets it)",
    )


class VisionPretrainConfig(Section):
    """Stage 1 for a preset's random vision tower: before the VLM trains, the tower alone learns to tell
    the training photos' `label` values apart (pooled features -> a linear head, cross-entropy,
    data.augment on), as a real VLM's tower arrives pretrained. The head is then dropped."""

    epochs: float = Field(0.0, ge=0, description="0: off; with max_minutes or patience: at most this many")
    label: str = Field("category3_code", min_length=1, description="the column whose values the tower learns")
    lr: float = Field(1e-3, gt=0)
    max_minutes: float | None = Field(
        None,
        gt=0,
        description="time budget: the schedule decays to it and stage 1 stops there (training/budget.py)",
    )
    patience: int | None = Field(
        None, ge=1, description="stop after this many epochs without a better validation accuracy"
    )
    pool: Literal["max", "mean", "mean+max"] = Field(
        "mean+max",
        description="how the head reads the tower's patch features: max (each feature's strongest patch: "
        "a glyph or a handle in one corner counts), mean (the whole photo's average), or both side by side",
    )
    words_from: str | None = Field(
        None,
        min_length=1,
        description="also learn which of this column's common words (in at least 1% of the training rows) "
        "each photo's row has: a second head, so the tower also sees what the title names (colour, material)",
    )


class TrainConfig(Section):
    method: Literal["lora", "lora+projector", "frozen_vision", "full", "qlora"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    lr: float = Field(
        2e-4, gt=0, description="the decoder's learning rate (and every part's without its own)"
    )
    lr_vision: float | None = Field(None, gt=0, description="the CLIP tower's learning rate (default: lr)")
    lr_projector: float | None = Field(
        None, gt=0, description="the image projector's learning rate (default: lr)"
    )
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="overrides epochs when set")
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    save_steps: int = Field(500, ge=1)
    save_total_limit: int | None = Field(3, ge=1)
    log_steps: int = Field(10, ge=1)
    group_by_length: bool = True
    packing: bool = Field(False, description="several samples per row; batch_size then counts rows (packs)")
    pack_length: int = Field(4096, ge=8, description="tokens per packed row (>= data.max_tokens_per_sample)")
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    gradient_checkpointing: Literal["auto"] | bool = Field(
        "auto",
        description="auto: on when the memory plan without it exceeds 90% of the GPU (training/memory.py)",
    )
    optim: Literal["auto", "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "auto", description="auto: adamw_torch_fused on CUDA, adamw_torch elsewhere"
    )
    trainer_args: dict[str, Any] = Field(
        default_factory=dict,
        description="other transformers.TrainingArguments fields, passed as they are (not those our keys set)",
    )
    max_minutes: float | None = Field(
        None,
        gt=0,
        description="time budget: the schedule decays to it and training stops there (training/budget.py)",
    )
    balance: float = Field(
        0.0,
        ge=0,
        le=1,
        description="weigh rows by count(balance_label)^-balance: 0 as the catalog comes, 1 every value alike",
    )
    balance_label: str = Field("category3_code", min_length=1, description="the column train.balance counts")
    balance_by: Literal["sampling", "loss"] = Field(
        "sampling",
        description="sampling: rows drawn with replacement by those weights; loss: every row once an epoch, "
        "its loss (both stages) multiplied by its weight (the weights' mean over the rows is 1)",
    )
    merge_final: bool = False
    num_workers: int = Field(0, ge=0)
    vision_pretrain: VisionPretrainConfig = Field(default_factory=VisionPretrainConfig)

    @model_validator(mode="after")
    def _one_sampler(self) -> TrainConfig:
        if self.balance and self.packing:
            raise ValueError("train.balance weighs single rows and train.packing joins them: turn one off")
        if self.balance and self.balance_by == "sampling" and self.group_by_length:
            raise ValueError(
                "train.balance and train.group_by_length each choose the order of the rows: turn one off "
                "(or train.balance_by: loss)"
            )
        return self

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _auto_or_bool(cls, v: Any) -> Any:
        if v == "auto" or isinstance(v, bool):
            return v
        raise ValueError("must be auto, true or false")


class EvalConfig(Section):
    subset: int = Field(64, ge=0, description="validation rows generated on; 0 = no eval")
    steps: int = Field(200, ge=1, description="eval every N optimizer steps (and at the end)")
    max_new_tokens: int = Field(40, ge=1)
    batch_size: int = Field(8, ge=1)
    select: Literal["best", "last"] = Field(
        "best", description="RUN/final: the best evaluated checkpoint by eval.metric, or the last step"
    )
    metric: Literal["category_accuracy", "price_mape", "title_token_f1"] = Field(
        "category_accuracy",
        description="what `select: best` maximises (price_mape: minimises); ties: price_mape",
    )
    patience: int | None = Field(None, ge=1, description="stop after this many evals without a better one")


class TrackingConfig(Section):
    backend: Literal["wandb", "mlflow", "tensorboard", "none"] = "wandb"
    project: str = "productvlm"
    run_name: str | None = None
    offline: bool = True


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    output_dir: Path = Path("runs/run")

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.train.precision == "fp16" and self.model.dtype == "bfloat16":
            raise ValueError("train.precision fp16 with model.dtype bfloat16: use bf16, or dtype float32")
        t = self.train
        trains_fp16 = t.method in ("full", "frozen_vision", "lora+projector") or (
            t.method == "lora" and t.lora.projector
        )
        if t.precision == "fp16" and self.model.dtype == "float16" and trains_fp16:
            # the fp16 grad scaler cannot unscale fp16 gradients; LoRA weights are fp32 under fp16 (and
            # qlora's projector too: peft's prepare_model_for_kbit_training casts what is not 4-bit to fp32)
            what = "lora + train.lora.projector" if t.method == "lora" else t.method
            raise ValueError(
                f"train.precision fp16 with model.dtype float16 trains fp16 weights ({what}): "
                "use model.dtype float32 (mixed precision), or method lora / qlora"
            )
        if t.lora.projector and t.method not in ("lora", "lora+projector", "qlora"):
            raise ValueError(
                f"train.lora.projector is for method lora or qlora; method {t.method} "
                "already decides what trains: set train.lora.projector to false"
            )
        if self.train.vision_pretrain.epochs and self.model.preset is None:
            raise ValueError(
                f"train.vision_pretrain.epochs is for a preset's random vision tower (model.path: preset:...); "
                f"model.path {self.model.path} has a pretrained one: set train.vision_pretrain.epochs to 0"
            )
        if self.train.trainer_args:
            problems = trainer_args_problems(self.train.trainer_args)
            if problems:
                raise ValueError("; ".join(problems))
        if self.train.packing and self.train.pack_length < self.data.max_tokens_per_sample:
            raise ValueError(
                f"train.pack_length {self.train.pack_length} is below data.max_tokens_per_sample "
                f"{self.data.max_tokens_per_sample}: a sample must fit in a pack; raise pack_length"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def trainer_args_problems(trainer_args: dict[str, Any]) -> list[str]:
    """One message per `train.trainer_args` name that is not a TrainingArguments field, or that one of
    our keys sets (TRAINER_FIELDS)."""
    import dataclasses
    import difflib

    from transformers import TrainingArguments

    fields = [f.name for f in dataclasses.fields(TrainingArguments) if f.init and not f.name.startswith("_")]
    ours = {field: key for key, names in TRAINER_FIELDS.items() for field in names}
    problems = []
    for name in trainer_args:
        where = f"train.trainer_args.{name}"
        if name in ours:
            owner = ours[name]
            problems.append(
                f"{where}: productvlm sets it itself"
                if owner.startswith("(")
                else f"{where}: set {owner} instead"
            )
        elif name not in fields:
            close = difflib.get_close_matches(str(name), fields, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{where}: not a transformers.TrainingArguments field{hint}")
    return problems


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as a YAML scalar: 3e-4, true, null, [a, b], text)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item!r}: expected key=value, e.g. --set train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError) as e:
        raise UserError(f"--set {key}: value {raw!r} is not valid YAML ({e.__class__.__name__})") from e
    return key.strip().split("."), value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def _describe(error: dict[str, Any]) -> str:
    if not error["loc"]:  # a check across sections: its message names the keys
        return error["msg"].removeprefix("Value error, ")
    key = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def validate(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        details = "; ".join(_describe(err) for err in e.errors())
        raise UserError(f"{source}: {details}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except (yaml.YAMLError, RecursionError) as e:
        raise UserError(f"{path}: not valid YAML ({e})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections (model, data, train, ...)")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- `--set` overrides, validated."""
    data = read_yaml(path) if path is not None else {}
    for item in overrides:
        apply_override(data, *parse_override(item))
    return validate(data, source=str(path) if path is not None else "config")
