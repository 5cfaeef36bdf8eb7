"""Sequence packing: a packed row computes exactly what a padded batch of the same samples does."""

import json

import pytest
import torch

from productvlm.config import DEFAULT_ANSWER, DEFAULT_PROMPT
from productvlm.data.folder import read_split
from productvlm.data.synth import synthesize
from productvlm.models.phi3v import Phi3VConfig, Phi3VForCausalLM, Phi3VProcessor
from productvlm.training.data import (
    IGNORE,
    CatalogDataset,
    Collator,
    Encoder,
    PackCollator,
    PackedDataset,
    pack_samples,
    padding_share,
)
from productvlm.training.run import train
from test_train_run import config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("catalog")
    synthesize(out, rows=40, seed=3, overwrite=True, progress=False, workers=1)
    return out


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return Phi3VProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def samples(processor, data_dir):
    """Six samples at 4 crops: photos of different sizes, so different lengths (~130 tokens)."""
    encoder = Encoder(processor, DEFAULT_PROMPT, DEFAULT_ANSWER, 4, 4096)
    ds = CatalogDataset(read_split(data_dir, "train")[:6], encoder)
    return [ds[i] for i in range(6)]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    """The tiny model with LongRoPE switching to its long factors above 200 positions.

    The packed rows below are over 400 tokens and each sample is under 200, so the packed rows
    only match the padded batch if RoPE sees each sample's own (restarted) positions.
    """
    cfg = Phi3VConfig.from_pretrained(tiny_model_dir)
    cfg.original_max_position_embeddings = 200
    cfg.rope_parameters["original_max_position_embeddings"] = 200
    cfg.use_cache = False  # as in training (Trainer sets it): packing is detected only without a cache
    return Phi3VForCausalLM.from_pretrained(tiny_model_dir, config=cfg, dtype=torch.float32).eval()


def packed_and_padded(processor, samples):
    packed = PackCollator(processor, 4)([{"pack": samples[:4]}, {"pack": samples[4:]}])
    padded = Collator(processor, 4)(samples)
    return packed, padded


def test_pack_collator_rows(processor, samples):
    packed, _ = packed_and_padded(processor, samples)
    ids, labels, pos = packed["input_ids"], packed["labels"], packed["position_ids"]
    assert "attention_mask" not in packed  # with one, transformers would not look for packed segments
    lengths = [len(s["input_ids"]) for s in samples]
    assert ids.shape == (2, sum(lengths[:4]))
    at = 0
    for s, n in zip(samples[:4], lengths):
        assert ids[0, at : at + n].tolist() == s["input_ids"]
        assert pos[0, at : at + n].tolist() == list(range(n))
        assert labels[0, at].item() == IGNORE and labels[0, at + 1 : at + n].tolist() == s["labels"][1:]
        at += n
    # the short second row: each padding token is a segment of its own (position 0), with no labels
    used = sum(lengths[4:])
    assert pos[1, used:].tolist() == [0] * (ids.shape[1] - used)
    assert (labels[1, used:] == IGNORE).all() and (ids[1, used:] == processor.tokenizer.pad_token_id).all()
    # every image of the batch, in row order (the order of the image slots)
    images = processor.image_processor([s["image"] for s in samples], num_crops=4, return_tensors="pt")
    assert torch.equal(packed["pixel_values"], images["pixel_values"])
    assert torch.equal(packed["image_sizes"], images["image_sizes"])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_the_padded_batch(model, processor, samples, attention):
    model.set_attn_implementation(attention)
    packed, padded = packed_and_padded(processor, samples)
    assert packed["input_ids"].shape[1] > 400 > 200 > padded["input_ids"].shape[1]

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_a, grads_a = loss_and_grads(padded)
    loss_b, grads_b = loss_and_grads(packed)
    assert loss_b == pytest.approx(loss_a, abs=1e-5)
    assert grads_a.keys() == grads_b.keys()
    assert any(".img_processor." in n for n in grads_a) and "lm_head.weight" in grads_a
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@torch.no_grad()
def test_attention_does_not_cross_samples(model, processor, samples):
    model.set_attn_implementation("sdpa")
    a, b = samples[0], samples[1]
    changed = dict(a, input_ids=a["input_ids"][:-5] + [42, 43, 44, 45, 46])  # sample A's answer differs
    collate = PackCollator(processor, 4)
    before = collate([{"pack": [a, b]}])
    after = collate([{"pack": [changed, b]}])
    n = len(a["input_ids"])
    logits_before, logits_after = model(**before).logits, model(**after).logits
    assert not torch.allclose(logits_before[0, n - 5 : n], logits_after[0, n - 5 : n])  # A's own logits move
    torch.testing.assert_close(logits_after[0, n:], logits_before[0, n:], atol=1e-5, rtol=0)  # B's do not
    # and B inside the pack equals B alone
    alone = model(**Collator(processor, 4)([b])).logits
    torch.testing.assert_close(logits_before[0, n:], alone[0], atol=1e-5, rtol=1e-5)
    # control: with one running position range the masks merge the samples, and B's logits move
    merged = model(**{**after, "position_ids": torch.arange(after["input_ids"].shape[1])[None]}).logits
    assert not torch.allclose(merged[0, n:], logits_before[0, n:], atol=1e-3)


def test_pack_samples_is_first_fit_decreasing_and_seeded():
    lengths = [(i * 37) % 90 + 10 for i in range(200)]
    packs = pack_samples(lengths, 256, seed=0)
    assert sorted(i for p in packs for i in p) == list(range(200))
    assert all(sum(lengths[i] for i in p) <= 256 for p in packs)
    assert len(packs) <= -(-sum(lengths) // 256) + 1  # within one pack of the lower bound here
    assert pack_samples(lengths, 256, seed=0) == packs and pack_samples(lengths, 256, seed=1) != packs
    with pytest.raises(ValueError, match="sample 3 has 300 tokens"):
        pack_samples([10, 10, 10, 300], 256, seed=0)


def test_packed_dataset_items_are_its_packs(processor, data_dir):
    encoder = Encoder(processor, DEFAULT_PROMPT, DEFAULT_ANSWER, 1, 256)
    ds = CatalogDataset(read_split(data_dir, "train")[:12], encoder)
    packed = PackedDataset(ds, 256, seed=0)
    assert len(packed) < len(ds) and sum(packed.lengths) == sum(ds.lengths)
    assert [s["input_ids"] for s in packed[0]["pack"]] == [ds[i]["input_ids"] for i in packed.packs[0]]


def test_padding_share():
    assert padding_share([2, 4], 2) == pytest.approx(0.25)  # one batch padded to 4: 2 of 8 slots
    assert padding_share([2, 4], 1) == 0.0
    lengths = [(i * 37) % 200 + 20 for i in range(400)]
    random = padding_share(lengths, 8)
    grouped = padding_share(lengths, 8, group_by_length=True)
    packed = padding_share(lengths, 8, packing=True, pack_length=1024)
    assert random > 0.3 and grouped < random / 5 and packed < random / 5


def test_training_with_packing_takes_the_same_first_step(data_dir, tmp_path):
    """One step over the same 6 samples, packed (2-3 rows) or padded (6 rows): same loss and grad norm."""
    sets = ["data.max_train_rows=6", "train.batch_size=6", "train.max_steps=1", "train.group_by_length=false"]
    plain = train(config(data_dir, tmp_path / "plain", *sets), progress=False)
    packed = train(
        config(data_dir, tmp_path / "packed", *sets, "train.packing=true", "train.pack_length=256"),
        progress=False,
    )
    assert packed.data["packs"] < 6 and packed.data["padding_share"] < plain.data["padding_share"]

    def first_step(run):
        return next(
            e for e in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "loss" in e
        )

    a, b = first_step(plain.run_dir), first_step(packed.run_dir)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
