"""Stage 1 for a preset's random vision tower (`train.vision_pretrain`): the tower learns the photos first.

A real VLM's CLIP tower arrives pretrained; a preset's is random, and trained only through the
decoder's language-model loss it learns slowly (the demo catalog: 75-81% held-out category accuracy
after 28-34 epochs, README). Here the tower alone first learns to tell the training photos' `label`
values apart: its 2x2-merged patch features, mean-pooled, feed a linear head trained with
cross-entropy on augmented photos, with transformers' Trainer and the run's batch size, warmup,
weight decay, precision and workers. The head is then dropped; the model with the trained tower is
written once to RUN/vision-pretrained/ and the VLM run starts from it. Only training rows are used;
the validation rows measure the tower (`vision_pretrain.json`). An interrupted stage 1 starts over.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from torch import nn
from torch.utils.data import Dataset
from transformers import PrinterCallback, TrainerCallback, TrainingArguments, set_seed

from productvlm.config import Config
from productvlm.errors import UserError
from productvlm.inference.inputs import load_image, photo_tensors, to_model
from productvlm.prompting.templates import sample_name
from productvlm.run_folder import VISION_PRETRAINED
from productvlm.training.budget import time_budget
from productvlm.training.data import TrainingPhotos, balanced_sampler, loss_weights, row_weights, rows_of
from productvlm.training.model import freeze_unused_tower, load_model
from productvlm.training.progress import RichProgress
from productvlm.training.trainer import StageTrainer

RESULT = "vision_pretrain.json"
# Stage 1 ended "still climbing" when its validation accuracy over the last 3 epochs beat the 3 before by this
# much. Measured: the shipped recipe's numerals tower +4.6 points (79.7% after 26 epochs, 97.2% after 52);
# the demo's, fashion's, home's, close bags' and the long tail's +1.6 points at most.
CLIMBING = 0.02


class TowerClassifier(nn.Module):
    """The tower's 2x2-merged patch features, pooled over the patches, into a linear head over the label's
    values and, with `n_words`, a second one saying which common words the row's `words_from` column has.

    `pool` "max" keeps each feature's strongest patch: what tells two classes apart is often small (a
    printed glyph, a handle), and a mean over the 16 patches dilutes it and its gradient 16 times. But the
    decoder of stage 2 reads a max-trained tower's tokens less well (the class sits in a few of them), so
    the default "mean+max" trains both readings (README, Train: measured per catalog).
    """

    def __init__(self, embedding: nn.Module, n_classes: int, n_words: int = 0, pool: str = "mean+max"):
        super().__init__()
        self.embedding, self.pool = embedding, pool
        embedding.requires_grad_(False)
        embedding.img_processor.requires_grad_(True)  # the projector is not trained here
        width = 4 * embedding.image_dim_out * (2 if pool == "mean+max" else 1)
        self.head = nn.Linear(width, n_classes)
        self.words_head = nn.Linear(width, n_words) if n_words else None

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        words: torch.Tensor | None = None,
        sample_weight: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        features = self.embedding.crop_features(pixel_values).flatten(1, 2)
        if self.pool == "mean+max":
            pooled = torch.cat([features.mean(1), features.amax(1)], -1)
        else:
            pooled = features.amax(1) if self.pool == "max" else features.mean(1)
        logits = self.head(pooled)
        loss = None
        if labels is not None:  # sample_weight: each row's (train.balance_by: loss), mean 1 over the rows
            ce = nn.functional.cross_entropy(logits, labels, reduction="none")
            loss = (ce if sample_weight is None else ce * sample_weight).mean()
        if loss is not None and words is not None and self.words_head is not None:
            loss = loss + nn.functional.binary_cross_entropy_with_logits(self.words_head(pooled), words)
        return {"loss": loss, "logits": logits}


class LabelledPhotos(Dataset):
    """(photo, class index) per row, the photos as the VLM run's training feeds them (`TrainingPhotos`);
    with `words`, each row's multi-hot vector over the common words too; with `weights`, its loss weight."""

    def __init__(
        self,
        photos: TrainingPhotos,
        targets: list[int],
        words: torch.Tensor | None = None,
        weights: list[float] | None = None,
    ):
        self.photos, self.targets, self.words, self.weights = photos, targets, words, weights

    def set_epoch(self, epoch: int) -> None:
        self.photos.epoch = epoch

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"image": self.photos[i], "labels": self.targets[i]}
        if self.weights is not None:
            item["sample_weight"] = self.weights[i]
        return item if self.words is None else {**item, "words": self.words[i]}


def common_words(rows: list[dict[str, Any]], column: str, data_dir: Path) -> torch.Tensor | None:
    """Each row's multi-hot vector over the words (lowercased runs of letters) of `column` that at least
    1% of the rows (and 5) have; None when no word is that common. UserError naming a row without it."""
    words = []
    for row in rows:
        if not isinstance(row.get(column), str):
            raise UserError(
                f"train.vision_pretrain.words_from {column!r}: row {sample_name(row)} of {data_dir}/train "
                "has no text in that column"
            )
        words.append(set(re.findall(r"[^\W\d_]+", row[column].lower())))
    counts = Counter(w for ws in words for w in ws)
    vocab = sorted(w for w, n in counts.items() if n >= max(5, len(rows) // 100))
    if not vocab:
        return None
    index = {w: i for i, w in enumerate(vocab)}
    hot = torch.zeros(len(rows), len(vocab))
    for i, ws in enumerate(words):
        hot[i, [index[w] for w in ws if w in index]] = 1.0
    return hot


class GlobalViews:
    """Photos -> the processor's global view of each (the whole photo at crop size), plus labels."""

    def __init__(self, processor, num_crops: int):
        self.processor, self.num_crops = processor, num_crops

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixels = photo_tensors(self.processor, [f["image"] for f in features], self.num_crops)["pixel_values"]
        batch = {"pixel_values": pixels[:, 0], "labels": torch.tensor([f["labels"] for f in features])}
        if "words" in features[0]:
            batch["words"] = torch.stack([f["words"] for f in features])
        return {**batch, **row_weights(features)}


class Plateau(TrainerCallback):
    """After each epoch, the head's accuracy on the validation photos (the curve goes to RESULT); stops
    stage 1 after `patience` epochs without a better one (None: never, the curve is still kept)."""

    def __init__(self, measure, patience: int | None):
        self.measure, self.patience = measure, patience
        self.curve: list[float] = []

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self.curve.append(round(self.measure(), 4))
        model.train()
        if self.stopped_early:
            control.should_training_stop = True

    @property
    def stopped_early(self) -> bool:
        """`patience` epochs since the best one (the first of equals)."""
        return bool(self.patience and self.curve) and (
            len(self.curve) - 1 - self.curve.index(max(self.curve)) >= self.patience
        )


def label_values(rows: list[dict[str, Any]], label: str, data_dir: Path) -> list[str]:
    """The label's values in the training rows, sorted; UserError when a row lacks it or there is one value."""
    for row in rows:
        if label not in row:
            raise UserError(
                f"train.vision_pretrain.label {label!r}: row {sample_name(row)} of {data_dir}/train has no "
                f"such column; columns: {', '.join(sorted(row))}"
            )
    values = sorted({str(r[label]) for r in rows})
    if len(values) < 2:
        raise UserError(
            f"train.vision_pretrain.label {label!r}: the train split of {data_dir} has one value "
            f"({values[0]!r}); the tower needs at least two to tell apart"
        )
    return values


class ValidationPhotos:
    """The validation rows whose label the head knows, their photos as the head sees them, collated
    once (not augmented); `accuracy(model)` is the share the head classifies right."""

    def __init__(self, rows, targets: list[int], collate: GlobalViews, batch: int = 64):
        self.rows = rows
        self.batches = [
            collate(
                [
                    {"image": load_image(r["image_path"]), "labels": t}
                    for r, t in zip(rows[i : i + batch], targets[i:])
                ]
            )
            for i in range(0, len(rows), batch)
        ]

    @torch.no_grad()
    def accuracy(self, model: TowerClassifier) -> float:
        model.eval()
        right = 0
        for batch in self.batches:
            inputs = to_model(batch, model)
            right += int((model(inputs["pixel_values"])["logits"].argmax(-1) == inputs["labels"]).sum())
        return right / len(self.rows)


def validation_photos(cfg: Config, processor, index: dict[str, int]) -> ValidationPhotos | None:
    """The validation rows whose label value the head knows (`index`: value -> class), or None."""
    label = cfg.train.vision_pretrain.label
    rows = [r for r in rows_of(cfg, "validation") if str(r.get(label)) in index]
    if not rows:
        return None
    return ValidationPhotos(
        rows, [index[str(r[label])] for r in rows], GlobalViews(processor, cfg.data.num_crops)
    )


def pretrain_vision(cfg: Config, run: Path, base: str, args: TrainingArguments, progress: bool = True) -> str:
    """RUN/vision-pretrained, made once from the model in `base`; `args` are the run's Trainer arguments.
    Every process calls it (the Trainer spreads stage 1 over them); the main one writes the folder."""
    out = run / VISION_PRETRAINED
    if (out / RESULT).is_file():
        return str(out)
    t0, v, t = time.perf_counter(), cfg.train.vision_pretrain, cfg.train
    model, processor = load_model(cfg, base, quantized=False)  # qlora quantizes the tower after stage 1
    rows = rows_of(cfg, "train")[: cfg.data.max_train_rows]
    classes = label_values(rows, v.label, cfg.data.dir)
    index = {c: i for i, c in enumerate(classes)}
    crop_size = processor.image_processor.crop_size
    photos = LabelledPhotos(
        TrainingPhotos(
            [r["image_path"] for r in rows],
            cfg.data.augment,
            t.seed,
            cfg.data.num_crops,
            crop_size,
            cfg.data.blank_images,  # the no-image control learns nothing here either
        ),
        [index[str(r[v.label])] for r in rows],
        common_words(rows, v.words_from, cfg.data.dir) if v.words_from else None,
        loss_weights(t, rows, f"{cfg.data.dir}/train"),
    )
    set_seed(t.seed)
    n_words = 0 if photos.words is None else photos.words.shape[1]
    classifier = TowerClassifier(model.model.vision_embed_tokens, len(classes), n_words, v.pool)
    freeze_unused_tower(model)
    validation = validation_photos(cfg, processor, index)
    plateau = Plateau(lambda: validation.accuracy(classifier), v.patience) if validation else None
    scratch = run / ".vision-pretrain"
    args = dataclasses.replace(
        args,
        output_dir=str(scratch),
        learning_rate=v.lr,
        num_train_epochs=v.epochs,
        max_steps=-1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        activation_checkpointing=False,
    )
    bar = RichProgress("vision pretrain") if progress else None
    trainer = StageTrainer(
        model=classifier,
        args=args,
        train_dataset=photos,
        data_collator=GlobalViews(processor, cfg.data.num_crops),
        sampler=balanced_sampler(t, rows, f"{cfg.data.dir}/train"),
        budget=time_budget(v.max_minutes),
        callbacks=[*([plateau] if plateau else [])],
    )
    if bar:
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(bar)
    try:
        output = trainer.train()
    finally:
        if bar:
            bar.close()
    state = PartialState()
    if state.is_main_process:
        result = {
            "label": v.label,
            "classes": len(classes),
            "words": n_words,
            "pool": v.pool,
            "epochs": v.epochs,
            "epochs_run": round(trainer.state.epoch or 0, 2),
            "stopped_by": stopped_by(trainer, plateau),
            "steps": output.global_step,
            "train_loss": output.training_loss,
            "seconds": round(time.perf_counter() - t0, 1),
            **validation_figures(validation, classifier, rows, v.label, plateau),
        }
        gain = still_climbing(result.get("validation_curve", []), result["stopped_by"])
        if gain is not None:
            result["still_climbing"] = round(gain, 4)
        tmp = run / f".{VISION_PRETRAINED}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / RESULT).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(out, ignore_errors=True)  # a folder without its RESULT is not a finished stage 1
        tmp.rename(out)
        shutil.rmtree(scratch, ignore_errors=True)
        print(describe(result), flush=True)
    state.wait_for_everyone()
    return str(out)


def stopped_by(trainer: StageTrainer, plateau: Plateau | None) -> str:
    if plateau is not None and plateau.stopped_early:
        return "plateau"
    if trainer.budget is not None and trainer.budget.fraction() >= 1.0:
        return "time"
    return "epochs"


def still_climbing(curve: list[float], stopped_by: str) -> float | None:
    """The rise of the head's validation accuracy from the 3 epochs before the last 3 to the last 3 (their
    means) when stage 1 ended on its time or epochs and that rise is at least CLIMBING; else None."""
    if stopped_by == "plateau" or len(curve) < 6:
        return None
    gain = sum(curve[-3:]) / 3 - sum(curve[-6:-3]) / 3
    return gain if gain >= CLIMBING else None


def climbing_hint(gain: float) -> str:
    return (
        f"the tower was still learning when stage 1 ended (+{100 * gain:.1f} points over its last 3 epochs): "
        "give it more time (train.vision_pretrain.max_minutes, epochs; README, Train)"
    )


def validation_figures(
    validation: ValidationPhotos | None,
    classifier: TowerClassifier,
    train_rows,
    label: str,
    plateau: Plateau | None,
) -> dict[str, Any]:
    """The head's accuracy on the validation photos beside always guessing the most common value of
    `train_rows`, and the per-epoch curve (empty when no validation row has a known label)."""
    if validation is None:
        return {}
    common = Counter(str(r[label]) for r in train_rows).most_common(1)[0][0]
    return {
        "validation_rows": len(validation.rows),
        "validation_accuracy": validation.accuracy(classifier),
        "validation_majority": sum(str(r[label]) == common for r in validation.rows) / len(validation.rows),
        "validation_curve": plateau.curve if plateau else [],
    }


def describe(result: dict[str, Any]) -> str:
    epochs = result.get("epochs_run", result["epochs"])
    why = {"plateau": " (stopped: validation plateau)", "time": " (stopped: time budget)"}.get(
        result.get("stopped_by"), ""
    )
    line = f"vision pretrain: {epochs:g} epochs{why}, {result['steps']} steps, {result['seconds']:.0f}s"
    if "validation_accuracy" in result:
        line += (
            f"; the tower tells {result['label']} apart on {result['validation_rows']} validation photos: "
            f"{result['validation_accuracy']:.3f} (majority {result['validation_majority']:.3f})"
        )
    if "still_climbing" in result:
        line += f"; {climbing_hint(result['still_climbing'])}"
    return line


__all__ = ["pretrain_vision", "TowerClassifier", "RESULT", "climbing_hint"]
