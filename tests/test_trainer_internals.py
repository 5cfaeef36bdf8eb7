"""The transformers Trainer internals we rely on (README, Train: "Trainer internals we rely on").

`RunTrainer` overrides one private Trainer method; a transformers release that renames it or changes
its signature would otherwise silently fall back to the default (and lose length grouping). These
tests fail loudly instead, and check that the Trainer really builds its DataLoader through it and
that the epoch reaches the data through the public `on_epoch_begin` hook.
"""

from __future__ import annotations

import inspect

import torch
import transformers
from torch.utils.data import Dataset
from transformers import Trainer

from productvlm.config import load_config
from productvlm.training.data import length_grouped_order
from productvlm.training.run import training_args
from productvlm.training.trainer import RunTrainer
from test_train_run import CONFIGS

# private Trainer method -> the parameters we override it with (tested on transformers 5.24)
PRIVATE_OVERRIDES = {"_get_train_sampler": ["self", "train_dataset"]}


def test_the_private_methods_we_override_still_exist_with_our_signature():
    for name, params in PRIVATE_OVERRIDES.items():
        where = f"transformers {transformers.__version__}: Trainer.{name}"
        assert hasattr(Trainer, name), f"{where} is gone; RunTrainer's override is dead code (README, Train)"
        assert list(inspect.signature(getattr(Trainer, name)).parameters) == params, f"{where} changed"


def test_every_private_override_is_listed():
    private = {n for n in vars(RunTrainer) if n.startswith("_") and not n.startswith("__")}
    assert {n for n in private if hasattr(Trainer, n)} == set(PRIVATE_OVERRIDES)


class Lengths(Dataset):
    """Sample i is its own index; its length is lengths[i]; it remembers the epoch it was told."""

    def __init__(self, lengths: list[int]):
        self.lengths, self.epoch = lengths, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> int:
        return i


def test_the_trainer_batches_in_our_length_order_and_tells_the_data_the_epoch(tmp_path):
    cfg = load_config(
        CONFIGS / "tiny-cpu.yaml",
        [f"output_dir={tmp_path}", "train.group_by_length=true", "train.batch_size=4", "train.num_workers=0"],
    )
    lengths = [(i * 37) % 101 for i in range(40)]
    data = Lengths(lengths)
    trainer = RunTrainer(
        model=torch.nn.Linear(1, 1),
        args=training_args(cfg, tmp_path, [], eval_on=False),
        train_dataset=data,
        data_collator=torch.tensor,
        run_cfg=cfg,
        eval_rows=[],
    )
    order = torch.cat(list(trainer.get_train_dataloader())).tolist()
    assert order == length_grouped_order(lengths, 4, cfg.train.seed)  # the DataLoader uses our sampler

    trainer.state.epoch = 2.5  # a run resumed in the middle of epoch 2
    trainer.callback_handler.on_epoch_begin(trainer.args, trainer.state, trainer.control)
    assert data.epoch == 2
    assert list(trainer.length_sampler) == length_grouped_order(lengths, 4, cfg.train.seed + 2)
