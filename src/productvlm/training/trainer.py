"""Build the model (+ peft), the datasets and transformers' Trainer from a Config; write the run folder.

RUN/
  config.yaml            the resolved config
  base-model/            only for `model.path: preset:...` (the random preset the run starts from)
  checkpoints/step-N/    Trainer checkpoints, each renamed into place when complete
  final/                 the model in the official layout with the processor files (see save_final)
  train_log.jsonl        one JSON object per log/eval event: step, loss, lr, eval_* metrics
  eval_samples.jsonl     per eval: step, file_name, truth and prediction of every validation-subset row
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from productvlm.config import Config
from productvlm.data.folder import read_split
from productvlm.errors import UserError
from productvlm.inference.generate import generate_answers
from productvlm.models.loading import DTYPES, EXTRA_TRAINABLES, load_extra_trainables
from productvlm.models.phi3v import Phi3VForCausalLM, Phi3VProcessor
from productvlm.prompting.settings import PromptSettings
from productvlm.prompting.templates import render
from productvlm.run_folder import FINAL, SAMPLES
from productvlm.training.data import Encoder, length_grouped_order
from productvlm.training.evaluate import score
from productvlm.training.tracking import log_eval_samples

STEP_DIR = re.compile(r"^step-(\d+)$")
VISION_PREFIX = "model.vision_embed_tokens.img_processor"
VISION_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
PROJECTOR = ("img_projection", "glb_GN", "sub_GN")


# ---------------------------------------------------------------- model


def model_dir(cfg: Config, run: Path) -> str:
    """The folder or hub id to load; a preset is written once into RUN/base-model."""
    if cfg.model.preset is None:
        return cfg.model.path
    from productvlm.models.phi3v.presets import PRESETS, init_model

    if cfg.model.preset not in PRESETS:
        raise UserError(f"model.path: unknown preset {cfg.model.preset!r}; choose from {', '.join(PRESETS)}")
    base = run / "base-model"
    if not (base / "config.json").is_file():
        init_model(cfg.model.preset, base, seed=cfg.train.seed)
    return str(base)


def load_model(cfg: Config, path: str):
    try:
        model = Phi3VForCausalLM.from_pretrained(
            path, dtype=DTYPES[cfg.model.dtype], attn_implementation=cfg.model.attention
        )
        processor = Phi3VProcessor.from_pretrained(path)
    except OSError as e:
        raise UserError(f"model.path {path!r}: cannot load it ({str(e).splitlines()[0]})") from e
    return model, processor


def apply_method(model, cfg: Config):
    """Freeze / wrap the model for train.method; returns the model to train."""
    method = cfg.train.method
    if method == "full":
        return model
    if method == "frozen_vision":
        model.model.vision_embed_tokens.img_processor.requires_grad_(False)
        return model
    from peft import LoraConfig, get_peft_model

    lora = cfg.train.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_targets(lora.targets, lora.vision),
        use_dora=lora.dora,
        task_type="CAUSAL_LM",
    )
    # peft casts adapters to fp32 unless told not to; in the compute dtype (bf16) they train ~1.4x
    # faster on a GPU (issue 13). fp16 mixed precision needs fp32 adapters (its grad scaler
    # cannot unscale fp16 gradients).
    fp32 = lora.adapter_dtype == "float32" or cfg.train.precision == "fp16"
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=fp32)
    if method == "lora+projector":
        # requires_grad rather than peft's modules_to_save: the model indexes img_projection[0],
        # which a ModulesToSaveWrapper does not support; these weights are saved beside the adapter.
        embedding = peft_model.base_model.model.model.vision_embed_tokens
        for part in (embedding.img_projection, embedding.glb_GN, embedding.sub_GN):
            part.requires_grad_(True)
    return peft_model


def lora_targets(decoder: list[str], vision: bool) -> str:
    """peft's target regex: the decoder layers' `decoder` projections, plus the CLIP tower's with `vision`."""
    names = "|".join(re.escape(t) for t in decoder)
    pattern = rf"^model\.layers\.\d+\..*\.({names})$"
    if vision:
        pattern += rf"|^{re.escape(VISION_PREFIX)}\..*\.({'|'.join(VISION_TARGETS)})$"
    return pattern


def model_part(name: str) -> str:
    """vision (the CLIP tower), projector (image projection and separators) or decoder."""
    if ".img_processor." in name:
        return "vision"
    if any(f".{p}" in name for p in PROJECTOR):
        return "projector"
    return "decoder"


def param_groups(model, t, decay: set[str] | list[str]) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (part, weight decay), each part at its own learning rate."""
    rates = {"decoder": t.lr, "vision": t.lr_vision or t.lr, "projector": t.lr_projector or t.lr}
    decay = set(decay)
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((model_part(name), name in decay), []).append(p)
    return [
        {"params": ps, "lr": rates[part], "weight_decay": t.weight_decay if decayed else 0.0, "part": part}
        for (part, decayed), ps in sorted(groups.items())
    ]


def extra_trainables(model) -> dict[str, torch.Tensor]:
    """Trainable parameters a peft adapter file does not hold (lora+projector: img_projection, glb_GN, sub_GN)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return {}
    return {
        n: p.detach().contiguous()
        for n, p in model.named_parameters()
        if p.requires_grad and "lora_" not in n
    }


# ---------------------------------------------------------------- data


def rows_of(cfg: Config, split: str) -> list[dict[str, Any]]:
    rows = read_split(cfg.data.dir, split)
    if not rows and split == "train":
        raise UserError(f"data.dir {cfg.data.dir}: the train split has no rows")
    return rows


def make_encoder(cfg: Config, processor) -> Encoder:
    d = cfg.data
    return Encoder(processor, d.prompt, d.answer, d.num_crops, d.max_tokens_per_sample)


class EpochLengthSampler(LengthGroupedSampler):
    """Length-grouped order that depends only on (seed, epoch), so a resumed run replays it exactly."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(length_grouped_order(self.lengths, self.batch_size, self.seed + self.epoch))


class TrainingDiverged(UserError):
    """The loss or the weights became NaN/inf; nothing from that step on was saved."""


# ---------------------------------------------------------------- trainer


class RunTrainer(Trainer):
    """Trainer with length grouping from precomputed lengths, atomic checkpoints and eval by generation."""

    def __init__(self, *args, run_cfg: Config, eval_rows: list[dict[str, Any]], **kwargs):
        super().__init__(*args, **kwargs)
        self.run_cfg, self.eval_rows = run_cfg, eval_rows
        self._sampler: EpochLengthSampler | None = None

    def create_optimizer(self, model=None):
        """transformers' optimizer (AdamW, fused on CUDA) over per-part groups: train.lr_vision / lr_projector / lr."""
        if self.optimizer is None:
            model = self.model if model is None else model
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            groups = param_groups(model, self.run_cfg.train, self.get_decay_parameter_names(model))
            self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        if not self.run_cfg.train.group_by_length:
            return super()._get_train_sampler(train_dataset)
        ds = train_dataset if train_dataset is not None else self.train_dataset
        size = self.args.train_batch_size * self.args.gradient_accumulation_steps
        self._sampler = EpochLengthSampler(size, ds.lengths, self.args.seed)
        return self._sampler

    def _run_epoch(self, **kwargs):
        # accelerate's skip_first_batches wrapper (used on resume) does not forward set_epoch
        if self._sampler is not None:
            self._sampler.set_epoch(kwargs["epoch"])
        # the augmentation's draws: workers start (copying the dataset) when the epoch's iteration does
        if hasattr(self.train_dataset, "set_epoch"):
            self.train_dataset.set_epoch(kwargs["epoch"])
        return super()._run_epoch(**kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        """Write the checkpoint under a staging name, then rename it to checkpoints/step-N (atomic).

        Every process writes into the staging folder (its RNG state at least); the main process
        renames it once all have finished. The run folder must be on storage all processes share.
        """
        self._check_finite_weights(model)
        root = Path(self.args.output_dir)
        staging = root / ".staging"
        main = self.is_world_process_zero()
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()
        if main:
            written = staging / f"checkpoint-{self.state.global_step}"
            target = root / f"step-{self.state.global_step:06d}"
            shutil.rmtree(target, ignore_errors=True)
            os.replace(written, target)
            shutil.rmtree(staging, ignore_errors=True)
            best = self.best_checkpoint()
            _rotate(root, self.run_cfg.train.save_total_limit, keep=best[0] if best else None)
        self.accelerator.wait_for_everyone()

    def _get_output_dir(self, trial) -> str:
        return getattr(self, "_staging", None) or super()._get_output_dir(trial)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        extra = extra_trainables(self.model)
        if extra and self.args.should_save:
            save_file(extra, os.path.join(output_dir or self.args.output_dir, EXTRA_TRAINABLES))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_extra_trainables(model or self.model, Path(resume_from_checkpoint))

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """A step whose loss is NaN/inf (on any process) stops the run before the optimizer uses it.

        This costs one device sync per micro-batch, the price of never stepping or saving past a NaN.
        """
        loss = super().training_step(model, inputs, num_items_in_batch)
        losses = self.accelerator.gather(loss.detach().reshape(1))
        if not torch.isfinite(losses).all():
            bad = losses[~torch.isfinite(losses)][0].item()
            self._diverged(f"the loss is {bad}", self.state.global_step + 1)
        return loss

    def _check_finite_weights(self, model) -> None:
        """Refuse to checkpoint NaN/inf weights (e.g. an inf gradient that clipping turned into NaN)."""
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        flags = torch.stack([torch.isfinite(p).all() for _, p in trainable]) if trainable else None
        if flags is None:
            return
        if not self.accelerator.gather(flags.all().reshape(1)).all():
            names = [n for (n, _), ok in zip(trainable, flags.tolist()) if not ok]
            where = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "") or "on another process"
            self._diverged(f"weights are NaN/inf ({where})", self.state.global_step)

    def _diverged(self, what: str, step: int) -> None:
        good = complete_checkpoints(Path(self.args.output_dir))
        kept = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint had been written yet"
        raise TrainingDiverged(
            f"training diverged at step {step}: {what}. Nothing from this step on was saved; {kept}. "
            f"Lower train.lr (now {self.run_cfg.train.lr:g}), raise train.warmup_ratio, or use precision "
            "bf16/fp32 instead of fp16, then start a new run"
        )

    def evaluate(
        self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Generate on the fixed validation subset, parse, score; logged like any Trainer metric.

        With several processes each generates a contiguous share of the rows; the answers are
        gathered back in order, so every process computes the same metrics.
        """
        if not self.eval_rows:
            return {}
        model = self.accelerator.unwrap_model(self.model)
        c = self.run_cfg
        with self.accelerator.split_between_processes(self.eval_rows) as share:
            answers = generate_answers(
                model,
                self.processing_class,
                PromptSettings.from_config(c),
                share,
                c.eval.max_new_tokens,
                c.eval.batch_size,
                c.data.blank_images,
                compiled=False,  # mid-training shapes vary and the weights change: no compiled decode
            )
        if self.args.world_size > 1:
            from accelerate.utils import gather_object

            answers = gather_object(answers)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in score(self.eval_rows, answers).items()}
        self.log(metrics)
        if self.is_world_process_zero():
            self._log_samples(answers)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self.last_eval = (metrics, answers)
        if c.eval.select == "best":
            self.control.should_save = True  # every evaluated step can become RUN/final
        patience = c.eval.patience
        if patience and evals_since_best(self.state.log_history, c.eval.metric) >= patience:
            self.control.should_training_stop = True
            self.log({"early_stop": 1.0, "evals_without_improvement": float(patience)})
        return metrics

    def best_checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        """(checkpoint folder, its eval log entry) of the best evaluated step that has a checkpoint."""
        root = Path(self.args.output_dir)
        for entry in ranked_evals(self.state.log_history, self.run_cfg.eval.metric):
            path = root / f"step-{entry['step']:06d}"
            if path.is_dir():
                return path, entry
        return None

    def _log_samples(self, answers: list[str]) -> None:
        """Image, truth and prediction per validation row: to RUN/eval_samples.jsonl and the tracker."""
        step, template = self.state.global_step, self.run_cfg.data.answer
        samples = [
            {
                "step": step,
                "file_name": row["file_name"],
                "image_path": str(row["image_path"]),
                "truth": render(template, row, "answer"),
                "prediction": answer,
            }
            for row, answer in zip(self.eval_rows, answers)
        ]
        with open(Path(self.run_cfg.output_dir) / SAMPLES, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        log_eval_samples(self.run_cfg.tracking.backend, step, samples, self.callback_handler.callbacks)


def _rotate(root: Path, limit: int | None, keep: Path | None = None) -> None:
    """Delete all but the newest `limit` checkpoints, never `keep` (the best one)."""
    if not limit:
        return
    for old in [p for p in complete_checkpoints(root) if p != keep][:-limit]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- model selection


def _finite(x: Any, worst: float) -> float:
    return worst if x is None or x != x else float(x)  # NaN (no parsable price) ranks last


def selection_key(entry: dict[str, Any], metric: str) -> tuple[float, float, int]:
    """Sort key, best first: the metric (accuracy/F1 up, MAPE down), then price MAPE, then the earlier step."""
    value = entry[f"eval_{metric}"]
    main = _finite(value, float("inf")) if metric == "price_mape" else -_finite(value, float("-inf"))
    return main, _finite(entry.get("eval_price_mape"), float("inf")), entry["step"]


def ranked_evals(history: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The eval log entries (one per step), best first. A pure function of the log, so a resumed run
    (whose log_history comes back from the checkpoint) ranks exactly as the uninterrupted one."""
    evals = {e["step"]: e for e in history if f"eval_{metric}" in e}
    return sorted(evals.values(), key=lambda e: selection_key(e, metric))


def evals_since_best(history: list[dict[str, Any]], metric: str) -> int:
    ranked = ranked_evals(history, metric)
    if not ranked:
        return 0
    return sum(1 for e in ranked if e["step"] > ranked[0]["step"])


def complete_checkpoints(root: Path) -> list[Path]:
    """Renamed-into-place checkpoints, oldest first (staging leftovers are ignored)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


# ---------------------------------------------------------------- callbacks


class JsonlLog(TrainerCallback):
    """Appends every log event (loss, lr, eval metrics) to RUN/train_log.jsonl."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


class LogConfig(TrainerCallback):
    """Adds the resolved config and a model summary to the tracker's run (after its callback started it)."""

    def __init__(self, cfg: Config, run: Path, data: dict[str, float] | None = None):
        self.cfg, self.run, self.data = cfg, run, data or {}

    def summary(self, model) -> dict[str, Any]:
        params = list(model.parameters())
        return {
            "parameters": sum(p.numel() for p in params),
            "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
            "method": self.cfg.train.method,
            "final_model": str(self.run / FINAL),
        }

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        backend = self.cfg.tracking.backend
        summary = self.summary(model)
        if backend == "wandb":
            import wandb

            if wandb.run is not None:
                wandb.config.update({"productvlm": self.cfg.to_dict()}, allow_val_change=True)
                wandb.run.summary.update({f"model/{k}": v for k, v in summary.items()})
                wandb.run.summary.update({f"data/{k}": v for k, v in self.data.items()})
        elif backend == "mlflow":
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.log_dict(self.cfg.to_dict(), "productvlm_config.json")
                mlflow.set_tags({f"model.{k}": v for k, v in summary.items()})
                mlflow.log_params({f"data.{k}": v for k, v in self.data.items()})


class EvalAtEnd(TrainerCallback):
    """Evaluates after the last step too, inside training, so the trackers still record it."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def on_step_end(self, args, state, control, **kwargs):
        if self.enabled and state.global_step >= state.max_steps:
            control.should_evaluate = True


class StopAfter(TrainerCallback):
    """Stops training after `step` optimizer steps (used to simulate an interruption in tests)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint we resume from."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
