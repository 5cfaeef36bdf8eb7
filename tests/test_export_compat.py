"""What an export looks like to other tools: the official files and fields, no leaked loader arguments,
auto_map entries naming Microsoft's hub code, a model card with the last evaluation's metrics, and
(slow) transformers 4.46 loading the exported tokenizer and encoding prompts exactly as we do."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from productvlm.models.eval_records import last_evaluation
from productvlm.models.export import export_model
from productvlm.models.phi3v import Phi3VProcessor
from productvlm.models.phi3v.processing_phi3v import LOADER_ARGS

from conftest import GOLDEN, REFERENCE

OFFICIAL = REFERENCE / "phi3.5-vision-instruct"
PROMPTS = [
    "<|user|>\n<|image_1|>What is shown in this image?<|end|><|assistant|>\n",
    "<|system|>\nBe brief.<|end|><|user|>\n<|image_1|>Compare <|image_2|> Café 12,50 € x2<|end|><|assistant|>\n",
]


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A run folder around the tiny model, fine-tuned (so to speak) from Phi-3.5-vision, evaluated twice."""
    run = tmp_path_factory.mktemp("run")
    shutil.copytree(tiny_model_dir, run / "final")
    config = {
        "model": {"path": "microsoft/Phi-3.5-vision-instruct"},
        "data": {"dir": str(run / "shop"), "num_crops": 2},
        "train": {"method": "lora", "lora": {"r": 8, "alpha": 16}, "lr": 0.0002, "epochs": 2.0, "seed": 0},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (run / "train_log.jsonl").write_text('{"step": 5, "loss": 2.5}\n{"step": 10, "loss": 1.25}\n')
    (run / "shop").mkdir()
    (run / "shop" / "dataset.json").write_text(json.dumps({"source": "synth:seed=0", "currency": "EUR"}))
    for split, accuracy in (("validation", 0.5), ("test", 0.75)):  # test written last: the newest
        (run / f"eval-{split}").mkdir()
        metrics = {"split": split, "n": 40, "parse_rate": 1.0, "category": {"accuracy": accuracy},
                   "price": {"mape": 0.125}, "title": {"chrf": 61.5}, "data": str(run / "shop")}  # fmt: skip
        (run / f"eval-{split}" / "metrics.json").write_text(json.dumps(metrics))
    return run


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> Path:
    return export_model(run_dir, tmp_path_factory.mktemp("export") / "shop-reader", dtype="fp32")


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.skipif(not OFFICIAL.is_dir(), reason=f"official configs not found at {OFFICIAL}")
def test_files_have_the_official_fields_and_classes(exported):
    tokenizer = _json(exported / "tokenizer_config.json")
    official = _json(OFFICIAL / "tokenizer_config.json")
    ignored = {"added_tokens_decoder"}  # transformers 5 keeps the added tokens in tokenizer.json only
    assert set(official) - ignored == set(tokenizer) - ignored
    for key in ("tokenizer_class", "processor_class", "add_bos_token", "add_eos_token", "legacy",
                "model_max_length", "additional_special_tokens", "chat_template", "bos_token", "eos_token"):  # fmt: skip
        assert tokenizer[key] == official[key], key
    assert _json(exported / "special_tokens_map.json") == _json(OFFICIAL / "special_tokens_map.json")
    image = _json(exported / "preprocessor_config.json")
    assert set(_json(OFFICIAL / "preprocessor_config.json")) <= set(image)
    assert image["image_processor_type"] == "Phi3VImageProcessor" and image["num_crops"] == 4
    assert set(_json(exported / "processor_config.json")) == set(_json(OFFICIAL / "processor_config.json"))
    assert set(_json(OFFICIAL / "generation_config.json")) - {"_from_model_config"} <= set(
        _json(exported / "generation_config.json")
    )
    for name in ("tokenizer_config.json", "preprocessor_config.json", "processor_config.json", "config.json"):
        assert not LOADER_ARGS & set(_json(exported / name)), name


def test_auto_map_names_the_base_models_hub_code(exported, tiny_model_dir, tmp_path):
    repo = "microsoft/Phi-3.5-vision-instruct"
    config = _json(exported / "config.json")
    assert config["auto_map"] == {
        "AutoConfig": f"{repo}--configuration_phi3_v.Phi3VConfig",
        "AutoModelForCausalLM": f"{repo}--modeling_phi3_v.Phi3VForCausalLM",
    }
    processor = f"{repo}--processing_phi3_v.Phi3VProcessor"
    assert _json(exported / "preprocessor_config.json")["auto_map"] == {
        "AutoImageProcessor": f"{repo}--processing_phi3_v.Phi3VImageProcessor",
        "AutoProcessor": processor,
    }
    assert _json(exported / "tokenizer_config.json")["auto_map"] == {"AutoProcessor": processor}
    assert _json(exported / "processor_config.json")["auto_map"] == {"AutoProcessor": processor}
    # a model of unknown origin points at Phi-3-vision's code, where the image processor has its own module
    plain = export_model(tiny_model_dir, tmp_path / "plain", dtype="fp32")
    assert _json(plain / "preprocessor_config.json")["auto_map"]["AutoImageProcessor"] == (
        "microsoft/Phi-3-vision-128k-instruct--image_processing_phi3_v.Phi3VImageProcessor"
    )
    assert "base_model" not in _card(plain)[0]


def test_our_loaders_read_the_export_as_the_source(exported, tiny_model_dir):
    ours, theirs = Phi3VProcessor.from_pretrained(tiny_model_dir), Phi3VProcessor.from_pretrained(exported)
    for prompt in PROMPTS:
        n = prompt.count("<|image_")
        assert theirs.encode_prompt(prompt, [3] * n) == ours.encode_prompt(prompt, [3] * n)
    assert theirs.image_processor.to_dict() == ours.image_processor.to_dict()


def _card(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text(encoding="utf-8")
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_model_card_has_hub_metadata_and_the_last_evaluation(exported, run_dir):
    meta, body = _card(exported)
    assert meta["base_model"] == "microsoft/Phi-3.5-vision-instruct"
    assert (meta["library_name"], meta["pipeline_tag"]) == ("transformers", "image-text-to-text")
    assert meta["datasets"] == ["shop"]
    result = meta["model-index"][0]["results"][0]
    assert result["dataset"]["split"] == "test"
    shown = {m["name"]: m["value"] for m in result["metrics"]}
    assert shown == {
        "answers parsed": 1.0,
        "category accuracy": 0.75,
        "price MAPE": 0.125,
        "title chrF": 61.5,
    }
    assert set(meta["metrics"]) == {"parse_rate", "accuracy", "mape", "chrf"}
    # huggingface_hub reads the model-index back into the eval results, values and all
    card = ModelCard.load(exported / "README.md")
    model_name, results = model_index_to_eval_results(meta["model-index"])
    assert model_name == card.data.model_name == "shop-reader"
    for parsed in (results, card.data.eval_results):
        assert {(r.metric_name, r.metric_type, r.metric_value) for r in parsed} == {
            ("answers parsed", "parse_rate", 1.0),
            ("category accuracy", "accuracy", 0.75),
            ("price MAPE", "mape", 0.125),
            ("title chrF", "chrf", 61.5),
        }
        assert {(r.task_type, r.dataset_name, r.dataset_type, r.dataset_split) for r in parsed} == {
            ("image-text-to-text", "shop", "imagefolder", "test")
        }
    assert "<|image_1|>What is shown in this image?" in body and "{category3_code}" in body
    assert "| method | lora |" in body and "r=8, alpha=16" in body and "1.2500 at step 10" in body
    assert "Prices are in EUR." in body and "`num_crops=2`" in body
    # the export carries that evaluation, so serving the export shows it too
    assert last_evaluation(exported) == last_evaluation(run_dir)


def test_last_evaluation_is_the_newest_held_out_one(run_dir, tmp_path, monkeypatch):
    assert last_evaluation(run_dir)["split"] == "test"
    assert last_evaluation(run_dir / "final")["category"]["accuracy"] == 0.75
    test_metrics = run_dir / "eval-test" / "metrics.json"
    validation = run_dir / "eval-validation" / "metrics.json"
    stamp = test_metrics.stat().st_mtime
    import os

    os.utime(validation, (stamp + 10, stamp + 10))
    try:
        assert last_evaluation(run_dir)["split"] == "validation"
    finally:
        os.utime(validation, (stamp - 10, stamp - 10))
    # outside a run folder: ./eval-<split> counts only when it names this model
    model = tmp_path / "model"
    model.mkdir()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "eval-test").mkdir()
    (tmp_path / "eval-test" / "metrics.json").write_text(json.dumps({"split": "test", "model": "elsewhere"}))
    assert last_evaluation(model) is None
    (tmp_path / "eval-test" / "metrics.json").write_text(json.dumps({"split": "test", "model": str(model)}))
    assert last_evaluation(model)["model"] == str(model)


TF446_SCRIPT = r"""
import json, os, re, sys
import transformers
from transformers import AutoTokenizer, GenerationConfig
folder, prompts = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(folder)
out = {"version": transformers.__version__, "class": type(tok).__name__,
       "image_id": tok.convert_tokens_to_ids("<|image|>"),
       "special": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id],
       "eos_generate": GenerationConfig.from_pretrained(folder).eos_token_id
                       if os.path.isfile(os.path.join(folder, "generation_config.json")) else None,
       # as Microsoft's processor encodes a prompt: the text between placeholders, chunk by chunk
       "chunks": [[tok(c).input_ids for c in re.split(r"<\|image_\d+\|>", p)] for p in prompts],
       "whole": [tok(p).input_ids for p in prompts],
       "decoded": [tok.decode(tok(p).input_ids, skip_special_tokens=False) for p in prompts]}
print(json.dumps(out))
"""


def _encode_with_transformers_446(folder: Path) -> dict:
    from side_venv import side_python

    python = side_python()
    done = subprocess.run(
        [str(python), "-c", TF446_SCRIPT, str(folder), json.dumps(PROMPTS)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_same_encoding(folder: Path, seen: dict) -> None:
    ours = Phi3VProcessor.from_pretrained(folder)
    tok = ours.tokenizer
    assert seen["version"] == "4.46.3" and seen["class"] == "LlamaTokenizerFast"
    assert seen["image_id"] == ours.image_token_id
    assert seen["special"] == [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id]
    assert seen["whole"] == [tok(p).input_ids for p in PROMPTS]
    assert seen["decoded"] == [tok.decode(tok(p).input_ids, skip_special_tokens=False) for p in PROMPTS]
    for prompt, chunks in zip(PROMPTS, seen["chunks"]):
        n_img = 5
        theirs = chunks[0] + sum(([ours.image_token_id] * n_img + c for c in chunks[1:]), [])
        assert theirs == ours.encode_prompt(prompt, [n_img] * (len(chunks) - 1)), prompt


@pytest.mark.slow
def test_transformers_446_encodes_the_exported_tokenizer_as_we_do(exported):
    _assert_same_encoding(exported, _encode_with_transformers_446(exported))


@pytest.mark.slow
@pytest.mark.skipif(not GOLDEN.is_dir(), reason=f"reference data not found at {GOLDEN}")
def test_transformers_446_with_the_official_tokenizer(tmp_path):
    """The real Phi-3 tokenizer (the golden tiny model's), exported by us, read by transformers 4.46."""
    out = export_model(GOLDEN / "tiny-phi3v", tmp_path / "official", dtype="fp32")
    seen = _encode_with_transformers_446(out)
    _assert_same_encoding(out, seen)
    official_ids = _json(REFERENCE / "phi3-vision-128k-instruct" / "tokenizer.json")["added_tokens"]
    assert seen["image_id"] == next(t["id"] for t in official_ids if t["content"] == "<|image|>") == 32044
