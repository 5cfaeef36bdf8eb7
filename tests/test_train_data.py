"""Samples, labels and batches: the loss sees the answer and <|end|> only; batching changes nothing."""

import pytest
import torch
from PIL import Image

from productvlm.config import DEFAULT_ANSWER, DEFAULT_PROMPT
from productvlm.data.folder import read_split
from productvlm.data.synth import synthesize
from productvlm.errors import UserError
from productvlm.inference.inputs import load_image
from productvlm.models.phi3v import Phi3VForCausalLM, Phi3VProcessor
from productvlm.training.data import (
    IGNORE,
    CatalogDataset,
    Collator,
    Encoder,
    EpochLengthSampler,
    row_weights,
)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("catalog")
    synthesize(out, rows=40, seed=3, overwrite=True, progress=False, workers=1)
    return read_split(out, "train")


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return Phi3VProcessor.from_pretrained(tiny_model_dir)


def encoder(processor, num_crops=4, max_tokens=4096, answer=DEFAULT_ANSWER):
    return Encoder(processor, DEFAULT_PROMPT, answer, num_crops, max_tokens)


def test_labels_are_the_answer_and_end_only(processor, rows):
    ds = CatalogDataset(rows[:6], encoder(processor))
    for row, sample in zip(rows, ds.samples):
        answer = [t for t in sample.labels if t != IGNORE]
        expected = DEFAULT_ANSWER.format(**row) + "<|end|>"
        assert processor.tokenizer.decode(answer) == expected
        # the labelled span is the tail of the sequence, right after the prompt
        n = len(answer)
        assert sample.labels[:-n] == [IGNORE] * (len(sample) - n)
        assert sample.input_ids[-n:] == answer
        assert processor.image_token_id not in answer


def test_collated_labels_ignore_prompt_image_slots_and_padding(processor, rows):
    ds = CatalogDataset(rows[:4], encoder(processor))
    batch = Collator(processor, 4)([ds[i] for i in range(4)])
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    assert (labels[ids == processor.image_token_id] == IGNORE).all()
    assert (labels[mask == 0] == IGNORE).all()
    assert (mask[:, 0] == 1).all()  # right padding
    for i, row in enumerate(rows[:4]):
        kept = labels[i][labels[i] != IGNORE].tolist()
        assert processor.tokenizer.decode(kept) == DEFAULT_ANSWER.format(**row) + "<|end|>"
    assert batch["pixel_values"].shape[:2] == (4, 5) and batch["image_sizes"].shape == (4, 2)


def test_rows_carry_their_loss_weights_into_the_batch_only_when_weighted(processor, rows):
    weighted = CatalogDataset(rows[:3], encoder(processor), weights=[0.5, 2.0, 1.0])
    batch = Collator(processor, 1)([weighted[i] for i in range(3)])
    assert batch["sample_weight"].dtype == torch.float32
    assert batch["sample_weight"].tolist() == [0.5, 2.0, 1.0]
    plain = CatalogDataset(rows[:3], encoder(processor))
    assert "sample_weight" not in Collator(processor, 1)([plain[i] for i in range(3)])
    assert row_weights([{"sample_weight": 3}]) == {"sample_weight": torch.tensor([3.0])}


def test_size_only_lengths_match_the_processor(processor, rows):
    ds = CatalogDataset(rows[:5], encoder(processor))
    for i, row in enumerate(rows[:5]):
        prompt = processor(DEFAULT_PROMPT, [Image.open(row["image_path"])], num_crops=4)["input_ids"][0]
        assert ds.samples[i].input_ids[: len(prompt)] == prompt.tolist()


def test_batch_loss_equals_token_weighted_mean_of_single_losses(tiny_model_dir, processor, rows):
    torch.manual_seed(0)
    model = Phi3VForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ds = CatalogDataset(rows[:4], encoder(processor))
    collate = Collator(processor, 4)
    features = [ds[i] for i in range(4)]
    assert len({len(f["input_ids"]) for f in features}) > 1  # padding really happens
    with torch.no_grad():
        batched = model(**collate(features)).loss.item()
        total, tokens = 0.0, 0
        for f in features:
            one = collate([f])
            n = int((one["labels"][:, 1:] != IGNORE).sum())
            total += model(**one).loss.item() * n
            tokens += n
    assert batched == pytest.approx(total / tokens, abs=1e-5)


def test_sample_over_the_token_budget_is_named(processor, rows):
    with pytest.raises(
        UserError, match=rf"{rows[0]['file_name']}.*product_code {rows[0]['product_code']}.*max_tokens"
    ):
        CatalogDataset(rows[:1], encoder(processor, max_tokens=20))


def test_template_with_unknown_column_is_named(processor, rows):
    with pytest.raises(UserError, match="colour_name"):
        CatalogDataset(rows[:1], encoder(processor, answer="Colour: {colour_name}"))


def test_blank_images_are_grey_and_keep_the_size(rows):
    photo, blank = load_image(rows[0]["image_path"]), load_image(rows[0]["image_path"], blank=True)
    assert blank.size == photo.size
    assert set(blank.getdata()) == {(128, 128, 128)} and len(set(photo.getdata())) > 1


def test_length_grouped_order_depends_on_seed_and_epoch_only():
    lengths = [(i * 37) % 101 for i in range(64)]
    a, b = EpochLengthSampler(8, lengths, seed=1), EpochLengthSampler(8, lengths, seed=1)
    assert list(a) == list(b) and sorted(a) == list(range(64))
    b.set_epoch(1)
    assert list(a) != list(b)
    # batches of 8*50 (megabatches) are sorted longest first: neighbours have similar lengths
    order = list(a)
    spread = sum(abs(lengths[x] - lengths[y]) for x, y in zip(order, order[1:]))
    assert spread < sum(abs(x - y) for x, y in zip(lengths, lengths[1:]))


def test_phone_photos_are_read_upright_and_sized_as_read(tmp_path):
    """EXIF orientation 6 (rotated 90 degrees): pixels come upright and the token count uses that size."""
    from PIL import Image

    from productvlm.inference.inputs import image_size

    stored = Image.new("RGB", (64, 32), (200, 10, 10))
    exif = stored.getexif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif)
    assert load_image(path).size == (32, 64)
    assert image_size(path) == (32, 64)
    assert load_image(path, blank=True).size == (32, 64)
