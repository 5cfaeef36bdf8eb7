"""Catalog rows -> training samples: prompt + answer ids, labels only on the answer, batched with images.

One sample is `<prompt with image slots><answer><|end|>`; labels are -100 on the prompt, the image
slots and the padding, so the loss is on the answer tokens and the closing `<|end|>` only. Token
counts are computed from the image size alone (no pixel decoding), which gives the per-sample
budget check up front and the lengths for length-grouped batching and packing.

Packing (`train.packing`) puts several samples into one row of up to `train.pack_length` tokens.
A packed batch carries `position_ids` that restart at 0 for every sample and no attention_mask:
transformers' masking utilities (`find_packed_sequence_indices`) then build a block-diagonal
causal mask from the restarts, so no token attends across samples, and RoPE (LongRoPE included,
which picks its factors from the largest position) sees each sample's own positions. The loss is
the same token mean as in a padded batch of the same samples (tested, with the gradients).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from productvlm.config import Config
from productvlm.data.folder import read_split
from productvlm.errors import UserError
from productvlm.inference.inputs import image_size, load_image, photo_tensors, prompt_ids
from productvlm.prompting.templates import END, render, sample_name
from productvlm.training.augment import at_model_size, augment, sample_rng

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    """A sample's token ids and labels; the pixels are loaded when the sample is batched."""

    input_ids: list[int]
    labels: list[int]
    image_path: str

    def __len__(self) -> int:
        return len(self.input_ids)


class Encoder:
    """Turns catalog rows into `Encoded` samples with the run's templates, num_crops and token budget.

    The prompt part is built as at inference (`inference.inputs.prompt_ids`); the answer, its labels
    and the per-sample budget are training's."""

    def __init__(self, processor, prompt: str, answer: str, num_crops: int, max_tokens: int):
        self.processor, self.prompt, self.answer = processor, prompt, answer
        self.num_crops, self.max_tokens = num_crops, max_tokens
        self.end_id = processor.tokenizer.convert_tokens_to_ids(END)

    def prompt_ids(self, row: dict[str, Any]) -> list[int]:
        text = render(self.prompt, row, "prompt")
        return prompt_ids(self.processor, text, [image_size(row["image_path"])], self.num_crops)

    def answer_ids(self, row: dict[str, Any]) -> list[int]:
        text = render(self.answer, row, "answer")
        return self.processor.tokenizer(text, add_special_tokens=False).input_ids + [self.end_id]

    def __call__(self, row: dict[str, Any]) -> Encoded:
        prompt, answer = self.prompt_ids(row), self.answer_ids(row)
        n = len(prompt) + len(answer)
        if n > self.max_tokens:
            raise UserError(
                f"sample {sample_name(row)} has {n} tokens, over data.max_tokens_per_sample={self.max_tokens}: "
                "lower data.num_crops or raise the budget"
            )
        return Encoded(prompt + answer, [IGNORE] * len(prompt) + answer, row["image_path"])


class CatalogDataset(Dataset):
    """Encoded samples; `lengths` (tokens per sample) feed the length-grouped sampler."""

    def __init__(
        self,
        rows: list[dict[str, Any]],
        encoder: Encoder,
        blank_images: bool = False,
        augment=None,
        seed: int = 0,
        weights: list[float] | None = None,
    ):
        self.rows, self.weights = rows, weights
        self.samples = [encoder(row) for row in rows]
        self.photos = TrainingPhotos(
            [s.image_path for s in self.samples],
            augment,
            seed,
            encoder.num_crops,
            encoder.processor.image_processor.crop_size,
            blank_images,
        )

    def set_epoch(self, epoch: int) -> None:
        """Augmentation draws depend on (seed, epoch, index); set before each epoch's DataLoader starts."""
        self.photos.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.samples]

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        item = {"input_ids": s.input_ids, "labels": s.labels, "image": self.photos[i]}
        return item if self.weights is None else {**item, "sample_weight": self.weights[i]}


KEEP_PHOTOS_BYTES = 1 << 30


class TrainingPhotos:
    """The photos a training dataset feeds, by index: as on disk (or blank), or with `augment`
    (a data.augment config or None) enabled warped per (seed, epoch, index), so that every DataLoader
    worker and a `--resume` draw the same. When augmenting, the photos are decoded and resized to the
    model's size once and kept (`kept`) if they cannot take over 1 GiB: decoding and resizing cost
    ~2 ms a photo, as much as a preset's whole tower step per photo; a real model's 336 px multi-crop
    photos are decoded per step instead."""

    def __init__(
        self, paths: Sequence[str], augment_cfg, seed: int, num_crops: int, crop_size: int, blank: bool
    ):
        self.paths, self.augment, self.seed, self.epoch = list(paths), augment_cfg, seed, 0
        self.num_crops, self.crop_size, self.blank = num_crops, crop_size, blank
        self.augmenting = augment_cfg is not None and augment_cfg.enabled and not blank
        self.kept = None
        if self.augmenting and len(self.paths) * num_crops * crop_size**2 * 3 <= KEEP_PHOTOS_BYTES:
            self.kept = [self.at_model_size(i) for i in range(len(self.paths))]

    def at_model_size(self, index: int):
        return at_model_size(load_image(self.paths[index]), self.num_crops, self.crop_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        if not self.augmenting:
            return load_image(self.paths[index], self.blank)
        image = self.kept[index] if self.kept is not None else self.at_model_size(index)
        return augment(image, self.augment, sample_rng(self.seed, self.epoch, index))


def row_weights(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """{"sample_weight": each row's loss weight} when the rows carry one (`train.balance_by: loss`), else {}."""
    if "sample_weight" not in features[0]:
        return {}
    return {"sample_weight": torch.tensor([f["sample_weight"] for f in features], dtype=torch.float32)}


class Collator:
    """Pads ids (right: pad id, labels -100) and turns the batch's images into pixel_values/image_sizes."""

    def __init__(self, processor, num_crops: int, padding_side: str = "right"):
        self.processor, self.num_crops, self.side = processor, num_crops, padding_side

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.processor.pad([f["input_ids"] for f in features], self.side)
        labels = torch.full_like(batch["input_ids"], IGNORE)
        for i, f in enumerate(features):
            n = len(f["labels"])
            span = slice(0, n) if self.side == "right" else slice(labels.shape[1] - n, None)
            labels[i, span] = torch.tensor(f["labels"])
        images = photo_tensors(self.processor, [f["image"] for f in features], self.num_crops)
        return {**batch, "labels": labels, **images, **row_weights(features)}


# ---------------------------------------------------------------- packing


def pack_samples(lengths: Sequence[int], pack_length: int, seed: int) -> list[list[int]]:
    """Sample indices grouped into packs of at most `pack_length` tokens (first-fit decreasing).

    Longest first, each into the first pack with room: close to the fewest packs, and a pure
    function of (lengths, pack_length, seed); the seed orders samples of equal length, so packs
    differ between seeds. The packs are fixed for the run (the sampler shuffles them each epoch),
    which keeps the number of steps per epoch constant and a resumed run's batches the same.
    """
    g = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(len(lengths), generator=g).tolist()
    order = sorted(shuffled, key=lambda i: -lengths[i])  # stable: ties keep the seeded order
    packs: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if lengths[i] > pack_length:
            raise ValueError(f"sample {i} has {lengths[i]} tokens, over pack_length={pack_length}")
        slot = next((k for k, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            packs.append([i])
            room.append(pack_length - lengths[i])
        else:
            packs[slot].append(i)
            room[slot] -= lengths[i]
    return packs


class PackedDataset(Dataset):
    """Packs of `CatalogDataset` samples; an item is `{"pack": [sample, ...]}` for `PackCollator`."""

    def __init__(self, samples: CatalogDataset, pack_length: int, seed: int):
        self.samples = samples
        self.packs = pack_samples(samples.lengths, pack_length, seed)

    def set_epoch(self, epoch: int) -> None:
        self.samples.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.packs)

    @property
    def lengths(self) -> list[int]:
        sizes = self.samples.lengths
        return [sum(sizes[i] for i in pack) for pack in self.packs]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"pack": [self.samples[j] for j in self.packs[i]]}


class PackCollator(Collator):
    """Concatenates each pack's samples into one row; rows are right-padded to the longest.

    `position_ids` restart at 0 at every sample; padding tokens all get position 0, which makes each
    one a segment of its own (it attends only to itself, has no labels, and cannot raise the
    largest position, from which LongRoPE picks its factors for the whole batch). No attention_mask is returned:
    with one, transformers would not look for packed segments. Labels are -100 on each sample's
    first token, so the last token of a sample is never trained to predict the next sample.
    pixel_values hold every image of the batch in row order, which is the order of the image
    slots that `Phi3VModel.embed` fills.
    """

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [f["pack"] for f in features]
        width = max(sum(len(s["input_ids"]) for s in row) for row in rows)
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.processor.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        for b, row in enumerate(rows):
            at = 0
            for s in row:
                n = len(s["input_ids"])
                input_ids[b, at : at + n] = torch.tensor(s["input_ids"])
                labels[b, at + 1 : at + n] = torch.tensor(s["labels"][1:])
                position_ids[b, at : at + n] = torch.arange(n)
                at += n
        images = photo_tensors(self.processor, [s["image"] for row in rows for s in row], self.num_crops)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, **images}


# ---------------------------------------------------------------- batch order and padding


def length_grouped_order(lengths: Sequence[int], group_size: int, seed: int) -> list[int]:
    """transformers' length-grouped order (megabatches of 50 groups, sorted longest first), seeded."""
    g = torch.Generator().manual_seed(seed)
    return get_length_grouped_indices(list(lengths), group_size, generator=g)


def padding_share(
    lengths: Sequence[int],
    batch_size: int,
    *,
    group_by_length: bool = False,
    packing: bool = False,
    pack_length: int = 4096,
    seed: int = 0,
) -> float:
    """Share of the token slots in one epoch's batches that are padding (computed for nothing).

    `lengths` are tokens per sample (`CatalogDataset.lengths`). Batches follow the training order:
    random (`group_by_length=False`), length-grouped, or, with `packing`, packs of up to
    `pack_length` tokens in random order; every row is padded to its batch's longest row.
    """
    if not lengths:
        return 0.0
    if packing:
        packs = pack_samples(lengths, pack_length, seed)
        lengths = [sum(lengths[i] for i in pack) for pack in packs]
    if group_by_length:
        order = length_grouped_order(lengths, batch_size, seed)
    else:
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    slots = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1.0 - sum(lengths) / slots


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


def label_weights(labels: Sequence[str], power: float) -> torch.Tensor:
    """count(label)^-power per row, scaled to a mean of 1 over the rows (`train.balance`): power 0 weighs
    every row alike, 1 every label value alike, 0.5 halfway in the log (a value 100x rarer weighs 10x
    less in all instead of 100x)."""
    counts = Counter(labels)
    weights = torch.tensor([counts[label] ** -power for label in labels], dtype=torch.float64)
    return weights / weights.mean()


class BalancedSampler(torch.utils.data.Sampler):
    """Rows drawn with replacement by their `label_weights` (`train.balance_by: sampling`). One epoch is
    len(labels) draws, in an order that depends only on (seed, epoch), so a resumed run replays it."""

    def __init__(self, labels: Sequence[str], power: float, seed: int):
        self.weights = label_weights(labels, power)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.multinomial(self.weights, len(self.weights), True, generator=generator).tolist())


def balance_labels(t, rows: list[dict[str, Any]], where: str) -> list[str] | None:
    """Each row's `train.balance_label` value when train.balance is on (else None); UserError naming the
    first row without it."""
    if not t.balance:
        return None
    for row in rows:
        if t.balance_label not in row:
            raise UserError(
                f"train.balance_label {t.balance_label!r}: row {sample_name(row)} of {where} has no such column"
            )
    return [str(row[t.balance_label]) for row in rows]


def balanced_sampler(t, rows: list[dict[str, Any]], where: str) -> BalancedSampler | None:
    """`train.balance`'s sampler over `rows` (None when it is 0 or weighs the loss instead)."""
    labels = balance_labels(t, rows, where) if t.balance_by == "sampling" else None
    return None if labels is None else BalancedSampler(labels, t.balance, t.seed)


def loss_weights(t, rows: list[dict[str, Any]], where: str) -> list[float] | None:
    """Each row's loss weight under `train.balance_by: loss` (None otherwise)."""
    labels = balance_labels(t, rows, where) if t.balance_by == "loss" else None
    return None if labels is None else label_weights(labels, t.balance).tolist()
