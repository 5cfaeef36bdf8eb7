"""`train(cfg)`: the whole run, from config to RUN/final, resumable from the latest complete checkpoint."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import PrinterCallback, TrainerCallback, TrainingArguments, set_seed

from productvlm.config import Config
from productvlm.errors import UserError
from productvlm.models.loading import (
    DTYPES,
    EXTRA_TRAINABLES,
    load_extra_trainables,
    load_merged,
    save_quantization,
)
from productvlm.prompting.settings import PromptSettings
from productvlm.run_folder import CHECKPOINTS, FINAL, LOG, SAMPLES
from productvlm.training.callbacks import EvalAtEnd, JsonlLog, LogConfig
from productvlm.training.checkpoints import best_checkpoint, complete_checkpoints, load_weights, truncate_log
from productvlm.training.data import (
    CatalogDataset,
    Collator,
    PackCollator,
    PackedDataset,
    loss_weights,
    make_encoder,
    padding_share,
    rows_of,
)
from productvlm.training.memory import check_fits, resolve_checkpointing
from productvlm.training.model import apply_method, extra_trainables, load_model, model_dir
from productvlm.training.progress import RichProgress
from productvlm.training.tracking import finish_tracking, setup_tracking
from productvlm.training.trainer import RunTrainer

CALIBRATION_ROWS = 2000  # validation rows the confidence calibration is fitted on (at most)


@dataclass
class RunResult:
    run_dir: Path
    final_dir: Path
    steps: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: Path | None = None
    data: dict[str, float] = field(default_factory=dict)


def prepare_run_dir(cfg: Config, resume: bool) -> tuple[Path, Path | None]:
    """Check the run folder against --resume; write config.yaml. Returns (run, checkpoint to resume)."""
    run = Path(cfg.output_dir)
    config_file = run / "config.yaml"
    checkpoint = None
    if resume:
        if not config_file.is_file():
            raise UserError(
                f"--resume: {run} is not a run folder (no config.yaml); drop --resume to start it"
            )
        checkpoints = complete_checkpoints(run / CHECKPOINTS)
        checkpoint = checkpoints[-1] if checkpoints else None
        if config_file.read_text(encoding="utf-8") != cfg.to_yaml():
            raise UserError(
                f"--resume: the config differs from {config_file}; resume with the same config "
                "(or choose a new output_dir)"
            )
    elif config_file.is_file():
        raise UserError(f"output_dir {run} already holds a run: pass --resume, or choose another output_dir")
    run.mkdir(parents=True, exist_ok=True)
    config_file.write_text(cfg.to_yaml(), encoding="utf-8")
    return run, checkpoint


def cpu_only() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return not (accelerator.is_available() if accelerator else torch.cuda.is_available())


def gradient_checkpointing(cfg: Config, memory: int | None = None) -> bool:
    """train.gradient_checkpointing, with `auto` resolved by the memory plan (training/memory.py): on only
    when the run without it would need more than 90% of the GPU (`memory`, default: the CUDA device's or
    PRODUCTVLM_GPU_MEMORY_GB), off on a CPU. Recomputing costs ~30% of a step, which a run that fits
    should not pay."""
    return resolve_checkpointing(cfg, memory)


def optimizer_name(optim: str) -> str:
    """train.optim -> TrainingArguments.optim (auto: fused AdamW on CUDA; the 8-bit ones are bitsandbytes')."""
    if optim == "auto":
        return "adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch"
    return {"adamw_8bit": "adamw_bnb_8bit"}.get(optim, optim)


def training_args(cfg: Config, run: Path, report_to: list[str], eval_on: bool = True) -> TrainingArguments:
    """`eval_on`: there are validation rows to generate on (a split can be empty)."""
    t = cfg.train
    eval_on = eval_on and cfg.eval.subset > 0
    ours = dict(
        output_dir=str(run / CHECKPOINTS),
        run_name=cfg.tracking.run_name or run.name,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        lr_scheduler_type={"constant": "constant_with_warmup"}.get(t.schedule, t.schedule),
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        activation_checkpointing=gradient_checkpointing(cfg),
        optim=optimizer_name(t.optim),
        activation_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # rotation is ours (the checkpoints are renamed into place)
        eval_strategy="steps" if eval_on else "no",
        eval_steps=cfg.eval.steps,
        logging_steps=t.log_steps,
        report_to=report_to,
        remove_unused_columns=False,
        dataloader_num_workers=t.num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=cpu_only(),  # without it, accelerate ignores torchrun on a machine with no accelerator
        disable_tqdm=True,
    )
    # train.trainer_args: any other Trainer option (config.py refused the fields ours set, by name)
    try:
        return TrainingArguments(**ours, **t.trainer_args)
    except (TypeError, ValueError) as e:
        if not t.trainer_args:
            raise
        raise UserError(f"train.trainer_args: transformers.TrainingArguments refused them: {e}") from None


def train(
    cfg: Config, resume: bool = False, callbacks: list[TrainerCallback] | None = None, progress: bool = True
) -> RunResult:
    """Run `cfg` to RUN/final. Under torchrun/accelerate launch every process calls this; the main
    process owns the run folder (config, base model, logs, final model)."""
    t0 = time.perf_counter()
    state = PartialState(cpu=cpu_only())  # under torchrun, sets up the process group
    check_fits(cfg)  # on a GPU: a run that cannot fit stops here, before the run folder and any weights
    with state.main_process_first():
        if state.is_main_process:
            run, checkpoint = prepare_run_dir(cfg, resume)
        else:
            run = Path(cfg.output_dir)
            found = complete_checkpoints(run / CHECKPOINTS) if resume else []
            checkpoint = found[-1] if found else None
        report_to = setup_tracking(cfg.tracking, run)
        base = model_dir(cfg, run)
    if cfg.train.vision_pretrain.epochs:
        from productvlm.training.vision_pretrain import pretrain_vision

        base = pretrain_vision(cfg, run, base, training_args(cfg, run, [], eval_on=False), progress)
    with state.main_process_first():
        set_seed(cfg.train.seed)
        model, processor = load_model(cfg, base)
    use_cache = model.config.use_cache  # Trainer turns it off for training; the final model gets it back
    encoder = make_encoder(cfg, processor)
    train_rows = rows_of(cfg, "train")[: cfg.data.max_train_rows]
    train_ds, collator, data = datasets(
        cfg,
        CatalogDataset(
            train_rows,
            encoder,
            cfg.data.blank_images,
            cfg.data.augment,
            cfg.train.seed,
            loss_weights(cfg.train, train_rows, f"{cfg.data.dir}/train"),
        ),
        processor,
    )
    eval_rows = rows_of(cfg, "validation")[: cfg.eval.subset]
    set_seed(cfg.train.seed)  # LoRA init
    model = apply_method(model, cfg)
    if state.is_main_process:
        if resume:
            step = int(checkpoint.name.split("-")[1]) if checkpoint else 0
            truncate_log(run / LOG, step)
            truncate_log(run / SAMPLES, step)
        else:
            line = {"step": 0, **{f"data/{k}": v for k, v in data.items()}, **stage_one(base)}
            with open(run / LOG, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
    if checkpoint:  # the Trainer restores the weights an adapter file holds; the ones beside it are ours
        load_extra_trainables(model, checkpoint)
    bar = RichProgress() if progress else None
    trainer = RunTrainer(
        model=model,
        args=training_args(cfg, run, report_to, eval_on=bool(eval_rows)),
        train_dataset=train_ds,
        eval_dataset=eval_rows or None,
        data_collator=collator,
        processing_class=processor,
        callbacks=[
            JsonlLog(run / LOG),
            LogConfig(cfg, run, data),
            EvalAtEnd(bool(eval_rows)),
            *([bar] if bar else []),
            *(callbacks or []),
        ],
        run_cfg=cfg,
        eval_rows=eval_rows,
    )
    if bar:
        trainer.remove_callback(PrinterCallback)  # the rich bar shows loss and eval metrics instead
    try:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        if bar:
            bar.close()  # also when training stops with an error
        finish_tracking(cfg.tracking)
    metrics = next((h for h in reversed(trainer.state.log_history) if "eval_n" in h), {})
    if cfg.eval.select == "best":
        metrics = load_best(trainer, cfg, run, state.is_main_process) or metrics
    final = save_final(trainer, processor, cfg, run, use_cache)
    if state.is_main_process and eval_rows:
        calibrate_final(final, cfg, progress)
        metrics.update(compare_stages(run, base, final, output.global_step))
    return RunResult(
        run,
        final,
        output.global_step,
        time.perf_counter() - t0,
        {**output.metrics, **metrics},
        checkpoint,
        data,
    )


def calibrate_final(final: Path, cfg: Config, progress: bool = True) -> Path:
    """RUN/final/calibration.json: the answers' per-field confidence calibrated on the validation split
    (up to CALIBRATION_ROWS rows; README, "Confidence"), so predict and serve say how sure they are."""
    from productvlm.inference.predictor import Predictor
    from productvlm.prompting.confidence import CALIBRATION_FILE

    if (final / CALIBRATION_FILE).is_file():  # a finished run trained again: already calibrated
        return final / CALIBRATION_FILE
    predictor = Predictor(final, max_new_tokens=cfg.eval.max_new_tokens)
    rows = rows_of(cfg, "validation")[:CALIBRATION_ROWS]
    return predictor.calibrate(rows, cfg.eval.batch_size, progress, data=str(cfg.data.dir)).save(final)


def compare_stages(run: Path, base: str, final: Path, step: int) -> dict[str, float]:
    """Stage 1's tower (its head) and the finished model, on the validation photos, side by side: printed,
    logged to train_log.jsonl and returned (empty without stage 1 or a calibration)."""
    from productvlm.prompting.confidence import load_calibration

    tower, calibration = stage_one(base), load_calibration(final)
    if "vision_pretrain/validation_accuracy" not in tower or calibration is None:
        return {}
    curve = calibration.curves["category"]
    figures = {
        "stage1_tower_validation_accuracy": tower["vision_pretrain/validation_accuracy"],
        "final_validation_category_accuracy": curve[-1][1],  # the curve's last point: every row
    }
    line = {"step": step, **figures}
    with open(run / LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
    print(
        f"category accuracy on the validation photos: stage 1 tower {figures['stage1_tower_validation_accuracy']:.1%} "
        f"({tower['vision_pretrain/validation_rows']:.0f} photos), the trained model "
        f"{figures['final_validation_category_accuracy']:.1%} ({calibration.rows} photos)",
        flush=True,
    )
    if "vision_pretrain/still_climbing" in tower:
        from productvlm.training.vision_pretrain import climbing_hint

        print(climbing_hint(tower["vision_pretrain/still_climbing"]), flush=True)
    return figures


def stage_one(base: str) -> dict[str, float]:
    """The tower's stage-1 figures (`vision_pretrain/validation_accuracy`, ...) when the run starts from one."""
    from productvlm.training.vision_pretrain import RESULT

    result = Path(base) / RESULT
    if not result.is_file():
        return {}
    figures = json.loads(result.read_text(encoding="utf-8"))
    return {f"vision_pretrain/{k}": v for k, v in figures.items() if isinstance(v, (int, float))}


def load_best(trainer: RunTrainer, cfg: Config, run: Path, main: bool) -> dict[str, float] | None:
    """Load the best evaluated checkpoint's weights into the trainer's model (for RUN/final) and say
    which step won, in train_log.jsonl and on the console. Returns that eval's log entry."""
    best = best_checkpoint(Path(trainer.args.output_dir), trainer.state.log_history, cfg.eval.metric)
    if best is None:
        return None
    path, entry = best
    last = trainer.state.global_step
    if entry["step"] != last:
        load_weights(trainer.model, path)
    if main:
        metric = cfg.eval.metric
        line = {"step": last, "selected_step": entry["step"], "selected_by": metric}
        line.update({f"selected_{k}": v for k, v in entry.items() if k.startswith("eval_")})
        with open(run / LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        mape = entry.get("eval_price_mape")
        print(
            f"RUN/final = step {entry['step']} of {last} (best eval_{metric} {entry[f'eval_{metric}']:.4g}"
            + (f", price MAPE {mape:.4g}" if mape is not None else "")
            + ")",
            flush=True,
        )
    return entry


def datasets(cfg: Config, samples: CatalogDataset, processor):
    """The train dataset and collator (packed or not) and what one epoch's batches look like."""
    t = cfg.train
    lengths = samples.lengths
    data = {
        "samples": len(samples),
        "tokens": sum(lengths),
        "padding_share": padding_share(
            lengths,
            t.batch_size,
            group_by_length=t.group_by_length,
            packing=t.packing,
            pack_length=t.pack_length,
            seed=t.seed,
        ),
    }
    if not t.packing:
        return samples, Collator(processor, cfg.data.num_crops), data
    packed = PackedDataset(samples, t.pack_length, t.seed)
    data["packs"] = len(packed)
    return packed, PackCollator(processor, cfg.data.num_crops), data


def save_final(trainer: RunTrainer, processor, cfg: Config, run: Path, use_cache: bool = True) -> Path:
    """RUN/final in the official layout: full weights, or (LoRA) the adapter, plus merged weights
    when train.merge_final. Written by the main process under a temporary name, renamed into place."""
    from peft import PeftModel

    final, tmp = run / FINAL, run / f".{FINAL}.tmp"
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        trainer.accelerator.wait_for_everyone()
        return final
    shutil.rmtree(tmp, ignore_errors=True)
    model = trainer.accelerator.unwrap_model(trainer.model)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    base.config.use_cache = use_cache
    if isinstance(model, PeftModel):
        adapter = tmp / "adapter" if cfg.train.merge_final else tmp
        model.save_pretrained(adapter)
        processor.save_pretrained(adapter)
        PromptSettings.from_config(cfg).save(adapter)
        save_quantization(base, adapter)
        extra = extra_trainables(model)
        if extra:
            from safetensors.torch import save_file

            save_file(extra, adapter / EXTRA_TRAINABLES)
        if cfg.train.merge_final and cfg.train.method == "qlora":
            # into the base's own weights, freshly loaded, not the 4-bit ones the adapter trained on
            model = load_merged(adapter)[0].to(DTYPES[cfg.model.dtype])
            model.config.use_cache = use_cache
        elif cfg.train.merge_final:
            model = model.merge_and_unload()
    if not isinstance(model, PeftModel):
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        PromptSettings.from_config(cfg).save(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    trainer.accelerator.wait_for_everyone()
    return final


__all__ = ["RunResult", "train", "save_final", "training_args", "prepare_run_dir"]
