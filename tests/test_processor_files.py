"""Every folder we save loads elsewhere: `Phi3VProcessor.save_pretrained`, a training run's RUN/final and
its checkpoints all write tokenizer and processor files in the official shape (LlamaTokenizer, the
official fields, no loader arguments), which our loaders read back as they were, and (slow)
transformers 4.46 reads them and encodes prompts to our ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from productvlm.models.phi3v import Phi3VProcessor
from productvlm.models.phi3v.processing_phi3v import LOADER_ARGS
from test_export_compat import PROMPTS, _assert_same_encoding, _encode_with_transformers_446

from conftest import REFERENCE

OFFICIAL = REFERENCE / "phi3.5-vision-instruct"
needs_official = pytest.mark.skipif(not OFFICIAL.is_dir(), reason=f"official configs not found at {OFFICIAL}")


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("saved")
    Phi3VProcessor.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """tiny-cpu.yaml for 4 steps with a checkpoint every 2: RUN/final and RUN/checkpoints/step-*."""
    import eval_helpers
    from productvlm.config import load_config
    from productvlm.training.run import train

    base = tmp_path_factory.mktemp("files-run")
    cfg = load_config(
        eval_helpers.CONFIGS / "tiny-cpu.yaml",
        [
            f"data.dir={eval_helpers.catalog(tmp_path_factory.getbasetemp())}",
            f"output_dir={base / 'run'}",
            "tracking.backend=none",
            "train.max_steps=4",
            "train.save_steps=2",
            "train.batch_size=4",
            "eval.subset=0",
            "train.vision_pretrain.epochs=0",
        ],
    )
    return train(cfg, progress=False).run_dir


def _folders(saved: Path, run: Path) -> dict[str, Path]:
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    assert checkpoints, "the run wrote no checkpoint"
    return {"save_pretrained": saved, "RUN/final": run / "final", "checkpoint": checkpoints[-1]}


def _assert_official_shape(folder: Path) -> None:
    tokenizer = _json(folder / "tokenizer_config.json")
    assert tokenizer["tokenizer_class"] == "LlamaTokenizer", folder
    assert tokenizer["processor_class"] == "Phi3VProcessor"
    assert tokenizer["add_bos_token"] is True and tokenizer["add_eos_token"] is False
    assert tokenizer["model_max_length"] == 131072
    assert "<|end|>" in tokenizer["chat_template"]  # inline, as the official file has it
    for name in ("tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        assert not LOADER_ARGS & set(_json(folder / name)), (folder, name)
    assert _json(folder / "processor_config.json") == {"processor_class": "Phi3VProcessor"}
    image = _json(folder / "preprocessor_config.json")
    assert image["image_processor_type"] == "Phi3VImageProcessor"
    assert image["processor_class"] == "Phi3VProcessor"
    special = _json(folder / "special_tokens_map.json")
    assert special["bos_token"]["content"] == "<s>" and special["eos_token"]["content"] == "<|endoftext|>"


def test_every_saved_folder_has_the_official_shape(saved, run):
    for folder in _folders(saved, run).values():
        _assert_official_shape(folder)


@needs_official
def test_the_fields_are_the_official_ones(saved, run):
    """The official Phi-3.5-vision files' keys, less `auto_map` (only an export points at hub code)."""
    official = _json(OFFICIAL / "tokenizer_config.json")
    ignored = {"added_tokens_decoder", "auto_map"}  # transformers 5 keeps the added tokens in tokenizer.json
    for where, folder in _folders(saved, run).items():
        tokenizer = _json(folder / "tokenizer_config.json")
        assert set(tokenizer) - ignored == set(official) - ignored, where
        for key in ("tokenizer_class", "processor_class", "add_bos_token", "legacy", "model_max_length",
                    "additional_special_tokens", "bos_token", "eos_token", "pad_token", "unk_token"):  # fmt: skip
            assert tokenizer[key] == official[key], (where, key)
        assert _json(folder / "special_tokens_map.json") == _json(OFFICIAL / "special_tokens_map.json"), where
        assert set(_json(OFFICIAL / "preprocessor_config.json")) - {"auto_map"} <= set(
            _json(folder / "preprocessor_config.json")
        )


def test_our_loader_reads_each_folder_as_the_source(saved, run, tiny_model_dir):
    source = Phi3VProcessor.from_pretrained(tiny_model_dir)
    for where, folder in _folders(saved, run).items():
        again = Phi3VProcessor.from_pretrained(folder)
        for prompt in PROMPTS:
            n = prompt.count("<|image_")
            assert again.encode_prompt(prompt, [3] * n) == source.encode_prompt(prompt, [3] * n), where
        assert again.image_processor.to_dict() == source.image_processor.to_dict(), where
        assert again.tokenizer.chat_template == source.tokenizer.chat_template, where


@pytest.mark.slow
def test_transformers_446_loads_every_saved_folder(saved, run):
    for folder in _folders(saved, run).values():
        _assert_same_encoding(folder, _encode_with_transformers_446(folder))
