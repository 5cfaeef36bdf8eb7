"""`RunTrainer`: transformers' Trainer with per-part learning rates, atomic checkpoints, a NaN/inf guard,
evaluation by generation and best-checkpoint selection. It writes into the run folder:

RUN/
  config.yaml            the resolved config
  base-model/            only for `model.path: preset:...` (the random preset the run starts from)
  vision-pretrained/     only with train.vision_pretrain: base-model with its tower trained (stage 1)
  checkpoints/step-N/    Trainer checkpoints, each renamed into place from checkpoint-N when complete
  final/                 the model in the official layout with the processor files (see save_final)
  train_log.jsonl        one JSON object per log/eval event: step, loss, lr, eval_* metrics
  eval_samples.jsonl     per eval: step, file_name, truth and prediction of every validation-subset row
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import Trainer

from productvlm.config import Config
from productvlm.errors import UserError
from productvlm.inference.generate import generate_answers
from productvlm.models.loading import EXTRA_TRAINABLES, save_quantization
from productvlm.prompting.settings import PromptSettings
from productvlm.prompting.templates import render
from productvlm.run_folder import SAMPLES
from productvlm.training.budget import TimeBudget, clocked, time_budget
from productvlm.training.callbacks import AtomicCheckpoints, TellEpoch
from productvlm.training.checkpoints import complete_checkpoints, evals_since_best
from productvlm.training.data import EpochLengthSampler, balanced_sampler
from productvlm.training.generation_scores import score
from productvlm.training.model import extra_trainables, param_groups
from productvlm.training.tracking import log_eval_samples


class TrainingDiverged(UserError):
    """The loss or the weights became NaN/inf; nothing from that step on was saved."""


class StageTrainer(Trainer):
    """The Trainer both stages use: its rows in our order (`sampler`: length-grouped or balanced, None:
    transformers' shuffle) and its schedule on a time budget too (`budget`, training/budget.py).

    Of transformers' private methods the two stages override only `_get_train_sampler` here and
    `_load_from_checkpoint` in RunTrainer (README, Train: "Trainer internals we rely on"); the rest goes
    through callbacks and public methods.
    """

    def __init__(self, *args, sampler=None, budget: TimeBudget | None = None, **kwargs):
        callbacks = [*([budget] if budget else []), *(kwargs.pop("callbacks", None) or [])]
        super().__init__(*args, callbacks=callbacks, **kwargs)
        self.sampler, self.budget = sampler, budget
        self.add_callback(TellEpoch(self.train_dataset, sampler))

    def _get_train_sampler(self, train_dataset=None):
        # private, but the only hook for a sampler short of rebuilding the whole DataLoader
        return super()._get_train_sampler(train_dataset) if self.sampler is None else self.sampler

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.budget is not None and hasattr(scheduler, "lr_lambdas"):
            scheduler.lr_lambdas = [clocked(f, self.budget, num_training_steps) for f in scheduler.lr_lambdas]
        return scheduler


def row_sampler(t, dataset, batch_size: int, where: str):
    """The order of the training rows that `train` asks for: length-grouped, balanced or None (shuffled)."""
    if t.group_by_length:
        return EpochLengthSampler(batch_size, dataset.lengths, t.seed)
    if not t.balance or t.balance_by == "loss":  # loss: shuffled as usual, the weights go to the loss
        return None  # (packs have no rows to balance: the config refuses balance with packing)
    return balanced_sampler(t, dataset.rows, where)


class RunTrainer(StageTrainer):
    """The VLM run (stage 2): atomic checkpoints, eval by generation, a NaN/inf guard."""

    def __init__(self, *args, run_cfg: Config, eval_rows: list[dict[str, Any]], **kwargs):
        t = run_cfg.train
        dataset, size = kwargs["train_dataset"], kwargs["args"].train_batch_size * t.grad_accum
        sampler = row_sampler(t, dataset, size, f"{run_cfg.data.dir}/train")
        super().__init__(*args, sampler=sampler, budget=time_budget(t.max_minutes), **kwargs)
        self.run_cfg, self.eval_rows = run_cfg, eval_rows
        self.add_callback(AtomicCheckpoints(t.save_total_limit, run_cfg.eval.metric))

    def create_optimizer(self, model=None):
        """transformers' optimizer for train.optim over per-part groups: train.lr_vision / lr_projector / lr."""
        if self.optimizer is None:
            model = self.model if model is None else model
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            groups = param_groups(model, self.run_cfg.train, self.get_decay_parameter_names(model))
            self.optimizer = cls(groups, **kwargs)
            if kwargs.get("optim_bits") == 8:  # bitsandbytes: embeddings keep 32-bit state, as Trainer does
                from bitsandbytes.optim import GlobalOptimManager

                for module in model.modules():
                    if isinstance(module, torch.nn.Embedding):
                        GlobalOptimManager.get_instance().register_module_override(
                            module, "weight", {"optim_bits": 32}
                        )
        return self.optimizer

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The Trainer's, then the LoRA weights back in the dtype they train in: the Trainer resumes a peft
        model through `load_adapter`, whose default `autocast_adapter_dtype` casts bf16/fp16 adapters
        (train.lora.adapter_dtype compute) to fp32, so a resumed run would go on in other arithmetic
        than the run it resumes. Lossless: the checkpoint holds them in that dtype."""
        dtypes = {n: p.dtype for n, p in self.model.named_parameters() if "lora_" in n}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name, p in self.model.named_parameters():
            if name in dtypes and p.dtype != dtypes[name]:
                p.data = p.data.to(dtypes[name])

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's save (a checkpoint's weights too), refused for NaN/inf weights, plus the
        trainables a peft adapter file does not hold. Checkpoints are renamed into place by
        `AtomicCheckpoints` once every process has written its part."""
        self._check_finite_weights(self.model)
        super().save_model(output_dir, _internal_call)
        folder = output_dir or self.args.output_dir
        extra = extra_trainables(self.model)
        if extra and self.args.should_save:
            save_file(extra, os.path.join(folder, EXTRA_TRAINABLES))
        if self.args.should_save:
            save_quantization(self.model, folder)  # qlora: a checkpoint's adapter loads on a 4-bit base too

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss; under `train.balance_by: loss` each answer token's loss times its row's
        weight. Written as the Trainer's loss times sum(w * ce) / sum(ce), the token losses `ce` of the
        labelled positions (the model returns logits for those only in training): the same value as a
        weighted token sum over the Trainer's own normaliser (tokens across accumulation and devices)."""
        weights = inputs.pop("sample_weight", None)
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if weights is not None and model.training:
            targets = inputs["labels"][:, 1:]
            keep = targets != -100
            rows = keep.nonzero()[:, 0]
            ce = torch.nn.functional.cross_entropy(
                outputs.logits.float(), targets[keep].to(outputs.logits.device), reduction="none"
            )
            w = weights.to(ce)[rows.to(ce.device)]
            loss = loss * (w * ce).sum() / ce.sum().clamp_min(1e-12)
        return (loss, outputs) if return_outputs else loss

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
