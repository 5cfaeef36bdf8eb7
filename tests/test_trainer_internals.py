"""The transformers Trainer internals we rely on (README, Train: "Trainer internals we rely on").

`RunTrainer` overrides two private Trainer methods; a transformers release that renames one or changes
its signature would otherwise silently fall back to the default (and lose length grouping, or resume
bf16 LoRA adapters in fp32). These
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
PRIVATE_OVERRIDES = {
    "_get_train_sampler": ["self", "train_dataset"],
    "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"],
}


def test_the_private_methods_we_override_still_exist_with_our_signature():
    for name, params in PRIVATE_OVERRIDES.items():
        where = f"transformers {transformers.__version__}: Trainer.{name}"
        assert hasattr(Trainer, name), f"{where} is gone; RunTrainer's override is dead code (README, Train)"
        assert list(inspect.signature(getattr(Trainer, name)).parameters) == params, f"{where} changed"


def test_every_private_override_is_listed():
    ours = RunTrainer.__mro__[: RunTrainer.__mro__.index(Trainer)]  # RunTrainer and StageTrainer
    private = {n for cls in ours for n in vars(cls) if n.startswith("_") and not n.startswith("__")}
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
        [
            f"output_dir={tmp_path}",
            "train.group_by_length=true",
            "train.balance=0",
            "train.batch_size=4",
            "train.num_workers=0",
        ],
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
    assert list(trainer.sampler) == length_grouped_order(lengths, 4, cfg.train.seed + 2)


def test_load_weights_brings_back_a_lora_projector_checkpoint(tiny_model_dir, tmp_path):
    """The best checkpoint of a LoRA run is loaded with peft's public loaders (adapter + projector)."""
    from safetensors.torch import save_file

    from productvlm.models.loading import EXTRA_TRAINABLES
    from productvlm.training.checkpoints import load_weights
    from productvlm.training.model import apply_method, extra_trainables, load_model

    sets = [f"model.path={tiny_model_dir}", "train.method=lora+projector", "train.vision_pretrain.epochs=0"]
    cfg = load_config(CONFIGS / "tiny-cpu.yaml", sets)
    model = apply_method(load_model(cfg, str(tiny_model_dir))[0], cfg)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in trainable.values():
            p.normal_()
    saved = {n: p.detach().clone() for n, p in trainable.items()}
    model.save_pretrained(tmp_path)
    save_file(extra_trainables(model), tmp_path / EXTRA_TRAINABLES)
    with torch.no_grad():
        for p in trainable.values():
            p.zero_()
    load_weights(model, tmp_path)
    assert all(torch.equal(p, saved[n]) for n, p in trainable.items())
    assert any("lora_" in n for n in saved) and any("img_projection" in n for n in saved)
